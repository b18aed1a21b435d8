"""Review of perf-mqtt (deferred final marks, SQLite errors split by kind): attacks.

Real parts: a gateway with its mosquitto, a device speaking MQTT bytes, SQLite files.
"""

from __future__ import annotations

import sqlite3

import pytest
import trio

from gatewayd import testing
from gatewayd.core.storage import StatementError, Storage, StorageError
from gatewayd.testing import gw_mqtt_address

from .test_mqtt_edge import RawDevice
from .test_mqtt_statement_errors import SqlBugPlugin, gauges, rejected


def _corrupt_index(path, index: str) -> None:
    """Overwrite the root page of ``index`` with garbage (a torn write on an SD card)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root, = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)).fetchone()
        page_size, = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)


class ReadingPlugin(SqlBugPlugin):
    """Reads the device's latest serial (through the index) before it stores a new one:
    the "is this state new?" read many handlers make."""

    async def on_message(self, msg):
        db = self.ctx.storage.database
        await self.ctx.storage.read(lambda: db.execute_sql(
            "SELECT max(serial) FROM sqlbug_gauge INDEXED BY gauge_serial WHERE serial > 0").fetchall())
        await super().on_message(msg)


async def test_a_corrupt_database_does_not_acknowledge_what_it_could_not_store(gateway_factory):
    """SQLITE_CORRUPT comes as sqlite3.DatabaseError, not OperationalError: storage that
    cannot serve the delivery, not a handler's bug. It must leave the message
    unacknowledged (storage.py's own list: "corrupt ... retried"), not reject it and
    acknowledge it with nothing stored (a torn page on a Raspberry Pi's SD card)."""
    async with gateway_factory(plugins=[("sqlbug", ReadingPlugin())], mqtt=True) as gw:
        creds = await testing.provision(gw, "sqlbug", "d1")
        dev = await RawDevice.connect(gw_mqtt_address(gw)[1], creds.mqtt.username, creds.mqtt.password)
        with trio.fail_after(20):
            for pid in range(1, 301):  # enough rows for the index to have pages of its own
                await dev.publish("bug/d1/ok", b"%d" % pid, packet_id=pid)
                assert await dev.expect_ack() == pid
        path = gw.storage.path
    _corrupt_index(path, "gauge_serial")
    async with gateway_factory(plugins=[("sqlbug", ReadingPlugin())], mqtt=True) as gw:
        dev = await RawDevice.connect(gw_mqtt_address(gw)[1], creds.mqtt.username, creds.mqtt.password)
        await dev.publish("bug/d1/ok", b"5000", packet_id=500)
        with trio.move_on_after(2):
            await dev.expect_ack()
            raise AssertionError(f"acknowledged, not stored: {await rejected(gw)}")
        stats = gw.mqtt.delivery.stats
        assert (stats.rejected, stats.handled) == (0, 0)
        assert stats.storage_waits >= 1


@pytest.fixture
async def storage(tmp_path, nursery):
    storage = Storage(tmp_path / "split.sqlite3")
    await nursery.start(storage.run)
    await storage.write(lambda: storage.database.execute_sql("CREATE TABLE t (a INTEGER UNIQUE)"))
    return storage


async def test_a_corrupt_page_is_a_storage_error_not_a_bug_of_the_statement(storage, tmp_path):
    db = storage.database
    await storage.write(lambda: db.execute_sql("CREATE INDEX t_a ON t (a)"))
    await storage.write(lambda: [db.execute_sql("INSERT INTO t VALUES (?)", (i,)) for i in range(2000)])
    await trio.to_thread.run_sync(storage.close)
    _corrupt_index(tmp_path / "split.sqlite3", "t_a")
    again = Storage(tmp_path / "split.sqlite3")
    await trio.to_thread.run_sync(again.open)
    try:
        with pytest.raises(StorageError, match="malformed") as info:
            await again.write(lambda: again.database.execute_sql("INSERT INTO t VALUES (99999)"))
        assert not isinstance(info.value, StatementError)
        with pytest.raises(StorageError, match="malformed") as info:  # a reader's, too
            await again.read(lambda: again.database.execute_sql("SELECT max(a) FROM t INDEXED BY t_a").fetchall())
        assert not isinstance(info.value, StatementError)
    finally:
        await trio.to_thread.run_sync(again.close)


@pytest.mark.parametrize("table,column", [("core_mqtt_marks_a", "calls"), ("core_outbox", "data")])
async def test_the_cores_own_tables_refusing_a_write_is_not_a_handlers_bug(gateway_factory, upstream_receiver,
                                                                           table, column):
    """A statement error in the core's part of an ingest (the outbox, the delivery mark)
    is not the plugin's SQL: the gateway's own schema is not what this code expects (a
    newer gatewayd's CLI migrated the database under the running daemon, an operator's
    ALTER). Rejecting would acknowledge every device's every message with nothing
    stored; it must stay unacknowledged until the schema is right again."""
    plugin = SqlBugPlugin()
    async with gateway_factory(plugins=[("sqlbug", plugin)], mqtt=True, upstream=upstream_receiver) as gw:
        creds = await testing.provision(gw, "sqlbug", "d1")
        dev = await RawDevice.connect(gw_mqtt_address(gw)[1], creds.mqtt.username, creds.mqtt.password)
        other = sqlite3.connect(gw.storage.path, isolation_level=None, timeout=10, check_same_thread=False)
        try:
            await trio.to_thread.run_sync(other.execute, f"ALTER TABLE {table} RENAME COLUMN {column} TO renamed")
            await dev.publish("bug/d1/ok", b"7", packet_id=7)
            with trio.move_on_after(2):
                await dev.expect_ack()
                raise AssertionError(f"acknowledged, not stored: {gw.mqtt.delivery.stats} {await rejected(gw)}")
            assert gw.mqtt.delivery.stats.rejected == 0
            assert gw.mqtt.delivery.stats.storage_waits >= 1
            await trio.to_thread.run_sync(other.execute, f"ALTER TABLE {table} RENAME COLUMN renamed TO {column}")
        finally:
            await trio.to_thread.run_sync(other.close)
        with trio.fail_after(40):
            assert await dev.expect_ack() == 7
        assert await gauges(gw) == [7]
        assert await rejected(gw) == []


# -- final marks noted in memory, written later: attacks on the window --------------------


from gatewayd.core.mqtt.marks import DeliveryMarks, Seen  # noqa: E402


@pytest.fixture
async def marks(tmp_path, nursery):
    storage = Storage(tmp_path / "marks.sqlite3")
    await nursery.start(storage.run)
    marks = DeliveryMarks(storage, flush_s=3600.0)
    await trio.to_thread.run_sync(marks.install)
    return marks


async def table(marks, mark):
    fresh = DeliveryMarks(marks.storage)
    return await fresh.seen(mark)


async def test_a_failing_flush_keeps_the_notes_answering_and_writes_them_once_storage_is_back(marks):
    db = marks.storage.database
    one = marks.mark("edge:d1", 5, "dev/d1/data", b"a")
    await marks.storage.write(one.write, b"k" * 16)
    marks.finish(one)
    await marks.storage.write(lambda: db.execute_sql("PRAGMA query_only = 1"))  # read-only for now
    with pytest.raises(StorageError):
        await marks.flush()
    assert marks.unwritten == 1 and await marks.seen(one) == Seen(None)  # still answering
    for _ in range(3):  # finishing the same (sender, packet id) again does not grow the memory
        marks.finish(one)
    assert marks.unwritten == 1
    await marks.storage.write(lambda: db.execute_sql("PRAGMA query_only = 0"))
    await marks.flush()
    assert marks.unwritten == 0 and await table(marks, one) == Seen(None)


async def test_a_flush_in_flight_does_not_write_an_older_final_mark_over_a_newer_message(marks):
    """The flush took the older message's note and queued its write; the sender reuses
    the packet id and the newer message's first ingest call commits: the writer takes
    them in that order (one group), the newer mark stands."""
    storage = marks.storage
    older = marks.mark("edge:d1", 5, "dev/d1/data", b"a")
    newer = marks.mark("edge:d1", 5, "dev/d1/data", b"b")
    marks.finish(older)
    gate = trio.Event()
    results = []
    async with trio.open_nursery() as n:
        # Hold the writer so that the flush and the newer write share one group.
        n.start_soon(storage.write, lambda: __import__("time").sleep(0.3))
        await trio.sleep(0.05)

        async def flushing():
            await marks.flush()
            results.append("flushed")
            gate.set()

        n.start_soon(flushing)
        await trio.sleep(0.01)
        marks.forget("edge:d1", 5)  # Delivery: the newer one starts
        await storage.write(newer.write, b"n" * 16)
        await gate.wait()
    assert await table(marks, newer) == Seen([b"n" * 16])
    assert await table(marks, older) is None
    assert marks.unwritten == 0


async def test_a_rotation_that_storage_refuses_does_not_take_the_gateway_down(marks, nursery):
    """The marks' task also rotates the tables: a rotation refused (read-only, a full
    disk: DELETE needs room in the WAL) must be tried again later, not crash the
    services nursery (the whole gateway) and stop the flusher with it."""
    db = marks.storage.database
    marks.window_s = 0.05
    await marks.storage.write(lambda: db.execute_sql("PRAGMA query_only = 1"))
    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            await inner.start(marks.run)
            await trio.sleep(0.3)  # several rotations refused
            await marks.storage.write(lambda: db.execute_sql("PRAGMA query_only = 0"))
            marks.flush_s = 0.001
            one = marks.mark("edge:d1", 9, "dev/d1/data", b"z")
            await marks.storage.write(one.write, b"k" * 16)
            marks.finish(one)
            while marks.unwritten:  # the flusher still runs
                await trio.sleep(0.01)
            inner.cancel_scope.cancel()


# -- the reverse: a handler's own permanent error taken for the writer's state ------------


class BeginPlugin(SqlBugPlugin):
    """A handler written for a database of its own: it opens its own transaction (BEGIN)
    inside its write, which the writer's transaction already holds. SQLite refuses it
    the same way every time ("cannot start a transaction within a transaction")."""

    async def on_message(self, msg):
        db = self.ctx.storage.database
        serial = int(msg.payload)

        def rows():
            if msg.topic.endswith("/begin"):
                db.execute_sql("BEGIN")
            if msg.topic.endswith("/release"):
                db.execute_sql("RELEASE gauge_batch")
            db.execute_sql("INSERT INTO sqlbug_gauge (device, serial) VALUES (?, ?)", ("d1", serial))

        await self.ctx.ingest.record("d1", "gauge", {"serial": serial}, family_rows=rows)


@pytest.mark.parametrize("kind", ["begin", "release"])
async def test_a_handlers_own_transaction_statements_are_its_bug_not_the_writers_state(gateway_factory, kind):
    async with gateway_factory(plugins=[("sqlbug", BeginPlugin())], mqtt=True) as gw:
        creds = await testing.provision(gw, "sqlbug", "d1")
        dev = await RawDevice.connect(gw_mqtt_address(gw)[1], creds.mqtt.username, creds.mqtt.password)
        with trio.fail_after(15):
            for pid in range(1, 41):  # more than the device's window of 32
                await dev.publish(f"bug/d1/{kind}", b"%d" % pid, packet_id=pid)
            assert sorted([await dev.expect_ack() for _ in range(40)]) == list(range(1, 41))
            await dev.publish("bug/d1/ok", b"100", packet_id=41)
            assert await dev.expect_ack() == 41
        stats = gw.mqtt.delivery.stats
        assert (stats.rejected, stats.statement_errors, stats.handled) == (40, 40, 1)
        assert await gauges(gw) == [100]


async def test_qos2_packet_id_reused_after_pubrel_while_the_older_note_is_unwritten(gateway_factory):
    """QoS 2: M1 under id 3 is PUBREC'd (its final mark noted, not written), released and
    completed; M2 reuses id 3, is PUBREC'd, and the device loses that PUBREC in a
    reconnect: its resend of M2 is answered from memory (not run again), and what is
    written in the end is M2's final mark, not M1's over it."""
    from gatewayd.protocol import mqtt_packets as mp

    from .test_mqtt_edge import EdgePlugin, provision, stored_records
    from .test_mqtt_marks import written_mark

    plugin = EdgePlugin()
    async with gateway_factory(plugins=[("edgetest", plugin)], mqtt=True) as gw:
        gw.mqtt.marks.flush_s = 3600.0
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        with trio.fail_after(10):
            await dev.publish("dev/d1/data", b"m-1", packet_id=3, qos=2)
            assert await dev.expect_ack(mp.PUBREC) == 3
            await dev.stream.send_all(bytes((0x62, 2, 0, 3)))  # PUBREL 3
            assert await dev.expect_ack(mp.PUBCOMP) == 3
            await dev.publish("dev/d1/data", b"m-2", packet_id=3, qos=2)
            assert await dev.expect_ack(mp.PUBREC) == 3
            assert gw.mqtt.marks.unwritten == 1  # M2's note; M1's dropped
            await dev.stream.aclose()  # the PUBREC lost on the way
            dev = await RawDevice.connect(port, user, password)
            await dev.publish("dev/d1/data", b"m-2", packet_id=3, qos=2, dup=True)
            assert await dev.expect_ack(mp.PUBREC) == 3
        assert plugin.calls == 2
        assert len(await stored_records(gw)) == 2
        await gw.mqtt.marks.flush()
        assert await written_mark(gw, user, 3, "dev/d1/data", b"m-2") == Seen(None)
        assert await written_mark(gw, user, 3, "dev/d1/data", b"m-1") is None


async def test_a_graceful_stop_while_storage_refuses_the_final_marks_ends_and_a_resend_stores_nothing_twice(
        gateway_factory):
    from gatewayd.testing import storage_failing

    from .test_mqtt_edge import EdgePlugin, provision, stored_records

    async with gateway_factory(plugins=[("edgetest", EdgePlugin())], mqtt=True) as gw:
        gw.mqtt.marks.flush_s = 3600.0
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        with trio.fail_after(5):
            await dev.publish("dev/d1/data", b"m-1", packet_id=1)
            assert await dev.expect_ack() == 1
        cm = storage_failing(gw)
        await cm.__aenter__()  # read-only from here to the end of the run
        with trio.fail_after(30):
            gw.request_shutdown()
            while gw.storage.is_open:
                await trio.sleep(0.05)
    second = EdgePlugin()
    async with gateway_factory(plugins=[("edgetest", second)], mqtt=True) as gw:
        dev = await RawDevice.connect(gw_mqtt_address(gw)[1], user, password)
        with trio.fail_after(5):
            await dev.publish("dev/d1/data", b"m-1", packet_id=1, dup=True)
            assert await dev.expect_ack() == 1
        assert len(await stored_records(gw)) == 1


_OUT_OF_MEMORY = """
import sys, trio
from gatewayd.core.storage import StatementError, Storage, StorageError

async def main(path):
    storage = Storage(path)
    await trio.to_thread.run_sync(storage.open)
    db = storage.database
    await storage.write(lambda: db.execute_sql("CREATE TABLE t (a BLOB)"))
    big = b"x" * 4_000_000
    # Process-wide, and the pragma can only lower it: hence this child process.
    await storage.write(lambda: db.execute_sql("PRAGMA hard_heap_limit = 3000000"))
    for how, sql in (("write", "INSERT INTO t VALUES (?)"), ("read", "SELECT length(?)")):
        try:
            await getattr(storage, how)(lambda: db.execute_sql(sql, (big,)).fetchall())
            print(how, "ok")
        except BaseException as e:
            print(how, type(e).__name__, isinstance(e, StorageError) and not isinstance(e, StatementError), e)
    await trio.to_thread.run_sync(storage.close)

trio.run(main, sys.argv[1])
"""


async def test_sqlite_out_of_memory_is_a_storage_error_not_a_handlers_bug(tmp_path):
    """SQLITE_NOMEM comes as a bare MemoryError: the machine's state, which can pass (a Pi
    under memory pressure), not the statement's fault. As a plain exception the delivery
    rejected the message and acknowledged it with nothing stored."""
    import subprocess
    import sys

    done = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-c", _OUT_OF_MEMORY, str(tmp_path / "nomem.sqlite3")],
        capture_output=True, text=True, timeout=60))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["write StorageError True out of memory",
                                        "read StorageError True out of memory"], done.stdout
