"""hypercorn's listeners take the connections already waiting together (gatewayd.core.http.accept).

trio's own listener accepts one connection per scheduling pass: a busy gateway left a site's
lights reconnecting at once in the kernel's queue, their first requests unanswered for
seconds. Over real sockets: connections made before the listener accepts are all handed
over after the first without a checkpoint each, and the gateway's server (serve_app) is
served through them.
"""

from __future__ import annotations

import trio
import trio.testing
from hypercorn.trio import run as hypercorn_run
from quart_trio import QuartTrio

from gatewayd.core.http import accept, gate
from gatewayd.core.http.serve import serve_app
from gatewayd.core.schema import Address
from gatewayd.testing.ports import reserved_port


async def _listener() -> tuple[trio.SocketListener, int]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=256)
    return listener, listener.socket.getsockname()[1]


async def test_the_connections_waiting_are_handed_over_without_a_pass_each():
    listener, port = await _listener()
    batched = accept.BatchListener(listener)
    clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(10)]  # the kernel completes them
    streams = [await batched.accept()]  # the first one waits (a checkpoint, as trio's)
    with trio.testing.assert_no_checkpoints():  # the nine others were taken with it
        streams += [await batched.accept() for _ in range(9)]
    # Each is a working connection, and each a different client's.
    for k, client in enumerate(clients):
        await client.send_all(b"%d" % k)
    got = sorted([int(await stream.receive_some(16)) for stream in streams])
    assert got == list(range(10))
    for s in [*streams, *clients]:
        await s.aclose()
    await batched.aclose()


async def test_a_batch_is_at_most_batch_connections_and_the_rest_wait_their_turn():
    listener, port = await _listener()
    batched = accept.BatchListener(listener)
    clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(accept.BATCH + 3)]
    streams = [await batched.accept()]
    with trio.testing.assert_no_checkpoints():
        streams += [await batched.accept() for _ in range(accept.BATCH - 1)]
    streams += [await batched.accept() for _ in range(3)]  # the next batch: a real accept first
    assert len({s.socket.getpeername() for s in streams}) == accept.BATCH + 3
    for s in [*streams, *clients]:
        await s.aclose()
    await batched.aclose()


async def test_closing_the_listener_closes_the_connections_taken_but_not_handed_over():
    listener, port = await _listener()
    batched = accept.BatchListener(listener)
    clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
    first = await batched.accept()
    await batched.aclose()  # two taken with the first, never handed over: closed, not leaked
    for client in clients[1:]:
        assert await client.receive_some(16) == b""
    for s in [first, *clients]:
        await s.aclose()


async def test_the_gateways_server_accepts_through_batch_listeners():
    assert accept.enable() and accept.enabled()  # the release pinned is the one tested
    assert hypercorn_run.trio.serve_listeners is accept.serve_listeners
    assert hypercorn_run.trio.open_nursery is trio.open_nursery  # the rest is trio's own
    app = QuartTrio("accept")

    @app.get("/")
    async def hello() -> str:
        return "hello"

    port = reserved_port()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_app(
            app, Address("127.0.0.1", port), shutdown_trigger=stop.wait, graceful_timeout=1,
            access_log=False, task_status=task_status))
        clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(20)]
        for client in clients:
            await client.send_all(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
        for client in clients:
            got = b""
            while not got.endswith(b"hello"):
                data = await client.receive_some(4096)
                assert data, got
                got += data
            assert got.startswith(b"HTTP/1.1 200"), got
            await client.aclose()
        stop.set()


def test_a_release_it_was_not_tested_with_leaves_hypercorn_alone(monkeypatch, caplog):
    assert accept._why_not() == ""  # the pinned release (constraints.txt)
    monkeypatch.setattr(gate, "version", lambda name: "0.19.0")
    assert accept._why_not() == "hypercorn 0.19 (tested: 0.18)"
    monkeypatch.setattr(accept, "_state", {"enabled": False})
    monkeypatch.setattr(hypercorn_run, "trio", trio)
    assert accept.enable() is False and not accept.enabled()
    assert hypercorn_run.trio is trio
    assert "hypercorn accepts one connection per scheduling pass: hypercorn 0.19 (tested: 0.18)" in caplog.text
