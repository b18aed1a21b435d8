"""A telemetry batch as a node sends it, decoded and checked. Pure: no I/O, no clock.

`idempotency_key`, `content_sha256` and `encoding_of` check the headers (the route
inflates the body with the core's `read_body(max_inflated=...)`, `refused_encoding`
words its refusals); `open_body` parses it strictly; `parse_batch` checks the JSON document (README.md, "The batch") and
splits it into valid records per kind and rejections. Errors that refuse the whole
batch raise `BatchError(status, code, message)`; a bad record only rejects itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from gatewayd.plugins.api import TS_MAX, TS_MIN, BadJSON, EncodingError, json_kind, parse_json, parse_time

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
HEX64 = re.compile(r"[0-9a-f]{64}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,127}")
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"

KINDS = ("points", "windows", "waveforms", "door_events", "system_events")
DOOR_EVENTS = ("cycle_open", "cycle_close", "over_torque", "vibration_alert")
SEVERITIES = ("info", "warning", "critical")
TOP_LEVEL = frozenset({"device_id", "batch_id", "sent_at", "restamp", "diagnostics", *KINDS})
DIAGNOSTICS = {"retry_count": int, "buffered_records": int, "uptime_s": float, "sd_ok": bool, "firmware": str}
MAX_META_CHARS = 4096
MAX_REJECTIONS_LISTED = 100


class BatchError(Exception):
    """The whole batch is refused: answer `status` with `code` and `message`; nothing stored."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# -- headers and body --------------------------------------------------------------------


def idempotency_key(value: str | None) -> str:
    """The `Idempotency-Key` header: a UUIDv4 (any case; answered in lower case)."""
    if not value:
        raise BatchError(400, "missing_header", "missing Idempotency-Key header (a UUIDv4 per batch)")
    key = value.strip().lower()
    if not UUID4.fullmatch(key):
        raise BatchError(400, "invalid_header", f"Idempotency-Key: expected a UUIDv4, got {value[:60]!r}")
    return key


def content_sha256(value: str | None, body: bytes) -> str:
    """The `Content-SHA256` header: the hex SHA-256 of the body as sent; checked against it."""
    if not value:
        raise BatchError(400, "missing_header", "missing Content-SHA256 header (hex SHA-256 of the body as sent)")
    claimed = value.strip().lower()
    if not HEX64.fullmatch(claimed):
        raise BatchError(400, "invalid_header", f"Content-SHA256: expected 64 hex digits, got {value[:80]!r}")
    actual = hashlib.sha256(body).hexdigest()
    if actual != claimed:
        raise BatchError(400, "sha256_mismatch", f"Content-SHA256 does not match the body: the body's is {actual} "
                                                 f"({len(body)} bytes received); corrupted or truncated on the way")
    return actual


def encoding_of(header: str | None, body: bytes) -> str:
    """`gzip`, `zstd` or `identity`, as `Content-Encoding` says. A compressed body sent
    without the header is refused with a precise 400 (README.md, "The batch"): the
    gateway does not guess, as a proxy in between would not either."""
    named = (header or "").strip().lower() or "identity"
    if named not in ("gzip", "zstd", "identity"):
        raise BatchError(415, "unsupported_encoding", f"Content-Encoding: expected gzip or zstd, got {named[:40]!r}")
    sniffed = "gzip" if body[:2] == GZIP_MAGIC else "zstd" if body[:4] == ZSTD_MAGIC else "identity"
    if named == "identity" and sniffed != "identity":
        raise BatchError(400, "missing_header", f"the body is {sniffed} data but no Content-Encoding: {sniffed} "
                                                "header came with it")
    if named != "identity" and sniffed != named and body:
        raise BatchError(400, "corrupt_body", f"Content-Encoding says {named} but the body does not start like "
                                              f"{named} data")
    return named


def refused_encoding(e: EncodingError, encoding: str, limit: int) -> BatchError:
    """The core's inflate refusal in the spec's codes: a bomb is a 400 too (the spec has no 413)."""
    if e.code == "too_large":
        return BatchError(400, "too_large", f"the {encoding} body decompresses to more than {limit} bytes "
                                            "(max_decompressed_bytes): send smaller batches")
    return BatchError(400 if e.status == 413 else e.status, e.code, e.message)


