"""The Gateway: the one place where services are built and wired; start order, shutdown.

Every service gets its collaborators in its constructor, here (`Gateway.__init__`);
blueprints get the services they use. Start order in `run`, each step ready before the
next (`nursery.start`):

1. storage: open the database, create/migrate core and plugin tables
2. notifications and events (the rule timer), device services (presence, command expiry)
3. plugin contexts; plugins declare MQTT topics and ACLs
4. MQTT: the delivery pool, the managed mosquitto (with every device account), the
   gateway's client, then the device-facing edge
5. HTTP listeners (main, and a plugin's own when `plugins.<name>.listen` is set)
6. serial links
7. plugin startup hooks, then their supervised background tasks
8. upstream sync workers

Shutdown (SIGTERM/SIGINT, or `request_shutdown()`): HTTP and MQTT stop accepting and
in-flight requests and deliveries finish within `gateway.shutdown_grace_s`, plugin
shutdown hooks run, tasks are cancelled, then the services that use storage (MQTT,
notifications, events, presence, backups) stop and finish, and only then the writer
commits every queued write and storage closes.
"""

from __future__ import annotations

import ctypes
import gc
import os
import random
import resource
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from ..plugins.context import PluginContext, PluginHTTP, PluginMetrics, PluginStorage
from ..plugins.manager import PluginManager
from .alerts.events import EVENTS_SCHEMA, EventBus, FamilyEvents
from .alerts.http import events_blueprint
from .alerts.notify import NOTIFY_SCHEMA, Notifier
from .alerts.rules import Rule, merge_rules, rule_from_dict
from .backup import Backups
from .config import Config
from .dashboard import DashboardSessions, DashboardSources, PluginViews, dashboard_blueprint
from .devices.http import admin_blueprint
from .devices.services import DeviceServices
from .health import ComponentState, Health
from .. import __version__
from .admission import Admission
from .http.app import AdminGuard, core_blueprint, create_app, guard_plugin
from .http.openapi import ApiDocs
from .http.serve import serve_app
from .http.tokens import TOKEN_SCHEMA, TokenStore
from .http.urls import PublicUrl
from .live.access import LiveAccess
from .live.frames import abort_stalled_writes
from .live.http import live_blueprint
from .live.hub import FamilyLive, LiveHub
from .logs import get_logger
from .maintenance import Maintenance, PluginMaintenance, maintenance_blueprint
from .metrics import Metrics, Sample
from .mqtt.service import MQTTService
from .ota.http import firmware_blueprint
from .ota.signing import SiteKey, load_public_keys
from .ota.family import FamilyOta
from .ota.store import OTA_SCHEMA, OtaStore
from .outbox.ingest import Ingest
from .outbox.store import Outbox
from .schema import ConfigErrors
from .serial.links import SerialLinks
from .sdnotify import SystemdNotifier
from .storage import SchemaSpec, Storage
from .tls import SiteTls, TlsError
from .upstream.service import Upstream

__all__ = ["Gateway", "ListenError", "core_schema_versions", "find_exception", "run_until_signalled", "tune_gc",
           "tune_gc_for"]

log = get_logger("gatewayd.runtime")

RESTART_MIN_S = 1.0
RESTART_MAX_S = 60.0
# A task that ran this long before crashing is considered healthy again: backoff resets.
RESTART_RESET_S = 300.0


class ListenError(Exception):
    """A listener could not bind (address in use, permission denied)."""


def find_exception(exc: BaseException, cls: type[BaseException]) -> BaseException | None:
    """The first `cls` inside `exc`, looking through (nested) exception groups."""
    if isinstance(exc, cls):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_exception(inner, cls)
            if found is not None:
                return found
    return None



def core_schema_versions() -> dict[str, int]:
    """The schema version of each core component this release installs (`core_schema`'s
    rows; the doctor compares a database with them)."""
    from .devices.commands import COMMAND_SCHEMA
    from .devices.registry import DEVICE_SCHEMA
    from .maintenance import MAINTENANCE_SCHEMA
    from .mqtt.service import REJECTED_SCHEMA
    from .outbox.tables import SCHEMA as OUTBOX_SCHEMA

    specs = (DEVICE_SCHEMA, COMMAND_SCHEMA, OUTBOX_SCHEMA, MAINTENANCE_SCHEMA, EVENTS_SCHEMA, NOTIFY_SCHEMA,
             OTA_SCHEMA, TOKEN_SCHEMA, REJECTED_SCHEMA)
    return {spec.component: spec.version for spec in specs}

