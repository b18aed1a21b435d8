"""Upstream sync against the real reference receiver: delivery, priorities, 429/503, dead letters."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from array import array
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from gatewayd.core.upstream.receiver import create_receiver_app
from gatewayd.testing import gw_client, wait_until
from tests import plugin_ingest

INGEST = ("ingest", plugin_ingest)
SECRET = "test-upstream-secret"


@pytest.fixture(autouse=True)
def upstream_secret(monkeypatch):
    monkeypatch.setenv("GATEWAYD_UPSTREAM_SECRET", SECRET)


@asynccontextmanager
async def serve_app(app: QuartTrio, port: int = 0):
    """Serve a Quart app on 127.0.0.1 (port 0: a free one); yields its base URL."""
    config = HypercornConfig()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        try:
            yield binds[0]
        finally:
            stop.set()


@asynccontextmanager
async def receiver(db: Path, port: int = 0, **kwargs):
    """The reference receiver, served in this trio run."""
    app = create_receiver_app(db, {"*": SECRET.encode()}, **kwargs)
    async with serve_app(app, port) as url:
        yield url


def received(db: Path) -> list[dict]:
    """Every record the receiver stored: (record id, class, data)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    try:
        return [
            {"id": rid, "class": cls, "data": json.loads(data), "device": device}
            for rid, cls, data, device in conn.execute(
                'SELECT record_id, "class", data, device FROM records ORDER BY rowid'
            )
        ]
    except sqlite3.OperationalError:  # no table yet
        return []
    finally:
        conn.close()


def upstream_config(url: str, **keys) -> str:
    lines = ["[[upstream]]", 'name = "cloud"', f'url = "{url}"', "linger_s = 0.05"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


async def bulk(client: httpx.AsyncClient, start: int, count: int, cls="history", device="d1"):
    r = await client.post("/ingest/bulk", json={"device": device, "start": start, "count": count, "cls": cls})
    assert r.status_code == 201, r.text


async def deliver(gw, count: int, batches: int) -> None:
    """Ingest `count` records; return once the sink "cloud" has delivered `batches` batches."""
    async with gw_client(gw) as client:
        await bulk(client, 0, count)
    stats = gw.upstream.workers["cloud"].stats
    await wait_until(lambda: stats.batches.get("delivered") == batches)


async def ingest(client: httpx.AsyncClient, seqs, cls="history", device="d1"):
    for seq in seqs:
        r = await client.post("/ingest/records", json={"device": device, "seq": seq, "cls": cls})
        assert r.status_code == 201, r.text


async def test_records_reach_the_receiver_once(gateway_factory, tmp_path):
    db = tmp_path / "received.db"
    async with receiver(db) as url:
        async with gateway_factory(plugins=[INGEST], config_text=upstream_config(url)) as gw:
            async with gw_client(gw) as client:
                await ingest(client, range(50))
                r = await client.post("/ingest/bulk", json={"device": "d2", "start": 1000, "count": 3000})
                assert r.status_code == 201
            await wait_until(lambda: len(received(db)) >= 3050)
            await wait_until(lambda: gw.outbox.counts["sink:cloud"][0] == 0)
            assert gw.outbox.counts["class:history"] == [0, 0]
    got = received(db)
    assert sorted(r["data"]["seq"] for r in got) == list(range(50)) + list(range(1000, 4000))
    assert len({r["id"] for r in got}) == len(got)
    # `gatewayd receive` is wired into the CLI: its --export prints what it stored.
    import subprocess
    import sys

    done = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-m", "gatewayd", "receive", "--db", str(db), "--export"],
        capture_output=True, text=True, timeout=30))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 3050 and lines[0]["gateway_id"] == "test-gateway" and lines[0]["family"] == "ingest"