def open_body(raw: bytes) -> Any:
    """The inflated body, parsed strictly (CPU work: call it off the trio thread)."""
    try:
        return parse_json(raw)
    except BadJSON as e:
        raise BatchError(400, "bad_json", str(e)) from None


# -- the document --------------------------------------------------------------------------


@dataclass
class Rejection:
    kind: str
    index: int
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "reason": self.reason}


@dataclass
class Batch:
    """A checked batch: valid records per kind (each ends with its record hash)."""

    batch_id: str
    sent_at: float | None
    restamp: bool
    diagnostics: dict[str, Any]
    points: list[tuple[float, str, float, str, str | None, dict[str, Any] | None, int]] = field(default_factory=list)
    """(ts, metric, value, unit, meta as JSON or None, meta, hash)"""
    windows: list[tuple[float, str, dict[str, Any], float | None, int]] = field(default_factory=list)
    """(ts, metric, stats, window_s, hash)"""
    waveforms: list[tuple[float, str, float, list[float], str, int]] = field(default_factory=list)
    """(ts, metric, rate_hz, samples, unit, hash)"""
    door_events: list[tuple[float, str, str, dict[str, Any], int]] = field(default_factory=list)
    """(ts, door_id, type, the rest: value, unit, duration_ms, meta; hash)"""
    system_events: list[tuple[float, str, str, str, float | None, bool | None, dict[str, Any], int]] = field(
        default_factory=list)
    """(ts, event_type, severity, description, duration_s, resolved, meta, hash)"""
    rejections: list[Rejection] = field(default_factory=list)
    total: int = 0
    ts_bounds: tuple[float, float] = (TS_MIN, TS_MAX)
    """The `ts` a record may carry as sent: 2000-2200 once re-stamped (`parse_batch`'s `received`)"""

    @property
    def valid(self) -> int:
        return self.total - len(self.rejections)

    def shift(self, offset: float) -> None:
        """Server re-stamping: every record's ts moved by `offset` (hashes stay: they are of what was sent)."""
        self.points = [(ts + offset, *rest) for ts, *rest in self.points]  # type: ignore[misc]
        self.windows = [(ts + offset, *rest) for ts, *rest in self.windows]  # type: ignore[misc]
        self.waveforms = [(ts + offset, *rest) for ts, *rest in self.waveforms]  # type: ignore[misc]
        self.door_events = [(ts + offset, *rest) for ts, *rest in self.door_events]  # type: ignore[misc]
        self.system_events = [(ts + offset, *rest) for ts, *rest in self.system_events]  # type: ignore[misc]


class _Bad(Exception):
    """One record refused: the reason."""


