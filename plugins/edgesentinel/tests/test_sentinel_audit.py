"""Issue #18's audit (docs/audit/issue-18.md): the items no other test proved against a
real gateway, and the attacks that found defects. Each test names the requirement."""

from __future__ import annotations

import gzip
import hashlib
import io
import uuid

import pytest
import trio
import zstandard
from sentinel_testbed import API, OPEN, PLUGIN, compress, points, sign, upload

from gatewayd.testing import gw_client, provision

BATCH = f"{API}/telemetry/batch"


async def count(gw, table: str) -> int:
    def read() -> int:
        return int(gw.storage.database.execute_sql(f'SELECT count(*) FROM "edgesentinel_{table}"').fetchone()[0])

    return await gw.storage.read(read)


def gzip_bomb() -> bytes:
    return gzip.compress(b'{"points": [' + b" " * (3 << 20) + b"]}", compresslevel=9)


def zstd_bomb_without_its_size() -> bytes:
    """Streamed: the frame header does not say how large it inflates (a node's streaming
    compressor, or a hostile one that leaves it out)."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=19, write_content_size=False).stream_writer(out, closefd=False) as w:
        w.write(b'{"points": [')
        for _ in range(48):
            w.write(b" " * (64 << 10))
        w.write(b"]}")
    return out.getvalue()


@pytest.mark.parametrize("encoding, body", [("gzip", gzip_bomb), ("zstd", zstd_bomb_without_its_size)])
async def test_a_bomb_is_refused_whatever_its_encoding(gateway_factory, encoding, body):
    """Decompressed-size cap (max_decompressed_bytes) for gzip and for a zstd frame with no size."""
    settings = [*OPEN, "plugins.edgesentinel.max_decompressed_bytes=1048576"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        data = body()
        assert len(data) < 64 << 10  # small as sent: only the cap refuses it
        r = await client.post(BATCH, **upload(node, data, encoding=encoding))
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_large", r.text
        assert "decompresses to more than 1048576 bytes" in r.json()["error"]["message"]
        assert await count(gw, "packet") == 0


async def test_one_key_sent_many_times_at_once_is_stored_once(gateway_factory):
    """Idempotency-Key, concurrent: the same key and body six times at once, one answer, one store;
    the same key with two bodies at once, one stored and the other 409."""
    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        kwargs = upload(node, compress({"points": points(50)}))
        answers = []

        async def post(kw) -> None:
            r = await client.post(BATCH, **kw)
            answers.append((r.status_code, r.json(), r.headers.get("Idempotency-Replayed")))

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(post, kwargs)
        assert {(s, str(doc)) for s, doc, _ in answers} == {(200, str(answers[0][1]))}
        assert sorted(replayed for *_, replayed in answers) == ["false", *["true"] * 5]
        assert answers[0][1]["accepted"] == 50
        assert await count(gw, "point") == 50 and await count(gw, "packet") == 1

        key = str(uuid.uuid4())
        answers.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(post, upload(node, compress({"points": points(7, start=2e9)}), key=key))
            nursery.start_soon(post, upload(node, compress({"points": points(9, start=2e9)}), key=key))
        assert sorted(s for s, *_ in answers) == [200, 409], answers
        (stored,) = [doc["accepted"] for s, doc, _ in answers if s == 200]
        assert await count(gw, "point") == 50 + stored and await count(gw, "packet") == 2


async def test_a_signature_required_for_one_device_only(gateway_factory):
    """X-Signature required per device (`[plugins.edgesentinel.devices.<id>] signature = "required"`)."""
    settings = [*OPEN, "plugins.edgesentinel.devices.es-2.signature='required'"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        one, two = await provision(gw, "edgesentinel", "es-1"), await provision(gw, "edgesentinel", "es-2")
        body = compress({"points": points(2)})
        assert (await client.post(BATCH, **upload(one, body))).status_code == 200
        r = await client.post(BATCH, **upload(two, body))
        assert r.status_code == 401 and "missing X-Signature header" in r.json()["error"]["message"]
        now = str(int(gw.clock()))
        r = await client.post(BATCH, **upload(two, body, **{"X-Timestamp": now,
                                                            "X-Signature": sign(two.signing_secret, body, now)}))
        assert r.status_code == 200 and r.json()["accepted"] == 2, r.text


async def test_a_captured_signed_batch_replayed_under_another_key_is_refused(gateway_factory):
    """Replay protection of a required signature: the timestamp window alone let a captured
    request be sent again under a new Idempotency-Key (the signature does not cover the
    header), and its records, deduplicated per batch_id (the key, when the body has none),
    were stored twice."""
    settings = [*OPEN, "plugins.edgesentinel.signature='required'"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        body = compress({"points": points(2)})
        now = str(int(gw.clock()))
        signed = {"X-Timestamp": now, "X-Signature": sign(node.signing_secret, body, now)}
        sent = upload(node, body, **signed)
        first = await client.post(BATCH, **sent)
        assert first.status_code == 200 and first.json()["accepted"] == 2, first.text
        # The node's own retry (its answer lost): the same key, answered from the ledger.
        again = await client.post(BATCH, **sent)
        assert again.status_code == 200 and again.headers["Idempotency-Replayed"] == "true"
        # Someone who captured it sends it again under another key.
        replay = await client.post(BATCH, **upload(node, body, **signed))
        assert replay.status_code == 401 and "replay" in replay.json()["error"]["message"], replay.text
        assert await count(gw, "point") == 2


async def test_the_csv_export_streams_a_page_at_a_time(gateway_factory, monkeypatch):
    """CSV export streamed (a month of data must not load into memory): the client has the
    first rows while the export's third page is still held in the database read."""
    import threading

    from gatewayd_edgesentinel import models

    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", "audit-token")
    monkeypatch.setattr("gatewayd_edgesentinel.explorer.PAGE", 7)
    explore, pages, release = models.explore, [], threading.Event()

    def held(*args):
        pages.append(args)
        if len(pages) == 3:
            release.wait(30)  # the third page waits until the client has seen rows
        return explore(*args)

    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        assert (await client.post(BATCH, **upload(node, compress({"points": points(50)})))).status_code == 200
        monkeypatch.setattr(models, "explore", held)
        try:
            async with client.stream("GET", "/edgesentinel/data",
                                     headers={"Authorization": "Bearer audit-token"}) as r:
                chunks = r.aiter_bytes()
                first = b""
                with trio.fail_after(20):  # a route that gathered every page first never answers here
                    while first.count(b"\n") < 15:  # the header and two pages
                        first += await chunks.__anext__()
                assert len(pages) in (2, 3) and not release.is_set()  # the third not answered yet
                release.set()
                rest = b"".join([first, *[c async for c in chunks]])
        finally:
            release.set()
    lines = rest.decode().splitlines()
    assert lines[0].startswith("ts,device_id,metric") and len(lines) == 51