async def test_backlog_drains_in_priority_order(gateway_factory, tmp_path):
    db = tmp_path / "received.db"
    # The receiver is down while records of every class pile up.
    async with gateway_factory(plugins=[INGEST], config_text=upstream_config(
        "http://127.0.0.1:9", max_records=4, breaker_threshold=100,
    )) as gw:
        async with gw_client(gw) as client:
            seq = 0
            for cls in ("log", "history", "state", "alert", "command_ack"):
                for _ in range(6):
                    await ingest(client, [seq], cls=cls)
                    seq += 1
        assert gw.outbox.counts["sink:cloud"][0] == 30
    # Batches chosen while the receiver was down keep their records (and keys): they go first.
    conn = sqlite3.connect(tmp_path / "var" / "gatewayd.sqlite3")
    open_ids = [array("q", blob).tolist() for (blob,) in conn.execute(
        "SELECT record_ids FROM core_outbox_batch ORDER BY created")]
    conn.close()
    assert 1 <= len(open_ids) <= 2  # the one in flight, perhaps the next one prepared
    first = [i for ids in open_ids for i in ids]
    # Same data dir, receiver up: the backlog drains by class, newest state first.
    async with receiver(db) as url:
        async with gateway_factory(plugins=[INGEST], config_text=upstream_config(url, max_records=4)) as gw:
            await wait_until(lambda: len(received(db)) == 30)
    got = received(db)
    assert [r["id"] for r in got[: len(first)]] == first
    got = got[len(first):]
    classes = [r["class"] for r in got]
    order = ["command_ack", "alert", "state", "history", "log"]
    assert classes == sorted(classes, key=order.index)
    seqs = {c: [r["data"]["seq"] for r in got if r["class"] == c] for c in order}
    assert seqs["command_ack"] == sorted(seqs["command_ack"])  # oldest first
    assert seqs["alert"] == sorted(seqs["alert"])
    assert seqs["state"] == sorted(seqs["state"], reverse=True)  # newest first
    assert seqs["history"] == sorted(seqs["history"], reverse=True)  # backfill, walking back
    assert seqs["log"] == sorted(seqs["log"])


def flaky_receiver(db: Path, answers: list[tuple[int, dict, dict]], hold: Callable[[], Awaitable[None]] | None = None):
    """The reference receiver behind a front that first plays `answers` (status, headers, body);
    `hold()`, if given, is awaited before each request goes on to the receiver."""
    inner = create_receiver_app(db, {"*": SECRET.encode()})
    app = QuartTrio("flaky")
    seen: list[dict] = []

    @app.post("/v1/batch")
    async def batch():
        body = await request.get_data()
        seen.append({"key": request.headers["Idempotency-Key"], "at": trio.current_time(), "wall": time.time(),
                     "signed": int(request.headers["X-Gateway-Timestamp"])})
        if answers:
            status, headers, doc = answers.pop(0)
            return Response(json.dumps(doc), status=status, headers=headers, content_type="application/json")
        if hold is not None:
            await hold()
        async with inner.test_app() as test_app:
            client = test_app.test_client()
            r = await client.post("/v1/batch", data=body, headers=dict(request.headers))
            return Response(await r.get_data(), status=r.status_code, content_type="application/json")

    return app, seen


async def test_429_and_503_are_honoured_with_the_same_idempotency_key(gateway_factory, tmp_path):
    db = tmp_path / "received.db"
    app, seen = flaky_receiver(db, [
        (429, {"Retry-After": "2"}, {"error": {"code": "slow_down", "message": "x"}}),
        (503, {}, {"next_hint": "backoff_ms: 1500"}),
    ])
    async with serve_app(app) as url:
        async with gateway_factory(plugins=[INGEST], config_text=upstream_config(url)) as gw:
            async with gw_client(gw) as client:
                await bulk(client, 0, 5)
            stats = gw.upstream.workers["cloud"].stats
            await wait_until(lambda: stats.batches.get("delivered"))
            assert stats.batches == {"retry_after": 2, "delivered": 1}
    assert len(seen) == 3
    assert len({s["key"] for s in seen}) == 1  # one batch, one key, three attempts
    assert seen[1]["at"] - seen[0]["at"] >= 1.9  # Retry-After: 2 was waited for
    assert seen[2]["at"] - seen[1]["at"] >= 1.4  # next_hint 1500 ms was waited for


