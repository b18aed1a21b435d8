"""streetlight's tables and the queries its routes need.

Devices, their keys and tokens are the core's registry (`ctx.devices`), commands the
core's queue (`ctx.commands`). The plugin keeps what the lights say: each light's
assigned `light_id` and operator overrides, every status report, and the energy
readings in their own table (the specification's checklist: "Status storage in
`energy_parameters` table"). Tables are named after the plugin (`streetlight_light`,
`streetlight_status`, `streetlight_energy_parameters` under the name streetlight).
"""

from __future__ import annotations

import json
from typing import Any

import peewee

from gatewayd.plugins.api import PluginStorage

from .messages import Status

VERSION = 2  # 2: status and energy rows indexed by arrival (the retention purge)


class Table(peewee.Model):
    class Meta:
        legacy_table_names = False  # index names from the table's name: they are per database


class Light(Table):
    """One configured light: the id the gateway gave it, what it said of itself last."""

    device = peewee.CharField(max_length=128, primary_key=True)
    light_id = peewee.CharField(max_length=64, unique=True)
    seq = peewee.IntegerField(unique=True)  # the number in the light id
    registration = peewee.TextField(default="{}")  # the last configure request, normalised
    configured_at = peewee.FloatField()


class StatusRow(Table):
    """One status report, live (`via` http / mqtt) or from an offline sync (`sync`)."""

    id = peewee.AutoField()
    device = peewee.CharField(max_length=128)
    ts = peewee.FloatField()  # the light's timestamp, else the arrival time
    received_at = peewee.FloatField()
    via = peewee.CharField(max_length=8)
    power_state = peewee.CharField(max_length=8, null=True)
    brightness = peewee.FloatField(null=True)
    temperature = peewee.FloatField(null=True)
    battery = peewee.FloatField(null=True)
    gsm_signal = peewee.FloatField(null=True)
    uptime = peewee.IntegerField(null=True)
    error_flags = peewee.TextField(default="[]")

    class Meta:
        indexes = ((("device", "ts"), False), (("received_at",), False))


class EnergyParameters(Table):
    """The `energy` block of a status report."""

    id = peewee.AutoField()
    device = peewee.CharField(max_length=128)
    ts = peewee.FloatField()
    received_at = peewee.FloatField(null=True)  # null: stored by schema 1 (its ts stands in)
    voltage = peewee.FloatField(null=True)
    current = peewee.FloatField(null=True)
    power_watts = peewee.FloatField(null=True)
    frequency = peewee.FloatField(null=True)
    cumulative_kwh = peewee.FloatField(null=True)

    class Meta:
        indexes = ((("device", "ts"), False), (("received_at",), False))


def named(plugin: str) -> list[type[peewee.Model]]:
    """The models, their tables named after the plugin: `<plugin>_light`, ..."""
    names = {Light: "light", StatusRow: "status", EnergyParameters: "energy_parameters"}
    for model, name in names.items():
        model._meta.set_table_name(f"{plugin}_{name}")
    return list(names)


# -- writes (on the storage writer, inside ctx.ingest's transaction) --------------------


class Rows:
    """Status and energy rows as prepared statements on the writer's connection: peewee
    builds an INSERT's SQL anew on every call, which costs more than the insert (the
    status path is the hot one: bench/streetlight_bench.py)."""

    STATUS = ("device", "ts", "received_at", "via", "power_state", "brightness", "temperature", "battery",
              "gsm_signal", "uptime", "error_flags")
    ENERGY = ("device", "ts", "received_at", "voltage", "current", "power_watts", "frequency", "cumulative_kwh")

    def __init__(self, storage: PluginStorage) -> None:
        self._connection = storage.connection
        self._status = _insert(StatusRow, self.STATUS)
        self._energy = _insert(EnergyParameters, self.ENERGY)

    def statuses(self, device: str, statuses: list[tuple[Status, float]], received_at: float, via: str) -> None:
        """Inside ctx.ingest's transaction: each report's row, and its energy row."""
        connection = self._connection()
        connection.executemany(self._status, [
            (device, ts, received_at, via, s.power_state, s.brightness, s.temperature, s.battery, s.gsm_signal,
             s.uptime, json.dumps(list(s.error_flags))) for s, ts in statuses])
        energy = [(device, ts, received_at, *s.energy) for s, ts in statuses if s.energy is not None]
        if energy:
            connection.executemany(self._energy, energy)