class Gateway:
    """The running daemon. `await nursery.start(gateway.run)` in tests, or use the CLI."""

    def __init__(self, config: Config, plugins: PluginManager, *, clock: Callable[[], float] = time.time):
        self.config = config
        self.plugins = plugins
        self.clock = clock
        self.log = log
        self.metrics = Metrics()
        self.health = Health()
        self.storage = Storage(
            config.data_dir / "gatewayd.sqlite3",
            synchronous=config.storage.synchronous,
            group_commit_ms=config.storage.group_commit_ms,
            group_commit_max=config.storage.group_commit_max,
            readers=config.storage.readers,
        )
        self.outbox = Outbox.from_config(self.storage, config, clock=clock)
        self.backups = Backups.from_config(config, self.storage.path, self.health, self.metrics, clock=clock)
        self.storage.migration_backup_dir = self.backups.directory  # the copy taken before a schema migration
        self.storage.migration_backup_apart_from = self.backups.apart_from  # backup.require_mount
        self.storage.migration_backup_keep = config.backup.keep_pre_upgrade
        n = config.notifications
        self.notifier = Notifier(
            self.storage, gateway_id=config.gateway.id, clock=clock, max_attempts=n.max_attempts,
            backoff_base_s=n.backoff_base_s, backoff_max_s=n.backoff_max_s, timeout_s=n.timeout_s, smtp=n.smtp,
            metrics=self.metrics, publish_mqtt=self._publish_mqtt, forward_upstream=self._forward_alert,
        )
        self.events = EventBus(self.storage, rules=config.rules, notifier=self.notifier, clock=clock,
                               metrics=self.metrics)
        self.devices = DeviceServices(config, self.storage, self.metrics, clock=clock, emit=self.events.emit,
                                      on_credentials_changed=self._credentials_changed, publish=self._publish_command,
                                      check_command=self._check_command)
        self.tls = SiteTls.from_config(config)  # [tls]: the certificate the listeners serve
        self.tls.register(self.health, self.metrics, clock)
        self.mqtt = MQTTService(config, self.storage, self.metrics, self.health, self.devices, self.tls)
        # The address devices reach the main listener at; resolved at the first URL handed
        # out, by then the listener is bound (port 0 included).
        self.public_url = PublicUrl(config.http.public_url, config.http.listen, lambda: self.http_urls.get("main", []))
        self.ota = OtaStore(
            self.storage, config.data_dir / "firmware", clock=clock, events=self.events,
            trusted_keys=self._trusted_keys(), require_signed=config.ota.require_signed,
            default_rollout=config.ota.rollout, site_key=SiteKey(config.data_dir),
            sign_by_default=config.ota.sign_with_site_key, public_url=self.public_url,
        )
        self.upstream = Upstream(config, self.outbox, self.metrics, self.health, clock=clock)
        self.serial = SerialLinks(self.metrics, self.health)
        self.admin = AdminGuard(config.http.admin_token_env)
        self.maintenance = Maintenance(self.storage, clock=clock)
        self.tokens = TokenStore(self.storage, clock=clock)
        self.sessions = DashboardSessions(self.admin)  # the site dashboard's log-ins (in memory)
        self.live_access = LiveAccess(self.admin, self.tokens, self.sessions.live_owner)
        lv = config.live
        self.live = LiveHub(ring_size=lv.ring_size, queue_size=lv.queue_size, max_subscribers=lv.max_subscribers,
                            per_owner=lv.per_token, batch_s=lv.batch_ms / 1000,
                            writes_per_s=lv.writes_per_s, clock=clock)
        self.contexts: dict[str, PluginContext] = {}
        self.failed: dict[str, str] = {}
        self.http_urls: dict[str, list[str]] = {}
        h = config.http
        #: One for every listener (they share the CPU); None: `[http] max_handlers = 0`.
        self.admission = Admission(h.max_handlers, h.handler_hold_s) if h.max_handlers else None
        self.started_at: float | None = None
        self._shutdown = trio.Event()
        self._stop_http = trio.Event()
        self._servers_done: list[trio.Event] = []
        self._restarts = self.metrics.counter(
            "gatewayd_plugin_task_restarts_total", "Plugin background tasks restarted after a crash", ("plugin", "task")
        )
        self._register_core_metrics()

    # -- public ------------------------------------------------------------------

    @property
    def enabled_plugins(self) -> list[str]:
        return [
            n for n in self.plugins.names
            if self.plugins.is_loaded(n) and self.config.plugins.get(n) is not None and self.config.plugins[n].enabled
        ]

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._shutdown.set()

    def plugin_table(self) -> list[dict[str, Any]]:
        """Name, version, enabled, state and reason of every installed plugin."""
        rows = []
        for name in self.plugins.names:
            info = self.plugins.infos[name]
            settings = self.config.plugins.get(name)
            enabled = bool(settings and settings.enabled)
            state = self.health.plugins.get(name)
            rows.append({
                "name": name,
                "version": info.version,
                "enabled": enabled,
                "state": state.state if state else ("failed" if info.load_error else "disabled"),
                "reason": (state.reason if state else info.load_error),
                "mount": settings.mount if settings else None,
            })
        return rows

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start everything, report started, and run until `request_shutdown()`."""
        self.started_at = self.clock()
        try:
            await trio.to_thread.run_sync(self.tls.recover)  # a renewal a crash interrupted (logged)
            self.tls.load()  # a missing certificate is named before anything starts
        except TlsError as e:
            raise ListenError(str(e)) from None
        for name in self.plugins.names:
            if self.plugins.infos[name].load_error:
                self.failed[name] = self.plugins.infos[name].load_error
                self.health.set_plugin(name, "failed", self.failed[name])
            elif name not in self.enabled_plugins:
                self.health.set_plugin(name, "disabled")
        async with trio.open_nursery() as core:
            self.health.set("storage", "starting")
            await core.start(self.storage.run)
            self.health.probe("storage", self.storage.health_state)  # "full" while writes fail for lack of space
            await self._install_schemas()
            # Everything that uses storage runs in `services`, stopped (and done: the
            # presence's last flush, a notification's read on a reader thread) before
            # storage closes, so no service finds it closed under its feet at a clean stop.
            async with trio.open_nursery() as services:
                self.health.probe("maintenance", self._maintenance_health)
                await services.start(self.maintenance.run)
                await services.start(self.notifier.run)
                await services.start(self.events.run)
                await services.start(self.devices.run)
                await services.start(self.backups.run)  # [backup]: the daemon's own, checked copies
                self._build_contexts()
                self._collect_topics()
                try:
                    await self.mqtt.start(services)
                except (OSError, BaseExceptionGroup) as e:
                    error = find_exception(e, OSError)
                    if error is None:
                        raise
                    where = f"{self.config.mqtt.listen} (mqtt.listen)"
                    if self.config.tls.mqtt_listen is not None:
                        where += f" or {self.config.tls.mqtt_listen} (tls.mqtt_listen)"
                    raise ListenError(f"cannot listen on {where}: {error.strerror or error}") from None
                async with trio.open_nursery() as front:
                    self._load_alert_rules()
                    await self._start_http(front)
                    await self._start_serial(front)
                    await self._start_plugins(front)
                    await front.start(self.upstream.run)  # the sync workers, last
                    log.info(
                        "gateway started",
                        id=self.config.gateway.id,
                        http=" ".join(u for urls in self.http_urls.values() for u in urls),
                        plugins=",".join(self.enabled_plugins) or "none",
                        startup_s=round(self.clock() - self.started_at, 3),
                    )
                    task_status.started(self)
                    await self._shutdown.wait()
                    await self._stop(front)
                services.cancel_scope.cancel()
            core.cancel_scope.cancel()
        log.info("gateway stopped", commits=self.storage.stats["commits"])

    # -- what the services ask of each other (wired here, at construction) ----------

    async def _publish_mqtt(self, topic: str, payload: bytes, qos: int) -> None:
        await self.mqtt.publish(topic, payload, qos=qos)  # alert actions of kind "mqtt"

    async def _publish_command(self, topic: str, payload: bytes) -> None:
        await self.mqtt.publish(topic, payload, qos=1)  # commands pushed to devices

    def _check_command(self, family: str, payload: Any) -> Any:
        # The family's plugin, if it runs, checks what is queued for its devices.
        if family not in self.enabled_plugins or family in self.failed:
            return payload
        return self.plugins.check_command(family, payload)

    async def _credentials_changed(self, family: str) -> None:
        await self.mqtt.credentials_changed(family)  # the managed broker's accounts follow

    async def _forward_alert(self, record: dict[str, Any]) -> None:
        ingest = Ingest(self.outbox, record.get("family") or "gateway", self.clock)
        await ingest.record(record.get("device_id") or "-", "alert", record, cls="alert")

    def _maintenance_health(self) -> ComponentState:
        # Maintenance is the operator's choice, not a failure: /health stays 200 ("off" and
        # "ok" are healthy states) and says so.
        state = self.maintenance.state
        if not state.active:
            return ComponentState("off")
        return ComponentState("ok", state.reason or "maintenance mode", {"maintenance": True, "since": state.since})

    def _trusted_keys(self) -> list[Any]:
        keys, errors = load_public_keys(self.config.ota.trusted_keys,
                                        self.config.source.parent if self.config.source else None)
        for error in errors:
            self.health.set("ota", "failed", f"ota.trusted_keys: {error}")
            log.error("cannot load a trusted firmware key", key="ota.trusted_keys", error=error)
        return keys

    # -- start-up ----------------------------------------------------------------

    def _live_plugins(self) -> list[str]:
        """Enabled plugins that have not failed (yet)."""
        return [n for n in self.enabled_plugins if n not in self.failed]

    @contextmanager
    def _plugin_step(self, name: str, what: str) -> Iterator[None]:
        """A plugin's part in a start-up step: if it raises, that plugin fails, the rest go on."""
        try:
            yield
        except Exception as e:
            self._fail(name, f"{what}: {e}", e)

    async def _install_schemas(self) -> None:
        await trio.to_thread.run_sync(self.devices.install)
        await self.outbox.open()
        await trio.to_thread.run_sync(self.maintenance.install)
        for spec in (EVENTS_SCHEMA, NOTIFY_SCHEMA, OTA_SCHEMA, TOKEN_SCHEMA):
            await trio.to_thread.run_sync(self.storage.install, spec)
        for name in self._live_plugins():
            with self._plugin_step(name, "storage models"):
                registry = self.plugins.storage_models(name)
                if registry.models:
                    spec = SchemaSpec(name, registry.models, registry.version, registry.migrations)
                    await trio.to_thread.run_sync(self.storage.install, spec)

    def _build_contexts(self) -> None:
        """Each plugin's context, every service bound to its family; then its own state."""
        for name in self._live_plugins():
            settings = self.config.plugins[name]
            self.contexts[name] = ctx = PluginContext(
                name=name,
                config=settings.options,
                gateway_id=self.config.gateway.id,
                data_dir=self.config.data_dir / "plugins" / name,
                log=get_logger(f"gatewayd.plugin.{name}"),
                storage=PluginStorage(self.storage),
                metrics=PluginMetrics(self.metrics, name),
                http=PluginHTTP(self.admin, self.public_url, settings.mount, self.sessions),
                mqtt=self.mqtt.facade(),
                **self.devices.context_fields(name),
                ingest=Ingest(self.outbox, name, self.clock),
                events=FamilyEvents(self.events, name),
                ota=FamilyOta(self.ota, name),
                live=FamilyLive(self.live, name, self.live_access),
                maintenance=PluginMaintenance(self.maintenance),
                clock=self.clock,
            )
            with self._plugin_step(name, "setup"):
                ctx._state = self.plugins.setup(name, ctx)

    def _collect_topics(self) -> None:
        for name in self._live_plugins():
            with self._plugin_step(name, "mqtt topics"):
                topics = self.plugins.mqtt_topics(name, self.contexts[name])
                self.mqtt.add(name, [(s.filter, s.handler, s.qos) for s in topics.subscriptions], topics.acls)

    def _load_alert_rules(self) -> None:
        """Every plugin's default rules, with the config's `[[rules]]` merged over them."""
        plugin_rules: list[Rule] = []
        for name in self._live_plugins():
            with self._plugin_step(name, "alert rules"):
                try:
                    raw = self.plugins.alert_rules(name, self.contexts[name])
                    plugin_rules += [rule_from_dict(r, f"plugins.{name}.alert_rules[{i}]", source=f"plugin:{name}",
                                                    family=name) for i, r in enumerate(raw)]
                except ConfigErrors as e:
                    raise ValueError("; ".join(str(x) for x in e.errors)) from None
        rules = merge_rules(plugin_rules, self.config.rules)
        self.events.set_rules(rules)
        log.info("alert rules loaded", rules=len(rules), from_plugins=len(plugin_rules),
                 from_config=len(self.config.rules))

    async def _start_http(self, nursery: trio.Nursery) -> None:
        h = self.config.http
        app = create_app("gatewayd", max_body_bytes=h.max_body_bytes, log=self.log)
        app.register_blueprint(core_blueprint(self.health, self.metrics, self.admin, self.plugin_table))
        app.register_blueprint(admin_blueprint(self.devices, self.admin, lambda: self.enabled_plugins))
        app.register_blueprint(events_blueprint(self.events, self.storage, self.admin))
        app.register_blueprint(firmware_blueprint(self.ota, self.admin))
        app.register_blueprint(maintenance_blueprint(self.maintenance, self.admin))
        lv = self.config.live
        app.register_blueprint(live_blueprint(self.live, self.live_access, heartbeat_s=lv.heartbeat_s))
        app.register_blueprint(dashboard_blueprint(DashboardSources(
            self.config.gateway.id, self.health, self.plugin_table, self.devices, self.outbox, self.events,
            self.storage, PluginViews(self.plugins, self.contexts, self._live_plugins), lambda: self.started_at,
            self.clock), self.admin, self.sessions))
        plugin_blueprints: set[str] = set()
        docs = ApiDocs(title=f"gatewayd {self.config.gateway.id}", version=__version__,
                       description="The gateway's HTTP API: the admin API under /api/gateway (the admin token), "
                                   "health and metrics, and each plugin's routes under its mount.",
                       allowed=lambda r: self.admin.presented() or self.sessions.signed_in(r.cookies),
                       login_url="/dashboard/login", plugin_blueprints=lambda: plugin_blueprints)
        app.register_blueprint(docs.blueprint())
        dedicated: list[tuple[str, Any]] = []
        for name in self._live_plugins():
            blueprint = None
            with self._plugin_step(name, "http routes"):
                blueprint = self.plugins.http_routes(name, self.contexts[name])
            if blueprint is None:
                continue
            guard_plugin(blueprint, lambda n=name: self.failed.get(n))
            settings = self.config.plugins[name]
            docs.add_to(blueprint, title=f"gatewayd plugin {name}", version=self.plugins.infos[name].version,
                        description=f"The routes of the {name} plugin, mounted at {settings.mount} (and at / on its "
                                    "own listener when plugins.{name}.listen is set).".replace("{name}", name),
                        public=settings.public_docs)
            plugin_blueprints.update({blueprint.name, f"{blueprint.name}_root"})
            app.register_blueprint(blueprint, url_prefix=self.contexts[name].mount)
            if self.config.plugins[name].listen is not None:
                own = create_app(f"gatewayd-{name}", max_body_bytes=h.max_body_bytes, log=self.log)
                own.register_blueprint(blueprint, url_prefix=None, name=f"{blueprint.name}_root")
                dedicated.append((name, own))
        self.app = app
        self.health.set("http", "starting")
        await self._serve(nursery, "main", app, h.listen)
        for name, plugin_app in dedicated:
            await self._serve(nursery, name, plugin_app, self.config.plugins[name].listen)
        self.health.set("http", "ok", listen=self.http_urls)

    async def _serve(self, nursery: trio.Nursery, label: str, app: Any, listen: Any) -> None:
        async def trigger() -> None:
            await self._stop_http.wait()

        done = trio.Event()
        self._servers_done.append(done)

        async def server(task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                await serve_app(
                    app,
                    listen,
                    shutdown_trigger=trigger,
                    graceful_timeout=self.config.gateway.shutdown_grace_s,
                    access_log=self.config.http.access_log,
                    backlog=self.config.http.backlog,
                    admission=self.admission,
                    tls=self.tls if self.config.tls.http else None,
                    task_status=task_status,
                )
            finally:
                done.set()

        try:
            self.http_urls[label] = await nursery.start(server)
        except (OSError, BaseExceptionGroup) as e:
            error = find_exception(e, OSError)
            if error is None:
                raise
            key = "http.listen" if label == "main" else f"plugins.{label}.listen"
            raise ListenError(f"cannot listen on {listen} ({key}): {error.strerror or error}") from None

    async def _start_serial(self, nursery: trio.Nursery) -> None:
        for name in self._live_plugins():
            with self._plugin_step(name, "serial links"):
                links = self.plugins.serial_links(name, self.contexts[name])
                await self.serial.start(name, [(k.name, k.settings, k.handler) for k in links.links], nursery)

    async def _start_plugins(self, nursery: trio.Nursery) -> None:
        for name in self._live_plugins():
            ctx = self.contexts[name]
            self.health.set_plugin(name, "starting")
            with self._plugin_step(name, "startup"):
                await self.plugins.startup(name, ctx)
                for task in self.plugins.background_tasks(name, ctx).tasks:
                    nursery.start_soon(self._supervise, name, task)
                self.health.set_plugin(name, "ok")

    def _fail(self, name: str, reason: str, exc: BaseException) -> None:
        self.failed[name] = reason
        self.serial.stop_plugin(name)
        self.health.set_plugin(name, "failed", reason)
        log.error("plugin failed", plugin=name, reason=reason, exc_type=type(exc).__name__)

    async def _supervise(self, plugin: str, task: Any) -> None:
        delay = RESTART_MIN_S
        while True:
            began = trio.current_time()
            try:
                await task.fn(*task.args)
                log.info("plugin task finished", plugin=plugin, task=task.name)
                return
            except Exception as e:
                if trio.current_time() - began > RESTART_RESET_S:
                    delay = RESTART_MIN_S
                self._restarts.inc(plugin=plugin, task=task.name)
                log.exception("plugin task crashed", plugin=plugin, task=task.name, error=repr(e), restart_in_s=delay)
            # Jitter keeps many crashing tasks from restarting in lockstep.
            await trio.sleep(delay * random.uniform(0.9, 1.1))
            delay = min(delay * 2, RESTART_MAX_S)

    # -- shutdown ----------------------------------------------------------------

    async def _stop(self, front: trio.Nursery) -> None:
        grace = self.config.gateway.shutdown_grace_s
        log.info("shutting down", grace_s=grace)
        self.health.set("http", "stopping")
        self.live.close()  # live streams end (WebSocket 1001), so the servers can finish
        self._stop_http.set()

        async def servers_stopped() -> None:
            # hypercorn stops accepting on the trigger and gives in-flight requests `grace`.
            for done in self._servers_done:
                await done.wait()

        with trio.move_on_after(grace + 0.5):
            async with trio.open_nursery() as stopping:
                stopping.start_soon(servers_stopped)
                stopping.start_soon(self.mqtt.stop_accepting, grace)
        if not all(done.is_set() for done in self._servers_done):
            # A live write to a client that stopped reading is shielded (never half a frame on
            # the wire), so cancelling does not end it: its connection is closed instead.
            if closed := abort_stalled_writes():
                log.warning("closed live connections whose clients stopped reading", connections=closed)
        # Plugins get what is left of the budget (SIGTERM must end us within ~5 s).
        with trio.move_on_after(max(1.0, grace / 2)):
            for name in self.enabled_plugins:
                if name not in self.failed and name in self.contexts:
                    try:
                        await self.plugins.shutdown(name, self.contexts[name])
                    except Exception as e:
                        log.error("plugin shutdown failed", plugin=name, error=repr(e))
        front.cancel_scope.cancel()

    # -- health and metrics ------------------------------------------------------

    def _register_core_metrics(self) -> None:
        s = self.storage.stats
        self.metrics.collector(
            "gatewayd_storage_commits_total", "counter", "Transactions committed by the writer thread",
            lambda: [Sample("gatewayd_storage_commits_total", {}, s["commits"])],
        )
        self.metrics.collector(
            "gatewayd_storage_jobs_total", "counter", "Write jobs run by the writer thread",
            lambda: [Sample("gatewayd_storage_jobs_total", {}, s["jobs"])],
        )
        self.metrics.collector(
            "gatewayd_storage_errors_total", "counter", "Failed write jobs and failed commits",
            lambda: [
                Sample("gatewayd_storage_errors_total", {"kind": "job"}, s["job_errors"]),
                Sample("gatewayd_storage_errors_total", {"kind": "commit"}, s["commit_errors"]),
            ],
        )
        self.metrics.collector(
            "gatewayd_plugin_up", "gauge", "1 when a plugin is running, 0 when failed or disabled",
            lambda: [
                Sample("gatewayd_plugin_up", {"plugin": n}, 1.0 if st.state == "ok" else 0.0)
                for n, st in sorted(self.health.plugins.items())
            ],
        )
        live = self.live.stats
        self.metrics.collector(
            "gatewayd_live_subscribers", "gauge", "Live-stream subscribers connected (WebSocket, SSE, plugins)",
            lambda: [Sample("gatewayd_live_subscribers", {}, self.live.subscribers)],
        )
        self.metrics.collector(
            "gatewayd_live_events_total", "counter",
            "Live events: published, delivered to a subscriber's queue, dropped from a slow subscriber's queue",
            lambda: [Sample("gatewayd_live_events_total", {"what": w}, live[w]) for w in ("published", "delivered",
                                                                                          "dropped")],
        )
        self.metrics.collector(
            "gatewayd_live_refused_total", "counter", "Live subscriptions refused (per-token or total limit)",
            lambda: [Sample("gatewayd_live_refused_total", {}, live["refused"])],
        )
        admission = self.admission
        if admission is not None:
            self.metrics.collector(
                "gatewayd_http_handlers", "gauge",
                "Request handlers running (counted against http.max_handlers) and requests waiting their turn",
                lambda: [Sample("gatewayd_http_handlers", {"state": "running"}, admission.running),
                         Sample("gatewayd_http_handlers", {"state": "waiting"}, admission.waiting)],
            )
            self.metrics.collector(
                "gatewayd_http_admission_total", "counter",
                "Requests by how they reached their handler: at once, after waiting their turn, or not at all "
                "(gave_up: the client left first)",
                lambda: [Sample("gatewayd_http_admission_total", {"outcome": o}, admission.stats[o])
                         for o in ("at_once", "waited", "gave_up")],
            )
            self.metrics.collector(
                "gatewayd_http_places_given_back_total", "counter",
                "Places handlers gave up before they ended: to wait on the database or a device (aside), or "
                "after http.handler_hold_s (overran: counted when taken back, only when requests wait)",
                lambda: [Sample("gatewayd_http_places_given_back_total", {"why": "aside"}, admission.stats["aside"]),
                         Sample("gatewayd_http_places_given_back_total", {"why": "overran"},
                                admission.stats["expired"])],
            )
        self.metrics.collector(
            "gatewayd_maintenance", "gauge", "1 while the gateway is in maintenance mode",
            lambda: [Sample("gatewayd_maintenance", {}, 1.0 if self.maintenance.state.active else 0.0)],
        )
        self.metrics.collector(
            "gatewayd_uptime_seconds", "gauge", "Seconds since the gateway started",
            lambda: [Sample("gatewayd_uptime_seconds", {}, (self.clock() - self.started_at) if self.started_at else 0)],
        )


def raise_open_files_limit(want: int = 65536) -> tuple[int, int]:
    """Raise this process's soft limit on open files towards the hard one (`gatewayd run`).

    Each device on MQTT costs the gateway two descriptors (its socket and the relay to
    mosquitto), each HTTP client one, SQLite a few: the soft limit most systems start
    a service with (1024; systemd's default) is reached by ~500 devices. The hard limit
    is the administrator's; up to it, raising is the process's own business. Returns
    (before, after).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for the long-running daemon (`gatewayd run`).

    Every MQTT message or HTTP request allocates dozens of short-lived objects, so at
    the default gen-0 threshold (700) the collector runs every few messages. Objects
    alive at start-up (modules, config, plugins) are frozen out of every later
    collection. Reference counting still frees almost everything at once; only cycles
    wait longer. Measured: MQTT durable ingest +21 % (bench/mqtt_bench.py), HTTP p99
    lower, batch ingest +10 %; the cost is memory under sustained load: the peak RSS
    of a 1,000,000-record drain goes from 64 to ~120 MB (bench/ingest_bench.py
    --default-gc shows the other side).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


#: glibc's mallopt parameter number for the most malloc arenas (malloc.h's M_ARENA_MAX).
M_ARENA_MAX = -8
#: The small profile's malloc arenas: glibc's default (8 per core) gives each thread that
#: allocates (the storage readers, trio's thread cache) its own, each keeping its freed memory.
SMALL_ARENAS = 2


def limit_malloc_arenas(arenas: int) -> bool:
    """At most `arenas` glibc malloc arenas from now on (as MALLOC_ARENA_MAX=arenas, which
    wins if set); False where the C library is not glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, arenas)) if hasattr(libc, "mallopt") else False
    except OSError:
        return False


