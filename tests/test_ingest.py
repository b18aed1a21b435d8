"""`ctx.ingest`: family rows and outbox rows commit together, or not at all."""

from __future__ import annotations

import math
import sqlite3
from contextlib import asynccontextmanager

import peewee
import pytest
import trio

from gatewayd.core.outbox.ingest import Ingest, IngestError, Record
from gatewayd.core.outbox.store import Outbox, OutboxPolicy
from gatewayd.core.storage import Storage
from gatewayd.protocol.json_text import encoded
from gatewayd.testing import gw_client
from tests import plugin_ingest


class Row(peewee.Model):
    device = peewee.TextField()
    n = peewee.IntegerField()

    class Meta:
        table_name = "fam_row"


@asynccontextmanager
async def open_ingest(tmp_path, sinks=("cloud",), policy=None, clock=lambda: 1_800_000_000.0, name="gw.sqlite3"):
    storage = Storage(tmp_path / name)
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        storage.database.bind([Row])
        await trio.to_thread.run_sync(lambda: storage.run_blocking(lambda: storage.database.create_tables([Row])))
        outbox = Outbox(storage, policy or OutboxPolicy(), list(sinks), clock=clock)
        await outbox.open()
        yield Ingest(outbox, "fam", clock), outbox, storage
        nursery.cancel_scope.cancel()


