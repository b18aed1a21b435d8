"""hypercorn's hand-offs without a scheduling pass each: a request's messages to the app,
an answer's bytes to the socket's lock.

hypercorn 0.18 hands each part of a request to the app through a trio memory channel
(`await send(...)`) and takes its connection's send lock (`async with send_lock`) before
each write. Both are trio checkpoints that yield to the scheduler even when nothing waits:
three passes per request for the head, body and end of a small POST (and a fourth for
the lock). Worse, the pass after the head lets the app run before its body is queued, so
the handler then waits for the body and is woken again. Here a message the channel has
room for is queued at once and a free lock taken at once; a cancelled task still stops
there (the cancellation is checked, as trio's own do), and a full channel or a held lock
waits as before. The messages, their order and what is written are hypercorn's. An
answer's bytes go to a plain TCP socket at once too (`_write_now`): trio's `send_all` passes
through the scheduler after each write even when the socket took it all, and after an
answer's last bytes that pass woke hypercorn's reader for the client's next request before
the connection was recycled, to be parked and woken again. What the socket does not take
is sent by `send_all` as before (shielded, under the lock).

One fix rides along: hypercorn closes a connection whose answer says `Connection: close`
from the app's task, at a checkpoint where quart-trio cancels that task (its messages task
got the http.disconnect the close itself queued): the socket was left open, often. Here
that close is shielded (it does not wait: a shutdown and a close of the socket).

hypercorn's internals: `enable()` patches only the release it was tested with (pinned in
constraints.txt); under others it logs why and leaves hypercorn as it is.
"""

from __future__ import annotations

import logging
from os import write as _write_fd  # (bound here: the live straight path's tests watch os.write for its own)
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .gate import untested

try:  # hypercorn's internals: where they moved, nothing is patched (below)
    from hypercorn.events import Closed, RawData
    from hypercorn.trio.task_group import TaskGroup, _handle
    from hypercorn.trio.tcp_server import TCPServer
    _moved = ""
except ImportError as e:  # pragma: no cover  (pyproject pins the tested minor release)
    _moved = f"hypercorn's internals moved ({e})"

__all__ = ["AppQueue", "enable", "enabled"]

log = logging.getLogger(__name__)

#: The release (major.minor) whose internals this was tested against.
TESTED = {"hypercorn": "0.18"}

_state = {"enabled": False}


def _why_not() -> str:
    """Why the patch is off ("" when it may be on)."""
    return _moved or untested(TESTED)


class AppQueue:
    """A request's messages from hypercorn to the app: hypercorn's memory channel, queued
    into without a pass when there is room (`put`: a cancelled task still stops there, as
    at trio's own checkpoints; a full channel waits as before), read by the app (`receive`,
    the channel's), and a call-back for the client's leaving.

    `on_disconnect`, when set, is called as the `http.disconnect` message is queued: a
    request whose body is all in then needs no task of its own only to wait for that
    message and cancel its handler (`lean.LeanHTTPConnection`)."""

    __slots__ = ("_receive", "_send", "on_disconnect")

    def __init__(self, size: int) -> None:
        self._send, self._receive = trio.open_memory_channel(size)
        self.on_disconnect: Callable[[], object] | None = None

    async def put(self, message: Any) -> None:
        """hypercorn's `send` to the app: a message there is room for is queued without yielding."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            await self._send.send(message)
        if self.on_disconnect is not None and message["type"] == "http.disconnect":
            self.on_disconnect()

    async def receive(self) -> Any:
        """The app's `receive`: the next message, waited for."""
        return await self._receive.receive()

    def receive_nowait(self) -> Any:
        """The next message if one is queued, else `trio.WouldBlock`."""
        return self._receive.receive_nowait()


def _write_now(stream: Any, data: bytes) -> int:
    """Write what a plain TCP connection's socket takes of `data` now, without a pass through
    the scheduler: how many bytes (0 also when the socket is closed or broken, or the stream
    is TLS or not trio's: `send_all` then writes, or says what is wrong, as before).

    trio's `send_all` yields after every write even when the socket took everything; after
    an answer's last bytes that pass let the client's next request in before the connection
    was ready for it (hypercorn parks its reader until the answer's task recycles the
    connection, then wakes it: a second pass)."""
    if type(stream) is not trio.SocketStream or not data:
        return 0
    try:
        return _write_fd(stream.socket.fileno(), data)
    except OSError:  # BlockingIOError (full), a closed descriptor, a broken connection
        return 0


def enabled() -> bool:
    """Whether hypercorn hands off without a pass each (`enable()` was called and took)."""
    return _state["enabled"]


def enable() -> bool:
    """Patch hypercorn's trio task group and TCP server (once, for every server of this
    process); False, logged, under an untested release of hypercorn."""
    if _state["enabled"]:
        return True
    why = _why_not()
    if why:
        log.warning("http: hypercorn yields at each hand-off: %s", why)
        return False
    original_protocol_send = TCPServer.protocol_send

    async def spawn_app(self: Any, app: Any, config: Any, scope: Any, send: Any) -> Any:
        # hypercorn's own, but the channel is an `AppQueue`: queued into without a pass
        queue = AppQueue(config.max_app_queue_size)
        self._nursery.start_soon(_handle, app, config, scope, queue.receive, send,
                                 trio.to_thread.run_sync, trio.from_thread.run)
        return queue.put

    async def protocol_send(self: Any, event: Any) -> None:
        if isinstance(event, Closed):
            # hypercorn's own, but the socket's close shielded: it runs in the app's task (the
            # end of an answer that says `Connection: close`), which quart-trio cancels as soon
            # as the http.disconnect this same close queues reaches its messages task; cancelled
            # there, the socket stayed open for good (no keep-alive timer runs on it).
            with trio.CancelScope(shield=True):
                await self._close()
            await self.protocol.handle(Closed())
            return None
        if not isinstance(event, RawData):
            return await original_protocol_send(self, event)
        # hypercorn's own, the lock taken at once when free, and the bytes written at once
        # when the socket takes them all
        await trio.lowlevel.checkpoint_if_cancelled()
        lock = self.send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            data = event.data
            sent = _write_now(self.stream, data)
            if sent == len(data):
                return None
            try:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(data[sent:] if sent else data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
        finally:
            lock.release()

    setattr(TaskGroup, "spawn_app", spawn_app)
    setattr(TCPServer, "protocol_send", protocol_send)
    _state["enabled"] = True
    return True
