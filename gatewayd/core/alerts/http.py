"""Admin routes for events and alert notifications (`/api/gateway/events`, `/alerts`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Blueprint, Response, request

from ..http.app import AdminGuard
from ..http.errors import error_response
from .events import EventBus, EventQuery, parse_time
from .notify import STATES, list_notifications

if TYPE_CHECKING:
    from ..storage import Storage

__all__ = ["events_blueprint", "query_from_args"]


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def query_from_args(args: Any) -> EventQuery:
    """Build an EventQuery from query-string style args; ValueError names the bad one."""
    q = EventQuery(
        family=args.get("family") or None,
        device=args.get("device") or None,
        types=_split(args.get("type")),
        severities=_split(args.get("severity")),
        cursor=args.get("cursor") or None,
    )
    for name in ("since", "until"):
        if args.get(name):
            try:
                setattr(q, name, parse_time(args[name]))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
    if args.get("limit") is not None:
        try:
            q.limit = int(args["limit"])
        except ValueError:
            raise ValueError(f"limit: expected an integer 1-1000, got {args['limit']!r}") from None
    q.validate()
    return q


def events_blueprint(bus: EventBus, storage: Storage, admin: AdminGuard) -> Blueprint:
    """`/api/gateway/events` and `/api/gateway/alerts`."""
    bp = Blueprint("gatewayd_events", __name__)

    @bp.before_request
    async def _admin() -> Response | None:
        return admin.check()

    @bp.get("/api/gateway/events")
    async def events() -> Any:
        """?family=&device=&type=a,b&severity=warning,critical&since=&until=&limit=&cursor="""
        try:
            q = query_from_args(request.args)
        except ValueError as e:
            return error_response(400, str(e))
        rows, cursor = await bus.query(q)
        return {"events": rows, "next_cursor": cursor}

    @bp.get("/api/gateway/alerts")
    async def alerts() -> Any:
        """The notification queue, newest first: ?state=pending|sent|failed&limit="""
        state = request.args.get("state") or None
        if state is not None and state not in STATES:
            return error_response(400, f"state: expected one of {', '.join(STATES)}, got {state!r}")
        try:
            limit = int(request.args.get("limit", "100"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            return error_response(400, "limit: expected an integer 1-1000")
        rows = await storage.read(list_notifications, state, limit)
        return {"alerts": rows, "active": [list(k) for k in bus.engine.active()]}

    return bp
