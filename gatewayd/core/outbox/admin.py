"""The operator's side of the outbox: status, dead letters, putting dead letters back.

Blocking functions over an `Outbox`, for `gatewayd outbox ...` (through
`storage.run_blocking`) and for the daemon (through `storage.read`/`write`); the
`Outbox` methods of the same names call them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import peewee

from ...protocol.batch import CLASSES
from .tables import DeadLetter, OutboxSink

if TYPE_CHECKING:
    from .store import Outbox

__all__ = ["status", "dead_letters", "retry_dead", "forget_sink"]


def status(outbox: Outbox) -> dict[str, Any]:
    """Per class: rows, bytes, oldest age; per sink: backlog, last success/error."""
    now = outbox.clock()
    counts = outbox.tally.read()
    oldest = outbox.tally.oldest()
    classes = {
        c: {
            "rows": counts.get(f"class:{c}", [0, 0])[0],
            "bytes": counts.get(f"class:{c}", [0, 0])[1],
            "oldest_age_s": None if oldest[p] is None else round(now - oldest[p], 3),
        }
        for p, c in enumerate(CLASSES)
    }
    conn = outbox.db.connection()
    open_batches = dict(conn.execute("SELECT sink, COUNT(*) FROM core_outbox_batch GROUP BY sink").fetchall())
    sinks = {}
    for row in OutboxSink.select().order_by(OutboxSink.name):
        backlog = counts.get(f"sink:{row.name}", [0, 0])
        sinks[row.name] = {
            "configured": row.name in outbox.sinks,
            "backlog": backlog[0],
            "backlog_bytes": backlog[1],
            "delivered": row.delivered,
            "batches": row.batches,
            "open_batches": open_batches.get(row.name, 0),
            "last_success": row.last_success,
            "last_error": row.last_error,
            "last_error_at": row.last_error_at,
        }
    dead = DeadLetter.select(peewee.fn.COUNT(DeadLetter.id), peewee.fn.TOTAL(DeadLetter.count)).scalar(as_tuple=True)
    return {"classes": classes, "sinks": sinks, "dead_letters": {"batches": dead[0], "records": int(dead[1])}}


def dead_letters(outbox: Outbox) -> list[dict[str, Any]]:
    """Every dead-lettered batch, without its records."""
    return [
        {"id": d.id, "sink": d.sink, "batch_id": d.batch_id, "status": d.status, "reason": d.reason,
         "created": d.created, "records": d.count}
        for d in DeadLetter.select().order_by(DeadLetter.id)
    ]


def retry_dead(outbox: Outbox, ids: Iterable[int] | None = None) -> tuple[int, int]:
    """Put dead-lettered records back in the outbox (same record ids, new batches).

    Run inside one transaction (`storage.run_blocking` or a writer job). Returns
    (batches, records). A record whose sink is no longer registered stays dead.
    """
    conn = outbox.db.connection()
    query = DeadLetter.select().order_by(DeadLetter.id)
    if ids is not None:
        query = query.where(DeadLetter.id.in_(list(ids)))
    counts = outbox.tally.read()
    touched: set[str] = set()
    batches = records = 0
    for dead in query:
        bit = outbox.bits.get(dead.sink)
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
    outbox.tally.commit(counts, touched)
    return batches, records


def forget_sink(outbox: Outbox, name: str) -> int:
    """Stop keeping records for a sink that is no longer configured; returns how many it had.

    A sink removed from `[[upstream]]` keeps its pending bit on every record it had not
    delivered, so those rows stay (and count against capacity) until it comes back or
    an operator lets them go: this clears its bit, deletes rows no other sink needs,
    drops its open batches and its registration. Its dead letters stay (retry-dead
    skips them). Run inside one transaction; safe while the daemon runs (its writer
    reads the counts afresh in every transaction: counts.py). Raises ValueError for a
    configured or unknown sink.
    """
    if name in outbox.sinks:
        raise ValueError(f"sink {name!r} is still configured in [[upstream]]; remove it there "
                         "(or set enabled = false) first")
    bit = outbox.bits.get(name)
    if bit is None:
        known = ", ".join(sorted(set(outbox.bits) - set(outbox.sinks))) or "none"
        raise ValueError(f"no sink {name!r} in the outbox (sinks not configured or disabled: {known})")
    conn = outbox.db.connection()
    owed = conn.execute("SELECT COUNT(*) FROM core_outbox WHERE (pending & ?) != 0", (bit,)).fetchone()[0]
    conn.execute("UPDATE core_outbox SET pending = pending & ? WHERE (pending & ?) != 0", (~bit, bit))
    conn.execute("DELETE FROM core_outbox WHERE pending = 0")
    conn.execute("DELETE FROM core_outbox_batch WHERE sink = ?", (name,))
    OutboxSink.delete().where(OutboxSink.name == name).execute()
    del outbox.bits[name]
    # Zeroed, not deleted: a running daemon still knows the bit until it restarts.
    conn.execute("UPDATE core_outbox_count SET rows = 0, bytes = 0 WHERE key = ?", (f"sink:{name}",))
    outbox.tally.recount({f"class:{c}" for c in CLASSES} | {f"sink:{n}" for n in outbox.bits})
    outbox.counts = outbox.tally.read()
    return owed
