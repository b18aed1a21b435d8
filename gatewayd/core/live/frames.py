"""Live batches in one write straight to each connection: the bytes built once, however many send them.

A live stream in a family's own shape sends one JSON object a message (thingsnxt's spec);
through quart's `websocket.send` each message is a trip through quart, hypercorn, wsproto
and a socket write: with 10 subscribers, 10 writes per event, the CPU ingest needs
(bench/thingsnxt_bench.py). `TextFrames` holds a batch of messages and, built once, the
bytes of their frames (server to client: unmasked, no extension: an uncompressed message
is valid even where permessage-deflate was agreed, RFC 7692 section 6); `send_frames`
writes those bytes on the current WebSocket in one write: straight to the socket when
nothing else is being written on it (hypercorn's send lock for the connection, held
meanwhile, keeps frames whole against quart's sends), else when the connection's turn
comes (TLS: always so), and not once the WebSocket is closing. Where that path is not
there (HTTP/2, another server, a test client) it sends the messages one by one through
quart, as before. A streamed response (Server-Sent Events) does the same with
`stream_writer()` and `Chunk`s: a batch's bytes with their HTTP/1.1 chunk framing, built
once, written straight to each connection while its response is chunked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import h11
import trio
from quart import request, websocket
from wsproto.connection import ConnectionState
from wsproto.frame_protocol import FrameProtocol

from gatewayd.core.http.gate import untested

try:  # hypercorn's internals: where they moved, the straight path is off (below)
    from hypercorn.protocol.h11 import H11Protocol
    from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
    from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
    from hypercorn.trio.tcp_server import TCPServer
    _moved = ""
except ImportError as e:  # pragma: no cover  (pyproject pins the tested minor release)
    _moved = f"hypercorn's internals moved ({e})"

__all__ = ["Chunk", "SendLock", "StreamWriter", "TextFrames", "abort_stalled_writes", "direct_frames", "own_send_lock",
           "send_frames", "stream_writer", "straight_path"]

log = logging.getLogger(__name__)

#: The releases (major.minor) whose internals the straight path was tested against.
TESTED = {"hypercorn": "0.18", "h11": "0.16"}


def _untested() -> str:
    """Why the straight path is off ("" when on): a release it was not tested with."""
    return untested(TESTED)


_why_not = _moved or _untested()
if _why_not:
    log.warning("live: writes go through quart, not straight to the socket: %s", _why_not)


def straight_path() -> bool:
    """True if live batches may be written straight to the socket (tested releases of
    hypercorn and h11); False: they go through quart and hypercorn's own send path."""
    return not _why_not


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
    HTTP/1.1 stream under this app). Nothing is sent once the WebSocket is closing or closed
    (as quart's send)."""
    stream = _hypercorn_stream(cast(Any, websocket)._get_current_object())  # the proxy's object
    server = _tcp_server(stream) if stream is not None else None
    if stream is None or server is None:
        for text in frames.texts:
            await websocket.send(text)
        return False
    if frames.texts and _open(stream):
        await _write(stream, server, frames.wire)
    return True


def direct_frames() -> Callable[[TextFrames], bool | Finish] | None:
    """For the current WebSocket (quart's `websocket`, accepted): a function that starts writing
    a batch's frames straight to its connection from any task, without waiting (`_write_now`:
    True, False, or the rest to await), for the hub's `next_encoded(direct=...)`. None where
    they cannot go straight to the socket (TLS, HTTP/2, another server, the send lock not
    hypercorn's trio.Lock or in use now): then `send_frames`, from the connection's own task."""
    stream = _hypercorn_stream(cast(Any, websocket)._get_current_object())
    server = _tcp_server(stream) if stream is not None else None
    if server is None or not isinstance(server.stream, trio.SocketStream) or not own_send_lock(server):
        return None

    def write(frames: TextFrames) -> bool | Finish:
        if not frames.texts or not _open(stream):
            return True  # nothing to send, or nothing is sent once closing (as send_frames)
        return _write_now(server, frames.wire)

    return write


def _open(stream: WSStream) -> bool:
    """The WebSocket may still carry data frames: not closed, and no Close frame sent (once
    the client's close is answered, nothing more; quart's send stops there too)."""
    return not stream.closed and stream.connection.state is ConnectionState.OPEN


async def _write(stream: WSStream, server: TCPServer, wire: bytes) -> None:
    if await _write_raw(server, wire):
        return
    # Something else is being written (or TLS): wait for the connection's turn, as hypercorn's
    # own sends do, and look again: what held it may have been the answer to a close.
    async with server.send_lock:
        if _open(stream):
            try:
                await _send_whole(server, wire)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went: hypercorn's reader ends the connection


async def _write_raw(server: TCPServer | None, wire: bytes) -> bool:
    """The bytes on the connection, whole, straight to its socket when nothing else is being
    written on it (`_write_now`; the rest, if the socket took only part, sent before anything
    else). False: not written (the lock was taken, the socket is closed, no plain TCP
    connection): the caller waits for the lock, or yields to quart. A write straight to the
    socket costs no scheduler round: with 100 subscribers, 100 of those per batch were most of
    the fan-out's cost (bench/live_bench.py)."""
    if server is None:
        return False
    done = _write_now(server, wire)
    if done is False:
        return False
    if done is not True:
        await done()
    return True


Finish = Callable[[], Awaitable[None]]


def _write_now(server: TCPServer, wire: bytes) -> bool | Finish:
    """Start writing `wire` on the connection without waiting: True, written whole; False,
    nothing written (something else is being written, TLS, the socket closed or broken);
    else the socket took part of it and the connection's send lock stays held: the caller
    must await what is returned (it sends the rest, shielded, then releases the lock)."""
    lock = getattr(server, "send_lock", None)
    if not isinstance(lock, (trio.Lock, SendLock)) or not isinstance(getattr(server, "stream", None),
                                                                     trio.SocketStream):
        return False  # TLS, or not the hypercorn this was tested with (_tcp_server)
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        return False
    try:
        sent = os.write(server.stream.socket.fileno(), wire)
    except BlockingIOError:
        sent = 0
    except OSError:
        lock.release()
        return False  # closed or broken: hypercorn's own path says so
    if sent >= len(wire):
        lock.release()
        return True
    rest = memoryview(wire)[sent:]

    async def finish() -> None:
        try:
            await _send_whole(server, rest)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went: hypercorn's reader ends the connection
        finally:
            lock.release()

    return finish


class SendLock:
    """A live connection's send lock, in place of hypercorn's `trio.Lock` (`own_send_lock`):
    the same lock (FIFO, taken by `async with` or `acquire_nowait`), but any task may release
    it. The hub's timer task writes a batch to every waiting subscriber of a channel in turn
    (`Subscription.next_encoded(direct=...)`), without waking one task a subscriber; when a
    socket takes only part of a batch, the lock stays held and the subscriber's own task
    sends the rest, then releases it: nothing else is written on that connection meanwhile."""

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    def acquire_nowait(self) -> None:
        if self._held or self._lot:
            raise trio.WouldBlock
        self._held = True

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.acquire_nowait()
        except trio.WouldBlock:
            await self._lot.park()  # release hands it over: held on wake-up
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("release of a SendLock that is not held")
        if self._lot:
            self._lot.unpark(count=1)  # still held: now by the one woken
        else:
            self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


def own_send_lock(server: TCPServer) -> bool:
    """Put a `SendLock` in place of the connection's trio.Lock (hypercorn's sends take it as
    they took that one). Only while nobody holds or waits for the old one. False: left as it
    is (it is not a trio.Lock: a hypercorn this was not tested with; or in use now)."""
    lock = server.send_lock
    if isinstance(lock, SendLock):
        return True
    if type(lock) is not trio.Lock or lock.locked() or lock.statistics().tasks_waiting:
        return False
    server.send_lock = cast(Any, SendLock())
    return True


# The connections in the middle of a shielded write (`abort_stalled_writes`).
_in_write: set[Any] = set()


async def _send_whole(server: TCPServer, data: bytes | memoryview) -> None:
    """`data` whole on the connection: shielded from cancellation, never half a frame or chunk
    on the wire. Not for ever: a client that stops reading would hold the write, and the
    gateway's stop with it; `abort_stalled_writes` ends it once the stop's grace is over."""
    _in_write.add(server)
    try:
        with trio.CancelScope(shield=True):
            await server.stream.send_all(data)
    finally:
        _in_write.discard(server)


def abort_stalled_writes() -> int:
    """Close the connections still in a shielded write (the gateway's stop calls this once its
    grace period is over): the write ends with ClosedResourceError, the connection's tasks
    finish. How many were closed."""
    closed = 0
    for server in list(_in_write):
        stream = server.stream
        sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)  # TLS: the stream under it
        if isinstance(sock, trio.socket.SocketType):
            sock.close()  # wakes the blocked send (trio's notify_closing)
            closed += 1
    return closed


