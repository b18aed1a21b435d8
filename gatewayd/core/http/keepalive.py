"""hypercorn's keep-alive timeout as one task per connection whose deadline moves.

hypercorn 0.18 closes a connection left idle for `keep_alive_timeout` seconds (or at once
once the server is told to stop) with an idle task: it starts one (`nursery.start`, under
a lock) each time the connection goes idle, that is after every answer, and cancels it
(under the lock again) when the next request comes in. On a keep-alive connection that is
a task started and cancelled per request: 4-5 % of a small request's CPU in the gateway
(bench/http_pair.py). Here each connection has one watcher task, started with its first
idle period: going idle moves its cancel scope's deadline, going busy only notes it, and
neither waits on anything. What closes when is hypercorn's: an idle connection after the
timeout, an idle one at once when the server stops, never a busy one. The watcher ends
with the connection's reading (hypercorn's lingered up to the timeout after a client had
closed an idle connection, then closed it again). The reading loop is hypercorn's, less
its cancel scope per read when no read timeout is set (hypercorn's `fail_after(inf)`).

Not only a cost: under quart-trio, hypercorn's own idle task is never started after an
answer: its `restart` takes a lock (a checkpoint) in the app's task, after the answer queued
the http.disconnect on which quart-trio cancels that task. So without this patch (another
hypercorn release: the gate below) a keep-alive connection idle after its first answer is
never closed (review 6: main's app on hypercorn 0.18 kept one open for 60 s, twelve timeouts).

hypercorn's internals: `enable()` patches only the release it was tested with (pinned in
constraints.txt); under others it logs why and leaves hypercorn as it is.
"""

from __future__ import annotations

import logging
from math import inf
from typing import Any

import trio

from .gate import untested

try:  # hypercorn's internals: where they moved, nothing is patched (below)
    from hypercorn.events import Closed, RawData
    from hypercorn.trio import tcp_server
    from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
    _moved = "" if hasattr(tcp_server, "TrioSingleTask") and hasattr(TCPServer, "_read_data") \
        and hasattr(TCPServer, "_initiate_server_close") else "hypercorn.trio.tcp_server changed"
except ImportError as e:  # pragma: no cover  (pyproject pins the tested minor release)
    _moved = f"hypercorn's internals moved ({e})"

__all__ = ["KeepAliveTimer", "enable", "enabled"]

log = logging.getLogger(__name__)

#: The release (major.minor) whose internals this was tested against.
TESTED = {"hypercorn": "0.18"}

_state = {"enabled": False}


def _why_not() -> str:
    """Why the patch is off ("" when it may be on)."""
    return _moved or untested(TESTED)


class KeepAliveTimer:
    """Stands in for hypercorn's `TrioSingleTask` as a `TCPServer`'s `idle_task`: `restart`
    (the connection is idle) and `stop` (busy) move one watcher's deadline; `close` ends the
    watcher (the connection stopped reading)."""

    def __init__(self) -> None:
        self._idle = False
        self._deadline = inf  # when an idle connection is closed
        self._wait: trio.CancelScope | None = None  # the watcher's wait, while it waits
        self._life: trio.CancelScope | None = None  # the watcher's whole life
        self._done = False

    async def restart(self, task_group: Any, action: Any) -> None:
        # `action` is the server's own `_idle_timeout`: its server is what the watcher closes.
        server = action.__self__
        self._idle = True
        self._deadline = trio.current_time() + server.config.keep_alive_timeout
        if self._wait is not None:
            self._wait.deadline = self._deadline
        elif self._life is None and not self._done:
            self._life = trio.CancelScope()
            task_group._nursery.start_soon(self._watch, server)

    async def stop(self) -> None:
        # The wait keeps its deadline: if it passes first, the watcher sees busy and waits on.
        self._idle = False
        self._deadline = inf

    def close(self) -> None:
        """End the watcher (the connection is closing)."""
        self._done = True
        if self._life is not None:
            self._life.cancel()

    async def _watch(self, server: Any) -> None:
        terminated = server.context.terminated
        assert self._life is not None
        with self._life:
            while True:
                with trio.CancelScope(deadline=self._deadline) as self._wait:
                    if terminated.is_set():  # busy when told to stop: hypercorn closes it after its answer
                        await trio.sleep_forever()
                    else:
                        await terminated.wait()
                self._wait = None
                if self._idle and (terminated.is_set() or trio.current_time() >= self._deadline):
                    break
            self._done = True
            with trio.CancelScope(shield=True):
                await server._initiate_server_close()


def enabled() -> bool:
    """Whether connections time out with a `KeepAliveTimer` (`enable()` was called and took)."""
    return _state["enabled"]


def enable() -> bool:
    """Patch hypercorn's trio TCP server (once, for every server of this process); False,
    logged, under an untested release of hypercorn."""
    if _state["enabled"]:
        return True
    why = _why_not()
    if why:
        log.warning("http: hypercorn starts a keep-alive task per request: %s", why)
        return False
    async def _read_data(self: Any) -> None:
        # hypercorn's own, but without a cancel scope per read when there is no read timeout
        # (hypercorn's `fail_after(inf)`: the gateway sets none), and the watcher ended with it.
        try:
            while True:
                try:
                    if self.config.read_timeout:
                        with trio.fail_after(self.config.read_timeout):
                            data = await self.stream.receive_some(MAX_RECV)
                    else:
                        data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                else:
                    await self.protocol.handle(RawData(bytes(data)))
                    if data == b"":
                        break
            await self.protocol.handle(Closed())
        finally:
            close = getattr(self.idle_task, "close", None)
            if close is not None:
                close()

    setattr(tcp_server, "TrioSingleTask", KeepAliveTimer)
    setattr(TCPServer, "_read_data", _read_data)
    _state["enabled"] = True
    return True
