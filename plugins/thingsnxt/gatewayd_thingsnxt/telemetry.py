"""What devices and apps send, checked; the device state it makes; the answers. Pure.

    {"device_token": "...", "data": {"v0": 1, "temperature": 25.5}}          v2 and legacy telemetry
    {"device_token": "...", "readings": [{"timestamp": ..., "data": {...}}]}  bulk (cached while offline)
    {"data": {"v0": 1}}                                                       an app sets virtual pins

A device's state is the specification's `telemetry_json`: the latest value of each key,
whoever set it. Apps set keys (the virtual pins `v0`, `v1`, ...); devices report theirs.
A value an app set stays *pending* until the device reports that same value: until then
the device's older value for that key does not overwrite it, and the device reads the
app's value in its next answer (README.md, "State").
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any

from gatewayd.plugins.api import (
    TS_MAX,
    TS_MIN,
    BadJSON,
    Encoded,
    Meta,
    Struct,
    encoded,
    json_encoder,
    json_kind,
    parse_time,
)

from .config import KeyRules, Security

KEY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
"""A telemetry key: what a widget, a rule (`when = ["data.temperature > 30"]`) and a column can name."""
PIN = re.compile(r"v[0-9]{1,3}")
"""A virtual pin: `v0` .. `v999`."""
MAX_TOKEN = 256
FUTURE_SKEW_S = 300.0
"""A bulk reading stamped later than this after the gateway's clock is a device clock bug."""


@dataclass(frozen=True)
class Limits:
    max_keys: int
    max_data_bytes: int
    max_bulk: int


@dataclass(frozen=True)
class Telemetry:
    """One telemetry request: the token, and readings (one, or a bulk's) oldest first."""

    token: str
    readings: tuple[Reading, ...]


@dataclass(frozen=True)
class Reading:
    data: dict[str, Any]
    ts: float | None = None
    """The device's time (bulk); None: it arrived now."""
    text: str | None = None
    """`data` as compact JSON (`encoded`), when the check measured it: the history row, the
    outbox record and the live event take it as it is."""


# -- requests: declared (the routes' bodies, in the OpenAPI document), then checked -------

Token = Annotated[str, Meta(min_length=1, max_length=MAX_TOKEN, description="the device's token")]
Data = Annotated[dict[str, Any], Meta(
    description="keys and their values (any JSON); keys are 1-64 of letters, digits and _ . : -, "
                "at most plugins.<name>.max_keys of them, plugins.<name>.max_data_bytes as JSON",
    extra_json_schema={"propertyNames": {"pattern": f"^{KEY.pattern}$"}})]
# The key rule is documented here and checked by data_of, whose message names the key.


class TelemetryIn(Struct):
    """`{"device_token", "data"}` (v2, legacy). A missing `data` is `{}`: a sign of life.
    Other fields are ignored, as the specification's backend does."""

    device_token: Token
    data: Data = {}


class BulkReading(Struct):
    timestamp: Annotated[float | str, Meta(description="ISO 8601 (UTC unless it says otherwise) or epoch seconds")]
    data: Data = {}


class BulkIn(Struct):
    """`{"device_token", "readings": [{"timestamp", "data"}, ...]}`: a device that cached while offline."""

    device_token: Token
    readings: Annotated[list[BulkReading], Meta(min_length=1, description="at most plugins.<name>.max_bulk")]


def parse_telemetry(body: TelemetryIn, limits: Limits) -> Telemetry:
    """A declared telemetry body, checked beyond its types: BadJSON naming the field."""
    data, text = checked_data(body.data, "data", limits)
    return Telemetry(body.device_token, (Reading(data, None, text),))


def parse_bulk(body: BulkIn, limits: Limits, now: float) -> Telemetry:
    """A declared bulk body, checked; its readings sorted oldest first."""
    if len(body.readings) > limits.max_bulk:
        raise BadJSON(f"readings: at most {limits.max_bulk} in one request, got {len(body.readings)}")
    out = []
    for i, item in enumerate(body.readings):
        data, text = checked_data(item.data, f"readings[{i}].data", limits)
        out.append(Reading(data, timestamp_of(item.timestamp, f"readings[{i}].timestamp", now), text))
    return Telemetry(body.device_token, tuple(sorted(out, key=lambda r: r.ts or 0.0)))  # stable: same time keeps its order


