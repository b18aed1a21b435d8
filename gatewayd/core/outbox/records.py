"""Outbox rows as values: a stored record, an open batch, and their wire form.

A record is serialised once, at ingest (`core_outbox.data` holds its `data` as
compact JSON). Sending splices that text into the protocol's record object
(`serialize_records`), so the drain never decodes and re-encodes what it forwards;
the bytes are exactly what `json.dumps` of the record's dict gives
(tests/test_outbox.py checks both paths against each other).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ...protocol.batch import CLASS_PRIORITY, CLASSES, SerializedRecords, rfc3339_utc

__all__ = ["StoredRecord", "OpenBatch", "CLASS_ORDER", "COLUMNS", "RECORD_OVERHEAD", "serialize_records",
           "wire_records"]

#: Classes whose backlog goes newest first (the cloud sees the current picture first).
NEWEST_FIRST = frozenset({CLASS_PRIORITY["state"], CLASS_PRIORITY["history"]})
#: (prio, newest_first) in sending order.
CLASS_ORDER = tuple((p, p in NEWEST_FIRST) for p in range(len(CLASSES)))
#: The columns of a StoredRecord, in its order.
COLUMNS = "id, prio, created, ts, family, device, kind, size, data"
#: What a record adds to a batch besides its data: ids, names, ts, class, JSON syntax.
RECORD_OVERHEAD = 96

# json.dumps(s, ensure_ascii=False) for a str: the encoder the envelope used to go through.
_quote = json.encoder.encode_basestring
_CLASS_PART = tuple(f'","class":"{c}","data":' for c in CLASSES)


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


@dataclass
class OpenBatch:
    """A batch chosen for one sink: its Idempotency-Key and records, in sending order.

    `records` are plain tuples in the StoredRecord layout; `wire_records(records)`
    gives them as the protocol's dicts.
    """

    sink: str
    batch_id: str
    records: list[tuple]

    @property
    def ids(self) -> list[int]:
        return [r[0] for r in self.records]

    @cached_property
    def spans(self) -> dict[int, tuple[int, int]]:
        """Per class, the lowest and highest record id: what later batches skip while
        this one is open (a conservative hull: a record re-queued inside it just waits
        for this batch to be settled). A loop over every record, computed once: the
        outbox computes it in the reader thread that chose the records."""
        out: dict[int, tuple[int, int]] = {}
        for r in self.records:
            span = out.get(r[1])
            out[r[1]] = (r[0], r[0]) if span is None else (min(span[0], r[0]), max(span[1], r[0]))
        return out


class _Stamps(dict):
    """Epoch seconds -> the protocol's text, formatting each distinct second once."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[float, str] = {}

    def __missing__(self, ts: float) -> str:
        # The same rounding as datetime.fromtimestamp (so the same text as rfc3339_utc).
        frac, whole = math.modf(ts)
        micros = round(frac * 1e6)
        if micros >= 1_000_000:
            whole, micros = whole + 1, micros - 1_000_000
        prefix = self.seconds.get(whole)
        if prefix is None:
            prefix = self.seconds[whole] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        text = self[ts] = f"{prefix}.{micros // 1000:03d}Z"
        return text


def wire_records(records: Iterable[tuple]) -> list[dict[str, Any]]:
    """`[StoredRecord(r).wire() for r in records]`, formatting each distinct second only once."""
    stamps = _Stamps()
    return [StoredRecord.wire(r, stamps[r[3]]) for r in records]


def serialize_records(records: Sequence[tuple]) -> SerializedRecords:
    """The `records` array of a batch, spliced from the stored JSON (no decoding).

    Byte for byte what `encode_batch(wire_records(records), ...)` writes for them.
    """
    stamps = _Stamps()
    heads: dict[tuple[str, str, str], str] = {}
    parts = []
    for rid, prio, _, ts, family, device, kind, _, data in records:
        head = heads.get((family, device, kind))
        if head is None:
            head = heads[(family, device, kind)] = (
                f',"family":{_quote(family)},"device":{_quote(device)},"kind":{_quote(kind)},"ts":"')
        parts.append(f'{{"id":{rid}{head}{stamps[ts]}{_CLASS_PART[prio]}{data}}}')
    return SerializedRecords(("[" + ",".join(parts) + "]").encode("utf-8"), len(parts))