def parse_batch(doc: Any, *, device_id: str, idempotency_key: str, max_records: int, max_samples: int,
                received: float | None = None) -> Batch:
    """Check the document; BatchError for what refuses the whole batch, a Rejection per bad record.

    With `restamp` and `received` (the gateway's clock when the batch came), a record's
    `ts` is checked where `shift(received - sent_at)` will put it, so a node whose clock
    was reset (to 1970: its RTC lost power) is re-stamped rather than refused."""
    if not isinstance(doc, dict):
        raise BatchError(400, "bad_batch", f"body: expected a JSON object with points, windows, waveforms, "
                                           f"door_events, system_events; got {json_kind(doc)}")
    unknown = sorted(set(doc) - TOP_LEVEL)
    if unknown:
        raise BatchError(400, "bad_batch", f"unknown field {unknown[0][:40]!r} (known: {', '.join(sorted(TOP_LEVEL))})")
    if "device_id" in doc and doc["device_id"] != device_id:
        raise BatchError(400, "bad_batch", f"device_id {str(doc['device_id'])[:130]!r} is not the X-Device-Id "
                                           f"header's {device_id!r}")
    batch_id = doc.get("batch_id", idempotency_key)
    if not isinstance(batch_id, str) or not BATCH_ID.fullmatch(batch_id):
        raise BatchError(400, "bad_batch", f"batch_id: expected 1-128 of letters, digits and _ . : / @ -, "
                                           f"got {str(batch_id)[:140]!r}")
    restamp = doc.get("restamp", False)
    if not isinstance(restamp, bool):
        raise BatchError(400, "bad_batch", f"restamp: expected true or false, got {json_kind(restamp)}")
    # The clock of a node asking for re-stamping may say anything from 1970 on.
    sent_at = _time_or_none(doc.get("sent_at"), "sent_at", (0.0, TS_MAX) if restamp else (TS_MIN, TS_MAX))
    if restamp and sent_at is None:
        raise BatchError(400, "bad_batch", "restamp needs sent_at: the node's clock when it sent the batch")
    batch = Batch(batch_id, sent_at, restamp, _diagnostics(doc.get("diagnostics")))
    if restamp and sent_at is not None and received is not None:
        offset = received - sent_at
        batch.ts_bounds = (TS_MIN - offset, TS_MAX - offset)
    bounds = batch.ts_bounds
    arrays = {}
    for kind in KINDS:
        items = doc.get(kind, [])
        if not isinstance(items, list):
            raise BatchError(400, "bad_batch", f"{kind}: expected an array, got {json_kind(items)}")
        arrays[kind] = items
        batch.total += len(items)
    if batch.total > max_records:
        raise BatchError(400, "too_many_records", f"{batch.total} records in one batch; at most {max_records} "
                                                  "(max_records): send smaller batches")
    _points(arrays["points"], batch)
    for i, item in enumerate(arrays["windows"]):
        try:
            batch.windows.append(_window(item, bounds))
        except _Bad as e:
            batch.rejections.append(Rejection("windows", i, str(e)))
    for i, item in enumerate(arrays["door_events"]):
        try:
            batch.door_events.append(_door_event(item, bounds))
        except _Bad as e:
            batch.rejections.append(Rejection("door_events", i, str(e)))
    for i, item in enumerate(arrays["system_events"]):
        try:
            batch.system_events.append(_system_event(item, bounds))
        except _Bad as e:
            batch.rejections.append(Rejection("system_events", i, str(e)))
    for i, item in enumerate(arrays["waveforms"]):
        try:
            batch.waveforms.append(_waveform(item, max_samples, bounds))
        except _Bad as e:
            batch.rejections.append(Rejection("waveforms", i, str(e)))
    return batch


