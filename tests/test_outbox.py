"""The outbox: capacity and its policies, TTL, several sinks, batches that survive restarts."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import trio

from gatewayd.core.outbox.ingest import Record
from gatewayd.core.outbox.store import OutboxFull, OutboxLimits, OutboxPolicy, wire_records
from gatewayd.core.storage import StorageFull
from gatewayd.testing import gw_client
from tests import plugin_ingest
from tests.test_ingest import Row, fresh, open_ingest
from tests.test_sync import SECRET, upstream_config


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def recs(n, cls="history", start=0):
    return [Record("d", "k", {"i": i}, None, cls) for i in range(start, start + n)]


async def seqs_in_outbox(storage, cls=None):
    where = "" if cls is None else f" WHERE prio = (SELECT {['command_ack', 'alert', 'state', 'history', 'log'].index(cls)})"
    rows = await storage.read(lambda: storage.database.execute_sql(f"SELECT data FROM core_outbox{where} ORDER BY id").fetchall())
    import json

    return [json.loads(d)["i"] for (d,) in rows]


async def test_class_limit_drops_the_oldest_of_that_class_and_says_so(tmp_path, caplog):
    policy = OutboxPolicy(classes={"history": OutboxLimits(max_rows=10)})
    async with open_ingest(tmp_path, policy=policy) as (ingest, outbox, storage):
        await ingest.records(recs(8))
        await ingest.records(recs(3, "alert"))
        with caplog.at_level(logging.WARNING, logger="gatewayd.outbox"):
            await ingest.records(recs(7, start=8))
        assert await seqs_in_outbox(storage, "history") == list(range(5, 15))
        assert outbox.dropped == {("history", "capacity"): 5}
        assert outbox.counts["class:history"][0] == 10 and outbox.counts["class:alert"][0] == 3
        assert outbox.counts["sink:cloud"][0] == 13
        [warning] = [r for r in caplog.records if "dropped the oldest" in r.getMessage()]
        assert warning.fields == {"history_capacity": 5}


async def test_total_limit_drops_the_lowest_class_first(tmp_path):
    policy = OutboxPolicy(max_rows=10)
    async with open_ingest(tmp_path, policy=policy) as (ingest, outbox, storage):
        await ingest.records(recs(4, "log"))
        await ingest.records(recs(4, "history", start=100))
        await ingest.records(recs(5, "command_ack", start=200))
        # 13 > 10: the 3 oldest logs go, then acks keep coming and the rest of logs, then history.
        assert await seqs_in_outbox(storage, "log") == [3]
        await ingest.records(recs(3, "command_ack", start=205))
        assert await seqs_in_outbox(storage, "log") == []
        assert await seqs_in_outbox(storage, "history") == [102, 103]
        assert await seqs_in_outbox(storage, "command_ack") == list(range(200, 208))
        assert outbox.dropped == {("log", "capacity"): 4, ("history", "capacity"): 2}
        assert sum(outbox.counts[f"class:{c}"][0] for c in ("log", "history", "command_ack")) == 10


async def test_reject_policy_refuses_new_records_and_the_family_rows_with_them(tmp_path):
    policy = OutboxPolicy(policy="reject", max_bytes=300)  # a record here is 12-13 bytes
    async with open_ingest(tmp_path, policy=policy) as (ingest, outbox, storage):
        await ingest.records(recs(10))
        with pytest.raises(OutboxFull) as info:
            await ingest.records(recs(50), family_rows=lambda: Row.insert(device="x", n=1).execute())
        assert isinstance(info.value, StorageFull)  # plugins answer 507 for both
        assert fresh(tmp_path / "gw.sqlite3", "SELECT COUNT(*) FROM fam_row") == [(0,)]
        assert await seqs_in_outbox(storage) == list(range(10))
        assert outbox.refused == {"history": 50} and outbox.dropped == {}


async def test_reject_policy_answers_507_to_the_device(gateway_factory, monkeypatch):
    monkeypatch.setenv("GATEWAYD_UPSTREAM_SECRET", SECRET)
    text = upstream_config("http://127.0.0.1:9") + "[outbox]\npolicy = 'reject'\n[outbox.classes.history]\nmax_rows = 3\n"
    async with gateway_factory(plugins=[("ingest", plugin_ingest)], config_text=text) as gw:
        async with gw_client(gw) as client:
            codes = [(await client.post("/ingest/records", json={"device": "d", "seq": i})).status_code for i in range(5)]
            assert codes == [201, 201, 201, 507, 507]
            metrics = (await client.get("/metrics")).text
            assert 'gatewayd_outbox_refused_total{class="history"} 2' in metrics
            assert 'gatewayd_outbox_records{class="history"} 3' in metrics
            health = (await client.get("/health")).json()
            assert health["components"]["upstream.cloud"]["backlog"] == 3


async def test_ttl_expires_old_records_and_counts_them(tmp_path):
    clock = Clock()
    policy = OutboxPolicy(classes={"log": OutboxLimits(ttl_s=3600), "alert": OutboxLimits(ttl_s=0)})
    async with open_ingest(tmp_path, policy=policy, clock=clock) as (ingest, outbox, storage):
        await ingest.records(recs(3, "log") + recs(2, "alert"))
        clock.now += 1800
        await ingest.records(recs(2, "log", start=3))
        assert await outbox.expire() == {}
        clock.now += 2000  # the first 3 logs are 3800 s old, the last 2 are 2000 s
        assert await outbox.expire() == {("log", "ttl"): 3}
        assert await seqs_in_outbox(storage, "log") == [3, 4]
        assert await seqs_in_outbox(storage, "alert") == [0, 1]  # ttl 0: never expires
        assert outbox.dropped == {("log", "ttl"): 3}
        assert outbox.oldest[4] == clock.now - 2000


async def test_a_record_leaves_only_when_every_sink_has_it(tmp_path):
    async with open_ingest(tmp_path, sinks=("a", "b")) as (ingest, outbox, storage):
        await ingest.records(recs(5))
        batch_a = await outbox.next_batch("a", max_records=3, max_bytes=1 << 20)
        await outbox.delivered(batch_a)
        assert len(await seqs_in_outbox(storage)) == 5  # b has not delivered them yet
        assert outbox.counts["sink:a"][0] == 2 and outbox.counts["sink:b"][0] == 5
        # a's next batch skips what a already delivered; b gets everything.
        rest_a = await outbox.next_batch("a", max_records=10, max_bytes=1 << 20)
        assert batch_a.ids == [5, 4, 3] and rest_a.ids == [2, 1]  # history: newest first
        batch_b = await outbox.next_batch("b", max_records=10, max_bytes=1 << 20)
        assert len(batch_b.records) == 5
        await outbox.delivered(batch_b)
        assert sorted(await seqs_in_outbox(storage)) == sorted(r["data"]["i"] for r in wire_records(rest_a.records))
        await outbox.delivered(rest_a)
        assert await seqs_in_outbox(storage) == []
        assert outbox.counts["class:history"] == [0, 0]
        assert outbox.counts["sink:a"] == [0, 0] and outbox.counts["sink:b"] == [0, 0]


@pytest.mark.parametrize("sinks", [("cloud",), ("cloud", "other")])
async def test_delivering_a_batch_with_a_gap_keeps_the_record_in_the_gap(tmp_path, sinks):
    # A batch of one class is usually a run of consecutive ids, released as one id
    # range; one with a hole (here: an excluded id) must release exactly its own.
    async with open_ingest(tmp_path, sinks=sinks) as (ingest, outbox, storage):
        await ingest.records(recs(10))
        batch = await outbox.next_batch("cloud", max_records=100, max_bytes=1 << 20, exclude={5})
        assert batch.ids == [10, 9, 8, 7, 6, 4, 3, 2, 1]
        await outbox.delivered(batch)
        assert outbox.counts["sink:cloud"][0] == 1
        assert outbox.counts["class:history"][0] == (1 if sinks == ("cloud",) else 10)
        [left] = (await outbox.next_batch("cloud", max_records=100, max_bytes=1 << 20)).ids
        assert left == 5
        if sinks == ("cloud",):
            assert await seqs_in_outbox(storage) == [4]  # the record with id 5 (data i=4)
        else:  # the other sink still owes all ten: only cloud's bit went
            assert len((await outbox.next_batch("other", max_records=100, max_bytes=1 << 20)).ids) == 10


def test_id_sets_use_a_range_only_for_a_whole_interval():
    from gatewayd.core.outbox.store import _id_sets

    assert _id_sets([7, 6, 5]) == [("id BETWEEN ? AND ?", (5, 7))]
    assert _id_sets([1, 3]) == [("id IN (?,?)", (1, 3))]
    assert _id_sets([1, 1, 3]) == [("id IN (?,?,?)", (1, 1, 3))]  # as many ids as the span, but not all of it
    assert [len(args) for _, args in _id_sets(list(range(0, 4000, 2)))] == [900, 900, 200]


async def test_batches_are_paged_and_capped_by_records_and_bytes(tmp_path):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        await ingest.records([Record("d", "k", {"pad": "x" * 900, "i": i}) for i in range(30)])
        batch = await outbox.next_batch("cloud", max_records=100, max_bytes=10_000)
        assert 8 <= len(batch.records) <= 10  # ~1 KB each against a 10 KB cap
        more = await outbox.next_batch("cloud", max_records=5, max_bytes=1 << 20, exclude=set(batch.ids))
        assert len(more.records) == 5 and not set(more.ids) & set(batch.ids)


async def test_an_open_batch_keeps_its_key_and_records_across_a_restart(tmp_path):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        await ingest.records(recs(4, "state") + recs(3, "command_ack", start=10))
        batch = await outbox.next_batch("cloud", max_records=5, max_bytes=1 << 20)
        assert [r["class"] for r in wire_records(batch.records)] == ["command_ack"] * 3 + ["state"] * 2
        assert [r["data"]["i"] for r in wire_records(batch.records)] == [10, 11, 12, 3, 2]  # newest state first
    async with open_ingest(tmp_path) as (ingest, outbox, storage):  # "after the crash"
        [again] = await outbox.open_batches("cloud")
        assert again.batch_id == batch.batch_id and again.ids == batch.ids
        assert outbox.counts["sink:cloud"][0] == 7  # counts are in the database, exact after a restart
        await outbox.delivered(again)
        assert await outbox.open_batches("cloud") == []
        assert await seqs_in_outbox(storage, "state") == [0, 1]


async def test_a_resumed_batch_carries_only_what_its_sink_still_owes(tmp_path):
    # An orphan batch row (persisted by a worker that was cancelled) whose records the
    # same sink delivered meanwhile under another batch: b still needs the rows, a must
    # not send them again after a restart.
    async with open_ingest(tmp_path, sinks=("a", "b")) as (ingest, outbox, storage):
        await ingest.records(recs(4))
        orphan = await outbox.next_batch("a", max_records=10, max_bytes=1 << 20)
    async with open_ingest(tmp_path, sinks=("a", "b")) as (ingest, outbox, storage):
        again = await outbox.next_batch("a", max_records=10, max_bytes=1 << 20)  # nobody resumed the orphan
        assert again.ids == orphan.ids and again.batch_id != orphan.batch_id
        await outbox.delivered(again)
        assert len(await seqs_in_outbox(storage)) == 4  # b has not delivered them yet
    async with open_ingest(tmp_path, sinks=("a", "b")) as (ingest, outbox, storage):
        [resumed] = await outbox.open_batches("a")
        assert resumed.batch_id == orphan.batch_id and resumed.records == []


async def test_open_batches_waits_for_writes_still_queued(tmp_path):
    # A cancelled next_batch leaves its batch row queued at the writer (an abandoned write
    # still commits). open_batches must see it, or its records go out under a second key.
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        await ingest.records(recs(3))
        gate = __import__("threading").Event()
        await storage.write(lambda: None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(storage.write, gate.wait)  # holds the writer
            await trio.sleep(0.05)
            with trio.move_on_after(0.1):  # chooses, queues its batch row, then is cancelled
                await outbox.next_batch("cloud", max_records=10, max_bytes=1 << 20)
            resumed = []

            async def resume():
                resumed.extend(await outbox.open_batches("cloud"))

            nursery.start_soon(resume)
            await trio.sleep(0.05)
            assert resumed == []  # still behind the queued writes
            gate.set()
        assert len(resumed) == 1 and len(resumed[0].records) == 3


async def test_a_restored_backup_never_reissues_ids_the_original_sent(tmp_path, caplog):
    import time

    from gatewayd.core.storage import backup_database

    (tmp_path / "live").mkdir(), (tmp_path / "saved").mkdir()
    async with open_ingest(tmp_path / "live") as (ingest, outbox, storage):
        assert list((await ingest.records(recs(3))).ids) == [1, 2, 3]
        await trio.to_thread.run_sync(backup_database, storage.path, tmp_path / "saved" / "gw.sqlite3")
        assert list((await ingest.records(recs(2))).ids) == [4, 5]  # sent upstream, then the disk dies
    before = int(time.time() * 1_000_000)
    with caplog.at_level(logging.WARNING, logger="gatewayd.outbox"):
        async with open_ingest(tmp_path / "saved") as (ingest, outbox, storage):  # the backup, restored
            assert "restored from a backup" in caplog.text
            [new_id] = (await ingest.records(recs(1))).ids
            assert new_id > before  # not 4: the far end would drop it as a duplicate
            assert len(await seqs_in_outbox(storage)) == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gatewayd.outbox"):
        async with open_ingest(tmp_path / "saved") as (ingest, outbox, storage):  # restarted: no second jump
            assert list((await ingest.records(recs(1))).ids) == [new_id + 1]
            assert "restored from a backup" not in caplog.text


async def test_dead_letters_keep_the_records_whole_and_can_be_retried(tmp_path):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        await ingest.records(recs(3, "alert"))
        batch = await outbox.next_batch("cloud", max_records=10, max_bytes=1 << 20)
        await outbox.dead_letter(batch, 422, "HTTP 422 unprocessable: schema")
        assert await seqs_in_outbox(storage) == [] and outbox.counts["sink:cloud"][0] == 0
        [dead] = await storage.read(outbox.dead_letters)
        assert dead["status"] == 422 and dead["records"] == 3 and dead["batch_id"] == batch.batch_id
        assert await storage.write(outbox.retry_dead) == (1, 3)
        again = await outbox.next_batch("cloud", max_records=10, max_bytes=1 << 20)
        assert again.ids == batch.ids and again.batch_id != batch.batch_id  # same record ids, new batch
        assert await storage.read(outbox.dead_letters) == []


def gatewayd_cli(tmp_path, *args, expect=0):
    import json
    import subprocess
    import sys

    config = tmp_path / "gatewayd.toml"
    config.write_text(f"[gateway]\ndata_dir = '{tmp_path / 'var'}'\n[http]\nlisten = '127.0.0.1:9'\n"
                      "[[upstream]]\nname = 'cloud'\nurl = 'http://127.0.0.1:9'\n")
    done = subprocess.run([sys.executable, "-m", "gatewayd", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == expect, done.stderr
    if expect:
        return done.stderr
    return json.loads(done.stdout) if "--json" in args else done.stdout


async def test_operator_commands_show_and_retry_dead_letters(tmp_path):
    clock = Clock()
    async with open_ingest(tmp_path / "var", clock=clock, name="gatewayd.sqlite3") as (ingest, outbox, storage):
        await ingest.records(recs(4, "alert") + recs(6, "log"))
        batch = await outbox.next_batch("cloud", max_records=4, max_bytes=1 << 20)
        await outbox.dead_letter(batch, 401, "HTTP 401 bad_signature: signature does not verify")
    clock.now += 90
    status = await trio.to_thread.run_sync(gatewayd_cli, tmp_path, "outbox", "status", "--json")
    assert status["classes"]["log"]["rows"] == 6 and status["classes"]["alert"]["rows"] == 0
    assert status["sinks"]["cloud"]["backlog"] == 6 and "bad_signature" in status["sinks"]["cloud"]["last_error"]
    assert status["dead_letters"] == {"batches": 1, "records": 4}
    assert status["daemon"].startswith("not reachable")
    text = await trio.to_thread.run_sync(gatewayd_cli, tmp_path, "outbox", "status")
    assert "sink cloud" in text and "dead letters: 1 batches, 4 records" in text
    dead = await trio.to_thread.run_sync(gatewayd_cli, tmp_path, "outbox", "dead-letters", "--json")
    assert [(d["status"], d["records"]) for d in dead["dead_letters"]] == [(401, 4)]
    assert await trio.to_thread.run_sync(gatewayd_cli, tmp_path, "outbox", "retry-dead", "--json") == {
        "batches": 1, "records": 4}
    status = await trio.to_thread.run_sync(gatewayd_cli, tmp_path, "outbox", "status", "--json")
    assert status["classes"]["alert"]["rows"] == 4 and status["sinks"]["cloud"]["backlog"] == 10


async def test_a_removed_sinks_backlog_is_kept_until_an_operator_forgets_it(tmp_path, caplog):
    async with open_ingest(tmp_path, sinks=("a", "b")) as (ingest, outbox, storage):
        await ingest.records(recs(5))
        await outbox.delivered(await outbox.next_batch("a", max_records=3, max_bytes=1 << 20))
        await outbox.next_batch("b", max_records=2, max_bytes=1 << 20)  # left open by b
    with caplog.at_level(logging.WARNING, logger="gatewayd.outbox"):
        async with open_ingest(tmp_path, sinks=("a",)) as (ingest, outbox, storage):  # b removed from config
            assert "no longer configured" in caplog.text and "forget-sink b" in caplog.text
            assert len(await seqs_in_outbox(storage)) == 5  # b's records are kept for it
            with pytest.raises(ValueError, match="still configured"):
                await storage.write(outbox.forget_sink, "a")
            with pytest.raises(ValueError, match="no sink 'c'.*: b"):
                await storage.write(outbox.forget_sink, "c")
            assert await storage.write(outbox.forget_sink, "b") == 5
            assert sorted(await seqs_in_outbox(storage)) == [0, 1]  # what a still owes
            status = await storage.read(outbox.status)
            assert "b" not in status["sinks"] and status["classes"]["history"]["rows"] == 2
            assert status["sinks"]["a"]["backlog"] == 2
            await ingest.records(recs(1, start=9))
            rest = await outbox.next_batch("a", max_records=10, max_bytes=1 << 20)
            await outbox.delivered(rest)
            assert await seqs_in_outbox(storage) == [] and outbox.counts["class:history"] == [0, 0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gatewayd.outbox"):
        async with open_ingest(tmp_path, sinks=("a",)) as (ingest, outbox, storage):
            assert "no longer configured" not in caplog.text


async def test_forget_sink_from_the_command_line(tmp_path):
    async with open_ingest(tmp_path / "var", sinks=("cloud", "old"), name="gatewayd.sqlite3") as (ingest, outbox, _):
        await ingest.records(recs(3))
    status = await trio.to_thread.run_sync(gatewayd_cli, tmp_path, "outbox", "status", "--json")
    assert status["sinks"]["old"]["configured"] is False and status["sinks"]["old"]["backlog"] == 3
    err = await trio.to_thread.run_sync(partial(gatewayd_cli, tmp_path, "outbox", "forget-sink", "cloud", expect=2))
    assert "still configured in [[upstream]]" in err
    assert await trio.to_thread.run_sync(gatewayd_cli, tmp_path, "outbox", "forget-sink", "old", "--json") == {
        "sink": "old", "records": 3}
    status = await trio.to_thread.run_sync(gatewayd_cli, tmp_path, "outbox", "status", "--json")
    assert list(status["sinks"]) == ["cloud"] and status["sinks"]["cloud"]["backlog"] == 3


async def test_records_are_spliced_byte_for_byte_as_the_dicts_would_encode(tmp_path):
    import json

    from gatewayd.core.outbox.records import serialize_records
    from gatewayd.protocol.batch import SerializedRecords, encode_batch, rfc3339_utc

    tricky = [
        Record('dev "7"', "k\\n", {"s": 'quote " backslash \\ tab \t nl \n \x01 \u2028 é 漢 🙂', "f": 0.1 + 0.2}, 1_700_000_000.0005),
        Record("d", "k", {"n": -(2**63), "big": 10**30, "e": 1e-7, "x": 1e16, "nest": {"a": [1, None, True, "ü"]}}, 1_700_000_000.9996),
        Record("d", "k", {}, 1_700_000_001.25, "alert"),
        Record("ü", "ß", {"2": "int keys become strings", "list": []}, None, "state"),
    ]
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        await ingest.records(tricky)
        batch = await outbox.next_batch("cloud", max_records=10, max_bytes=1 << 20)
    spliced = serialize_records(batch.records)
    dicts = wire_records(batch.records)
    assert spliced.count == 4
    assert spliced.json == json.dumps(dicts, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert [r["ts"] for r in json.loads(spliced.json)] == [rfc3339_utc(r[3]) for r in batch.records]
    assert [r["class"] for r in dicts] == ["alert", "state", "history", "history"]
    for compression in ("identity", "gzip", "zstd"):
        args = dict(gateway_id="site-7", batch_id=batch.batch_id, secret=b"s", compression=compression, now=1.8e9)
        assert encode_batch(spliced, **args) == encode_batch(dicts, **args)
    assert isinstance(spliced, SerializedRecords)


async def test_open_batches_are_skipped_and_new_urgent_records_still_go_first(tmp_path):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        await ingest.records(recs(10))  # history ids 1..10
        first = await outbox.next_batch("cloud", max_records=4, max_bytes=1 << 20)
        assert first.ids == [10, 9, 8, 7]  # newest first
        await ingest.records(recs(2, "command_ack", start=100) + recs(2, start=200))  # ids 11..14
        second = await outbox.next_batch("cloud", max_records=5, max_bytes=1 << 20)
        # Acks first, then history newest first around the open batch, no record twice.
        assert second.ids == [11, 12, 14, 13, 6]
        third = await outbox.next_batch("cloud", max_records=100, max_bytes=1 << 20)
        assert third.ids == [5, 4, 3, 2, 1]
        assert await outbox.next_batch("cloud", max_records=100, max_bytes=1 << 20) is None
        # Records put back inside an open batch's span wait until that batch is settled.
        await outbox.dead_letter(first, 422, "HTTP 422 schema")
        assert await storage.write(outbox.retry_dead) == (1, 4)  # ids 7..10, inside `second`'s span 6..14
        assert await outbox.next_batch("cloud", max_records=100, max_bytes=1 << 20) is None
        await outbox.delivered(second)
        again = await outbox.next_batch("cloud", max_records=100, max_bytes=1 << 20)
        assert again.ids == [10, 9, 8, 7]
        await outbox.delivered(third)
        await outbox.delivered(again)
        assert outbox.counts["sink:cloud"] == [0, 0] and await seqs_in_outbox(storage) == []


async def test_a_split_batch_is_two_open_batches_with_new_keys_across_a_restart(tmp_path):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        await ingest.records(recs(5, "alert"))
        batch = await outbox.next_batch("cloud", max_records=10, max_bytes=1 << 20)
        halves = await outbox.split(batch)
        assert [h.ids for h in halves] == [[1, 2, 3], [4, 5]]
        assert len({batch.batch_id, *(h.batch_id for h in halves)}) == 3
    async with open_ingest(tmp_path) as (ingest, outbox, storage):  # "after the crash"
        resumed = await outbox.open_batches("cloud")
        assert [(b.batch_id, b.ids) for b in resumed] == [(h.batch_id, h.ids) for h in halves]
        assert await outbox.next_batch("cloud", max_records=10, max_bytes=1 << 20) is None  # all open
        for b in resumed:
            await outbox.delivered(b)
        assert outbox.counts["class:alert"] == [0, 0] and await outbox.open_batches("cloud") == []
