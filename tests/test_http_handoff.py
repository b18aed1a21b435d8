"""gatewayd.core.http.handoff: a request's messages queued for the app at once when there is
room (and waited for when there is none), answers written under the connection's lock;
over real sockets a body in many parts, more than the app's queue holds, comes in whole;
and the release gate."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypercorn.trio import serve
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from quart import request

from gatewayd.core.http import gate, handoff
from gatewayd.core.http.lean import LeanQuart
from gatewayd.core.http.serve import GatewayConfig, lean_framework
from gatewayd.testing.ports import reserved_port


async def test_a_message_with_room_is_queued_at_once_one_without_waits_for_room():
    queue = handoff.AppQueue(1)
    put, receive = queue.put, queue
    await put(1)
    assert queue._send.statistics().current_buffer_used == 1  # queued, nobody had to run
    done = trio.Event()

    async def second() -> None:
        await put(2)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # full: it waits
        assert receive.receive_nowait() == 1
        await done.wait()
    assert receive.receive_nowait() == 2


async def test_a_cancelled_sender_queues_nothing():
    queue = handoff.AppQueue(5)
    with trio.CancelScope() as scope:
        scope.cancel()
        await queue.put({"type": "http.disconnect"})
    assert scope.cancelled_caught and queue._send.statistics().current_buffer_used == 0


async def test_a_body_in_many_parts_comes_in_whole_and_is_answered_in_one_piece():
    lean_framework()
    assert handoff.enabled()  # the release pinned is the one tested
    app = LeanQuart("handoff")

    @app.post("/echo")
    async def echo() -> bytes:
        return await request.get_data()

    port = reserved_port()
    config = GatewayConfig()
    config.bind = [f"127.0.0.1:{port}"]
    config.max_app_queue_size = 2  # far fewer than the body's parts
    stop = trio.Event()
    body = bytes(range(256)) * 40
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(app, config, shutdown_trigger=stop.wait,
                                                          task_status=task_status))
            client = await trio.open_tcp_stream("127.0.0.1", port)
            for _ in range(2):  # twice on one connection
                await client.send_all(b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % len(body))
                for i in range(0, len(body), 512):  # 20 parts, each its own write
                    await client.send_all(body[i:i + 512])
                    await trio.sleep(0.002)
                got = b""
                while not got.endswith(body):
                    data = await client.receive_some(65536)
                    assert data, got[:200]
                    got += data
                assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"\r\n\r\n" + body)
            stop.set()


def test_a_release_it_was_not_tested_with_leaves_hypercorn_alone(monkeypatch, caplog):
    assert handoff._why_not() == ""  # the pinned release (constraints.txt)
    monkeypatch.setattr(gate, "version", lambda name: "0.19.0")
    assert handoff._why_not() == "hypercorn 0.19 (tested: 0.18)"
    monkeypatch.setattr(handoff, "_state", {"enabled": False})
    spawn_app, protocol_send = TaskGroup.spawn_app, TCPServer.protocol_send
    assert handoff.enable() is False and not handoff.enabled()
    assert TaskGroup.spawn_app is spawn_app and TCPServer.protocol_send is protocol_send
    assert "hypercorn yields at each hand-off: hypercorn 0.19 (tested: 0.18)" in caplog.text


@pytest.mark.parametrize("why", ["hypercorn's internals moved (no module named hypercorn.trio.task_group)"])
def test_internals_that_moved_leave_hypercorn_alone(monkeypatch, why):
    monkeypatch.setattr(handoff, "_moved", why)
    monkeypatch.setattr(handoff, "_state", {"enabled": False})
    spawn_app = TaskGroup.spawn_app
    assert handoff.enable() is False and TaskGroup.spawn_app is spawn_app


async def test_bytes_go_to_a_plain_socket_at_once_and_what_it_does_not_take_is_left():
    import socket as stdlib_socket

    a, b = trio.socket.socketpair()
    a.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, 4096)
    stream, peer = trio.SocketStream(a), trio.SocketStream(b)
    assert handoff._write_now(stream, b"hello") == 5  # taken whole, nothing awaited
    assert await peer.receive_some(100) == b"hello"
    big = b"x" * 4_000_000
    sent = handoff._write_now(stream, big)
    assert 0 < sent < len(big)  # the socket took part: the caller sends the rest
    assert handoff._write_now(stream, big) == 0  # full: nothing now
    assert handoff._write_now(stream, b"") == 0
    ssl_like = trio.testing.MemorySendStream()
    assert handoff._write_now(ssl_like, b"x") == 0  # not a plain socket: send_all's
    await stream.aclose()
    assert handoff._write_now(stream, b"x") == 0  # closed: send_all says so
    await peer.aclose()


async def test_an_answer_larger_than_the_socket_takes_at_once_arrives_whole():
    lean_framework()
    app = LeanQuart("large")
    payload = bytes(range(256)) * 40_000  # 10 MB

    @app.get("/large")
    async def large() -> bytes:
        return payload

    port = reserved_port()
    config = GatewayConfig()
    config.bind = [f"127.0.0.1:{port}"]
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(app, config, shutdown_trigger=stop.wait,
                                                          task_status=task_status))
            client = await trio.open_tcp_stream("127.0.0.1", port)
            for _ in range(2):  # twice on one connection: the first left it ready for the next
                await client.send_all(b"GET /large HTTP/1.1\r\nHost: gw\r\n\r\n")
                got = bytearray()
                while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + len(payload):
                    await trio.sleep(0.001)  # a slow reader: the socket fills
                    data = await client.receive_some(65536)
                    assert data
                    got += data
                head, _, body = bytes(got).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200") and body == payload
            await client.aclose()
            stop.set()
