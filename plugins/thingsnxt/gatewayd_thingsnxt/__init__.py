"""gatewayd plugin for thingsnxt devices: ESP32s with their token in the JSON body.

Read top to bottom: config, models, state, routes, topics, serial, tasks, events; each
hook hands over to the module that holds the details:

    config.py     the options (`[plugins.thingsnxt]`), the security rules, the webhooks
    models.py     the tables (history, latest state, latest value per key)
    telemetry.py  what devices and apps send, checked; the device state; the answers (pure)
    service.py    `Thingsnxt`, the plugin's state (`ctx.state`): telemetry in, state from apps
    routes.py     the HTTP API, declared (`/thingsnxt/openapi.json`)
    streams.py    the live streams, SSE and WebSocket, in the family's shapes
    panel.py      the site dashboard's panel: each device's pins, a form to set one
    provisioning.py  `gatewayd thingsnxt provision PORT --id ID`: an ESP32 over serial

Names, tables and streams come from the plugin's name (`ctx.name`). The specification
is the ThingsNXT ESP32 telemetry summary; README.md has the routes, the options, a
walkthrough and what was decided where the specification is silent.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from gatewayd.plugins.api import CommandRegistry, Device, ModelRegistry, PluginContext, TaskRegistry, hookimpl

from .config import ThingsnxtConfig
from .models import VERSION, named, recent
from .routes import Api
from .service import Thingsnxt
from .streams import Streams

__version__ = "0.1.0"
__all__ = ["Thingsnxt", "ThingsnxtConfig"]

Ctx = PluginContext[ThingsnxtConfig, Thingsnxt]


# -- config --------------------------------------------------------------------------


@hookimpl
def gatewayd_config_schema() -> type[ThingsnxtConfig]:
    return ThingsnxtConfig


# -- models --------------------------------------------------------------------------


@hookimpl
def gatewayd_storage_models(models: ModelRegistry) -> None:
    models.add(*named(models.plugin))  # <name>_telemetry, _state, _value; devices are the core's
    models.version = VERSION


# -- the plugin's state ----------------------------------------------------------------


@hookimpl
def gatewayd_setup(ctx: Ctx) -> Thingsnxt:
    return Thingsnxt(ctx)


# -- routes --------------------------------------------------------------------------


@hookimpl
def gatewayd_http_routes(ctx: Ctx) -> Blueprint:
    bp = Blueprint(ctx.name, __name__)  # mounted at /thingsnxt: the firmware's API_BASE_URL
    Api(ctx).register(bp)
    Streams(ctx).register(bp)
    ctx.state.panel.register(bp)  # the dashboard panel's form
    return bp


# -- topics --------------------------------------------------------------------------
# None: thingsnxt devices speak HTTP.


# -- serial --------------------------------------------------------------------------
# No line the gateway keeps open: an ESP32's serial console is used once, to provision it
# (the command below, provisioning.py, over the core's serial link).


# -- tasks ---------------------------------------------------------------------------


@hookimpl
def gatewayd_background_tasks(tasks: TaskRegistry, ctx: Ctx) -> None:
    # Online/offline is the core's presence (ctx.devices.set_offline_after in service.py);
    # its device_online / device_offline events go through the rules below. This task only
    # tells the live streams when a device went silent.
    tasks.add("watch-presence", ctx.state.watch_presence)


# -- events --------------------------------------------------------------------------


@hookimpl
def gatewayd_alert_rules(ctx: Ctx) -> list[dict[str, Any]]:
    """Notifications on each online/offline transition, at most one per device and kind
    every `notify_cooldown_s` (a flapping device sends one, then a summary); webhooks."""
    config, name = ctx.config, ctx.name
    hooks = [(i, hook) for i, hook in enumerate(config.webhooks)]
    rules: list[dict[str, Any]] = []
    for status in ("online", "offline"):
        event = f"device_{status}"
        rules.append({"name": f"{name}-{status}", "type": event, "cooldown_s": config.notify_cooldown_s,
                      "alert_severity": "info" if status == "online" else "warning",
                      "actions": [{"kind": "upstream"}, {"kind": "log", "level": "info"}]})
    for i, hook in hooks:
        action = {"kind": "webhook", "url": hook.url, **({"secret_env": hook.secret_env} if hook.secret_env else {})}
        for event in hook.events:
            cooldown = 0.0 if event == "telemetry_update" else config.notify_cooldown_s
            for j, device in enumerate(hook.devices):
                rules.append({"name": f"{name}-webhook-{i}-{event}-{j}", "type": event, "device": device,
                              "cooldown_s": cooldown, "actions": [action]})
    return rules


# -- the site dashboard ----------------------------------------------------------------


@hookimpl
def gatewayd_device_health(ctx: Ctx, device: Device) -> tuple[str, str] | None:
    if not ctx.devices.is_online(device.id):
        return None  # gray: never heard from, or silent for offline_after_s
    return ("green", "sending")


@hookimpl
def gatewayd_dashboard_panels(ctx: Ctx) -> list[tuple[str, Any]]:
    return [("Virtual pins", ctx.state.panel.render)]  # set a pin as an app does (panel.py)


@hookimpl
async def gatewayd_device_telemetry(ctx: Ctx, device: Device, limit: int) -> list[tuple[float, dict[str, float]]]:
    """The numeric keys of its recent messages (temperature, the pins) for the device page's charts."""
    readings = await ctx.storage.read(recent, device.id, limit)
    return [(ts, {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for ts, data in readings]


# -- command line ------------------------------------------------------------------


@hookimpl
def gatewayd_cli_commands(commands: CommandRegistry) -> None:
    from .provisioning import add_commands

    add_commands(commands)
