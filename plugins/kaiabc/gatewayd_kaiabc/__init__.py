"""gatewayd plugin for KaiABC oscillator sensor nodes (Raspberry Pi Pico, ELM11).

The gateway is the specification's "KaiABC server" for one site: the spec's `/v1`
paths sit under the plugin's mount (`http://<gateway>:8080/kaiabc/v1/...`). Read top
to bottom: config, models, routes, tasks; each hook hands over to the module that
holds the details:

    config.py    the options (`[plugins.kaiabc]`)
    models.py    the tables and the queries
    service.py   `Kaiabc`, the plugin's state (`ctx.state`): nodes, readings, persistence
    live.py      `Fleet`: every node's live oscillator, advanced in one batch per tick
    routes.py    the HTTP API, one declared route per endpoint
    intake.py    readings over MQTT and a UART
    control.py   reset, entrainment parameters, simulation, output, filter
    ws.py        the spec's WebSocket (`/v1/ws`) on the live hub
    errors.py    the spec's error object
    engine/      the oscillator engine (numpy/scipy; docs/model.md)
    commands.py  `gatewayd kaiabc simulate | q10 | prc | entrain`
"""

from __future__ import annotations

from quart import Blueprint

from gatewayd.plugins.api import (CommandRegistry, ModelRegistry, PluginContext, SerialRegistry, TaskRegistry,
                                  TopicRegistry, hookimpl)

from .commands import add_commands
from .config import KaiabcConfig
from .intake import Intake
from .models import VERSION, named
from .routes import Api
from .service import Kaiabc

__version__ = "0.2.0"
__all__ = ["Kaiabc", "KaiabcConfig"]


# -- config --------------------------------------------------------------------------


@hookimpl
def gatewayd_config_schema() -> type[KaiabcConfig]:
    return KaiabcConfig


# -- models --------------------------------------------------------------------------


@hookimpl
def gatewayd_storage_models(models: ModelRegistry) -> None:
    models.add(*named(models.plugin))  # <name>_node, _oscillator, _reading; credentials are the core's
    models.version = VERSION


# -- the plugin's state ----------------------------------------------------------------


@hookimpl
def gatewayd_setup(ctx: PluginContext[KaiabcConfig, Kaiabc]) -> Kaiabc:
    return Kaiabc(ctx)


@hookimpl
async def gatewayd_startup(ctx: PluginContext[KaiabcConfig, Kaiabc]) -> None:
    await ctx.state.start()  # every persisted oscillator resumes where it was


@hookimpl
async def gatewayd_shutdown(ctx: PluginContext[KaiabcConfig, Kaiabc]) -> None:
    await ctx.state.persist()


# -- routes --------------------------------------------------------------------------


@hookimpl
def gatewayd_http_routes(ctx: PluginContext[KaiabcConfig, Kaiabc]) -> Blueprint:
    return Api(ctx).blueprint()


# -- topics --------------------------------------------------------------------------


@hookimpl
def gatewayd_mqtt_topics(topics: TopicRegistry, ctx: PluginContext[KaiabcConfig, Kaiabc]) -> None:
    # The spec's optional MQTT path: a node publishes its readings on its own topic (%u: its id).
    topics.subscribe(f"{ctx.name}/sensors/+", Intake(ctx).on_mqtt, qos=1)
    topics.acl(f"{ctx.name}/sensors/%u", "write")


# -- serial --------------------------------------------------------------------------


@hookimpl
def gatewayd_serial_links(links: SerialRegistry, ctx: PluginContext[KaiabcConfig, Kaiabc]) -> None:
    if ctx.config.serial is not None:  # a Pico on a UART: JSON lines, answered line by line
        links.add("uart", ctx.config.serial, Intake(ctx).on_frame)


# -- tasks ---------------------------------------------------------------------------


@hookimpl
def gatewayd_background_tasks(tasks: TaskRegistry, ctx: PluginContext[KaiabcConfig, Kaiabc]) -> None:
    tasks.add("oscillators", ctx.state.run)


# -- command line ------------------------------------------------------------------


@hookimpl
def gatewayd_cli_commands(commands: CommandRegistry) -> None:
    add_commands(commands)