async def test_restamping_rescues_a_node_whose_clock_was_reset(gateway_factory):
    """Server re-stamping on request: the case it is for, a node whose RTC lost power and
    counts from 1970 again. Records are placed by `received - sent_at`; the range check
    (2000-2200) applies to the time stored, and a record still outside it after the
    shift is rejected alone."""
    now = 1_796_286_000.0
    async with gateway_factory(plugins=PLUGIN, settings=OPEN, clock=lambda: now) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        doc = {"batch_id": "buf-1", "restamp": True, "sent_at": 600.0, "points": [*points(5, start=500.0),
                                                             {"ts": 600.0 - now, "metric": "x", "value": 1}]}
        r = await client.post(BATCH, **upload(node, compress(doc)))
        assert r.status_code == 200, r.text
        answer = r.json()
        assert (answer["accepted"], answer["rejected"]) == (5, 1), answer
        assert answer["rejections"][0]["index"] == 5 and "ts: " in answer["rejections"][0]["reason"]

        def stamps() -> list[float]:
            return [row[0] for row in gw.storage.database.execute_sql(
                'SELECT ts FROM "edgesentinel_point" ORDER BY ts').fetchall()]

        assert await gw.storage.read(stamps) == [now - 100 + i for i in range(5)]
        # The same records sent again (the node lost the answer) under a new key, a little later: duplicates.
        again = await client.post(BATCH, **upload(node, compress({**doc, "sent_at": 610.0})))
        assert again.status_code == 200 and (again.json()["accepted"], again.json()["duplicates"]) == (0, 5)
        assert await gw.storage.read(stamps) == [now - 100 + i for i in range(5)]


