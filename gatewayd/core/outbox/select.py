"""Choosing a batch: the outbox's records in sending order, a page at a time.

Classes go in priority order (command_ack, alert, state, history, log); state and
history newest first. Each class is read through the index `(prio, id, pending)` in
pages of `_PAGE` rows, as plain tuples, skipping the id spans of the sink's open
batches (so two batches in flight never share a record), until the record or byte cap:
memory stays bounded whatever the backlog.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from operator import itemgetter
from typing import Any

from .records import CLASS_ORDER, COLUMNS, RECORD_OVERHEAD

__all__ = ["select_records"]

_PAGE = 1000  # rows per SELECT
_SIZE = itemgetter(7)


def _page_sql(newest_first: bool, above: bool, below: bool) -> str:
    sql = f"SELECT {COLUMNS} FROM core_outbox WHERE prio = ? AND (pending & ?) != 0"
    if above:
        sql += " AND id > ?"
    if below:
        sql += " AND id < ?"
    return sql + f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT ?"


_PAGE_SQL = {(n, a, b): _page_sql(n, a, b) for n in (False, True) for a in (False, True) for b in (False, True)}


def _gaps(spans: list[tuple[int, int]], newest_first: bool) -> list[tuple[int | None, int | None]]:
    """The id intervals (exclusive bounds, None: open) between `spans`, in scan order."""
    gaps: list[tuple[int | None, int | None]] = []
    low: int | None = None
    for lo, hi in sorted(spans):
        if low is None or lo > low:
            gaps.append((low, lo))
        low = hi if low is None else max(low, hi)
    gaps.append((low, None))
    return gaps[::-1] if newest_first else gaps


def select_records(conn: sqlite3.Connection, bit: int, max_records: int, max_bytes: int,
                   exclude: Iterable[int] = frozenset(),
                   skip: dict[int, list[tuple[int, int]]] | None = None) -> list[tuple]:
    """The next records with `bit` in sending order, up to `max_records`/`max_bytes`.

    Walks each class through the index, a page at a time, around the id spans in
    `skip` ({prio: [(lowest, highest), ...]}: open batches); `exclude` drops single ids
    on top of that. Records are plain tuples in the StoredRecord layout (making a
    million objects of a tuple subclass costs more than reading the rows).
    """
    exclude = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
    out: list[tuple] = []
    total = 0
    for prio, newest_first in CLASS_ORDER:
        for above, below in _gaps((skip or {}).get(prio, []), newest_first):
            while True:
                want = max_records - len(out)
                if want <= 0:
                    return out
                limit = min(want, _PAGE)
                args: list[Any] = [prio, bit]
                if above is not None:
                    args.append(above)
                if below is not None:
                    args.append(below)
                args.append(limit)
                page = conn.execute(_PAGE_SQL[(newest_first, above is not None, below is not None)],
                                    args).fetchall()
                page_bytes = sum(map(_SIZE, page)) + RECORD_OVERHEAD * len(page)
                if not exclude and total + page_bytes <= max_bytes:  # the usual case: all of it
                    out += page
                    total += page_bytes
                else:
                    for row in page:
                        if exclude and row[0] in exclude:
                            continue
                        size = row[7] + RECORD_OVERHEAD
                        if out and total + size > max_bytes:
                            return out
                        out.append(row)
                        total += size
                if len(page) < limit:
                    break
                if newest_first:
                    below = page[-1][0]
                else:
                    above = page[-1][0]
    return out

