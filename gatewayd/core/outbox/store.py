"""The outbox: the durable offline buffer between ingest and the upstream sinks.

Every record a plugin ingests is one row of `core_outbox`, written in the same
transaction as the family's own rows. A row carries a bit mask `pending` of the
sinks that still have to deliver it; a sink's delivery clears its bit, and the row is
deleted when no bit is left. Nothing else removes a row except the capacity policy
and the time-to-live (`outbox_capacity`), and both count and log what they drop.

Sending order (streetlight spec, section 7; docs/upstream-protocol.md): command acks,
alerts, state (newest first), history (newest first, walking back: the backfill),
logs. The backlog is never loaded: batches are read a page at a time, in sending
order, straight from the index `(prio, id, pending)`, as plain tuples.

A batch is persisted (`core_outbox_batch`: its UUIDv4 and its record ids) before it
is sent, so its Idempotency-Key survives retries *and* a crash. While it is open its
id span per class is skipped by the next choices, so two batches in flight never
share a record. Row and byte counts per class and per sink live in
`core_outbox_count`, updated in the same transactions as the rows: they are exact
after any crash, and capacity checks cost a tiny SELECT.

Writer-side methods (`_...` taking no trio) run on the storage writer thread inside a
group-commit transaction; everything async is called from trio. The tables are in
`outbox_tables`, the capacity policy in `outbox_capacity`, the wire form of records in
`outbox_records`, the operator's functions in `outbox_admin`.
"""

from __future__ import annotations

import json
import time
import uuid
from array import array
from collections.abc import Callable, Iterable, Sequence
from itertools import groupby
from operator import itemgetter
from typing import Any

import peewee
import trio

from ...protocol.batch import CLASSES
from ..logs import get_logger
from ..storage import BACKUP_MARKER, Storage, core_statements
from . import admin as outbox_admin
from . import capacity as outbox_capacity
from .capacity import OutboxFull, OutboxLimits, OutboxPolicy
from .counts import OutboxCounts
from .records import CLASS_ORDER, COLUMNS, OpenBatch, StoredRecord, wire_records
from .select import select_records
from .tables import MODELS, SCHEMA, OutboxCount, OutboxSink

__all__ = ["Outbox", "OutboxFull", "OutboxLimits", "OutboxPolicy", "OpenBatch", "StoredRecord", "CLASS_ORDER",
           "MODELS", "wire_records"]

log = get_logger("gatewayd.outbox")

_CHUNK = 900  # ids per IN (...) query, under SQLite's historical 999-variable limit
_FIRST, _PRIO = itemgetter(0), itemgetter(1)  # (id, ...) / (size,) rows; the class of a record
_INSERT = ("INSERT INTO core_outbox (id, prio, pending, created, ts, family, device, kind, size, data)"
           " VALUES (?, ?, {mask}, ?, ?, ?, ?, ?, ?, ?)")


