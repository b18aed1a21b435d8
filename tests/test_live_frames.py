"""Live batches written straight to the connection (gatewayd.core.live.frames): WebSocket
frames a client reads are the messages, in order, whole, between quart's own sends, with
and without permessage-deflate, larger than the socket takes; streamed-response chunks
likewise, where the response is chunked HTTP/1.1 (else through quart); under hypercorn in
one write, elsewhere one send a message."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import trio
from quart import Blueprint, Response, websocket
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from gatewayd.core.http import gate
from gatewayd.core.live import frames
from gatewayd.plugins.api import Chunk, TextFrames, hookimpl, send_frames, stream_writer
from gatewayd.testing import gw_client, gw_url, wait_until

MESSAGES = ["a", "é" * 70, "x" * 200, json.dumps({"big": "y" * 70_000}), ""]


def read_frames(wire: bytes) -> list[str]:
    """What a client's wsproto makes of bytes a server sent after the handshake."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="h", target="/")))
    list(server.events())
    client.receive_data(server.send(AcceptConnection()) + wire)
    return [e.data for e in client.events() if isinstance(e, TextMessage)]


def test_the_wire_is_each_message_a_frame_in_order():
    frames = TextFrames(MESSAGES)
    assert read_frames(frames.wire) == MESSAGES
    assert frames.wire is frames.wire  # built once, then shared
    assert TextFrames([]).wire == b"" and len(frames) == len(MESSAGES)


class Framer:
    """A plugin WebSocket route: a quart send, a batch of frames, a quart send; it records
    whether the batch went in one write."""

    def __init__(self) -> None:
        self.one_write: list[bool] = []

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint("framer", __name__)

        @bp.websocket("/ws")
        async def ws():
            await websocket.accept()
            await websocket.send("before")
            self.one_write.append(await send_frames(TextFrames(MESSAGES)))
            self.one_write.append(await send_frames(TextFrames([])))
            await websocket.send("after")
            await websocket.receive()  # until the client goes

        return bp


async def test_frames_reach_a_client_whole_and_in_order_in_one_write(gateway_factory):
    framer = Framer()
    async with gateway_factory(plugins=[("framer", framer)]) as gw:
        async with open_websocket_url(gw_url(gw).replace("http://", "ws://") + "/framer/ws") as ws:
            got = [await ws.get_message() for _ in range(len(MESSAGES) + 2)]
            await ws.send_message("bye")
    assert got == ["before", *MESSAGES, "after"]
    assert framer.one_write == [True, True]  # hypercorn's stream, not a send a message


async def test_frames_are_valid_where_the_client_agreed_permessage_deflate(gateway_factory):
    framer = Framer()
    async with gateway_factory(plugins=[("framer", framer)]) as gw:
        host, port = gw_url(gw).removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        client = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(client.send(Request(host=host, target="/framer/ws", extensions=[PerMessageDeflate()])))
        got: list[str] = []
        agreed = []
        part = ""
        with trio.fail_after(30):
            while len(got) < len(MESSAGES) + 2:
                data = await stream.receive_some(65536)
                assert data, f"closed after {got}"
                client.receive_data(data)
                for event in client.events():
                    if isinstance(event, AcceptConnection):
                        agreed = event.extensions
                    elif isinstance(event, TextMessage):  # a long one comes in parts
                        part += event.data
                        if event.message_finished:
                            got.append(part)
                            part = ""
        await stream.aclose()
    assert [type(e) for e in agreed] == [PerMessageDeflate]  # quart's sends are compressed, ours are not
    assert got == ["before", *MESSAGES, "after"]
    assert framer.one_write == [True, True]


class BigFramer:
    """More frames than the socket holds (8 MB), while another task sends through quart."""

    BIG = [f"{i:03d}" + "z" * 400_000 for i in range(20)]

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint("big", __name__)

        @bp.websocket("/ws")
        async def ws():
            await websocket.accept()

            async def ticks():
                for i in range(50):
                    await websocket.send(f"tick {i}")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticks)
                await send_frames(TextFrames(self.BIG))
            await websocket.receive()

        return bp