def tune_gc_for(profile: str) -> None:
    """The garbage collector for `gatewayd run` with `gateway.profile`: `tune_gc`'s relaxed
    thresholds, or, for "small" (core/profile.py), Python's own (objects alive at start-up
    are still frozen out of later collections: that costs no memory) and at most
    SMALL_ARENAS malloc arenas."""
    if profile == "small":
        limit_malloc_arenas(SMALL_ARENAS)
        gc.collect()
        gc.freeze()
        gc.set_threshold(700, 10, 10)
        return
    tune_gc()


#: While the database is copied and migrated at start, systemd is told every this many
#: seconds to wait EXTEND_START_S more (the unit's TimeoutStartSec would otherwise kill
#: the copy of a large database on an SD card half-way, and the restart copy it again).
EXTEND_EVERY_S = 10.0
EXTEND_START_S = 60.0


async def run_until_signalled(gateway: Gateway, *, task_status=trio.TASK_STATUS_IGNORED,
                              notifier: SystemdNotifier | None = None, extend_every_s: float = EXTEND_EVERY_S) -> None:
    """Run the gateway; SIGTERM/SIGINT start a graceful shutdown, a second one forces it.

    Under systemd (`Type=notify`) it says READY once the gateway has started, STOPPING
    at the first signal, and feeds the watchdog from this trio loop (core/sdnotify.py);
    while a schema migration (and the copy before it) runs at start, it extends the
    start timeout (EXTEND_TIMEOUT_USEC).
    """
    notifier = notifier or SystemdNotifier()
    starting = trio.CancelScope()

    async def extend_start() -> None:
        with starting:
            while True:
                if gateway.storage.migrating:
                    notifier.notify(f"EXTEND_TIMEOUT_USEC={int(EXTEND_START_S * 1e6)}",
                                    "STATUS=copying the database, then migrating its schema (docs/site-box.md#upgrades)")
                await trio.sleep(extend_every_s)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                count = 0
                async for signum in signals:
                    count += 1
                    name = signal.Signals(signum).name
                    if count == 1:
                        log.info("signal received, stopping", signal=name)
                        notifier.stopping()
                        gateway.request_shutdown()
                    else:
                        log.warning("second signal, stopping now", signal=name)
                        nursery.cancel_scope.cancel()

            class Started:
                @staticmethod
                def started(value: Any = None) -> None:
                    starting.cancel()
                    notifier.ready(f"running: {' '.join(u for urls in gateway.http_urls.values() for u in urls)}")
                    nursery.start_soon(notifier.watchdog)
                    task_status.started(value)

            nursery.start_soon(watch)
            if notifier.enabled:
                nursery.start_soon(extend_start)
            try:
                await gateway.run(task_status=Started())
            finally:
                notifier.close()
            nursery.cancel_scope.cancel()
