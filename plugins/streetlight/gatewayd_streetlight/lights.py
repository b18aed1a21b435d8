"""`Streetlight`, the plugin's state (`ctx.state`): what happens to what a light sends,
whatever brought it (HTTP or MQTT), and how commands reach it.

It remembers, per light, its `light_id` (its MQTT username and topic level), its newest
status (the cadence, the poll hint and the health indicator follow it), when it was last
heard from over MQTT (only then are commands pushed), and its errors of the last hour.
"""

from __future__ import annotations

import collections
import math
from typing import TYPE_CHECKING, Any

import trio

from gatewayd.plugins.api import (
    BadJSON,
    Command,
    Device,
    InboundMessage,
    MQTTUnavailable,
    PluginContext,
    Record,
    Rejected,
    encoded,
    parse_json,
)

from . import commands, models
from .config import StreetlightConfig
from .health import Assessment, assess
from .messages import Invalid, Registration, Status, iso, read_status

if TYPE_CHECKING:
    Ctx = PluginContext[StreetlightConfig, "Streetlight"]

HOUR = 3600.0
DAY = 86400.0
PURGE_PART = 2000  # status rows per write: ingest waits for one part at most


class Streetlight:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.light_of: dict[str, str] = {}  # device id -> light id
        self.device_of: dict[str, str] = {}  # light id -> device id
        self.latest: dict[str, dict[str, Any]] = {}  # device id -> newest live status
        self.heard: dict[str, float] = {}  # device id -> last request this process saw
        self.mqtt_seen: dict[str, float] = {}  # device id -> last MQTT status
        self.errors: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self.statuses = ctx.metrics.counter("statuses_total", "Status reports stored", ("via",))
        self.refused = ctx.metrics.counter("refused_total", "Requests refused, by error code", ("code",))
        self.pushed = ctx.metrics.counter("commands_pushed_total", "Commands pushed over MQTT")
        self._wake_send, self._wake_receive = trio.open_memory_channel[str](1000)
        self.rows = models.Rows(ctx.storage)

    async def load(self) -> None:
        """At startup: the light ids, and each light's newest status."""
        self.light_of = await self.ctx.storage.read(models.lights)
        self.device_of = {light: device for device, light in self.light_of.items()}
        for device in self.light_of:
            latest = await self.ctx.storage.read(models.latest_status, device)
            if latest is not None:
                self.latest[device] = latest

    # -- configure ----------------------------------------------------------------------

    async def configure(self, device: Device, reg: Registration) -> tuple[str, dict[str, Any]]:
        """Give the light its id (kept), store what it said (upstream too); its config."""
        now = self.ctx.now()
        data = reg.data()
        stored = await self.ctx.ingest.record(
            device.id, "configure", data, ts=now, cls="state",
            family_rows=lambda: models.assign_light(device.id, self.ctx.config.light_id_prefix, data, now))
        light_id = str(stored.result)
        self.light_of[device.id], self.device_of[light_id] = light_id, device.id
        self.heard[device.id] = now
        changes: dict[str, Any] = {}
        if reg.firmware_version and reg.firmware_version != device.firmware:
            changes["firmware"] = reg.firmware_version
        if device.metadata.get("light_id") != light_id or device.metadata.get("enrollment") == "pending":
            changes["metadata"] = {"light_id": light_id,
                                   **({"enrollment": "approved"} if "enrollment" in device.metadata else {})}
        if changes:
            await self.ctx.devices.update(device.id, **changes)
        await self.ctx.devices.activate(device)
        self.ctx.devices.touch(device.id)
        return light_id, self.light_config(device)

    def light_config(self, device: Device) -> dict[str, Any]:
        """The site's defaults, overridden by the light's metadata `config` (an operator's)."""
        config, bad = self.ctx.config.light.merged(device.metadata.get("config"))
        for key, reason in bad.items():
            self.ctx.log.warning("light config override ignored", device=device.id, key=key, reason=reason)
        return config

    # -- status -------------------------------------------------------------------------

    async def record_status(self, device_id: str, status: Status, via: str) -> dict[str, Any]:
        """Store one live report (its rows and its upstream record in one commit), then pass
        it through the alert rules; returns the light's newest status."""
        now = self.ctx.now()
        ts = status.ts if status.ts is not None else now
        # Encoded once: the outbox record and the live event take this text as it is.
        data = encoded(status.data(ts))
        await self.ctx.ingest.record(
            device_id, "status", data, ts=ts, cls="state",
            family_rows=lambda: self.rows.statuses(device_id, [(status, ts)], now, via))
        merged = dict(self.latest.get(device_id, ()))
        merged["ts"], merged["received_at"] = ts, now
        # A compact (MQTT) report says less: what it leaves out stays as it was.
        for key, value in (("power_state", status.power_state), ("brightness", status.brightness),
                           ("temperature", status.temperature), ("battery", status.battery),
                           ("gsm_signal", status.gsm_signal), ("uptime", status.uptime)):
            if value is not None:
                merged[key] = value
        merged["error_flags"] = list(status.error_flags)
        self.latest[device_id] = merged
        self.heard[device_id] = now
        self.statuses.inc(via=via)
        self.ctx.live.publish("status", device_id, data)
        await self._observe(device_id, status, ts)
        return merged

    async def record_sync(self, device_id: str, readings: list[Status]) -> int:
        """An offline sync: every reading in one transaction, each at its own time, as
        `history` upstream (after acks, alerts and the latest status)."""
        now = self.ctx.now()
        pairs = [(s, s.ts if s.ts is not None else now) for s in readings]
        records = [Record(device_id, "status", s.data(ts), ts, "history") for s, ts in pairs]
        await self.ctx.ingest.records(records, family_rows=lambda: self.rows.statuses(device_id, pairs, now, "sync"))
        self.heard[device_id] = now
        self.statuses.inc(len(readings), via="sync")
        return len(readings)

    async def _observe(self, device_id: str, status: Status, ts: float) -> None:
        metrics = {k: v for k, v in (("power_state", status.power_state), ("brightness", status.brightness),
                                     ("battery_percentage", status.battery),
                                     ("temperature_celsius", status.temperature),
                                     ("gsm_signal_strength", status.gsm_signal)) if v is not None}
        await self.ctx.events.observe(device_id, "status", metrics, ts=ts)
        if status.error_flags or status.power_state == "error":
            await self.error(device_id, ts, {"error_flags": list(status.error_flags)})

    async def error(self, device_id: str, ts: float, data: dict[str, Any]) -> None:
        """A light's error (a flagged status, an alert): counted for the malfunction rule."""
        seen, now = self.errors[device_id], self.ctx.now()
        seen.append(now)  # by arrival: the indicator's "errors in the last hour"
        while seen and seen[0] < now - HOUR:
            seen.popleft()
        await self.ctx.events.emit(device_id, "light_error", data, severity="warning", ts=ts)

    def errors_last_hour(self, device_id: str) -> int:
        cutoff = self.ctx.now() - HOUR
        return sum(1 for t in self.errors.get(device_id, ()) if t >= cutoff)

    # -- health -------------------------------------------------------------------------

    def silent_s(self, device: Device) -> float | None:
        """Seconds since the gateway last heard from the light (None: never)."""
        seen = max(device.last_seen or 0.0, self.heard.get(device.id, 0.0))
        return None if seen == 0.0 else max(0.0, self.ctx.now() - seen)

    def assess(self, device: Device) -> Assessment:
        return assess(self.latest.get(device.id), self.silent_s(device), self.errors_last_hour(device.id),
                      self.ctx.config.health)

    # -- MQTT (section 4) -----------------------------------------------------------------

    def topic(self, light_id: str, kind: str) -> str:
        return f"{self.ctx.config.mqtt_topic_prefix}/{light_id}/{kind}"

    async def on_mqtt_status(self, msg: InboundMessage) -> None:
        """`devices/<light_id>/status`: its ACL lets only the light's own account publish."""
        light_id = msg.topic.split("/")[-2]
        device_id = self.device_of.get(light_id)
        if device_id is None or (msg.sender is not None and msg.sender != light_id):
            raise Rejected(f"no configured light {light_id!r}")
        device = await self.ctx.devices.get(device_id, max_age_s=2.0)
        if device is None or device.status == "disabled":
            raise Rejected(f"light {light_id!r} ({device_id}) is not registered or is disabled")
        try:
            status = read_status(parse_json(msg.payload))
        except (BadJSON, Invalid) as e:  # InvalidInput, the declaration's, is a BadJSON
            raise Rejected(f"status: {e}") from None
        await self.ctx.devices.activate(device)
        self.ctx.devices.touch(device_id)
        await self.record_status(device_id, status, via="mqtt")
        self.mqtt_seen[device_id] = self.ctx.now()
        self.wake(device_id)  # it is listening: what waits goes out now

    def wake(self, device_id: str) -> None:
        try:
            self._wake_send.send_nowait(device_id)
        except trio.WouldBlock:
            pass  # a push is due anyway; the light also polls

    def on_enqueue(self, command: Command) -> None:
        self.wake(command.device_id)

    async def push_commands(self) -> None:
        """The background task: push a light's pending commands within ~100 ms of their
        queueing, to a light that reported over MQTT within the offline threshold (one in
        HTTP fallback polls them instead)."""
        async for device_id in self._wake_receive:
            light_id = self.light_of.get(device_id)
            seen = self.mqtt_seen.get(device_id)
            if light_id is None or seen is None or self.ctx.now() - seen > self.ctx.config.health.offline_after_s:
                continue
            try:
                self.pushed.inc(await self.ctx.commands.push(device_id, self.topic(light_id, "commands"),
                                                             render=commands.render))
            except MQTTUnavailable:
                self.mqtt_seen.pop(device_id, None)

    # -- retention ------------------------------------------------------------------------

    async def purge(self) -> None:
        """The background task: `purge_once` at startup, then hourly."""
        while True:
            await self.purge_once()
            await trio.sleep(HOUR)

    async def purge_once(self) -> tuple[int, int]:
        """Remove the status and energy rows received more than `retention_days` ago, but
        none the cloud does not have yet: rows from a minute before the family's oldest
        undelivered record on are kept, whatever their age. (status rows, energy rows) removed."""
        cutoff = self.ctx.now() - self.ctx.config.retention_days * DAY
        pending = await self.ctx.ingest.oldest_pending()
        if pending is not None:
            # A row is stamped a moment before its upstream record: a minute covers that.
            cutoff = min(cutoff, pending - 60.0)
        statuses = energy = 0
        while True:
            part = await self.ctx.storage.write(models.purge, cutoff, PURGE_PART)
            statuses, energy = statuses + part[0], energy + part[1]
            if max(part) < PURGE_PART:
                break
        if statuses or energy:
            self.ctx.log.info("old rows removed", statuses=statuses, energy=energy, before=iso(cutoff))
        return statuses, energy


def retry_after(seconds: float | None) -> int:
    return 0 if seconds is None else max(1, math.ceil(seconds))
