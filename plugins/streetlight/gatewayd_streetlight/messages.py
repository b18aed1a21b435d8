"""What street lights send, parsed and checked: pure functions, no I/O.

Each parser takes a JSON object already parsed strictly by the core (`parse_json`: no
NaN, no lone surrogates, integers SQLite can hold) and returns a typed value, or raises
`Invalid` with a message that names the field (`status.battery_percentage: expected a
percentage 0-100, got 140`). Routes answer it 400 in the family's error shape; MQTT
handlers turn it into `Rejected`. The shapes are the specification's (seed 001): the
configure request of section 1, the status of section 2 (and the compact one of the
MQTT status topic, section 4), the command ack of section 3. The alert, log, offline
sync and firmware bodies the specification names but does not show are README.md's
decisions.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from gatewayd.plugins.api import REPORT_STATUSES, json_kind, parse_time, plausible_ts

POWER_STATES = ("on", "off", "error")
SEVERITIES = ("info", "warning", "critical")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
CLOCK = re.compile(r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d")  # "18:30:00"
LIGHT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # an MQTT username and one topic level
EVENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # the core's event types
MAX_TEXT = 256
MAX_MESSAGE = 1024
MAX_FLAGS = 32
MAX_JSON = 16384  # characters of a free-form object (an alert's data, an ack's result)
MAX_LOG_ENTRIES = 1000


class Invalid(ValueError):
    """Bad input, with the message a person (or a device's log) can act on; `code` is the
    error body's `code` (`INVALID_PAYLOAD`, or `CONFIG_INVALID` at configure)."""

    def __init__(self, message: str, code: str = "INVALID_PAYLOAD") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- fields ------------------------------------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else json_kind(value)
    return text if len(text) <= 60 else text[:40] + f"... ({len(text)} characters)"


def number(doc: dict[str, Any], key: str, low: float, high: float, what: str, *, path: str = "",
           integer: bool = False, required: bool = False) -> float | None:
    """`doc[key]`: a number in [low, high] (an integer with `integer`), or None when absent."""
    value = doc.get(key)
    if value is None:
        if required:
            raise Invalid(f"{path}{key}: required ({what})")
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    if ok and integer and not (isinstance(value, int) or float(value).is_integer()):
        ok = False
    if not ok:
        raise Invalid(f"{path}{key}: expected {what}, got {_show(value)}")
    return int(value) if integer else float(value)


def text(doc: dict[str, Any], key: str, *, path: str = "", limit: int = MAX_TEXT, required: bool = False,
         choices: tuple[str, ...] = ()) -> str | None:
    """`doc[key]`: a string of at most `limit` characters (one of `choices`), or None."""
    value = doc.get(key)
    if value is None:
        if required:
            raise Invalid(f"{path}{key}: required" + (f" (one of {', '.join(choices)})" if choices else ""))
        return None
    if choices and value not in choices:
        raise Invalid(f"{path}{key}: expected one of {', '.join(choices)}, got {_show(value)}")
    if not isinstance(value, str) or len(value) > limit:
        raise Invalid(f"{path}{key}: expected a string of at most {limit} characters, got {_show(value)}")
    return value


def obj(doc: dict[str, Any], key: str, *, path: str = "", required: bool = False) -> dict[str, Any] | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise Invalid(f"{path}{key}: required (an object)")
        return None
    if not isinstance(value, dict):
        raise Invalid(f"{path}{key}: expected an object, got {json_kind(value)}")
    return value


def timestamp(doc: dict[str, Any], key: str, *, path: str = "", required: bool = False) -> float | None:
    """An ISO 8601 time with its zone ("2025-12-17T10:30:35Z") or epoch seconds."""
    value = doc.get(key)
    if value is None:
        if required:
            raise Invalid(f"{path}{key}: required (an ISO 8601 time such as 2025-12-17T10:30:35Z)")
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError
        ts = parse_time(value) if isinstance(value, str) else float(value)
    except ValueError:
        raise Invalid(f"{path}{key}: expected an ISO 8601 time such as 2025-12-17T10:30:35Z, got {_show(value)}") \
            from None
    if not plausible_ts(ts):
        raise Invalid(f"{path}{key}: {_show(value)} is not between 2000 and 2200 (is the light's clock set?)")
    return ts


def same_device(doc: dict[str, Any], device_id: str) -> None:
    """A body's `device_id`, when it has one, is the path's."""
    given = doc.get("device_id")
    if given is not None and given != device_id:
        raise Invalid(f"device_id: {_show(given)} is not the device of the path ({device_id!r})")


def iso(ts: float) -> str:
    """`2025-12-17T10:30:05Z`: the specification's timestamps (whole seconds, UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


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


def parse_registration(doc: dict[str, Any], device_id: str, service_area: list[float]) -> Registration:
    """The configure body; `CONFIG_INVALID` for coordinates that are no fix or outside the
    site's `service_area` ([south, west, north, east])."""
    same_device(doc, device_id)
    lat = number(doc, "latitude", -90, 90, "degrees -90..90")
    lon = number(doc, "longitude", -180, 180, "degrees -180..180")
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
    imei = text(doc, "gsm_imei", limit=16)
    if imei is not None and not (imei.isascii() and imei.isdigit() and 14 <= len(imei) <= 16):
        raise Invalid(f"gsm_imei: expected 14-16 digits, got {_show(imei)}")
    return Registration(
        device_type=text(doc, "device_type", limit=128), name=text(doc, "name"), city=text(doc, "city"),
        latitude=lat, longitude=lon, address=text(doc, "address"),
        power_state=text(doc, "status", choices=POWER_STATES),
        battery_backup_hours=number(doc, "battery_backup_hours", 0, 10_000, "hours 0-10000"),
        gsm_imei=imei, gsm_signal=number(doc, "gsm_signal_strength", -200, 200, "a signal strength -200..200"),
        communication_type=text(doc, "communication_type", limit=32),
        firmware_version=text(doc, "firmware_version", limit=64), ts=timestamp(doc, "timestamp"),
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
            doc["energy"] = {k: v for k, v in self.energy._asdict().items() if v is not None}
        return doc

    def digest(self) -> str:
        """What a resend of the same report has in common with it (with its timestamp)."""
        text = json.dumps([self.power_state, self.brightness, self.temperature, self.battery, self.gsm_signal,
                           self.uptime, self.error_flags, self.energy], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_status(doc: dict[str, Any], *, path: str = "") -> Status:
    """A status report, in the form of section 2 (`status` an object, `energy` beside it) or
    the compact form of section 4 and the pseudocode of section 10 (`status` "on" / "off"
    / "error", `brightness` and `battery` beside it)."""
    ts = timestamp(doc, "timestamp", path=path)
    light_id = text(doc, "light_id", path=path, limit=64)
    state = doc.get("status")
    if state is None:
        raise Invalid(f"{path}status: required (an object, or 'on' / 'off' / 'error')")
    if isinstance(state, dict):
        inner, at = state, f"{path}status."
        power = text(state, "power_state", path=at, choices=POWER_STATES)
        brightness = number(state, "brightness", 0, 100, "a percentage 0-100", path=at)
        battery = number(state, "battery_percentage", 0, 100, "a percentage 0-100", path=at)
    elif isinstance(state, str):
        inner, at = doc, path
        power = text(doc, "status", path=path, choices=POWER_STATES)
        brightness = number(doc, "brightness", 0, 100, "a percentage 0-100", path=path)
        battery = number(doc, "battery", 0, 100, "a percentage 0-100", path=path)
    else:
        raise Invalid(f"{path}status: expected an object, or 'on' / 'off' / 'error', got {json_kind(state)}")
    flags = inner.get("error_flags", [])
    if not isinstance(flags, list) or len(flags) > MAX_FLAGS:
        got = json_kind(flags) if not isinstance(flags, list) else f"{len(flags)} of them"
        raise Invalid(f"{at}error_flags: expected a list of at most {MAX_FLAGS} flags, got {got}")
    for i, flag in enumerate(flags):
        if not isinstance(flag, str) or not 0 < len(flag) <= 64:
            raise Invalid(f"{at}error_flags[{i}]: expected a string of 1-64 characters, got {_show(flag)}")
    energy = obj(doc, "energy", path=path)
    return Status(
        ts=ts, light_id=light_id, power_state=power, brightness=brightness,
        temperature=number(inner, "temperature_celsius", -100, 200, "degrees Celsius -100..200", path=at),
        battery=battery,
        gsm_signal=number(inner, "gsm_signal_strength", -200, 200, "a signal strength -200..200", path=at),
        uptime=None if (u := number(inner, "uptime_seconds", 0, 2**40, "whole seconds >= 0", path=at,
                                    integer=True)) is None else int(u),
        error_flags=tuple(dict.fromkeys(flags)),
        energy=None if energy is None else parse_energy(energy, f"{path}energy."),
    )


def parse_energy(doc: dict[str, Any], path: str) -> Energy:
    return Energy(
        voltage=number(doc, "voltage", 0, 100_000, "volts 0-100000", path=path),
        current=number(doc, "current", 0, 100_000, "amperes 0-100000", path=path),
        power_watts=number(doc, "power_watts", 0, 10_000_000, "watts 0-10000000", path=path),
        frequency=number(doc, "frequency", 0, 100_000, "hertz 0-100000", path=path),
        cumulative_kwh=number(doc, "cumulative_kwh", 0, 1e15, "kilowatt hours >= 0", path=path),
    )


def parse_sync(doc: dict[str, Any], device_id: str, max_readings: int) -> list[Status]:
    """The offline sync: `{"readings": [status, ...]}`, each with its own `timestamp`."""
    same_device(doc, device_id)
    readings = doc.get("readings")
    if not isinstance(readings, list) or not readings:
        raise Invalid("readings: required (a list of status reports, each with its timestamp)")
    if len(readings) > max_readings:
        raise Invalid(f"readings: {len(readings)} readings, more than {max_readings} in one sync: send them in parts")
    out = []
    for i, reading in enumerate(readings):
        if not isinstance(reading, dict):
            raise Invalid(f"readings[{i}]: expected a status object, got {json_kind(reading)}")
        status = parse_status(reading, path=f"readings[{i}].")
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


def parse_ack(doc: dict[str, Any], device_id: str | None) -> Ack:
    """`{"command_id", "status": "executed" | "failed", "execution_timestamp", "result"}`
    (the pseudocode's `timestamp` is taken for `execution_timestamp`)."""
    if device_id is not None:
        same_device(doc, device_id)
    command_id = text(doc, "command_id", limit=128, required=True)
    if not command_id:
        raise Invalid("command_id: expected the command's id, got an empty string")
    status = text(doc, "status", choices=("executed", "failed"), required=True)
    ts = timestamp(doc, "execution_timestamp") or timestamp(doc, "timestamp")
    return Ack(command_id, status == "executed", ts, _free_json(doc.get("result"), "result"))


# -- alerts and logs (section 12; shapes decided in README.md) --------------------------------


class AlertReport(NamedTuple):
    alert_type: str
    severity: str
    message: str
    ts: float | None
    data: dict[str, Any]


def parse_alert(doc: dict[str, Any], device_id: str) -> AlertReport:
    """`{"alert_type", "severity", "message", "timestamp", "data"}`; severity defaults to critical."""
    same_device(doc, device_id)
    kind = text(doc, "alert_type", limit=64, required=True) or ""
    if not EVENT_TYPE.fullmatch(kind):
        raise Invalid(f"alert_type: expected 1-64 of letters, digits and _ . : -, got {_show(kind)}")
    data = obj(doc, "data") or {}
    return AlertReport(kind, text(doc, "severity", choices=SEVERITIES) or "critical",
                       text(doc, "message", limit=MAX_MESSAGE) or "", timestamp(doc, "timestamp"),
                       _free_json(data, "data"))


def parse_logs(doc: dict[str, Any], device_id: str) -> list[dict[str, Any]]:
    """`{"logs": [{"timestamp", "level", "message"}, ...]}`: entries in the order sent."""
    same_device(doc, device_id)
    entries = doc.get("logs")
    if not isinstance(entries, list) or not entries:
        raise Invalid("logs: required (a list of {timestamp, level, message})")
    if len(entries) > MAX_LOG_ENTRIES:
        raise Invalid(f"logs: {len(entries)} entries, more than {MAX_LOG_ENTRIES} in one upload")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise Invalid(f"logs[{i}]: expected an object, got {json_kind(entry)}")
        at = f"logs[{i}]."
        ts = timestamp(entry, "timestamp", path=at)
        out.append({"timestamp": None if ts is None else iso(ts),
                    "level": text(entry, "level", path=at, choices=LOG_LEVELS) or "info",
                    "message": text(entry, "message", path=at, limit=4096, required=True)})
    return out


# -- firmware (section 12: PUT /device/{id}/firmware, decided in README.md) -------------------


class FirmwareReport(NamedTuple):
    version: str
    status: str | None
    detail: str
    channel: str


def parse_firmware(doc: dict[str, Any], device_id: str, channels: tuple[str, ...]) -> FirmwareReport:
    """`{"firmware_version", "status"?, "detail"?, "channel"?}`: what the light runs (or how
    its update goes, one of the OTA statuses), to be told whether a newer image waits."""
    same_device(doc, device_id)
    version = text(doc, "firmware_version", limit=64, required=True) or ""
    if not version:
        raise Invalid("firmware_version: expected a version such as v2.1.0, got an empty string")
    return FirmwareReport(version, text(doc, "status", choices=REPORT_STATUSES),
                          text(doc, "detail", limit=MAX_MESSAGE) or "",
                          text(doc, "channel", choices=channels) or "stable")
