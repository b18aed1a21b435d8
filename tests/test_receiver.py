"""The reference receiver: the real QuartTrio app over real SQLite, and its CLI."""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from gatewayd.cli.receive import add_receive_arguments, parse_listen, run_receive
from gatewayd.core.upstream.receiver import ReceiverStore, create_receiver_app
from gatewayd.protocol.batch import decode_batch, encode_batch
from gatewayd.protocol.retry import parse_response

SECRET = b"receiver-test-secret"
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20


def record(rid, **changes):
    rec = {
        "id": rid,
        "family": "paku",
        "device": "pk-1",
        "kind": "telemetry",
        "ts": "2026-01-01T00:00:00.000Z",
        "class": "history",
        "data": {"t": rid},
    }
    rec.update(changes)
    return rec


def batch(ids, *, batch_id=None, gateway_id="site-7", secret=SECRET, compression="zstd"):
    return encode_batch(
        [record(i) for i in ids],
        gateway_id=gateway_id,
        batch_id=batch_id or str(uuid.uuid4()),
        secret=secret,
        compression=compression,
        now=time.time(),
    )


@asynccontextmanager
async def receiver(db_path, **kwargs):
    kwargs.setdefault("secrets", {"site-7": SECRET})
    app = create_receiver_app(db_path, **kwargs)
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def post(client, encoded):
    response = await client.post("/v1/batch", data=encoded.body, headers=encoded.headers)
    return response.status_code, await response.get_json(), response.headers


def rows(db_path, sql):
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def answer(accepted, duplicates=0, rejected_ids=()):
    return {
        "accepted": accepted,
        "duplicates": duplicates,
        "rejected": len(rejected_ids),
        "rejected_ids": list(rejected_ids),
    }


def counts(doc):
    return {key: doc[key] for key in ("accepted", "duplicates", "rejected", "rejected_ids")}


async def test_accepts_and_dedups_batches_and_records(tmp_path):
    db = tmp_path / "r.db"
    async with receiver(db) as client:
        first_id = str(uuid.uuid4())
        status, doc, _ = await post(client, batch([1, 2, 3], batch_id=first_id, compression="gzip"))
        assert (status, counts(doc), doc["next_hint"]) == (200, answer(3), None)

        # The same batch again, re-signed as a real retry would be: already delivered,
        # answered with the original counts.
        status, doc, _ = await post(client, batch([1, 2, 3], batch_id=first_id))
        assert (status, counts(doc)) == (409, answer(3))
        assert parse_response(status, {}, json.dumps(doc).encode()).kind == "already_delivered"

        # A new batch overlapping the first by record id.
        status, doc, _ = await post(client, batch([3, 4, 5, 5], compression="identity"))
        assert (status, counts(doc)) == (200, answer(2, duplicates=2))

        stats = (await (await client.get("/v1/stats")).get_json())
        assert stats == {"batches": 2, "records": 5, "gateways": {"site-7": 5}, "classes": {"history": 5}}
        assert (await (await client.get("/v1/health")).get_json()) == {"status": "ok"}

    assert rows(db, "SELECT record_id FROM records ORDER BY rowid") == [(1,), (2,), (3,), (4,), (5,)]
    assert rows(db, "SELECT batch_id, accepted, duplicates, rejected FROM batches ORDER BY rowid")[0] == (
        first_id, 3, 0, 0,
    )
    row = rows(db, 'SELECT gateway_id, family, device, kind, "class", ts, data FROM records WHERE record_id = 4')
    assert row == [("site-7", "paku", "pk-1", "telemetry", "history", "2026-01-01T00:00:00.000Z", '{"t":4}')]
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]


async def test_rejected_records_are_reported_and_the_rest_stored(tmp_path):
    db = tmp_path / "r.db"
    records = [record(1), record(2, ts="yesterday"), {"id": 3}, record("x", **{"class": "log"})]
    encoded = encode_batch(
        records, gateway_id="site-7", batch_id=str(uuid.uuid4()), secret=SECRET, compression="zstd", now=time.time()
    )
    async with receiver(db) as client:
        status, doc, _ = await post(client, encoded)
        assert (status, counts(doc)) == (200, answer(2, rejected_ids=[2, 3]))
        assert [r["index"] for r in doc["rejections"]] == [1, 2]
        assert "missing field(s): family, device, kind, ts, class, data" == doc["rejections"][1]["reason"]
        # A retry of it answers the original rejections too.
        status, doc, _ = await post(client, encoded)
        assert (status, counts(doc)) == (409, answer(2, rejected_ids=[2, 3]))
    # Integer and string ids keep their type.
    assert rows(db, "SELECT record_id, typeof(record_id) FROM records ORDER BY rowid") == [
        (1, "integer"), ("x", "text"),
    ]


