"""gatewayd.core.http.keepalive: hypercorn's keep-alive timeout with one watcher task per
connection. Over real sockets: an idle connection is closed after the timeout, a busy one
never, one kept busy now and then stays open, an idle one closes at once when the server
stops, and no task outlives a connection the client closed. And the release gate."""

from __future__ import annotations

import trio
from hypercorn.trio import serve
from hypercorn.trio import tcp_server
from hypercorn.trio.worker_context import TrioSingleTask
from quart_trio import QuartTrio

from gatewayd.core.http import gate, keepalive
from gatewayd.core.http.serve import GatewayConfig
from gatewayd.testing.ports import reserved_port

GET = b"GET /answer HTTP/1.1\r\nHost: gw\r\n\r\n"
SLOW = b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\n"
ANSWER_END = b"\r\n\r\nanswered"


def _app(slow_s: float) -> QuartTrio:
    app = QuartTrio("keepalive")

    @app.get("/answer")
    async def answer() -> str:
        return "answered"

    @app.get("/slow")
    async def slow() -> str:
        await trio.sleep(slow_s)
        return "answered"

    return app


class Server:
    def __init__(self, keep_alive_s: float, slow_s: float = 0.0, graceful_s: float = 30) -> None:
        assert keepalive.enable() and keepalive.enabled()  # the release pinned is the one tested
        assert tcp_server.TrioSingleTask is keepalive.KeepAliveTimer
        self.port = reserved_port()
        self.config = GatewayConfig()
        self.config.bind = [f"127.0.0.1:{self.port}"]
        self.config.keep_alive_timeout = keep_alive_s
        self.config.graceful_timeout = graceful_s
        self.app = _app(slow_s)
        self.stop = trio.Event()
        self.stopped = trio.Event()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await serve(self.app, self.config, shutdown_trigger=self.stop.wait, task_status=task_status)
        self.stopped.set()

    async def ask(self, client: trio.SocketStream, request: bytes = GET) -> None:
        await client.send_all(request)
        got = b""
        while not got.endswith(ANSWER_END):
            data = await client.receive_some(65536)
            assert data, got
            got += data
        assert got.startswith(b"HTTP/1.1 200")


async def _closed_by_server(client: trio.SocketStream) -> bool:
    """Whether the server closed the connection (EOF or reset), reading whatever comes."""
    try:
        return await client.receive_some(65536) == b""
    except trio.BrokenResourceError:
        return True


async def test_an_idle_connection_is_closed_after_the_timeout_a_busy_one_never():
    server = Server(keep_alive_s=0.5, slow_s=1.5)  # the slow answer takes three timeouts
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await trio.open_tcp_stream("127.0.0.1", server.port)
            await server.ask(client)
            await server.ask(client, SLOW)  # busy past the timeout: still answered
            await server.ask(client)  # and the connection still open
            assert await _closed_by_server(client)  # idle: closed
            server.stop.set()


async def test_a_connection_used_now_and_then_stays_open_past_the_timeout():
    server = Server(keep_alive_s=3.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await trio.open_tcp_stream("127.0.0.1", server.port)
            began = trio.current_time()
            while trio.current_time() - began < 7.5:  # more than twice the timeout in all
                await server.ask(client)
                await trio.sleep(1.0)  # each idle spell a third of it
            await server.ask(client)
            server.stop.set()


async def test_an_idle_connection_closes_at_once_when_the_server_stops():
    server = Server(keep_alive_s=600)
    with trio.fail_after(60):  # far less than the keep-alive timeout
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await trio.open_tcp_stream("127.0.0.1", server.port)
            await server.ask(client)
            server.stop.set()
            assert await _closed_by_server(client)
            await server.stopped.wait()


async def test_a_busy_connection_is_answered_then_closed_when_the_server_stops():
    # (hypercorn 0.18 itself closes that connection only at the graceful deadline: a short one)
    server = Server(keep_alive_s=600, slow_s=0.5, graceful_s=5)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await trio.open_tcp_stream("127.0.0.1", server.port)
            await server.ask(client)
            await client.send_all(SLOW)
            await trio.sleep(0.3)  # the request is in (a late one would find the listener closed)
            server.stop.set()
            got = b""
            while not got.endswith(ANSWER_END):
                data = await client.receive_some(65536)
                assert data, got
                got += data
            assert await _closed_by_server(client)
            await server.stopped.wait()


def _tasks_under(task: trio.lowlevel.Task) -> int:
    return sum(1 + _tasks_under(child) for nursery in task.child_nurseries for child in nursery.child_tasks)


async def test_no_task_outlives_a_connection_its_client_closed():
    server = Server(keep_alive_s=600)
    root = trio.lowlevel.current_root_task()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await trio.sleep(0.2)
            before = _tasks_under(root)
            clients = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(3)]
            for client in clients:
                await server.ask(client)
            assert _tasks_under(root) > before  # each connection's tasks, its watcher among them
            for client in clients:
                await client.aclose()
            while _tasks_under(root) > before:  # gone with their connections, not 600 s later
                await trio.sleep(0.05)
            server.stop.set()


def test_a_release_it_was_not_tested_with_leaves_hypercorn_alone(monkeypatch, caplog):
    assert keepalive._why_not() == ""  # the pinned release (constraints.txt)
    monkeypatch.setattr(gate, "version", lambda name: "0.19.0")
    assert keepalive._why_not() == "hypercorn 0.19 (tested: 0.18)"
    monkeypatch.setattr(keepalive, "_state", {"enabled": False})
    monkeypatch.setattr(tcp_server, "TrioSingleTask", TrioSingleTask)
    read_data = tcp_server.TCPServer._read_data
    assert keepalive.enable() is False and not keepalive.enabled()
    assert tcp_server.TrioSingleTask is TrioSingleTask and tcp_server.TCPServer._read_data is read_data
    assert "hypercorn starts a keep-alive task per request: hypercorn 0.19 (tested: 0.18)" in caplog.text


def test_internals_that_moved_leave_hypercorn_alone(monkeypatch):
    monkeypatch.setattr(keepalive, "_moved", "hypercorn.trio.tcp_server changed")
    monkeypatch.setattr(keepalive, "_state", {"enabled": False})
    monkeypatch.setattr(tcp_server, "TrioSingleTask", TrioSingleTask)
    assert keepalive.enable() is False and tcp_server.TrioSingleTask is TrioSingleTask


async def test_a_read_timeout_still_closes_a_silent_connection():
    server = Server(keep_alive_s=600)
    server.config.read_timeout = 0.5  # (the gateway sets none: its reads take no cancel scope)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = await trio.open_tcp_stream("127.0.0.1", server.port)
            await server.ask(client)
            assert await _closed_by_server(client)  # silent past the read timeout: closed
            server.stop.set()