async def test_a_batch_encoded_ahead_is_signed_anew_when_it_waited_too_long(gateway_factory, tmp_path, monkeypatch):
    # The next batch is compressed and signed while the previous one is in flight; held
    # up behind a Retry-After longer than FRESH_S, it must not go out with an old timestamp.
    from gatewayd.core.upstream import worker

    monkeypatch.setattr(worker, "FRESH_S", 1.0)
    db = tmp_path / "received.db"
    app, seen = flaky_receiver(db, [(429, {"Retry-After": "3"}, {"error": {"code": "slow_down", "message": "x"}})])
    async with serve_app(app) as url:
        async with gateway_factory(plugins=[INGEST], config_text=upstream_config(url, max_records=3)) as gw:
            await deliver(gw, 6, batches=2)
    assert len(seen) == 3 and len({s["key"] for s in seen}) == 2
    assert seen[2]["at"] - seen[0]["at"] >= 2.9  # the second batch waited behind the first
    for attempt in seen:  # whole seconds on the wire: a fresh signature is at most 1 s behind
        assert attempt["wall"] - attempt["signed"] < 2, attempt
    assert len(received(db)) == 6


async def test_the_http_sink_says_sent_once_the_request_is_written_before_the_answer(tmp_path):
    # The worker holds its database work until then: a sink that never said so would
    # hold it until the answer, and a far end waiting for it would wait for ever.
    from gatewayd.core.upstream.http_sink import HttpSink
    from gatewayd.protocol.batch import encode_batch

    written = trio.Event()
    app = QuartTrio("waits-for-sent")

    @app.post("/v1/batch")
    async def batch():
        await request.get_data()
        await written.wait()
        return {"accepted": 1, "duplicates": 0, "rejected": 0, "next_hint": None}

    encoded = encode_batch([{"id": 1}], gateway_id="gw", batch_id="0b7e0d5e-2d4f-4a51-9d4e-7a1c3b5f6e70",
                           secret=b"s", compression="zstd", now=time.time())
    async with serve_app(app) as url:
        sink = HttpSink("cloud", url)
        with trio.fail_after(10):
            outcome = await sink.send(encoded, sent=written.set)
        await sink.aclose()
    assert outcome.kind == "delivered"


async def run_a_worker_twice(tmp_path: Path, sink, arrived: Callable[[], list[int]]) -> None:
    """What Upstream._supervise does after a crash: run() the same SyncWorker on `sink`
    again. Each run gets one record (data {"i": 0}, then {"i": 1}) and is ended from
    outside once it is delivered; `arrived()` (the far end's "i"s) must then show it."""
    from gatewayd.core.outbox.ingest import Ingest, Record
    from gatewayd.core.outbox.store import Outbox, OutboxPolicy
    from gatewayd.core.storage import Storage
    from gatewayd.core.upstream.worker import SyncWorker

    storage = Storage(tmp_path / "gw.sqlite3")
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        outbox = Outbox(storage, OutboxPolicy(), [sink.name])
        await outbox.open()
        ingest = Ingest(outbox, "fam", time.time)
        worker = SyncWorker(outbox, sink, gateway_id="site-7", secret=SECRET.encode(), linger_s=0, idle_poll_s=0.05)
        for attempt in range(2):
            await ingest.records([Record("d", "k", {"i": attempt}, None, "state")])
            async with trio.open_nursery() as run:
                run.start_soon(worker.run)
                await wait_until(lambda: outbox.counts[f"sink:{sink.name}"][0] == 0)
                run.cancel_scope.cancel()  # ended from outside, as a crash ends it
            await wait_until(lambda: sorted(arrived()) == list(range(attempt + 1)))
        nursery.cancel_scope.cancel()


async def test_a_worker_run_again_after_it_ended_still_delivers(tmp_path):
    # The first run closed its HTTP sink on the way out; the sink must open a new client.
    from gatewayd.core.upstream.http_sink import HttpSink

    db = tmp_path / "received.db"
    async with receiver(db) as url:
        await run_a_worker_twice(tmp_path, HttpSink("cloud", url), lambda: [r["data"]["i"] for r in received(db)])
    assert [r["data"]["i"] for r in received(db)] == [0, 1]


