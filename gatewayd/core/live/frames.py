"""Several WebSocket messages in one write: the frames built once, however many sockets send them.

A live stream in a family's own shape sends one JSON object a message (thingsnxt's spec);
through quart's `websocket.send` each message is a trip through quart, hypercorn, wsproto
and a socket write: with 10 subscribers, 10 writes per event, the CPU ingest needs
(bench/thingsnxt_bench.py). `TextFrames` holds a batch of messages and, built once, the
bytes of their frames (server to client: unmasked, no extension: an uncompressed message
is valid even where permessage-deflate was agreed, RFC 7692 section 6); `send_frames`
writes those bytes on the current WebSocket in one write: straight to the socket when
nothing else is being written on it (hypercorn's send lock for the connection, held
meanwhile, keeps frames whole against quart's sends), else through hypercorn's stream.
Where that path is not there (another server, a test client) it sends the messages one by
one through quart, as before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, cast

import trio
from hypercorn.protocol.events import Data
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.tcp_server import TCPServer
from quart import websocket
from wsproto.frame_protocol import FrameProtocol

__all__ = ["TextFrames", "send_frames"]


class TextFrames:
    """WebSocket text messages, in order, to send together (`send_frames`)."""

    __slots__ = ("_wire", "texts")

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = texts
        self._wire: bytes | None = None

    @property
    def wire(self) -> bytes:
        """Every message's frame, one after the other (built on first use, then shared)."""
        if self._wire is None:
            protocol = FrameProtocol(client=False, extensions=[])
            self._wire = b"".join(protocol.send_data(text, fin=True) for text in self.texts)
        return self._wire

    def __len__(self) -> int:
        return len(self.texts)


async def send_frames(frames: TextFrames) -> bool:
    """Send `frames` on the current WebSocket (quart's `websocket`, accepted), in order.

    True: in one write to the connection; False: one `websocket.send` a message (no hypercorn
    stream under this app). Nothing is sent once the connection is closed (as quart's send)."""
    stream = _hypercorn_stream(cast(Any, websocket)._get_current_object())  # the proxy's object
    if stream is None:
        for text in frames.texts:
            await websocket.send(text)
        return False
    if frames.texts and not stream.closed:
        await _write(stream, frames.wire)
    return True


async def _write(stream: WSStream, wire: bytes) -> None:
    """The bytes on the connection, whole: straight to its socket when nothing else is being
    written on it (its send lock, taken without waiting, keeps it so until the rest, if the
    socket took only part, is sent); else through hypercorn's send path (which takes the lock).
    A write straight to the socket costs no scheduler round: with 100 subscribers, 100 of those
    per batch were most of the fan-out's cost (bench/live_bench.py)."""
    server = _tcp_server(stream)
    if server is not None:
        try:
            server.send_lock.acquire_nowait()
        except trio.WouldBlock:
            server = None
    if server is not None:
        try:
            try:
                sent = os.write(server.stream.socket.fileno(), wire)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = -1  # closed or broken: hypercorn's own path says so below
            if 0 <= sent < len(wire):
                with trio.CancelScope(shield=True):  # never half a frame on the wire
                    await server.stream.send_all(memoryview(wire)[sent:])
            if sent >= 0:
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went: hypercorn's reader ends the connection
        finally:
            server.send_lock.release()
    await stream.send(Data(stream_id=stream.stream_id, data=wire))


def _tcp_server(stream: WSStream) -> TCPServer | None:
    """The plain TCP connection a hypercorn WebSocket stream writes to (not TLS), or None."""
    h11 = getattr(stream.send, "__self__", None)  # H11Protocol.stream_send
    server = getattr(getattr(h11, "send", None), "__self__", None)  # TCPServer.protocol_send
    if isinstance(server, TCPServer) and isinstance(server.stream, trio.SocketStream):
        return server
    return None


def _hypercorn_stream(ws: Any) -> Any:
    """The hypercorn WSStream behind a quart Websocket, if connected, else None."""
    send = getattr(ws, "_send", None)
    asgi_send = (getattr(send, "args", None) or (None,))[0]  # quart: partial(send_data, asgi_send)
    stream = getattr(asgi_send, "__self__", None)
    if not isinstance(stream, WSStream) or stream.state != ASGIWebsocketState.CONNECTED:
        return None
    return stream
