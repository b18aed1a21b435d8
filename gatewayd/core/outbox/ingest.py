"""`ctx.ingest`: how a plugin stores what its devices sent, durably and for upstream.

One call writes the family's own rows and the outbox rows in one transaction (group
commit on the writer thread) and returns only after COMMIT, so a plugin acknowledges
its device right after it::

    async def post_reading(...):
        try:
            await ctx.ingest.record(
                device_id, "telemetry", {"temp_c": 21.5},
                cls="history", ts=reading_ts,
                family_rows=lambda: Reading.insert(device=device_id, temp_c=21.5).execute(),
            )
        except StorageFull:            # disk or outbox full: nothing was stored
            return {"error": "storage full"}, 507
        return {"ok": True}, 201       # committed

`family_rows()` runs on the writer thread inside the transaction: do only database
work there. If it raises, nothing of the call is kept. For thousands of records use
`records([...])`, which inserts them with one prepared statement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

from ...protocol.batch import CLASS_PRIORITY, CLASSES, compact_json_encoder
from ...protocol.json_text import Encoded
from ...protocol.times import TS_MAX as _TS_MAX
from ...protocol.times import TS_MIN as _TS_MIN
from ..storage import StorageError

if TYPE_CHECKING:
    from .store import Outbox

__all__ = ["Ingest", "IngestError", "Ingested", "IngestPressure", "Record", "DeliveryScope", "GroupScope",
           "call_key", "delivery_scope"]

class DeliveryScope:
    """What the ingest calls of one MQTT delivery share (the delivery sets it in
    :data:`delivery_scope` while its handlers run).

    ``mark(calls)`` is a write (on the writer thread) that commits in the same
    transaction as the records each call stores: the delivery mark (core/mqtt/marks.py),
    with the keys of the calls committed so far (``calls``), so a redelivery after a
    crash is recognised and what was stored of it is not stored twice. And when storage fails
    midway through a handler (disk full after its first ingest call committed), the
    delivery runs the handlers again: a call that stores what a call of an earlier run
    committed (the same records, see :func:`call_key`) is answered with what that call
    stored, not stored a second time. Calls are matched by what they store, not by
    their position: a handler that now skips a call (it stores a state only when it
    changed) does not have its next call taken for the skipped one.
    """

    __slots__ = ("mark", "committed", "_answered")

    def __init__(self, mark: Callable[[bytes], None] | None, committed: Iterable[bytes] = ()) -> None:
        """``committed``: the keys of calls an earlier run committed, known from its mark
        only (what they stored is answered as ``Ingested(range(0), None)``)."""
        self.mark = mark
        self.committed: list[tuple[bytes, Ingested]] = [(key, Ingested(range(0), None)) for key in committed]
        self._answered: set[int] = set()  # indexes into committed, this run

    def again(self) -> None:
        """The handlers run again from the start."""
        self._answered = set()

    def answer(self, key: bytes) -> Ingested | None:
        """What an earlier call that stored the same records committed, not answered yet in this run."""
        for i, (committed_key, stored) in enumerate(self.committed):
            if committed_key == key and i not in self._answered:
                self._answered.add(i)
                return stored
        return None

    def keys(self) -> bytes:
        return b"".join(key for key, _ in self.committed)

    def add(self, key: bytes, stored: Ingested) -> None:
        self._answered.add(len(self.committed))
        self.committed.append((key, stored))


def call_key(rows: list[tuple]) -> bytes:
    """What identifies an ingest call's records across runs of a handler: each record's
    class, family, device, kind and data; not its timestamp, nor when it was stored
    (a time taken by the handler differs from one run to the next)."""
    h = hashlib.blake2b(digest_size=16)
    for prio, _now, _ts, family, device, kind, _size, text in rows:
        h.update(repr((prio, family, device, kind, text)).encode("utf-8", "surrogatepass"))
    return h.digest()


class GroupScope:
    """What the one ingest call of a group delivery writes with its records: every
    message's delivery mark, final (core/mqtt/delivery.py, ``Delivery.deliver_group``).

    A group handler stores its messages with one ingest call: a second call in the same
    run raises RuntimeError (its records would commit after the marks that say the
    messages are stored). When storage fails after that call committed (a later write
    of the handler's), the delivery runs the handler again and the call is answered
    with what it stored, not stored a second time.
    """

    __slots__ = ("mark", "stored", "_called")

    def __init__(self, mark: Callable[[], None] | None) -> None:
        self.mark = mark
        self.stored: Ingested | None = None
        self._called = False

    def again(self) -> None:
        """The handler runs again from the start."""
        self._called = False

    def enter(self) -> Ingested | None:
        """The call of this run: what an earlier run's call committed, or None (store it)."""
        if self._called:
            raise RuntimeError("a group handler stores its messages with one ctx.ingest call per group")
        self._called = True
        return self.stored


delivery_scope: ContextVar[DeliveryScope | GroupScope | None] = ContextVar("gatewayd_delivery_scope", default=None)


# Below this many records, serialising on the trio thread is cheaper than a thread hop.
_INLINE = 64

class IngestError(ValueError):
    """A record the outbox cannot take (bad class, empty device, non-JSON data).

    Raised before anything is written: nothing of the call was stored.
    """


class Record(NamedTuple):
    """One record for `ctx.ingest.records([...])` (a plain tuple works as well).

    `data` may be an `Encoded` (gatewayd.protocol.json_text) of a mapping: its text is
    stored as it is (the same text the record's own encoding gives), not encoded again."""

    device: str
    kind: str
    data: Mapping[str, Any] | Encoded
    ts: float | None = None
    cls: str = "history"


class Ingested(NamedTuple):
    """What an ingest call stored: the records' outbox ids and `family_rows()`'s result.

    `ids` is empty when no upstream is configured (nothing waits to be forwarded).
    """

    ids: range
    result: Any


class IngestPressure(NamedTuple):
    """How loaded the way into storage is (`ctx.ingest.pressure()`), for a plugin's backpressure.

    `outbox_fill` is the fullest of the outbox's limits (its total rows and bytes, and each
    class's own), 0.0 (empty) to 1.0 (full: under `drop_oldest` the oldest records go,
    under `reject` new ones are refused). `writer_queue` is the write jobs waiting for the
    writer thread: a deep queue means every acknowledgement waits for it.
    """

    outbox_fill: float
    outbox_rows: int
    outbox_bytes: int
    writer_queue: int


class Ingest:
    """A family's door to durable storage and upstream sync (`ctx.ingest`)."""

    Record = Record

    def __init__(self, outbox: Outbox, family: str, clock: Callable[[], float]):
        self._outbox = outbox
        self.family = family
        self._clock = clock

    def pressure(self) -> IngestPressure:
        """The outbox's fill and the writer's queue, now (from memory: cheap, call it per request)."""
        outbox = self._outbox
        policy = outbox.policy
        rows = nbytes = 0
        fill = 0.0
        for name in CLASSES:
            have_rows, have_bytes = outbox.counts.get(f"class:{name}", (0, 0))
            rows += have_rows
            nbytes += have_bytes
            limits = policy.limits(CLASS_PRIORITY[name])
            if limits.max_rows:
                fill = max(fill, have_rows / limits.max_rows)
            if limits.max_bytes:
                fill = max(fill, have_bytes / limits.max_bytes)
        if policy.max_rows:
            fill = max(fill, rows / policy.max_rows)
        if policy.max_bytes:
            fill = max(fill, nbytes / policy.max_bytes)
        return IngestPressure(min(fill, 1.0), rows, nbytes, outbox.storage.queue_depth())

    async def oldest_pending(self) -> float | None:
        """When the family's oldest record not yet delivered upstream (by every sink) was
        stored, epoch seconds of the gateway's clock; None when all were delivered (or no
        upstream is configured). A plugin's retention purge keeps its own rows from then
        on: nothing leaves the site before the cloud has it."""
        return await self._outbox.storage.read(self._outbox.oldest_pending, self.family)

    async def record(
        self,
        device: str,
        kind: str,
        data: Mapping[str, Any] | Encoded,
        *,
        ts: float | None = None,
        cls: str = "history",
        family_rows: Callable[[], Any] | None = None,
    ) -> Ingested:
        """Store one record (and the family's rows); return after COMMIT.

        `cls` is the upstream class: command_ack, alert, state, history or log.
        `ts` is when it happened (epoch seconds; default: now). Raises IngestError
        for a bad record, StorageFull (answer 507) when the disk or the outbox is
        full, StorageError (answer 503) when the commit failed; in every error case
        nothing was stored.
        """
        rows = [self._row(device, kind, data, ts, cls, self._clock())]
        return await self._store(rows, family_rows)

    async def records(
        self, records: Iterable[Record | tuple], *, family_rows: Callable[[], Any] | None = None
    ) -> Ingested:
        """Store many records in one transaction (one prepared statement); return after COMMIT.

        Each item is a `Record(device, kind, data, ts=None, cls="history")` or the same
        as a tuple. One bad record fails the whole call (IngestError), nothing stored.
        """
        items = list(records)
        now = self._clock()
        if len(items) <= _INLINE:
            rows = self._rows(items, now)
        else:  # serialising thousands of records is CPU work: off the trio thread
            rows = await trio.to_thread.run_sync(self._rows, items, now)
        return await self._store(rows, family_rows)

    def _rows(self, items: list, now: float) -> list[tuple]:
        out = []
        append = out.append
        family, extra = self.family, len(self.family)
        encode = compact_json_encoder()
        priority = CLASS_PRIORITY.get
        for i, item in enumerate(items):
            # The common case, checked inline (bulk ingest is this loop); anything else,
            # including every error, goes through _row, which says precisely what is wrong.
            if type(item) is Record or (type(item) is tuple and len(item) == 5):
                device, kind, data, ts, cls = item
                prio = priority(cls) if type(cls) is str else None
                if type(data) is Encoded and type(data.value) is dict:
                    data, text = data.value, data.text  # encoded once by the plugin (json_text)
                else:
                    text = None
                if (prio is not None and type(device) is str and device and type(kind) is str and kind
                        and type(data) is dict):
                    if ts is None:
                        ts = now
                    elif (type(ts) is float or type(ts) is int) and _TS_MIN <= ts <= _TS_MAX:
                        ts = float(ts)
                    else:
                        ts = -1.0
                    if ts >= 0:
                        try:
                            if text is None:
                                text = encode(data)
                        except (TypeError, ValueError):
                            pass  # _row raises the IngestError
                        else:
                            append((prio, now, ts, family, device, kind, len(text) + len(device) + len(kind) + extra,
                                    text))
                            continue
            try:
                append(self._row(*item, now=now))
            except IngestError as e:
                raise IngestError(f"record {i}: {e}") from None
            except TypeError:
                raise IngestError(f"record {i}: expected Record(device, kind, data, ts, cls), got {item!r:.80}") from None
        return out

    def _row(self, device: str, kind: str, data: Mapping[str, Any] | Encoded, ts: float | None = None,
             cls: str = "history", now: float = 0.0) -> tuple:
        text = None
        if isinstance(data, Encoded):
            data, text = data.value, data.text
        prio = CLASS_PRIORITY.get(cls)
        if prio is None:
            raise IngestError(f"cls must be one of {'|'.join(CLASSES)}, got {cls!r}")
        if not isinstance(device, str) or not device:
            raise IngestError(f"device must be a non-empty string, got {device!r}")
        if not isinstance(kind, str) or not kind:
            raise IngestError(f"kind must be a non-empty string, got {kind!r}")
        if not isinstance(data, Mapping):
            raise IngestError(f"data must be a mapping (a JSON object), got {type(data).__name__}")
        if ts is None:
            ts = now
        elif isinstance(ts, bool) or not isinstance(ts, (int, float)) or not _TS_MIN <= ts <= _TS_MAX:
            raise IngestError(f"ts must be epoch seconds between 2000 and 2200, got {ts!r}")
        try:
            if text is None:
                text = compact_json_encoder()(data)
        except (TypeError, ValueError) as e:
            raise IngestError(f"data is not JSON: {e}") from None
        size = len(text) + len(device) + len(kind) + len(self.family)
        return (prio, now, float(ts), self.family, device, kind, size, text)

    async def _store(self, rows: list[tuple], family_rows: Callable[[], Any] | None) -> Ingested:
        outbox = self._outbox
        scope = delivery_scope.get()
        if type(scope) is GroupScope:
            done = scope.enter()
            if done is not None:
                return done
            if scope.mark is not None:
                family_rows = _with_companion(scope.mark, family_rows)
            scope.stored = await self._commit(rows, family_rows)
            return scope.stored
        if scope is not None:
            key = call_key(rows) if len(rows) <= _INLINE else await trio.to_thread.run_sync(call_key, rows)
            done = scope.answer(key)
            if done is not None:
                return done  # committed by an earlier run of the handlers (a storage retry)
            if scope.mark is not None:
                family_rows = _with_companion(partial(scope.mark, scope.keys() + key), family_rows)
        stored = await self._commit(rows, family_rows)
        if scope is not None:
            scope.add(key, stored)
        return stored

    async def _commit(self, rows: list[tuple], family_rows: Callable[[], Any] | None) -> Ingested:
        outbox = self._outbox
        try:
            result, ids, dropped, stamped = await outbox.storage.write(outbox.store, rows, family_rows)
        except StorageError:
            outbox.count_refused(row[0] for row in rows)
            raise
        if stamped[0]:  # records stored (an upstream is configured): else no worker waits for them
            outbox.after_store(dropped, stamped)
        return Ingested(ids, result)



def _with_companion(companion: Callable[[], None], family_rows: Callable[[], Any] | None) -> Callable[[], Any]:
    def rows() -> Any:
        companion()
        return family_rows() if family_rows is not None else None

    return rows