class Chunk:
    """A piece of a streamed HTTP response (a batch of Server-Sent Events), with its HTTP/1.1
    chunked framing built once, however many connections send it (`StreamWriter`)."""

    __slots__ = ("_wire", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._wire: bytes | None = None

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = b"%x\r\n%b\r\n" % (len(self.data), self.data)
        return self._wire


class StreamWriter:
    """Writes a streamed response's chunks straight to its connection (`stream_writer()`)."""

    def __init__(self, stream: HTTPStream, h11: H11Protocol, server: TCPServer) -> None:
        self._stream, self._h11, self._server = stream, h11, server

    async def write(self, chunk: Chunk) -> bool:
        """True: `chunk` was written (or the client is gone). False: yield `chunk.data` to quart
        instead (not chunked, not started, or something else is being written on the connection)."""
        if not self._chunked():
            return False
        return not chunk.data or await _write_raw(self._server, chunk.wire)

    def _chunked(self) -> bool:
        connection = getattr(self._h11, "connection", None)
        return not (connection is None or self._stream.closed or self._stream.state != ASGIHTTPState.RESPONSE
                    or getattr(connection, "our_state", None) is not h11.SEND_BODY
                    or type(getattr(connection, "_writer", None)).__name__ != "ChunkedWriter")

    def direct(self) -> Callable[[Chunk], bool | Finish] | None:
        """A function that starts writing a chunk straight to the connection from any task,
        without waiting (as `direct_frames`), once the response is under way; None where it
        cannot (the connection's send lock is not hypercorn's trio.Lock, or in use now)."""
        if not own_send_lock(self._server):
            return None

        def write(chunk: Chunk) -> bool | Finish:
            if not self._chunked():
                return False
            return not chunk.data or _write_now(self._server, chunk.wire)

        return write


def stream_writer() -> StreamWriter | None:
    """In a handler that returns a streamed response (Server-Sent Events): a writer that sends
    its chunks straight to the connection, or None where it cannot (HTTPS, HTTP/2, HTTP/1.0, a
    HEAD request, another server or a test client: yield every chunk to quart then)."""
    if _why_not:
        return None
    req = cast(Any, request)._get_current_object()
    push = getattr(req, "_send_push_promise", None)  # quart: partial(_send_push_promise, asgi_send)
    stream = getattr((getattr(push, "args", None) or (None,))[0], "__self__", None)
    if not isinstance(stream, HTTPStream) or req.method != "GET":
        return None
    protocol = getattr(stream.send, "__self__", None)  # H11Protocol.stream_send
    server = getattr(getattr(protocol, "send", None), "__self__", None)  # TCPServer.protocol_send
    if (not isinstance(protocol, H11Protocol) or not isinstance(server, TCPServer)
            or not isinstance(getattr(server, "stream", None), trio.SocketStream)):
        return None
    return StreamWriter(stream, protocol, server)


def _tcp_server(stream: WSStream) -> TCPServer | None:
    """The connection a hypercorn WebSocket stream writes to (plain TCP or TLS), or None.
    HTTP/1.1 only: over HTTP/2 (h2c, RFC 8441) the stream's bytes go in DATA frames. None
    too where its send lock or stream is not what was tested (then through quart)."""
    if _why_not:
        return None
    h11 = getattr(stream.send, "__self__", None)  # H11Protocol.stream_send
    server = getattr(getattr(h11, "send", None), "__self__", None)  # TCPServer.protocol_send
    if (isinstance(h11, H11Protocol) and isinstance(server, TCPServer)
            and isinstance(getattr(server, "send_lock", None), (trio.Lock, SendLock))
            and isinstance(getattr(server, "stream", None), trio.abc.Stream)):
        return server
    return None


def _hypercorn_stream(ws: Any) -> Any:
    """The hypercorn WSStream behind a quart Websocket, if connected, else None."""
    if _why_not:
        return None
    send = getattr(ws, "_send", None)
    asgi_send = (getattr(send, "args", None) or (None,))[0]  # quart: partial(send_data, asgi_send)
    stream = getattr(asgi_send, "__self__", None)
    if not isinstance(stream, WSStream) or stream.state != ASGIWebsocketState.CONNECTED:
        return None
    return stream
