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
waits as before. The messages, their order and what is written are hypercorn's.

One fix rides along: hypercorn closes a connection whose answer says `Connection: close`
from the app's task, at a checkpoint where quart-trio cancels that task (its messages task
got the http.disconnect the close itself queued): the socket was left open, often. Here
that close is shielded (it does not wait: a shutdown and a close of the socket).

hypercorn's internals: `enable()` patches only the release it was tested with (pinned in
constraints.txt); under others it logs why and leaves hypercorn as it is.
"""

from __future__ import annotations

import logging
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

__all__ = ["enable", "enabled", "queue_at_once"]

log = logging.getLogger(__name__)

#: The release (major.minor) whose internals this was tested against.
TESTED = {"hypercorn": "0.18"}

_state = {"enabled": False}


def _why_not() -> str:
    """Why the patch is off ("" when it may be on)."""
    return _moved or untested(TESTED)


def queue_at_once(channel: trio.MemorySendChannel[Any]) -> Callable[[Any], Awaitable[None]]:
    """`channel.send`, but a message it has room for is queued without yielding."""

    async def put(message: Any) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            channel.send_nowait(message)
        except trio.WouldBlock:
            await channel.send(message)

    return put


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
        # hypercorn's own, but the sender is `queue_at_once`, not the channel's `send`
        app_send_channel, app_receive_channel = trio.open_memory_channel[Any](config.max_app_queue_size)
        self._nursery.start_soon(_handle, app, config, scope, app_receive_channel.receive, send,
                                 trio.to_thread.run_sync, trio.from_thread.run)
        return queue_at_once(app_send_channel)

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
        # hypercorn's own, the lock taken at once when free
        await trio.lowlevel.checkpoint_if_cancelled()
        lock = self.send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            try:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
        finally:
            lock.release()

    setattr(TaskGroup, "spawn_app", spawn_app)
    setattr(TCPServer, "protocol_send", protocol_send)
    _state["enabled"] = True
    return True
