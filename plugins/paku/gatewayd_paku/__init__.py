"""gatewayd plugin for paku devices: MQTT-first, provisioned over HTTP, updated over the air.

The model MQTT plugin. Read top to bottom: config, models, routes, topics, serial,
tasks, events; each hook hands over to the module that holds the details:

    config.py    the options (`[plugins.paku]`)
    models.py    the tables and the queries
    topics.py    `Paku`, the plugin's state (`ctx.state`): one handler per topic
    messages.py  what devices publish, parsed and checked (pure)
    commands.py  commands down to devices, and their acks
    routes.py    the HTTP API, one method per route

Nothing here says "paku": names, topics and tables come from the plugin's name
(`ctx.name`), so a copy registered under another name works as it is. The
specification is paku-iot's backend requirements; README.md has the topics, routes,
options, a walkthrough and what was decided where the specification is silent.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from gatewayd.plugins.api import ModelRegistry, PluginContext, TaskRegistry, TopicRegistry, hookimpl

from .config import PakuConfig
from .models import VERSION, index_names, named
from .routes import Routes
from .topics import Paku

__version__ = "0.1.0"
__all__ = ["Paku", "PakuConfig"]


# -- config --------------------------------------------------------------------------


@hookimpl
def gatewayd_config_schema() -> type[PakuConfig]:
    return PakuConfig


# -- models --------------------------------------------------------------------------


@hookimpl
def gatewayd_storage_models(models: ModelRegistry) -> None:
    models.add(*named(models.plugin))  # <name>_measurement, _event, _state; devices are the core's
    models.version = VERSION
    models.migration(2)(index_names)


# -- the plugin's state ----------------------------------------------------------------


@hookimpl
def gatewayd_setup(ctx: PluginContext[PakuConfig, Paku]) -> Paku:
    return Paku(ctx)


# -- routes --------------------------------------------------------------------------


@hookimpl
def gatewayd_http_routes(ctx: PluginContext[PakuConfig, Paku]) -> Blueprint:
    return Routes(ctx).blueprint()


# -- topics --------------------------------------------------------------------------


@hookimpl
def gatewayd_mqtt_topics(topics: TopicRegistry, ctx: PluginContext[PakuConfig, Paku]) -> None:
    paku, name = ctx.state, ctx.name
    topics.subscribe_group(f"{name}/+/telemetry", paku.on_telemetry_group, qos=1)  # a device's burst: one commit
    topics.subscribe(f"{name}/+/state", paku.on_state, qos=1)
    topics.subscribe(f"{name}/+/event/#", paku.on_event, qos=1)
    # %u is the device's MQTT username, which is its id: a device can only use its own topics.
    for suffix in ("telemetry", "state", "event/#"):
        topics.acl(f"{name}/%u/{suffix}", "write")
    topics.acl(f"{name}/%u/cmd", "read")


# -- serial --------------------------------------------------------------------------
# paku devices speak MQTT only: no serial links.


# -- tasks ---------------------------------------------------------------------------


@hookimpl
def gatewayd_background_tasks(tasks: TaskRegistry, ctx: PluginContext[PakuConfig, Paku]) -> None:
    commands = ctx.state.commands
    ctx.commands.on_enqueue(lambda command: commands.wake(command.device_id))
    tasks.add("push-commands", commands.run)


# -- events --------------------------------------------------------------------------


@hookimpl
def gatewayd_alert_rules(ctx: PluginContext[PakuConfig, Paku]) -> list[dict[str, Any]]:
    # Every event is stored and forwarded; these rules only decide what an operator hears.
    return [
        {"name": f"{ctx.name}-error-burst", "type": ["error*", "*error", "fault*"], "more_than": 5,
         "within_s": 3600, "alert_severity": "warning", "actions": [{"kind": "log", "level": "warning"}]},
    ]
