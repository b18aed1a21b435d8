"""The upstream batch protocol, sans-I/O.

Pure functions over bytes and header mappings: the HTTP sink, the MQTT sink and the
reference receiver all speak through these, and tests drive them without sockets.
The wire format is specified for cloud teams in ``docs/upstream-protocol.md``; keep
the two in step.

- :func:`encode_batch` builds the body and headers of one batch (sender side).
- :func:`decode_batch` verifies and opens one (receiver side), raising
  :class:`ProtocolError` with the HTTP status to answer.
- :func:`~gatewayd.protocol.retry.parse_response` (in ``retry``) tells the sender
  what to do with the receiver's answer.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import zstandard

from .encoding import EncodingError, inflate
from .json_encoders import json_encoder

__all__ = [
    "CLASSES",
    "CLASS_PRIORITY",
    "DecodedBatch",
    "EncodedBatch",
    "ProtocolError",
    "Rejection",
    "SerializedRecords",
    "compact_json_encoder",
    "decode_batch",
    "encode_batch",
    "mqtt_topic",
    "mqtt_user_properties",
    "rfc3339_utc",
    "sign",
    "validate_record",
]

Compression = Literal["zstd", "gzip", "identity"]

#: Record classes in upstream priority order (streetlight spec, section 7).
CLASSES: tuple[str, ...] = ("command_ack", "alert", "state", "history", "log")
#: Lower sends first.
CLASS_PRIORITY: dict[str, int] = {name: rank for rank, name in enumerate(CLASSES)}

DEFAULT_MAX_DECOMPRESSED_BYTES = 64 * 1024 * 1024

_GATEWAY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_RFC3339_UTC = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d{1,9})?Z")
_REQUIRED = ("id", "family", "device", "kind", "ts", "class", "data")


class ProtocolError(Exception):
    """A batch the receiver must refuse: ``status`` is the HTTP status to answer,
    ``code`` a stable machine-readable reason, ``message`` the human one."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class EncodedBatch:
    """One batch ready to send: ``body`` exactly as it goes on the wire."""

    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class SerializedRecords:
    """Records already serialised, for :func:`encode_batch` to splice in as they are.

    ``json`` is the ``records`` array exactly as it goes on the wire: compact UTF-8
    JSON (no insignificant whitespace, no NaN/Infinity), ``[{"id":..., ...}, ...]``.
    The encoder does not re-check it: whoever builds it vouches for it (the outbox
    builds it from record JSON it serialised itself at ingest). ``count`` is the number
    of records in it.
    """

    json: bytes
    count: int


@dataclass(frozen=True)
class Rejection:
    """A record refused by the receiver; ``id`` is None when it had no usable id."""

    index: int
    id: int | str | None
    reason: str


@dataclass(frozen=True)
class DecodedBatch:
    """A verified batch: the valid ``records`` plus the ``rejected`` ones."""

    gateway_id: str
    batch_id: str
    sent_at: str
    timestamp: int
    records: list[dict[str, Any]]
    rejected: list[Rejection] = field(default_factory=list)


def rfc3339_utc(epoch_s: float) -> str:
    """Epoch seconds -> ``2026-01-01T00:00:00.000Z`` (the protocol's time format)."""
    moment = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``X-Gateway-Signature`` value: HMAC-SHA256 over ``timestamp + "." + body``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def encode_batch(
    records: Iterable[Mapping[str, Any]] | SerializedRecords,
    *,
    gateway_id: str,
    batch_id: str,
    secret: bytes,
    compression: Compression = "zstd",
    now: float,
) -> EncodedBatch:
    """Encode, compress and sign one batch.

    ``batch_id`` is the Idempotency-Key: a UUIDv4 chosen once per batch and reused on
    every retry of it. ``now`` (epoch seconds) stamps ``sent_at`` and the signature
    timestamp, so call this again for each attempt: the body bytes may then differ
    but the Idempotency-Key does not. Records are sent as given and in order;
    the receiver, not the encoder, validates their fields.

    ``records`` may also be :class:`SerializedRecords`: the array is then spliced into
    the envelope as it is, byte for byte what encoding the same records as mappings
    gives, without decoding and re-encoding them (the sync worker's path).
    """
    if not _GATEWAY_ID.fullmatch(gateway_id):
        raise ValueError(f"invalid gateway id {gateway_id!r}")
    if not _is_uuid4(batch_id):
        raise ValueError(f"batch id must be a canonical UUIDv4, got {batch_id!r}")
    if isinstance(records, SerializedRecords):
        # The three strings need no JSON escaping: the gateway id is [A-Za-z0-9._-],
        # the batch id a canonical UUID and sent_at digits and punctuation, so this is
        # exactly what json.dumps writes for the same envelope.
        raw = b"".join((
            b'{"gateway_id":"', gateway_id.encode("ascii"), b'","batch_id":"', batch_id.encode("ascii"),
            b'","sent_at":"', rfc3339_utc(now).encode("ascii"), b'","records":', records.json, b"}",
        ))
    else:
        envelope = {
            "gateway_id": gateway_id,
            "batch_id": batch_id,
            "sent_at": rfc3339_utc(now),
            "records": [dict(record) for record in records],
        }
        raw = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    body = _compress(raw, compression)
    timestamp = str(int(now))
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": batch_id,
        "Content-SHA256": hashlib.sha256(body).hexdigest(),
        "X-Gateway-Id": gateway_id,
        "X-Gateway-Timestamp": timestamp,
        "X-Gateway-Signature": sign(secret, timestamp, body),
    }
    # RFC 9110 reserves "identity" for Accept-Encoding: an unencoded body has no header.
    if compression != "identity":
        headers["Content-Encoding"] = compression
    return EncodedBatch(body=body, headers=headers)