async def test_a_write_larger_than_the_socket_takes_stays_whole_between_other_sends(gateway_factory):
    async with gateway_factory(plugins=[("big", BigFramer())]) as gw:
        host, port = gw_url(gw).removeprefix("http://").split(":")
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 8192)  # the server's write cannot all fit
        await sock.connect((host, int(port)))
        stream = trio.SocketStream(sock)
        client = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(client.send(Request(host=host, target="/big/ws")))
        got: list[str] = []
        part = ""
        with trio.fail_after(60):
            while len(got) < len(BigFramer.BIG) + 50:
                data = await stream.receive_some(65536)
                assert data, f"closed after {len(got)} messages"
                client.receive_data(data)
                for event in client.events():
                    if isinstance(event, TextMessage):
                        part += event.data
                        if event.message_finished:
                            got.append(part)
                            part = ""
        await stream.aclose()
    assert [m for m in got if not m.startswith("tick")] == BigFramer.BIG  # whole, in order
    assert [m for m in got if m.startswith("tick")] == [f"tick {i}" for i in range(50)]


async def test_without_hypercorn_each_message_goes_through_quart(gateway_factory):
    framer = Framer()
    async with gateway_factory(plugins=[("framer", framer)]) as gw:
        client = gw.app.test_client()
        async with client.websocket("/framer/ws") as ws:
            got = [await ws.receive() for _ in range(len(MESSAGES) + 2)]
            await ws.send("bye")
    assert got == ["before", *MESSAGES, "after"]
    assert framer.one_write == [False, False]


class Streamer:
    """A plugin's streamed response: chunks through quart and straight to the connection by
    turns; it records which went straight."""

    def __init__(self) -> None:
        self.straight: list[bool] = []

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint("streamer", __name__)

        @bp.route("/sse", methods=["GET"])
        async def sse():
            writer = stream_writer()

            async def body():
                yield b"first\n"
                for i in range(3):
                    chunk = Chunk(f"chunk {i} {'x' * 100_000 * i}\n".encode())
                    went = writer is not None and await writer.write(chunk)
                    self.straight.append(went)
                    if not went:
                        yield chunk.data
                    yield b"quart\n"
                yield b"end\n"

            return Response(body(), content_type="text/event-stream")

        return bp


EXPECTED_BODY = "first\n" + "".join(f"chunk {i} {'x' * 100_000 * i}\nquart\n" for i in range(3)) + "end\n"


async def test_chunks_go_straight_to_the_connection_between_quarts(gateway_factory):
    streamer = Streamer()
    async with gateway_factory(plugins=[("streamer", streamer)]) as gw, gw_client(gw) as client:
        for _ in range(2):  # and the connection stays good for the next request (keep-alive)
            r = await client.get("/streamer/sse")
            assert r.status_code == 200 and r.text == EXPECTED_BODY
            assert r.headers["transfer-encoding"] == "chunked"
    assert streamer.straight == [True] * 6


