"""What a plugin imports: `hookimpl`, `PluginContext` and the registries.

A plugin is a module (or object) registered under the `gatewayd.plugins` entry-point
group. A minimal one::

    # gatewayd_hello/__init__.py
    from dataclasses import dataclass
    from quart import Blueprint
    from gatewayd.plugins.api import hookimpl, PluginContext

    @dataclass
    class HelloConfig:
        greeting: str = "hello"

    @hookimpl
    def gatewayd_config_schema():
        return HelloConfig

    @hookimpl
    def gatewayd_http_routes(ctx: PluginContext):
        bp = Blueprint("hello", __name__)

        @bp.get("/")
        async def index():
            return {"greeting": ctx.config.greeting}

        return bp

    # pyproject.toml
    # [project.entry-points."gatewayd.plugins"]
    # hello = "gatewayd_hello"

A plugin talks to the core only through its `PluginContext`; it never imports
`gatewayd.core` or another plugin.
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import peewee
import pluggy

from ..core.devices.registry import ClaimError, DeviceExists
from ..core.http.body import read_json_object
from ..core.logs import StructLogger
from ..core.metrics import Counter, Gauge, Metrics
from ..core.mqtt.service import InboundMessage, MQTTUnavailable, Rejected, TopicRegistry
from ..core.outbox.ingest import Ingested, IngestError, Record
from ..core.schema import ConfigError
from ..core.serial.link import SerialSettings
from ..core.storage import StorageError, StorageFull
from ..protocol.strict_json import MAX_JSON_DEPTH, BadJSON, parse_json
from .hookspecs import PROJECT

if TYPE_CHECKING:
    from ..core.storage import Storage

__all__ = [
    "hookimpl",
    "PluginContext",
    "PluginStorage",
    "PluginMetrics",
    "ModelRegistry",
    "TaskRegistry",
    "CommandRegistry",
    "SerialRegistry",
    "TopicRegistry",
    "InboundMessage",
    "Rejected",
    "MQTTUnavailable",
    "DeviceExists",
    "ClaimError",
    "SerialSettings",
    "ConfigError",
    "IngestError",
    "Ingested",
    "Record",
    "StorageError",
    "StorageFull",
    "BadJSON",
    "parse_json",
    "read_json_object",
    "MAX_JSON_DEPTH",
]

hookimpl = pluggy.HookimplMarker(PROJECT)
T = TypeVar("T")


class PluginStorage:
    """A plugin's door to the database: committed writes and pooled reads."""

    def __init__(self, storage: Storage):
        self._storage = storage

    @property
    def database(self) -> peewee.Database:
        """The peewee database the plugin's models are bound to."""
        return self._storage.database

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the writer thread and return after COMMIT.

        Acknowledge a device only after this returns. Raises `StorageFull` (answer
        507/503) or `StorageError` when nothing was kept.
        """
        return await self._storage.write(fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on a reader thread with its own connection."""
        return await self._storage.read(fn, *args)