def parse_app_values(doc: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """`{"data": {"v0": 1}}`: what an app or operator sets. Values are numbers, strings or
    booleans (what a widget shows and a device's pin takes)."""
    data = data_of(doc.get("data"), "data", limits)
    if not data:
        raise BadJSON('data: expected at least one key to set, e.g. {"data": {"v0": 1}}')
    for key, value in data.items():
        if value is None or isinstance(value, (dict, list)):
            raise BadJSON(f"data.{key}: expected a number, a string or true/false, got {json_kind(value)}")
    return data


def data_of(value: Any, where: str, limits: Limits) -> dict[str, Any]:
    return checked_data(value, where, limits)[0]


def checked_data(value: Any, where: str, limits: Limits) -> tuple[dict[str, Any], str]:
    """`value` if it is an object of keys and values within the limits, and its compact JSON
    (what its size was measured on); else BadJSON naming `where`."""
    if not isinstance(value, dict):
        raise BadJSON(f"{where}: expected an object of keys and values, got {_kind(value)}")
    if len(value) > limits.max_keys:
        raise BadJSON(f"{where}: at most {limits.max_keys} keys, got {len(value)}")
    for key in value:
        if key not in _good_keys:  # a device sends the same keys message after message
            if not KEY.fullmatch(key):
                raise BadJSON(f"{where}: key {key[:70]!r}: expected 1-64 of letters, digits and _ . : -")
            if len(_good_keys) >= 10_000:  # bounded: keys are the devices' to choose
                _good_keys.clear()
            _good_keys.add(key)
    text = encoded(value).text  # what the history row, the outbox record and the live event hold
    size = len(text) if text.isascii() else len(text.encode())
    if size > limits.max_data_bytes:
        raise BadJSON(f"{where}: at most {limits.max_data_bytes} bytes as JSON, got {size}")
    return value, text


_good_keys: set[str] = set()
"""Keys `KEY` already matched (a set lookup costs a tenth of the match)."""


def compact(value: Any) -> str:
    """JSON without spaces, non-ASCII as is: how the tables keep values."""
    return json_encoder(separators=(",", ":"), ensure_ascii=False)(value)


def timestamp_of(value: Any, where: str, now: float) -> float:
    """ISO 8601 (UTC unless it says otherwise) or epoch seconds, 2000 .. now + 5 min."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadJSON(f"{where}: expected an ISO 8601 time or epoch seconds, got {_kind(value)}")
    try:
        ts = parse_time(value) if isinstance(value, str) else float(value)
    except ValueError as e:
        raise BadJSON(f"{where}: {e}") from None
    if not (TS_MIN <= ts <= TS_MAX and math.isfinite(ts)):
        raise BadJSON(f"{where}: {value!r} is not a plausible time (epoch seconds, not milliseconds; 2000-2200)")
    if ts > now + FUTURE_SKEW_S:
        raise BadJSON(f"{where}: {iso(ts)} is in the future (the gateway's clock says {iso(now)})")
    return ts


def _kind(value: Any) -> str:
    return "nothing" if value is None else json_kind(value)


# -- the security rules -------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPolicy:
    """Which keys a device may write and an app may set (the specification's security rules)."""

    device_writes: tuple[str, ...]
    app_sets: tuple[str, ...]

    @property
    def device_writes_any(self) -> bool:
        """The default rule: a device may write any key (nothing to check per message)."""
        return "*" in self.device_writes

    def device_refused(self, data: dict[str, Any]) -> list[str]:
        return _refused(self.device_writes, data)

    def app_refused(self, data: dict[str, Any]) -> list[str]:
        return _refused(self.app_sets, data)


def _refused(globs: tuple[str, ...], data: dict[str, Any]) -> list[str]:
    """The keys of `data` no glob matches (fnmatch's, case-sensitive)."""
    if "*" in globs:
        return []  # the default rule for devices: every message would match it key by key
    match = _matcher(globs)
    return [k for k in data if not match(k)]


@functools.lru_cache(maxsize=256)
def _matcher(globs: tuple[str, ...]) -> Callable[[str], Any]:
    """One compiled pattern for a list of globs (a list's globs, key by key, cost each message more)."""
    if not globs:
        return lambda key: None
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)).match


def policy_for(security: Security, device_id: str, model: str) -> KeyPolicy:
    """The device's own table, else its model's, else the default, list by list."""
    tables = [t for t in (security.devices.get(device_id), security.models.get(model)) if t is not None]
    tables.append(KeyRules(security.device_writes, security.app_sets))
    writes = next(t.device_writes for t in tables if t.device_writes is not None)
    sets = next(t.app_sets for t in tables if t.app_sets is not None)
    return KeyPolicy(tuple(writes or ()), tuple(sets or ()))


