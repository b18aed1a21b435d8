"""Review 4: a WebSocket client that stops reading while `send_frames` writes to it. The
rest of a partial write is sent shielded from cancellation (never half a frame on the
wire), so the write, and the gateway's graceful stop with it, waited for that client for
ever: past `gateway.shutdown_grace_s`, past the front's cancellation (SIGTERM, and the
second SIGTERM too, which cancels the same way); under systemd, until TimeoutStopSec's
SIGKILL. Now the stop closes, once its grace is over, the connections still in such a write
(`frames.abort_stalled_writes`). hypercorn's own sends are shielded the same way (a client
that stops reading quart's `websocket.send` still holds the stop: not fixed here)."""

from __future__ import annotations

import trio
from quart import Blueprint, websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request

from gatewayd.plugins.api import TextFrames, hookimpl, send_frames
from gatewayd.testing import gw_url

BIG = [f"{i:03d}" + "z" * 400_000 for i in range(20)]  # more than the socket holds


class Staller:
    def __init__(self) -> None:
        self.writing = trio.Event()

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint("staller", __name__)

        @bp.websocket("/ws")
        async def ws():
            await websocket.accept()
            self.writing.set()
            await send_frames(TextFrames(BIG))
            await websocket.receive()

        return bp


async def test_the_gateway_stops_while_a_client_does_not_read(gateway_factory):
    staller = Staller()
    stopped = trio.Event()
    client_sock = trio.socket.socket()

    async def gateway(task_status=trio.TASK_STATUS_IGNORED):
        async with gateway_factory(plugins=[("staller", staller)]) as gw:
            task_status.started(gw)
            await staller.writing.wait()
            await trio.sleep(0.2)  # (the write has filled the socket by now; either way it stops)
        stopped.set()  # the block's end is the graceful stop, finished

    async with trio.open_nursery() as nursery:
        gw = await nursery.start(gateway)
        host, port = gw_url(gw).removeprefix("http://").split(":")
        client_sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 8192)
        await client_sock.connect((host, int(port)))
        stream = trio.SocketStream(client_sock)
        await stream.send_all(WSConnection(ConnectionType.CLIENT).send(Request(host=host, target="/staller/ws")))
        # The client reads nothing more. shutdown_grace_s is 1 s; the guard is far beyond it.
        with trio.move_on_after(10):
            await stopped.wait()
        stuck = not stopped.is_set()
        await stream.aclose()  # (lets a stuck gateway finish, so the test ends either way)
    assert not stuck, "the gateway's stop waited for a client that does not read"