async def test_record_ids_are_per_gateway(tmp_path):
    db = tmp_path / "r.db"
    async with receiver(db, secrets={"*": SECRET}) as client:
        assert (await post(client, batch([1, 2], gateway_id="site-7")))[0] == 200
        status, doc, _ = await post(client, batch([1, 2], gateway_id="site-8"))
        assert (status, counts(doc)) == (200, answer(2))


async def test_a_batch_id_of_another_gateway_is_refused(tmp_path):
    db = tmp_path / "r.db"
    key = str(uuid.uuid4())
    async with receiver(db, secrets={"*": SECRET}) as client:
        assert (await post(client, batch([1], batch_id=key, gateway_id="site-7")))[0] == 200
        status, doc, _ = await post(client, batch([9], batch_id=key, gateway_id="site-8"))
        assert (status, doc["error"]["code"]) == (400, "batch_id_conflict")
    assert rows(db, "SELECT gateway_id, record_id FROM records") == [("site-7", 1)]


async def test_bad_signature_is_401_and_stores_nothing(tmp_path):
    db = tmp_path / "r.db"
    async with receiver(db) as client:
        status, doc, _ = await post(client, batch([1, 2], secret=b"wrong secret"))
        assert (status, doc["error"]["code"]) == (401, "bad_signature")
        status, doc, _ = await post(client, batch([1], gateway_id="site-9"))
        assert (status, doc["error"]["code"]) == (401, "unknown_gateway")
        stats = await (await client.get("/v1/stats")).get_json()
        assert (stats["batches"], stats["records"]) == (0, 0)


async def test_stale_timestamp_is_401(tmp_path):
    async with receiver(tmp_path / "r.db", clock=lambda: time.time() + 3600) as client:
        status, doc, _ = await post(client, batch([1]))
        assert (status, doc["error"]["code"]) == (401, "stale_timestamp")


async def test_corrupt_and_oversized_bodies(tmp_path):
    async with receiver(tmp_path / "r.db", max_body_bytes=4096, max_decompressed_bytes=2048) as client:
        encoded = batch(range(100), compression="gzip")
        status, doc, _ = await post(client, encoded)
        assert (status, doc["error"]["code"]) == (413, "too_large")  # decompressed limit
        big = batch(range(2000), compression="identity")
        status, doc, _ = await post(client, big)
        assert (status, doc["error"]["code"]) == (413, "too_large")  # body limit
        broken = batch([1], compression="gzip")
        headers = dict(broken.headers, **{"Content-SHA256": "0" * 64})
        response = await client.post("/v1/batch", data=broken.body, headers=headers)
        assert response.status_code == 400
        assert (await response.get_json())["error"]["code"] == "sha256_mismatch"


async def test_http_errors_use_the_error_shape(tmp_path):
    async with receiver(tmp_path / "r.db") as client:
        response = await client.get("/v1/batch")
        assert response.status_code == 405
        assert (await response.get_json())["error"]["status"] == 405
        response = await client.get("/nowhere")
        error = (await response.get_json())["error"]
        assert (response.status_code, error["status"], error["code"]) == (404, 404, "not_found")


@pytest.mark.parametrize("code", [400, 500])
async def test_injected_status_stores_nothing(tmp_path, code):
    db = tmp_path / "r.db"
    async with receiver(db, status=code) as client:
        for _ in range(3):
            status, doc, _ = await post(client, batch([1, 2]))
            assert (status, doc["error"]["code"]) == (code, "injected_fault")
            assert doc["error"]["status"] == code
        stats = await (await client.get("/v1/stats")).get_json()
        assert stats["records"] == 0
    expected = "dead_letter" if code == 400 else "retry"
    assert parse_response(code, {}, json.dumps(doc).encode()).kind == expected


async def test_fail_rate_one_is_503_with_retry_after(tmp_path):
    async with receiver(tmp_path / "r.db", fail_rate=1.0, delay_ms=20) as client:
        status, doc, headers = await post(client, batch([1]))
        assert (status, headers["Retry-After"]) == (503, "1")
        outcome = parse_response(status, dict(headers), json.dumps(doc).encode())
        assert (outcome.kind, outcome.delay_s) == ("retry_after", 1.0)
        assert (await (await client.get("/v1/stats")).get_json())["records"] == 0


async def test_a_sender_gets_everything_through_a_flaky_receiver(tmp_path):
    """Half the batches fail: resending each until parse_response says delivered
    ends with every record stored exactly once."""
    db = tmp_path / "r.db"
    attempts = failures = 0
    async with receiver(db, fail_rate=0.5, rng=random.Random(7)) as client:
        for start in range(0, 100, 10):
            key = str(uuid.uuid4())
            while True:
                attempts += 1
                status, doc, headers = await post(client, batch(range(start, start + 10), batch_id=key))
                outcome = parse_response(status, dict(headers), json.dumps(doc).encode())
                if outcome.kind in ("delivered", "already_delivered"):
                    break
                assert outcome.kind == "retry_after"
                failures += 1
                assert attempts < 200
    assert failures > 0 and attempts > 10  # the seeded rng did inject faults
    assert rows(db, "SELECT COUNT(*), COUNT(DISTINCT record_id) FROM records") == [(100, 100)]


