"""Presence: last-seen times and online/offline transitions.

`touch(family, device_id)` is cheap and synchronous (every authenticated request and
every MQTT message calls it): it records the time in memory. A background service
flushes the pending last-seen times in one write every `flush_s` seconds (never one
write per request) and marks a device offline once it has not been seen for its
family's threshold (`offline_after(family, seconds)`, default `devices.offline_after_s`).

Transitions are delivered to `emit(family, device_id, type, data)` (async), with type
`device_online` or `device_offline`; the events engine plugs in there. Until it does,
they are logged.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from ..logs import get_logger

if TYPE_CHECKING:
    from .registry import DeviceRegistry

__all__ = ["Presence"]

log = get_logger("gatewayd.presence")
Emit = Callable[[str, str, str, dict[str, Any]], Awaitable[None]]


async def log_transition(family: str, device_id: str, type: str, data: dict[str, Any]) -> None:
    """The default `emit`: a log line per transition."""
    log.info("device presence changed", family=family, device=device_id, event=type)


class Presence:
    """Online/offline per device; `run` is the flush-and-sweep service."""

    def __init__(
        self,
        registry: DeviceRegistry,
        *,
        offline_after_s: float = 300.0,
        flush_s: float = 5.0,
        emit: Emit = log_transition,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = trio.current_time,
    ):
        self.registry = registry
        self.offline_after_s = offline_after_s
        self.flush_s = flush_s
        self.emit = emit
        self.clock = clock
        self.monotonic = monotonic
        self.thresholds: dict[str, float] = {}
        self._pending: dict[tuple[str, str], float] = {}  # wall-clock last seen, not yet stored
        self._seen: dict[tuple[str, str], float] = {}  # monotonic last seen of online devices
        self._send, self._receive = trio.open_memory_channel[tuple[str, str, str, dict]](10_000)
        self.flushes = 0

    def offline_after(self, family: str, seconds: float) -> None:
        """A family's threshold (streetlight: 120 s without status)."""
        self.thresholds[family] = seconds

    def touch(self, family: str, device_id: str) -> None:
        """The device was just heard from."""
        key = (family, device_id)
        self._pending[key] = self.clock()
        was_online = key in self._seen
        self._seen[key] = self.monotonic()
        if not was_online:
            self._queue(family, device_id, "device_online", {})

    def leave(self, family: str, device_id: str, *, reason: str = "said offline") -> bool:
        """The device said it is going (its offline state, its last will): offline now,
        not after the family's threshold. Not a sign of life: its last-seen time stays.
        False if it was not online."""
        key = (family, device_id)
        seen = self._seen.pop(key, None)
        if seen is None:
            return False
        self._queue(family, device_id, "device_offline",
                    {"reason": reason, "silent_s": round(self.monotonic() - seen, 3)})
        return True

    def is_online(self, family: str, device_id: str) -> bool:
        return (family, device_id) in self._seen

    def online(self, family: str | None = None) -> list[tuple[str, str]]:
        return sorted(k for k in self._seen if family is None or k[0] == family)

    def _queue(self, family: str, device_id: str, type: str, data: dict[str, Any]) -> None:
        try:
            self._send.send_nowait((family, device_id, type, data))
        except trio.WouldBlock:
            log.warning("presence events dropped: the consumer is too slow", family=family, device=device_id)

    def sweep(self) -> int:
        """Mark devices unseen past their threshold offline; returns how many."""
        now = self.monotonic()
        gone = [
            k for k, seen in self._seen.items()
            if now - seen > self.thresholds.get(k[0], self.offline_after_s)
        ]
        for family, device_id in gone:
            silent = now - self._seen.pop((family, device_id))
            self._queue(family, device_id, "device_offline", {"silent_s": round(silent, 3)})
        return len(gone)

    async def flush(self) -> int:
        """Write the pending last-seen times in one transaction; returns how many."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        try:
            await self.registry.record_seen(batch)
        except Exception as e:
            # Keep them for the next try, unless newer times arrived meanwhile.
            for key, ts in batch.items():
                self._pending.setdefault(key, ts)
            log.error("presence flush failed", devices=len(batch), error=repr(e))
            return 0
        self.flushes += 1
        return len(batch)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Flush and sweep every `flush_s`; deliver transitions; flush once more on exit."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver)
            nursery.start_soon(self._sweep_loop)
            task_status.started(self)
            try:
                while True:
                    await trio.sleep(self.flush_s)
                    await self.flush()
            finally:
                # At shutdown storage may already be closing: then the last few
                # seconds of last-seen times are lost, which costs nothing real.
                if self.registry.storage.is_open:
                    with trio.CancelScope(shield=True):
                        await self.flush()

    async def _sweep_loop(self) -> None:
        # Apart from the flush loop, so a slow disk never delays offline detection.
        while True:
            await trio.sleep(self.flush_s)
            self.sweep()

    async def _deliver(self) -> None:
        async for family, device_id, type, data in self._receive:
            try:
                await self.emit(family, device_id, type, data)
            except Exception as e:
                log.error("presence event consumer failed", family=family, device=device_id, event=type,
                          error=repr(e))