class PluginMetrics:
    """Counters and gauges named `gatewayd_<plugin>_<name>`."""

    def __init__(self, metrics: Metrics, plugin: str):
        self._metrics = metrics
        self._prefix = f"gatewayd_{plugin}_"

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._metrics.counter(self._prefix + name, help, labels)

    def gauge(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Gauge:
        return self._metrics.gauge(self._prefix + name, help, labels)


@dataclass
class PluginContext:
    """Everything the core offers one plugin. Created by the runtime, one per plugin."""

    name: str
    config: Any
    """The plugin's validated options (an instance of its schema dataclass), or None."""
    mount: str
    """Where the plugin's Blueprint is mounted on the main listener (`/<name>`)."""
    gateway_id: str
    data_dir: Path
    """A folder of the plugin's own under `gateway.data_dir` (created on demand)."""
    log: StructLogger
    storage: PluginStorage
    metrics: PluginMetrics
    clock: Callable[[], float] = field(default=time.time)
    extras: dict[str, Any] = field(default_factory=dict)
    mqtt: Any = None
    """Publish as the gateway: `await ctx.mqtt.publish(topic, payload, qos=1, retain=False)`
    (returns after PUBACK for QoS 1); `ctx.mqtt.connected`. Raises MQTTUnavailable when off."""
    devices: Any = None
    """The device registry for this family: provision/get/list/update/claim/touch (docs/devices.md)."""
    auth: Any = None
    """Device authentication helpers, one per scheme; raise `AuthError` (docs/devices.md)."""
    ratelimit: Any = None
    """Token-bucket rate limits: `define(cls, limit, per_s)`, `check(key, cls)`, `headers(decision)`."""
    commands: Any = None
    """The durable per-device command queue: enqueue/next_for/push/ack."""
    ingest: Any = None
    """Durable ingest + upstream outbox: `await ctx.ingest.record(device, kind, data, cls=...,
    family_rows=...)` / `records([...])`; returns after COMMIT (gatewayd/core/outbox/ingest.py)."""
    events: Any = None
    """The event bus: `await ctx.events.emit(family, device_id, type, data, severity=...,
    duration_s=..., resolved=..., ts=...)` stores an event and runs the alert rules;
    `await ctx.events.observe(...)` runs a reading through the rules and stores it only
    if one fires (docs/events.md)."""
    ota: Any = None
    """The firmware store: `await ctx.ota.newest_for(family, model, current_version, channel,
    device_id)`, `await ctx.ota.response(fw)` (resumable download), `await ctx.ota.report(
    family, device_id, status, version=...)` (docs/ota.md)."""
    admin_check: Callable[[], Any] | None = None
    """Set by the runtime; plugins call `require_admin()`."""

    def require_admin(self) -> Any:
        """In a route: None if the request carries the admin token, else the core's
        401/503 error response to return as is (`if (denied := ctx.require_admin()): return denied`)."""
        if self.admin_check is None:
            raise RuntimeError("no admin check: this context was not built by the gateway runtime")
        return self.admin_check()

    def now(self) -> float:
        """Wall-clock seconds since the epoch (the gateway's clock; tests replace it)."""
        return self.clock()


class ModelRegistry:
    """Collects a plugin's models, schema version and migrations."""

    def __init__(self, plugin: str):
        self.plugin = plugin
        self.models: list[type[peewee.Model]] = []
        self.version = 1
        self.migrations: dict[int, Callable] = {}

    def add(self, *models: type[peewee.Model]) -> None:
        """Register models; each `Meta.table_name` must start with `<plugin>_`."""
        for model in models:
            table = model._meta.table_name
            if not table.startswith(f"{self.plugin}_"):
                raise ValueError(
                    f"plugin {self.plugin!r}: model {model.__name__} has table {table!r}; "
                    f"plugin tables must be named '{self.plugin}_...' (set Meta.table_name)"
                )
            self.models.append(model)

    def migration(self, version: int) -> Callable[[Callable], Callable]:
        """Decorator: `fn(migrator, database)` upgrades schema `version - 1` to `version`."""

        def register(fn: Callable) -> Callable:
            self.migrations[version] = fn
            return fn

        return register


@dataclass
class _Task:
    name: str
    fn: Callable[..., Awaitable[Any]]
    args: tuple


class TaskRegistry:
    """Collects a plugin's supervised background tasks."""

    def __init__(self) -> None:
        self.tasks: list[_Task] = []

    def add(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `await fn(*args)` for the life of the gateway, restarted if it crashes."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"task {name!r}: expected an async function, got {fn!r}")
        self.tasks.append(_Task(name, fn, args))


@dataclass
class _Link:
    name: str
    settings: SerialSettings
    handler: Callable[[bytes, Any], Awaitable[None]]


class SerialRegistry:
    """Collects a plugin's serial lines."""

    def __init__(self, plugin: str):
        self.plugin = plugin
        self.links: list[_Link] = []

    def add(self, name: str, settings: SerialSettings, handler: Callable[[bytes, Any], Awaitable[None]]) -> None:
        """Open `settings.port` and call `await handler(frame, link)` for every frame."""
        if not isinstance(settings, SerialSettings):
            raise TypeError(f"serial link {name!r}: expected SerialSettings, got {type(settings).__name__}")
        if any(link.name == name for link in self.links):
            raise ValueError(f"serial link {name!r} declared twice")
        self.links.append(_Link(name, settings, handler))


@dataclass
class _Command:
    name: str
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[..., int | None]


class CommandRegistry:
    """Collects a plugin's `gatewayd <plugin> <command>` subcommands."""

    def __init__(self, plugin: str):
        self.plugin = plugin
        self.commands: list[_Command] = []

    def add(
        self,
        name: str,
        help: str,
        setup: Callable[[argparse.ArgumentParser], None],
        run: Callable[..., int | None],
    ) -> None:
        """Register `gatewayd <plugin> <name>`.

        `setup(parser)` adds arguments. `run(args)` or `run(args, cli)` does the work
        and returns an exit status; `cli.config` is the loaded gateway config and
        `cli.open_storage()` opens the database for commands that need it.
        """
        self.commands.append(_Command(name, help, setup, run))