async def test_a_delivered_batch_is_committed_while_the_next_ones_answer_is_pending(gateway_factory, tmp_path):
    # The commit waits (at most GATE_MAX_S) for the next request to be written, never
    # for its answer: this far end answers only once the previous batch is committed.
    db = tmp_path / "received.db"
    gateway = {}

    def open_batches() -> list[str]:  # a reader job
        rows = gateway["gw"].storage.database.execute_sql("SELECT batch_id FROM core_outbox_batch").fetchall()
        return [key for (key,) in rows]

    async def previous_batch_committed() -> None:
        async def committed() -> bool:
            return seen[-2]["key"] not in await gateway["gw"].storage.read(open_batches)

        if len(seen) > 1:
            await wait_until(committed, timeout=10, step=0.01)

    app, seen = flaky_receiver(db, [], hold=previous_batch_committed)
    async with serve_app(app) as url:
        async with gateway_factory(plugins=[INGEST], config_text=upstream_config(url, max_records=3)) as gw:
            gateway["gw"] = gw
            await deliver(gw, 9, batches=3)
    assert len({s["key"] for s in seen}) == 3 and len(received(db)) == 9


async def test_a_next_hint_on_a_delivered_batch_delays_the_next_one(gateway_factory, tmp_path):
    db = tmp_path / "received.db"
    app, seen = flaky_receiver(db, [(200, {}, {"accepted": 3, "duplicates": 0, "rejected": 0,
                                               "next_hint": "backoff_ms: 1500"})])
    async with serve_app(app) as url:
        async with gateway_factory(plugins=[INGEST], config_text=upstream_config(url, max_records=3)) as gw:
            await deliver(gw, 6, batches=2)
            await wait_until(lambda: gw.outbox.counts["sink:cloud"][0] == 0)
    assert len(seen) == 2 and seen[1]["at"] - seen[0]["at"] >= 1.4
    assert len(received(db)) == 3  # the first batch was answered by the front, not stored


async def test_a_400_batch_is_dead_lettered_and_the_rest_flows(gateway_factory, tmp_path):
    db = tmp_path / "received.db"
    app, seen = flaky_receiver(db, [(400, {}, {"error": {"code": "bad_envelope", "message": "nope"}})])
    async with serve_app(app) as url:
        async with gateway_factory(plugins=[INGEST], config_text=upstream_config(url, max_records=3)) as gw:
            async with gw_client(gw) as client:
                await bulk(client, 0, 3)
                await wait_until(lambda: gw.upstream.workers["cloud"].stats.batches.get("dead_letter"))
                await bulk(client, 3, 3)
            await wait_until(lambda: len(received(db)) == 3)
            status = await gw.storage.read(gw.outbox.status)
            assert status["dead_letters"] == {"batches": 1, "records": 3}
            dead = await gw.storage.read(gw.outbox.dead_letters)
            assert dead[0]["status"] == 400 and "bad_envelope" in dead[0]["reason"]
            # An operator puts them back: they go out again, with their original ids.
            assert await gw.storage.write(gw.outbox.retry_dead) == (1, 3)
            await wait_until(lambda: len(received(db)) == 6, timeout=30)
    assert sorted(r["data"]["seq"] for r in received(db)) == list(range(6))


async def test_5xx_backs_off_then_delivers(gateway_factory, tmp_path):
    db = tmp_path / "received.db"
    app, seen = flaky_receiver(db, [(500, {}, {}), (502, {}, {})])
    async with serve_app(app) as url:
        async with gateway_factory(plugins=[INGEST], config_text=upstream_config(url)) as gw:
            async with gw_client(gw) as client:
                await bulk(client, 0, 2)
            worker = gw.upstream.workers["cloud"]
            await wait_until(lambda: worker.stats.batches.get("delivered"))
            assert worker.stats.batches == {"retry": 2, "delivered": 1}
            assert worker.backoff.attempt == 0  # reset by the success
    assert len({s["key"] for s in seen}) == 1
    # 1 s then 2 s nominal, each within ±25 %.
    assert seen[1]["at"] - seen[0]["at"] >= 0.75 and seen[2]["at"] - seen[1]["at"] >= 1.5


# -- 401/403: stop and alarm; 413: split ------------------------------------------------


