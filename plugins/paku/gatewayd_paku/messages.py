"""What paku devices publish, parsed and checked: pure functions, no I/O.

Each refuses bad input with `Rejected` and a reason a person can act on (the core keeps
it with the message in `core_mqtt_rejected`). Tested without a broker.
"""

from __future__ import annotations

import fnmatch
import json
import re
from typing import Any, NamedTuple

from gatewayd.plugins.api import (
    REPORT_STATUSES,
    BadJSON,
    Command,
    InboundMessage,
    Rejected,
    json_kind,
    parse_json,
    parse_time,
    plausible_ts,
)

EVENT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
RSSI_MIN, RSSI_MAX = -200, 100  # dBm; wider than any radio reports, narrow enough for a column


class Topic(NamedTuple):
    device: str
    kind: str  # telemetry | state | event
    name: str = ""  # the event's name


class Ack(NamedTuple):
    id: str
    ok: bool
    result: Any = None


class DeviceState(NamedTuple):
    online: bool | None
    rssi: int | None
    fw_version: str | None
    ack: Ack | None
    doc: dict[str, Any]


class OtaReport(NamedTuple):
    status: str
    version: str | None
    detail: str


def replayed(msg: InboundMessage) -> bool:
    """A retained copy a broker hands the gateway when it (re)subscribes, not a device
    speaking now. What devices publish reaches the handlers live: through the gateway's
    edge with its sender, retained or not (mosquitto never keeps it); through a broker
    with the retain flag cleared (MQTT clears it for a subscription that already exists)."""
    return msg.retain and msg.sender is None


def parse_topic(topic: str, family: str) -> Topic:
    """`<family>/<id>/telemetry`, `/state` or `/event/<name>`; Rejected for anything else."""
    levels = topic.split("/")
    if len(levels) >= 3 and levels[0] == family and levels[1]:
        if len(levels) == 3 and levels[2] in ("telemetry", "state"):
            return Topic(levels[1], levels[2])
        if levels[2] == "event":
            name = "/".join(levels[3:])
            if not EVENT_NAME.fullmatch(name):
                raise Rejected(f"event name {name!r}: expected 1-64 of letters, digits and _ . : - (one topic level)")
            return Topic(levels[1], "event", name)
    raise Rejected(f"unexpected topic {topic!r}: expected {family}/<id>/telemetry, /state or /event/<name>")


def decode_object(payload: bytes, max_bytes: int, *, empty_ok: bool = False) -> dict[str, Any]:
    """The payload as a JSON object, parsed strictly by the core (UTF-8, depth, NaN and
    Infinity, numbers SQLite can hold); Rejected naming what is wrong with it."""
    if len(payload) > max_bytes:
        raise Rejected(f"payload of {len(payload)} bytes is over the limit of {max_bytes}")
    if empty_ok and not payload.strip():
        return {}
    try:
        doc = parse_json(payload, name="payload")
    except BadJSON as e:
        raise Rejected(str(e)) from None
    if not isinstance(doc, dict):
        raise Rejected(f"expected a JSON object, got {json_kind(doc)}")
    return doc


def message_ts(doc: dict[str, Any], now: float) -> float:
    """The device's `ts` (epoch seconds or ISO 8601), else the arrival time."""
    value = doc.get("ts")
    if value is None:
        return now
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        ts = parse_time(value) if isinstance(value, str) else float(value)
    except ValueError:
        got = repr(value) if isinstance(value, str) else json_kind(value)
        raise Rejected(f"ts: expected epoch seconds or an ISO 8601 time, got {got}") from None
    if not plausible_ts(ts):
        raise Rejected(f"ts: {value!r} is not between 2000 and 2200 (epoch seconds, not milliseconds)")
    return ts


def parse_ack(value: Any) -> Ack:
    """`{"id": "...", "ok": true, "result": ...}` or a bare command id (ok)."""
    if isinstance(value, str) and value:
        return Ack(value, True)
    if not isinstance(value, dict):
        raise Rejected(f'ack: expected {{"id", "ok", "result"}}, got {json_kind(value)}')
    command_id, ok = value.get("id"), value.get("ok", True)
    if not isinstance(command_id, str) or not command_id:
        raise Rejected("ack: 'id' must be the command's id (a non-empty string)")
    if not isinstance(ok, bool):
        raise Rejected(f"ack: 'ok' must be true or false, got {ok!r}")
    return Ack(command_id, ok, value.get("result"))


def parse_state(payload: bytes, max_bytes: int) -> DeviceState:
    """A state object, or the bare words `online` / `offline` (a typical last will)."""
    word = payload.strip().lower()
    if word in (b"online", b"offline"):
        return DeviceState(word == b"online", None, None, None, {"status": word.decode()})
    doc = decode_object(payload, max_bytes)
    online, status = doc.get("online"), doc.get("status")
    if online is not None and not isinstance(online, bool):
        raise Rejected(f"online: expected true or false, got {online!r}")
    if status is not None:
        if status not in ("online", "offline"):
            raise Rejected(f"status: expected 'online' or 'offline', got {status!r}")
        if online is not None and online != (status == "online"):
            raise Rejected(f"status {status!r} contradicts online={online}")
        online = status == "online"
    rssi = doc.get("rssi")
    if rssi is not None and (isinstance(rssi, bool) or not isinstance(rssi, (int, float))
                             or not RSSI_MIN <= rssi <= RSSI_MAX):
        raise Rejected(f"rssi: expected a signal strength in dBm ({RSSI_MIN}..{RSSI_MAX}), got {rssi!r:.40}")
    fw = doc.get("fwVersion")
    if fw is not None and (not isinstance(fw, str) or not 0 < len(fw) <= 64):
        raise Rejected(f"fwVersion: expected a version string of at most 64 characters, got {fw!r}")
    ack = parse_ack(doc["cmdAck"]) if doc.get("cmdAck") is not None else None
    return DeviceState(online, None if rssi is None else int(rssi), fw, ack, doc)


def parse_ota(doc: dict[str, Any]) -> OtaReport:
    """`event/ota`: `{"status": one of REPORT_STATUSES, "version"?, "detail"?}`."""
    status = doc.get("status")
    if status not in REPORT_STATUSES:
        raise Rejected(f"ota: 'status' must be one of {', '.join(REPORT_STATUSES)}, got {status!r}")
    version = doc.get("version")
    return OtaReport(status, None if version is None else str(version), str(doc.get("detail", "")))


def is_alert(name: str, patterns: list[str]) -> bool:
    """Events whose name matches an `alert_events` glob go upstream as alerts."""
    return any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in patterns)


def render_command(command: Command) -> bytes:
    """What `<family>/<id>/cmd` carries: the command's fields plus its `id`."""
    body = command.payload if isinstance(command.payload, dict) else {"payload": command.payload}
    return json.dumps({**body, "id": command.id}, separators=(",", ":"), allow_nan=False).encode()