# -- the state ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceState:
    """The server's view of one device: each key's latest value and when it was set, and
    what apps set that the device has not confirmed yet."""

    data: dict[str, Any] = field(default_factory=dict)
    stamps: dict[str, float] = field(default_factory=dict)
    pending: dict[str, Any] = field(default_factory=dict)
    ts: float | None = None
    """When the state last changed (`timestamp` in answers)."""

    def with_device(self, values: dict[str, Any], ts: float) -> tuple[DeviceState, dict[str, Any]]:
        """The state after a device reported `values` measured at `ts`, and what changed.

        A value older than the key's (a bulk reading from before) does not replace it; a
        value for a key an app set and the device has not confirmed yet is stale, except
        the app's own value, which confirms it."""
        data, stamps, pending = dict(self.data), dict(self.stamps), dict(self.pending)
        changed: dict[str, Any] = {}
        retexted = False  # a value set that does not encode as the one it replaced
        for key, value in values.items():
            if ts < stamps.get(key, -math.inf):
                continue
            if key in pending:
                if not same(value, pending[key]):
                    continue
                del pending[key]
            old = data.get(key, _MISSING)
            if old is _MISSING or not same(old, value):
                changed[key] = value
            if not retexted and not _same_text(old, value):
                retexted = True
            data[key] = value
            stamps[key] = ts
        newest = max(ts, self.ts) if self.ts is not None else ts
        # The constructor, not dataclasses.replace: this runs per message on the writer thread.
        state = DeviceState(data, stamps, pending, newest)
        # A device reports the same values message after message: the parts of the stored
        # JSON that did not change keep their text (to_json encodes only the new stamps).
        known = self.__dict__
        if not retexted and "_data_text" in known:
            object.__setattr__(state, "_data_text", known["_data_text"])
        if len(pending) == len(self.pending) and "_pending_text" in known:
            object.__setattr__(state, "_pending_text", known["_pending_text"])
        return state, changed

    def with_app(self, values: dict[str, Any], ts: float) -> DeviceState:
        """The state after an app or operator set `values`: pending until the device reports them."""
        return DeviceState({**self.data, **values}, {**self.stamps, **dict.fromkeys(values, ts)},
                           {**self.pending, **values}, max(ts, self.ts or ts))

    def to_json(self) -> str:
        """`{"data", "stamps", "pending"}` as compact JSON: the stored row's text. (Built of
        each part's text, which is what the encoder writes for the whole: parts a state took
        over unchanged from the one it was made from are not encoded again.)"""
        known = self.__dict__
        data = known.get("_data_text")
        if data is None:
            data = compact(self.data)
            object.__setattr__(self, "_data_text", data)
        pending = known.get("_pending_text")
        if pending is None:
            pending = compact(self.pending)
            object.__setattr__(self, "_pending_text", pending)
        return f'{{"data":{data},"stamps":{compact(self.stamps)},"pending":{pending}}}'

    @classmethod
    def from_json(cls, text: str, ts: float | None) -> DeviceState:
        doc = json.loads(text)
        return cls(doc["data"], doc["stamps"], doc["pending"], ts)


_MISSING = object()


def _same_text(a: Any, b: Any) -> bool:
    """Do `a` and `b` encode to the same JSON? For scalars; any container counts as new."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is str or kind is int or kind is bool:
        return bool(a == b)
    if kind is float:
        return bool(a == b and a != 0.0)  # 0.0 == -0.0, written differently
    return a is None


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values: 1 and 1.0 are the same pin value; 1 and true are not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


# -- answers ------------------------------------------------------------------------------


def iso(ts: float) -> str:
    """`2026-02-12T16:00:00.000Z`: the specification's timestamps (UTC, milliseconds)."""
    global _second
    whole = int(ts)
    # A request's times fall in the same second as the last one's: its text is kept (away
    # from a second's last millisecond, where datetime's rounding to microseconds may carry).
    if whole == _second[0] and 0.0 <= ts - whole < 0.999:
        head = _second[1]
    else:
        head = datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        if 0.0 <= ts - whole < 0.999:
            _second = (whole, head)
    return f"{head}{int(ts * 1000) % 1000:03d}Z"


_second: tuple[int | None, str] = (None, "")


def v2_answer(device_id: str, state: DeviceState, now: float) -> dict[str, Any]:
    """`POST /devices/{id}/telemetry`: the state as the server sees it, for the ESP32 to sync."""
    return {"message": "ok", "device_id": device_id, "data": state.data, "timestamp": iso(now)}


def legacy_answer(device_id: str, state: DeviceState, now: float) -> dict[str, Any]:
    """`POST /telemetry`: the LED state the legacy firmware reads (`led`, else `v0`, else 0),
    and the whole state as `updated_data`."""
    led = state.data.get("led", state.data.get("v0", 0))
    return {"message": "ok", "device_id": device_id, "led": led, "updated_data": state.data, "timestamp": iso(now)}


def latest_answer(device_id: str, state: DeviceState) -> dict[str, Any]:
    """`GET /telemetry/latest`: the state for polling; `timestamp` null before any."""
    return {"device_id": device_id, "data": state.data, "timestamp": None if state.ts is None else iso(state.ts)}


def update_message(device_id: str, data: dict[str, Any] | Encoded, ts: float, **extra: Any) -> dict[str, Any]:
    """`{"type": "telemetry_update", ...}`: what apps receive over WebSocket and SSE (`data`
    an `Encoded` of the readings: `encoded_object` of this message takes its text as it is)."""
    return {"type": "telemetry_update", "device_id": device_id, "timestamp": iso(ts), "data": data, **extra}


def status_message(device_id: str, status: str, ts: float) -> dict[str, Any]:
    """`{"type": "status_update", "status": "online" | "offline"}`."""
    return {"type": "status_update", "device_id": device_id, "status": status, "timestamp": iso(ts)}
