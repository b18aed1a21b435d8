"""paku over MQTT: what devices publish, how it is checked and stored, and commands down.

    paku/<id>/telemetry      device -> gateway  JSON object, QoS 1       -> paku_measurement, history
    paku/<id>/state          device -> gateway  retained, QoS 0 or 1     -> paku_state, state
    paku/<id>/event/<name>   device -> gateway  JSON object, QoS 1       -> paku_event, alert or history
    paku/<id>/event/ack      device -> gateway  {"id", "ok", "result"}   -> the command queue, command_ack
    paku/<id>/cmd            gateway -> device  {"id", ...command}       <- ctx.commands

The parsing functions at the top are pure (tested without a broker). A handler returns
only after `ctx.ingest` committed (the core PUBACKs after it); bad input raises
`Rejected` with a precise reason (acked, counted, kept in the core's rejected table).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from datetime import datetime, timezone
from typing import Any, NamedTuple

import trio

from gatewayd.plugins.api import (
    BadJSON,
    InboundMessage,
    IngestError,
    PluginContext,
    Rejected,
    TopicRegistry,
    parse_json,
)

from .models import Event, Measurement, save_state, stored_state_raw

EVENT_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
OTA_STATUSES = ("started", "downloaded", "verified", "installed", "failed", "rolled_back")
_TS_MIN, _TS_MAX = 946684800.0, 7258118400.0  # 2000..2200: anything else is a device clock bug
_RSSI_MIN, _RSSI_MAX = -200, 100  # dBm; wider than any radio reports, narrow enough for a column


# -- parsing (pure) ------------------------------------------------------------------


class Topic(NamedTuple):
    device: str
    kind: str  # telemetry | state | event
    name: str | None = None  # the event's name


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


def parse_topic(topic: str) -> Topic:
    """`paku/<id>/telemetry|state|event/<name>`; Rejected for anything else."""
    levels = topic.split("/")
    if len(levels) >= 3 and levels[0] == "paku" and levels[1]:
        if len(levels) == 3 and levels[2] in ("telemetry", "state"):
            return Topic(levels[1], levels[2])
        if levels[2] == "event":
            name = "/".join(levels[3:])
            if not EVENT_NAME.match(name):
                raise Rejected(f"event name {name!r}: expected 1-64 of letters, digits and _ . : - (one topic level)")
            return Topic(levels[1], "event", name)
    raise Rejected(f"unexpected topic {topic!r}: expected paku/<id>/telemetry, /state or /event/<name>")


def decode_object(payload: bytes, max_bytes: int, *, empty_ok: bool = False) -> dict[str, Any]:
    """The payload as a JSON object; Rejected naming what is wrong with it."""
    if len(payload) > max_bytes:
        raise Rejected(f"payload of {len(payload)} bytes is over the limit of {max_bytes}")
    if not payload.strip() and empty_ok:
        return {}
    try:
        # The core's strict parser: UTF-8, depth, NaN/Infinity, numbers SQLite can hold.
        doc = parse_json(payload, name="payload")
    except BadJSON as e:
        raise Rejected(str(e)) from None
    if not isinstance(doc, dict):
        raise Rejected(f"expected a JSON object, got {_json_type(doc)}")
    return doc


def message_ts(doc: dict[str, Any], now: float) -> float:
    """The device's `ts` (epoch seconds or ISO 8601), else the arrival time."""
    value = doc.get("ts")
    if value is None:
        return now
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        ts = float(value)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise Rejected(f"ts: expected epoch seconds or an ISO 8601 time, got {value!r}") from None
        ts = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    else:
        raise Rejected(f"ts: expected epoch seconds or an ISO 8601 time, got {_json_type(value)}")
    if not _TS_MIN <= ts <= _TS_MAX:
        raise Rejected(f"ts: {value!r} is not between 2000 and 2200 (epoch seconds, not milliseconds)")
    return ts


def parse_ack(value: Any) -> Ack:
    """`{"id": "...", "ok": true, "result": ...}` or a bare command id (ok)."""
    if isinstance(value, str) and value:
        return Ack(value, True)
    if not isinstance(value, dict):
        raise Rejected(f"ack: expected {{\"id\", \"ok\", \"result\"}}, got {_json_type(value)}")
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
    online = doc.get("online")
    status = doc.get("status")
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
                             or not _RSSI_MIN <= rssi <= _RSSI_MAX):
        raise Rejected(f"rssi: expected a signal strength in dBm ({_RSSI_MIN}..{_RSSI_MAX}), got {rssi!r:.40}")
    fw = doc.get("fwVersion")
    if fw is not None and (not isinstance(fw, str) or not 0 < len(fw) <= 64):
        raise Rejected(f"fwVersion: expected a version string of at most 64 characters, got {fw!r}")
    ack = parse_ack(doc["cmdAck"]) if doc.get("cmdAck") is not None else None
    return DeviceState(online, None if rssi is None else int(rssi), fw, ack, doc)


