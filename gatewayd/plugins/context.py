"""The typed, family-bound `PluginContext`: everything the core offers one plugin.

Each service on it is bound to the plugin's family: `ctx.events.emit(device_id, type)`
stores an event of this family, `ctx.ota.newest_for(model, version)` looks among this
family's images, `ctx.devices.get(id)` finds this family's device. None of them reaches
the gateway-wide operations (alert rules, rollouts, signing keys, other families'
devices): those are the operator's.

`PluginContext[ConfigT, StateT]` is generic in the plugin's options (`ctx.config`, an
instance of the dataclass `gatewayd_config_schema` returned) and in its own state
(`ctx.state`, whatever `gatewayd_setup` returned), so a type checker sees a wrong call:

    def gatewayd_http_routes(ctx: PluginContext[HelloConfig, Hello]) -> Blueprint: ...

docs/plugins.md's context reference is tested against this class.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import peewee
from quart import Response, has_request_context, request

from ..core.alerts.events import FamilyEvents
from ..core.devices.auth import FamilyAuth
from ..core.devices.commands import FamilyCommands
from ..core.devices.ratelimit import FamilyRateLimits
from ..core.devices.services import FamilyDevices
from ..core.http.app import AdminGuard
from ..core.live.hub import FamilyLive
from ..core.logs import StructLogger
from ..core.maintenance import PluginMaintenance
from ..core.metrics import Counter, Gauge, Metrics
from ..core.mqtt.service import PluginMQTT
from ..core.ota.family import FamilyOta
from ..core.outbox.ingest import Ingest
from ..core.storage import Storage

__all__ = ["PluginContext", "PluginHTTP", "PluginMetrics", "PluginStorage"]

T = TypeVar("T")
ConfigT = TypeVar("ConfigT")
StateT = TypeVar("StateT")


class PluginStorage:
    """`ctx.storage`: the database, through committed writes and pooled reads."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    @property
    def database(self) -> peewee.Database:
        """The peewee database the plugin's models are bound to."""
        return self._storage.database

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the writer thread and return after COMMIT.

        Acknowledge a device only after this returns. Raises `StorageFull` (answer
        507) or `StorageError` (503) when nothing was kept. For what goes upstream,
        use `ctx.ingest`, which writes the outbox rows in the same transaction.
        """
        return await self._storage.write(fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on a reader thread with its own connection."""
        return await self._storage.read(fn, *args)

    def connection(self) -> sqlite3.Connection:
        """The calling thread's SQLite connection, for prepared statements on a hot path:
        call it inside a function given to `write` (the writer's connection, inside its
        transaction) or `read`, never on the trio thread."""
        connection: sqlite3.Connection = self._storage.database.connection()  # type: ignore[no-untyped-call]
        return connection