def decode_batch(
    body: bytes,
    headers: Mapping[str, str],
    *,
    secret_for: Callable[[str], bytes | None],
    now: float,
    max_skew_s: float = 300,
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
) -> DecodedBatch:
    """Verify and open one batch, in the order the protocol document gives.

    Header names are matched case-insensitively. Cheap checks run before expensive
    ones and authentication before decompression, so an unauthenticated sender can
    never make the receiver inflate anything. Invalid records do not fail the batch:
    they come back in ``DecodedBatch.rejected``. Raises :class:`ProtocolError`.
    """
    h = {name.lower(): value.strip() for name, value in headers.items()}
    gateway_id = _header(h, "x-gateway-id")
    timestamp = _header(h, "x-gateway-timestamp")
    signature = _header(h, "x-gateway-signature").lower()
    batch_id = _header(h, "idempotency-key").lower()
    digest = _header(h, "content-sha256").lower()
    content_type = _header(h, "content-type").split(";")[0].strip().lower()
    encoding = h.get("content-encoding", "identity").lower() or "identity"

    if not _GATEWAY_ID.fullmatch(gateway_id):
        raise ProtocolError(400, "invalid_header", "X-Gateway-Id is not a valid gateway id")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise ProtocolError(400, "invalid_header", "X-Gateway-Timestamp must be Unix seconds")
    if not (signature.startswith("sha256=") and _HEX64.fullmatch(signature[7:])):
        raise ProtocolError(400, "invalid_header", "X-Gateway-Signature must be sha256=<hex>")
    if not _is_uuid4(batch_id):
        raise ProtocolError(400, "invalid_header", "Idempotency-Key must be a UUIDv4")
    if not _HEX64.fullmatch(digest):
        raise ProtocolError(400, "invalid_header", "Content-SHA256 must be 64 hex digits")
    if content_type != "application/json":
        raise ProtocolError(415, "unsupported_media_type", "Content-Type must be application/json")
    if encoding not in ("zstd", "gzip", "identity"):
        raise ProtocolError(
            415, "unsupported_encoding", f"unsupported Content-Encoding {encoding!r}"
        )

    if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), digest):
        raise ProtocolError(400, "sha256_mismatch", "Content-SHA256 does not match the body")
    secret = secret_for(gateway_id)
    if secret is None:
        raise ProtocolError(401, "unknown_gateway", "unknown gateway id")
    if not hmac.compare_digest(sign(secret, timestamp, body), signature):
        raise ProtocolError(401, "bad_signature", "signature does not verify")
    if abs(now - int(timestamp)) > max_skew_s:
        raise ProtocolError(
            401,
            "stale_timestamp",
            f"X-Gateway-Timestamp is more than {max_skew_s:g} s from server time",
        )

    raw = _decompress(body, encoding, max_decompressed_bytes)
    envelope = _parse_envelope(raw)
    if envelope["gateway_id"] != gateway_id:
        raise ProtocolError(400, "header_mismatch", "envelope gateway_id differs from X-Gateway-Id")
    if envelope["batch_id"].lower() != batch_id:
        raise ProtocolError(
            400, "header_mismatch", "envelope batch_id differs from Idempotency-Key"
        )

    records: list[dict[str, Any]] = []
    rejected: list[Rejection] = []
    for index, record in enumerate(envelope["records"]):
        reason = validate_record(record)
        if reason is None:
            records.append(record)
        else:
            rid = record.get("id") if isinstance(record, dict) else None
            rejected.append(Rejection(index, rid if _valid_id(rid) else None, reason))
    return DecodedBatch(
        gateway_id, batch_id, envelope["sent_at"], int(timestamp), records, rejected
    )


def validate_record(record: Any) -> str | None:
    """Why ``record`` is not a valid protocol record, or None if it is.

    Unknown extra fields are allowed (and ignored by the reference receiver) so that
    senders can add fields without breaking older receivers.
    """
    if _plainly_valid(record):
        return None
    return _why_invalid(record)


