"""The common batch, decoded at C speed. Pure.

Most batches are thousands of well-formed points and a few other records. msgspec
decodes the points straight into typed, constrained Structs (about 10x faster than the
strict parser and then `batch.parse_batch`'s per-record checks); the other keys stay
raw fragments, read by the strict parser and checked by `parse_batch` as always.
Anything the fast path is not sure of (a bad or unusual point, a nested meta, a time
given as text, odd JSON) makes it give up, and the batch takes the full path: the
answer is the same either way (tests/test_sentinel_pure.py checks it with hypothesis).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from gatewayd.plugins.api import MAX_JSON_DEPTH, TS_MAX, TS_MIN, parse_json

from .batch import KINDS, MAX_META_CHARS, NAME, TOP_LEVEL, Batch, BatchError, open_body, parse_batch

Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Finite = Annotated[float, Meta(ge=-1.7976931348623157e308, le=1.7976931348623157e308)]


class FastPoint(Struct, forbid_unknown_fields=True, gc=False):
    ts: Annotated[float, Meta(ge=TS_MIN, le=TS_MAX)]
    metric: Annotated[str, Meta(pattern=f"^{NAME.pattern}\\Z")]  # \Z: "$" would let a final newline in
    value: Int64 | Finite
    unit: Annotated[str, Meta(max_length=16)] = ""
    meta: dict[str, str | Int64 | Finite | bool | None] | None = None


class FastBatch(Struct, forbid_unknown_fields=True):
    points: list[FastPoint] = []
    device_id: msgspec.Raw = msgspec.Raw()  # empty: absent
    batch_id: msgspec.Raw = msgspec.Raw()  # empty: absent
    sent_at: msgspec.Raw = msgspec.Raw()  # empty: absent
    restamp: msgspec.Raw = msgspec.Raw()  # empty: absent
    diagnostics: msgspec.Raw = msgspec.Raw()  # empty: absent
    windows: msgspec.Raw = msgspec.Raw()  # empty: absent
    waveforms: msgspec.Raw = msgspec.Raw()  # empty: absent
    door_events: msgspec.Raw = msgspec.Raw()  # empty: absent
    system_events: msgspec.Raw = msgspec.Raw()  # empty: absent


assert set(FastBatch.__struct_fields__) == TOP_LEVEL and set(KINDS) <= TOP_LEVEL
_DECODER = msgspec.json.Decoder(FastBatch)
_META = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class GiveUp(Exception):
    """Not the common case: take the full path."""


def fast_batch(raw: bytes, *, device_id: str, idempotency_key: str, max_records: int, max_samples: int) -> Batch:
    """The batch, as `parse_batch(parse_json(raw), ...)` would give it, or GiveUp."""
    try:
        fast = _DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeError):
        raise GiveUp from None
    rest: dict[str, Any] = {}
    for key in TOP_LEVEL - {"points"}:
        fragment = getattr(fast, key)
        if len(fragment):
            try:
                rest[key] = parse_json(bytes(fragment), max_depth=MAX_JSON_DEPTH - 1)
            except Exception:  # noqa: BLE001 - the full path says what is wrong, precisely
                raise GiveUp from None
    if rest.get("restamp") is True:
        raise GiveUp  # rare; the full path checks each ts where re-stamping puts it
    points = fast.points
    others = sum(len(v) for k, v in rest.items() if k in KINDS and isinstance(v, list))
    if len(points) + others > max_records:
        raise GiveUp  # the full path words the refusal
    batch = parse_batch(rest, device_id=device_id, idempotency_key=idempotency_key, max_records=max_records,
                        max_samples=max_samples)
    append, blake, encode = batch.points.append, hashlib.blake2b, _META.encode
    for p in points:
        value = float(p.value)
        meta_text = None
        if p.meta is not None:
            meta_text = encode(p.meta)
            if len(meta_text) > MAX_META_CHARS:
                raise GiveUp
        text = f"p\n{p.ts!r}\n{p.metric}\n{value!r}\n{p.unit}\n{meta_text or ''}".encode("utf-8", "surrogatepass")
        append((p.ts, p.metric, value, p.unit, meta_text, p.meta,
                int.from_bytes(blake(text, digest_size=8).digest(), "big", signed=True)))
    batch.total += len(points)
    return batch


def read_batch(raw: bytes, *, device_id: str, idempotency_key: str, max_records: int, max_samples: int,
               received: float | None = None) -> Batch:
    """The fast path, else the full one (BatchError for a batch refused as a whole);
    `received` as `parse_batch` takes it."""
    try:
        return fast_batch(raw, device_id=device_id, idempotency_key=idempotency_key, max_records=max_records,
                          max_samples=max_samples)
    except (GiveUp, BatchError):
        pass
    return parse_batch(open_body(raw), device_id=device_id, idempotency_key=idempotency_key,
                       max_records=max_records, max_samples=max_samples, received=received)
