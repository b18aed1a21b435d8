"""gatewayd plugin for CCMS street-light controllers (the specification: seed 001).

Read top to bottom: config, models, state, routes, topics, serial, tasks, events; each
hook hands over to the module that holds the details:

    config.py    the options (`[plugins.streetlight]`, `.light`, `.health`)
    models.py    the tables (lights, status reports, energy readings) and their queries
    messages.py  what lights send, parsed and checked (pure)
    schemas.py   the routes' declared bodies (their OpenAPI schemas)
    commands.py  operators' commands in the specification's shape, by poll or push
    health.py    the health metrics and the green / yellow / red / gray indicator (pure)
    dashboard.py the panel on the dashboard's overview
    cli.py       `gatewayd streetlight config ID ...`: one light's config, by an operator
    lights.py    `Streetlight`, the plugin's state (`ctx.state`)
    routes.py    the HTTP API, one method per route

Names, topics and tables come from the plugin's name (`ctx.name`) and its config, so a
copy registered under another name works as it is. README.md has the routes, the
topics, the options, a walkthrough and what was decided where the specification is
silent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from quart import Blueprint

from gatewayd.plugins.api import (
    CommandRegistry,
    Device,
    Markup,
    ModelRegistry,
    PluginContext,
    TaskRegistry,
    TopicRegistry,
    hookimpl,
)

from . import commands
from . import models as tables
from .config import StreetlightConfig
from .dashboard import Panel
from .lights import Streetlight
from .routes import LightRoutes

__version__ = "0.1.0"
__all__ = ["Streetlight", "StreetlightConfig"]

Ctx = PluginContext[StreetlightConfig, Streetlight]


# -- config --------------------------------------------------------------------------


@hookimpl
def gatewayd_config_schema() -> type[StreetlightConfig]:
    return StreetlightConfig


# -- models --------------------------------------------------------------------------


@hookimpl
def gatewayd_storage_models(models: ModelRegistry) -> None:
    models.add(*tables.named(models.plugin))  # <name>_light, _status, _energy_parameters
    models.version = tables.VERSION
    models.migration(2)(tables.add_arrival_index)


# -- the plugin's state ----------------------------------------------------------------


@hookimpl
def gatewayd_setup(ctx: Ctx) -> Streetlight:
    ctx.devices.set_offline_after(ctx.config.health.offline_after_s)
    return Streetlight(ctx)


@hookimpl
async def gatewayd_startup(ctx: Ctx) -> None:
    await ctx.state.load()


# -- routes --------------------------------------------------------------------------


@hookimpl
def gatewayd_http_routes(ctx: Ctx) -> Blueprint:
    return LightRoutes(ctx).blueprint()


@hookimpl
def gatewayd_check_command(payload: Any) -> dict[str, Any]:
    return commands.check(payload)  # the specification's command types; ValueError naming the field


# -- topics --------------------------------------------------------------------------


@hookimpl
def gatewayd_mqtt_topics(topics: TopicRegistry, ctx: Ctx) -> None:
    prefix = ctx.config.mqtt_topic_prefix
    topics.subscribe(f"{prefix}/+/status", ctx.state.on_mqtt_status, qos=1)
    # %u is the light's MQTT username, its light id (configure hands it out): its own topics only.
    topics.acl(f"{prefix}/%u/status", "write")
    topics.acl(f"{prefix}/%u/commands", "read")


# -- serial --------------------------------------------------------------------------
# Street lights speak HTTP (GSM) and MQTT: no serial links.


# -- tasks ---------------------------------------------------------------------------


@hookimpl
def gatewayd_background_tasks(tasks: TaskRegistry, ctx: Ctx) -> None:
    ctx.commands.on_enqueue(ctx.state.on_enqueue)
    tasks.add("push-commands", ctx.state.push_commands)
    tasks.add("purge", ctx.state.purge)


# -- events --------------------------------------------------------------------------


@hookimpl
def gatewayd_alert_rules(ctx: Ctx) -> list[dict[str, Any]]:
    """The specification's section 9, thresholds from `[plugins.<name>.health]`."""
    h, name = ctx.config.health, ctx.name
    actions = [{"kind": "upstream"}, {"kind": "log", "level": "warning"}]
    return [
        {"name": f"{name}-offline", "type": "status", "absent_for_s": h.offline_after_s, "actions": actions},
        {"name": f"{name}-battery-critical", "type": "status", "when": [f"battery_percentage < {h.battery_critical_pct}"],
         "alert_severity": "critical", "actions": actions},
        {"name": f"{name}-overheating", "type": "status", "when": [f"temperature_celsius > {h.temperature_max_c}"],
         "alert_severity": "critical", "actions": actions},
        {"name": f"{name}-poor-connectivity", "type": "status", "when": [f"gsm_signal_strength < {h.gsm_signal_min}"],
         "alert_severity": "warning", "actions": actions},
        {"name": f"{name}-malfunction", "type": "light_error", "more_than": h.errors_per_hour_max, "within_s": 3600,
         "alert_severity": "critical", "actions": actions},
    ]


@hookimpl
def gatewayd_device_health(ctx: Ctx, device: Device) -> tuple[str, str]:
    assessment = ctx.state.assess(device)  # the same as GET /device/<id>/health
    return assessment.indicator, assessment.reason


@hookimpl
async def gatewayd_device_telemetry(ctx: Ctx, device: Device, limit: int) -> list[tuple[float, dict[str, Any]]]:
    rows = await ctx.storage.read(tables.recent_statuses, device.id, limit)
    return [(r.pop("ts"), r) for r in rows]


# -- dashboard -------------------------------------------------------------------------


@hookimpl
def gatewayd_dashboard_panels(ctx: Ctx) -> list[tuple[str, Callable[[], Awaitable[Markup]]]]:
    """Lights by colour, on / off, the offline ones, waiting commands, energy today."""
    return [("Street lights", Panel(ctx).render)]


# -- command line ----------------------------------------------------------------------


@hookimpl
def gatewayd_cli_commands(commands: CommandRegistry) -> None:
    """`gatewayd <name> config ID --brightness 60 --schedule 18:30-06:00`: one light's config."""
    from .cli import add_commands

    add_commands(commands)