def reserved_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def pausing_gateway(gateway_factory, port: int, **upstream):
    """A gateway with one sink to 127.0.0.1:`port`; its pause is 0.3 s (60 s doubling
    to 30 min in production, same logic). Yields (gateway, worker, HTTP client)."""
    from gatewayd.protocol.retry import Backoff

    config = upstream_config(f"http://127.0.0.1:{port}", **upstream)
    async with gateway_factory(plugins=[INGEST], config_text=config) as gw:
        worker = gw.upstream.workers["cloud"]
        worker.auth_backoff = Backoff(base=0.3, cap=0.3, jitter=0)
        async with gw_client(gw) as client:
            yield gw, worker, client


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_secret_pauses_the_sink_keeps_the_records_and_resumes(gateway_factory, tmp_path, status):
    db = tmp_path / "received.db"
    port = reserved_port()
    async with pausing_gateway(gateway_factory, port, max_records=10) as (gw, worker, client):
        # The far end refuses the gateway's credentials (fault injection: every batch 401/403).
        async with receiver(db, port=port, status=status):
            await bulk(client, 0, 25)
            await wait_until(lambda: worker.stats.batches.get("paused", 0) >= 3)
            health = await client.get("/health")
            component = health.json()["components"]["upstream.cloud"]
            assert health.status_code == 503 and component["state"] == "failed"
            assert f"HTTP {status} injected_fault" in component["reason"] and "secret" in component["reason"]
            assert component["paused"] is True and component["backlog"] == 25
            assert 'gatewayd_sync_paused{sink="cloud"} 1' in (await client.get("/metrics")).text
            # Nothing was set aside, nothing left the outbox, and every attempt kept the key.
            status_doc = await gw.storage.read(gw.outbox.status)
            assert status_doc["dead_letters"] == {"batches": 0, "records": 0}
            assert status_doc["sinks"]["cloud"]["backlog"] == 25
            assert status_doc["sinks"]["cloud"]["last_error"].startswith(f"paused: HTTP {status}")
            assert worker.stats.records.get("dead_lettered", 0) == 0
        assert received(db) == []
        # The secret is fixed at the far end: the next attempt after the pause goes through.
        async with receiver(db, port=port):
            await wait_until(lambda: len(received(db)) == 25)
            await wait_until(lambda: gw.outbox.counts["sink:cloud"][0] == 0)
            assert worker.paused is None
            component = (await client.get("/health")).json()["components"]["upstream.cloud"]
            assert component["state"] == "ok" and component["paused"] is False
    assert sorted(r["data"]["seq"] for r in received(db)) == list(range(25))


def receiver_at(db: Path, route: str) -> QuartTrio:
    """The reference receiver taking batches at `route` instead of /v1/batch."""
    inner = create_receiver_app(db, {"*": SECRET.encode()})
    app = QuartTrio("moved")

    @app.post(route)
    async def batch():
        body = await request.get_data()
        async with inner.test_app() as test_app:
            r = await test_app.test_client().post("/v1/batch", data=body, headers=dict(request.headers))
            return Response(await r.get_data(), status=r.status_code, content_type="application/json")

    return app


@pytest.mark.parametrize("status,base_path,keys", [
    (404, "/v1/batch", {}),  # the full path given as the base: batches go to /v1/batch/v1/batch
    (405, "", {"path": "/v1/health"}),  # an endpoint that exists, for GET only
])
async def test_an_upstream_url_answering_404_or_405_pauses_the_sink_instead_of_dead_lettering(
        gateway_factory, tmp_path, caplog, status, base_path, keys):
    from gatewayd.core.logs import KeyValueFormatter
    from gatewayd.protocol.retry import Backoff

    db = tmp_path / "received.db"
    port = reserved_port()
    base = f"http://127.0.0.1:{port}{base_path}"
    appended = keys.get("path", "/v1/batch")
    alarm = f"upstream answered {status} for {base}{appended}: check upstream.cloud.url, the gateway appends {appended}"
    config = upstream_config(base, max_records=10, **keys)
    async with gateway_factory(plugins=[INGEST], config_text=config) as gw, gw_client(gw) as client:
        worker = gw.upstream.workers["cloud"]
        worker.auth_backoff = Backoff(base=0.3, cap=0.3, jitter=0)  # 60 s doubling to 30 min in production
        with caplog.at_level(logging.ERROR, logger="gatewayd.sync"):
            async with receiver(db, port=port):  # takes batches at /v1/batch only
                await bulk(client, 0, 25)
                await wait_until(lambda: worker.stats.batches.get("paused", 0) >= 3)
                health = await client.get("/health")
                component = health.json()["components"]["upstream.cloud"]
                assert health.status_code == 503 and component["state"] == "failed"
                assert alarm in component["reason"] and component["paused"] is True, component
                assert 'gatewayd_sync_paused{sink="cloud"} 1' in (await client.get("/metrics")).text
                status_doc = await gw.storage.read(gw.outbox.status)
                assert status_doc["dead_letters"] == {"batches": 0, "records": 0}
                assert status_doc["sinks"]["cloud"]["backlog"] == 25
        assert any(alarm in KeyValueFormatter().format(r) for r in caplog.records if r.name == "gatewayd.sync")
        assert received(db) == []
        # The far end is fixed (it now takes batches where the gateway sends them): the sink resumes.
        async with serve_app(receiver_at(db, urlsplit(base + appended).path), port):
            await wait_until(lambda: gw.outbox.counts["sink:cloud"][0] == 0)
            assert worker.paused is None
            assert (await client.get("/health")).json()["components"]["upstream.cloud"]["state"] == "ok"
    assert sorted(r["data"]["seq"] for r in received(db)) == list(range(25))


