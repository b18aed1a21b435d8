"""Admin routes for events and alert notifications (`/api/gateway/events`, `/alerts`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from msgspec import Meta, Struct
from quart import Blueprint, Response

from ..http.app import AdminGuard
from ..http.declare import ADMIN_TOKEN, Routes
from ..http.errors import error_response
from .events import EventBus, EventQuery, parse_time
from .notify import STATES, list_notifications
from .rules import SEVERITIES

if TYPE_CHECKING:
    from ..storage import Storage

__all__ = ["events_blueprint"]

Limit = Annotated[int, Meta(ge=1, le=1000)]
Time = Annotated[str, Meta(description="ISO 8601 (2026-01-02T03:04:05Z, a date, an offset) or epoch seconds")]


class EventsQuery(Struct, forbid_unknown_fields=True):
    family: str = ""
    device: str = ""
    type: Annotated[str, Meta(description="event types, comma-separated")] = ""
    severity: Annotated[str, Meta(description="comma-separated, of " + ", ".join(SEVERITIES))] = ""
    since: Time = ""
    until: Annotated[Time, Meta(description="before this time")] = ""
    limit: Limit = 100
    cursor: Annotated[str, Meta(description="next_cursor of the previous page")] = ""


class AlertsQuery(Struct, forbid_unknown_fields=True):
    state: Annotated[str, Meta(pattern="^(" + "|".join(STATES) + ")$")] | None = None
    limit: Limit = 100


class EventOut(Struct):
    id: int | None
    ts: float
    time: str
    family: str
    device_id: str | None
    type: str
    severity: str
    data: dict[str, Any]
    duration_s: float | None
    resolved: bool | None


class Events(Struct):
    events: list[EventOut]
    next_cursor: str | None


class Notification(Struct):
    """One action of one firing of a rule."""

    id: int
    created_at: float
    rule: str
    level: str
    severity: str
    action: str
    target: str
    family: str | None
    device_id: str | None
    event_id: int | None
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: float | None
    sent_at: float | None


class Alerts(Struct):
    alerts: list[Notification]
    active: Annotated[list[list[str | None]], Meta(description="firing now: [rule, family, device, type]")]


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def event_query(query: EventsQuery) -> EventQuery:
    """The EventQuery of a request's declared query; ValueError names the bad one."""
    q = EventQuery(family=query.family or None, device=query.device or None, types=_split(query.type),
                   severities=_split(query.severity), cursor=query.cursor or None, limit=query.limit)
    for name in ("since", "until"):
        if text := getattr(query, name):
            try:
                setattr(q, name, parse_time(text))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
    q.validate()
    return q


def events_blueprint(bus: EventBus, storage: Storage, admin: AdminGuard) -> Blueprint:
    """`/api/gateway/events` and `/api/gateway/alerts`."""
    bp = Blueprint("gatewayd_events", __name__)
    routes = Routes(bp, tag="events", auth=ADMIN_TOKEN)

    @bp.before_request
    async def _admin() -> Response | None:
        return admin.check()

    @routes.get("/api/gateway/events", query=EventsQuery, responses={200: Events})
    async def events(query: EventsQuery) -> Any:
        """Stored events, newest first, a page at a time (docs/events.md)."""
        try:
            q = event_query(query)
        except ValueError as e:
            return error_response(400, str(e))
        rows, cursor = await bus.query(q)
        return {"events": rows, "next_cursor": cursor}

    @routes.get("/api/gateway/alerts", query=AlertsQuery, responses={200: Alerts})
    async def alerts(query: AlertsQuery) -> Any:
        """The notification queue, newest first, and the alerts active now."""
        rows = await storage.read(list_notifications, query.state, query.limit)
        return {"alerts": rows, "active": [list(k) for k in bus.engine.active()]}

    return bp