async def test_chunks_go_through_quart_where_the_response_is_not_chunked(gateway_factory):
    streamer = Streamer()
    async with gateway_factory(plugins=[("streamer", streamer)]) as gw:
        host, port = gw_url(gw).removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(f"GET /streamer/sse HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        raw = b""
        with trio.fail_after(30):
            while raw.partition(b"\r\n\r\n")[2] != EXPECTED_BODY.encode():
                data = await stream.receive_some(65536)
                assert data, raw[-200:]
                raw += data
        await stream.aclose()
        head, body = raw.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200") and body.decode() == EXPECTED_BODY
        async with gw_client(gw) as client:
            assert (await client.head("/streamer/sse")).status_code == 200  # HEAD: no writer, no body
        quart_client = gw.app.test_client()
        r = await quart_client.get("/streamer/sse")
        assert (await r.get_data(as_text=True)) == EXPECTED_BODY
    assert streamer.straight == [False] * 9


# -- hypercorn's internals: the straight path only where it was tested --------------------


def test_a_release_it_was_not_tested_with_turns_the_straight_path_off(monkeypatch):
    assert frames.straight_path() and frames._untested() == ""  # the pinned releases (constraints.txt)
    monkeypatch.setattr(gate, "version", lambda name: {"hypercorn": "0.19.1"}.get(name, "0.16.0"))
    assert frames._untested() == "hypercorn 0.19 (tested: 0.18)"
    monkeypatch.setattr(gate, "version", lambda name: {"hypercorn": "0.18.0"}.get(name, "0.17.2"))
    assert frames._untested() == "h11 0.17 (tested: 0.16)"


async def test_with_the_straight_path_off_everything_goes_through_quart_whole(gateway_factory, monkeypatch):
    monkeypatch.setattr(frames, "_why_not", "hypercorn 0.19 (tested: 0.18)")
    assert not frames.straight_path()
    await everything_through_quart(gateway_factory)


async def test_a_connection_whose_send_lock_is_not_what_was_tested_goes_through_quart(gateway_factory, monkeypatch):
    """hypercorn's TCPServer with another kind of lock (a release that changed it): frames and
    chunks go through quart (hypercorn's own sends take that lock); all whole."""
    from hypercorn.trio.tcp_server import TCPServer

    init = TCPServer.__init__

    def other_lock(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.send_lock = trio.StrictFIFOLock()

    monkeypatch.setattr(TCPServer, "__init__", other_lock)
    writes = []
    real_write = frames.os.write
    monkeypatch.setattr(frames.os, "write", lambda fd, data: writes.append(fd) or real_write(fd, data))
    await everything_through_quart(gateway_factory)  # (frames: a send a message)
    assert writes == []  # nothing straight to a socket


async def everything_through_quart(gateway_factory) -> None:
    """A WebSocket's frames and an SSE stream's chunks, all whole, none straight to the socket."""
    framer, streamer = Framer(), Streamer()
    async with gateway_factory(plugins=[("framer", framer), ("streamer", streamer)]) as gw:
        async with open_websocket_url(gw_url(gw).replace("http://", "ws://") + "/framer/ws") as ws:
            got = [await ws.get_message() for _ in range(len(MESSAGES) + 2)]
            await ws.send_message("bye")
        async with gw_client(gw) as client:
            r = await client.get("/streamer/sse")
    assert got == ["before", *MESSAGES, "after"] and framer.one_write == [False, False]
    assert r.status_code == 200 and r.text == EXPECTED_BODY and streamer.straight == [False] * 3


# -- writes the hub makes for its readers (Subscription.next_encoded(direct=...)) -------------


async def test_a_send_lock_is_a_fifo_lock_any_task_may_release():
    lock = frames.SendLock()
    order: list[int] = []

    async def waiter(i: int) -> None:
        async with lock:
            order.append(i)

    lock.acquire_nowait()
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(waiter, i)
            await trio.sleep(0.01)
        with pytest.raises(trio.WouldBlock):
            lock.acquire_nowait()
        nursery.start_soon(_release, lock)
    assert order == [0, 1, 2] and not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


async def _release(lock: frames.SendLock) -> None:
    lock.release()  # another task than the one that took it


async def test_the_send_lock_is_replaced_only_while_nobody_uses_it():
    server = SimpleNamespace(send_lock=trio.Lock())
    await server.send_lock.acquire()
    assert not frames.own_send_lock(server) and type(server.send_lock) is trio.Lock  # held: left alone
    server.send_lock.release()
    assert frames.own_send_lock(server) and isinstance(server.send_lock, frames.SendLock)
    assert frames.own_send_lock(server)  # already ours
    other = SimpleNamespace(send_lock=trio.StrictFIFOLock())
    assert not frames.own_send_lock(other) and isinstance(other.send_lock, trio.StrictFIFOLock)


class Connection(SimpleNamespace):
    """As much of hypercorn's TCPServer as the writes use: its send lock and its stream."""

    __hash__ = object.__hash__


async def test_a_write_begun_in_one_task_is_finished_whole_in_another():
    """The socket takes part of it: the lock stays held (nobody else writes in the middle), and
    what is returned sends the rest and releases it, from another task."""
    a, b = trio.socket.socketpair()
    a.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 8192)
    server = Connection(send_lock=frames.SendLock(), stream=trio.SocketStream(a))
    wire = bytes(range(256)) * 8192  # 2 MB: more than the socket takes at once
    done = frames._write_now(server, wire)
    assert callable(done) and server.send_lock.locked()
    assert frames._write_now(server, b"other") is False  # nothing in the middle
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(done)

        async def read() -> None:
            while len(got) < len(wire):
                got.extend(await b.recv(1 << 20))

        nursery.start_soon(read)
    assert bytes(got) == wire and not server.send_lock.locked()
    assert frames._write_now(server, b"next") is True and await b.recv(100) == b"next"
    a.close(), b.close()


class Publisher:
    """A route that publishes on the hub: `n` events of `size` bytes each."""

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint("publisher", __name__)

        @bp.route("/publish/<int:n>/<int:size>", methods=["POST"])
        async def publish(n: int, size: int):
            for i in range(n):
                ctx.live.publish("big", "d1", {"i": i, "pad": "p" * size})
            return {"ok": n}

        return bp


async def test_many_subscribers_get_every_batch_the_hub_writes_whole_and_in_order(gateway_factory, monkeypatch):
    """Over the write budget (2 subscribers, 10 writes/s): the hub writes the batches itself,
    WebSocket frames and SSE chunks, megabytes at a time (more than a socket takes at once, the
    rest sent by the connection's own task), between answers to the client's messages."""
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", "live-frames-token")
    writers: list[str] = []
    real = frames._write_now
    monkeypatch.setattr(frames, "_write_now",
                        lambda server, wire: writers.append(trio.lowlevel.current_task().name) or real(server, wire))
    async with gateway_factory(plugins=[("publisher", Publisher())],
                               settings=["live.writes_per_s=10", "live.queue_size=1000"]) as gw:
        base = gw_url(gw)
        ws_url = base.replace("http://", "ws://") + "/api/gateway/live?streams=publisher.%23"
        headers = [("Authorization", "Bearer live-frames-token")]
        got_ws: list[int] = []
        got_sse = bytearray()
        async with open_websocket_url(ws_url, extra_headers=headers, max_message_size=1 << 25) as ws, \
                gw_client(gw) as client:
            async with client.stream("GET", "/api/gateway/live/events", params={"streams": "publisher.#"},
                                     headers={"Authorization": "Bearer live-frames-token"}) as r:
                await wait_until(lambda: gw.live.subscribers == 2)
                assert gw.live.cut_every_s > gw.live.batch_s
                for _ in range(3):
                    assert (await client.post("/publisher/publish/40/60000")).status_code == 200
                await ws.send_message(json.dumps({"subscribe": ["publisher.big.*"]}))  # answered between
                answers = 0
                with trio.fail_after(60):
                    while len(got_ws) < 120:
                        doc = json.loads(await ws.get_message())
                        if isinstance(doc, dict):
                            answers += "ok" in doc
                            continue
                        got_ws += [e["data"]["i"] for e in doc]
                    async for part in r.aiter_bytes():
                        got_sse += part
                        if got_sse.count(b"\nevent: publisher.big.d1\n") >= 120 and got_sse.endswith(b"\n\n"):
                            break
    assert got_ws == list(range(40)) * 3 and answers == 1
    events = [json.loads(line[6:]) for line in got_sse.decode().split("\n") if line.startswith("data: ")]
    assert [e["data"]["i"] for e in events] == list(range(40)) * 3
    assert "gatewayd live hub: cuts" in writers  # written by the hub's task, not the connections'
