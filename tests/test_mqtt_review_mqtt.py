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


async def test_the_cores_own_tables_refusing_a_write_is_not_a_handlers_bug(gateway_factory):
    """A statement error in the core's part of an ingest (the outbox, the delivery mark)
    is not the plugin's SQL: the gateway's own schema is not what this code expects (a
    newer gatewayd's CLI migrated the database under the running daemon, an operator's
    ALTER). Rejecting would acknowledge every device's every message with nothing
    stored; it must stay unacknowledged until the schema is right again."""
    plugin = SqlBugPlugin()
    async with gateway_factory(plugins=[("sqlbug", plugin)], mqtt=True) as gw:
        creds = await testing.provision(gw, "sqlbug", "d1")
        dev = await RawDevice.connect(gw_mqtt_address(gw)[1], creds.mqtt.username, creds.mqtt.password)
        other = sqlite3.connect(gw.storage.path, isolation_level=None, timeout=10, check_same_thread=False)
        try:
            await trio.to_thread.run_sync(other.execute, "ALTER TABLE core_mqtt_marks_a RENAME COLUMN calls TO keys")
            await dev.publish("bug/d1/ok", b"7", packet_id=7)
            with trio.move_on_after(2):
                await dev.expect_ack()
                raise AssertionError(f"acknowledged, not stored: {gw.mqtt.delivery.stats} {await rejected(gw)}")
            assert gw.mqtt.delivery.stats.rejected == 0
            assert gw.mqtt.delivery.stats.storage_waits >= 1
            await trio.to_thread.run_sync(other.execute, "ALTER TABLE core_mqtt_marks_a RENAME COLUMN keys TO calls")
        finally:
            await trio.to_thread.run_sync(other.close)
        with trio.fail_after(40):
            assert await dev.expect_ack() == 7
        assert await gauges(gw) == [7]
        assert await rejected(gw) == []