async def test_a_404_upstream_fixed_in_the_configuration_delivers_what_waited(gateway_factory, tmp_path):
    db = tmp_path / "received.db"
    port = reserved_port()
    async with receiver(db, port=port) as url:
        wrong = upstream_config(f"{url}/v1/batch", max_records=10)
        async with gateway_factory(plugins=[INGEST], config_text=wrong) as gw, gw_client(gw) as client:
            await bulk(client, 0, 25)
            worker = gw.upstream.workers["cloud"]
            await wait_until(lambda: worker.paused is not None)
        assert received(db) == []
        async with gateway_factory(plugins=[INGEST], config_text=upstream_config(url, max_records=10)) as gw:
            await wait_until(lambda: len(received(db)) == 25)
            assert await gw.storage.read(gw.outbox.dead_letters) == []
    assert sorted(r["data"]["seq"] for r in received(db)) == list(range(25))


async def test_a_413_splits_the_batch_and_dead_letters_only_a_record_too_large_alone(gateway_factory, tmp_path):
    db = tmp_path / "received.db"
    # The far end takes at most 2,000 bytes a request; a record here is ~150 bytes unpacked.
    async with receiver(db, max_body_bytes=2000) as url:
        config = upstream_config(url, max_records=40, compression="identity")
        async with gateway_factory(plugins=[INGEST], config_text=config) as gw:
            async with gw_client(gw) as client:
                await ingest(client, [10_000], device="x" * 3000)  # too large even alone
                await bulk(client, 0, 40)
            worker = gw.upstream.workers["cloud"]
            await wait_until(lambda: len(received(db)) == 40 and worker.stats.batches.get("dead_letter"))
            await wait_until(lambda: gw.outbox.counts["sink:cloud"][0] == 0)
            dead = await gw.storage.read(gw.outbox.dead_letters)
            assert [(d["status"], d["records"]) for d in dead] == [(413, 1)] and "too_large" in dead[0]["reason"]
            assert worker.stats.batches["split"] >= 3  # 41 -> 21 + 20 -> ... until each half fits
            assert await gw.storage.read(lambda: gw.storage.database.execute_sql(
                "SELECT COUNT(*) FROM core_outbox_batch").fetchone()[0]) == 0
    got = received(db)
    assert sorted(r["data"]["seq"] for r in got) == list(range(40)) and len({r["id"] for r in got}) == 40


