"""hypercorn's listeners take every connection already waiting at once, not one per pass.

trio's `SocketListener.accept` takes one connection and then yields (a scheduling pass),
and `trio.serve_listeners` calls it in a loop: a busy server accepts one connection per
pass over all its runnable tasks. A site's lights reconnecting together after a power cut
(bench/streetlight_bench.py's fleet: 1,000 connections at once, the listen queue long
enough for them, `[http] backlog`) waited in the kernel's queue, their first request
already sent, while the server answered the connections it had: ~100 accepted a second,
hundreds of first answers after the specification's 5 s. Here each listener, once a
connection comes in, also takes the others already waiting (up to `BATCH`, without
waiting for any), and hands them to hypercorn one by one without a pass each. What each
connection then gets is hypercorn's, as before.

hypercorn's internals: `enable()` patches only the release it was tested with (pinned in
constraints.txt): hypercorn.trio.run's `trio.serve_listeners`, for its listeners only;
under others it logs why and leaves hypercorn as it is.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections import deque
from typing import Any

import trio

from .gate import untested

try:  # hypercorn's internals: where they moved, nothing is patched (below)
    from hypercorn.trio import run as hypercorn_run
    _moved = "" if getattr(hypercorn_run, "trio", None) is trio and hasattr(hypercorn_run, "worker_serve") \
        else "hypercorn.trio.run changed"
except ImportError as e:  # pragma: no cover  (pyproject pins the tested minor release)
    _moved = f"hypercorn's internals moved ({e})"

__all__ = ["BATCH", "BatchListener", "enable", "enabled"]

log = logging.getLogger(__name__)

#: The release (major.minor) whose internals this was tested against.
TESTED = {"hypercorn": "0.18"}

#: Connections taken at once at most: a pass's worth, not the whole queue at any cost.
BATCH = 64

# What trio's SocketListener skips too: a connection gone before it was taken.
_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}

_state = {"enabled": False}


class BatchListener(trio.abc.Listener[trio.SocketStream]):
    """A `trio.SocketListener` whose `accept` also takes the connections already waiting
    (up to `BATCH`) and returns them, one a call, without a scheduling pass each."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self.listener = listener
        # The same listening socket (a duplicate descriptor) for the synchronous accepts.
        self._raw = socket.socket(fileno=os.dup(listener.socket.fileno()))
        self._raw.setblocking(False)
        self._ready: deque[trio.SocketStream] = deque()

    async def accept(self) -> trio.SocketStream:
        if self._ready:
            return self._ready.popleft()  # taken with an earlier one: no pass of its own
        stream = await self.listener.accept()
        while len(self._ready) < BATCH - 1:
            try:
                conn, _ = self._raw.accept()
            except OSError as e:
                if e.errno in _GONE:
                    continue
                break  # none waiting (EAGAIN); a real failure (EMFILE) the next accept meets
            self._ready.append(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
        return stream

    async def aclose(self) -> None:
        self._raw.close()
        while self._ready:
            await trio.aclose_forcefully(self._ready.popleft())
        await self.listener.aclose()


def _batched(listener: Any) -> Any:
    if isinstance(listener, trio.SocketListener):
        return BatchListener(listener)
    if isinstance(listener, trio.SSLListener) and isinstance(listener.transport_listener, trio.SocketListener):
        listener.transport_listener = BatchListener(listener.transport_listener)
    return listener


async def serve_listeners(handler: Any, listeners: list[Any], **kwargs: Any) -> Any:
    """`trio.serve_listeners` over the listeners made batch-accepting."""
    return await trio.serve_listeners(handler, [_batched(each) for each in listeners], **kwargs)


class _TrioForHypercorn:
    """trio as hypercorn.trio.run sees it: trio itself, but `serve_listeners` batches."""

    serve_listeners = staticmethod(serve_listeners)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def _why_not() -> str:
    """Why the patch is off ("" when it may be on)."""
    return _moved or untested(TESTED)


def enabled() -> bool:
    """Whether hypercorn's listeners batch their accepts (`enable()` was called and took)."""
    return _state["enabled"]


def enable() -> bool:
    """Patch hypercorn's trio runner (once, for every server of this process); False, logged,
    under an untested release of hypercorn."""
    if _state["enabled"]:
        return True
    why = _why_not()
    if why:
        log.warning("http: hypercorn accepts one connection per scheduling pass: %s", why)
        return False
    setattr(hypercorn_run, "trio", _TrioForHypercorn())
    _state["enabled"] = True
    return True
