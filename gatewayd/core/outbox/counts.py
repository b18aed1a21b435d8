"""The outbox's running totals (`core_outbox_count`): rows and bytes per class and per
sink, and the id high-water mark. Kept in step by every writer job, so status, metrics
and capacity never count the outbox table itself. Writer thread only, but `oldest`.

On the storage writer, within one group commit, the counts are read once and written
once (`Storage.defer`): the first job of the transaction that needs them reads them,
every job updates that dict in memory, and the changed rows are written before COMMIT
(still in the same transaction as the outbox rows: exact after any crash). After every
COMMIT or rollback the dict is forgotten and the next transaction reads the table again,
so a write by another process (`gatewayd outbox retry-dead`, `forget-sink`) or a job
rolled back is never hidden. Elsewhere (a CLI's `run_blocking`, `install`) `read` and
`commit` go straight to the table, as every call did before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import peewee

from ...protocol.batch import CLASSES

if TYPE_CHECKING:
    from ..storage import Storage

__all__ = ["OutboxCounts"]


class OutboxCounts:
    """Reads and updates `core_outbox_count`. `bits` is the outbox's sink name -> bit map
    (the same dict: sinks registered later are seen). With `storage`, the counts are kept
    in memory over each of its writer's transactions (see the module's docstring)."""

    def __init__(self, db: peewee.Database, bits: dict[str, int], storage: Storage | None = None) -> None:
        self.db = db
        self.bits = bits
        self.seq = 0  # bumped by every commit of counts, so the trio side keeps the newest
        self.storage = storage
        self._cache: dict[str, list[int]] | None = None  # this writer transaction's counts
        self._dirty: set[str] = set()  # keys changed in it, not written yet
        if storage is not None:
            storage.defer(self.flush, self.reset)

    def _cached(self) -> bool:
        return self.storage is not None and self.storage.in_writer_batch()

    def flush(self) -> None:
        """Write the keys this transaction changed (the writer, before COMMIT)."""
        if self._dirty and self._cache is not None:
            counts = self._cache
            self.db.connection().executemany(
                "UPDATE core_outbox_count SET rows = ?, bytes = ? WHERE key = ?",
                [(counts[k][0], counts[k][1], k) for k in self._dirty],
            )
        self._dirty = set()

    def reset(self) -> None:
        """Forget the cached counts (after COMMIT or a rollback): the next use reads the table."""
        self._cache = None
        self._dirty = set()

    def recount(self, keys: Iterable[str]) -> None:
        cached = self._cached()
        if cached:  # the table must hold this transaction's counts before it is recounted
            self.flush()
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
        if cached:
            self.reset()

    def read(self) -> dict[str, list[int]]:
        """The counts, to update in place and pass to `commit`. In a writer transaction:
        the transaction's own dict (later jobs see what earlier ones changed)."""
        if self._cached():
            if self._cache is None:
                self._cache = self._select()
            return self._cache
        return self._select()

    def _select(self) -> dict[str, list[int]]:
        cur = self.db.connection().execute("SELECT key, rows, bytes FROM core_outbox_count")
        return {k: [r, b] for k, r, b in cur.fetchall()}

    def oldest(self) -> dict[int, float | None]:
        conn = self.db.connection()
        out: dict[int, float | None] = {}
        for prio in range(len(CLASSES)):
            row = conn.execute(
                "SELECT created FROM core_outbox WHERE id = (SELECT MIN(id) FROM core_outbox WHERE prio = ?)", (prio,)
            ).fetchone()
            out[prio] = row[0] if row else None
        return out

    def commit(self, counts: dict[str, list[int]], touched: set[str]) -> tuple[int, dict[str, list[int]]]:
        """Record the `touched` keys of `counts` (from `read`); returns (seq, the counts) for
        the trio side's mirror. In a writer transaction the rows are written by `flush`,
        before COMMIT, and the counts returned are a copy (the cache changes on)."""
        self.seq += 1  # writer thread only
        if counts is self._cache and self._cached():
            self._dirty |= touched
            return self.seq, {k: v[:] for k, v in counts.items()}
        self.db.connection().executemany(
            "UPDATE core_outbox_count SET rows = ?, bytes = ? WHERE key = ?",
            [(counts[k][0], counts[k][1], k) for k in touched],
        )
        return self.seq, counts

    def forget(self, rows: list[tuple[int, int, int, int]], counts: dict[str, list[int]], touched: set[str]) -> None:
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
