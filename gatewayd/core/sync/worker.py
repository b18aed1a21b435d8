"""SyncWorker: drains the outbox to one sink, batch by batch, exactly once after dedup.

One worker per configured `[[upstream]]`. Batches go one at a time (the next only
after the previous was acknowledged); while one is in flight, the next is chosen,
persisted and prepared, so the database and the CPU work overlap the network.

What an answer does (docs/upstream-protocol.md): 2xx and 409 deliver the batch;
429/503 wait `Retry-After`/`next_hint` and resend the same batch; other 4xx set it aside
in `core_dead_letter` and go on; 5xx, timeouts and resets back off 1 s -> 300 s
(±25 %), and after `breaker_threshold` of them in a row the circuit breaker holds the
sink for `breaker_cooldown_s` before one probe. Every resend keeps the batch's
Idempotency-Key, also across a restart (the batch row is committed before sending).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import trio

from ..logs import get_logger
from ..outbox import OpenBatch, Outbox, wire_records
from ..storage import StorageError
from . import EncodedBatch, Outcome, encode_batch
from .retry import Backoff, CircuitBreaker

__all__ = ["Sink", "SyncWorker", "SinkStats"]

log = get_logger("gatewayd.sync")


class Sink(Protocol):
    name: str
    kind: str

    async def send(self, batch: EncodedBatch) -> Outcome: ...

    async def aclose(self) -> None: ...

    def describe(self) -> str: ...


@dataclass
class SinkStats:
    """Live figures of one sink for /metrics, /health and `outbox status`."""

    batches: dict[str, int] = field(default_factory=dict)  # outcome kind -> count
    records: dict[str, int] = field(default_factory=dict)  # delivered/duplicates/rejected/dead
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    last_status: int | None = None
    waiting_until: float | None = None


@dataclass
class _Prepared:
    batch: OpenBatch
    wire: list[dict[str, Any]]


class SyncWorker:
    """Sends the outbox to one sink. `await nursery.start(worker.run)`."""

    def __init__(
        self,
        outbox: Outbox,
        sink: Sink,
        *,
        gateway_id: str,
        secret: bytes,
        compression: str = "zstd",
        max_records: int = 5000,
        max_bytes: int = 1 << 20,
        linger_s: float = 0.5,
        idle_poll_s: float = 5.0,
        backoff: Backoff | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.outbox = outbox
        self.sink = sink
        self.name = sink.name
        self.gateway_id = gateway_id
        self._secret = secret
        self.compression = compression
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self.idle_poll_s = idle_poll_s
        self.backoff = backoff or Backoff()
        self.breaker = breaker or CircuitBreaker(clock=trio.current_time)
        self.clock = clock
        self.stats = SinkStats()
        self._open_ids: set[int] = set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Resend batches left open by a restart, then drain for ever."""
        self._open_ids = set()
        resumed = await self._retrying(self.outbox.open_batches, self.name)
        for batch in resumed:
            self._open_ids.update(batch.ids)
        if resumed:
            log.info("resending open batches", sink=self.name, batches=len(resumed),
                     records=sum(len(b.records) for b in resumed))
        send, receive = trio.open_memory_channel[_Prepared](0)
        try:
            async with trio.open_nursery() as nursery:
                if hasattr(self.sink, "run"):  # a sink with a connection of its own (MQTT)
                    await nursery.start(self.sink.run)
                nursery.start_soon(self._produce, send, resumed)
                task_status.started()
                async with receive:
                    async for prepared in receive:
                        await self._deliver(prepared)
        finally:
            with trio.CancelScope(shield=True):
                await self.sink.aclose()

    # -- choosing batches -------------------------------------------------------------

    async def _produce(self, send: trio.MemorySendChannel[_Prepared], resumed: list[OpenBatch]) -> None:
        async with send:
            for batch in resumed:
                if batch.records:
                    await send.send(await self._prepare(batch))
                else:  # every record of it expired meanwhile
                    await self._retrying(self.outbox.delivered, batch)
            while True:
                batch = await self._retrying(
                    partial(self.outbox.next_batch, self.name, max_records=self.max_records,
                            max_bytes=self.max_bytes, exclude=self._open_ids)
                )
                if batch is None:
                    await self.outbox.wait_for_records(self.idle_poll_s)
                    continue
                self._open_ids.update(batch.ids)
                await send.send(await self._prepare(batch))
                if len(batch.records) < self.max_records:
                    # A partial batch: let records gather rather than send one per POST.
                    await trio.sleep(self.linger_s)

    async def _prepare(self, batch: OpenBatch) -> _Prepared:
        wire = await trio.to_thread.run_sync(wire_records, batch.records)
        return _Prepared(batch, wire)

    async def _retrying(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a storage call until it works (a full disk must not kill the worker)."""
        delay = 1.0
        while True:
            try:
                return await fn(*args)
            except StorageError as e:
                log.warning("outbox storage call failed; retrying", sink=self.name, error=str(e), retry_in_s=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 60.0)

    # -- sending ----------------------------------------------------------------------

    async def _deliver(self, prepared: _Prepared) -> None:
        batch = prepared.batch
        while True:
            while not self.breaker.allow():
                self.stats.waiting_until = self.clock() + self.breaker.retry_in()
                await trio.sleep(max(self.breaker.retry_in(), 0.05))
            self.stats.waiting_until = None
            encoded = await trio.to_thread.run_sync(partial(
                encode_batch, prepared.wire, gateway_id=self.gateway_id, batch_id=batch.batch_id,
                secret=self._secret, compression=self.compression, now=self.clock(),
            ))
            outcome = await self.sink.send(encoded)
            self._count(outcome, len(batch.records))
            if outcome.kind in ("delivered", "already_delivered"):
                self.breaker.record_success()
                self.backoff.reset()
                await self._retrying(self.outbox.delivered, batch)
                self._open_ids.difference_update(batch.ids)
                self.stats.last_success = self.clock()
                if outcome.rejected:
                    log.warning("receiver rejected records", sink=self.name, batch_id=batch.batch_id,
                                rejected=outcome.rejected, ids=str(outcome.rejected_ids[:20]))
                if outcome.delay_s:  # next_hint on a 2xx: backpressure before the next batch
                    await self._wait(outcome.delay_s)
                return
            if outcome.kind == "dead_letter":
                self.breaker.record_success()  # the far end answered
                self._note(outcome)
                await self._retrying(self.outbox.dead_letter, batch, outcome.status, outcome.reason or "")
                self._open_ids.difference_update(batch.ids)
                return
            self._note(outcome)
            await self._retrying(self.outbox.note_error, self.name, self.stats.last_error or "")
            if outcome.kind == "retry_after":
                self.breaker.record_success()
                await self._wait(outcome.delay_s or 1.0)
            else:
                self.breaker.record_failure()
                await self._wait(self.backoff.next_delay())

    async def _wait(self, seconds: float) -> None:
        self.stats.waiting_until = self.clock() + seconds
        await trio.sleep(seconds)
        self.stats.waiting_until = None

    def _note(self, outcome: Outcome) -> None:
        self.stats.last_error = outcome.reason or f"HTTP {outcome.status}"
        self.stats.last_error_at = self.clock()
        log.warning("batch not delivered", sink=self.name, outcome=outcome.kind, status=outcome.status,
                    reason=outcome.reason, wait_s=outcome.delay_s)

    def _count(self, outcome: Outcome, n: int) -> None:
        s = self.stats
        s.last_status = outcome.status
        s.batches[outcome.kind] = s.batches.get(outcome.kind, 0) + 1
        if outcome.kind in ("delivered", "already_delivered"):
            rejected = outcome.rejected or 0
            duplicates = outcome.duplicates or 0
            accepted = outcome.accepted if outcome.accepted is not None else n - rejected - duplicates
            for key, value in (("accepted", accepted), ("duplicates", duplicates), ("rejected", rejected)):
                s.records[key] = s.records.get(key, 0) + value
        elif outcome.kind == "dead_letter":
            s.records["dead_lettered"] = s.records.get("dead_lettered", 0) + n

    def state(self) -> dict[str, Any]:
        """For /health and /metrics."""
        backlog = self.outbox.counts.get(f"sink:{self.name}", [0, 0])
        return {
            "sink": self.sink.describe(),
            "breaker": self.breaker.state,
            "backlog": backlog[0],
            "backlog_bytes": backlog[1],
            "last_success": self.stats.last_success,
            "last_error": self.stats.last_error,
            "last_status": self.stats.last_status,
        }
