"""edgesentinel's tables (the spec's data model, what a site needs of it) and their
prepared writes.

Devices and their keys are the core's registry (`ctx.devices`). Here: the ingest ledger
(one row per accepted upload, with the answer given, for Idempotency-Key replays), the
record hashes of the duplicate protection, and the time series: telemetry points,
windows, raw waveforms, door events, system events. Tables are named after the plugin
(`edgesentinel_point`, ...), so a copy of the plugin under another name has its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import peewee

VERSION = 2  # the schema's; 2: the ledger's (device, received_at) index (the dashboard's last batch per node)


class Table(peewee.Model):
    class Meta:
        # Index names from the table's name (`edgesentinel_point_device_ts`), not the
        # class's: SQLite's index names are per database, shared by every plugin.
        legacy_table_names = False


class Packet(Table):
    """The ingest ledger (the spec's Telemetry Packet): one accepted upload, its answer."""

    device = peewee.CharField(max_length=128)
    upload_id = peewee.CharField(max_length=36)  # the Idempotency-Key
    checksum = peewee.CharField(max_length=64)  # Content-SHA256
    batch_id = peewee.CharField(max_length=128)
    status = peewee.CharField(max_length=16)  # accepted
    received_at = peewee.FloatField()
    accepted = peewee.IntegerField()
    duplicates = peewee.IntegerField()
    rejected = peewee.IntegerField()
    answer = peewee.TextField()  # the JSON answered, given again for a replay

    class Meta:
        indexes = ((("device", "upload_id"), True), (("device", "received_at"), False))


class Seen(Table):
    """Duplicate protection: `(device_id, batch_id, record_hash)`, kept `dedup_days`."""

    device = peewee.CharField(max_length=128)
    batch_id = peewee.CharField(max_length=128)
    hash = peewee.BigIntegerField()
    at = peewee.FloatField()

    class Meta:
        indexes = ((("device", "batch_id", "hash"), True),)


class Point(Table):
    """TelemetryPoint: ts, device_id, metric, value, unit, meta (JSON)."""

    ts = peewee.FloatField()
    device = peewee.CharField(max_length=128)
    metric = peewee.CharField(max_length=64)
    value = peewee.FloatField()
    unit = peewee.CharField(max_length=16)
    meta = peewee.TextField(null=True)

    class Meta:
        indexes = ((("device", "ts"), False), (("metric", "ts"), False))


class Window(Table):
    """TelemetryWindow: ts, device_id, metric, stats (rms/max/std/bandpower), sent or computed."""

    ts = peewee.FloatField()
    device = peewee.CharField(max_length=128)
    metric = peewee.CharField(max_length=64)
    stats = peewee.TextField()  # JSON
    window_s = peewee.FloatField(null=True)
    source = peewee.CharField(max_length=8)  # "node" (sent) or "gateway" (computed from a waveform)

    class Meta:
        indexes = ((("device", "ts"), False), (("metric", "ts"), False))


class Waveform(Table):
    """A raw window as sent (float32 samples), kept `windows.raw_retention_days`."""

    ts = peewee.FloatField()
    device = peewee.CharField(max_length=128)
    metric = peewee.CharField(max_length=64)
    rate_hz = peewee.FloatField()
    unit = peewee.CharField(max_length=16)
    samples = peewee.BlobField()

    class Meta:
        indexes = ((("device", "ts"), False),)


class DoorEvent(Table):
    """Door events: cycle_open, cycle_close, over_torque, vibration_alert."""

    ts = peewee.FloatField()
    device = peewee.CharField(max_length=128)
    door_id = peewee.CharField(max_length=64)
    type = peewee.CharField(max_length=32)
    data = peewee.TextField()  # value, unit, duration_ms, meta (JSON)

    class Meta:
        indexes = ((("device", "ts"), False), (("type", "ts"), False))


class SystemEvent(Table):
    """SystemEvent: ts, device_id, event_type, severity, description, duration, resolved."""

    ts = peewee.FloatField()
    device = peewee.CharField(max_length=128)
    event_type = peewee.CharField(max_length=64)
    severity = peewee.CharField(max_length=16)
    description = peewee.TextField()
    duration = peewee.FloatField(null=True)
    resolved = peewee.BooleanField(null=True)
    meta = peewee.TextField()

    class Meta:
        indexes = ((("device", "ts"), False),)


MODELS: list[type[peewee.Model]] = [Packet, Seen, Point, Window, Waveform, DoorEvent, SystemEvent]
SERIES: dict[str, type[peewee.Model]] = {"points": Point, "windows": Window, "waveforms": Waveform,
                                         "door_events": DoorEvent, "system_events": SystemEvent}


def named(plugin: str) -> list[type[peewee.Model]]:
    """The models, their tables named after the plugin: `<plugin>_point`, ..."""
    for model in MODELS:
        model._meta.set_table_name(f"{plugin}_{_snake(model.__name__)}")
    return MODELS


def index_packets(migrator: Any, database: peewee.Database) -> None:
    """Migration 1 -> 2: the ledger's `(device, received_at)` index (as a new table has it)."""
    from playhouse.migrate import migrate

    migrate(migrator.add_index(Packet._meta.table_name, ("device", "received_at"), False))


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


# -- writes: on the writer thread, inside ctx.ingest's transaction ---------------------


class Rows:
    """The batch's rows as prepared statements on the writer's connection (peewee would
    build each INSERT's SQL anew: thousands per batch)."""

    def __init__(self, connection: Callable[[], sqlite3.Connection]) -> None:
        self._connection = connection  # ctx.storage.connection: the writer's, in its transaction
        self.sql = {
            "seen": _insert(Seen, "device", "batch_id", "hash", "at"),
            "points": _insert(Point, "ts", "device", "metric", "value", "unit", "meta"),
            "windows": _insert(Window, "ts", "device", "metric", "stats", "window_s", "source"),
            "waveforms": _insert(Waveform, "ts", "device", "metric", "rate_hz", "unit", "samples"),
            "door_events": _insert(DoorEvent, "ts", "device", "door_id", "type", "data"),
            "system_events": _insert(SystemEvent, "ts", "device", "event_type", "severity", "description", "duration",
                                     "resolved", "meta"),
            "packet": _insert(Packet, "device", "upload_id", "checksum", "batch_id", "status", "received_at",
                              "accepted", "duplicates", "rejected", "answer"),
        }

    def write(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        """`rows[name]`: the parameter tuples of each table's insert (names as in `sql`)."""
        connection = self._connection()
        for name, params in rows.items():
            if params:
                connection.executemany(self.sql[name], params)


def _connection(database: peewee.Database) -> sqlite3.Connection:
    connection: sqlite3.Connection = database.connection()  # type: ignore[no-untyped-call]  # peewee's stubs
    return connection


def _insert(model: type[peewee.Model], *names: str) -> str:
    fields = model._meta.fields
    columns = ", ".join(f'"{fields[name].column_name}"' for name in names)
    return f'INSERT INTO "{model._meta.table_name}" ({columns}) VALUES ({", ".join("?" * len(names))})'


# -- reads (reader threads) -----------------------------------------------------------------


def answered(device: str, upload_id: str) -> tuple[str, str] | None:
    """(checksum, answer) of an upload already accepted under this key, or None."""
    row = Packet.get_or_none((Packet.device == device) & (Packet.upload_id == upload_id))
    return None if row is None else (str(row.checksum), str(row.answer))


def seen_hashes(device: str, batch_id: str) -> set[int]:
    """The record hashes stored for this device and batch id (the duplicate check)."""
    rows = _connection(Seen._meta.database).execute(
        f'SELECT hash FROM "{Seen._meta.table_name}" WHERE device = ? AND batch_id = ?', (device, batch_id))
    return {int(h) for (h,) in rows}


# -- the data explorer (reader threads) ------------------------------------------------

COLUMNS: dict[str, list[str]] = {
    "points": ["ts", "device_id", "metric", "value", "unit", "meta", "id"],
    "windows": ["ts", "device_id", "metric", "stats", "window_s", "source", "id"],
    "door_events": ["ts", "device_id", "door_id", "type", "data", "id"],
    "system_events": ["ts", "device_id", "event_type", "severity", "description", "duration", "resolved", "meta",
                      "id"],
}
_NAME = {"points": "metric", "windows": "metric", "door_events": "type", "system_events": "event_type"}


INDEXED_NAME = frozenset({"points", "windows", "door_events"})  # a (metric or type, ts) index serves their name


def devices_of(series: str) -> list[str]:
    """The devices with rows in a series, one probe each, skipping along the `(device, ts)`
    index (as `expire_series` does: `SELECT DISTINCT` reads all of it)."""
    model = SERIES[series]
    table = model._meta.table_name
    rows = _connection(model._meta.database).execute(
        f'WITH RECURSIVE p(v) AS (SELECT min(device) FROM "{table}" UNION ALL '
        f'SELECT (SELECT min(device) FROM "{table}" WHERE device > p.v) FROM p WHERE p.v IS NOT NULL) '
        "SELECT v FROM p WHERE v IS NOT NULL")
    return [str(v) for (v,) in rows]


def explore(series: str, device: str, name: str, since: float | None, until: float | None,
            after: tuple[float, int] | None, limit: int) -> list[tuple[Any, ...]]:
    """One page of a series, oldest first, after `(ts, id)`: through `(device, ts)` or `(metric, ts)`."""
    model = SERIES[series]
    sql, params = explore_sql(series, device, name, since, until, after, limit)
    return list(_connection(model._meta.database).execute(sql, params))


def explore_sql(series: str, device: str, name: str, since: float | None, until: float | None,
                after: tuple[float, int] | None, limit: int) -> tuple[str, list[Any]]:
    """`explore`'s query and its parameters."""
    model = SERIES[series]
    columns = ", ".join(f'"{c if c != "device_id" else "device"}"' for c in COLUMNS[series])
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("device", device), (_NAME[series], name)):
        if value:
            where.append(f'"{column}" = ?')
            params.append(value)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    if after is not None:
        where.append("(ts > ? OR (ts = ? AND id > ?))")
        params += [after[0], after[0], after[1]]
    sql = (f'SELECT {columns} FROM "{model._meta.table_name}"' + (" WHERE " + " AND ".join(where) if where else "")
           + f" ORDER BY ts, id LIMIT {int(limit)}")
    return sql, params


def door_cycles(device: str, since: float, offset_s: float) -> dict[tuple[str, str], dict[str, int]]:
    """(device, door) -> {site-local day: cycle_open count} since `since`."""
    sql = (f"SELECT device, door_id, date(ts + ?, 'unixepoch'), count(*) FROM \"{DoorEvent._meta.table_name}\" "
           "WHERE type = 'cycle_open' AND ts >= ?" + (" AND device = ?" if device else "")
           + " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
    params: list[Any] = [offset_s, since, *([device] if device else [])]
    out: dict[tuple[str, str], dict[str, int]] = {}
    for dev, door, day, n in _connection(DoorEvent._meta.database).execute(sql, params):
        out.setdefault((dev, door), {})[day] = int(n)
    return out


def last_batches(devices: list[str]) -> dict[str, tuple[float, int, int, int]]:
    """device -> (received_at, accepted, duplicates, rejected) of its newest accepted batch
    (one index probe per device, through `(device, received_at)`)."""
    sql = (f'SELECT received_at, accepted, duplicates, rejected FROM "{Packet._meta.table_name}" '
           "WHERE device = ? ORDER BY received_at DESC LIMIT 1")
    connection = _connection(Packet._meta.database)
    out = {}
    for device in devices:
        row = connection.execute(sql, (device,)).fetchone()
        if row is not None:
            out[device] = (float(row[0]), int(row[1]), int(row[2]), int(row[3]))
    return out


# -- retention (the writer thread, a step at a time) --------------------------------------------

STEP = 2000  # rows a retention step deletes (one write transaction): bench section 3


def expire_ledger(model: type[peewee.Model], column: str, before: float, now: float | None = None) -> int:
    """Delete up to STEP of the oldest rows of the ledger or the hashes (written in time
    order, so the oldest are the lowest ids: no index on the time needed). Rows stamped
    more than a day after `now` (written while the clock was ahead, before NTP set it
    back) are stepped over, not taken for the first young row: they would stop every
    row behind them from expiring until their own time came."""
    table = model._meta.table_name
    connection = _connection(model._meta.database)
    future = None if now is None else now + 86400.0
    ids = []
    cursor = connection.execute(f'SELECT id, "{column}" FROM "{table}" ORDER BY id')
    try:
        for row_id, when in cursor:
            if future is not None and when > future:
                continue
            if when >= before:
                break
            ids.append((row_id,))
            if len(ids) >= STEP:
                break
    finally:
        cursor.close()
    connection.executemany(f'DELETE FROM "{table}" WHERE id = ?', ids)
    return len(ids)


def expire_series(model: type[peewee.Model], prefix: str, before: float) -> int:
    """Delete up to STEP rows with `ts` before `before` (a backfill stores old times late,
    so by time, through the `(prefix, ts)` index, one range per distinct prefix). The
    distinct prefixes are found by skipping along the index (one probe each): `SELECT
    DISTINCT` scanned all of it, 167 ms a step at 1,000,000 rows against 1.7 ms."""
    table = model._meta.table_name
    connection = _connection(model._meta.database)
    ids = connection.execute(
        f'WITH RECURSIVE p(v) AS (SELECT min("{prefix}") FROM "{table}" UNION ALL '
        f'SELECT (SELECT min("{prefix}") FROM "{table}" WHERE "{prefix}" > p.v) FROM p WHERE p.v IS NOT NULL) '
        f'SELECT id FROM "{table}" WHERE "{prefix}" IN (SELECT v FROM p WHERE v IS NOT NULL) AND ts < ? '
        f"LIMIT {STEP}", (before,)).fetchall()
    connection.executemany(f'DELETE FROM "{table}" WHERE id = ?', ids)
    return len(ids)
