"""Review 4: `send_frames` and the client's close. Once the server has answered a client's
Close frame it sends no more data frames (RFC 6455 5.5.1); quart's own send stops there
(wsproto refuses it). A batch that found the connection busy (the close being written)
took hypercorn's path, which does not look at the WebSocket's state when its turn comes:
what its write then meets (the socket's shutdown under way, a BusyResourceError out of
`send_frames`; or a data frame after the close frame) depends on trio's scheduling order,
which trio shuffles, so the test closes several connections that way."""

from __future__ import annotations

import ssl

import trio
from quart import Blueprint, websocket
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Request
from wsproto.frame_protocol import FrameProtocol, Opcode

from gatewayd.core.tls import init_site
from gatewayd.plugins.api import TextFrames, hookimpl, send_frames
from gatewayd.testing import gw_url

BIG = [f"{i:03d}" + "z" * 400_000 for i in range(20)]  # more than the socket holds


ROUNDS = 10  # each one shows the fault about half the time


class Closer:
    """A batch larger than the socket takes; while it is written, the client closes; once
    the server has answered the close, another task sends a batch."""

    def __init__(self) -> None:
        self.big_started = trio.Event()
        self.close_answered = trio.Event()
        self.errors: list[str] = []

    def next_round(self) -> None:
        self.big_started, self.close_answered = trio.Event(), trio.Event()

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint("closer", __name__)

        @bp.websocket("/ws")
        async def ws():
            await websocket.accept()
            # The handshake's wsproto connection: only to see when the close was answered.
            stream = websocket._get_current_object()._send.args[0].__self__

            big_started, close_answered = self.big_started, self.close_answered

            async def big():
                big_started.set()
                await send_frames(TextFrames(BIG))

            async def after_close():
                while stream.connection.state is ConnectionState.OPEN:
                    await trio.sleep(0.01)
                close_answered.set()
                try:
                    await send_frames(TextFrames(["after the close"]))
                except Exception as e:  # noqa: BLE001 - what the test reports
                    self.errors.append(repr(e))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(big)
                nursery.start_soon(after_close)

        return bp


async def _close_during_a_batch(host: str, port: int, closer: Closer) -> list[tuple[Opcode, bool]]:
    """One connection: the client closes while a batch fills the socket; every frame it got,
    (opcode, message finished), until the server closed the connection."""
    closer.next_round()
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 8192)
    await sock.connect((host, port))
    stream = trio.SocketStream(sock)
    client = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(client.send(Request(host=host, target="/closer/ws")))
    raw = b""
    with trio.fail_after(30):  # a guard, not a measure
        while b"\r\n\r\n" not in raw:
            raw += await stream.receive_some(4096)
        head, _, rest = raw.partition(b"\r\n\r\n")
        client.receive_data(head + b"\r\n\r\n")
        assert any(isinstance(e, AcceptConnection) for e in client.events())
        await closer.big_started.wait()  # the batch holds the connection: the socket is full
        await stream.send_all(client.send(CloseConnection(code=1000)))
        await closer.close_answered.wait()  # the close answered (waiting for its turn to be written)
        frames = FrameProtocol(client=True, extensions=[])
        frames.receive_bytes(rest)
        seen: list[tuple[Opcode, bool]] = []
        while True:
            for frame in frames.received_frames():
                seen.append((frame.opcode, frame.message_finished))
            data = await stream.receive_some(65536)
            if not data:
                break
            frames.receive_bytes(data)
    await stream.aclose()
    return seen


async def test_no_data_frame_after_the_close_frame(gateway_factory):
    closer = Closer()
    async with gateway_factory(plugins=[("closer", closer)]) as gw:
        host, port = gw_url(gw).removeprefix("http://").split(":")
        for _ in range(ROUNDS):
            seen = await _close_during_a_batch(host, int(port), closer)
            opcodes = [op for op, _ in seen]
            assert Opcode.CLOSE in opcodes, opcodes[-5:]
            after = opcodes[opcodes.index(Opcode.CLOSE) + 1:]
            assert after == [], f"frames after the close frame: {after}"
            assert sum(1 for op, finished in seen if finished and op is not Opcode.CLOSE) == len(BIG)
            assert closer.errors == []  # send_frames raised nothing


class TlsFramer:
    """Over TLS `send_frames` always waits for the connection's turn: frames whole, in order,
    between quart's sends (another task's)."""

    BATCHES = [[f"{i}-{j}" + "w" * 50_000 for j in range(3)] for i in range(5)]

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint("tlsframer", __name__)

        @bp.websocket("/ws")
        async def ws():
            await websocket.accept()

            async def ticks():
                for i in range(30):
                    await websocket.send(f"tick {i}")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticks)
                for batch in self.BATCHES:
                    assert await send_frames(TextFrames(batch))  # one write each
            await websocket.receive()

        return bp


async def test_frames_over_tls_stay_whole_and_in_order(gateway_factory, tmp_path):
    init_site(tmp_path / "var" / "tls", "test-gateway", ["localhost"], ["127.0.0.1"])
    ctx = ssl.create_default_context(cafile=str(tmp_path / "var" / "tls" / "ca.crt"))
    async with gateway_factory(plugins=[("tlsframer", TlsFramer())], settings=["tls.http=true"]) as gw:
        url = gw_url(gw)
        assert url.startswith("https://")
        async with open_websocket_url(url.replace("https://", "wss://") + "/tlsframer/ws", ssl_context=ctx) as ws:
            with trio.fail_after(30):  # a guard, not a measure
                got = [await ws.get_message() for _ in range(30 + 15)]
            await ws.send_message("bye")
    assert [m for m in got if not m.startswith("tick")] == [m for b in TlsFramer.BATCHES for m in b]
    assert [m for m in got if m.startswith("tick")] == [f"tick {i}" for i in range(30)]