_CLASS_NAMES = frozenset(CLASSES)
_ID_MIN, _ID_MAX = -(2**63), 2**63 - 1  # what SQLite stores as an integer


def _plainly_valid(record: Any) -> bool:
    """True for a record as JSON decoding makes a valid one; False means "look closer".

    One expression instead of `_why_invalid`'s field-by-field report: this runs for
    every record a receiver takes, and most are valid (half the cost per record).
    """
    try:
        rid, ts = record["id"], record["ts"]
        family, device, kind = record["family"], record["device"], record["kind"]
        if not ((type(rid) is int and _ID_MIN <= rid <= _ID_MAX or type(rid) is str and 0 < len(rid) <= 128)
                and type(family) is str and family and type(device) is str and device and type(kind) is str
                and kind and record["class"] in _CLASS_NAMES and type(record["data"]) is dict
                and type(ts) is str):
            return False
    except (TypeError, KeyError):  # not a dict, a field missing, an unhashable class
        return False
    return _valid_ts(ts)


def _why_invalid(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "record is not a JSON object"
    missing = [name for name in _REQUIRED if name not in record]
    if missing:
        return "missing field(s): " + ", ".join(missing)
    problems = []
    if not _valid_id(record["id"]):
        problems.append("'id' must be an integer or a non-empty string of at most 128 characters")
    for name in ("family", "device", "kind"):
        if not (isinstance(record[name], str) and record[name]):
            problems.append(f"{name!r} must be a non-empty string")
    if not _valid_ts(record["ts"]):
        problems.append("'ts' must be an RFC 3339 UTC timestamp ending in Z")
    if record["class"] not in CLASSES:
        problems.append("'class' must be one of " + "|".join(CLASSES))
    if not isinstance(record["data"], dict):
        problems.append("'data' must be a JSON object")
    return "; ".join(problems) or None


def mqtt_topic(gateway_id: str) -> str:
    """The MQTT topic one gateway publishes its batches to."""
    if not _GATEWAY_ID.fullmatch(gateway_id):
        raise ValueError(f"invalid gateway id {gateway_id!r}")
    return f"gatewayd/{gateway_id}/batch"


def mqtt_user_properties(batch: EncodedBatch) -> list[tuple[str, str]]:
    """The batch's headers as MQTT 5 user properties (names lower-cased)."""
    return [(name.lower(), value) for name, value in batch.headers.items()]


# -- internals -------------------------------------------------------------------


def _is_uuid4(value: str) -> bool:
    try:
        parsed = uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return parsed.version == 4 and str(parsed) == value.lower()


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return _ID_MIN <= value <= _ID_MAX
    return isinstance(value, str) and 0 < len(value) <= 128


def _valid_ts(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    match = _RFC3339_UTC.fullmatch(value)
    if match is None:
        return False
    try:
        datetime.fromisoformat(match.group(1))
    except ValueError:  # 2026-02-30 and the like
        return False
    return True


def _header(h: Mapping[str, str], name: str) -> str:
    value = h.get(name)
    if not value:
        raise ProtocolError(400, "missing_header", f"missing header {name}")
    return value


def compact_json_encoder() -> Callable[[Any], str]:
    """This thread's encoder for the protocol's JSON: compact, UTF-8 as is, no NaN.

    What ``json.dumps(x, separators=(",", ":"), ensure_ascii=False, allow_nan=False)``
    gives, without its per-call set-up (`json_encoder`). Raises TypeError or ValueError
    like ``json.dumps``.
    """
    return json_encoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# One zstd compressor per thread (a compressor is not safe to share between threads;
# making one per batch costs more than compressing a small batch).
_zstd = threading.local()


def _compress(raw: bytes, compression: str) -> bytes:
    if compression == "zstd":
        compressor = getattr(_zstd, "compressor", None)
        if compressor is None:
            compressor = _zstd.compressor = zstandard.ZstdCompressor(level=3)
        return compressor.compress(raw)
    if compression == "gzip":
        # mtime=0: the same batch compresses to the same bytes on every attempt.
        return gzip.compress(raw, compresslevel=6, mtime=0)
    if compression == "identity":
        return raw
    raise ValueError(f"unknown compression {compression!r}")


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    try:
        return inflate(body, encoding, limit)
    except EncodingError as e:
        raise ProtocolError(e.status, e.code, e.message) from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse_envelope(raw: bytes) -> dict[str, Any]:
    try:
        envelope = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(400, "bad_json", f"body is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise ProtocolError(400, "bad_envelope", "body must be a JSON object")
    for name in ("gateway_id", "batch_id", "sent_at"):
        if not isinstance(envelope.get(name), str):
            raise ProtocolError(400, "bad_envelope", f"envelope field {name!r} must be a string")
    if not isinstance(envelope.get("records"), list):
        raise ProtocolError(400, "bad_envelope", "envelope field 'records' must be an array")
    return envelope
