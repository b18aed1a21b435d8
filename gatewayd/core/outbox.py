"""The outbox: the durable offline buffer between ingest and the upstream sinks.

Every record a plugin ingests is one row of `core_outbox`, written in the same
transaction as the family's own rows. A row carries a bit mask `pending` of the
sinks that still have to deliver it; a sink's delivery clears its bit, and the row is
deleted when no bit is left. Nothing else removes a row except the capacity policy
and the time-to-live, and both count and log what they drop.

Sending order (streetlight spec, section 7; docs/upstream-protocol.md): command acks,
alerts, state (newest first), history (newest first, walking back: the backfill),
logs. The backlog is never loaded: batches are selected a page at a time through the
index `(prio, id, pending)`.

A batch is persisted (`core_outbox_batch`: its UUIDv4 and its record ids) before it
is sent, so its Idempotency-Key survives retries *and* a crash. Row and byte counts
per class and per sink live in `core_outbox_count`, updated in the same transactions
as the rows: they are exact after any crash, and capacity checks cost a tiny SELECT.

Writer-side methods (`_...` taking no trio) run on the storage writer thread inside a
group-commit transaction; everything async is called from trio.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import peewee
import trio

from .logs import get_logger
from .storage import SchemaSpec, Storage, StorageFull
from .sync.protocol import CLASS_PRIORITY, CLASSES, rfc3339_utc

__all__ = ["Outbox", "OutboxFull", "OutboxLimits", "OpenBatch", "StoredRecord", "CLASS_ORDER", "wire_records"]

log = get_logger("gatewayd.outbox")

#: Classes whose backlog goes newest first (the cloud sees the current picture first).
NEWEST_FIRST = frozenset({CLASS_PRIORITY["state"], CLASS_PRIORITY["history"]})
#: (prio, newest_first) in sending order.
CLASS_ORDER = tuple((p, p in NEWEST_FIRST) for p in range(len(CLASSES)))
# Drop order under drop_oldest when the total is over: the lowest class first.
_DROP_ORDER = tuple(reversed(range(len(CLASSES))))
_CHUNK = 900  # ids per IN (...) query, under SQLite's historical 999-variable limit
_COLUMNS = "id, prio, created, ts, family, device, kind, size, data"
# What a record adds to a batch besides its data: ids, names, ts, class, JSON syntax.
RECORD_OVERHEAD = 96


class OutboxFull(StorageFull):
    """The outbox is at capacity and the policy is `reject`: nothing was stored."""


# -- tables ------------------------------------------------------------------------


class OutboxRecord(peewee.Model):
    # Ids come from the high-water mark `seq:outbox` in core_outbox_count, never from
    # SQLite's max(rowid)+1: an id is never reused, even after the newest row left, and
    # ids are the upstream dedup key (a reused one would be dropped as a duplicate).
    # (AUTOINCREMENT does the same at ~30 % of the insert rate.)
    id = peewee.IntegerField(primary_key=True)
    prio = peewee.SmallIntegerField()
    pending = peewee.BigIntegerField()
    created = peewee.FloatField()
    ts = peewee.FloatField()
    family = peewee.TextField()
    device = peewee.TextField()
    kind = peewee.TextField()
    size = peewee.IntegerField()
    data = peewee.TextField()

    class Meta:
        table_name = "core_outbox"
        indexes = ((("prio", "id", "pending"), False),)


class OutboxCount(peewee.Model):
    key = peewee.TextField(primary_key=True)  # "class:<name>", "sink:<name>", "seq:outbox" (last id)
    rows = peewee.BigIntegerField(default=0)
    bytes = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "core_outbox_count"


class OutboxSink(peewee.Model):
    name = peewee.TextField(primary_key=True)
    bit = peewee.IntegerField(unique=True)
    delivered = peewee.BigIntegerField(default=0)
    batches = peewee.BigIntegerField(default=0)
    last_success = peewee.FloatField(null=True)
    last_error = peewee.TextField(null=True)
    last_error_at = peewee.FloatField(null=True)

    class Meta:
        table_name = "core_outbox_sink"


class OutboxBatch(peewee.Model):
    batch_id = peewee.TextField(primary_key=True)
    sink = peewee.TextField(index=True)
    created = peewee.FloatField()
    record_ids = peewee.BlobField()  # array('q') bytes, in sending order

    class Meta:
        table_name = "core_outbox_batch"


class DeadLetter(peewee.Model):
    id = peewee.AutoField()
    sink = peewee.TextField()
    batch_id = peewee.TextField()
    status = peewee.IntegerField()
    reason = peewee.TextField()
    created = peewee.FloatField()
    count = peewee.IntegerField()
    records = peewee.TextField()  # JSON: [[id, prio, created, ts, family, device, kind, size, data], ...]

    class Meta:
        table_name = "core_dead_letter"


MODELS = [OutboxRecord, OutboxCount, OutboxSink, OutboxBatch, DeadLetter]


# -- values ------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxLimits:
    """Capacity of one class (0: no limit of its own) and its time-to-live."""

    max_rows: int = 0
    max_bytes: int = 0
    ttl_s: float = 0.0


@dataclass
class OutboxPolicy:
    """What the outbox holds at most, and what happens when it is full."""

    policy: str = "drop_oldest"  # or "reject"
    max_rows: int = 10_000_000
    max_bytes: int = 1 << 30
    classes: dict[str, OutboxLimits] = field(default_factory=dict)

    def limits(self, prio: int) -> OutboxLimits:
        return self.classes.get(CLASSES[prio], OutboxLimits())


class StoredRecord(tuple):
    """One outbox row: (id, prio, created, ts, family, device, kind, size, data)."""

    __slots__ = ()
    id = property(lambda self: self[0])
    prio = property(lambda self: self[1])
    size = property(lambda self: self[7])

    def wire(self, ts: str | None = None) -> dict[str, Any]:
        """The record as the batch protocol sends it (`ts`: its timestamp, preformatted)."""
        return {
            "id": self[0],
            "family": self[4],
            "device": self[5],
            "kind": self[6],
            "ts": ts or rfc3339_utc(self[3]),
            "class": CLASSES[self[1]],
            "data": json.loads(self[8]),
        }


def wire_records(records: Iterable[StoredRecord]) -> list[dict[str, Any]]:
    """`[r.wire() for r in records]`, formatting each distinct second only once."""
    seconds: dict[int, str] = {}
    out = []
    for r in records:
        # The same rounding as datetime.fromtimestamp (so the same text as rfc3339_utc).
        frac, whole = math.modf(r[3])
        micros = round(frac * 1e6)
        if micros >= 1_000_000:
            whole, micros = whole + 1, micros - 1_000_000
        prefix = seconds.get(whole)
        if prefix is None:
            prefix = seconds[whole] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        out.append(r.wire(f"{prefix}.{micros // 1000:03d}Z"))
    return out


@dataclass
class OpenBatch:
    """A batch chosen for one sink: its Idempotency-Key and records, in sending order."""

    sink: str
    batch_id: str
    records: list[StoredRecord]

    @property
    def ids(self) -> list[int]:
        return [r[0] for r in self.records]


# -- the outbox --------------------------------------------------------------------


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
        self.bits: dict[str, int] = {}
        self.live_mask = 0
        # Mirror of core_outbox_count as of the last commit seen from trio (metrics).
        self.counts: dict[str, list[int]] = {}
        self.oldest: dict[int, float | None] = {}
        self.dropped: dict[tuple[str, str], int] = {}  # (class, reason) -> rows
        self.refused: dict[str, int] = {}  # class -> records refused (policy reject)
        self._seq = 0
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
        self.storage.install(SchemaSpec("outbox", MODELS, 1))
        with self.db.connection_context(), self.db.atomic():
            registered = {row.name: row.bit for row in OutboxSink.select()}
            for name in self.sinks:
                if name not in registered:
                    used = set(registered.values())
                    bit = next(b for b in range(62) if b not in used)
                    OutboxSink.insert(name=name, bit=bit).execute()
                    registered[name] = bit
            self.bits = {name: 1 << bit for name, bit in registered.items()}
            self.live_mask = 0
            for name in self.sinks:
                self.live_mask |= self.bits[name]
            keys = {f"class:{c}" for c in CLASSES} | {f"sink:{n}" for n in self.bits} | {"seq:outbox"}
            have = {row.key for row in OutboxCount.select(OutboxCount.key)}
            if keys - have:
                self._recount(keys)
            self.counts = self._read_counts()
            self.oldest = self._oldest()

    async def open(self) -> None:
        """`install` on a worker thread (call after storage opened)."""
        await trio.to_thread.run_sync(self.install)

    def _recount(self, keys: Iterable[str]) -> None:
        conn = self.db.connection()
        rows = {k: [0, 0] for k in keys}
        # The id high-water mark only ever grows.
        old = conn.execute("SELECT rows FROM core_outbox_count WHERE key = 'seq:outbox'").fetchone()
        top = conn.execute("SELECT MAX(id) FROM core_outbox").fetchone()[0]
        rows["seq:outbox"] = [max(old[0] if old else 0, top or 0), 0]
        for prio, pending, n, size in conn.execute(
            "SELECT prio, pending, COUNT(*), TOTAL(size) FROM core_outbox GROUP BY prio, pending"
        ).fetchall():
            rows[f"class:{CLASSES[prio]}"][0] += n
            rows[f"class:{CLASSES[prio]}"][1] += int(size)
            for name, bit in self.bits.items():
                if pending & bit:
                    rows[f"sink:{name}"][0] += n
                    rows[f"sink:{name}"][1] += int(size)
        conn.executemany(
            "INSERT OR REPLACE INTO core_outbox_count (key, rows, bytes) VALUES (?, ?, ?)",
            [(k, r, b) for k, (r, b) in rows.items()],
        )

    def _read_counts(self) -> dict[str, list[int]]:
        cur = self.db.connection().execute("SELECT key, rows, bytes FROM core_outbox_count")
        return {k: [r, b] for k, r, b in cur.fetchall()}

    def _oldest(self) -> dict[int, float | None]:
        conn = self.db.connection()
        out: dict[int, float | None] = {}
        for prio in range(len(CLASSES)):
            row = conn.execute(
                "SELECT created FROM core_outbox WHERE id = (SELECT MIN(id) FROM core_outbox WHERE prio = ?)", (prio,)
            ).fetchone()
            out[prio] = row[0] if row else None
        return out

    # -- bookkeeping shared by writer jobs ----------------------------------------------

    def _commit_counts(self, counts: dict[str, list[int]], touched: set[str]) -> tuple[int, dict[str, list[int]]]:
        self.db.connection().executemany(
            "UPDATE core_outbox_count SET rows = ?, bytes = ? WHERE key = ?",
            [(counts[k][0], counts[k][1], k) for k in touched],
        )
        self._seq += 1  # writer thread only
        return self._seq, counts

    def _saw(self, stamped: tuple[int, dict[str, list[int]]]) -> None:
        """Trio side, after a commit: keep the newest counts for metrics."""
        seq, counts = stamped
        if seq > self._seen_seq:
            self._seen_seq, self.counts = seq, counts

    def _forget(self, rows: list[tuple[int, int, int, int]], counts: dict[str, list[int]], touched: set[str]) -> None:
        """Account for deleted rows (id, prio, size, pending) in class and sink counts."""
        for _, prio, size, pending in rows:
            key = f"class:{CLASSES[prio]}"
            counts[key][0] -= 1
            counts[key][1] -= size
            touched.add(key)
            for name, bit in self.bits.items():
                if pending & bit:
                    counts[f"sink:{name}"][0] -= 1
                    counts[f"sink:{name}"][1] -= size
                    touched.add(f"sink:{name}")

    # -- ingest (writer thread) ---------------------------------------------------------

    def store(self, rows: list[tuple], family_rows: Callable[[], Any] | None) -> tuple[Any, range, dict, tuple]:
        """Writer job: the family's rows, then the outbox rows, one transaction.

        `rows` are (prio, created, ts, family, device, kind, size, data). Returns
        (family result, record ids, dropped {(class, reason): n}, stamped counts).
        """
        result = family_rows() if family_rows is not None else None
        if not rows or not self.live_mask:
            return result, range(0), {}, (0, {})
        conn = self.db.connection()
        counts = self._read_counts()
        touched: set[str] = set()
        dropped = self._make_room(rows, counts, touched)
        mask = self.live_mask
        first = counts["seq:outbox"][0] + 1
        ids = range(first, first + len(rows))
        conn.executemany(
            "INSERT INTO core_outbox (id, prio, pending, created, ts, family, device, kind, size, data)"
            " VALUES (?, ?, " + str(mask) + ", ?, ?, ?, ?, ?, ?, ?)",
            [(i, *row) for i, row in zip(ids, rows)],
        )
        counts["seq:outbox"][0] = ids[-1]
        touched = touched | {"seq:outbox"}
        total = 0
        for row in rows:
            key = f"class:{CLASSES[row[0]]}"
            counts[key][0] += 1
            counts[key][1] += row[6]
            touched.add(key)
            total += row[6]
        for name in self.sinks:
            counts[f"sink:{name}"][0] += len(rows)
            counts[f"sink:{name}"][1] += total
            touched.add(f"sink:{name}")
        return result, ids, dropped, self._commit_counts(counts, touched)

    def _make_room(self, rows: list[tuple], counts: dict[str, list[int]], touched: set[str]) -> dict:
        add_rows = [0] * len(CLASSES)
        add_bytes = [0] * len(CLASSES)
        for row in rows:
            add_rows[row[0]] += 1
            add_bytes[row[0]] += row[6]
        dropped: dict[tuple[str, str], int] = {}
        reject = self.policy.policy == "reject"
        for prio in range(len(CLASSES)):
            if not add_rows[prio]:
                continue
            limits = self.policy.limits(prio)
            have = counts[f"class:{CLASSES[prio]}"]
            over_rows = have[0] + add_rows[prio] - limits.max_rows if limits.max_rows else 0
            over_bytes = have[1] + add_bytes[prio] - limits.max_bytes if limits.max_bytes else 0
            if over_rows > 0 or over_bytes > 0:
                if reject or (limits.max_rows and add_rows[prio] > limits.max_rows) or (
                    limits.max_bytes and add_bytes[prio] > limits.max_bytes
                ):
                    raise OutboxFull(f"outbox class {CLASSES[prio]!r} is full ({have[0]} records, {have[1]} bytes)")
                n = self._drop_oldest(prio, over_rows, over_bytes, counts, touched)
                dropped[(CLASSES[prio], "capacity")] = n
        total_rows = sum(counts[f"class:{c}"][0] for c in CLASSES)
        total_bytes = sum(counts[f"class:{c}"][1] for c in CLASSES)
        over_rows = total_rows + len(rows) - self.policy.max_rows
        over_bytes = total_bytes + sum(add_bytes) - self.policy.max_bytes
        if over_rows > 0 or over_bytes > 0:
            if reject or len(rows) > self.policy.max_rows or sum(add_bytes) > self.policy.max_bytes:
                raise OutboxFull(f"outbox is full ({total_rows} records, {total_bytes} bytes)")
            for prio in _DROP_ORDER:
                if over_rows <= 0 and over_bytes <= 0:
                    break
                before = list(counts[f"class:{CLASSES[prio]}"])
                n = self._drop_oldest(prio, over_rows, over_bytes, counts, touched)
                if n:
                    key = (CLASSES[prio], "capacity")
                    dropped[key] = dropped.get(key, 0) + n
                    over_rows -= n
                    over_bytes -= before[1] - counts[f"class:{CLASSES[prio]}"][1]
        return dropped

    def _drop_oldest(self, prio: int, rows: int, nbytes: int, counts: dict, touched: set[str]) -> int:
        conn = self.db.connection()
        freed_rows = freed_bytes = 0
        victims: list[tuple[int, int, int, int]] = []
        while freed_rows < rows or freed_bytes < nbytes:
            page = conn.execute(
                "SELECT id, prio, size, pending FROM core_outbox WHERE prio = ? AND id > ? ORDER BY id LIMIT 1000",
                (prio, victims[-1][0] if victims else -1),
            ).fetchall()
            if not page:
                break
            for row in page:
                victims.append(row)
                freed_rows += 1
                freed_bytes += row[2]
                if freed_rows >= rows and freed_bytes >= nbytes:
                    break
        conn.executemany("DELETE FROM core_outbox WHERE id = ?", [(v[0],) for v in victims])
        self._forget(victims, counts, touched)
        return len(victims)

    async def after_store(self, dropped: dict, stamped: tuple) -> None:
        """Trio side of an ingest commit: metrics, logs, wake the workers."""
        if stamped[0]:
            self._saw(stamped)
        if dropped:
            self._count_drops(dropped, "outbox full: dropped the oldest records")
        self._arrived.set()
        self._arrived = trio.Event()

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
        with trio.move_on_after(timeout):
            await self._arrived.wait()

    # -- batches ------------------------------------------------------------------------

    def _select(self, bit: int, max_records: int, max_bytes: int, exclude: set[int]) -> list[StoredRecord]:
        conn = self.db.connection()
        # First the ids, in sending order, from the covering index (prio, id, pending):
        # cheap even when a page is all excluded (batches in flight) or other sinks' rows.
        ids: list[int] = []
        for prio, newest_first in CLASS_ORDER:
            cursor: int | None = None
            while len(ids) < max_records:
                want = max_records - len(ids)
                sql = "SELECT id FROM core_outbox WHERE prio = ? AND (pending & ?) != 0"
                args: list[Any] = [prio, bit]
                if cursor is not None:
                    sql += " AND id < ?" if newest_first else " AND id > ?"
                    args.append(cursor)
                sql += f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT ?"
                page = [row[0] for row in conn.execute(sql, (*args, want)).fetchall()]
                ids += [i for i in page if i not in exclude][: max_records - len(ids)]
                if len(page) < want:
                    break
                cursor = page[-1]
            if len(ids) >= max_records:
                break
        # Then the rows, a chunk at a time, until the byte cap.
        out: list[StoredRecord] = []
        total = 0
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            rows = {row[0]: row for row in self._rows_by_id(chunk, _COLUMNS)}
            for i in chunk:
                row = rows.get(i)
                if row is None:  # dropped by the capacity policy in between
                    continue
                if out and total + row[7] + RECORD_OVERHEAD > max_bytes:
                    return out
                out.append(StoredRecord(row))
                total += row[7] + RECORD_OVERHEAD
        return out

    async def next_batch(
        self, sink: str, *, max_records: int, max_bytes: int, exclude: set[int] = frozenset()
    ) -> OpenBatch | None:
        """Choose the next batch for `sink` and persist it (its id is then fixed)."""
        records = await self.storage.read(self._select, self.bits[sink], max_records, max_bytes, set(exclude))
        if not records:
            return None
        batch = OpenBatch(sink, str(uuid.uuid4()), records)
        blob = array("q", batch.ids).tobytes()
        await self.storage.write(
            lambda: OutboxBatch.insert(batch_id=batch.batch_id, sink=sink, created=self.clock(), record_ids=blob).execute()
        )
        return batch

    def _load_batches(self, sink: str) -> list[OpenBatch]:
        conn = self.db.connection()
        out = []
        for batch_id, blob in conn.execute(
            "SELECT batch_id, record_ids FROM core_outbox_batch WHERE sink = ? ORDER BY created, rowid", (sink,)
        ).fetchall():
            ids = array("q", bytes(blob)).tolist()
            found = {row[0]: StoredRecord(row) for row in self._rows_by_id(ids, _COLUMNS)}
            out.append(OpenBatch(sink, batch_id, [found[i] for i in ids if i in found]))
        return out

    async def open_batches(self, sink: str) -> list[OpenBatch]:
        """Batches chosen before a restart and not yet delivered: resend them first."""
        return await self.storage.read(self._load_batches, sink)

    def _rows_by_id(self, ids: Sequence[int], columns: str) -> list[tuple]:
        conn = self.db.connection()
        rows: list[tuple] = []
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows += conn.execute(f"SELECT {columns} FROM core_outbox WHERE id IN ({marks})", chunk).fetchall()
        return rows

    def _release(self, sink: str, ids: Sequence[int]) -> tuple[int, tuple]:
        """Clear `sink`'s bit on `ids`; delete rows no sink needs any more."""
        bit = self.bits[sink]
        conn = self.db.connection()
        gone: list[tuple] = []
        kept: list[tuple] = []
        for start in range(0, len(ids), _CHUNK):
            chunk = list(ids[start : start + _CHUNK])
            marks = ",".join("?" * len(chunk))
            gone += conn.execute(
                f"DELETE FROM core_outbox WHERE id IN ({marks}) AND pending = ? RETURNING id, prio, size, pending",
                (*chunk, bit),
            ).fetchall()
            if len(self.bits) > 1:  # rows other sinks still need: only this sink's bit goes
                kept += conn.execute(
                    f"UPDATE core_outbox SET pending = pending & ? WHERE id IN ({marks}) AND (pending & ?) != 0"
                    " RETURNING id, prio, size, pending",
                    (~bit, *chunk, bit),
                ).fetchall()
        counts = self._read_counts()
        touched: set[str] = set()
        self._forget(gone, counts, touched)
        key = f"sink:{sink}"
        for _, _, size, _ in kept:
            counts[key][0] -= 1
            counts[key][1] -= size
            touched.add(key)
        return len(gone) + len(kept), self._commit_counts(counts, touched)

    def _delivered(self, batch: OpenBatch, when: float) -> tuple:
        released, stamped = self._release(batch.sink, batch.ids)
        OutboxBatch.delete().where(OutboxBatch.batch_id == batch.batch_id).execute()
        OutboxSink.update(
            delivered=OutboxSink.delivered + released, batches=OutboxSink.batches + 1, last_success=when
        ).where(OutboxSink.name == batch.sink).execute()
        return stamped

    async def delivered(self, batch: OpenBatch) -> None:
        """The sink's far end acknowledged `batch`: it leaves the outbox for this sink."""
        self._saw(await self.storage.write(self._delivered, batch, self.clock()))

    def _dead_letter(self, batch: OpenBatch, status: int, reason: str, when: float) -> tuple:
        DeadLetter.insert(
            sink=batch.sink, batch_id=batch.batch_id, status=status, reason=reason[:2000], created=when,
            count=len(batch.records), records=json.dumps([list(r) for r in batch.records], ensure_ascii=False),
        ).execute()
        _, stamped = self._release(batch.sink, batch.ids)
        OutboxBatch.delete().where(OutboxBatch.batch_id == batch.batch_id).execute()
        OutboxSink.update(last_error=reason[:500], last_error_at=when).where(OutboxSink.name == batch.sink).execute()
        return stamped

    async def dead_letter(self, batch: OpenBatch, status: int, reason: str) -> None:
        """Set `batch` aside in `core_dead_letter` (records kept whole) and move on."""
        self._saw(await self.storage.write(self._dead_letter, batch, status, reason, self.clock()))
        log.error("batch dead-lettered", sink=batch.sink, batch_id=batch.batch_id, status=status,
                  records=len(batch.records), reason=reason)

    async def note_error(self, sink: str, reason: str) -> None:
        """Remember a sink's last error (for `gatewayd outbox status`)."""
        when = self.clock()
        await self.storage.write(
            lambda: OutboxSink.update(last_error=reason[:500], last_error_at=when).where(OutboxSink.name == sink).execute()
        )

    # -- time-to-live -------------------------------------------------------------------

    def _expire(self, now: float) -> tuple[dict, tuple]:
        conn = self.db.connection()
        counts = self._read_counts()
        touched: set[str] = set()
        dropped: dict[tuple[str, str], int] = {}
        for prio in range(len(CLASSES)):
            ttl = self.policy.limits(prio).ttl_s
            if ttl <= 0:
                continue
            victims = conn.execute(
                "SELECT id, prio, size, pending FROM core_outbox WHERE prio = ? AND created < ?"
                " AND id IN (SELECT id FROM core_outbox WHERE prio = ? ORDER BY id LIMIT 5000)",
                (prio, now - ttl, prio),
            ).fetchall()
            if victims:
                conn.executemany("DELETE FROM core_outbox WHERE id = ?", [(v[0],) for v in victims])
                self._forget(victims, counts, touched)
                dropped[(CLASSES[prio], "ttl")] = len(victims)
        return dropped, self._commit_counts(counts, touched)

    async def expire(self) -> dict:
        """Drop records older than their class's TTL (5,000 per class per call)."""
        dropped, stamped = await self.storage.write(self._expire, self.clock())
        self._saw(stamped)
        if dropped:
            self._count_drops(dropped, "outbox time-to-live: dropped expired records")
        self.oldest = await self.storage.read(self._oldest)
        return dropped

    async def maintain(self, *, every_s: float = 30.0, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background task: TTL expiry and the oldest-record ages, every `every_s`."""
        task_status.started()
        while True:
            try:
                while sum((await self.expire()).values()) >= 5000:
                    await trio.sleep(0)  # a big expired backlog: keep going, in steps
            except Exception as e:  # disk full and the like: try again next round
                log.warning("outbox maintenance failed", error=str(e))
            await trio.sleep(every_s)

    # -- operators (blocking: CLI, or through storage.read) -------------------------

    def status(self) -> dict[str, Any]:
        """Per class: rows, bytes, oldest age; per sink: backlog, last success/error."""
        now = self.clock()
        counts = self._read_counts()
        oldest = self._oldest()
        classes = {
            c: {
                "rows": counts.get(f"class:{c}", [0, 0])[0],
                "bytes": counts.get(f"class:{c}", [0, 0])[1],
                "oldest_age_s": None if oldest[p] is None else round(now - oldest[p], 3),
            }
            for p, c in enumerate(CLASSES)
        }
        sinks = {}
        for row in OutboxSink.select().order_by(OutboxSink.name):
            backlog = counts.get(f"sink:{row.name}", [0, 0])
            sinks[row.name] = {
                "configured": row.name in self.sinks,
                "backlog": backlog[0],
                "backlog_bytes": backlog[1],
                "delivered": row.delivered,
                "batches": row.batches,
                "open_batches": OutboxBatch.select().where(OutboxBatch.sink == row.name).count(),
                "last_success": row.last_success,
                "last_error": row.last_error,
                "last_error_at": row.last_error_at,
            }
        dead = DeadLetter.select(peewee.fn.COUNT(DeadLetter.id), peewee.fn.TOTAL(DeadLetter.count)).scalar(as_tuple=True)
        return {"classes": classes, "sinks": sinks, "dead_letters": {"batches": dead[0], "records": int(dead[1])}}

    def dead_letters(self) -> list[dict[str, Any]]:
        """Every dead-lettered batch, without its records."""
        return [
            {"id": d.id, "sink": d.sink, "batch_id": d.batch_id, "status": d.status, "reason": d.reason,
             "created": d.created, "records": d.count}
            for d in DeadLetter.select().order_by(DeadLetter.id)
        ]

    def retry_dead(self, ids: Iterable[int] | None = None) -> tuple[int, int]:
        """Put dead-lettered records back in the outbox (same record ids, new batches).

        Run inside one transaction (`storage.run_blocking` or a writer job). Returns
        (batches, records). A record whose sink is no longer registered stays dead.
        """
        conn = self.db.connection()
        query = DeadLetter.select().order_by(DeadLetter.id)
        if ids is not None:
            query = query.where(DeadLetter.id.in_(list(ids)))
        counts = self._read_counts()
        touched: set[str] = set()
        batches = records = 0
        for dead in query:
            bit = self.bits.get(dead.sink)
            if bit is None:
                continue
            for rid, prio, created, ts, family, device, kind, size, data in json.loads(dead.records):
                row = conn.execute("SELECT pending FROM core_outbox WHERE id = ?", (rid,)).fetchone()
                if row is not None:
                    if row[0] & bit:
                        continue
                    conn.execute("UPDATE core_outbox SET pending = pending | ? WHERE id = ?", (bit, rid))
                else:
                    conn.execute(
                        "INSERT INTO core_outbox (id, prio, pending, created, ts, family, device, kind, size, data)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (rid, prio, bit, created, ts, family, device, kind, size, data),
                    )
                    key = f"class:{CLASSES[prio]}"
                    counts[key][0] += 1
                    counts[key][1] += size
                    touched.add(key)
                counts[f"sink:{dead.sink}"][0] += 1
                counts[f"sink:{dead.sink}"][1] += size
                touched.add(f"sink:{dead.sink}")
                records += 1
            dead.delete_instance()
            batches += 1
        self._commit_counts(counts, touched)
        return batches, records
