"""kaiabc's tables and the queries the routes and the live oscillators need.

Credentials are the core's registry (`ctx.devices`: a node is a device of the family);
kaiabc keeps what the spec says of a node, its readings, and each live oscillator's
state, so a restart resumes it. Tables are named after the plugin (`kaiabc_node`...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import peewee

VERSION = 1
PRUNE_PART = 2000
"""Readings deleted per statement: each part is a short job of the writer, so ingest waits
for one part at most, never for a whole month of readings (bench/kaiabc_prune.py)."""


class Table(peewee.Model):
    class Meta:
        legacy_table_names = False  # index names from the table's name, shared per database


class Node(Table):
    """A registered node (`POST /sensors/nodes`)."""

    node_id = peewee.CharField(max_length=128, primary_key=True)
    name = peewee.CharField(max_length=256)
    hardware_type = peewee.CharField(max_length=32)
    runtime = peewee.CharField(max_length=32)
    sensor_types = peewee.TextField()  # JSON list
    location = peewee.CharField(max_length=256)
    calibration = peewee.TextField()  # JSON object
    firmware_version = peewee.CharField(max_length=64)
    registered_at = peewee.FloatField()


class Oscillator(Table):
    """A node's live oscillator: state (uM), simulated clock, filter estimate, pause."""

    node_id = peewee.CharField(max_length=128, primary_key=True)
    c_t = peewee.FloatField()
    c_st = peewee.FloatField()
    c_s = peewee.FloatField()
    sim_hours = peewee.FloatField()
    temperature_k = peewee.FloatField()  # the filtered temperature driving it
    filter_state = peewee.TextField()  # JSON: the Kalman filter's estimate and count
    last_reading_at = peewee.FloatField(null=True)
    paused = peewee.BooleanField(default=False)
    settings = peewee.TextField(default="{}")  # JSON: the node's ETF, output mapping, override
    saved_at = peewee.FloatField()


class Reading(Table):
    """One sensor reading as accepted, with the filtered temperature after it."""

    id = peewee.AutoField()
    node_id = peewee.CharField(max_length=128)
    ts = peewee.FloatField()  # the node's timestamp
    received_at = peewee.FloatField()
    temperature_k = peewee.FloatField(null=True)
    humidity_percent = peewee.FloatField(null=True)
    pressure_pa = peewee.FloatField(null=True)
    filtered_k = peewee.FloatField(null=True)

    class Meta:
        indexes = ((("node_id", "ts"), False),)


class History(Table):
    """A node's oscillator, sampled every `history_every_s` (GET /oscillator/history)."""

    id = peewee.AutoField()
    node_id = peewee.CharField(max_length=128)
    ts = peewee.FloatField()
    c_t = peewee.FloatField()
    c_st = peewee.FloatField()
    c_s = peewee.FloatField()
    koa = peewee.FloatField()
    temperature_k = peewee.FloatField()
    sim_hours = peewee.FloatField(default=0.0)  # the node's simulated clock (periods are measured in it)

    class Meta:
        indexes = ((("node_id", "ts"), False), (("ts",), False))


class Token(Table):
    """A person's or an app's token with a role (POST /v1/auth/tokens): only its SHA-256 is kept."""

    name = peewee.CharField(max_length=64, primary_key=True)
    role = peewee.CharField(max_length=16)
    digest = peewee.CharField(max_length=64, unique=True)
    created_at = peewee.FloatField()
    expires_at = peewee.FloatField()


class Setting(Table):
    """The site's settings (the default ETF, the solver configuration), as JSON."""

    key = peewee.CharField(max_length=64, primary_key=True)
    value = peewee.TextField()


TABLES = (Node, Oscillator, Reading, History, Token, Setting)
HISTORY_COLUMNS = ("c_t", "c_st", "c_s", "koa", "temperature_k")


def named(plugin: str) -> list[type[Table]]:
    """The tables, named after the plugin: `<plugin>_node`, `<plugin>_oscillator`, `<plugin>_reading`."""
    for model in TABLES:
        model._meta.set_table_name(f"{plugin}_{model.__name__.lower()}")
    return list(TABLES)


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    name: str
    hardware_type: str
    runtime: str
    sensor_types: list[str]
    location: str
    calibration: dict[str, float]
    firmware_version: str
    registered_at: float


