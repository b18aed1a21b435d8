"""`Thingsnxt`, the plugin's state (`ctx.state`): telemetry in, state set by apps, both
stored, forwarded upstream, broadcast live and run through the rules.

One telemetry request is one transaction (ctx.ingest): its history rows, the device's new
state, its changed keys and the upstream records commit together, and the state is read
and written on the writer thread, so two requests of one device never lose an update.
The live broadcast and the rules (webhooks, notifications) come after the commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from gatewayd.plugins.api import Device, Encoded, PluginContext, Record, encoded, encoded_object

from . import models
from .errors import Refused
from .panel import PinsPanel
from .telemetry import (
    DeviceState,
    KeyPolicy,
    Limits,
    Reading,
    policy_for,
    status_message,
    update_message,
)

if TYPE_CHECKING:
    from .config import ThingsnxtConfig

RATE_CLASS = "requests"
STATUS_EVERY_S = 1.0


class Thingsnxt:
    def __init__(self, ctx: PluginContext[ThingsnxtConfig, Thingsnxt]) -> None:
        self.ctx = ctx
        config = ctx.config
        self.limits = Limits(config.max_keys, config.max_data_bytes, config.max_bulk)
        self.rows = models.Rows(ctx.storage.connection)
        self.messages = ctx.metrics.counter("telemetry_total", "Telemetry readings stored", ("endpoint",))
        self.app_sets = ctx.metrics.counter("state_sets_total", "Virtual pins set by apps and operators")
        ctx.devices.set_offline_after(config.offline_after_s)
        self.panel = PinsPanel(ctx)  # the dashboard's (panel.py): its last outcome lives as long as the plugin
        self.online: set[str] = set()  # devices whose "online" the live streams were told
        self._policies: dict[tuple[str, str], KeyPolicy] = {}  # (device id, model) -> its security rules
        self._first_online = trio.Event()  # watch_presence waits for one while none is online
        if config.rate_limit:
            ctx.ratelimit.define(RATE_CLASS, config.rate_limit, config.rate_window_s)

    # -- who may do what ---------------------------------------------------------------

    def limit(self, client: str | None) -> None:
        """The specification's rate limit, per client address: Refused(429) with Retry-After."""
        if not self.ctx.config.rate_limit:
            return
        decision = self.ctx.ratelimit.check(client or "-", RATE_CLASS)
        if not decision.allowed:
            raise Refused(429, "Too many requests: slow down", self.ctx.ratelimit.headers(decision))

    def policy(self, device: Device) -> KeyPolicy:
        key = (device.id, device.model)
        policy = self._policies.get(key)
        if policy is None:  # the rules are the config's: fixed while the plugin runs
            if len(self._policies) >= 10_000:  # bounded: one per device
                self._policies.clear()
            policy = self._policies[key] = policy_for(self.ctx.config.security, device.id, device.model)
        return policy

    # -- telemetry ---------------------------------------------------------------------

    async def telemetry(self, device: Device, readings: Sequence[Reading], endpoint: str) -> DeviceState:
        """Store readings (one, or a bulk's, oldest first); the device's state after them.
        Refused(403) naming the keys the security rules do not let this device write."""
        policy = self.policy(device)
        if not policy.device_writes_any:
            refused = sorted({key for r in readings for key in policy.device_refused(r.data)})
            if refused:
                raise Refused(403, f"Security rules: this device may not write {', '.join(refused)}")
        now = self.ctx.now()
        stamped = [(r.ts if r.ts is not None else now, r.data) for r in readings]
        texts = [r.text if r.text is not None else encoded(r.data).text for r in readings]  # measured when checked

        def rows() -> tuple[DeviceState, dict[str, Any]]:
            self.rows.telemetry((device.id, ts, now, endpoint, text) for (ts, _), text in zip(stamped, texts))
            state, changed = self.rows.load(device.id), {}
            for ts, data in stamped:
                state, step = state.with_device(data, ts)
                changed.update(step)
            self.rows.state(device.id, state, changed, "device")
            return state, changed

        # The readings' text, encoded once when checked, is what the outbox and the live events take.
        parts = [Encoded(data, text) for (_, data), text in zip(stamped, texts)]
        stored = await self.ctx.ingest.records([Record(device.id, "telemetry", part, ts)
                                                for (ts, _), part in zip(stamped, parts)], family_rows=rows)
        state: DeviceState = stored.result[0]
        self.messages.inc(len(stamped), endpoint=endpoint)
        if device.id not in self.online:
            self.online.add(device.id)
            self._first_online.set()
            self.ctx.live.publish("telemetry", device.id, status_message(device.id, "online", now))
        for (ts, _), part in zip(stamped, parts):
            self.ctx.live.publish("telemetry", device.id,
                                  encoded_object(update_message(device.id, part, ts, source="device")))
        ts, data = stamped[-1]
        # Webhooks and rules on the readings (docs/events.md): stored as an event only if one fires.
        await self.ctx.events.observe(device.id, "telemetry_update", {"data": data, "endpoint": endpoint}, ts=ts)
        return state

    # -- state from apps ---------------------------------------------------------------

    async def set_values(self, device: Device, values: dict[str, Any]) -> DeviceState:
        """An app or operator sets keys (virtual pins); the device reads them in its next
        answer or poll. Refused(403) naming the keys the security rules keep from apps."""
        refused = self.policy(device).app_refused(values)
        if refused:
            raise Refused(403, f"Security rules: an app may not set {', '.join(sorted(refused))}")
        now = self.ctx.now()

        def rows() -> DeviceState:
            state = self.rows.load(device.id).with_app(values, now)
            self.rows.state(device.id, state, values, "app")
            return state

        stored = await self.ctx.ingest.record(device.id, "state_set", values, ts=now, cls="state", family_rows=rows)
        self.app_sets.inc()
        self.ctx.live.publish("telemetry", device.id, update_message(device.id, values, now, source="app"))
        state: DeviceState = stored.result
        return state

    async def watch_presence(self) -> None:
        """The background task: `{"type": "status_update", "status": "offline"}` on the live
        streams once the core's presence says a device went silent (its event and its
        notification are the core's: the rules in __init__.py)."""
        while True:
            if not self.online:  # nothing to watch: no wake-ups on a site without these devices
                self._first_online = trio.Event()
                await self._first_online.wait()
            await trio.sleep(STATUS_EVERY_S)
            for device_id in [d for d in self.online if not self.ctx.devices.is_online(d)]:
                self.online.discard(device_id)
                self.ctx.live.publish("telemetry", device_id, status_message(device_id, "offline", self.ctx.now()))

    async def state(self, device_id: str) -> DeviceState:
        return await self.ctx.storage.read(models.load_state, device_id)

