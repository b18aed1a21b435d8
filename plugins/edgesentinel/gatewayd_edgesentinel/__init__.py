"""gatewayd plugin for edgesentinel industrial door sensor nodes.

Read top to bottom: config, models, state, routes, topics, serial, tasks, dashboard, events; each
hook hands over to the module that holds the details:

    config.py    the options (`[plugins.edgesentinel]`)
    models.py    the tables (the spec's data model, what a site keeps) and their writes
    batch.py     a telemetry batch, its headers and its records, checked (pure)
    windows.py   window statistics of raw waveforms (numpy, scipy's Welch; pure)
    pressure.py  the backpressure policy (pure)
    profiles.py  a node's configuration profile and its ETag (pure)
    state.py     `Sentinel`, the plugin's state: a batch from its headers to its commit
    routes.py    the device API of the specification, declared
    workflows.py the spec's workflow table as default alert rules (pure)
    dashboard.py the site's panels on the dashboard's overview

Names, tables and the mount come from the plugin's name (`ctx.name`). The
specification is EdgeSentinel's API specification; README.md has the routes, the
batch schema, the options, a walkthrough and what was decided where it is silent.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from gatewayd.plugins.api import ModelRegistry, PluginContext, TaskRegistry, hookimpl

from .config import EdgesentinelConfig
from .dashboard import panels
from .models import VERSION, index_packets, named
from .routes import DeviceRoutes
from .state import Sentinel
from .workflows import rules

__version__ = "0.1.0"
__all__ = ["EdgesentinelConfig", "Sentinel"]

Ctx = PluginContext[EdgesentinelConfig, Sentinel]


# -- config --------------------------------------------------------------------------


@hookimpl
def gatewayd_config_schema() -> type[EdgesentinelConfig]:
    return EdgesentinelConfig


# -- models --------------------------------------------------------------------------


@hookimpl
def gatewayd_storage_models(models: ModelRegistry) -> None:
    models.add(*named(models.plugin))  # <name>_packet, _seen, _point, _window, ...; devices are the core's
    models.version = VERSION
    models.migration(2)(index_packets)  # the ledger's (device, received_at) index


# -- the plugin's state ----------------------------------------------------------------


@hookimpl
def gatewayd_setup(ctx: Ctx) -> Sentinel:
    ctx.auth.configure(require_claim=ctx.config.require_claim)  # the spec: inactive until claimed
    ctx.devices.set_offline_after(ctx.config.silence_s)  # device_offline: connectivity_lost's start
    return Sentinel(ctx)


# -- routes --------------------------------------------------------------------------


@hookimpl
def gatewayd_http_routes(ctx: Ctx) -> Blueprint:
    return DeviceRoutes(ctx).blueprint()


# -- topics --------------------------------------------------------------------------
# None: edgesentinel nodes speak HTTP only.


# -- serial --------------------------------------------------------------------------
# None.


# -- tasks ---------------------------------------------------------------------------


@hookimpl
def gatewayd_background_tasks(tasks: TaskRegistry, ctx: Ctx) -> None:
    tasks.add("retention", ctx.state.run_retention)  # dedup keys, series and raw windows by age


# -- dashboard -----------------------------------------------------------------------


@hookimpl
def gatewayd_dashboard_panels(ctx: Ctx) -> list[tuple[str, Any]]:
    return panels(ctx)  # door cycles; nodes, their last batch, active alerts, maintenance (dashboard.py)


# -- events --------------------------------------------------------------------------


@hookimpl
def gatewayd_alert_rules(ctx: Ctx) -> list[dict[str, Any]]:
    return rules(ctx.name, ctx.config)  # the spec's workflow table (workflows.py)
