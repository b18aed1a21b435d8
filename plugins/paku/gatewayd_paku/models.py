"""paku's tables (the spec's data model) and the queries the routes need.

Device and Credential live in the core registry (`ctx.devices`); paku keeps what its
devices send: every measurement, every event, and the latest state per device.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import peewee


class Measurement(peewee.Model):
    """One telemetry message: `paku/<device>/telemetry`."""

    device = peewee.CharField(max_length=128)
    ts = peewee.FloatField()  # when the device measured it (its "ts", else arrival)
    received_at = peewee.FloatField()
    payload = peewee.TextField()  # the JSON object as received

    class Meta:
        table_name = "paku_measurement"
        indexes = ((("device", "ts"), False),)


class Event(peewee.Model):
    """One event: `paku/<device>/event/<type>` (button, error, ack, ota, ...)."""

    device = peewee.CharField(max_length=128)
    ts = peewee.FloatField()
    type = peewee.CharField(max_length=64)
    payload = peewee.TextField()

    class Meta:
        table_name = "paku_event"
        indexes = ((("device", "ts"), False),)


class State(peewee.Model):
    """The latest `paku/<device>/state` of each device (the topic is retained)."""

    device = peewee.CharField(max_length=128, primary_key=True)
    online = peewee.BooleanField(null=True)
    rssi = peewee.IntegerField(null=True)
    fw_version = peewee.CharField(max_length=64, null=True)
    ts = peewee.FloatField()
    received_at = peewee.FloatField()
    raw = peewee.BlobField()  # the payload as received: a retained copy delivered again is recognised

    class Meta:
        table_name = "paku_state"


MODELS = (Measurement, Event, State)


# -- writes (run on the writer thread, inside ctx.ingest's transaction) --------------


def save_state(device: str, state: dict[str, Any], ts: float, now: float, raw: bytes) -> None:
    State.replace(device=device, online=state.get("online"), rssi=state.get("rssi"),
                  fw_version=state.get("fwVersion"), ts=ts, received_at=now, raw=raw).execute()


# -- reads ---------------------------------------------------------------------------


def stored_state_raw(device: str) -> bytes | None:
    row = State.get_or_none(State.device == device)
    return None if row is None else bytes(row.raw)


def latest(device: str) -> dict[str, Any]:
    """The device's latest state and telemetry, for `GET /devices/<id>`."""
    state = State.get_or_none(State.device == device)
    measurement = (Measurement.select().where(Measurement.device == device)
                   .order_by(Measurement.ts.desc(), Measurement.id.desc()).first())
    return {
        "state": None if state is None else {
            "online": state.online, "rssi": state.rssi, "fwVersion": state.fw_version, "ts": state.ts,
            "receivedAt": state.received_at, "payload": _json_or_text(bytes(state.raw)),
        },
        "telemetry": None if measurement is None else {
            "ts": measurement.ts, "receivedAt": measurement.received_at, "payload": json.loads(measurement.payload),
        },
        "lastReceivedAt": max((r.received_at for r in (state, measurement) if r is not None), default=None),
    }


def telemetry_page(device: str, since: float | None, until: float | None, limit: int,
                   cursor: tuple[float, int] | None) -> tuple[list[dict[str, Any]], str | None]:
    """Measurements newest first, `since <= ts < until`, and the cursor of the next page."""
    q = Measurement.select().where(Measurement.device == device)
    if since is not None:
        q = q.where(Measurement.ts >= since)
    if until is not None:
        q = q.where(Measurement.ts < until)
    if cursor is not None:
        ts, row_id = cursor
        q = q.where((Measurement.ts < ts) | ((Measurement.ts == ts) & (Measurement.id < row_id)))
    rows = list(q.order_by(Measurement.ts.desc(), Measurement.id.desc()).limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    items = [{"ts": r.ts, "receivedAt": r.received_at, "payload": json.loads(r.payload)} for r in rows]
    return items, (encode_cursor(rows[-1].ts, rows[-1].id) if more else None)


def encode_cursor(ts: float, row_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([ts, row_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, int]:
    """The position after which the next page starts; ValueError for anything else."""
    try:
        ts, row_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        # Numbers SQLite can compare with: a finite float, a row id in signed 64 bits.
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or type(row_id) is not int \
                or not math.isfinite(ts := float(ts)) or not 0 <= row_id < 2**63:
            raise ValueError
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ValueError("cursor: not a cursor returned by this API") from None
    return ts, row_id


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
