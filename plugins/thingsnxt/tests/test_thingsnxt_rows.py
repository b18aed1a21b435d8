"""The writer's rows (models.Rows) on a real SQLite file: the state a message reads is the
transaction's, whatever the parsed states kept on the writer say."""

import sqlite3

import peewee
import pytest

from gatewayd_thingsnxt import models
from gatewayd_thingsnxt.telemetry import DeviceState

NOW = 1_770_912_000.0


@pytest.fixture
def db(tmp_path):
    database = peewee.SqliteDatabase(str(tmp_path / "rows.sqlite3"))
    tables = models.named("thingsnxt")
    database.bind(tables)
    database.create_tables(tables)
    conn = database.connection()
    conn.isolation_level = None  # BEGIN / COMMIT / ROLLBACK as written here, as the writer's transactions
    yield conn
    database.close()


def write(rows, device, values, ts):
    state, changed = rows.load(device).with_device(values, ts)
    rows.state(device, state, changed, "device")
    return state


def test_a_rolled_back_state_is_not_read_back(db):
    rows = models.Rows(lambda: db)
    db.execute("BEGIN")
    first = write(rows, "d1", {"v0": 0}, NOW)
    db.execute("COMMIT")
    db.execute("BEGIN")
    assert write(rows, "d1", {"v0": 1}, NOW + 1).data == {"v0": 1}
    assert rows.load("d1").data == {"v0": 1}  # the transaction sees its own write
    db.execute("ROLLBACK")  # the group failed: what it wrote is gone
    assert rows.load("d1") == first
    db.execute("BEGIN")
    db.execute("SAVEPOINT job")
    write(rows, "d1", {"v0": 2}, NOW + 2)
    db.execute("ROLLBACK TO job")  # one job of a group failed alone
    db.execute("RELEASE job")
    db.execute("COMMIT")
    assert rows.load("d1") == first


def test_a_state_written_by_another_connection_is_read(db, tmp_path):
    rows = models.Rows(lambda: db)
    write(rows, "d1", {"v0": 0}, NOW)
    other = sqlite3.connect(tmp_path / "rows.sqlite3")
    changed = DeviceState().with_app({"v0": 7}, NOW + 5)
    with other:  # another process (a CLI) writes the row meanwhile
        other.execute("UPDATE thingsnxt_state SET state = ?, ts = ? WHERE device = 'd1'",
                      (changed.to_json(), changed.ts))
    other.close()
    assert rows.load("d1") == changed


def test_an_unchanged_state_is_parsed_once(db, monkeypatch):
    rows = models.Rows(lambda: db)
    write(rows, "d1", {"v0": 0, "t": 20}, NOW)
    parsed = []
    real = DeviceState.from_json
    monkeypatch.setattr(DeviceState, "from_json", classmethod(lambda cls, *a: parsed.append(a) or real(*a)))
    for i in range(1, 4):
        write(rows, "d1", {"t": 20 + i}, NOW + i)
    assert parsed == []  # what it wrote itself is what it reads back
    assert rows.load("d1").data == {"v0": 0, "t": 23}
    assert db.execute("SELECT value FROM thingsnxt_value WHERE device = 'd1' AND key = 't'").fetchone() == ("23",)
