"""What street lights send, once declared (`schemas.py`), checked for what a schema cannot
say and normalised: pure functions, no I/O.

Types, ranges, lengths and choices are the declarations' (msgspec Structs, checked once
by the route's declaration, or by `convert` for an MQTT payload: `read_status`); the
parsers here check the rest (a plausible clock, a body's `device_id` being the path's,
coordinates in the service area, a cached reading's timestamp) and raise `Invalid` with
a message that names the field (`readings[3].timestamp: required ...`). Routes answer it
400 in the family's error shape; MQTT handlers turn it into `Rejected`. The shapes are
the specification's (seed 001): the configure request of section 1, the status of
section 2 (and the compact one of the MQTT status topic, section 4), the command ack of
section 3. The alert, log, offline sync and firmware bodies the specification names but
does not show are README.md's decisions.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from gatewayd.plugins.api import convert, parse_time, plausible_ts

from .schemas import AlertRequest, CommandAck, ConfigureRequest, FirmwareRequest, LogsRequest, StatusReport, Sync

CLOCK = re.compile(r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d")  # "18:30:00"
MAX_JSON = 16384  # characters of a free-form object (an alert's data, an ack's result)


class Invalid(ValueError):
    """Bad input, with the message a person (or a device's log) can act on; `code` is the
    error body's `code` (`INVALID_PAYLOAD`, or `CONFIG_INVALID` at configure)."""

    def __init__(self, message: str, code: str = "INVALID_PAYLOAD") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- fields ------------------------------------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


def timestamp(value: str | float | None, field: str) -> float | None:
    """An ISO 8601 time with its zone ("2025-12-17T10:30:35Z") or epoch seconds, between
    2000 and 2200; None when absent."""
    if value is None:
        return None
    try:
        ts = parse_time(value) if isinstance(value, str) else float(value)
    except ValueError:
        raise Invalid(f"{field}: expected an ISO 8601 time such as 2025-12-17T10:30:35Z, got {_show(value)}") \
            from None
    if not plausible_ts(ts):
        raise Invalid(f"{field}: {_show(value)} is not between 2000 and 2200 (is the light's clock set?)")
    return ts


def same_device(given: str | None, device_id: str, path: str = "") -> None:
    """A body's `device_id`, when it has one, is the path's."""
    if given is not None and given != device_id:
        raise Invalid(f"{path}device_id: {_show(given)} is not the device of the path ({device_id!r})")


def choice(value: str | None, field: str, choices: tuple[str, ...]) -> str | None:
    """One of the core's lists (OTA statuses, channels): not a static Literal of the schema."""
    if value is not None and value not in choices:
        raise Invalid(f"{field}: expected one of {', '.join(choices)}, got {_show(value)}")
    return value


_last_iso: tuple[int, str] = (-1, "")


def iso(ts: float) -> str:
    """`2025-12-17T10:30:05Z`: the specification's timestamps (whole seconds, UTC)."""
    global _last_iso
    second = math.floor(ts)
    if _last_iso[0] != second:  # every answer of the same second has the same server_timestamp
        _last_iso = (second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
    return _last_iso[1]


def _free_json(value: Any, name: str) -> Any:
    """A free-form JSON value (an alert's data, an ack's result), bounded in size."""
    size = len(json.dumps(value, separators=(",", ":")))
    if size > MAX_JSON:
        raise Invalid(f"{name}: {size} characters of JSON, more than {MAX_JSON}")
    return value


# -- configure (section 1) -----------------------------------------------------------------


class Registration(NamedTuple):
    """A configure request: what the light says of itself."""

    device_type: str | None
    name: str | None
    city: str | None
    latitude: float | None
    longitude: float | None
    address: str | None
    power_state: str | None
    battery_backup_hours: float | None
    gsm_imei: str | None
    gsm_signal: float | None
    communication_type: str | None
    firmware_version: str | None
    ts: float | None

    def data(self) -> dict[str, Any]:
        """The upstream record: the request's fields under the specification's names."""
        doc = {"device_type": self.device_type, "name": self.name, "city": self.city, "latitude": self.latitude,
               "longitude": self.longitude, "address": self.address, "status": self.power_state,
               "battery_backup_hours": self.battery_backup_hours, "gsm_imei": self.gsm_imei,
               "gsm_signal_strength": self.gsm_signal, "communication_type": self.communication_type,
               "firmware_version": self.firmware_version, "timestamp": None if self.ts is None else iso(self.ts)}
        return {k: v for k, v in doc.items() if v is not None}


def parse_registration(body: ConfigureRequest, device_id: str, service_area: list[float]) -> Registration:
    """The configure body; `CONFIG_INVALID` for coordinates that are no fix or outside the
    site's `service_area` ([south, west, north, east])."""
    same_device(body.device_id, device_id)
    lat, lon = body.latitude, body.longitude
    if (lat is None) != (lon is None):
        raise Invalid("latitude, longitude: give both or neither", "CONFIG_INVALID")
    if lat == 0 and lon == 0:
        raise Invalid("GPS coordinates invalid: 0, 0 is no fix", "CONFIG_INVALID")
    if service_area:
        south, west, north, east = service_area
        if lat is None or lon is None:
            raise Invalid("latitude, longitude: required (this site has a service area)", "CONFIG_INVALID")
        if not (south <= lat <= north and west <= lon <= east):
            raise Invalid(f"GPS coordinates {lat}, {lon} out of service area", "CONFIG_INVALID")
    return Registration(
        device_type=body.device_type, name=body.name, city=body.city, latitude=lat, longitude=lon,
        address=body.address, power_state=body.status, battery_backup_hours=body.battery_backup_hours,
        gsm_imei=body.gsm_imei, gsm_signal=body.gsm_signal_strength, communication_type=body.communication_type,
        firmware_version=body.firmware_version, ts=timestamp(body.timestamp, "timestamp"),
    )


def check_light_config(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """What is wrong with a light's `config` (site defaults or an operator's override):
    `[(key, reason)]`, empty when it is right. Unknown keys are wrong too."""
    problems = []
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "schedule_enabled": (lambda v: isinstance(v, bool), "expected true or false"),
        "auto_dimming": (lambda v: isinstance(v, bool), "expected true or false"),
        "sunrise_time": (lambda v: isinstance(v, str) and CLOCK.fullmatch(v) is not None, "expected HH:MM:SS"),
        "sunset_time": (lambda v: isinstance(v, str) and CLOCK.fullmatch(v) is not None, "expected HH:MM:SS"),
        "brightness_level": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 100,
                             "expected an integer 0-100"),
    }
    for key, value in doc.items():
        if key not in checks:
            problems.append((key, f"unknown (expected {', '.join(checks)})"))
        elif not checks[key][0](value):
            problems.append((key, f"{checks[key][1]}, got {_show(value)}"))
    return problems


# -- status (sections 2 and 4) -----------------------------------------------------------


class Energy(NamedTuple):
    voltage: float | None
    current: float | None
    power_watts: float | None
    frequency: float | None
    cumulative_kwh: float | None


class Status(NamedTuple):
    """One status report: the light's state, its health metrics and its energy readings."""

    ts: float | None  # the light's timestamp; None when it gave none (the arrival time is used)
    light_id: str | None
    power_state: str | None
    brightness: float | None
    temperature: float | None
    battery: float | None
    gsm_signal: float | None
    uptime: int | None
    error_flags: tuple[str, ...]
    energy: Energy | None

    def data(self, ts: float) -> dict[str, Any]:
        """The upstream record and live event: the specification's shape, normalised."""
        status = {"power_state": self.power_state, "brightness": self.brightness,
                  "temperature_celsius": self.temperature, "battery_percentage": self.battery,
                  "gsm_signal_strength": self.gsm_signal, "uptime_seconds": self.uptime,
                  "error_flags": list(self.error_flags)}
        doc: dict[str, Any] = {"timestamp": iso(ts), "status": {k: v for k, v in status.items() if v is not None}}
        if self.light_id is not None:
            doc["light_id"] = self.light_id
        if self.energy is not None:
            doc["energy"] = {k: v for k, v in zip(Energy._fields, self.energy) if v is not None}
        return doc

    def digest(self) -> str:
        """What a resend of the same report has in common with it (with its timestamp)."""
        text = json.dumps([self.power_state, self.brightness, self.temperature, self.battery, self.gsm_signal,
                           self.uptime, self.error_flags, self.energy], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_status(doc: Any) -> Status:
    """A status that came without a route's declaration (an MQTT payload): declared here."""
    return parse_status(convert(doc, StatusReport, location="payload"))


def parse_status(report: StatusReport, *, device_id: str | None = None, path: str = "") -> Status:
    """A status report, in the form of section 2 (`status` an object, `energy` beside it) or
    the compact form of section 4 and the pseudocode of section 10 (`status` "on" / "off"
    / "error", `brightness`, `battery` and the block's other fields beside it)."""
    if device_id is not None:
        same_device(report.device_id, device_id, path)
    block = report.status
    power: str | None
    if isinstance(block, str):
        power, brightness, battery = block, report.brightness, report.battery
        temperature, signal, uptime = report.temperature_celsius, report.gsm_signal_strength, report.uptime_seconds
        flags = report.error_flags or []
    else:
        power, brightness, battery = block.power_state, block.brightness, block.battery_percentage
        temperature, signal, uptime = block.temperature_celsius, block.gsm_signal_strength, block.uptime_seconds
        flags = block.error_flags or []
    e = report.energy
    return Status(
        ts=timestamp(report.timestamp, f"{path}timestamp"), light_id=report.light_id, power_state=power,
        brightness=brightness, temperature=temperature, battery=battery, gsm_signal=signal,
        uptime=None if uptime is None else int(uptime),  # 864000.0 is 864000 (schemas.WholeSeconds)
        error_flags=tuple(dict.fromkeys(flags)),
        energy=None if e is None else Energy(e.voltage, e.current, e.power_watts, e.frequency, e.cumulative_kwh),
    )


def parse_sync(body: Sync, device_id: str, max_readings: int) -> list[Status]:
    """The offline sync: `{"readings": [status, ...]}`, each with its own `timestamp`."""
    same_device(body.device_id, device_id)
    if len(body.readings) > max_readings:
        raise Invalid(f"readings: {len(body.readings)} readings, more than {max_readings} in one sync: "
                      "send them in parts")
    out = []
    for i, reading in enumerate(body.readings):
        status = parse_status(reading, device_id=device_id, path=f"readings[{i}].")
        if status.ts is None:
            raise Invalid(f"readings[{i}].timestamp: required (a cached reading keeps the time it was taken)")
        out.append(status)
    return out


# -- command acks (section 3) ---------------------------------------------------------------


class Ack(NamedTuple):
    command_id: str
    ok: bool
    ts: float | None
    result: Any

    def data(self, status: str) -> dict[str, Any]:
        doc = {"command_id": self.command_id, "status": status, "result": self.result}
        return doc if self.ts is None else {**doc, "execution_timestamp": iso(self.ts)}


def parse_ack(body: CommandAck, device_id: str) -> Ack:
    """`{"command_id", "status": "executed" | "failed", "execution_timestamp", "result"}`
    (the pseudocode's `timestamp` is taken for `execution_timestamp`)."""
    same_device(body.device_id, device_id)
    ts = timestamp(body.execution_timestamp, "execution_timestamp") or timestamp(body.timestamp, "timestamp")
    return Ack(body.command_id, body.status == "executed", ts, _free_json(body.result, "result"))


# -- alerts and logs (section 12; shapes decided in README.md) --------------------------------


class AlertReport(NamedTuple):
    alert_type: str
    severity: str
    message: str
    ts: float | None
    data: dict[str, Any]


def parse_alert(body: AlertRequest, device_id: str) -> AlertReport:
    """`{"alert_type", "severity", "message", "timestamp", "data"}`; severity defaults to critical."""
    same_device(body.device_id, device_id)
    return AlertReport(body.alert_type, body.severity, body.message, timestamp(body.timestamp, "timestamp"),
                       _free_json(body.data or {}, "data"))


def parse_logs(body: LogsRequest, device_id: str) -> list[dict[str, Any]]:
    """`{"logs": [{"timestamp", "level", "message"}, ...]}`: entries in the order sent."""
    same_device(body.device_id, device_id)
    out = []
    for i, entry in enumerate(body.logs):
        ts = timestamp(entry.timestamp, f"logs[{i}].timestamp")
        out.append({"timestamp": None if ts is None else iso(ts), "level": entry.level, "message": entry.message})
    return out


# -- firmware (section 12: PUT /device/{id}/firmware, decided in README.md) -------------------


class FirmwareReport(NamedTuple):
    version: str
    status: str | None
    detail: str
    channel: str


def parse_firmware(body: FirmwareRequest, device_id: str, statuses: tuple[str, ...],
                   channels: tuple[str, ...]) -> FirmwareReport:
    """`{"firmware_version", "status"?, "detail"?, "channel"?}`: what the light runs (or how
    its update goes, one of the OTA statuses), to be told whether a newer image waits."""
    same_device(body.device_id, device_id)
    return FirmwareReport(body.firmware_version, choice(body.status, "status", statuses), body.detail,
                          choice(body.channel, "channel", channels) or "stable")