async def test_concurrent_posts_of_one_batch_store_it_once(tmp_path):
    db = tmp_path / "r.db"
    key = str(uuid.uuid4())
    statuses = []
    async with receiver(db) as client:

        async def send():
            statuses.append((await post(client, batch(range(50), batch_id=key)))[0])

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(send)
    assert sorted(statuses) == [200, 409, 409, 409, 409]
    assert rows(db, "SELECT COUNT(*) FROM records") == [(50,)]


# -- the CLI ----------------------------------------------------------------------


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_receive_arguments(parser)
    return parser.parse_args(list(argv))


def test_export_prints_every_record(tmp_path, capsys):
    db = tmp_path / "r.db"
    store = ReceiverStore(db)
    for gateway_id, ids in (("site-7", [1, 2]), ("site-8", ["b-1"])):
        encoded = batch(ids, gateway_id=gateway_id)
        decoded = decode_batch(encoded.body, encoded.headers, secret_for=lambda _: SECRET, now=time.time())
        assert store.store_batch(decoded, "2026-01-01T00:00:00.000Z")[0] == 200
    store.close()

    assert run_receive(parse("--db", str(db), "--export")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"gateway_id": "site-7", "record_id": 1, "family": "paku", "device": "pk-1", "kind": "telemetry",
         "class": "history", "ts": "2026-01-01T00:00:00.000Z", "data": {"t": 1}},
        {"gateway_id": "site-7", "record_id": 2, "family": "paku", "device": "pk-1", "kind": "telemetry",
         "class": "history", "ts": "2026-01-01T00:00:00.000Z", "data": {"t": 2}},
        {"gateway_id": "site-8", "record_id": "b-1", "family": "paku", "device": "pk-1", "kind": "telemetry",
         "class": "history", "ts": "2026-01-01T00:00:00.000Z", "data": {"t": "b-1"}},
    ]


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--listen", "localhost"], {"S": "x"}, "HOST:PORT"),
        (["--listen", "localhost:http"], {"S": "x"}, "HOST:PORT"),
        (["--listen", "localhost:70000"], {"S": "x"}, "HOST:PORT"),
        ([], {}, "S"),
        ([], {"S": ""}, "S"),
        (["--fail-rate", "1.5"], {"S": "x"}, "--fail-rate"),
        (["--status", "42"], {"S": "x"}, "--status"),
        (["--delay-ms", "-1"], {"S": "x"}, "--delay-ms"),
        (["--export", "--db", "/nonexistent/r.db"], {}, "no database"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, monkeypatch, capsys, argv, env, message):
    monkeypatch.delenv("S", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = parse("--db", str(tmp_path / "r.db"), "--secret-env", "S", *argv)
    assert run_receive(args) == 2
    assert message in capsys.readouterr().err


def test_parse_listen():
    assert parse_listen("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)


def _start(tmp_path, *argv):
    env = dict(os.environ, RECEIVER_SECRET=SECRET.decode(), PYTHONPATH=str(REPO))
    stderr = open(tmp_path / "stderr.log", "wb")  # a file: a full pipe would block it
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd.cli.receive", "--secret-env", "RECEIVER_SECRET",
         "--db", str(tmp_path / "r.db"), *argv],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr,
    )
    stderr.close()
    return proc


def _readline(proc, timeout):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().decode() if ready else ""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serves_and_stops_cleanly_on_signals(tmp_path, signum):
    proc = _start(tmp_path, "--listen", "127.0.0.1:0")
    try:
        line = _readline(proc, TIMEOUT_S)
        assert "listening on http://127.0.0.1:" in line, (line, (tmp_path / "stderr.log").read_text())
        url = line.split("listening on ")[1].split()[0]
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            encoded = batch([1, 2, 3])
            response = http.post("/v1/batch", content=encoded.body, headers=encoded.headers)
            assert response.status_code == 200, response.text
            assert response.json()["accepted"] == 3
            assert http.get("/v1/stats").json()["records"] == 3
        proc.send_signal(signum)
        assert proc.wait(timeout=TIMEOUT_S) == 0, (tmp_path / "stderr.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT_S)
        proc.stdout.close()
    assert rows(tmp_path / "r.db", "SELECT COUNT(*) FROM records") == [(3,)]


def test_an_address_in_use_exits_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _start(tmp_path, "--listen", f"127.0.0.1:{port}")
        try:
            assert proc.wait(timeout=TIMEOUT_S) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=TIMEOUT_S)
            proc.stdout.close()
    assert "cannot serve on" in (tmp_path / "stderr.log").read_text()
