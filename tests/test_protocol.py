"""The upstream batch codec and retry policy, without sockets."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import random
import re
import uuid
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.protocol.batch import (
    CLASSES,
    ProtocolError,
    SerializedRecords,
    decode_batch,
    encode_batch,
    mqtt_topic,
    mqtt_user_properties,
    rfc3339_utc,
    sign,
    validate_record,
)
from gatewayd.protocol.retry import Backoff, CircuitBreaker, parse_response

SECRET = b"test-secret"
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DOC = Path(__file__).resolve().parents[1] / "docs" / "upstream-protocol.md"


def record(rid: int | str, **changes: object) -> dict:
    rec = {
        "id": rid,
        "family": "streetlight",
        "device": "SL-1",
        "kind": "status",
        "ts": "2025-12-31T23:59:58.250Z",
        "class": "state",
        "data": {"lamp": "on", "power_w": 41.5},
    }
    rec.update(changes)
    return rec


def encode(records=None, *, compression="zstd", now=NOW, gateway_id="site-7", batch_id=None):
    return encode_batch(
        [record(1), record(2)] if records is None else records,
        gateway_id=gateway_id,
        batch_id=batch_id or str(uuid.uuid4()),
        secret=SECRET,
        compression=compression,
        now=now,
    )


def decode(body, headers, *, now=NOW, secrets=None, **kwargs):
    secrets = {"site-7": SECRET} if secrets is None else secrets
    return decode_batch(body, headers, secret_for=secrets.get, now=now, **kwargs)


def resigned(body: bytes, headers: dict, secret: bytes = SECRET) -> tuple[bytes, dict]:
    """``body`` with headers that are honest about it: what a buggy but authentic
    sender would send, so the check under test is the only one that fails."""
    headers = dict(headers)
    headers["Content-SHA256"] = hashlib.sha256(body).hexdigest()
    headers["X-Gateway-Signature"] = sign(secret, headers["X-Gateway-Timestamp"], body)
    return body, headers


def raises(status: int, code: str, body: bytes, headers: dict, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(body, headers, **kwargs)
    assert (info.value.status, info.value.code) == (status, code), info.value
    return info.value


# -- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "gzip", "identity"])
def test_round_trip(compression):
    records = [record(1), record("a-2", **{"class": "alert"}), record(3, data={})]
    batch = encode(records, compression=compression, batch_id="3f0c4b5e-8a9d-4c1e-9b2a-7d6e5f4a3b21")
    decoded = decode(batch.body, batch.headers)
    assert decoded.records == records
    assert decoded.rejected == []
    assert decoded.gateway_id == "site-7"
    assert decoded.batch_id == "3f0c4b5e-8a9d-4c1e-9b2a-7d6e5f4a3b21"
    assert decoded.sent_at == "2026-01-01T00:00:00.000Z"
    assert batch.headers["Content-SHA256"] == hashlib.sha256(batch.body).hexdigest()
    if compression == "identity":
        assert "Content-Encoding" not in batch.headers
        assert json.loads(batch.body)["records"] == records
    else:
        assert batch.headers["Content-Encoding"] == compression


def test_headers_are_matched_case_insensitively():
    batch = encode()
    lowered = {name.lower(): value for name, value in batch.headers.items()}
    assert len(decode(batch.body, lowered).records) == 2


def test_retries_keep_the_key_and_change_the_signature():
    key = str(uuid.uuid4())
    first, second = encode(batch_id=key), encode(batch_id=key, now=NOW + 30)
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == key
    assert first.headers["X-Gateway-Signature"] != second.headers["X-Gateway-Signature"]


def test_gzip_is_deterministic():
    key = str(uuid.uuid4())
    assert encode(compression="gzip", batch_id=key).body == encode(compression="gzip", batch_id=key).body


def test_concatenated_gzip_members_and_zstd_frames_are_one_stream():
    raw = encode(compression="identity").body
    half = len(raw) // 2
    for body in (
        gzip.compress(raw[:half]) + gzip.compress(raw[half:]),
        zstandard.ZstdCompressor().compress(raw[:half]) + zstandard.ZstdCompressor().compress(raw[half:]),
    ):
        headers = dict(encode(compression="identity").headers)
        headers["Content-Encoding"] = "gzip" if body[:2] == b"\x1f\x8b" else "zstd"
        body, headers = resigned(body, headers)
        headers["Idempotency-Key"] = json.loads(raw)["batch_id"]
        assert len(decode(body, headers).records) == 2


record_ids = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(min_size=1, max_size=128),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
timestamps = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(timezone.utc)
).map(lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
records_strategy = st.builds(
    lambda rid, family, device, kind, ts, cls, data: {
        "id": rid, "family": family, "device": device, "kind": kind, "ts": ts, "class": cls, "data": data
    },
    record_ids,
    st.text(min_size=1, max_size=20),
    st.text(min_size=1, max_size=20),
    st.text(min_size=1, max_size=20),
    timestamps,
    st.sampled_from(CLASSES),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(records_strategy, max_size=20),
    compression=st.sampled_from(["zstd", "gzip", "identity"]),
    now=st.integers(min_value=0, max_value=2**33),
)
def test_round_trip_property(records, compression, now):
    batch = encode(records, compression=compression, now=now)
    decoded = decode(batch.body, batch.headers, now=now)
    assert decoded.records == records
    assert decoded.rejected == []
    assert decoded.timestamp == now


# -- refusals ---------------------------------------------------------------------


def test_wrong_secret_is_401():
    batch = encode()
    raises(401, "bad_signature", batch.body, batch.headers, secrets={"site-7": b"another secret"})


def test_unknown_gateway_is_401():
    batch = encode()
    raises(401, "unknown_gateway", batch.body, batch.headers, secrets={"site-8": SECRET})


@pytest.mark.parametrize("offset", [-301, 301, -86_400])
def test_stale_or_future_timestamp_is_401(offset):
    batch = encode(now=NOW + offset)
    error = raises(401, "stale_timestamp", batch.body, batch.headers)
    assert "300" in error.message


def test_timestamp_within_skew_is_accepted():
    batch = encode(now=NOW - 299)
    assert len(decode(batch.body, batch.headers).records) == 2


def test_tampered_body_is_400_sha_mismatch():
    batch = encode(compression="identity")
    tampered = batch.body.replace(b'"SL-1"', b'"SL-9"')
    assert tampered != batch.body
    raises(400, "sha256_mismatch", tampered, batch.headers)


def test_tampered_body_with_a_fixed_up_hash_is_401():
    batch = encode(compression="identity")
    tampered = batch.body.replace(b'"SL-1"', b'"SL-9"')
    headers = dict(batch.headers, **{"Content-SHA256": hashlib.sha256(tampered).hexdigest()})
    raises(401, "bad_signature", tampered, headers)


def test_truncated_gzip_is_400():
    batch = encode([record(i) for i in range(50)], compression="gzip")
    error = raises(400, "corrupt_body", *resigned(batch.body[:-20], batch.headers))
    assert error.message == "truncated gzip body"


def test_truncated_zstd_is_400():
    batch = encode([record(i) for i in range(50)], compression="zstd")
    error = raises(400, "corrupt_body", *resigned(batch.body[:-20], batch.headers))
    assert error.message == "truncated zstd body"


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_garbage_and_empty_compressed_bodies_are_400(encoding):
    batch = encode(compression=encoding)
    assert "corrupt" in raises(400, "corrupt_body", *resigned(b"not compressed at all", batch.headers)).message
    assert "truncated" in raises(400, "corrupt_body", *resigned(b"", batch.headers)).message
    trailing = raises(400, "corrupt_body", *resigned(batch.body + b"\x00junk", batch.headers))
    assert encoding in trailing.message


@pytest.mark.parametrize(
    "encoding, compress",
    [
        ("gzip", lambda raw: gzip.compress(raw, 9)),
        ("zstd", lambda raw: zstandard.ZstdCompressor(level=19).compress(raw)),
        # No content size in the frame header: the limit must hold while streaming.
        ("zstd", lambda raw: zstandard.ZstdCompressor(write_content_size=False).compress(raw)),
        ("identity", lambda raw: raw),
    ],
)
def test_decompression_bomb_is_413(encoding, compress):
    bomb = b'{"gateway_id":"site-7","pad":"' + b"0" * (8 * 1024 * 1024) + b'"}'
    headers = dict(encode().headers)
    headers.pop("Content-Encoding")
    if encoding != "identity":
        headers["Content-Encoding"] = encoding
    body = compress(bomb)
    if encoding != "identity":
        assert len(body) < 64 * 1024
    raises(413, "too_large", *resigned(body, headers), max_decompressed_bytes=1024 * 1024)


def test_exactly_at_the_limit_is_accepted():
    batch = encode(compression="identity")
    raw_size = len(batch.body)
    for encoding in ("gzip", "zstd", "identity"):
        batch = encode(compression=encoding, batch_id=json.loads(encode(compression="identity").body)["batch_id"])
        decode(batch.body, batch.headers, max_decompressed_bytes=raw_size)
        raises(413, "too_large", batch.body, batch.headers, max_decompressed_bytes=raw_size - 1)


@pytest.mark.parametrize(
    "raw, code",
    [
        (b"{not json", "bad_json"),
        (b'{"records": [NaN]}', "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
        (b"[1, 2]", "bad_envelope"),
        (b'{"gateway_id": "site-7", "batch_id": "x", "sent_at": "y"}', "bad_envelope"),
        (b'{"gateway_id": "site-7", "batch_id": "x", "sent_at": "y", "records": {}}', "bad_envelope"),
        (b'{"gateway_id": 7, "batch_id": "x", "sent_at": "y", "records": []}', "bad_envelope"),
    ],
)
def test_bad_json_and_envelope_are_400(raw, code):
    headers = dict(encode(compression="gzip").headers)
    raises(400, code, *resigned(gzip.compress(raw), headers))


def test_envelope_must_match_the_headers():
    batch = encode(compression="identity")
    other_key = dict(batch.headers, **{"Idempotency-Key": str(uuid.uuid4())})
    raises(400, "header_mismatch", batch.body, other_key)
    other_gateway = dict(batch.headers, **{"X-Gateway-Id": "site-8"})
    raises(400, "header_mismatch", batch.body, other_gateway, secrets={"site-8": SECRET})


@pytest.mark.parametrize(
    "name",
    ["Content-Type", "Idempotency-Key", "Content-SHA256", "X-Gateway-Id", "X-Gateway-Timestamp", "X-Gateway-Signature"],
)
def test_missing_header_is_400(name):
    batch = encode()
    headers = {k: v for k, v in batch.headers.items() if k != name}
    error = raises(400, "missing_header", batch.body, headers)
    assert name.lower() in error.message


@pytest.mark.parametrize(
    "name, value",
    [
        ("X-Gateway-Id", "site/7"),
        ("X-Gateway-Timestamp", "1767225600.5"),
        ("X-Gateway-Timestamp", "-1"),
        ("X-Gateway-Signature", "md5=abc"),
        ("X-Gateway-Signature", "sha256=xyz"),
        ("Idempotency-Key", "not-a-uuid"),
        ("Idempotency-Key", str(uuid.uuid1())),
        ("Content-SHA256", "abc"),
    ],
)
def test_invalid_header_is_400(name, value):
    batch = encode()
    raises(400, "invalid_header", batch.body, dict(batch.headers, **{name: value}))


def test_unsupported_media_type_and_encoding_are_415():
    batch = encode()
    raises(415, "unsupported_media_type", batch.body, dict(batch.headers, **{"Content-Type": "text/plain"}))
    raises(415, "unsupported_encoding", batch.body, dict(batch.headers, **{"Content-Encoding": "br"}))


def test_a_bad_record_is_rejected_alone():
    records = [
        record(1),
        {k: v for k, v in record(2).items() if k not in ("family", "ts")},
        record(3, ts="2025-12-31 23:59:58"),
        record(4, **{"class": "telemetry"}),
        record(True),
        record(6, data=[1, 2]),
        record(7, **{"class": None}),
        record(8, ts="2026-02-30T00:00:00Z"),
        record(9),
    ]
    decoded = decode(*(lambda b: (b.body, b.headers))(encode(records)))
    assert [r["id"] for r in decoded.records] == [1, 9]
    reasons = {r.index: (r.id, r.reason) for r in decoded.rejected}
    assert reasons[1] == (2, "missing field(s): family, ts")
    assert reasons[2][0] == 3 and "'ts'" in reasons[2][1]
    assert "'class'" in reasons[3][1]
    assert reasons[4] == (None, "'id' must be an integer or a non-empty string of at most 128 characters")
    assert "'data'" in reasons[5][1]
    assert reasons[6][0] == 7 and "'class'" in reasons[6][1]
    assert "'ts'" in reasons[7][1]
    assert len(decoded.rejected) == 7


def test_a_record_that_is_not_an_object_is_rejected():
    batch = encode(compression="identity")
    envelope = json.loads(batch.body)
    envelope["records"] = [record(1), "not an object", [1, 2]]
    decoded = decode(*resigned(json.dumps(envelope).encode(), batch.headers))
    assert [r["id"] for r in decoded.records] == [1]
    assert [(r.index, r.id, r.reason) for r in decoded.rejected] == [
        (1, None, "record is not a JSON object"),
        (2, None, "record is not a JSON object"),
    ]


def test_validate_record():
    assert validate_record(record(1)) is None
    assert validate_record(record(1, extra="ignored")) is None
    assert validate_record(record(1, ts="2025-12-31T23:59:58.123456789Z")) is None
    assert validate_record(record(1, ts="2025-12-31T23:59:58+00:00")) is not None
    assert validate_record(record(1, ts=1767225600000)) is not None
    assert validate_record(record(2**63)) is not None
    assert validate_record(record("")) is not None
    assert validate_record(record(1, device="")) is not None


_ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**64), st.floats(allow_nan=False),
    st.text(max_size=3), st.sampled_from(["", "x" * 128, "x" * 129, "history", "2025-02-30T00:00:00Z",
                                          "2025-12-31T23:59:58Z", "2025-12-31T23:59:58.1234567890Z"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@settings(max_examples=500)
@given(changes=st.dictionaries(st.sampled_from(["id", "family", "device", "kind", "ts", "class", "data", "x"]),
                               _ODD_VALUES, max_size=3),
       dropped=st.sets(st.sampled_from(["id", "family", "device", "kind", "ts", "class", "data"]), max_size=2))
def test_validate_record_quick_path_agrees_with_the_full_check(changes, dropped):
    from gatewayd.protocol.batch import _why_invalid

    rec = {k: v for k, v in record(1, **changes).items() if k not in dropped}
    assert validate_record(rec) == _why_invalid(rec)
    assert validate_record(list(rec)) == _why_invalid(list(rec)) == "record is not a JSON object"


@pytest.mark.parametrize("field", ["id", "family", "device", "kind", "ts", "class", "data"])
def test_validate_record_quick_path_at_the_edges(field):
    from gatewayd.protocol.batch import _why_invalid

    edges = [None, True, 0, 1.5, -(2**63), 2**63 - 1, -(2**63) - 1, 2**63, "", "x", "x" * 128, "x" * 129,
             "state", ["state"], {}, {"a": 1}, "2025-12-31T23:59:58Z", "2025-02-30T00:00:00Z",
             "2025-12-31T23:59:58.123456789Z", "2025-12-31T23:59:58.1234567890Z", "2025-12-31 23:59:58Z"]
    for value in edges:
        rec = record(1, **{field: value})
        assert validate_record(rec) == _why_invalid(rec), (field, value)


def test_encoder_refuses_what_it_cannot_send():
    with pytest.raises(ValueError):
        encode(batch_id=str(uuid.uuid1()))
    with pytest.raises(ValueError):
        encode(gateway_id="site 7")
    with pytest.raises(ValueError):
        encode([record(1, data={"x": float("nan")})])
    with pytest.raises(ValueError):
        encode(compression="brotli")


def test_rfc3339_utc():
    assert rfc3339_utc(NOW) == "2026-01-01T00:00:00.000Z"
    assert rfc3339_utc(NOW + 1.2345) == "2026-01-01T00:00:01.234Z"
    assert validate_record(record(1, ts=rfc3339_utc(0))) is None


def test_mqtt_mapping():
    batch = encode()
    assert mqtt_topic("site-7") == "gatewayd/site-7/batch"
    with pytest.raises(ValueError):
        mqtt_topic("site/+")
    props = dict(mqtt_user_properties(batch))
    assert props["idempotency-key"] == batch.headers["Idempotency-Key"]
    # The consumer side: properties back into headers, then the HTTP verification.
    assert len(decode(batch.body, props).records) == 2


# -- the worked example in docs/upstream-protocol.md ------------------------------


def _doc_block(marker: str) -> str:
    match = re.search(rf"<!-- worked-example:{marker} -->\n```\w*\n(.*?)\n```", DOC.read_text(), re.S)
    assert match, f"worked-example:{marker} block missing from {DOC.name}"
    return match.group(1)


def test_documented_worked_example_is_correct():
    inputs = dict(
        (key.strip(), value.strip())
        for key, value in (line.split(":", 1) for line in _doc_block("inputs").splitlines())
    )
    body = _doc_block("body").encode("utf-8")
    request = _doc_block("request").splitlines()
    assert request[0] == "POST /v1/batch HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in request[1:])

    secret, timestamp = inputs["secret"].encode(), inputs["timestamp"]
    assert headers["Content-SHA256"] == hashlib.sha256(body).hexdigest()
    expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["X-Gateway-Signature"] == "sha256=" + expected

    # The encoder produces exactly the documented bytes and headers.
    envelope = json.loads(body)
    batch = encode_batch(
        envelope["records"],
        gateway_id=inputs["gateway id"],
        batch_id=inputs["batch id"],
        secret=secret,
        compression="identity",
        now=float(timestamp),
    )
    assert batch.body == body
    assert batch.headers == headers
    decoded = decode_batch(body, headers, secret_for={"site-7": secret}.get, now=float(timestamp))
    assert len(decoded.records) == 2
    # The pre-serialised path (what the sync worker uses) writes the same bytes.
    spliced = json.dumps(envelope["records"], separators=(",", ":"), ensure_ascii=False).encode()
    again = encode_batch(
        SerializedRecords(spliced, 2),
        gateway_id=inputs["gateway id"],
        batch_id=inputs["batch id"],
        secret=secret,
        compression="identity",
        now=float(timestamp),
    )
    assert (again.body, again.headers) == (body, headers)


@pytest.mark.parametrize("compression", ["zstd", "gzip", "identity"])
def test_serialized_records_encode_exactly_like_the_mappings(compression):
    records = [record(1), record("x-2", data={"s": 'é "q" \\ \n 🙂', "f": 0.1 + 0.2}), record(3, data={})]
    spliced = SerializedRecords(json.dumps(records, separators=(",", ":"), ensure_ascii=False).encode(), 3)
    key = str(uuid.uuid4())
    assert encode(spliced, compression=compression, batch_id=key) == encode(records, compression=compression,
                                                                           batch_id=key)
    with pytest.raises(ValueError):  # the envelope checks still apply
        encode(spliced, gateway_id="site 7")


# -- parse_response ---------------------------------------------------------------


def answer(**fields) -> bytes:
    doc = {"accepted": 3, "duplicates": 1, "rejected": 1, "rejected_ids": [7], "next_hint": None}
    doc.update(fields)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("status", [200, 201, 202])
def test_2xx_is_delivered(status):
    outcome = parse_response(status, {}, answer())
    assert outcome.kind == "delivered"
    assert (outcome.accepted, outcome.duplicates, outcome.rejected) == (3, 1, 1)
    assert outcome.rejected_ids == [7]
    assert outcome.delay_s is None


def test_2xx_with_next_hint_asks_to_slow_down():
    outcome = parse_response(200, {}, answer(next_hint="backoff_ms: 5000"))
    assert (outcome.kind, outcome.delay_s) == ("delivered", 5.0)


def test_2xx_without_a_usable_body_is_still_delivered():
    outcome = parse_response(200, {}, b"<html>ok</html>")
    assert outcome.kind == "delivered"
    assert outcome.accepted is None


def test_409_is_already_delivered():
    outcome = parse_response(409, {}, answer())
    assert (outcome.kind, outcome.accepted) == ("already_delivered", 3)


@pytest.mark.parametrize(
    "status, headers, body, delay",
    [
        (429, {"Retry-After": "7"}, b"", 7.0),
        (503, {"retry-after": " 12 "}, b"", 12.0),
        (429, {}, answer(next_hint="backoff_ms: 5000"), 5.0),
        (503, {"Retry-After": "2"}, answer(next_hint="backoff_ms: 5000"), 5.0),  # the larger
        (429, {"Retry-After": "9"}, answer(next_hint="backoff_ms: 5000"), 9.0),
        (503, {"Retry-After": format_datetime(datetime.fromtimestamp(NOW + 90, timezone.utc), usegmt=True)}, b"", 90.0),
        (503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, b"", 0.0),  # in the past
        (429, {"Retry-After": "999999"}, b"", 3600.0),  # capped
        (429, {"Retry-After": "soon"}, answer(next_hint="backoff_ms: 250"), 0.25),
    ],
)
def test_429_and_503_wait(status, headers, body, delay):
    outcome = parse_response(status, headers, body, now=NOW)
    assert (outcome.kind, outcome.delay_s) == ("retry_after", delay)


def test_429_without_any_hint_backs_off():
    assert parse_response(429, {"Retry-After": "soon"}, answer(next_hint="later"), now=NOW).kind == "retry"


@pytest.mark.parametrize("status", [500, 502, 504, 408, 301, 307])
def test_transient_statuses_retry(status):
    assert parse_response(status, {}, b"").kind == "retry"


def test_other_4xx_dead_letters_with_the_reason():
    body = json.dumps({"error": {"code": "sha256_mismatch", "message": "Content-SHA256 does not match"}})
    outcome = parse_response(400, {}, body.encode())
    assert outcome.kind == "dead_letter"
    assert outcome.reason == "HTTP 400 sha256_mismatch: Content-SHA256 does not match"
    plain = parse_response(404, {}, b"Not Found")
    assert (plain.kind, plain.reason) == ("dead_letter", "HTTP 404: Not Found")
    for status in (401, 403, 413, 415, 422):
        assert parse_response(status, {}, b"").kind == "dead_letter"


# -- Backoff and CircuitBreaker ---------------------------------------------------


def test_backoff_nominal_schedule():
    backoff = Backoff(rng=random.Random(1))
    assert [backoff.nominal(n) for n in range(11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert backoff.nominal(10_000) == 300


def test_backoff_bounds_and_jitter_over_many_draws():
    rng = random.Random(20260101)
    for attempt in range(12):
        backoff = Backoff(rng=rng)
        nominal = backoff.nominal(attempt)
        draws = []
        for _ in range(2000):
            backoff.attempt = attempt
            draws.append(backoff.next_delay())
        low, high = 0.75 * nominal, min(300.0, 1.25 * nominal)
        assert all(low <= d <= high for d in draws), attempt
        # The jitter really spreads: both ends of the range are reached closely.
        assert min(draws) < low + 0.02 * nominal
        assert max(draws) > high - 0.02 * nominal
        if 1.25 * nominal <= 300:
            assert len(set(draws)) > 1900


def test_backoff_advances_and_resets():
    backoff = Backoff(rng=random.Random(3), jitter=0.0)
    assert [backoff.next_delay() for _ in range(4)] == [1, 2, 4, 8]
    backoff.reset()
    assert backoff.next_delay() == 1
    with pytest.raises(ValueError):
        Backoff(jitter=1.5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_circuit_breaker_transitions():
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown_s=60, clock=clock)
    assert breaker.state == "closed" and breaker.allow()

    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a success clears the count
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.consecutive_failures == 2
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    assert breaker.retry_in() == 60

    clock.now += 59.5
    assert breaker.state == "open" and not breaker.allow()
    assert breaker.retry_in() == 0.5
    clock.now += 0.5
    assert breaker.state == "half_open"
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record_failure()  # the probe failed: open again, a full cool-down
    assert breaker.state == "open" and breaker.retry_in() == 60

    clock.now += 60
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow() and breaker.retry_in() == 0
    assert breaker.consecutive_failures == 0
