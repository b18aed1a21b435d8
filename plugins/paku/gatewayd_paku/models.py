"""paku's tables (the spec's data model) and the queries its routes need.

Devices and their credentials are the core's registry (`ctx.devices`); paku keeps what
its devices send: every measurement, every event, and the latest state of each device.
Tables are named after the plugin (`paku_measurement`, ... under the name paku).
"""

from __future__ import annotations

import json
from typing import Any

import peewee

from gatewayd.plugins.api import PluginStorage, encode_cursor


VERSION = 2  # the schema's; migrations below


class Table(peewee.Model):
    class Meta:
        # Index names from the table's name (`paku_measurement_device_ts`), not the
        # class's: SQLite's index names are per database, shared by every plugin.
        legacy_table_names = False


class Measurement(Table):
    """One telemetry message: `<name>/<device>/telemetry`."""

    id = peewee.AutoField()
    device = peewee.CharField(max_length=128)
    ts = peewee.FloatField()  # when the device measured it (its "ts", else arrival)
    received_at = peewee.FloatField()
    payload = peewee.TextField()  # the JSON object as received

    class Meta:
        indexes = ((("device", "ts"), False),)


class Event(Table):
    """One event: `<name>/<device>/event/<type>` (button, error, ack, ota, ...)."""

    id = peewee.AutoField()
    device = peewee.CharField(max_length=128)
    ts = peewee.FloatField()
    type = peewee.CharField(max_length=64)
    payload = peewee.TextField()

    class Meta:
        indexes = ((("device", "ts"), False),)


class State(Table):
    """The latest `<name>/<device>/state` of each device (the topic is retained)."""

    device = peewee.CharField(max_length=128, primary_key=True)
    online = peewee.BooleanField(null=True)
    rssi = peewee.IntegerField(null=True)
    fw_version = peewee.CharField(max_length=64, null=True)
    ts = peewee.FloatField()
    received_at = peewee.FloatField()
    payload = peewee.BlobField(column_name="raw")  # as received: a retained copy sent again is recognised


def named(plugin: str) -> list[type[peewee.Model]]:
    """The models, their tables named after the plugin: `<plugin>_measurement`, ..."""
    models: list[type[peewee.Model]] = [Measurement, Event, State]
    for model in models:
        model._meta.set_table_name(f"{plugin}_{model.__name__.lower()}")
    return models


def index_names(migrator: Any, database: peewee.Database) -> None:
    """Schema 2: indexes named after their table. Schema 1's `measurement_device_ts` and
    `event_device_ts` were the names any plugin's Measurement and Event would want."""
    for model in (Measurement, Event):
        old, table = f"{model.__name__.lower()}_device_ts", model._meta.table_name
        connection = database.connection()  # type: ignore[no-untyped-call]  # peewee's stubs
        if connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ? AND tbl_name = ?",
                              (old, table)).fetchone():
            connection.execute(f'DROP INDEX "{old}"')  # the new one is created right after


# -- writes: one per message, on the writer thread, inside ctx.ingest's transaction ----


class Rows:
    """paku's rows as prepared statements on the writer's connection (ARCHITECTURE.md:
    hot paths do). peewee builds an INSERT's SQL anew on every call, which cost more than
    the insert and the rest of the transaction together (bench/paku_bench.py)."""

    def __init__(self, storage: PluginStorage) -> None:
        self._connection = storage.connection
        self._measurement = _insert(Measurement, "device", "ts", "received_at", "payload")
        self._event = _insert(Event, "device", "ts", "type", "payload")
        self._state = _insert(State, "device", "online", "rssi", "fw_version", "ts", "received_at", "payload",
                              verb="INSERT OR REPLACE")

    # The writer thread's connection: these run inside its transaction.

    def measurement(self, device: str, ts: float, received_at: float, payload: str) -> None:
        self._connection().execute(self._measurement, (device, ts, received_at, payload))

    def measurements(self, rows: list[tuple[str, float, float, str]]) -> None:
        """Many at once: (device, ts, received_at, payload) each, one prepared statement."""
        self._connection().executemany(self._measurement, rows)

    def event(self, device: str, ts: float, type: str, payload: str) -> None:
        self._connection().execute(self._event, (device, ts, type, payload))

    def state(self, device: str, online: bool | None, rssi: int | None, fw_version: str | None, ts: float,
              received_at: float, payload: bytes) -> None:
        self._connection().execute(self._state, (device, online, rssi, fw_version, ts, received_at, payload))


def _insert(model: type[peewee.Model], *names: str, verb: str = "INSERT") -> str:
    fields = model._meta.fields
    columns = ", ".join(f'"{fields[name].column_name}"' for name in names)
    return f'{verb} INTO "{model._meta.table_name}" ({columns}) VALUES ({", ".join("?" * len(names))})'


# -- reads ---------------------------------------------------------------------------


def stored_state(device: str) -> bytes | None:
    """The device's latest state as it was received (None if it never sent one)."""
    row = State.get_or_none(State.device == device)
    return None if row is None else bytes(row.payload)


def latest(device: str) -> dict[str, Any]:
    """The device's latest state and telemetry, for `GET /devices/<id>`."""
    state = State.get_or_none(State.device == device)
    measurement = (Measurement.select().where(Measurement.device == device)
                   .order_by(Measurement.ts.desc(), Measurement.id.desc()).first())
    return {
        "state": None if state is None else {
            "online": state.online, "rssi": state.rssi, "fwVersion": state.fw_version, "ts": state.ts,
            "receivedAt": state.received_at, "payload": _json_or_text(bytes(state.payload)),
        },
        "telemetry": None if measurement is None else {
            "ts": measurement.ts, "receivedAt": measurement.received_at, "payload": json.loads(measurement.payload),
        },
    }


def telemetry_page(device: str, since: float | None, until: float | None, limit: int,
                   after: tuple[float, int] | None) -> tuple[list[dict[str, Any]], str | None]:
    """Measurements newest first, `since <= ts < until`, and the cursor of the next page."""
    q = Measurement.select().where(Measurement.device == device)
    if since is not None:
        q = q.where(Measurement.ts >= since)
    if until is not None:
        q = q.where(Measurement.ts < until)
    if after is not None:
        ts, row_id = after
        q = q.where((Measurement.ts < ts) | ((Measurement.ts == ts) & (Measurement.id < row_id)))
    rows = list(q.order_by(Measurement.ts.desc(), Measurement.id.desc()).limit(limit + 1))
    items = [{"ts": r.ts, "receivedAt": r.received_at, "payload": json.loads(r.payload)} for r in rows[:limit]]
    return items, (encode_cursor(rows[limit - 1].ts, rows[limit - 1].id) if len(rows) > limit else None)


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
