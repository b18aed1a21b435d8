"""A handler whose own SQL fails the same way every time is a plugin bug, not a storage
outage: its message is rejected (kept in core_mqtt_rejected with the plugin and the
reason, counted, acknowledged), so one bad handler cannot fill its device's window of
32. Storage that cannot take a write for now (read-only, locked, full, an I/O error)
still leaves the message unacknowledged, retried.

A real plugin, a real gateway with its mosquitto, devices speaking MQTT bytes.
"""

from __future__ import annotations

import sqlite3

import peewee
import pytest
import trio

from gatewayd import testing
from gatewayd.core.mqtt.client import RejectedMessage
from gatewayd.core.storage import StatementError, Storage, StorageError
from gatewayd.plugins.api import hookimpl
from gatewayd.testing import gw_mqtt_address, storage_failing

from .test_mqtt_edge import RawDevice


class Gauge(peewee.Model):
    device = peewee.CharField()
    serial = peewee.IntegerField(unique=True)  # the plugin's own constraint

    class Meta:
        table_name = "sqlbug_gauge"


# What each topic's handler runs: SQL that fails the same way whatever the disk's state.
BUGS = {
    "nocolumn": ("INSERT INTO sqlbug_gauge (device, serial, colour) VALUES (?, ?, 'red')", 2),
    "notable": ("INSERT INTO sqlbug_gauges (device, serial) VALUES (?, ?)", 2),
    "syntax": ("INSRT INTO sqlbug_gauge (device, serial) VALUES (?, ?)", 2),
    "bindings": ("INSERT INTO sqlbug_gauge (device, serial) VALUES (?, ?)", 1),
    "unique": ("INSERT INTO sqlbug_gauge (device, serial) VALUES (?, ?)", 2),  # serial 1 is taken
    "toobig": ("INSERT INTO sqlbug_gauge (device, serial) VALUES (?, zeroblob(2000000000))", 1),  # SQLITE_TOOBIG
}
EXPECTED = {
    "nocolumn": "StatementError: table sqlbug_gauge has no column named colour",
    "notable": "StatementError: no such table: sqlbug_gauges",
    "syntax": 'StatementError: near "INSRT": syntax error',
    "bindings": "ProgrammingError: Incorrect number of bindings supplied",
    "unique": "IntegrityError: UNIQUE constraint failed: sqlbug_gauge.serial",
    "toobig": "DataError: string or blob too big",
}