class Outbox:
    """The durable buffer. One per gateway; `ingest` writes, the sync workers drain."""

    def __init__(
        self,
        storage: Storage,
        policy: OutboxPolicy,
        sinks: Sequence[str] = (),
        *,
        clock: Callable[[], float] = time.time,
    ):
        self.storage = storage
        self.policy = policy
        self.sinks = list(sinks)
        self.clock = clock
        self.bits: dict[str, int] = {}  # sink name -> its bit in core_outbox.pending
        self.tally = OutboxCounts(storage.database, self.bits, storage)
        self.live_mask = 0
        # Mirror of core_outbox_count as of the last commit seen from trio (metrics).
        self.counts: dict[str, list[int]] = {}
        self.oldest: dict[int, float | None] = {}
        self.dropped: dict[tuple[str, str], int] = {}  # (class, reason) -> rows
        self.refused: dict[str, int] = {}  # class -> records refused (policy reject)
        # sink -> batch id -> {prio: (lowest id, highest id)} of its open batches (trio side).
        self._open: dict[str, dict[str, dict[int, tuple[int, int]]]] = {}
        self._seen_seq = 0
        self._arrived = trio.Event()

    @classmethod
    def from_config(cls, storage: Storage, config: Any, *, clock: Callable[[], float] = time.time) -> Outbox:
        """The outbox as `[outbox]` and the enabled `[[upstream]]` entries describe it."""
        section = config.outbox
        classes = {
            name: OutboxLimits(c.max_rows, c.max_bytes, section.ttl_s if c.ttl_s is None else c.ttl_s)
            for name, c in section.classes.items()
        }
        for name in CLASSES:
            classes.setdefault(name, OutboxLimits(0, 0, section.ttl_s))
        policy = OutboxPolicy(section.policy, section.max_rows, section.max_bytes, classes)
        return cls(storage, policy, [u.name for u in config.upstream if u.enabled], clock=clock)

    @property
    def db(self) -> peewee.Database:
        return self.storage.database

    # -- set-up (blocking: a worker thread or the CLI) ---------------------------------

    def install(self) -> None:
        """Create the tables and register the configured sinks (blocking)."""
        self.storage.install(SCHEMA)
        with self.db.connection_context(), self.db.atomic():
            registered = {row.name: row.bit for row in OutboxSink.select()}
            for name in self.sinks:
                if name not in registered:
                    used = set(registered.values())
                    bit = next(b for b in range(62) if b not in used)
                    OutboxSink.insert(name=name, bit=bit).execute()
                    registered[name] = bit
            self.bits.update({name: 1 << bit for name, bit in registered.items()})
            self.live_mask = 0
            for name in self.sinks:
                self.live_mask |= self.bits[name]
            keys = {f"class:{c}" for c in CLASSES} | {f"sink:{n}" for n in self.bits} | {"seq:outbox"}
            have = {row.key for row in OutboxCount.select(OutboxCount.key)}
            if keys - have:
                self.tally.recount(keys)
            self._after_restore()
            self.counts = self.tally.read()
            self.oldest = self.tally.oldest()
        for name in sorted(set(self.bits) - set(self.sinks)):
            owed = self.counts.get(f"sink:{name}", [0, 0])[0]
            if owed:
                log.warning("outbox keeps records for a sink that is no longer configured (or disabled); they stay "
                            f"until it returns or 'gatewayd outbox forget-sink {name}'", sink=name, records=owed)

    async def open(self) -> None:
        """`install` on a worker thread (call after storage opened)."""
        await trio.to_thread.run_sync(self.install)

    def _after_restore(self) -> None:
        """On a database restored from a backup, skip the ids the original went on to use.

        Records the original sent after the backup was taken carry ids this copy would
        issue again; the far end (deduplicating by gateway and record id) would take
        the new records for duplicates and drop them. Ids jump to the current time in
        microseconds: more than any id issued before, since ids grow by one a record
        from 1 (or from an earlier such jump), far slower than a microsecond clock.
        """
        conn = self.db.connection()
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                            (BACKUP_MARKER,)).fetchone():
            return
        taken = conn.execute(f"SELECT MAX(taken_at) FROM {BACKUP_MARKER}").fetchone()[0]
        old = conn.execute("SELECT rows FROM core_outbox_count WHERE key = 'seq:outbox'").fetchone()[0]
        new = max(old, int(time.time() * 1_000_000))
        conn.execute("UPDATE core_outbox_count SET rows = ? WHERE key = 'seq:outbox'", (new,))
        conn.execute(f"DROP TABLE {BACKUP_MARKER}")
        log.warning("running on a database restored from a backup: record ids continue past every id the "
                    "original could have sent since", backup_taken_at=taken, last_id=old, next_id=new + 1)

    def _saw(self, stamped: tuple[int, dict[str, list[int]]]) -> None:
        """Trio side, after a commit: keep the newest counts for metrics."""
        seq, counts = stamped
        if seq > self._seen_seq:
            self._seen_seq, self.counts = seq, counts

    # -- ingest (writer thread) ---------------------------------------------------------

    def store(self, rows: list[tuple], family_rows: Callable[[], Any] | None) -> tuple[Any, range, dict, tuple]:
        """Writer job: the family's rows, then the outbox rows, one transaction.

        `rows` are (prio, created, ts, family, device, kind, size, data). Returns
        (family result, record ids, dropped {(class, reason): n}, stamped counts).
        """
        result = family_rows() if family_rows is not None else None
        if not rows or not self.live_mask:
            return result, range(0), {}, (0, {})
        with core_statements():  # refused: our schema, not the family's SQL (never acknowledged)
            return result, *self._store_rows(rows)

    def _store_rows(self, rows: list[tuple]) -> tuple[range, dict, tuple]:
        conn = self.db.connection()
        counts = self.tally.read()
        add_rows = [0] * len(CLASSES)
        add_bytes = [0] * len(CLASSES)
        for row in rows:
            add_rows[row[0]] += 1
            add_bytes[row[0]] += row[6]
        touched: set[str] = {"seq:outbox"}
        dropped = outbox_capacity.make_room(self, add_rows, add_bytes, counts, touched)
        first = counts["seq:outbox"][0] + 1
        ids = range(first, first + len(rows))
        conn.executemany(_INSERT.format(mask=self.live_mask), [(i, *row) for i, row in zip(ids, rows)])
        counts["seq:outbox"][0] = ids[-1]
        for prio, n in enumerate(add_rows):
            if n:
                key = f"class:{CLASSES[prio]}"
                counts[key][0] += n
                counts[key][1] += add_bytes[prio]
                touched.add(key)
        total = sum(add_bytes)
        for name in self.sinks:
            counts[f"sink:{name}"][0] += len(rows)
            counts[f"sink:{name}"][1] += total
            touched.add(f"sink:{name}")
        return ids, dropped, self.tally.commit(counts, touched)

    def after_store(self, dropped: dict, stamped: tuple) -> None:
        """Trio side of an ingest commit that stored records: metrics, logs, wake the workers.
        (Plain, not async: it never waits, and a coroutine per ingest call costs the trio thread.)"""
        if stamped[0]:
            self._saw(stamped)
        if dropped:
            self._count_drops(dropped, "outbox full: dropped the oldest records")
        self._arrived.set()  # a new Event only once a worker waits again (wait_for_records), not per store

    def _count_drops(self, dropped: dict, message: str) -> None:
        for key, n in dropped.items():
            self.dropped[key] = self.dropped.get(key, 0) + n
        log.warning(message, **{f"{cls}_{reason}": n for (cls, reason), n in dropped.items()})

    def count_refused(self, classes: Iterable[int]) -> None:
        for prio in classes:
            name = CLASSES[prio]
            self.refused[name] = self.refused.get(name, 0) + 1

    async def wait_for_records(self, timeout: float) -> None:
        """Return when new records were committed, or after `timeout`."""
        if self._arrived.is_set():  # records committed before this call do not count
            self._arrived = trio.Event()
        with trio.move_on_after(timeout):
            await self._arrived.wait()

    # -- batches ------------------------------------------------------------------------

    def _select(self, bit: int, max_records: int, max_bytes: int, exclude: Iterable[int] = frozenset(),
                skip: dict[int, list[tuple[int, int]]] | None = None) -> list[tuple]:
        """Reader job: the next records with `bit` in sending order (see `outbox_select`)."""
        return select_records(self.db.connection(), bit, max_records, max_bytes, exclude, skip)

    def _choose(self, sink: str, max_records: int, max_bytes: int, exclude: Iterable[int],
                skip: dict[int, list[tuple[int, int]]]) -> OpenBatch | None:
        """Reader job: the next batch for `sink`, or None. Its spans are computed here,
        off the trio thread (a loop over thousands of records)."""
        records = self._select(self.bits[sink], max_records, max_bytes, exclude, skip)
        if not records:
            return None
        batch = OpenBatch(sink, str(uuid.uuid4()), records)
        batch.spans  # noqa: B018 - cached for the trio side
        return batch

    def _skip(self, sink: str) -> dict[int, list[tuple[int, int]]]:
        skip: dict[int, list[tuple[int, int]]] = {}
        for spans in self._open.get(sink, {}).values():
            for prio, span in spans.items():
                skip.setdefault(prio, []).append(span)
        return skip

    def _persist(self, batches: Sequence[OpenBatch], replaces: str | None = None) -> None:
        conn = self.db.connection()
        if replaces is not None:
            conn.execute("DELETE FROM core_outbox_batch WHERE batch_id = ?", (replaces,))
        now = self.clock()
        conn.executemany(
            "INSERT INTO core_outbox_batch (batch_id, sink, created, record_ids) VALUES (?, ?, ?, ?)",
            [(b.batch_id, b.sink, now, array("q", b.ids).tobytes()) for b in batches],
        )

    async def next_batch(
        self, sink: str, *, max_records: int, max_bytes: int, exclude: Iterable[int] = frozenset()
    ) -> OpenBatch | None:
        """Choose the next batch for `sink` and persist it (its id is then fixed).

        Records in this sink's open batches (chosen, not yet delivered or dead-lettered)
        are never chosen again; `exclude` leaves out more ids.
        """
        batch = await self.storage.read(self._choose, sink, max_records, max_bytes, frozenset(exclude),
                                        self._skip(sink))
        if batch is None:
            return None
        await self.storage.write(self._persist, [batch])
        self._open.setdefault(sink, {})[batch.batch_id] = batch.spans
        return batch

    async def split(self, batch: OpenBatch) -> list[OpenBatch]:
        """Replace an open batch by two halves, each with a new Idempotency-Key.

        For a batch the far end found too large (413): it was not stored there, so new
        keys lose nothing, and the records keep their ids (the receiver's dedup).
        """
        half = (len(batch.records) + 1) // 2
        halves = [OpenBatch(batch.sink, str(uuid.uuid4()), part)
                  for part in (batch.records[:half], batch.records[half:]) if part]
        await self.storage.write(self._persist, halves, batch.batch_id)
        opened = self._open.setdefault(batch.sink, {})
        opened.pop(batch.batch_id, None)
        for b in halves:
            opened[b.batch_id] = b.spans
        return halves

    def _load_batches(self, sink: str) -> list[OpenBatch]:
        conn = self.db.connection()
        bit = self.bits[sink]
        out = []
        for batch_id, blob in conn.execute(
            "SELECT batch_id, record_ids FROM core_outbox_batch WHERE sink = ? ORDER BY created, rowid", (sink,)
        ).fetchall():
            ids = array("q", bytes(blob)).tolist()
            # Only rows this sink still owes: another sink's pending bit keeps a row alive
            # after this one delivered it.
            found = {row[0]: row for row in self._rows_by_id(ids, COLUMNS, bit)}
            batch = OpenBatch(sink, batch_id, [found[i] for i in ids if i in found])
            batch.spans  # noqa: B018 - cached here, in the reader thread
            out.append(batch)
        return out

    async def open_batches(self, sink: str) -> list[OpenBatch]:
        """Batches chosen before a restart and not yet delivered: resend them first."""
        # A barrier first: writes of a cancelled worker may still be queued (a write
        # abandoned by its caller still commits), among them a batch being persisted.
        # Read before it lands and its records would go out again under a second key.
        await self.storage.write(_nothing)
        batches = await self.storage.read(self._load_batches, sink)
        self._open[sink] = {b.batch_id: b.spans for b in batches}
        return batches

    def _rows_by_id(self, ids: Sequence[int], columns: str, bit: int = 0) -> list[tuple]:
        """Rows by id; with `bit`, only those still pending for that sink."""
        conn = self.db.connection()
        rows: list[tuple] = []
        where = "id IN ({marks})" + (" AND (pending & ?) != 0" if bit else "")
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            sql = f"SELECT {columns} FROM core_outbox WHERE " + where.format(marks=",".join("?" * len(chunk)))
            rows += conn.execute(sql, (*chunk, bit) if bit else chunk).fetchall()
        return rows

    def _release(self, sink: str, records: Sequence[tuple]) -> tuple[int, tuple]:
        """Clear `sink`'s bit on `records`; delete rows no sink needs any more.

        Set-based: one DELETE (and, with several sinks, one UPDATE) per chunk of ids,
        whose RETURNING rows are summed per class; a row dropped meanwhile by the
        capacity policy or the TTL is simply not there any more (already counted).
        """
        bit = self.bits[sink]
        conn = self.db.connection()
        n_class = [0] * len(CLASSES)
        b_class = [0] * len(CLASSES)
        kept_n = kept_b = 0
        # A batch is in class order: one run of ids per class, summed without a Python loop per row.
        for prio, group in groupby(records, key=_PRIO):
            ids = list(map(_FIRST, group))
            for where, args in _id_sets(ids):
                n, size = conn.execute(f"SELECT COUNT(*), TOTAL(size) FROM core_outbox WHERE {where} AND pending = ?",
                                       (*args, bit)).fetchone()
                conn.execute(f"DELETE FROM core_outbox WHERE {where} AND pending = ?", (*args, bit))
                n_class[prio] += n
                b_class[prio] += int(size)
                if len(self.bits) > 1:  # rows other sinks still need: only this sink's bit goes
                    kept = conn.execute(
                        f"UPDATE core_outbox SET pending = pending & ? WHERE {where} AND (pending & ?) != 0"
                        " RETURNING size",
                        (~bit, *args, bit),
                    ).fetchall()
                    kept_n += len(kept)
                    kept_b += sum(map(_FIRST, kept))
        counts = self.tally.read()
        touched: set[str] = set()
        for prio, n in enumerate(n_class):
            if n:
                key = f"class:{CLASSES[prio]}"
                counts[key][0] -= n
                counts[key][1] -= b_class[prio]
                touched.add(key)
        released = sum(n_class) + kept_n
        if released:
            key = f"sink:{sink}"
            counts[key][0] -= released
            counts[key][1] -= sum(b_class) + kept_b
            touched.add(key)
        return released, self.tally.commit(counts, touched)

    def _delivered(self, batch: OpenBatch, when: float) -> tuple:
        released, stamped = self._release(batch.sink, batch.records)
        conn = self.db.connection()
        conn.execute("DELETE FROM core_outbox_batch WHERE batch_id = ?", (batch.batch_id,))
        conn.execute(
            "UPDATE core_outbox_sink SET delivered = delivered + ?, batches = batches + 1, last_success = ?"
            " WHERE name = ?", (released, when, batch.sink))
        return stamped

    async def delivered(self, batch: OpenBatch) -> None:
        """The sink's far end acknowledged `batch`: it leaves the outbox for this sink."""
        self._saw(await self.storage.write(self._delivered, batch, self.clock()))
        self._open.get(batch.sink, {}).pop(batch.batch_id, None)

    def oldest_pending(self, family: str) -> float | None:
        """When the oldest record of `family` some sink has not delivered yet was stored
        (`created`), None when every one was (a reader: its own connection). Ids grow
        with `created`, so the first row of the family by id is the oldest."""
        row = self.db.execute_sql("SELECT created FROM core_outbox WHERE family = ? ORDER BY id LIMIT 1",
                                  (family,)).fetchone()
        return None if row is None else float(row[0])

    def _dead_letter(self, batch: OpenBatch, status: int, reason: str, when: float) -> tuple:
        conn = self.db.connection()
        conn.execute(
            "INSERT INTO core_dead_letter (sink, batch_id, status, reason, created, count, records)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (batch.sink, batch.batch_id, status, reason[:2000], when, len(batch.records),
             json.dumps([list(r) for r in batch.records], ensure_ascii=False)))
        _, stamped = self._release(batch.sink, batch.records)
        conn.execute("DELETE FROM core_outbox_batch WHERE batch_id = ?", (batch.batch_id,))
        self._note_error(batch.sink, reason, when)
        return stamped

    async def dead_letter(self, batch: OpenBatch, status: int, reason: str) -> None:
        """Set `batch` aside in `core_dead_letter` (records kept whole) and move on."""
        self._saw(await self.storage.write(self._dead_letter, batch, status, reason, self.clock()))
        self._open.get(batch.sink, {}).pop(batch.batch_id, None)
        log.error("batch dead-lettered", sink=batch.sink, batch_id=batch.batch_id, status=status,
                  records=len(batch.records), reason=reason)

    def _note_error(self, sink: str, reason: str, when: float) -> None:
        self.db.connection().execute(
            "UPDATE core_outbox_sink SET last_error = ?, last_error_at = ? WHERE name = ?", (reason[:500], when, sink))

    async def note_error(self, sink: str, reason: str) -> None:
        """Remember a sink's last error (for `gatewayd outbox status`)."""
        await self.storage.write(self._note_error, sink, reason, self.clock())

    # -- time-to-live -------------------------------------------------------------------

    def _expire(self, now: float) -> tuple[dict, tuple]:
        counts = self.tally.read()
        touched: set[str] = set()
        dropped = outbox_capacity.expire(self, now, counts, touched)
        return dropped, self.tally.commit(counts, touched)

    async def expire(self) -> dict:
        """Drop records older than their class's TTL (5,000 per class per call)."""
        dropped, stamped = await self.storage.write(self._expire, self.clock())
        self._saw(stamped)
        if dropped:
            self._count_drops(dropped, "outbox time-to-live: dropped expired records")
        self.oldest = await self.storage.read(self.tally.oldest)
        return dropped

    async def maintain(self, *, every_s: float = 30.0, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background task: TTL expiry and the oldest-record ages, every `every_s`."""
        task_status.started()
        while True:
            try:
                while sum((await self.expire()).values()) >= outbox_capacity.EXPIRE_STEP:
                    await trio.sleep(0)  # a big expired backlog: keep going, in steps
            except Exception as e:  # disk full and the like: try again next round
                log.warning("outbox maintenance failed", error=str(e))
            await trio.sleep(every_s)

    # -- operators (blocking: CLI, or through storage.read/write); see outbox_admin -----

    def status(self) -> dict[str, Any]:
        """Per class: rows, bytes, oldest age; per sink: backlog, last success/error."""
        return outbox_admin.status(self)

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead-lettered batch, without its records."""
        return outbox_admin.dead_letters(self)

    def retry_dead(self, ids: Iterable[int] | None = None) -> tuple[int, int]:
        """Put dead-lettered records back in the outbox (see `outbox_admin.retry_dead`)."""
        return outbox_admin.retry_dead(self, ids)

    def forget_sink(self, name: str) -> int:
        """Let go of a removed sink's backlog (see `outbox_admin.forget_sink`)."""
        return outbox_admin.forget_sink(self, name)


def _id_sets(ids: list[int]) -> list[tuple[str, tuple[int, ...]]]:
    """SQL conditions (with their arguments) that together select exactly `ids`.

    Distinct ids that fill a whole interval (the usual batch of one class: a run of
    consecutive ids) are one `BETWEEN`, which SQLite walks as a range of the table,
    twice as fast as looking each id up; otherwise `IN` lists of `_CHUNK` ids.
    """
    if ids:
        low, high = min(ids), max(ids)
        if high - low + 1 == len(ids) == len(set(ids)):
            return [("id BETWEEN ? AND ?", (low, high))]
    return [(f"id IN ({','.join('?' * len(chunk))})", tuple(chunk))
            for chunk in (ids[start : start + _CHUNK] for start in range(0, len(ids), _CHUNK))]


def _nothing() -> None:
    """A writer job that does nothing: waiting for it waits for every write queued before."""
