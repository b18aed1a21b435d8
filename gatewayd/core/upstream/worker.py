"""SyncWorker: drains the outbox to one sink, batch by batch, exactly once after dedup.

One worker per configured `[[upstream]]`. Batches go one at a time (the next only
after the previous was acknowledged); while one is in flight, the next is chosen,
persisted, serialised, compressed and signed, so the database and the CPU work overlap
the network (a body signed more than `FRESH_S` ago, or a resend, is signed anew).
Records are spliced into the batch from the JSON stored at ingest
(`outbox.records.serialize_records`), never decoded and re-encoded.

What an answer does (docs/upstream-protocol.md): 2xx and 409 deliver the batch;
429/503 wait `Retry-After`/`next_hint` and resend the same batch; 401/403 pause the
sink (the gateway's credentials or clock are wrong, not the batch), and so do 404/405
(no batch endpoint at the URL: a wrong `url`, every batch would get the same): the
records stay, /health reports the sink failed with the reason, and the same batch is
tried again after a long backoff (60 s doubling to 30 min) until the far end takes it; 413 splits
the batch in halves (new keys, same record ids) down to single records (a far end that
refuses a record smaller than batches it took before pauses the sink instead); other 4xx set
the batch aside in `core_dead_letter` and go on; 5xx, timeouts and resets back off
1 s -> 300 s (±25 %), and after `breaker_threshold` of them in a row the circuit
breaker holds the sink for `breaker_cooldown_s` before one probe. Every resend keeps
the batch's Idempotency-Key, also across a restart (the batch row is committed before
sending). A delivered batch is committed as such while the next one is sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import trio

from ...protocol.batch import EncodedBatch, SerializedRecords, encode_batch
from ...protocol.retry import Backoff, CircuitBreaker, Outcome
from ..logs import get_logger
from ..outbox.records import serialize_records
from ..outbox.store import OpenBatch, Outbox
from ..storage import StorageError

__all__ = ["Sink", "SyncWorker", "SinkStats"]

log = get_logger("gatewayd.sync")

#: Answers that say the far end refuses *us* (secret, clock), whatever the batch.
AUTH_REFUSED = frozenset({401, 403})
#: Answers that say there is no batch endpoint where we send: a wrong URL (`url` is the
#: base, the sink appends its path), whatever the batch. A receiver never answers them
#: about a batch (docs/upstream-protocol.md); dead-lettering would empty the backlog.
NO_ENDPOINT = frozenset({404, 405})
#: Single records answered 413 in a row, before any delivery, dead-lettered before the sink pauses.
TOO_LARGE_ALONE_MAX = 3
#: Seconds a body encoded ahead may wait and still be sent (its signature timestamp
#: must be near the far end's clock); older, it is encoded again.
FRESH_S = 10.0
#: Longest that database work waits for the next request to be written (see `_hold`):
#: the gate is a speed-up, never a reason for a delivered batch to stay uncommitted.
GATE_MAX_S = 0.05


class Sink(Protocol):
    name: str
    kind: str

    async def send(self, batch: EncodedBatch, *, sent: Callable[[], None] = ...) -> Outcome:
        """Deliver one batch; call `sent()` once it is on the wire (before the answer)."""
        ...

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
    records: SerializedRecords
    encoded: EncodedBatch | None = None  # encoded ahead, for the first attempt only
    encoded_at: float = 0.0  # trio.current_time() when it was


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
        auth_backoff: Backoff | None = None,
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
        self.auth_backoff = auth_backoff or Backoff(base=60.0, cap=1800.0)
        self.clock = clock
        self.stats = SinkStats()
        #: Why the far end refuses this gateway (401/403, 404/405, 413), while it does: the sink is paused.
        self.paused: str | None = None
        self._too_large_alone = 0  # single records answered 413 since the last delivery
        self._largest_delivered = 0  # bytes: the largest body the far end took in this run
        self._nursery: trio.Nursery | None = None
        # The previous batch's `delivered` write, committing while the next batch goes out.
        self._settling: trio.Event | None = None
        # Closed from a delivery until the next batch's request is written (see `_hold`).
        self._gate = trio.Event()
        self._gate.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Resend batches left open by a restart, then drain for ever."""
        resumed = await self._retrying(self.outbox.open_batches, self.name)
        if resumed:
            log.info("resending open batches", sink=self.name, batches=len(resumed),
                     records=sum(len(b.records) for b in resumed))
        send, receive = trio.open_memory_channel[_Prepared](0)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if hasattr(self.sink, "run"):  # a sink with a connection of its own (MQTT)
                    await nursery.start(self.sink.run)
                nursery.start_soon(self._produce, send, resumed)
                task_status.started()
                async with receive:
                    while (prepared := await self._next(receive)) is not None:
                        await self._deliver(prepared)
        finally:
            with trio.CancelScope(shield=True):
                await self.sink.aclose()

    async def _next(self, receive: trio.MemoryReceiveChannel[_Prepared]) -> _Prepared | None:
        """The next batch to send (None: no more); opens the gate if none is ready yet."""
        try:
            return receive.receive_nowait()
        except trio.WouldBlock:
            self._gate.set()  # nothing to write next: the held database work may go
        except trio.EndOfChannel:
            return None
        try:
            return await receive.receive()
        except trio.EndOfChannel:
            return None

    # -- choosing batches -------------------------------------------------------------

    async def _produce(self, send: trio.MemorySendChannel[_Prepared], resumed: list[OpenBatch]) -> None:
        async with send:
            for batch in resumed:
                if batch.records:
                    await send.send(await self._prepare(batch))
                    await self._wait_for_gate(self._gate)
                else:  # every record of it expired meanwhile
                    await self._retrying(self.outbox.delivered, batch)
            while True:
                # The outbox skips the records of this sink's open batches by itself.
                batch = await self._retrying(
                    partial(self.outbox.next_batch, self.name, max_records=self.max_records, max_bytes=self.max_bytes)
                )
                if batch is None:
                    await self.outbox.wait_for_records(self.idle_poll_s)
                    continue
                await send.send(await self._prepare(batch))
                await self._wait_for_gate(self._gate)
                if len(batch.records) < self.max_records:
                    # A partial batch: let records gather rather than send one per POST.
                    await trio.sleep(self.linger_s)

    async def _prepare(self, batch: OpenBatch) -> _Prepared:
        def work() -> _Prepared:
            records = serialize_records(batch.records)
            return _Prepared(batch, records, self._encode(batch, records))

        prepared = await trio.to_thread.run_sync(work)
        prepared.encoded_at = trio.current_time()
        return prepared

    def _encode(self, batch: OpenBatch, records: SerializedRecords) -> EncodedBatch:
        """Compress and sign (blocking: a worker thread)."""
        return encode_batch(records, gateway_id=self.gateway_id, batch_id=batch.batch_id, secret=self._secret,
                            compression=self.compression, now=self.clock())

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
        todo = [prepared]
        while todo:
            halves = await self._deliver_one(todo.pop(0))
            todo[0:0] = [await self._prepare(b) for b in halves]

    async def _deliver_one(self, prepared: _Prepared) -> list[OpenBatch]:
        """Send one batch until it is settled; returns its halves if it had to be split."""
        batch = prepared.batch
        while True:
            while not self.breaker.allow():
                self.stats.waiting_until = self.clock() + self.breaker.retry_in()
                await trio.sleep(max(self.breaker.retry_in(), 0.05))
            self.stats.waiting_until = None
            encoded, prepared.encoded = prepared.encoded, None
            if encoded is None or trio.current_time() - prepared.encoded_at > FRESH_S:
                encoded = await trio.to_thread.run_sync(self._encode, batch, prepared.records)
            gate = self._gate
            try:
                outcome = await self.sink.send(encoded, sent=gate.set)
            finally:
                gate.set()
            if outcome.kind == "dead_letter" and outcome.status in AUTH_REFUSED:
                await self._pause(outcome)
                continue  # the same batch, the same key
            if outcome.kind == "dead_letter" and outcome.status in NO_ENDPOINT:
                await self._pause(outcome, why=self._wrong_url(outcome.status))
                continue
            if outcome.kind == "dead_letter" and outcome.status == 413:
                if len(batch.records) > 1:
                    self.breaker.record_success()
                    self._count_kind("split")
                    log.warning("batch too large for the far end; splitting it in halves", sink=self.name,
                                batch_id=batch.batch_id, records=len(batch.records), bytes=len(encoded.body))
                    return await self._retrying(self.outbox.split, batch)
                blame = self._limit_looks_wrong(len(encoded.body))
                if blame:
                    await self._pause(outcome, why=blame)
                    continue  # the same batch, the same key
                # else: this one record is too large; dead-lettered below
            self._count(outcome, len(batch.records))
            if outcome.kind in ("delivered", "already_delivered"):
                self._too_large_alone = 0
                self._largest_delivered = max(self._largest_delivered, len(encoded.body))
                self.breaker.record_success()
                self.backoff.reset()
                self._resume()
                if not outcome.delay_s:
                    self._hold()
                await self._settle(batch)
                self.stats.last_success = self.clock()
                if outcome.rejected:
                    log.warning("receiver rejected records", sink=self.name, batch_id=batch.batch_id,
                                rejected=outcome.rejected, ids=str(outcome.rejected_ids[:20]))
                if outcome.delay_s:  # next_hint on a 2xx: backpressure before the next batch
                    await self._wait(outcome.delay_s)
                return []
            if outcome.kind == "dead_letter":
                self.breaker.record_success()  # the far end answered
                self._resume()
                self._note(outcome)
                await self._retrying(self.outbox.dead_letter, batch, outcome.status, outcome.reason or "")
                return []
            self._note(outcome)
            await self._retrying(self.outbox.note_error, self.name, self.stats.last_error or "")
            if outcome.kind == "retry_after":
                self.breaker.record_success()
                await self._wait(outcome.delay_s or 1.0)
            else:
                self.breaker.record_failure()
                await self._wait(self.backoff.next_delay())

    def _wrong_url(self, status: int) -> str:
        why = f"upstream answered {status} for {self.sink.describe()}: check upstream.{self.name}.url"
        path = getattr(self.sink, "path", None)
        return f"{why}, the gateway appends {path}" if path else why

    def _limit_looks_wrong(self, size: int) -> str:
        """For a single record answered 413: why to blame the far end's limit, or "".

        One record too large is that record's fault. But a body no larger than one the
        far end took before, or a run of single records refused before anything was
        delivered, means its limit (or a proxy's) is wrong: dead-lettering the backlog
        record by record would hide that.
        """
        self._too_large_alone += 1
        if size <= self._largest_delivered:
            seen = f"after taking {self._largest_delivered}-byte batches"
        elif not self._largest_delivered and self._too_large_alone > TOO_LARGE_ALONE_MAX:
            seen = f"{self._too_large_alone} in a row"
        else:
            return ""
        return (f"the far end refuses a single record of {size} bytes as too large (413), {seen}: "
                "check its body size limit, and any proxy's in front of it")

    def _hold(self) -> None:
        """Hold this worker's database work until the next batch's request is written.

        The moment a batch is delivered, the next one is sent, the delivered one
        committed and the one after chosen. Started together, the commit and the choice
        (threads that want the GIL for Python work between SQLite steps) make the trio
        thread wait up to a GIL switch interval (5 ms) at each step of writing the
        request: the far end then idles. Measured: ~101k -> ~115k records/s end to end
        (bench/ingest_bench.py, both ends on one 2-core machine).
        The gate opens when the sink says the request is out, when `send` returns, or
        when there is no next batch to send; nothing waits for it longer than GATE_MAX_S
        (a slow uplink writing a large body).
        """
        if self._nursery is not None and self._gate.is_set():
            self._gate = trio.Event()

    @staticmethod
    async def _wait_for_gate(gate: trio.Event) -> None:
        with trio.move_on_after(GATE_MAX_S):
            await gate.wait()

    async def _settle(self, batch: OpenBatch) -> None:
        """Commit `batch` as delivered while the next batch is already on its way.

        The far end has acknowledged it, so sending the next one first is safe: its
        records stay out of new batches until the commit (the outbox skips open
        batches), and a crash before the commit resends it with its key (409). One
        such commit at a time, in order.
        """
        if self._settling is not None:
            await self._settling.wait()
        done = self._settling = trio.Event()

        gate = self._gate

        async def commit() -> None:
            try:
                await self._wait_for_gate(gate)
                await self._retrying(self.outbox.delivered, batch)
            finally:
                done.set()

        if self._nursery is None:  # not running under run(): commit inline
            await commit()
        else:
            self._nursery.start_soon(commit)

    async def _pause(self, outcome: Outcome, why: str = "") -> None:
        """401/403, 404/405 (a wrong URL) or 413s `_limit_looks_wrong` blames on the far
        end: stop and alarm. The batch is not at fault; nothing is set aside."""
        self.breaker.record_success()  # the far end answers; it is not unwell
        self._count_kind("paused")
        self.stats.last_status = outcome.status
        delay = self.auth_backoff.next_delay()
        reason = outcome.reason or f"HTTP {outcome.status}"
        why = why or "the far end refuses this gateway's credentials (check the shared secret and the clock)"
        self.paused = f"{reason}: {why}; records are kept and sent when it accepts them again"
        self.stats.last_error = f"paused: {reason}"
        self.stats.last_error_at = self.clock()
        log.error("sink paused; records are kept", sink=self.name, status=outcome.status, reason=reason, why=why,
                  retry_in_s=round(delay, 1))
        await self._retrying(self.outbox.note_error, self.name, self.stats.last_error)
        await self._wait(delay)

    def _resume(self) -> None:
        if self.paused is not None:
            log.info("sink resumed: the far end accepts batches again", sink=self.name)
            self.paused = None
        self.auth_backoff.reset()

    async def _wait(self, seconds: float) -> None:
        self.stats.waiting_until = self.clock() + seconds
        await trio.sleep(seconds)
        self.stats.waiting_until = None

    def _note(self, outcome: Outcome) -> None:
        self.stats.last_error = outcome.reason or f"HTTP {outcome.status}"
        self.stats.last_error_at = self.clock()
        log.warning("batch not delivered", sink=self.name, outcome=outcome.kind, status=outcome.status,
                    reason=outcome.reason, wait_s=outcome.delay_s)

    def _count_kind(self, kind: str) -> None:
        self.stats.batches[kind] = self.stats.batches.get(kind, 0) + 1

    def _count(self, outcome: Outcome, n: int) -> None:
        s = self.stats
        s.last_status = outcome.status
        self._count_kind(outcome.kind)
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
            "paused": self.paused is not None,
            "backlog": backlog[0],
            "backlog_bytes": backlog[1],
            "last_success": self.stats.last_success,
            "last_error": self.stats.last_error,
            "last_status": self.stats.last_status,
            "waiting_until": self.stats.waiting_until,
        }