class Store:
    """The plugin's queries over its named tables (run on the storage threads)."""

    def __init__(self) -> None:
        self.node, self.oscillator, self.reading, self.setting = Node, Oscillator, Reading, Setting
        self.history = History
        self.token = Token

    # -- nodes ----------------------------------------------------------------------

    def add_node(self, info: NodeInfo, oscillator: dict[str, Any]) -> bool:
        """Insert a node and its oscillator; False when it was registered already."""
        if self.node.get_or_none(self.node.node_id == info.node_id) is not None:
            return False
        self.node.create(node_id=info.node_id, name=info.name, hardware_type=info.hardware_type,
                         runtime=info.runtime, sensor_types=json.dumps(info.sensor_types), location=info.location,
                         calibration=json.dumps(info.calibration), firmware_version=info.firmware_version,
                         registered_at=info.registered_at)
        self.oscillator.insert(**oscillator).on_conflict_replace().execute()
        return True

    def nodes(self) -> list[NodeInfo]:
        return [_info(row) for row in self.node.select().order_by(self.node.node_id)]

    # -- oscillators ----------------------------------------------------------------

    def oscillators(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = list(self.oscillator.select().dicts())  # type: ignore[arg-type]
        return rows

    def save_oscillators(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows (node_id, c_t, c_st, c_s, sim_hours, temperature_k, filter_state, last_reading_at, paused,
        settings, saved_at), one statement per row in one transaction."""
        table = self.oscillator._meta.table_name
        self.oscillator._meta.database.connection().executemany(
            f"INSERT OR REPLACE INTO {table} (node_id, c_t, c_st, c_s, sim_hours, temperature_k, filter_state, "
            "last_reading_at, paused, settings, saved_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)

    # -- history --------------------------------------------------------------------

    def add_history(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows (node_id, ts, c_t, c_st, c_s, koa, temperature_k, sim_hours) in one statement."""
        table = self.history._meta.table_name
        self.history._meta.database.connection().executemany(
            f"INSERT INTO {table} (node_id, ts, c_t, c_st, c_s, koa, temperature_k, sim_hours) "
            "VALUES (?,?,?,?,?,?,?,?)", rows)

    def thin_history(self, low: float, high: float, every_s: float) -> int:
        """Keep one sample (the first) per node and `every_s` bucket among those in [low, high);
        `low` and `high` on bucket edges. Returns how many rows went."""
        table = self.history._meta.table_name
        bucket = f"CAST(ts / {every_s!r} AS INTEGER)"
        cursor = self.history._meta.database.connection().execute(
            f"DELETE FROM {table} WHERE ts >= ? AND ts < ? AND id NOT IN (SELECT MIN(id) FROM {table} "
            f"WHERE ts >= ? AND ts < ? GROUP BY node_id, {bucket})", (low, high, low, high))
        return int(cursor.rowcount)

    def history_rows(self, node_id: str, start: float, end: float, after_id: int, limit: int) -> list[tuple[Any, ...]]:
        """Raw rows (id, ts, c_t, c_st, c_s, koa, temperature_k, sim_hours) oldest first, after row `after_id`."""
        table = self.history._meta.table_name
        return [tuple(r) for r in self.history._meta.database.connection().execute(
            f"SELECT id, ts, c_t, c_st, c_s, koa, temperature_k, sim_hours FROM {table} "
            "WHERE node_id = ? AND ts >= ? AND ts < ? AND id > ? ORDER BY id LIMIT ?",
            (node_id, start, end, after_id, limit)).fetchall()]

    def history_page(self, node_id: str, start: float, end: float, resolution_s: float, limit: int,
                     descending: bool = False, key: float | None = None,
                     side: str = "after") -> tuple[list[tuple[float, ...]], int, int]:
        """Bucket means (bucket start, c_t, c_st, c_s, koa, temperature_k) in the order of their
        start (newest first when `descending`), at most `limit`: the first ones, or those on `side`
        ("after", "before", "through": paging.py) of the bucket starting at `key`. Also the page's
        position (how many buckets come before it in that order) and how many buckets in all."""
        table = self.history._meta.table_name
        conn = self.history._meta.database.connection()
        res = repr(resolution_s)
        bucket = f"CAST(ts / {res} AS INTEGER)"
        where = "node_id = ? AND ts >= ? AND ts < ?"
        args: tuple[Any, ...] = (node_id, start, end)
        total = conn.execute(f"SELECT COUNT(DISTINCT {bucket}) FROM {table} WHERE {where}", args).fetchone()[0]
        # the buckets later than a bucket start k in time: ts >= k + res; earlier ones: ts < k
        later, earlier = f"ts >= ? + {res}", "ts < ?"
        ahead = side == "after"  # read in the page's order, or backwards from the cursor
        cond, more = "", args
        if key is not None:
            if side == "through":
                cond = " AND " + ("ts >= ?" if descending else f"ts < ? + {res}")
            else:
                cond = " AND " + (later if ahead != descending else earlier)
            more = (*args, key)
        newest_first = descending == ahead
        rows = [tuple(r) for r in conn.execute(
            f"SELECT {bucket} * {res}, AVG(c_t), AVG(c_st), AVG(c_s), AVG(koa), AVG(temperature_k) "
            f"FROM {table} WHERE {where}{cond} GROUP BY {bucket} "
            f"ORDER BY {bucket} {'DESC' if newest_first else 'ASC'} LIMIT ?", (*more, limit)).fetchall()]
        if not ahead:
            rows.reverse()
        if rows:
            before = f" AND {later if descending else earlier}"
            position = conn.execute(f"SELECT COUNT(DISTINCT {bucket}) FROM {table} WHERE {where}{before}",
                                    (*args, rows[0][0])).fetchone()[0]
        else:
            position = total if ahead and key is not None else 0
        return rows, int(position), int(total)

    # -- tokens ---------------------------------------------------------------------

    def tokens(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = list(self.token.select().order_by(self.token.name).dicts())  # type: ignore[arg-type]
        return rows

    def add_token(self, name: str, role: str, digest: str, created_at: float, expires_at: float) -> bool:
        if self.token.get_or_none(self.token.name == name) is not None:
            return False
        self.token.create(name=name, role=role, digest=digest, created_at=created_at, expires_at=expires_at)
        return True

    def revoke_token(self, name: str) -> bool:
        return bool(self.token.delete().where(self.token.name == name).execute())

    # -- settings -------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {row.key: json.loads(row.value) for row in self.setting.select()}

    def put_setting(self, key: str, value: Any) -> None:
        self.setting.insert(key=key, value=json.dumps(value)).on_conflict_replace().execute()

    # -- readings -------------------------------------------------------------------

    def add_readings(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.reading.insert_many(rows).execute()

    def prune_readings(self, cutoff: float, part: int = PRUNE_PART) -> int:
        """Delete the readings that arrived before `cutoff` among the `part` oldest (by row id,
        the order they were stored in); returns how many went, 0 when none of those is that
        old. Reads at most `part` rows, by the primary key: no index on `received_at` needed.
        (A reading stored after a newer one, the clock set back, goes once those before it have.)"""
        table = self.reading._meta.table_name
        # The window's last id, then a range of the primary key: cheaper than `id IN (...)`.
        cursor = self.reading._meta.database.connection().execute(
            f"DELETE FROM {table} WHERE id <= COALESCE((SELECT id FROM {table} ORDER BY id LIMIT 1 OFFSET ?), "
            f"(SELECT MAX(id) FROM {table})) AND received_at < ?", (part - 1, cutoff))
        return int(cursor.rowcount)


def _info(row: Any) -> NodeInfo:
    return NodeInfo(row.node_id, row.name, row.hardware_type, row.runtime, json.loads(row.sensor_types),
                    row.location, json.loads(row.calibration), row.firmware_version, row.registered_at)
