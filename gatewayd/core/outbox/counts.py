"""The outbox's running totals (`core_outbox_count`): rows and bytes per class and per
sink, and the id high-water mark. Kept in step by every writer job, so status, metrics
and capacity never count the outbox table itself. Writer thread only, but `oldest`.
"""

from __future__ import annotations

from collections.abc import Iterable

import peewee

from ...protocol.batch import CLASSES

__all__ = ["OutboxCounts"]


class OutboxCounts:
    """Reads and updates `core_outbox_count`. `bits` is the outbox's sink name -> bit map
    (the same dict: sinks registered later are seen)."""

    def __init__(self, db: peewee.Database, bits: dict[str, int]) -> None:
        self.db = db
        self.bits = bits
        self.seq = 0  # bumped by every commit of counts, so the trio side keeps the newest

    def recount(self, keys: Iterable[str]) -> None:
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

    def read(self) -> dict[str, list[int]]:
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
        self.db.connection().executemany(
            "UPDATE core_outbox_count SET rows = ?, bytes = ? WHERE key = ?",
            [(counts[k][0], counts[k][1], k) for k in touched],
        )
        self.seq += 1  # writer thread only
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