async def test_a_far_end_refusing_every_record_as_too_large_pauses_the_sink(gateway_factory, tmp_path):
    """A proxy's body limit below any record: not the records' fault. A few single
    records are dead-lettered, then the sink pauses and alarms; the rest stays."""
    from gatewayd.core.upstream.worker import TOO_LARGE_ALONE_MAX

    db = tmp_path / "received.db"
    port = reserved_port()
    async with pausing_gateway(gateway_factory, port, max_records=8, compression="identity") as (gw, worker, client):
        async with receiver(db, port=port, max_body_bytes=100):
            await bulk(client, 0, 30)
            await wait_until(lambda: worker.stats.batches.get("paused", 0) >= 2)
            component = (await client.get("/health")).json()["components"]["upstream.cloud"]
            assert component["state"] == "failed" and "body size limit" in component["reason"]
            dead = await gw.storage.read(gw.outbox.dead_letters)
            assert [(d["status"], d["records"]) for d in dead] == [(413, 1)] * TOO_LARGE_ALONE_MAX
            assert gw.outbox.counts["sink:cloud"][0] == 30 - TOO_LARGE_ALONE_MAX
        async with receiver(db, port=port):  # the limit fixed
            await wait_until(lambda: gw.outbox.counts["sink:cloud"][0] == 0)
            assert worker.paused is None
            assert await gw.storage.write(gw.outbox.retry_dead) == (TOO_LARGE_ALONE_MAX, TOO_LARGE_ALONE_MAX)
            await wait_until(lambda: len(received(db)) == 30)
    assert sorted(r["data"]["seq"] for r in received(db)) == list(range(30))


async def test_a_413_for_a_record_smaller_than_what_was_taken_before_pauses_instead(gateway_factory, tmp_path):
    """The far end's limit shrank (a proxy put in front): no record is set aside."""
    db = tmp_path / "received.db"
    port = reserved_port()
    async with pausing_gateway(gateway_factory, port, max_records=8, compression="identity") as (gw, worker, client):
        async with receiver(db, port=port):
            await bulk(client, 0, 8)
            await wait_until(lambda: len(received(db)) == 8)
        async with receiver(db, port=port, max_body_bytes=100):
            await bulk(client, 8, 8)
            await wait_until(lambda: worker.stats.batches.get("paused", 0) >= 1)
            assert "after taking" in worker.paused and await gw.storage.read(gw.outbox.dead_letters) == []
        async with receiver(db, port=port):
            await wait_until(lambda: len(received(db)) == 16)


# -- MQTT sink: a real mosquitto, a real paho subscriber -------------------------------


class PahoPublisher:
    """A `Publish` for the MQTT sink over a plain paho client (QoS 1, waits for PUBACK):
    the sink's contract with any publisher. Production wires `client_publisher()` over
    the gateway's MQTTClient (the next test but one)."""

    def __init__(self, port: int):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="gw-sink", protocol=paho.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    async def __call__(self, topic: str, payload: bytes, user_properties: list[tuple[str, str]]) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = user_properties
        info = self.client.publish(topic, payload, qos=1, properties=props)
        await trio.to_thread.run_sync(info.wait_for_publish, 10)
        if not info.is_published():
            raise RuntimeError("no PUBACK")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@asynccontextmanager