class SqlBugPlugin:
    """bug/<id>/<kind>: stores a Gauge row with SQL of its own, wrong in the way <kind> says;
    bug/<id>/ok stores a good one."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    @hookimpl
    def gatewayd_storage_models(self, models):
        models.add(Gauge)

    @hookimpl
    def gatewayd_mqtt_topics(self, topics, ctx):
        self.ctx = ctx
        topics.subscribe("bug/+/+", self.on_message, qos=1)
        topics.acl("bug/%u/#", "write")

    async def on_message(self, msg):
        _, device, kind = msg.topic.split("/")
        self.calls[kind] = self.calls.get(kind, 0) + 1
        db = self.ctx.storage.database
        serial = int(msg.payload)
        if kind == "ok":
            sql, args = "INSERT INTO sqlbug_gauge (device, serial) VALUES (?, ?)", (device, serial)
        else:
            sql, n = BUGS[kind]
            args = (device, 1 if kind == "unique" else serial)[:n]
        await self.ctx.ingest.record(device, "gauge", {"serial": serial},
                                     family_rows=lambda: db.execute_sql(sql, args))


@pytest.fixture
async def bug(gateway_factory):
    plugin = SqlBugPlugin()
    async with gateway_factory(plugins=[("sqlbug", plugin)], mqtt=True) as gw:
        creds = await testing.provision(gw, "sqlbug", "d1")
        dev = await RawDevice.connect(gw_mqtt_address(gw)[1], creds.mqtt.username, creds.mqtt.password)
        yield gw, plugin, dev


async def rejected(gw) -> list[str]:
    return await gw.storage.read(lambda: [r.reason for r in RejectedMessage.select().order_by(RejectedMessage.id)])


async def gauges(gw) -> list[int]:
    return await gw.storage.read(lambda: [g.serial for g in Gauge.select().order_by(Gauge.serial)])


@pytest.mark.parametrize("kind", sorted(BUGS))
async def test_a_handler_whose_own_sql_always_fails_is_rejected_and_its_device_goes_on(bug, kind):
    gw, plugin, dev = bug
    with trio.fail_after(10):
        await dev.publish("bug/d1/ok", b"1", packet_id=1)
        assert await dev.expect_ack() == 1
        # More than the device's window of 32: each is answered, none waits for ever.
        for pid in range(2, 42):
            await dev.publish(f"bug/d1/{kind}", b"%d" % pid, packet_id=pid)
        assert sorted([await dev.expect_ack() for _ in range(40)]) == list(range(2, 42))
        await dev.publish("bug/d1/ok", b"100", packet_id=42)
        assert await dev.expect_ack() == 42
    assert plugin.calls[kind] == 40  # each run once: not retried
    assert await gauges(gw) == [1, 100]  # nothing of the failed writes kept
    reasons = await rejected(gw)
    assert len(reasons) == 40
    assert all(r.startswith(f"handler error (sqlbug): {EXPECTED[kind]}") for r in reasons), reasons[0]
    stats = gw.mqtt.delivery.stats
    assert (stats.rejected, stats.handler_errors, stats.statement_errors, stats.storage_waits) == (40, 40, 40, 0)
    assert stats.handled == 2


async def test_a_read_only_database_still_leaves_the_message_unacknowledged_and_retried(bug):
    gw, plugin, dev = bug
    async with storage_failing(gw):  # "attempt to write a readonly database": it can pass
        await dev.publish("bug/d1/ok", b"7", packet_id=7)
        with trio.move_on_after(1.5):
            await dev.expect_ack()
            raise AssertionError("acknowledged while nothing could be stored")
        assert gw.mqtt.delivery.stats.storage_waits >= 1
    with trio.fail_after(40):
        assert await dev.expect_ack() == 7
    assert await gauges(gw) == [7]
    assert gw.mqtt.delivery.stats.statement_errors == 0 and await rejected(gw) == []


# -- the storage's split, on a real database --------------------------------------------


@pytest.fixture
async def storage(tmp_path, nursery):
    storage = Storage(tmp_path / "split.sqlite3")
    await nursery.start(storage.run)
    await storage.write(lambda: storage.database.execute_sql("CREATE TABLE t (a INTEGER UNIQUE)"))
    return storage


@pytest.mark.parametrize("sql,message", [
    ("INSERT INTO t (b) VALUES (1)", "table t has no column named b"),
    ("SELECT b FROM t", "no such column: b"),
    ("INSERT INTO nosuch VALUES (1)", "no such table: nosuch"),
    ("INSER INTO t VALUES (1)", 'near "INSER": syntax error'),
    ("INSERT INTO transactions VALUES (1)", "no such table: transactions"),  # not the writer's transaction state
])
async def test_statements_sqlite_refuses_are_statement_errors(storage, sql, message):
    with pytest.raises(StatementError, match=message):
        await storage.write(lambda: storage.database.execute_sql(sql))
    with pytest.raises(StatementError, match=message):
        await storage.read(lambda: storage.database.execute_sql(sql))


async def test_the_writers_transaction_state_is_not_a_statement_error(storage):
    # What SQLite says when the connection's transaction state is off: it can pass.
    from gatewayd.core.storage import _classify

    conn = sqlite3.connect(":memory:", isolation_level=None)
    for sql in ("RELEASE nosuch", "COMMIT"):
        try:
            conn.execute(sql)
        except sqlite3.OperationalError as e:
            error = _classify(e)
        assert isinstance(error, StorageError) and not isinstance(error, StatementError), error
    # A job's own RELEASE of nothing inside the writer's live transaction is the job's
    # statement, refused the same way every time (review: tests/test_mqtt_review_mqtt.py).
    with pytest.raises(StatementError, match="no such savepoint"):
        await storage.write(lambda: storage.database.execute_sql("RELEASE nosuch"))


async def test_storage_that_cannot_write_for_now_is_not_a_statement_error(storage, tmp_path):
    db = storage.database
    await storage.write(lambda: db.execute_sql("PRAGMA query_only = 1"))
    with pytest.raises(StorageError, match="readonly") as info:
        await storage.write(lambda: db.execute_sql("INSERT INTO t VALUES (1)"))
    assert not isinstance(info.value, StatementError)
    await storage.write(lambda: db.execute_sql("PRAGMA query_only = 0"))
    # Locked by another process (another connection holding the write lock).
    await storage.write(lambda: db.execute_sql("PRAGMA busy_timeout = 50"))
    other = sqlite3.connect(tmp_path / "split.sqlite3", isolation_level=None, check_same_thread=False)
    await trio.to_thread.run_sync(other.execute, "BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageError, match="locked") as info:
            await storage.write(lambda: db.execute_sql("INSERT INTO t VALUES (2)"))
        assert not isinstance(info.value, StatementError)
    finally:
        await trio.to_thread.run_sync(other.execute, "ROLLBACK")
        await trio.to_thread.run_sync(other.close)