def _insert(model: type[peewee.Model], names: tuple[str, ...]) -> str:
    fields = model._meta.fields
    columns = ", ".join(f'"{fields[name].column_name}"' for name in names)
    return f'INSERT INTO "{model._meta.table_name}" ({columns}) VALUES ({", ".join("?" * len(names))})'


def assign_light(device: str, prefix: str, registration: dict[str, Any], now: float) -> str:
    """The light's id: a new one (`<prefix><n>`) on its first configure, else the one it has."""
    row = Light.get_or_none(Light.device == device)
    if row is None:
        seq = (Light.select(peewee.fn.MAX(Light.seq)).scalar() or 0) + 1
        row = Light.create(device=device, light_id=f"{prefix}{seq:03d}", seq=seq, configured_at=now,
                           registration=json.dumps(registration))
    else:
        Light.update(registration=json.dumps(registration), configured_at=now).where(Light.device == device).execute()
    return str(row.light_id)


def add_arrival_index(migrator: Any, database: peewee.Database) -> None:
    """Schema 2: energy rows know their arrival (`received_at`): schema 1's take it from
    the status row stored with them (same light, same timestamp), else their timestamp
    (a synced reading's is weeks before it arrived: the purge would take it at once); the
    indexes on it, status and energy, are created right after."""
    connection = database.connection()  # type: ignore[no-untyped-call]  # peewee's stubs
    energy, status = EnergyParameters._meta.table_name, StatusRow._meta.table_name
    connection.execute(f'ALTER TABLE "{energy}" ADD COLUMN "received_at" REAL')
    connection.execute(f'UPDATE "{energy}" SET "received_at" = COALESCE((SELECT MAX(s."received_at") FROM "{status}" s'
                       f' WHERE s."device" = "{energy}"."device" AND s."ts" = "{energy}"."ts"), "ts")')


def purge(before: float, limit: int) -> tuple[int, int]:
    """Delete up to `limit` status rows and up to `limit` energy rows received before
    `before`, oldest first: (status rows, energy rows) deleted. In parts, so the writer
    is never held for long."""
    removed = []
    for model in (StatusRow, EnergyParameters):
        chosen = (model.select(model.id).where(model.received_at < before).order_by(model.received_at).limit(limit))
        removed.append(int(model.delete().where(model.id.in_(chosen)).execute()))
    return removed[0], removed[1]


# -- reads --------------------------------------------------------------------------------


def lights() -> dict[str, str]:
    """device id -> light id, every configured light."""
    return {r.device: r.light_id for r in Light.select(Light.device, Light.light_id)}


def latest_status(device: str) -> dict[str, Any] | None:
    """The newest live status of a light (by arrival), with its newest energy reading."""
    row = (StatusRow.select().where((StatusRow.device == device) & (StatusRow.via != "sync"))
           .order_by(StatusRow.received_at.desc(), StatusRow.id.desc()).first())
    if row is None:
        return None
    return {"ts": row.ts, "received_at": row.received_at, "power_state": row.power_state,
            "brightness": row.brightness, "temperature": row.temperature, "battery": row.battery,
            "gsm_signal": row.gsm_signal, "uptime": row.uptime, "error_flags": json.loads(row.error_flags)}


def energy_since(since: float) -> tuple[float, int]:
    """The energy the lights used since `since` (by their readings' timestamps): per light
    its newest `cumulative_kwh` less its first since then, two index lookups per light.
    (kWh in all, lights with readings); a meter that went back (replaced) counts 0."""
    def reading(newest: bool) -> peewee.SelectQuery:
        e = EnergyParameters
        return (e.select(e.cumulative_kwh)
                .where((e.device == Light.device) & (e.ts >= since) & e.cumulative_kwh.is_null(False))
                .order_by(e.ts.desc() if newest else e.ts).limit(1))

    total, lights = 0.0, 0
    query: Any = Light.select(reading(False), reading(True)).tuples()  # rows of (first, last)
    rows: list[tuple[float | None, float | None]] = list(query)
    for first, last in rows:
        if first is not None and last is not None:
            total += max(0.0, last - first)
            lights += 1
    return total, lights


def recent_statuses(device: str, limit: int) -> list[dict[str, Any]]:
    rows = (StatusRow.select().where(StatusRow.device == device).order_by(StatusRow.ts.desc()).limit(limit))
    return [{"ts": r.ts, "brightness": r.brightness, "temperature": r.temperature, "battery": r.battery,
             "gsm_signal": r.gsm_signal} for r in rows]
