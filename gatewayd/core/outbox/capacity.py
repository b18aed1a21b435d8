"""What the outbox holds at most: capacity per class and in total, time-to-live.

Writer-thread functions over an `Outbox` (they run inside its ingest and maintenance
transactions). Under `drop_oldest` a full class loses its oldest records, and a full
outbox its lowest class first; under `reject` the new records are refused
(`OutboxFull`, nothing stored). Every drop is counted in `core_outbox_count` in the
same transaction, and reported by the caller (metrics, a warning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...protocol.batch import CLASSES
from ..storage import StorageFull

if TYPE_CHECKING:
    from .store import Outbox

__all__ = ["OutboxFull", "OutboxLimits", "OutboxPolicy", "make_room", "expire"]

# Drop order under drop_oldest when the total is over: the lowest class first.
_DROP_ORDER = tuple(reversed(range(len(CLASSES))))
# Rows examined per class per TTL pass: expiry of a huge backlog goes in steps.
EXPIRE_STEP = 5000


class OutboxFull(StorageFull):
    """The outbox is at capacity and the policy is `reject`: nothing was stored."""


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


def make_room(outbox: Outbox, add_rows: list[int], add_bytes: list[int], counts: dict[str, list[int]],
              touched: set[str]) -> dict[tuple[str, str], int]:
    """Before inserting `add_rows`/`add_bytes` per class: drop what the policy says, or
    raise OutboxFull. Returns {(class, "capacity"): rows dropped}."""
    policy = outbox.policy
    dropped: dict[tuple[str, str], int] = {}
    reject = policy.policy == "reject"
    for prio in range(len(CLASSES)):
        if not add_rows[prio]:
            continue
        limits = policy.limits(prio)
        if not (limits.max_rows or limits.max_bytes):
            continue
        have = counts[f"class:{CLASSES[prio]}"]
        over_rows = have[0] + add_rows[prio] - limits.max_rows if limits.max_rows else 0
        over_bytes = have[1] + add_bytes[prio] - limits.max_bytes if limits.max_bytes else 0
        if over_rows > 0 or over_bytes > 0:
            if reject or (limits.max_rows and add_rows[prio] > limits.max_rows) or (
                limits.max_bytes and add_bytes[prio] > limits.max_bytes
            ):
                raise OutboxFull(f"outbox class {CLASSES[prio]!r} is full ({have[0]} records, {have[1]} bytes)")
            dropped[(CLASSES[prio], "capacity")] = _drop_oldest(outbox, prio, over_rows, over_bytes, counts, touched)
    new_rows, new_bytes = sum(add_rows), sum(add_bytes)
    total_rows = sum(counts[f"class:{c}"][0] for c in CLASSES)
    total_bytes = sum(counts[f"class:{c}"][1] for c in CLASSES)
    over_rows = total_rows + new_rows - policy.max_rows
    over_bytes = total_bytes + new_bytes - policy.max_bytes
    if over_rows > 0 or over_bytes > 0:
        if reject or new_rows > policy.max_rows or new_bytes > policy.max_bytes:
            raise OutboxFull(f"outbox is full ({total_rows} records, {total_bytes} bytes)")
        for prio in _DROP_ORDER:
            if over_rows <= 0 and over_bytes <= 0:
                break
            before = list(counts[f"class:{CLASSES[prio]}"])
            n = _drop_oldest(outbox, prio, over_rows, over_bytes, counts, touched)
            if n:
                key = (CLASSES[prio], "capacity")
                dropped[key] = dropped.get(key, 0) + n
                over_rows -= n
                over_bytes -= before[1] - counts[f"class:{CLASSES[prio]}"][1]
    return dropped


def _drop_oldest(outbox: Outbox, prio: int, rows: int, nbytes: int, counts: dict, touched: set[str]) -> int:
    conn = outbox.db.connection()
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
    outbox.tally.forget(victims, counts, touched)
    return len(victims)


def expire(outbox: Outbox, now: float, counts: dict[str, list[int]], touched: set[str]) -> dict[tuple[str, str], int]:
    """Drop records older than their class's TTL (EXPIRE_STEP per class per call)."""
    conn = outbox.db.connection()
    dropped: dict[tuple[str, str], int] = {}
    for prio in range(len(CLASSES)):
        ttl = outbox.policy.limits(prio).ttl_s
        if ttl <= 0:
            continue
        victims = conn.execute(
            "SELECT id, prio, size, pending FROM core_outbox WHERE prio = ? AND created < ?"
            f" AND id IN (SELECT id FROM core_outbox WHERE prio = ? ORDER BY id LIMIT {EXPIRE_STEP})",
            (prio, now - ttl, prio),
        ).fetchall()
        if victims:
            conn.executemany("DELETE FROM core_outbox WHERE id = ?", [(v[0],) for v in victims])
            outbox.tally.forget(victims, counts, touched)
            dropped[(CLASSES[prio], "ttl")] = len(victims)
    return dropped