def is_alert(name: str, patterns: list[str]) -> bool:
    """Events whose name matches an `alert_events` glob go upstream as alerts."""
    return any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in patterns)


def render_command(command: Any) -> bytes:
    """What `paku/<id>/cmd` carries: the command's fields plus its `id`."""
    body = command.payload if isinstance(command.payload, dict) else {"payload": command.payload}
    return json.dumps({**body, "id": command.id}, separators=(",", ":"), allow_nan=False).encode()


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


# -- the handlers ----------------------------------------------------------------------


class PakuMQTT:
    """paku's topics for one gateway: handlers, ACLs and the command push."""

    def __init__(self, ctx: PluginContext):
        self.ctx = ctx
        self.messages = ctx.metrics.counter("messages_total", "paku MQTT messages by topic kind and outcome",
                                            ("kind", "outcome"))
        self.commands = ctx.metrics.counter("commands_total", "paku commands published and answered", ("result",))
        self.online: dict[str, bool] = {}  # from state messages; commands are pushed to online devices
        self._wake, self._woken = trio.open_memory_channel[str](1024)

    def register(self, topics: TopicRegistry) -> None:
        topics.subscribe("paku/+/telemetry", self.on_telemetry, qos=1)
        topics.subscribe("paku/+/state", self.on_state, qos=1)
        topics.subscribe("paku/+/event/#", self.on_event, qos=1)
        # %u is the device's MQTT username, which is its id: a device can only use its own topics.
        for suffix in ("telemetry", "state", "event/#"):
            topics.acl(f"paku/%u/{suffix}", "write")
        topics.acl("paku/%u/cmd", "read")

    async def on_telemetry(self, msg: InboundMessage) -> None:
        async with self._counted("telemetry", msg):
            device, _ = await self._device(msg)
            doc = decode_object(msg.payload, self.ctx.config.max_payload_bytes)
            now = self.ctx.now()
            ts = message_ts(doc, now)
            text = json.dumps(doc, separators=(",", ":"))
            await self._ingest(device, "telemetry", doc, ts, "history", lambda: Measurement.insert(
                device=device, ts=ts, received_at=now, payload=text).execute())

    async def on_state(self, msg: InboundMessage) -> None:
        async with self._counted("state", msg) as outcome:
            device, registered = await self._device(msg, touch=False)
            state = parse_state(msg.payload, self.ctx.config.max_payload_bytes)
            if state.online is not None:
                self.online[device] = state.online
            if state.online:
                self.wake(device)  # commands that waited for it go out now
            if msg.retain and await self.ctx.storage.read(stored_state_raw, device) == msg.payload:
                outcome[0] = "duplicate"  # the broker hands out the retained copy on every subscribe
                return
            now = self.ctx.now()
            ts = message_ts(state.doc, now)
            if state.online is not False:
                self.ctx.devices.touch(device)  # a last will "offline" is not a sign of life
            if state.ack is not None:
                await self._ack(device, state.ack, strict=False)
            data = {**state.doc, "online": state.online}
            await self._ingest(device, "state", data, ts, "state",
                               lambda: save_state(device, {**data, "rssi": state.rssi}, ts, now, msg.payload))
            if state.fw_version and state.fw_version != registered.firmware:
                await self.ctx.devices.update(device, firmware=state.fw_version)

    async def on_event(self, msg: InboundMessage) -> None:
        kind = "ack" if msg.topic.endswith("/event/ack") else "event"
        async with self._counted(kind, msg):
            device, _ = await self._device(msg)
            name = parse_topic(msg.topic).name or ""
            doc = decode_object(msg.payload, self.ctx.config.max_payload_bytes, empty_ok=True)
            now = self.ctx.now()
            ts = message_ts(doc, now)
            text = json.dumps(doc, separators=(",", ":"))

            def rows() -> int:
                return Event.insert(device=device, ts=ts, type=name, payload=text).execute()

            if name == "ack":
                ack = parse_ack(doc)
                status = await self._ack(device, ack, strict=True)
                data = {"id": ack.id, "ok": ack.ok, "result": ack.result, "status": status}
                await self._ingest(device, "command_ack", data, ts, "command_ack", rows)
                return
            if name == "ota" and doc.get("status") not in OTA_STATUSES:
                raise Rejected(f"ota: 'status' must be one of {', '.join(OTA_STATUSES)}, got {doc.get('status')!r}")
            alert = is_alert(name, self.ctx.config.alert_events)
            cls = "alert" if alert else "history"
            await self._ingest(device, "event", {"type": name, "payload": doc}, ts, cls, rows)
            if name == "ota":
                version = None if doc.get("version") is None else str(doc["version"])
                await self.ctx.ota.report(device, doc["status"], version=version,
                                          detail=str(doc.get("detail", "")), ts=ts)
            await self._observe(device, name, doc, "warning" if alert else "info", ts)

    # -- commands down ---------------------------------------------------------------

    def wake(self, device: str) -> None:
        """Ask the push task to publish the device's pending commands."""
        try:
            self._wake.send_nowait(device)
        except trio.WouldBlock:
            pass  # the periodic sweep will find them

    async def push_commands(self) -> None:
        """Background task: publish pending commands to devices that are online."""
        while True:
            due: set[str] = set()
            with trio.move_on_after(self.ctx.config.command_retry_s):
                due.add(await self._woken.receive())
            if not due:  # quiet for a while: retry whatever is still pending
                due = {c.device_id for c in await self.ctx.commands.list(status="pending", limit=1000)}
            while True:
                try:
                    due.add(self._woken.receive_nowait())
                except trio.WouldBlock:
                    break
            for device in sorted(due):
                await self.push(device)

    async def push(self, device: str) -> int:
        if not self.online.get(device) or self.ctx.mqtt is None or not self.ctx.mqtt.connected:
            return 0  # stays pending; pushed when the device says it is online
        try:
            sent = await self.ctx.commands.push(device, f"paku/{device}/cmd", render=render_command)
        except Exception as e:  # broker gone mid-push: the rest stays pending for the next try
            self.ctx.log.warning("command push failed", device=device, error=repr(e))
            return 0
        if sent:
            self.commands.inc(sent, result="published")
            self.ctx.log.info("commands published", device=device, count=sent)
        return sent

    # -- shared steps ----------------------------------------------------------------

    def _counted(self, kind: str, msg: InboundMessage) -> "_Counted":
        return _Counted(self, kind, msg)

    async def _device(self, msg: InboundMessage, *, touch: bool = True) -> tuple[str, Any]:
        device_id = parse_topic(msg.topic).device
        # Per message: a lookup up to 2 s old will do (a disable made here is seen at once).
        device = await self.ctx.devices.get(device_id, max_age_s=2.0)
        if device is None:
            raise Rejected(f"unknown device {device_id!r}: not registered in family paku")
        if device.status == "disabled":
            raise Rejected(f"device {device_id!r} is disabled")
        if touch:
            device = await self.ctx.devices.activate(device)  # first word from it: active
            self.ctx.devices.touch(device_id)
            if not self.online.get(device_id):
                self.wake(device_id)  # back from silence: hand it what waited
            self.online[device_id] = True
        return device_id, device

    async def _ingest(self, device: str, kind: str, data: dict, ts: float, cls: str, rows: Any) -> None:
        try:
            await self.ctx.ingest.record(device, kind, data, ts=ts, cls=cls, family_rows=rows)
        except IngestError as e:
            raise Rejected(str(e)) from None

    async def _ack(self, device: str, ack: Ack, *, strict: bool) -> str | None:
        command = await self.ctx.commands.ack(ack.id, ack.ok, ack.result, device_id=device)
        if command is None:
            if strict:
                raise Rejected(f"ack: no command {ack.id!r} for device {device!r}")
            self.ctx.log.warning("ack for an unknown command", device=device, command=ack.id)
            return None
        self.commands.inc(result="executed" if ack.ok else "failed")
        return command.status

    async def _observe(self, device: str, name: str, doc: dict, severity: str, ts: float) -> None:
        # Stored already; the rules only decide whether an operator hears about it.
        try:
            await self.ctx.events.observe(device, name, doc, severity=severity, ts=ts)
        except Exception as e:
            self.ctx.log.warning("alert rules could not see an event", device=device, type=name, error=repr(e))


class _Counted:
    """Counts a handler's outcome and logs rejections (without the payload)."""

    def __init__(self, mqtt: PakuMQTT, kind: str, msg: InboundMessage):
        self.mqtt, self.kind, self.msg = mqtt, kind, msg
        self.outcome = ["stored"]

    async def __aenter__(self) -> list[str]:
        return self.outcome

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            self.mqtt.messages.inc(kind=self.kind, outcome=self.outcome[0])
        elif issubclass(exc_type, Rejected):
            self.mqtt.messages.inc(kind=self.kind, outcome="rejected")
            self.mqtt.ctx.log.warning("message rejected", topic=self.msg.topic, reason=exc.reason)
        return False
