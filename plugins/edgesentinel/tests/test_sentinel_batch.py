"""POST /api/iot/v1/telemetry/batch against a real gateway (SQLite under tmp_path, the
reference upstream receiver): stored once, answered the same on a replay (also after a
restart), refused with the reason and nothing stored."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import uuid

import numpy as np
import pytest
import zstandard
from sentinel_testbed import API, OPEN, PLUGIN, T0, compress, creds_headers, points, upload

from gatewayd.testing import gw_client, provision, storage_failing, wait_until


async def count(gw, table: str) -> int:
    def read() -> int:
        return int(gw.storage.database.execute_sql(f'SELECT count(*) FROM "edgesentinel_{table}"').fetchone()[0])

    return await gw.storage.read(read)


async def test_a_batch_is_stored_once_forwarded_and_replayed_the_same(gateway_factory, upstream_receiver):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        doc = {"batch_id": "f1:0", "points": points(3), "door_events": [
            {"ts": T0, "door_id": "d1", "type": "cycle_open", "duration_ms": 2100},
            {"ts": T0 + 5, "door_id": "d1", "type": "over_torque", "value": 44.5, "unit": "Nm"}],
            "system_events": [{"ts": T0, "event_type": "supercap_low", "severity": "warning",
                               "description": "76% of rated", "meta": {"voltage_pct": 76}}],
            "windows": [{"ts": T0, "metric": "vibration", "stats": {"rms": 0.4, "max": 1.2}, "window_s": 1}]}
        body = compress(doc)
        kwargs = upload(node, body)
        r = await client.post(f"{API}/telemetry/batch", **kwargs)
        assert r.status_code == 200, r.text
        first = r.json()
        assert first == {"accepted": 7, "duplicates": 0, "rejected": 0, "next_hint": None, "batch_id": "f1:0",
                         "rejections": []}
        assert r.headers["Idempotency-Replayed"] == "false"
        # The rules' alert records (supercap_low, over_torque) go upstream too, in any order.
        records = await wait_until(lambda: len(got := [r for r in upstream_receiver.records()
                                                       if r["kind"] != "alert"]) >= 7 and got, what="7 records")
        kinds = sorted(r["kind"] for r in records)
        assert kinds == ["door_event", "door_event", "point", "point", "point", "system_event", "window"]
        # The same key and body: the same answer, nothing stored again.
        again = await client.post(f"{API}/telemetry/batch", **kwargs)
        assert (again.status_code, again.json(), again.headers["Idempotency-Replayed"]) == (200, first, "true")
        assert await count(gw, "point") == 3 and await count(gw, "packet") == 1
        # The same key, another body: 409, nothing stored.
        other = compress({**doc, "points": points(4)})
        r = await client.post(f"{API}/telemetry/batch", **upload(node, other, key=kwargs["headers"]["Idempotency-Key"]))
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict"
        assert await count(gw, "point") == 3
        # Another key, the same records again and two new points (a node that lost the answer): duplicates.
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress({**doc, "points": points(5)})))
        assert r.json() | {"rejections": []} == {"accepted": 2, "duplicates": 7, "rejected": 0, "next_hint": None,
                                                 "batch_id": "f1:0", "rejections": []}
        assert await count(gw, "point") == 5
    # After a restart the key still answers the same.
    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        r = await client.post(f"{API}/telemetry/batch", **kwargs)
        assert (r.status_code, r.json(), r.headers["Idempotency-Replayed"]) == (200, first, "true")


async def test_bad_records_reject_themselves_only(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        bad = [{"ts": T0, "metric": "x", "value": "high"}, {"ts": 1e15, "metric": "x", "value": 1},
               {"ts": T0, "metric": "", "value": 1}, {"ts": T0, "metric": "x", "value": 1, "colour": "red"}, 7]
        doc = {"points": [*points(2), *bad, points(3)[2]],
               "door_events": [{"ts": T0, "type": "cycle_sideways"}],
               "system_events": [{"ts": T0, "event_type": "sd_error", "severity": "fatal"}]}
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress(doc, "gzip"), encoding="gzip"))
        answer = r.json()
        assert r.status_code == 200 and (answer["accepted"], answer["rejected"]) == (3, 7), r.text
        reasons = {(x["kind"], x["index"]): x["reason"] for x in answer["rejections"]}
        assert reasons[("points", 2)] == "value: expected a number, got 'high'"
        assert reasons[("points", 3)].startswith("ts: 1000000000000000.0 is not a time between 2000 and 2200")
        assert reasons[("points", 5)].startswith("unknown field 'colour'")
        assert reasons[("points", 6)] == "expected an object, got a number"
        assert reasons[("door_events", 0)].startswith("type: expected one of cycle_open, cycle_close")
        assert reasons[("system_events", 0)].startswith("severity: expected info, warning or critical")
        assert await count(gw, "point") == 3


def bomb() -> bytes:
    return zstandard.ZstdCompressor(level=19).compress(b'{"points": [' + b" " * (3 << 20) + b"]}")


def truncated() -> bytes:
    return compress({"points": points(500)})[:-20]


@pytest.mark.parametrize("case, status, code, message", [
    ("bad hash", 400, "sha256_mismatch", "Content-SHA256 does not match the body"),
    ("no hash", 400, "missing_header", "missing Content-SHA256 header"),
    ("no key", 400, "missing_header", "missing Idempotency-Key header"),
    ("bad key", 400, "invalid_header", "Idempotency-Key: expected a UUIDv4"),
    ("truncated", 400, "corrupt_body", "truncated zstd body"),
    ("bomb", 400, "too_large", "decompresses to more than 1048576 bytes"),
    ("gzip said, zstd sent", 400, "corrupt_body", "Content-Encoding says gzip"),
    ("no encoding", 400, "missing_header", "the body is zstd data but no Content-Encoding"),
    ("brotli", 415, "unsupported_encoding", "expected gzip or zstd"),
    ("not json", 400, "bad_json", ""),
    ("NaN", 400, "bad_json", "NaN"),
    ("not a batch", 400, "bad_batch", "body: expected a JSON object"),
    ("typo", 400, "bad_batch", "unknown field 'pionts'"),
    ("another device", 400, "bad_batch", "is not the X-Device-Id header's"),
    ("too many", 400, "too_many_records", "at most 100 (max_records)"),
])
async def test_a_bad_batch_is_refused_with_the_reason_and_nothing_stored(gateway_factory, case, status, code,
                                                                          message):
    settings = [*OPEN, "plugins.edgesentinel.max_decompressed_bytes=1048576", "plugins.edgesentinel.max_records=100"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        good = compress({"points": points(2)})
        kwargs = {
            "bad hash": lambda: upload(node, good, sha=hashlib.sha256(b"other").hexdigest()),
            "no hash": lambda: {**upload(node, good), "headers": {k: v for k, v in upload(node, good)["headers"].items()
                                                                 if k != "Content-SHA256"}},
            "no key": lambda: {**upload(node, good), "headers": {k: v for k, v in upload(node, good)["headers"].items()
                                                                if k != "Idempotency-Key"}},
            "bad key": lambda: upload(node, good, key="1234"),
            "truncated": lambda: upload(node, truncated()),
            "bomb": lambda: upload(node, bomb()),
            "gzip said, zstd sent": lambda: upload(node, good, encoding="gzip"),
            "no encoding": lambda: upload(node, good, encoding="identity"),
            "brotli": lambda: upload(node, good, encoding="br"),
            "not json": lambda: upload(node, compress(b"{points: 1}")),
            "NaN": lambda: upload(node, compress(b'{"points": [{"ts": 1767225600, "metric": "a", "value": NaN}]}')),
            "not a batch": lambda: upload(node, compress([1, 2])),
            "typo": lambda: upload(node, compress({"pionts": []})),
            "another device": lambda: upload(node, compress({"device_id": "es-2", "points": []})),
            "too many": lambda: upload(node, compress({"points": points(101)})),
        }[case]()
        r = await client.post(f"{API}/telemetry/batch", **kwargs)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["code"] == code and message in error["message"], r.text
        assert await count(gw, "point") == 0 and await count(gw, "packet") == 0
        if case in ("bad hash", "truncated", "bomb"):
            # The same key works for the right body afterwards: nothing was kept of the refusal.
            r = await client.post(f"{API}/telemetry/batch", **upload(node, good, key=kwargs["headers"].get(
                "Idempotency-Key")))
            assert r.status_code == 200 and r.json()["accepted"] == 2


async def test_credentials_and_claiming(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        body = compress({"points": points(1)})
        r = await client.post(f"{API}/telemetry/batch", **upload(node, body))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"  # not yet claimed
        claimed = await provision(gw, "edgesentinel", "es-2", status="claimed")
        r = await client.post(f"{API}/telemetry/batch", **upload(claimed, body, **{"X-Auth-Key": "wrong" * 8}))
        assert r.status_code == 401 and r.json() == {
            "error": {"status": 401, "code": "unauthorized", "message": "unknown device or wrong key"},
            "next_hint": None}
        r = await client.post(f"{API}/telemetry/batch", **upload(claimed, body))
        assert r.status_code == 200, r.text
        # The technician scans the QR (device id + code) and claims es-1: its key works from now on.
        code = (await gw.devices.registry.create_claim_code("edgesentinel", ttl_s=600, device_id="es-1")).code
        r = await client.post("/edgesentinel/claim", json={"device_id": "es-2", "code": code})
        assert r.status_code == 403 and r.json()["error"]["code"] == "claim_refused"
        r = await client.post("/edgesentinel/claim", json={"device_id": "es-1", "code": code})
        assert (r.status_code, r.json()) == (200, {"device_id": "es-1", "status": "claimed", "key": None})
        assert (await client.post("/edgesentinel/claim", json={"device_id": "es-1", "code": code})).status_code == 403
        r = await client.post(f"{API}/telemetry/batch", **upload(node, body))
        assert r.status_code == 200, r.text


async def test_maintenance_mode_answers_503_with_the_hint(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        body = compress({"points": points(1)})
        await gw.maintenance.set(gw.maintenance.state.__class__(True, "switch swap", None, 120))
        r = await client.post(f"{API}/telemetry/batch", **upload(node, body))
        assert r.status_code == 503 and r.headers["Retry-After"] == "120"
        assert r.json() == {"error": {"status": 503, "code": "maintenance",
                                      "message": "the gateway is in maintenance mode: switch swap"},
                            "next_hint": "backoff_ms: 120000"}
        assert (await client.get(f"{API}/config", headers=creds_headers(node))).status_code == 503
        await gw.maintenance.set(gw.maintenance.state.__class__(False, "", None, 300))
        assert (await client.post(f"{API}/telemetry/batch", **upload(node, body))).status_code == 200
        assert await count(gw, "point") == 1


async def test_a_full_outbox_slows_nodes_down_then_refuses(gateway_factory, monkeypatch):
    monkeypatch.setenv("ES_DEAD_SECRET", "s" * 32)
    dead = '[[upstream]]\nname = "cloud"\nurl = "http://127.0.0.1:9/"\nsecret_env = "ES_DEAD_SECRET"\n'
    settings = [*OPEN, "outbox.max_rows=100", "plugins.edgesentinel.backpressure.degrade_after_s=0"]
    async with gateway_factory(plugins=PLUGIN, settings=settings, config_text=dead) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress({"points": points(60)})))
        assert r.json()["next_hint"] is None  # 0 % full when it arrived
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress({"points": points(20, start=T0 + 60)})))
        assert r.status_code == 200 and r.json()["next_hint"] is None  # 60 % < elevated_fill (70 %)
        # 80 %: elevated, stored with a hint between backoff_ms and 5 x backoff_ms; the profile halves the rates
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress({"points": points(10, start=T0 + 80)})))
        assert r.status_code == 200 and r.json()["next_hint"] == "backoff_ms: 15000"
        config = (await client.get(f"{API}/config", headers=creds_headers(node))).json()
        assert config["backpressure"]["degraded"] and config["sampling_hz"]["vibration"] == 500.0
        # 90 %: refused, nothing stored
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress({"points": points(1, start=T0 + 99)})))
        assert r.status_code == 429 and r.json()["next_hint"] == "backoff_ms: 25000"
        assert r.headers["Retry-After"] == "25"
        assert await count(gw, "point") == 90


async def test_waveforms_become_windows_and_are_kept_raw(gateway_factory, upstream_receiver):
    rate, n, amplitude = 1000.0, 1000, 2.0
    t = np.arange(n) / rate
    samples = (amplitude * np.sin(2 * math.pi * 50 * t)).tolist()
    async with gateway_factory(plugins=PLUGIN, settings=OPEN, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        doc = {"waveforms": [{"ts": T0, "metric": "vibration", "rate_hz": rate, "samples": samples, "unit": "g"}]}
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress(doc)))
        assert r.json()["accepted"] == 1, r.text
        [record] = await upstream_receiver.wait_for(1)
        stats = record["data"]["stats"]
        assert record["kind"] == "window" and record["data"]["source"] == "gateway"
        assert stats["rms"] == pytest.approx(amplitude / math.sqrt(2), rel=1e-3)
        assert stats["bandpower"]["10-100"] == pytest.approx(amplitude**2 / 2, rel=0.05)
        assert stats["bandpower"]["100-500"] < 1e-3
        assert await count(gw, "waveform") == 1 and await count(gw, "window") == 1


async def test_a_failing_database_stores_nothing_and_keeps_the_key_free(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        kwargs = upload(node, compress({"points": points(3)}))
        async with storage_failing(gw):
            r = await client.post(f"{API}/telemetry/batch", **kwargs)
            assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
        r = await client.post(f"{API}/telemetry/batch", **kwargs)
        assert r.status_code == 200 and r.json()["accepted"] == 3 and r.headers["Idempotency-Replayed"] == "false"


async def test_retention_forgets_keys_and_old_rows_by_age(gateway_factory):
    now = [T0 + 3600]
    settings = [*OPEN, "plugins.edgesentinel.dedup_days=30", "plugins.edgesentinel.retention_days=90",
                "plugins.edgesentinel.windows.raw_retention_days=7"]
    wave = {"ts": T0, "metric": "vibration", "rate_hz": 100.0, "samples": [0.5, -0.5] * 32}
    async with gateway_factory(plugins=PLUGIN, settings=settings, clock=lambda: now[0]) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        kwargs = upload(node, compress({"batch_id": "b1", "points": points(3), "waveforms": [wave]}))
        assert (await client.post(f"{API}/telemetry/batch", **kwargs)).json()["accepted"] == 4
        state = gw.contexts["edgesentinel"].state
        now[0] = T0 + 8 * 86400  # the raw waveform is past its 7 days; nothing else is
        assert await state.expire() == 1 and await count(gw, "waveform") == 0 and await count(gw, "packet") == 1
        now[0] = T0 + 31 * 86400  # the key and the hashes are past dedup_days: the same batch is new again
        assert await state.expire() == 1 + 4 and await count(gw, "seen") == 0 and await count(gw, "point") == 3
        r = await client.post(f"{API}/telemetry/batch", **kwargs)
        assert r.headers["Idempotency-Replayed"] == "false" and r.json()["accepted"] == 4
        now[0] = T0 + 91 * 86400  # the series are past retention_days
        await state.expire()
        assert await count(gw, "point") == 0 and await count(gw, "window") == 0


async def test_retention_deletes_in_bounded_steps(gateway_factory, monkeypatch):
    """Each step is one short write transaction of at most STEP rows: other writes go between."""
    from gatewayd_edgesentinel import models

    monkeypatch.setattr(models, "STEP", 10)
    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        for device in ("es-1", "es-2"):
            node = await provision(gw, "edgesentinel", device)
            r = await client.post(f"{API}/telemetry/batch", **upload(node, compress({"points": points(20)})))
            assert r.json()["accepted"] == 20
        storage = gw.contexts["edgesentinel"].storage
        steps = []
        while n := await storage.write(models.expire_series, models.Point, "device", T0 + 15):  # 15 of each are old
            steps.append(n)
        assert steps == [10, 10, 10] and await count(gw, "point") == 10
        left = await storage.read(lambda: sorted(p.ts for p in models.Point.select()))
        assert left == [T0 + i for i in range(15, 20) for _ in range(2)]


async def test_a_batch_of_only_duplicates_stores_nothing_new_and_is_answered(gateway_factory, upstream_receiver):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        doc = {"batch_id": "file-7", "points": [*points(4), points(4)[0]]}  # the first point twice
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress(doc)))
        assert (r.json()["accepted"], r.json()["duplicates"]) == (4, 1)
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress(doc)))  # a new key: the node lost the answer
        assert r.status_code == 200 and (r.json()["accepted"], r.json()["duplicates"]) == (0, 5)
        assert await count(gw, "point") == 4 and await count(gw, "packet") == 2
        await upstream_receiver.wait_for(4)
        assert len(upstream_receiver.records()) == 4