def record_hash(kind: str, item: dict[str, Any]) -> int:
    """The record's hash (signed 64 bits of BLAKE2b over its canonical JSON): the same record
    sent again, in any key order, has the same hash."""
    text = json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.blake2b(f"{kind}\n{text}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# -- one record per kind -------------------------------------------------------------------


_POINT_KEYS = frozenset({"ts", "metric", "value", "unit", "meta"})


def _points(items: list[Any], batch: Batch) -> None:
    # The hot loop of a batch (thousands of points): the common case checked inline.
    append, reject = batch.points.append, batch.rejections.append
    bounds = batch.ts_bounds
    blake, dumps = hashlib.blake2b, json.dumps
    for i, item in enumerate(items):
        try:
            if type(item) is not dict:
                raise _Bad(f"expected an object, got {json_kind(item)}")
            if not item.keys() <= _POINT_KEYS:
                raise _Bad(f"unknown field {sorted(item.keys() - _POINT_KEYS)[0][:40]!r} "
                           f"(a point has {', '.join(sorted(_POINT_KEYS))})")
            ts, metric, value = _ts(item.get("ts"), bounds), item.get("metric"), item.get("value")
            if type(metric) is not str or not NAME.fullmatch(metric):
                raise _Bad(f"metric: expected 1-64 of letters, digits and _ . : -, got {_show(metric)}")
            if type(value) is not float and type(value) is not int:
                raise _Bad(f"value: expected a number, got {_show(value)}")
            unit = item.get("unit", "")
            if type(unit) is not str or len(unit) > 16:
                raise _Bad(f"unit: expected a string of at most 16 characters, got {_show(unit)}")
            meta = item.get("meta")
            meta_text = None
            if meta is not None:
                if type(meta) is not dict:
                    raise _Bad(f"meta: expected an object, got {json_kind(meta)}")
                meta_text = dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                if len(meta_text) > MAX_META_CHARS:
                    raise _Bad(f"meta: at most {MAX_META_CHARS} characters as JSON, got {len(meta_text)}")
        except _Bad as e:
            reject(Rejection("points", i, str(e)))
            continue
        value = float(value)
        key = f"p\n{ts!r}\n{metric}\n{value!r}\n{unit}\n{meta_text or ''}".encode("utf-8", "surrogatepass")
        append((ts, metric, value, unit, meta_text, meta,
                int.from_bytes(blake(key, digest_size=8).digest(), "big", signed=True)))


def _window(item: Any, bounds: tuple[float, float]) -> tuple[float, str, dict[str, Any], float | None, int]:
    doc = _object(item, {"ts", "metric", "stats", "window_s"})
    ts, metric = _ts(doc.get("ts"), bounds), _name(doc.get("metric"), "metric")
    stats = doc.get("stats")
    if not isinstance(stats, dict) or not stats:
        raise _Bad(f"stats: expected an object such as {{\"rms\": 0.4, \"max\": 1.2}}, got {_show(stats)}")
    for key, value in stats.items():
        if key == "bandpower":
            if not isinstance(value, dict) or not all(_number(v) for v in value.values()):
                raise _Bad("stats.bandpower: expected an object of band name to number")
        elif not _number(value):
            raise _Bad(f"stats.{key[:40]}: expected a number, got {_show(value)}")
    window_s = doc.get("window_s")
    if window_s is not None and not (_number(window_s) and window_s > 0):
        raise _Bad(f"window_s: expected a number > 0, got {_show(window_s)}")
    return ts, metric, stats, None if window_s is None else float(window_s), record_hash("w", doc)


def _waveform(item: Any, max_samples: int, bounds: tuple[float, float]
              ) -> tuple[float, str, float, list[float], str, int]:
    doc = _object(item, {"ts", "metric", "rate_hz", "samples", "unit"})
    ts, metric = _ts(doc.get("ts"), bounds), _name(doc.get("metric"), "metric")
    rate = doc.get("rate_hz")
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate <= 1_000_000:
        raise _Bad(f"rate_hz: expected a sampling rate > 0 and at most 1000000, got {_show(rate)}")
    samples = doc.get("samples")
    if not isinstance(samples, list) or not 16 <= len(samples) <= max_samples:
        n = len(samples) if isinstance(samples, list) else json_kind(samples)
        raise _Bad(f"samples: expected an array of 16 to {max_samples} numbers, got {n}")
    if not all(type(s) is float or type(s) is int for s in samples):
        raise _Bad("samples: every sample must be a number")
    unit = doc.get("unit", "")
    if not isinstance(unit, str) or len(unit) > 16:
        raise _Bad(f"unit: expected a string of at most 16 characters, got {_show(unit)}")
    return ts, metric, float(rate), samples, unit, record_hash("r", doc)


def _door_event(item: Any, bounds: tuple[float, float]) -> tuple[float, str, str, dict[str, Any], int]:
    doc = _object(item, {"ts", "door_id", "type", "value", "unit", "duration_ms", "meta"})
    ts = _ts(doc.get("ts"), bounds)
    door = doc.get("door_id", "")
    if not isinstance(door, str) or (door and not NAME.fullmatch(door)):
        raise _Bad(f"door_id: expected 1-64 of letters, digits and _ . : -, got {_show(door)}")
    kind = doc.get("type")
    if kind not in DOOR_EVENTS:
        raise _Bad(f"type: expected one of {', '.join(DOOR_EVENTS)}, got {_show(kind)}")
    rest: dict[str, Any] = {k: doc[k] for k in ("value", "unit", "duration_ms", "meta") if k in doc}
    for key in ("value", "duration_ms"):
        if key in rest and not _number(rest[key]):
            raise _Bad(f"{key}: expected a number, got {_show(rest[key])}")
    if "unit" in rest and (not isinstance(rest["unit"], str) or len(rest["unit"]) > 16):
        raise _Bad(f"unit: expected a string of at most 16 characters, got {_show(rest['unit'])}")
    if "meta" in rest and not isinstance(rest["meta"], dict):
        raise _Bad(f"meta: expected an object, got {json_kind(rest['meta'])}")
    return ts, door, str(kind), rest, record_hash("d", doc)


def _system_event(item: Any, bounds: tuple[float, float]
                  ) -> tuple[float, str, str, str, float | None, bool | None, dict[str, Any], int]:
    doc = _object(item, {"ts", "event_type", "severity", "description", "duration", "resolved", "meta"})
    ts, event_type = _ts(doc.get("ts"), bounds), _name(doc.get("event_type"), "event_type")
    severity = doc.get("severity", "info")
    if severity not in SEVERITIES:
        raise _Bad(f"severity: expected info, warning or critical, got {_show(severity)}")
    description = doc.get("description", "")
    if not isinstance(description, str) or len(description) > 1024:
        raise _Bad(f"description: expected a string of at most 1024 characters, got {_show(description)}")
    duration = doc.get("duration")
    if duration is not None and not (_number(duration) and duration >= 0):
        raise _Bad(f"duration: expected seconds >= 0, got {_show(duration)}")
    resolved = doc.get("resolved")
    if resolved is not None and not isinstance(resolved, bool):
        raise _Bad(f"resolved: expected true, false or null, got {_show(resolved)}")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict) or len(json.dumps(meta)) > MAX_META_CHARS:
        raise _Bad(f"meta: expected an object of at most {MAX_META_CHARS} characters as JSON")
    return (ts, event_type, str(severity), description, None if duration is None else float(duration), resolved,
            meta, record_hash("s", doc))