class PluginMetrics:
    """`ctx.metrics`: counters and gauges named `gatewayd_<plugin>_<name>` in `/metrics`."""

    def __init__(self, metrics: Metrics, plugin: str) -> None:
        self._metrics = metrics
        self._prefix = f"gatewayd_{plugin}_"

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._metrics.counter(self._prefix + name, help, labels)

    def gauge(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Gauge:
        return self._metrics.gauge(self._prefix + name, help, labels)


class DashboardForms(Protocol):
    """What `ctx.http` asks of the dashboard's sessions (core/dashboard/sessions.py)."""

    def form_token(self, cookies: Mapping[str, str]) -> str | None: ...

    def form_allowed(self, headers: Any, cookies: Mapping[str, str], token: str) -> bool: ...  # headers: a Mapping or Headers


class PluginHTTP:
    """`ctx.http`: the admin token check, the dashboard's forms, and the gateway's address as devices reach it."""

    def __init__(self, admin: AdminGuard, public_url: Callable[[], str], mount: str,
                 dashboard: DashboardForms | None = None) -> None:
        self._admin = admin
        self._public_url = public_url
        self._dashboard = dashboard
        self.mount = mount
        """Where the plugin's Blueprint is mounted on the main listener (`/<name>`)."""

    def require_admin(self) -> Response | None:
        """In a route (or a WebSocket route, on its handshake): None if the request carries the admin
        token, else the core's 401/503 to return as is: `if (denied := ctx.http.require_admin()): return denied`."""
        return self._admin.check()

    def dashboard_token(self) -> str | None:
        """While a dashboard page is drawn (a panel's render): the form token of the viewer's
        session, for `<input type="hidden" name="csrf">` in a form the panel posts to the
        plugin's own route; None when the viewer has no session (a script with the admin token)."""
        if self._dashboard is None or not has_request_context():
            return None
        return self._dashboard.form_token(request.cookies)

    async def dashboard_form(self) -> dict[str, str] | None:
        """In a POST route: the fields of a form sent from a dashboard page (a live session
        cookie, the same origin, the session's form token in `csrf`; that field left out),
        else None: answer 403. A form from another site, or a stale page, is never obeyed."""
        if self._dashboard is None:
            return None
        try:
            form = await request.form
        except ValueError:
            return None
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        token = fields.pop("csrf", "")
        return fields if self._dashboard.form_allowed(request.headers, request.cookies, token) else None

    def url(self, path: str) -> str:
        """An absolute URL a device can use: `http.public_url` (or the address derived
        from `http.listen`) + `path`. Never built from the request's Host header, which
        the client chooses."""
        if not path.startswith("/"):
            raise ValueError(f"path: expected an absolute path starting with '/', got {path!r}")
        return self._public_url() + path


@dataclass(eq=False)
class PluginContext(Generic[ConfigT, StateT]):
    """Everything the core offers one plugin. Built by the runtime, one per plugin."""

    name: str
    """The plugin's name (its entry point, its `[plugins.<name>]` table, its family)."""
    config: ConfigT
    """The plugin's validated options: an instance of its `gatewayd_config_schema` dataclass."""
    gateway_id: str
    data_dir: Path
    """A folder of the plugin's own under `gateway.data_dir` (create it when needed)."""
    log: StructLogger
    """`ctx.log.info("message", key=value, ...)`: structured, with the plugin's name."""
    storage: PluginStorage
    metrics: PluginMetrics
    http: PluginHTTP
    mqtt: PluginMQTT
    """Publish as the gateway (`await ctx.mqtt.publish(topic, payload, qos=1)`, after PUBACK)."""
    devices: FamilyDevices
    """This family's devices: provision, get, list, update, claim, touch, activate, presence."""
    auth: FamilyAuth
    """Device authentication for HTTP routes, one helper per scheme; raises `AuthError`."""
    ratelimit: FamilyRateLimits
    """Token buckets: `define(cls, limit, per_s)`, `check(key, cls)`, `headers(decision)`."""
    commands: FamilyCommands
    """The durable per-device command queue: enqueue, open_for (from memory), next_for, push, ack."""
    ingest: Ingest
    """Durable ingest and the upstream outbox in one transaction: `record`, `records`."""
    events: FamilyEvents
    """This family's events: `emit` (stored, rules run) and `observe` (stored if a rule fires)."""
    ota: FamilyOta
    """This family's firmware images and its devices' OTA reports."""
    live: FamilyLive
    """Live streams `<family>.<kind>.<device>`: `publish` after a commit; `subscribe` for a route of its own."""
    maintenance: PluginMaintenance
    """The operator's maintenance switch (`gatewayd maintenance on|off`): `active`, `state`."""
    clock: Callable[[], float] = field(default=time.time)
    _state: Any = field(default=None, repr=False)

    @property
    def mount(self) -> str:
        """Where the plugin's Blueprint is mounted on the main listener (`/<name>`)."""
        return self.http.mount

    @property
    def state(self) -> StateT:
        """What the plugin's `gatewayd_setup(ctx)` returned: its own state, built once."""
        if self._state is None:
            raise RuntimeError(f"plugin {self.name!r}: ctx.state is unset (gatewayd_setup returned nothing)")
        return self._state  # type: ignore[no-any-return]

    def now(self) -> float:
        """Wall-clock seconds since the epoch (the gateway's clock; tests replace it)."""
        return self.clock()