def fresh(path, sql):
    """Read through a connection of our own: what is committed, nothing else."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_record_returns_after_family_and_outbox_rows_are_committed(tmp_path):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        stored = await ingest.record("dev-1", "telemetry", {"t": 21.5}, cls="state", ts=1_700_000_000.25,
                                     family_rows=lambda: Row.insert(device="dev-1", n=7).execute())
        assert list(stored.ids) == [1] and stored.result == 1
        path = tmp_path / "gw.sqlite3"
        assert fresh(path, "SELECT device, n FROM fam_row") == [("dev-1", 7)]
        assert fresh(path, "SELECT prio, family, device, kind, ts, data FROM core_outbox") == [
            (2, "fam", "dev-1", "telemetry", 1_700_000_000.25, '{"t":21.5}')]
        assert outbox.counts["class:state"][0] == 1 and outbox.counts["sink:cloud"][0] == 1


async def test_a_failing_family_write_keeps_nothing(tmp_path):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        def broken():
            Row.insert(device="x", n=1).execute()
            raise RuntimeError("family bug")

        with pytest.raises(RuntimeError):
            await ingest.record("dev-1", "k", {}, family_rows=broken)
        path = tmp_path / "gw.sqlite3"
        assert fresh(path, "SELECT COUNT(*) FROM fam_row") == [(0,)]
        assert fresh(path, "SELECT COUNT(*) FROM core_outbox") == [(0,)]
        assert outbox.counts["class:history"] == [0, 0]


@pytest.mark.parametrize("args,kwargs,message", [
    (("d", "k", {}), {"cls": "gossip"}, "cls must be one of"),
    (("", "k", {}), {}, "device must be a non-empty string"),
    (("d", "", {}), {}, "kind must be a non-empty string"),
    (("d", "k", [1]), {}, "data must be a mapping"),
    (("d", "k", {"v": math.nan}), {}, "data is not JSON"),
    (("d", "k", {"v": object()}), {}, "data is not JSON"),
    (("d", "k", {}), {"ts": 1_700_000_000_000}, "ts must be epoch seconds"),
])
async def test_bad_records_are_refused_before_anything_is_written(tmp_path, args, kwargs, message):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        with pytest.raises(IngestError, match=message):
            await ingest.record(*args, **kwargs, family_rows=lambda: Row.insert(device="x", n=1).execute())
        assert fresh(tmp_path / "gw.sqlite3", "SELECT COUNT(*) FROM fam_row") == [(0,)]


@pytest.mark.parametrize("item,message", [
    (("d", "k", {}, None, "gossip"), "cls must be one of"),
    (("", "k", {}, None, "history"), "device must be a non-empty string"),
    (("d", "", {}), "kind must be a non-empty string"),
    (Record("d", "k", [1]), "data must be a mapping"),
    (Record("d", "k", {"v": math.nan}), "data is not JSON"),
    (("d", "k", {"v": object()}, None, "log"), "data is not JSON"),
    (Record("d", "k", {}, 1_700_000_000_000), "ts must be epoch seconds"),
    (Record("d", "k", {}, True), "ts must be epoch seconds"),
    (("d", "k"), "expected Record"),
])
async def test_bulk_refuses_a_bad_record_naming_it(tmp_path, item, message):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        good = [Record("d", "k", {"i": i}) for i in range(100)]  # > 64: serialised off the trio thread
        with pytest.raises(IngestError, match=f"record 100: {message}"):
            await ingest.records(good + [item])
        assert outbox.counts["class:history"][0] == 0


def test_bulk_rows_are_the_rows_of_single_records():
    from collections import OrderedDict

    ingest = Ingest(None, "fam", lambda: 1_800_000_000.0)
    items = [Record("d", "k", {"a": 1.5, "s": "é\n"}, 1_700_000_000, "state"), ("d", "k", {}),
             ("d", "k", OrderedDict(x=[1, None]), 1.7e9), Record("ü", "k", {"n": {"deep": True}}, None, "command_ack")]
    assert ingest._rows(items, 1_800_000_000.0) == [ingest._row(*item, now=1_800_000_000.0) for item in items]


def test_an_encoded_records_rows_are_the_rows_of_its_value():
    ingest = Ingest(None, "fam", lambda: 1_800_000_000.0)
    values = [{"a": 1.5, "s": "é\n"}, {}, {"n": {"deep": [True, None]}}, {"t": 1_700_000_000.125}]
    plain = [Record("d", "k", v, 1_700_000_000, "state") for v in values]
    made = [Record("d", "k", encoded(v), 1_700_000_000, "state") for v in values]
    rows = ingest._rows(plain, 1_800_000_000.0)
    assert ingest._rows(made, 1_800_000_000.0) == rows  # the bulk loop
    assert [ingest._row(*item, now=1_800_000_000.0) for item in made] == rows  # one record
    with pytest.raises(IngestError, match="record 0: data must be a mapping"):
        ingest._rows([Record("d", "k", encoded([1]))], 1_800_000_000.0)


async def test_bulk_records_one_transaction_with_executemany_family_rows(tmp_path):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        rows = [("d", i) for i in range(5000)]
        stored = await ingest.records(
            [Record("d", "reading", {"i": i}, None, "history") for i in range(5000)],
            family_rows=lambda: storage.database.connection().executemany(
                "INSERT INTO fam_row (device, n) VALUES (?, ?)", rows),
        )
        assert stored.ids == range(1, 5001)
        assert fresh(tmp_path / "gw.sqlite3", "SELECT COUNT(*), MIN(id), MAX(id) FROM core_outbox") == [(5000, 1, 5000)]
        assert fresh(tmp_path / "gw.sqlite3", "SELECT COUNT(*) FROM fam_row") == [(5000,)]
        # One bad record in a bulk: the whole call is refused, naming it.
        with pytest.raises(IngestError, match="record 2: cls must be"):
            await ingest.records([("d", "k", {}), ("d", "k", {}), ("d", "k", {}, None, "nope")])
        assert outbox.counts["class:history"][0] == 5000


async def test_ids_are_never_reused_after_the_newest_row_left(tmp_path):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        first = await ingest.record("d", "k", {})
        batch = await outbox.next_batch("cloud", max_records=10, max_bytes=1 << 20)
        await outbox.delivered(batch)
        assert fresh(tmp_path / "gw.sqlite3", "SELECT COUNT(*) FROM core_outbox") == [(0,)]
        second = await ingest.record("d", "k", {})
        assert second.ids[0] > first.ids[0]  # a reused id would be dropped upstream as a duplicate


async def test_without_upstream_family_rows_are_stored_and_nothing_queued(tmp_path):
    async with open_ingest(tmp_path, sinks=()) as (ingest, outbox, storage):
        stored = await ingest.record("d", "k", {}, family_rows=lambda: Row.insert(device="d", n=1).execute())
        assert len(stored.ids) == 0 and stored.result == 1
        assert fresh(tmp_path / "gw.sqlite3", "SELECT COUNT(*) FROM core_outbox") == [(0,)]


async def test_the_plugin_route_answers_400_for_a_bad_class(gateway_factory):
    async with gateway_factory(plugins=[("ingest", plugin_ingest)]) as gw:
        async with gw_client(gw) as client:
            r = await client.post("/ingest/records", json={"device": "d", "seq": 1, "cls": "gossip"})
            assert r.status_code == 400 and "cls must be one of" in r.json()["error"]
            r = await client.post("/ingest/records", json={"device": "d", "seq": 2, "cls": "alert"})
            assert r.status_code == 201
            assert (await client.get("/ingest/count")).json() == {"count": 1}


async def test_pressure_is_the_fullest_outbox_limit_and_the_writer_queue(tmp_path):
    from gatewayd.core.outbox.store import OutboxLimits

    policy = OutboxPolicy(max_rows=1000, classes={"history": OutboxLimits(max_rows=100)})
    async with open_ingest(tmp_path, policy=policy) as (ingest, outbox, storage):
        assert ingest.pressure() == (0.0, 0, 0, 0)
        await ingest.records([Record("d", "t", {"n": i}) for i in range(40)])
        pressure = ingest.pressure()
        assert pressure.outbox_fill == pytest.approx(0.4)  # history's own limit, not the total's 0.04
        assert pressure.outbox_rows == 40 and pressure.outbox_bytes > 0
        await ingest.records([Record("d", "t", {"n": i}, cls="alert") for i in range(60)])
        assert ingest.pressure().outbox_fill == pytest.approx(0.4)  # 100 of 1000 in all: 0.1
        # Jobs queued behind a slow one are the writer's queue.
        release = trio.Event()
        started = trio.Event()

        def slow() -> None:
            trio.from_thread.run_sync(started.set, trio_token=token)
            trio.from_thread.run(release.wait, trio_token=token)

        token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(storage.write, slow)
            await started.wait()
            for _ in range(3):
                nursery.start_soon(storage.write, lambda: None)
            await trio.testing.wait_all_tasks_blocked()
            assert ingest.pressure().writer_queue == 3
            release.set()
        assert ingest.pressure().writer_queue == 0


async def test_pressure_of_an_outbox_without_sinks_is_nought(tmp_path):
    async with open_ingest(tmp_path, sinks=()) as (ingest, outbox, storage):
        await ingest.records([Record("d", "t", {"n": i}) for i in range(10)])
        assert ingest.pressure().outbox_fill == 0.0


async def test_oldest_pending_is_the_familys_oldest_record_some_sink_has_not_delivered(tmp_path):
    now = [1_800_000_000.0]
    async with open_ingest(tmp_path, sinks=("cloud", "backup"), clock=lambda: now[0]) as (ingest, outbox, storage):
        other = Ingest(outbox, "other", lambda: now[0])
        assert await ingest.oldest_pending() is None
        await other.record("x", "t", {"n": 0})  # another family's, older: not ours
        now[0] += 10
        await ingest.records([Record("d", "t", {"n": i}) for i in range(3)])
        now[0] += 10
        await ingest.record("d", "t", {"n": 3})
        assert await ingest.oldest_pending() == 1_800_000_010.0
        assert await other.oldest_pending() == 1_800_000_000.0
        cloud = await outbox.next_batch("cloud", max_records=10, max_bytes=1 << 20)
        assert cloud is not None and len(cloud.records) == 5
        assert await ingest.oldest_pending() == 1_800_000_010.0  # chosen is not delivered
        await outbox.delivered(cloud)
        assert await ingest.oldest_pending() == 1_800_000_010.0  # "backup" has not delivered it
        backup = await outbox.next_batch("backup", max_records=10, max_bytes=1 << 20)
        assert backup is not None
        await outbox.delivered(backup)
        assert await ingest.oldest_pending() is None and await other.oldest_pending() is None


def committed_counts(path):
    """core_outbox_count as committed, and the same counted from core_outbox itself."""
    kept = {k: [r, b] for k, r, b in fresh(path, "SELECT key, rows, bytes FROM core_outbox_count")}
    actual = {}
    for prio, n, size in fresh(path, "SELECT prio, COUNT(*), TOTAL(size) FROM core_outbox GROUP BY prio"):
        actual[prio] = [n, int(size)]
    return kept, actual


async def _one_group(storage, calls):
    """Run `calls` (async callables) so that their writes share one group commit, in this
    order: the writer is held by a job of our own until every call's write is queued."""
    import threading

    hold, held = threading.Event(), threading.Event()

    def blocker():
        held.set()
        hold.wait(10)

    results = [None] * len(calls)

    async def run(i, call):
        try:
            results[i] = await call()
        except Exception as e:  # noqa: BLE001 - the test looks at which failed
            results[i] = e

    async with trio.open_nursery() as nursery:
        nursery.start_soon(storage.write, blocker)
        await trio.to_thread.run_sync(held.wait)
        for i, call in enumerate(calls):  # one by one: the group runs them in this order
            nursery.start_soon(run, i, call)
            while storage.queue_depth() < i + 1:
                await trio.sleep(0.001)
        hold.set()
    return results


