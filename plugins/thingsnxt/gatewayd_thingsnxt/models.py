"""thingsnxt's tables (the specification's "Data Storage") and the queries its routes need.

    <name>_telemetry   every telemetry message, as the device sent it       ("history")
    <name>_state       the latest state of each device (data, pending)      (`telemetry_json`)
    <name>_value       the latest value of each key of each device          (`led_state_v0`, widget values)

Devices and their tokens are the core's registry (`ctx.devices`). Tables are named after
the plugin (`thingsnxt_state` under the name thingsnxt): a copy under another name works.
Times are epoch seconds (UTC); answers show them as ISO 8601.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

import peewee

from .telemetry import DeviceState

VERSION = 1


class Table(peewee.Model):
    class Meta:
        # Index names from the table's name, not the class's: SQLite's index names are
        # per database, shared by every plugin.
        legacy_table_names = False


class Telemetry(Table):
    """One telemetry message (or one reading of a bulk request), as received."""

    id = peewee.AutoField()
    device = peewee.CharField(max_length=128)
    ts = peewee.FloatField()  # the reading's time: its `timestamp` in a bulk request, else arrival
    received_at = peewee.FloatField()
    endpoint = peewee.CharField(max_length=16)  # v2, legacy, bulk
    data = peewee.TextField()  # the `data` object as JSON

    class Meta:
        indexes = ((("device", "ts"), False),)


class State(Table):
    """The latest state of each device: `{"data", "stamps", "pending"}` (telemetry.DeviceState)."""

    device = peewee.CharField(max_length=128, primary_key=True)
    state = peewee.TextField()
    ts = peewee.FloatField()  # when it last changed


class Value(Table):
    """The latest value of each key: a virtual pin's (`v0`, the spec's `led_state_v0`) or a sensor's."""

    device = peewee.CharField(max_length=128)
    key = peewee.CharField(max_length=64)
    value = peewee.TextField()  # JSON
    ts = peewee.FloatField()
    source = peewee.CharField(max_length=8)  # device, app

    class Meta:
        primary_key = peewee.CompositeKey("device", "key")


def named(plugin: str) -> list[type[peewee.Model]]:
    """The models, their tables named after the plugin: `<plugin>_telemetry`, ..."""
    models: list[type[peewee.Model]] = [Telemetry, State, Value]
    for model in models:
        model._meta.set_table_name(f"{plugin}_{model.__name__.lower()}")
    return models


# -- writes: on the writer thread, inside ctx.ingest's transaction ----------------------


class Rows:
    """A message's rows as prepared statements on the writer's connection: peewee builds
    an INSERT's SQL anew on every call, which costs more than the insert (ARCHITECTURE.md:
    hot paths execute prepared statements). `connection` is `ctx.storage.connection`."""

    def __init__(self, connection: Callable[[], sqlite3.Connection]) -> None:
        self._connection = connection
        self._telemetry = _insert(Telemetry, "device", "ts", "received_at", "endpoint", "data")
        self._state = _insert(State, "device", "state", "ts", verb="INSERT OR REPLACE")
        self._value = _insert(Value, "device", "key", "value", "ts", "source", verb="INSERT OR REPLACE")
        self._load = f'SELECT "state", "ts" FROM "{State._meta.table_name}" WHERE "device" = ?'
        # device -> (its state's JSON as last written or read here, that state): a message
        # reads the row back (the transaction's truth: a rolled-back group leaves the older
        # text there) and parses it only when it is not the text this cache holds.
        self._parsed: dict[str, tuple[str, float, DeviceState]] = {}

    def telemetry(self, rows: Iterable[tuple[str, float, float, str, str]]) -> None:
        """(device, ts, received_at, endpoint, data JSON) each."""
        self._connection().executemany(self._telemetry, rows)

    def load(self, device: str) -> DeviceState:
        """The device's state as this transaction sees it (empty before its first telemetry)."""
        row = self._connection().execute(self._load, (device,)).fetchone()
        if row is None:
            return DeviceState()
        cached = self._parsed.get(device)
        if cached is not None and cached[0] == row[0] and cached[1] == row[1]:
            return cached[2]  # unchanged since written: its dicts are never changed in place
        state = DeviceState.from_json(row[0], row[1])
        self._keep(device, row[0], state)
        return state

    def state(self, device: str, state: DeviceState, changed: dict[str, Any], source: str) -> None:
        """The device's new state, and a value row for each key that `changed`."""
        connection = self._connection()
        text = state.to_json()
        connection.execute(self._state, (device, text, state.ts))
        self._keep(device, text, state)
        if changed:
            connection.executemany(self._value, [
                (device, key, json.dumps(value, separators=(",", ":"), ensure_ascii=False), state.stamps[key], source)
                for key, value in changed.items()])

    def _keep(self, device: str, text: str, state: DeviceState) -> None:
        if len(self._parsed) >= 10_000 and device not in self._parsed:  # bounded: one per device
            self._parsed.clear()
        self._parsed[device] = (text, state.ts if state.ts is not None else 0.0, state)


def _insert(model: type[peewee.Model], *names: str, verb: str = "INSERT") -> str:
    fields = model._meta.fields
    columns = ", ".join(f'"{fields[name].column_name}"' for name in names)
    return f'{verb} INTO "{model._meta.table_name}" ({columns}) VALUES ({", ".join("?" * len(names))})'


# -- reads -------------------------------------------------------------------------------


def load_state(device: str) -> DeviceState:
    """The device's stored state (empty before its first telemetry)."""
    row = State.get_or_none(State.device == device)
    return DeviceState() if row is None else DeviceState.from_json(row.state, row.ts)


def load_states(devices: list[str]) -> dict[str, DeviceState]:
    """The stored states of these devices (those with one)."""
    rows = State.select().where(State.device.in_(devices))
    return {row.device: DeviceState.from_json(row.state, row.ts) for row in rows}


def recent(device: str, limit: int) -> list[tuple[float, dict[str, Any]]]:
    """The newest `limit` readings as (ts, data), for the dashboard's charts."""
    rows = (Telemetry.select(Telemetry.ts, Telemetry.data).where(Telemetry.device == device)
            .order_by(Telemetry.ts.desc(), Telemetry.id.desc()).limit(limit))
    return [(r.ts, json.loads(r.data)) for r in rows]
