"""Maintenance mode: an operator's switch that every family can read (`ctx.maintenance`).

While it is on, plugins refuse device traffic whose specification has a maintenance
answer (edgesentinel: 503 with `next_hint`), and everything else goes on: storage,
upstream sync, the admin API, the dashboard. It is switched with
`gatewayd maintenance on|off` (works while the daemon runs) or the admin API
(`GET/PUT /api/gateway/maintenance`), and survives restarts: one row of
`core_maintenance`. The daemon reads the row every `poll_s` (a change made by the CLI
is seen within that) and at once when the admin API changes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any

import peewee
import trio
from msgspec import Meta, Struct
from quart import Blueprint, Response

from .http.declare import ADMIN_TOKEN, Routes
from .logs import get_logger
from .storage import SchemaSpec, Storage

if TYPE_CHECKING:
    from .http.app import AdminGuard

__all__ = ["MAINTENANCE_SCHEMA", "Maintenance", "MaintenanceState", "PluginMaintenance", "check",
           "maintenance_blueprint"]

log = get_logger("gatewayd.maintenance")
MAX_REASON = 512
MAX_RETRY_AFTER_S = 86400


class CoreMaintenance(peewee.Model):
    id = peewee.IntegerField(primary_key=True)  # always 1
    active = peewee.BooleanField()
    reason = peewee.TextField()
    since = peewee.FloatField(null=True)
    retry_after_s = peewee.IntegerField()

    class Meta:
        table_name = "core_maintenance"


MAINTENANCE_SCHEMA = SchemaSpec("core_maintenance", [CoreMaintenance], version=1)


@dataclass(frozen=True)
class MaintenanceState:
    """Whether the gateway is in maintenance, why, since when, and when devices should come back."""

    active: bool = False
    reason: str = ""
    since: float | None = None
    retry_after_s: int = 300
    """What to tell devices: retry after this many seconds."""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def check(active: Any, reason: Any = "", retry_after_s: Any = 300) -> MaintenanceState:
    """A new state from untrusted input; ValueError naming the field."""
    if not isinstance(active, bool):
        raise ValueError(f"active: expected true or false, got {active!r}")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise ValueError(f"reason: expected a text of at most {MAX_REASON} characters")
    if isinstance(retry_after_s, bool) or not isinstance(retry_after_s, int) \
            or not 1 <= retry_after_s <= MAX_RETRY_AFTER_S:
        raise ValueError(f"retry_after_s: expected an integer 1-{MAX_RETRY_AFTER_S}, got {retry_after_s!r}")
    return MaintenanceState(active, reason, None, retry_after_s)


def _read() -> MaintenanceState:
    row = CoreMaintenance.get_or_none(CoreMaintenance.id == 1)
    if row is None:
        return MaintenanceState()
    return MaintenanceState(bool(row.active), str(row.reason), row.since, int(row.retry_after_s))


def _write(state: MaintenanceState, now: float) -> MaintenanceState:
    before = _read()
    since = (before.since if before.active else now) if state.active else None
    stored = MaintenanceState(state.active, state.reason, since, state.retry_after_s)
    CoreMaintenance.insert(id=1, **asdict(stored)).on_conflict_replace().execute()
    return stored


class Maintenance:
    """The switch, as the daemon holds it (`state`, always current) and changes it."""

    def __init__(self, storage: Storage, *, clock: Callable[[], float] = time.time, poll_s: float = 1.0) -> None:
        self.storage = storage
        self.clock = clock
        self.poll_s = poll_s
        self.state = MaintenanceState()

    def install(self) -> None:
        """Create the table and read the stored state (blocking: a worker thread or the CLI)."""
        self.storage.install(MAINTENANCE_SCHEMA)
        self.state = self.storage.run_blocking(_read)

    def set_blocking(self, state: MaintenanceState) -> MaintenanceState:
        """For the CLI: store a new state (the daemon sees it within `poll_s`)."""
        self.state = self.storage.run_blocking(_write, state, self.clock())
        return self.state

    async def set(self, state: MaintenanceState) -> MaintenanceState:
        """Store a new state; in effect at once in this process."""
        stored = await self.storage.write(_write, state, self.clock())
        self._adopt(stored, "admin API")
        return stored

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Follow changes made by other processes (the CLI) until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.poll_s)
            try:
                self._adopt(await self.storage.read(_read), "gatewayd maintenance")
            except Exception as e:  # a locked or failing database: keep the last state, try again
                log.warning("cannot read the maintenance switch", error=str(e))

    def _adopt(self, state: MaintenanceState, via: str) -> None:
        if state.active != self.state.active:
            log.warning("maintenance mode on" if state.active else "maintenance mode off", via=via,
                        reason=state.reason)
        self.state = state


class PluginMaintenance:
    """`ctx.maintenance`: read-only, the same switch for every family."""

    def __init__(self, maintenance: Maintenance) -> None:
        self._maintenance = maintenance

    @property
    def active(self) -> bool:
        """True while the operator has the gateway in maintenance."""
        return self._maintenance.state.active

    @property
    def state(self) -> MaintenanceState:
        """`active`, `reason`, `since` and `retry_after_s` (what to tell devices)."""
        return self._maintenance.state


class MaintenanceChange(Struct, forbid_unknown_fields=True):
    """A new state of the switch."""

    active: bool
    reason: Annotated[str, Meta(max_length=MAX_REASON, description="why (shown in /health and the log)")] = ""
    retry_after_s: Annotated[int, Meta(ge=1, le=MAX_RETRY_AFTER_S,
                                       description="what devices are told: retry after this many seconds")] = 300


class MaintenanceOut(Struct):
    active: bool
    reason: str
    since: float | None
    retry_after_s: int


class MaintenanceAnswer(Struct):
    maintenance: MaintenanceOut


def maintenance_blueprint(maintenance: Maintenance, admin: AdminGuard) -> Blueprint:
    """`GET /api/gateway/maintenance` and `PUT` with `{"active", "reason"?, "retry_after_s"?}`."""
    bp = Blueprint("maintenance", __name__)
    routes = Routes(bp, tag="maintenance", auth=ADMIN_TOKEN)

    @bp.before_request
    async def _admin() -> Response | None:
        return admin.check()

    @routes.get("/api/gateway/maintenance", responses={200: MaintenanceAnswer})
    async def show() -> Any:
        """Whether the gateway is in maintenance mode, why, since when."""
        return {"maintenance": maintenance.state.as_json()}

    @routes.put("/api/gateway/maintenance", body=MaintenanceChange, responses={200: MaintenanceAnswer},
                errors={507: "the disk is full: nothing was stored", 503: "the database failed: nothing was stored"})
    async def change(body: MaintenanceChange) -> Any:
        """Switch maintenance mode on or off (in effect at once, kept across restarts).

        While it is on, device families with a maintenance answer give it (edgesentinel:
        503 and a retry hint of `retry_after_s`); everything else goes on."""
        state = MaintenanceState(body.active, body.reason, None, body.retry_after_s)
        return {"maintenance": (await maintenance.set(state)).as_json()}

    return bp
