"""paku over MQTT: the handler of each topic, and `Paku`, the plugin's state that holds them.

    <name>/<id>/telemetry      device -> gateway  JSON object, QoS 1       -> <name>_measurement, history
    <name>/<id>/state          device -> gateway  retained, QoS 0 or 1     -> <name>_state, state
    <name>/<id>/event/<type>   device -> gateway  JSON object, QoS 1       -> <name>_event, alert or history
    <name>/<id>/event/ack      device -> gateway  {"id", "ok", "result"}   -> the command queue, command_ack
    <name>/<id>/cmd            gateway -> device  {"id", ...command}       <- commands.py

(`<name>` is the plugin's name: `paku/pk-1/telemetry` under the name paku.) A handler
returns only after `ctx.ingest` committed, and the core acknowledges the message then;
bad input raises `Rejected` with the reason (acknowledged, counted, kept by the core).
Telemetry, the busy topic, has a group handler: it gets a device's burst (what the edge
read at once) and answers each message, None or its `Rejected`, after one commit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from gatewayd.plugins.api import Device, InboundMessage, IngestError, PluginContext, Rejected

from .commands import Commands
from .config import PakuConfig
from .messages import decode_object, is_alert, message_ts, parse_ack, parse_ota, parse_state, parse_topic, replayed
from .models import Rows, stored_state


class Paku:
    """`ctx.state`, built once by `gatewayd_setup`: the topics' handlers, the command
    push, and who is online."""

    def __init__(self, ctx: PluginContext[PakuConfig, Paku]) -> None:
        self.ctx = ctx
        self.rows = Rows(ctx.storage)
        self.commands = Commands(ctx, self.is_online)
        self.messages = ctx.metrics.counter("messages_total", "MQTT messages by topic kind and outcome",
                                            ("kind", "outcome"))

    def is_online(self, device_id: str) -> bool:
        """Heard from within the family's `offline_after_s`, and not said offline since."""
        return self.ctx.devices.is_online(device_id)

    # -- the handlers, one per topic ---------------------------------------------------

    async def on_telemetry(self, msg: InboundMessage) -> None:
        """One telemetry message, a group of one: raises Rejected for a bad one."""
        (outcome,) = await self.on_telemetry_group([msg])
        if outcome is not None:
            raise outcome

    async def on_telemetry_group(self, msgs: Sequence[InboundMessage]) -> list[Rejected | None]:
        """`<name>/<id>/telemetry`: one measurement row each; upstream as history.

        A group handler (`topics.subscribe_group`): the messages the gateway read from a
        device together, stored with one ingest call; a bad one is rejected alone."""
        outcomes: list[Rejected | None] = []
        rows: list[tuple[str, float, float, str]] = []
        records: list[tuple[str, str, dict[str, Any], float, str]] = []  # Record's fields: a plain tuple is cheaper
        now = self.ctx.now()
        max_bytes = self.ctx.config.max_payload_bytes
        devices: dict[str, Device | Rejected] = {}  # one lookup and one touch per device and group
        by_topic: dict[str, Device | Rejected] = {}  # a group is one device's burst: mostly one topic
        for msg in msgs:
            try:
                if msg.retain and msg.sender is None:  # replayed(msg), inline: this loop runs per message
                    self._not_retained(msg, "telemetry")
                device = by_topic.get(msg.topic)
                if device is None:
                    try:
                        device = await self._device(devices, parse_topic(msg.topic, self.ctx.name).device)
                    except Rejected as e:
                        device = e
                    by_topic[msg.topic] = device
                if isinstance(device, Rejected):
                    raise Rejected(device.reason)
                doc = decode_object(msg.payload, max_bytes)
                ts = message_ts(doc, now) if "ts" in doc else now
            except Rejected as e:
                outcomes.append(e)
                self._rejected("telemetry", msg, e)
                continue
            outcomes.append(None)
            # Stored as received (it is strict JSON): not encoded a second time.
            rows.append((device.id, ts, now, msg.payload.decode()))
            records.append((device.id, "telemetry", doc, ts, "history"))
        for known in devices.values():
            if not isinstance(known, Rejected):
                await self._alive(known)
        if records:
            try:
                await self.ctx.ingest.records(records, family_rows=partial(self.rows.measurements, rows))
            except IngestError as e:
                self.messages.inc(len(records), kind="telemetry", outcome="rejected")
                return [o or Rejected(str(e)) for o in outcomes]
            self.messages.inc(len(records), kind="telemetry", outcome="stored")
        return outcomes

    async def on_state(self, msg: InboundMessage) -> None:
        """`<name>/<id>/state`: the device's latest state; upstream as state."""
        await self._counted("state", msg, self._state(msg))

    async def on_event(self, msg: InboundMessage) -> None:
        """`<name>/<id>/event/<type>`: one event row; `ack` and `ota` also go to the core."""
        kind = "ack" if msg.topic.endswith("/event/ack") else "event"
        await self._counted(kind, msg, self._event(msg))

    async def _state(self, msg: InboundMessage) -> str:
        device = await self._known(parse_topic(msg.topic, self.ctx.name).device)
        state = parse_state(msg.payload, self.ctx.config.max_payload_bytes)
        replay = replayed(msg)
        if replay and await self.ctx.storage.read(stored_state, device.id) == msg.payload:
            return "duplicate"  # the broker hands out its retained copy on every subscribe
        if state.online is not False and not replay:
            await self._alive(device)  # a last will, or a broker's old copy, is no sign of life
        now = self.ctx.now()
        ts = message_ts(state.doc, now)
        if state.ack is not None and await self.commands.ack(device.id, state.ack) is None:
            self.ctx.log.warning("ack for an unknown command", device=device.id, command=state.ack.id)
        data = {**state.doc, "online": state.online}
        row = partial(self.rows.state, device.id, state.online, state.rssi, state.fw_version, ts, now, msg.payload)
        await self._ingest(device.id, "state", data, ts, "state", row)
        if state.online is False:
            self.ctx.devices.leave(device.id, reason="said offline")  # by its word or its last will
        if state.fw_version and state.fw_version != device.firmware:
            await self.ctx.devices.update(device.id, firmware=state.fw_version)
        return "stored"

    async def _event(self, msg: InboundMessage) -> str:
        self._not_retained(msg, "events")
        device = await self._heard(msg)
        name = parse_topic(msg.topic, self.ctx.name).name
        doc = decode_object(msg.payload, self.ctx.config.max_payload_bytes, empty_ok=True)
        now = self.ctx.now()
        ts = message_ts(doc, now)
        row = partial(self.rows.event, device.id, ts, name, msg.payload.decode() if doc else "{}")
        if name == "ack":
            ack = parse_ack(doc)
            status = await self.commands.ack(device.id, ack)
            if status is None:
                raise Rejected(f"ack: no command {ack.id!r} for device {device.id!r}")
            data = {"id": ack.id, "ok": ack.ok, "result": ack.result, "status": status}
            await self._ingest(device.id, "command_ack", data, ts, "command_ack", row)
            return "stored"
        ota = parse_ota(doc) if name == "ota" else None
        alert = is_alert(name, self.ctx.config.alert_events)
        await self._ingest(device.id, "event", {"type": name, "payload": doc}, ts, "alert" if alert else "history", row)
        if ota is not None:
            await self.ctx.ota.report(device.id, ota.status, version=ota.version, detail=ota.detail, ts=ts)
        try:  # stored already: the rules only decide whether an operator hears about it
            await self.ctx.events.observe(device.id, name, doc, severity="warning" if alert else "info", ts=ts)
        except Exception as e:
            self.ctx.log.warning("alert rules could not see an event", device=device.id, type=name, error=repr(e))
        return "stored"

    # -- what the handlers share ---------------------------------------------------------

    async def _counted(self, kind: str, msg: InboundMessage, handled: Awaitable[str]) -> None:
        try:
            outcome = await handled
        except Rejected as e:
            self._rejected(kind, msg, e)
            raise
        self.messages.inc(kind=kind, outcome=outcome)

    def _rejected(self, kind: str, msg: InboundMessage, e: Rejected) -> None:
        self.messages.inc(kind=kind, outcome="rejected")
        self.ctx.log.warning("message rejected", topic=msg.topic, reason=e.reason)

    def _not_retained(self, msg: InboundMessage, what: str) -> None:
        # The spec: telemetry and events are not retained. A device that retains them
        # anyway leaves a copy on the broker, handed out again on every (re)subscribe.
        if replayed(msg):
            raise Rejected(f"a retained copy: {self.ctx.name} {what} must not be retained (the broker kept it and "
                           "sent it again; the original was handled when it was published)")

    async def _known(self, device_id: str) -> Device:
        # Per message: a lookup up to 2 s old will do (a disable made here is seen at once).
        device = await self.ctx.devices.get(device_id, max_age_s=2.0)
        if device is None:
            raise Rejected(f"unknown device {device_id!r}: not registered in family {self.ctx.name}")
        if device.status == "disabled":
            raise Rejected(f"device {device_id!r} is disabled")
        return device

    async def _device(self, seen: dict[str, Device | Rejected], device_id: str) -> Device:
        """`_known`, asked once per device in a group (`seen` holds the answers)."""
        device = seen.get(device_id)
        if device is None:
            try:
                device = seen[device_id] = await self._known(device_id)
            except Rejected as e:
                device = seen[device_id] = e
        if isinstance(device, Rejected):
            raise Rejected(device.reason)
        return device

    async def _heard(self, msg: InboundMessage) -> Device:
        device = await self._known(parse_topic(msg.topic, self.ctx.name).device)
        await self._alive(device)
        return device

    async def _alive(self, device: Device) -> None:
        """The device spoke: it is online; back from silence, it is active and gets what waited."""
        back = not self.is_online(device.id)
        self.ctx.devices.touch(device.id)  # online before any await: the rest of its burst stops here
        if back:
            await self.ctx.devices.activate(device)  # provisioned or claimed until its first word
            self.commands.wake(device.id)

    async def _ingest(self, device: str, kind: str, data: dict[str, Any], ts: float, cls: str,
                      rows: Callable[[], None]) -> None:
        try:
            await self.ctx.ingest.record(device, kind, data, ts=ts, cls=cls, family_rows=rows)
        except IngestError as e:
            raise Rejected(str(e)) from None
