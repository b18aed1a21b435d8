"""What each dashboard page shows, gathered from the services (no HTML here).

`DashboardSources` is what the runtime hands the dashboard: the services it reads,
never the Gateway. Each `*_view` function returns plain data for one template.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import peewee

from ..alerts.events import EventQuery
from ..alerts.notify import list_notifications
from ..health import HEALTHY
from ..outbox.tables import DeadLetter
from .plugin_views import Indicator, Reading

if TYPE_CHECKING:
    from ..alerts.events import EventBus
    from ..devices.registry import Device
    from ..devices.services import DeviceServices
    from ..health import Health
    from ..outbox.store import Outbox
    from ..storage import Storage
    from .plugin_views import PluginViews

__all__ = ["DashboardSources", "DeviceRow", "device_view", "devices_view", "overview_view"]

RECENT = 15  # events and alerts on the overview
DEVICE_EVENTS = 20
DEVICE_COMMANDS = 10  # the newest, on a device's page
CHART_READINGS = 200
MAX_ROWS = 500  # devices listed per family; a site with more gets a count of the rest


@dataclass
class DashboardSources:
    """The services the dashboard reads (wired in runtime.py)."""

    gateway_id: str
    health: Health
    plugin_table: Callable[[], list[dict[str, Any]]]
    devices: DeviceServices
    outbox: Outbox
    events: EventBus
    storage: Storage
    views: PluginViews
    started_at: Callable[[], float | None]
    clock: Callable[[], float]


@dataclass
class DeviceRow:
    device: Device
    presence: str  # online, offline, never seen, disabled
    indicator: Indicator
    latest: Reading | None = None


@dataclass
class Family:
    name: str
    rows: list[DeviceRow] = field(default_factory=list)
    more: int = 0  # devices not listed (over MAX_ROWS)

    @property
    def online(self) -> int:
        return sum(1 for r in self.rows if r.presence == "online")


def presence_of(src: DashboardSources, device: Device) -> str:
    if device.status == "disabled":
        return "disabled"
    if src.devices.presence.is_online(device.family, device.id):
        return "online"
    return "offline" if device.last_seen is not None else "never seen"


async def devices_view(src: DashboardSources) -> list[Family]:
    """Every device, per family: presence, the family's health indicator, its newest reading."""
    families: dict[str, Family] = {}
    for device in await src.devices.registry.list():
        family = families.setdefault(device.family, Family(device.family))
        if len(family.rows) >= MAX_ROWS:
            family.more += 1
            continue
        latest = await src.views.telemetry(device, 1)
        family.rows.append(DeviceRow(device, presence_of(src, device), await src.views.health(device),
                                     latest[-1] if latest else None))
    return list(families.values())


def _dead_by_sink() -> dict[str, tuple[int, int]]:
    query = (DeadLetter.select(DeadLetter.sink, peewee.fn.COUNT(DeadLetter.id), peewee.fn.TOTAL(DeadLetter.count))
             .group_by(DeadLetter.sink).tuples())
    return {sink: (batches, int(records)) for sink, batches, records in query}


async def outbox_view(src: DashboardSources, components: dict[str, Any]) -> dict[str, Any]:
    """Per class and per sink, with each sink's upstream state from /health's `upstream.<name>`."""
    status = await src.storage.read(src.outbox.status)
    dead = await src.storage.read(_dead_by_sink)
    sinks = []
    for name, sink in status["sinks"].items():
        state = components.get(f"upstream.{name}", {})
        sinks.append({
            "name": name, **sink,
            "state": state.get("state", "not configured" if not sink["configured"] else "starting"),
            # The state says "paused" already: the reason goes on with why.
            "reason": (state.get("reason") or "").removeprefix("paused: ") or None,
            "breaker": state.get("breaker"),
            "paused": state.get("paused", False),
            "waiting_until": state.get("waiting_until"),
            "to": state.get("sink"),
            "dead_batches": dead.get(name, (0, 0))[0],
            "dead_records": dead.get(name, (0, 0))[1],
        })
    # A configured sink that cannot start (a missing secret) has no outbox row yet.
    for key, state in components.items():
        name = key.removeprefix("upstream.")
        if key.startswith("upstream.") and name not in status["sinks"]:
            sinks.append({"name": name, "configured": True, "backlog": 0, "backlog_bytes": 0, "delivered": 0,
                          "last_success": None, "last_error": None, "last_error_at": None,
                          "state": state.get("state"), "reason": state.get("reason"), "breaker": None,
                          "paused": False, "waiting_until": None, "to": None, "dead_batches": 0, "dead_records": 0})
    return {"classes": status["classes"], "sinks": sinks, "dead_letters": status["dead_letters"]}


def _attention(ok: bool, health: dict[str, Any], plugins: list[dict[str, Any]], families: list[Family],
               outbox: dict[str, Any], active: list[Any]) -> list[str]:
    """What a technician should look at first, in words; empty when all is well."""
    out = []
    for name, c in health["components"].items():
        if c["state"] not in HEALTHY:
            out.append(f"{name} is {c['state']}" + (f": {c['reason']}" if c.get("reason") else ""))
    for p in plugins:
        if p["state"] == "failed":
            out.append(f"plugin {p['name']} failed" + (f": {p['reason']}" if p.get("reason") else ""))
    red = sum(1 for f in families for r in f.rows if r.indicator.colour == "red")
    if red:
        out.append(f"{red} device{'s' if red > 1 else ''} in the red")
    if outbox["dead_letters"]["batches"]:
        d = outbox["dead_letters"]
        out.append(f"{d['records']} records in {d['batches']} dead-lettered batches "
                   "(gatewayd outbox dead-letters; retry-dead once the cause is fixed)")
    if active:
        out.append(f"{len(active)} alert{'s' if len(active) > 1 else ''} active")
    return out


async def overview_view(src: DashboardSources) -> dict[str, Any]:
    ok, health = src.health.snapshot()
    plugins = src.plugin_table()
    families = await devices_view(src)
    outbox = await outbox_view(src, health["components"])
    events, _ = await src.events.query(EventQuery(limit=RECENT))
    alerts = await src.storage.read(list_notifications, None, RECENT)
    active = src.events.engine.active()
    started = src.started_at()
    return {
        "ok": ok,
        "health": health,
        "uptime_s": None if started is None else src.clock() - started,
        "plugins": plugins,
        "families": families,
        "devices_total": sum(len(f.rows) + f.more for f in families),
        "devices_online": sum(f.online for f in families),
        "outbox": outbox,
        "events": events,
        "alerts": alerts,
        "active": active,
        "attention": _attention(ok, health, plugins, families, outbox, active),
        "panels": [(p, await src.views.render(p)) for p in src.views.panels()],
    }


async def find_device(src: DashboardSources, device_id: str, family: str | None) -> list[Device]:
    return await src.devices.registry.find(device_id, family or None)


async def device_view(src: DashboardSources, device: Device) -> dict[str, Any]:
    readings = await src.views.telemetry(device, CHART_READINGS)
    events, _ = await src.events.query(EventQuery(family=device.family, device=device.id, limit=DEVICE_EVENTS))
    return {
        "device": device,
        "presence": presence_of(src, device),
        "indicator": await src.views.health(device),
        "readings": readings,
        "metadata": [(k, v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
                     for k, v in sorted(device.metadata.items())],
        "events": events,
        "commands": await src.devices.commands.list(device.family, device.id, limit=DEVICE_COMMANDS),
        # Stream names replace dots in a device id by "_" (FamilyLive.publish).
        "streams": f"{device.family}.*.{device.id.replace('.', '_')}",
    }