async def test_a_csv_export_longer_than_the_response_timeout_is_whole(gateway_factory, monkeypatch):
    """A month of data takes minutes to export (1,000,000 points: about a minute on the
    development box); quart stops any response body at RESPONSE_TIMEOUT and the
    connection is closed mid-body. Here that timeout is 0.5 s and one page takes 1 s."""
    import time as clock

    from gatewayd_edgesentinel import models

    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", "audit-token")
    monkeypatch.setattr("gatewayd_edgesentinel.explorer.PAGE", 7)
    explore, pages = models.explore, []

    def slow(*args):
        pages.append(args)
        if len(pages) == 3:
            clock.sleep(1.0)  # a page of a large table, on a busy box
        return explore(*args)

    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        assert (await client.post(BATCH, **upload(node, compress({"points": points(50)})))).status_code == 200
        gw.app.config["RESPONSE_TIMEOUT"] = 0.5
        monkeypatch.setattr(models, "explore", slow)
        r = await client.get("/edgesentinel/data", headers={"Authorization": "Bearer audit-token"})
    assert r.status_code == 200 and len(r.text.splitlines()) == 51, (len(r.text.splitlines()), r.text[-200:])


@pytest.mark.parametrize("params", [{}, {"since": "2026-01-01T00:00:10Z"}])
async def test_every_page_of_an_export_reads_through_an_index(gateway_factory, monkeypatch, params):
    """A month of a site's points is tens of millions of rows: a page that scans and sorts
    the table makes the export quadratic (1,000,000 points unfiltered: 11,000 rows/s and
    falling, against 17,000 through the metric's index, on the development box). Every
    page's query plan must read an index in order, with no temporary sort."""
    from gatewayd_edgesentinel import models

    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", "audit-token")
    monkeypatch.setattr("gatewayd_edgesentinel.explorer.PAGE", 7)
    explore, plans = models.explore, []

    def planned(*args):
        sql, values = models.explore_sql(*args)
        connection = models._connection(models.Point._meta.database)
        plans.append(" / ".join(row[-1] for row in connection.execute("EXPLAIN QUERY PLAN " + sql, values)))
        return explore(*args)

    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        for device in ("es-1", "es-2", "es-3"):
            node = await provision(gw, "edgesentinel", device)
            doc = {"points": [*points(20), *points(10, metric="rh_pct")]}
            assert (await client.post(BATCH, **upload(node, compress(doc)))).status_code == 200
        monkeypatch.setattr(models, "explore", planned)
        r = await client.get("/edgesentinel/data", params=params, headers={"Authorization": "Bearer audit-token"})
    rows = [line.split(",") for line in r.text.splitlines()[1:]]
    keys = [(float(row[0]), int(row[-1])) for row in rows]
    assert keys == sorted(keys) and len(rows) == (90 if not params else 30)  # oldest first, all of them
    assert plans and not [plan for plan in plans if "TEMP B-TREE" in plan or "INDEX" not in plan], plans


async def test_a_bogus_signature_does_not_spend_the_nodes_nonce(gateway_factory):
    settings = [*OPEN, "plugins.edgesentinel.signature='required'"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        body = compress({"points": points(2)})
        nonce = (await client.post(f"{API}/auth/handshake",
                                   headers={"X-Device-Id": "es-1", "X-Auth-Key": node.key})).json()["nonce"]
        now = str(int(gw.clock()))
        bogus = await client.post(BATCH, **upload(node, body, **{"X-Timestamp": now, "X-Nonce": nonce,
                                                                  "X-Signature": "ab" * 32}))
        assert bogus.status_code == 401 and bogus.json()["error"]["message"] == "bad signature", bogus.text
        signed = {"X-Timestamp": now, "X-Nonce": nonce, "X-Signature": sign(node.signing_secret, body, now, nonce)}
        r = await client.post(BATCH, **upload(node, body, **signed))
        assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
        r = await client.post(BATCH, **upload(node, body, **signed))  # still once
        assert r.status_code == 401, r.text