async def test_counts_are_exact_after_a_group_with_a_failing_call(tmp_path):
    """Several ingest calls in one group commit (the counts are kept in memory for the
    transaction and written once), one of them failing: the group is rolled back and run
    again job by job, the failing call's savepoint rolled back; the counts committed are
    those of the rows committed, and a next group starts from them."""
    async with open_ingest(tmp_path, sinks=("cloud", "backup")) as (ingest, outbox, storage):
        path = tmp_path / "gw.sqlite3"

        def broken():
            Row.insert(device="x", n=1).execute()
            raise RuntimeError("family bug")

        def stores_then_fails():  # a writer job that fails after its outbox rows and counts
            outbox.store([ingest._row("dev-9", "k", {"v": "x" * 9}, None, "state", 1.0)], None)
            raise RuntimeError("after the outbox rows")

        def call(i, family_rows=None):
            return lambda: ingest.record(f"dev-{i}", "k", {"v": "x" * i}, cls="state" if i % 2 else "history",
                                         family_rows=family_rows)

        before = storage.stats["max_batch"]
        results = await _one_group(storage, [call(1), call(2), call(3, broken), call(4),
                                             lambda: storage.write(stores_then_fails), call(5)])
        assert storage.stats["max_batch"] >= 6 > before  # they shared a transaction
        assert isinstance(results[2], RuntimeError) and isinstance(results[4], RuntimeError)
        assert [type(r).__name__ for i, r in enumerate(results) if i not in (2, 4)] == ["Ingested"] * 4
        kept, actual = committed_counts(path)
        assert fresh(path, "SELECT device FROM core_outbox ORDER BY device") == [("dev-1",), ("dev-2",), ("dev-4",),
                                                                                  ("dev-5",)]
        assert kept["class:state"] == actual[2] and kept["class:history"] == actual[3]
        total = [actual[2][0] + actual[3][0], actual[2][1] + actual[3][1]]
        assert kept["sink:cloud"] == total and kept["sink:backup"] == total
        assert kept["seq:outbox"][0] == 4
        # Another process lets a record go (as `gatewayd outbox forget-sink` would), then a
        # group without failure (the one-transaction path): it starts from the table.
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("DELETE FROM core_outbox WHERE device = 'dev-1'")
            conn.execute("UPDATE core_outbox_count SET rows = rows - 1, bytes = bytes - 18"
                         " WHERE key IN ('class:state', 'sink:cloud', 'sink:backup')")
        conn.close()
        results = await _one_group(storage, [call(6), call(7), call(8)])
        assert all(type(r).__name__ == "Ingested" for r in results)
        kept, actual = committed_counts(path)
        # A record's size: its JSON ({"v":"x..."}: 8 + i), device (5), kind (1) and family (3).
        assert kept["class:state"] == actual[2] == [2, (17 + 5) + (17 + 7)]
        assert kept["class:history"] == actual[3] == [4, (17 + 2) + (17 + 4) + (17 + 6) + (17 + 8)]
        assert kept["sink:cloud"] == kept["sink:backup"] == [6, 46 + 88] and kept["seq:outbox"][0] == 7
        assert fresh(path, "SELECT COUNT(*) FROM fam_row") == [(0,)]
        assert outbox.counts == kept  # the trio side's mirror: the newest commit's counts


async def test_a_worker_waiting_for_records_wakes_for_those_stored_after_it_began(tmp_path):
    async with open_ingest(tmp_path) as (ingest, outbox, storage):
        await ingest.record("d", "k", {})  # committed before the wait: not what it waits for
        woken: list[int] = []

        async def worker(n: int) -> None:
            await outbox.wait_for_records(timeout=3600)
            woken.append(n)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert woken == []
            await ingest.record("d", "k", {})
            await trio.testing.wait_all_tasks_blocked()
            assert woken == [1]
            nursery.start_soon(worker, 2)  # waits anew: the record above came before it
            await trio.testing.wait_all_tasks_blocked()
            assert woken == [1]
            await ingest.records([("d", "k", {})])
        assert woken == [1, 2]