# -- pieces ------------------------------------------------------------------------------------


def _object(item: Any, known: set[str]) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise _Bad(f"expected an object, got {json_kind(item)}")
    extra = sorted(set(item) - known)
    if extra:
        raise _Bad(f"unknown field {extra[0][:40]!r} (known: {', '.join(sorted(known))})")
    return item


def _ts(value: Any, bounds: tuple[float, float] = (TS_MIN, TS_MAX)) -> float:
    """Epoch seconds (a number) or an ISO 8601 / RFC 3339 time, between 2000 and 2200
    (`bounds`: as sent, for a time re-stamped later)."""
    if type(value) is float or type(value) is int:
        ts = float(value)
    elif isinstance(value, str):
        try:
            ts = parse_time(value)
        except ValueError as e:
            raise _Bad(f"ts: {e}") from None
    else:
        raise _Bad(f"ts: expected epoch seconds or an ISO 8601 time, got {_show(value)}")
    if not bounds[0] <= ts <= bounds[1]:
        shifted = "" if bounds == (TS_MIN, TS_MAX) else " once re-stamped"
        raise _Bad(f"ts: {value!r} is not a time between 2000 and 2200{shifted} in epoch seconds (milliseconds?)")
    return ts


def _time_or_none(value: Any, key: str, bounds: tuple[float, float]) -> float | None:
    if value is None:
        return None
    try:
        return _ts(value, bounds)
    except _Bad as e:
        raise BatchError(400, "bad_batch", f"{key}{str(e)[2:]}") from None


def _name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise _Bad(f"{key}: expected 1-64 of letters, digits and _ . : -, got {_show(value)}")
    return value


def _number(value: Any) -> bool:
    return type(value) is float or type(value) is int


def _diagnostics(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BatchError(400, "bad_batch", f"diagnostics: expected an object, got {json_kind(value)}")
    out: dict[str, Any] = {}
    for key, kind in DIAGNOSTICS.items():
        if key not in value:
            continue
        item = value[key]
        ok = (isinstance(item, int) and not isinstance(item, bool) and item >= 0) if kind is int else \
            _number(item) if kind is float else isinstance(item, kind)
        if not ok or (isinstance(item, str) and len(item) > 64):
            raise BatchError(400, "bad_batch", f"diagnostics.{key}: expected {kind.__name__}, got {_show(item)}")
        out[key] = item
    unknown = sorted(set(value) - set(DIAGNOSTICS))
    if unknown:
        raise BatchError(400, "bad_batch", f"diagnostics: unknown field {unknown[0][:40]!r} "
                                           f"(known: {', '.join(DIAGNOSTICS)})")
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({json_kind(value)})"
