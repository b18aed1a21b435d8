"""Every hook a gatewayd plugin can implement.

All hooks are prefixed `gatewayd_` so that the manager can tell a misspelled hook from
an ordinary function and refuse it at startup instead of silently never calling it.

Hooks that concern one plugin (its config schema, models, routes, tasks, startup) are
called by the runtime *per plugin*, each with that plugin's own `PluginContext`, through
pluggy (`PluginManager` calls a per-plugin subset of `pm.hook`), so `tryfirst`,
`trylast`, wrappers and `firstresult` behave as pluggy documents; a plugin that raises
from one of them is marked failed in `/health` and the others run on. Hooks marked
`firstresult` take the first non-None answer of the plugin's implementations. Async
hooks may be written `async def` or plain `def`; the runtime awaits what is awaitable.

The order the runtime calls them in, which is also the order a plugin module reads in:
config_schema, storage_models, setup, http_routes, mqtt_topics, serial_links,
alert_rules, startup, background_tasks, ..., shutdown (cli_commands: when the command
line is built; the dashboard hooks: when a page of the site dashboard is drawn).

Documented with examples in docs/plugins.md; tests/test_docs.py keeps the two in step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from markupsafe import Markup
    from quart import Blueprint

    from ..core.devices.registry import Device
    from .context import PluginContext
    from .registries import CommandRegistry, ModelRegistry, SerialRegistry, TaskRegistry, TopicRegistry

    Renderer = Callable[[], Awaitable[str | Markup]]

PROJECT = "gatewayd"
hookspec = pluggy.HookspecMarker(PROJECT)


# -- configuration ---------------------------------------------------------------


@hookspec(firstresult=True)
def gatewayd_config_schema() -> type | None:
    """Return the dataclass describing this plugin's `[plugins.<name>]` options.

    Called once per plugin while the configuration is loaded, before anything starts
    (also by `gatewayd check-config`). The table's keys are checked against the
    dataclass fields (types, unknown keys with a did-you-mean, a `validate()` method
    for cross-field rules); the resulting object is `ctx.config`. The keys `enabled`,
    `mount` and `listen` belong to the core and are not part of the schema. Return
    None (or don't implement the hook) for a plugin without options.
    """


# -- storage ---------------------------------------------------------------------


@hookspec
def gatewayd_storage_models(models: ModelRegistry) -> None:
    """Declare the plugin's peewee models, their schema version and migrations.

    Called once per plugin when storage opens, before any route or task runs. Call
    `models.add(Model, ...)`; each model's `table_name` must start with `<plugin>_`.
    Set `models.version` and register upgrade steps with `@models.migration(N)` so an
    upgrade never loses data. Tables are created or migrated in one transaction.
    """


# -- the plugin's own state -------------------------------------------------------


@hookspec(firstresult=True)
def gatewayd_setup(ctx: PluginContext[Any, Any]) -> Any:
    """Build the plugin's own state once; what it returns is `ctx.state`.

    Called once per plugin right after its context is built (storage is open; MQTT,
    HTTP and serial are not started yet), before every other hook that takes `ctx`.
    Return an object of the plugin's own (handlers, caches, counters) instead of keeping
    module globals: hooks then reach it typed, as `ctx.state` of a
    `PluginContext[Config, State]`. Return None (or don't implement it) when the plugin
    keeps no state; `ctx.state` then raises. If it raises, the plugin is marked failed.
    """


# -- HTTP ------------------------------------------------------------------------


@hookspec(firstresult=True)
def gatewayd_http_routes(ctx: PluginContext[Any, Any]) -> Blueprint | None:
    """Return a Quart Blueprint with the plugin's HTTP routes, or None.

    Called once per plugin before the HTTP server starts. The core mounts the
    Blueprint under `plugins.<name>.mount` (default `/<name>`) and, when
    `plugins.<name>.listen` is set, also serves it at `/` on a listener of its own so
    firmware with fixed paths works unchanged. The plugin keeps its family's error
    shape by registering error handlers on its Blueprint. While the plugin is failed,
    its routes answer 503.
    """


# -- life cycle ------------------------------------------------------------------


@hookspec
def gatewayd_startup(ctx: PluginContext[Any, Any]) -> Any:
    """Prepare the plugin once storage, MQTT and HTTP are up (may be async).

    Called once per plugin, in plugin order, before its background tasks start. If it
    raises, the plugin is marked failed with the reason (see `/health`), its tasks are
    not started, and every other plugin runs on.
    """


@hookspec
def gatewayd_background_tasks(tasks: TaskRegistry, ctx: PluginContext[Any, Any]) -> None:
    """Declare long-running async tasks with `tasks.add(name, async_fn, *args)`.

    Called once per plugin after its startup succeeded. Each task is supervised: if it
    raises, it is logged, counted in `gatewayd_plugin_task_restarts_total`, and started
    again after an exponential backoff (1 s doubling to 60 s). A task that returns is
    finished and not restarted. Tasks are cancelled at shutdown.
    """


@hookspec
def gatewayd_shutdown(ctx: PluginContext[Any, Any]) -> Any:
    """Release what startup took (may be async); called once at graceful shutdown.

    Called after the HTTP servers stopped accepting and in-flight requests finished,
    before background tasks are cancelled and storage is drained. Bounded by
    `gateway.shutdown_grace_s`; exceptions are logged and ignored.
    """


# -- events and alerts -----------------------------------------------------------


@hookspec
def gatewayd_alert_rules(ctx: PluginContext[Any, Any]) -> list[dict[str, Any]] | None:
    """Return the plugin's default alert rules: a list of rule tables (dicts), or None.

    Called once per plugin after its context is built, before its startup hook. Each
    dict has the keys of a `[[rules]]` table (docs/events.md): `name`, matchers
    (`type`, `severity`, `when`, `min_duration_s`, `more_than`/`within_s`,
    `outside_hours`, `absent_for_s`, ...), `actions` and optionally `escalate`;
    `family` defaults to the plugin's name. Rules are checked like the config's; an
    invalid one marks the plugin failed with the key and reason. A `[[rules]]` table
    in gatewayd.toml with the same `name` replaces the plugin's rule (`enabled =
    false` switches it off), so operators keep the last word.
    """


# -- MQTT --------------------------------------------------------------------------


@hookspec
def gatewayd_mqtt_topics(topics: TopicRegistry, ctx: PluginContext[Any, Any]) -> None:
    """Subscribe to MQTT topics and declare the ACLs of the family's device accounts.

    Called once per plugin before the broker and the MQTT client start.
    `topics.subscribe(filter, handler, qos=1)` routes matching messages to
    `await handler(msg)` (`msg.topic`, `msg.payload`, `msg.qos`, `msg.retain`,
    `msg.dup`, `msg.sender`); the message is acknowledged (PUBACK) only when the handler
    returns, so return after the data is committed. Raise `Rejected(reason)` for bad
    input: it is acked (a poison message must not come back), counted and kept with the
    reason; any other exception is treated the same way and logged as a handler error,
    except `StorageFull`/`StorageUnavailable`, which leave it unacknowledged and tried
    again until storage takes it (docs/mqtt.md).
    `topics.acl(pattern, access)` adds a mosquitto ACL pattern (`%u` = the device's
    username, its device id) that every device account of the family gets on the
    managed broker. Publish with `ctx.mqtt.publish(topic, payload, qos, retain)`.
    """


# -- commands --------------------------------------------------------------------


@hookspec(firstresult=True)
def gatewayd_check_command(payload: Any) -> Any:
    """Check a command queued for one of the family's devices; return what to store.

    Called before a command for a device of this plugin's family is stored, whoever
    queues it: the admin API (`POST /api/gateway/devices/<id>/commands`), `gatewayd
    devices command`, the plugin's own `ctx.commands.enqueue`. Raise `ValueError` with
    a message that names the field (`brightness_level: expected an integer 0-100`):
    nothing is stored, the API answers 400 with it, the CLI prints it and exits 1.
    Return the payload to store (normalised: defaults filled in), or None to store it
    as given. Called without a context, since the CLI calls it where no gateway runs:
    check the command against the family's specification only. Runs on the trio
    thread: keep it quick, no I/O.
    """


# -- serial links ----------------------------------------------------------------


@hookspec
def gatewayd_serial_links(links: SerialRegistry, ctx: PluginContext[Any, Any]) -> None:
    """Declare serial lines with `links.add(name, settings, handler)`.

    Called once per plugin after its HTTP routes, before its startup hook. `settings`
    is a `SerialSettings` (port or URL, baud rate, framing, CRC, timeouts); put them in
    the plugin's config schema so a site sets the port in gatewayd.toml. The core
    opens each line, reopens it with backoff when it disappears, decodes frames and
    calls `await handler(frame: bytes, link)` for each, in order; `link.send(payload)`
    answers and `link.request(payload, match=..., timeout=...)` polls a device. A
    handler that raises is counted and logged and never closes the line. Each line's
    state is in `/health` (`serial.<plugin>.<name>`) and its counters in `/metrics`.
    """


# -- the site dashboard ------------------------------------------------------------


@hookspec
def gatewayd_device_health(ctx: PluginContext[Any, Any], device: Device) -> Any:
    """Return the family's health indicator of one device (may be async).

    One of "green", "yellow", "red", "gray", or a pair `(colour, reason)` whose reason
    (a short text, shown escaped) says why: `("red", "lamp failure")`. Return None to
    say nothing. The family's rules live here, not in the core (streetlight: red on a
    lamp fault, yellow on a low battery, gray when it was never heard from); the core
    shows gray with no reason when the plugin says nothing, is failed, raises (logged)
    or answers something else (logged). Called for every device of the family each
    time a dashboard page that lists it is drawn (the overview redraws its device
    tables when live events arrive): keep it cheap, from memory or one indexed read.
    Not firstresult: the first non-None answer of the plugin's implementations, each
    awaited, in pluggy's order.
    """


@hookspec
def gatewayd_device_telemetry(ctx: PluginContext[Any, Any], device: Device, limit: int) -> Any:
    """Return a device's recent readings for the dashboard's charts (may be async).

    A list of `(ts, values)` pairs, `ts` in epoch seconds and `values` a mapping of
    series name to number: `[(1767225600.0, {"temp_c": 21.5, "rssi": -61})]`, at most
    `limit` of them, the newest ones (in any order: the core sorts them). Values that
    are not finite numbers (text, booleans, NaN) are left out of the chart. The device
    page charts up to `limit` = 200 readings, one small chart per series; the overview
    shows the newest reading (`limit` = 1) of every device. Return None or [] when
    there is nothing to show. Read the family's own tables (`ctx.storage.read`); a
    plugin that raises gets "no telemetry" shown and the error logged.
    Not firstresult: the lists of the plugin's implementations are joined.
    """


@hookspec
def gatewayd_dashboard_panels(ctx: PluginContext[Any, Any]) -> list[tuple[str, Renderer]] | None:
    """Return panels for the dashboard's overview: a list of `(title, render)` pairs.

    Called once per plugin when the HTTP server starts. `render` is an async function
    of no arguments called each time the overview is drawn; it returns the panel's
    body. A plain `str` is shown as text (escaped); only a `markupsafe.Markup` is taken
    as HTML, so build one with `Markup("<b>{}</b>").format(value)`, which escapes
    `value`, never by concatenating text into HTML. The title is always escaped. A
    render that raises shows an error line in its panel (and is logged); a failed
    plugin's panels are not drawn. Not firstresult: the lists are joined, in order.
    """


# -- command line ----------------------------------------------------------------


@hookspec
def gatewayd_cli_commands(commands: CommandRegistry) -> None:
    """Add `gatewayd <plugin> <command>` subcommands with `commands.add(...)`.

    Called when the command line is built, whether or not the daemon runs and whether
    or not the plugin is enabled in the config. See `CommandRegistry.add`.
    """