async def cloud_broker():
    """A plain mosquitto on a free port and a cloud-side MQTT 5 subscriber to
    `gatewayd/+/batch`; yields (port, messages received)."""
    import subprocess

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from gatewayd.testing import reserved_port as free_mqtt_port

    port = free_mqtt_port()
    broker = subprocess.Popen(["/usr/sbin/mosquitto", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    got: list = []
    cloud = paho.Client(CallbackAPIVersion.VERSION2, client_id="cloud", protocol=paho.MQTTv5)
    cloud.on_message = lambda c, u, msg: got.append(msg)
    try:
        def connected() -> bool:
            try:
                cloud.connect("127.0.0.1", port)
                return True
            except OSError:
                return False

        await wait_until(connected, timeout=10, step=0.05, what="mosquitto listens")  # it takes a moment
        cloud.subscribe("gatewayd/+/batch", qos=1)
        cloud.loop_start()
        yield port, got
    finally:
        cloud.loop_stop()
        broker.terminate()
        broker.wait(timeout=5)


def batches_from(messages: list) -> list:
    """Verify and decode every batch published, as the cloud's consumer would."""
    import time

    from gatewayd.protocol.batch import decode_batch

    out = []
    for msg in messages:
        headers = dict(msg.properties.UserProperty)
        assert headers["content-encoding"] == "zstd" and "x-gateway-signature" in headers
        batch = decode_batch(msg.payload, headers, secret_for=lambda g: SECRET.encode(), now=time.time())
        assert msg.topic == f"gatewayd/{batch.gateway_id}/batch" and msg.qos == 1
        out.append(batch)
    return out


async def test_mqtt_sink_publishes_signed_batches_delivered_on_puback(tmp_path):
    from gatewayd.core.outbox.ingest import Ingest, Record
    from gatewayd.core.outbox.store import Outbox, OutboxPolicy
    from gatewayd.core.storage import Storage
    from gatewayd.core.upstream.mqtt_sink import MqttSink
    from gatewayd.core.upstream.worker import SyncWorker

    with trio.fail_after(30):
        async with cloud_broker() as (port, got):
            publisher = PahoPublisher(port)
            storage = Storage(tmp_path / "gw.sqlite3")
            async with trio.open_nursery() as nursery:
                await nursery.start(storage.run)
                outbox = Outbox(storage, OutboxPolicy(), ["cloudmq"])
                await outbox.open()
                await Ingest(outbox, "fam", lambda: 1_800_000_000.0).records(
                    [Record("d", "k", {"i": i}, None, "state") for i in range(12)])
                sink = MqttSink("cloudmq", publisher, gateway_id="site-7")
                worker = SyncWorker(outbox, sink, gateway_id="site-7", secret=SECRET.encode(), max_records=5,
                                    linger_s=0)
                await nursery.start(worker.run)
                await wait_until(lambda: outbox.counts["sink:cloudmq"][0] == 0)
                await wait_until(lambda: len(got) >= 3)
                nursery.cancel_scope.cancel()
            publisher.close()
    batches = batches_from(got)
    assert {b.gateway_id for b in batches} == {"site-7"}
    assert sorted(r["data"]["i"] for b in batches for r in b.records) == list(range(12))
    assert worker.stats.batches == {"delivered": 3}


async def test_an_mqtt_upstream_in_the_config_delivers_through_the_gateways_own_client(gateway_factory):
    """`kind = "mqtt"` end to end: config -> Upstream -> MQTTClient (MQTT 5 user
    properties) -> a real mosquitto -> a cloud subscriber that verifies every batch."""
    with trio.fail_after(30):
        async with cloud_broker() as (port, got):
            config = (f'[[upstream]]\nname = "cloudmq"\nkind = "mqtt"\nurl = "mqtt://127.0.0.1:{port}"\n'
                      'max_records = 10\nlinger_s = 0.05\n')
            async with gateway_factory(plugins=[INGEST], config_text=config) as gw:
                assert gw.upstream.problems == {}
                async with gw_client(gw) as client:
                    await bulk(client, 0, 25)
                    await wait_until(lambda: gw.outbox.counts["sink:cloudmq"][0] == 0)
                    component = (await client.get("/health")).json()["components"]["upstream.cloudmq"]
                    assert component["state"] == "ok", component
                worker = gw.upstream.workers["cloudmq"]
                assert worker.stats.batches == {"delivered": 3}
            await wait_until(lambda: len(got) >= 3)
    batches = batches_from(got)
    assert sorted(r["data"]["seq"] for b in batches for r in b.records) == list(range(25))


async def test_an_mqtt_upstream_worker_run_again_after_it_ended_still_delivers(tmp_path):
    # The MQTT twin of test_a_worker_run_again_after_it_ended_still_delivers: the
    # sink's own client is run again by the second run.
    from gatewayd.core.config import UpstreamSection
    from gatewayd.core.upstream.mqtt_sink import cloud_sink

    with trio.fail_after(40):
        async with cloud_broker() as (port, got):
            sink = cloud_sink(UpstreamSection("cloudmq", f"mqtt://127.0.0.1:{port}", kind="mqtt", timeout_s=10.0),
                              "site-7")
            await run_a_worker_twice(tmp_path, sink,
                                     lambda: [r["data"]["i"] for b in batches_from(got) for r in b.records])
    assert sorted(r["data"]["i"] for b in batches_from(got) for r in b.records) == [0, 1]


def test_the_mqtt_sink_refuses_a_3_1_1_client_at_set_up():
    from gatewayd.core.mqtt.client import MQTTClient, MQTTSettings
    from gatewayd.core.upstream.mqtt_sink import client_publisher

    with pytest.raises(ValueError, match="needs MQTT 5"):
        client_publisher(MQTTClient(MQTTSettings(protocol="3.1.1")))
