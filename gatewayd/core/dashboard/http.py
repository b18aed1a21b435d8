"""The site dashboard's routes: server-rendered pages that redraw themselves, log-in, log-out.

    GET  /                                         overview: health, plugins, devices, outbox, events, alerts
    GET  /dashboard/devices/<id>?family=           one device: facts, charts, live tail, events, commands
    POST /dashboard/devices/<id>/commands          queue a command (a session, its CSRF token, same origin)
    GET  /dashboard/login, POST /dashboard/login   the admin token for a session cookie
    POST /dashboard/logout                         (CSRF token and same origin)
    GET  /dashboard/static/<name>                  the stylesheet, the script, the icon

Pages need a session, or the admin token as `Authorization: Bearer` (for scripts; such
a request has no session and no log-out button). With `X-Dashboard-Part: 1` a page
answers only its server-drawn part (what the page's script redraws in place when live
events arrive), and 401 instead of the way to the log-in form. Everything shown goes
through Jinja's autoescaping or markupsafe, and the Content-Security-Policy allows no
inline script, so a device name like `<script>` stays text even if an escape is missed.
The pages' live parts come from the live hub's WebSocket, which accepts the session
cookie (live/http.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import quote

from quart import Blueprint, Response, make_response, redirect, render_template, request, url_for

from ..http.app import AdminGuard
from ...protocol.strict_json import parse_json
from ..http.errors import error_response
from .chart import series_of, svg_chart
from .pages import DashboardSources, device_view, find_device, overview_view
from .plugin_views import describe
from .sessions import COOKIE, DashboardSessions, Session, same_origin
from .timefmt import ago, duration, iso, size

__all__ = ["dashboard_blueprint"]

NAME = "gatewayd_dashboard"
LOGIN = "/dashboard/login"
PART_HEADER = "X-Dashboard-Part"
STATIC = Path(__file__).parent / "static"
ASSET_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# No inline script or style anywhere: what an escaping mistake would let in does not run.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


@dataclass(frozen=True)
class Viewer:
    """Who looks: a browser session, or a script with the admin token (session None)."""

    session: Session | None


def _local_path(target: str | None) -> str:
    """`target` if it is a path on this gateway (where to go after log-in), else `/`."""
    if (not target or not target.startswith("/") or target.startswith("//") or len(target) > 512
            or any(not (32 < ord(c) < 127) or c == "\\" for c in target)):
        return "/"
    return target


def dashboard_blueprint(src: DashboardSources, admin: AdminGuard, sessions: DashboardSessions) -> Blueprint:
    bp = Blueprint(NAME, __name__, template_folder="templates")
    src.views.panels()  # the plugins are asked for their panels once, now, as the HTTP server starts
    # Three small files, read once and served from memory: nothing of a request's
    # choosing reaches the file system. Their URLs carry a digest of the content, so
    # browsers cache them and still get the new ones the moment the gateway is upgraded.
    assets = {f.name: f.read_bytes() for f in STATIC.iterdir() if f.suffix in ASSET_TYPES}
    versions = {name: hashlib.sha256(body).hexdigest()[:12] for name, body in assets.items()}

    def asset(name: str) -> str:
        return url_for(f"{NAME}.static", name=name, v=versions[name])

    @bp.get("/dashboard/static/<name>")
    async def static(name: str) -> Any:
        body = assets.get(name)
        if body is None:
            return error_response(404, f"no dashboard asset {name[:64]!r}")
        etag = versions[name]
        if etag in request.if_none_match:
            return Response(b"", status=304, headers={"ETag": f'"{etag}"'})
        return Response(body, content_type=ASSET_TYPES[PurePath(name).suffix],
                        headers={"ETag": f'"{etag}"', "Cache-Control": "public, max-age=86400"})

    def viewer() -> Viewer | None:
        session = sessions.find(request.cookies.get(COOKIE))
        if session is not None:
            return Viewer(session)
        if "Authorization" in request.headers and admin.check() is None:
            return Viewer(None)
        return None

    def to_login() -> Response:
        target = request.full_path.rstrip("?") if request.method == "GET" else "/"
        return redirect(f"{LOGIN}?next={quote(_local_path(target), safe='')}", 303)

    async def page(template: str, status: int = 200, **context: Any) -> Response:
        response = await make_response(await render_template(f"dashboard/{template}", **context), status)
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        return response

    @bp.context_processor
    async def helpers() -> dict[str, Any]:
        now = src.clock()
        return {"gateway_id": src.gateway_id, "token_env": admin.token_env, "asset": asset,
                "ago": lambda ts: ago(ts, now), "iso": iso, "duration": duration, "size": size,
                "describe": describe, "compact": _compact}

    @bp.after_request
    async def security_headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        # Not "no-referrer": under it browsers send `Origin: null` with a form, and the
        # same-origin check of log-in and log-out could not tell the page from another site.
        response.headers["Referrer-Policy"] = "same-origin"
        if request.endpoint != f"{NAME}.static":
            response.headers["Cache-Control"] = "no-store"  # what the gateway shows now, to who logged in
            response.vary.add(PART_HEADER)
        return response

    def wants_part() -> bool:
        # The page's script redraws its server-drawn part with the same URL and this header.
        return request.headers.get(PART_HEADER) == "1"

    async def ended() -> Response:
        """No session: a page goes to the log-in form; a part tells the script to send it there."""
        if wants_part():
            return await page("part_error.html", 401, message="Your session has ended.")
        return to_login()

    @bp.get("/")
    async def overview() -> Any:
        if (who := viewer()) is None:
            return await ended()
        view = await overview_view(src)
        if wants_part():
            return await page("overview_body.html", **view)
        # "#": every stream; the page redraws itself when anything arrives.
        return await page("overview.html", dashboard_session=who.session, streams="#", **view)

    @bp.get("/dashboard/devices/<device_id>")
    async def device(device_id: str) -> Any:
        if (who := viewer()) is None:
            return await ended()
        family = request.args.get("family") or None
        found = await find_device(src, device_id, family)
        if not found:
            return await page("error.html", 404, title="No such device",
                              message=f"There is no device {device_id!r}" + (f" in the family {family!r}."
                                                                            if family else "."))
        if len(found) > 1:
            return await page("error.html", 409, title="Which device?", choices=found,
                              message=f"Devices of several families have the id {device_id!r}:")
        view = await device_view(src, found[0])
        charts = _charts(view, src.clock())
        if wants_part():
            return await page("device_body.html", charts=charts, **view)
        return await page("device.html", dashboard_session=who.session, charts=charts,
                          queued=request.args.get("queued"), **view)

    @bp.post("/dashboard/devices/<device_id>/commands")
    async def queue_command(device_id: str) -> Any:
        """The device page's form: a command in the family's shape, checked by its plugin."""
        session = sessions.find(request.cookies.get(COOKIE))
        if session is None:
            return to_login()
        form = await _form()
        if not sessions.form_allowed(request.headers, request.cookies, form.get("csrf", "")):
            return await page("error.html", 403, title="No command queued",
                              message="This request did not come from the dashboard's own page "
                                      "(its form token is missing or wrong). Use the device page's form.")
        found = await find_device(src, device_id, form.get("family") or None)
        if len(found) != 1:
            return await page("error.html", 404, title="No such device",
                              message=f"There is no device {device_id!r} in the family {form.get('family')!r}.")
        target = found[0]
        text = form.get("payload", "")
        try:
            payload = parse_json(text.encode())
            command = await src.devices.commands.enqueue(target.family, target.id, payload)
        except ValueError as e:  # not JSON (BadJSON), or refused by the family's check
            view = await device_view(src, target)
            return await page("device.html", 400, dashboard_session=session, charts=_charts(view, src.clock()),
                              command_text=text, command_problem=str(e), **view)
        return redirect(url_for(".device", device_id=target.id, family=target.family, queued=command.id), 303)

    @bp.get(LOGIN)
    async def login_form() -> Any:
        if viewer() is not None:
            return redirect(_local_path(request.args.get("next")), 303)
        return await page("login.html", next=_local_path(request.args.get("next")),
                          logged_out="logged_out" in request.args)

    @bp.post(LOGIN)
    async def login() -> Any:
        form = await _form()
        target = _local_path(form.get("next"))
        if not same_origin(request.headers):
            return await page("login.html", 403, next=target, problem="This form was sent from another site.")
        result = sessions.login(form.get("token", ""))
        if isinstance(result, str):
            status = 503 if admin.token() is None else 401
            return await page("login.html", status, next=target, problem=result)
        value, _ = result
        response = redirect(target, 303)
        response.set_cookie(COOKIE, value, max_age=int(sessions.ttl_s), path="/", httponly=True,
                            samesite="Strict", secure=request.scheme in ("https", "wss"))
        return response

    @bp.post("/dashboard/logout")
    async def logout() -> Any:
        value = request.cookies.get(COOKIE)
        if sessions.find(value) is not None:
            form = await _form()
            if not sessions.form_allowed(request.headers, request.cookies, form.get("csrf", "")):
                return await page("error.html", 403, title="Not logged out",
                                  message="This request did not come from the dashboard's own page "
                                          "(its form token is missing or wrong). Use the Log out button.")
            sessions.logout(value)
        response = redirect(f"{LOGIN}?logged_out", 303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict",
                               secure=request.scheme in ("https", "wss"))
        return response

    return bp


async def _form() -> dict[str, str]:
    """The POSTed form's fields; {} for a body that is no form (the checks then refuse it)."""
    try:
        form = await request.form
    except ValueError:
        return {}
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _compact(data: Any, limit: int = 160) -> str:
    """An event's data in a table cell: compact JSON, cut at `limit` characters."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _charts(view: dict[str, Any], now: float) -> list[dict[str, Any]]:
    charts = []
    for name, points in series_of(view["readings"]).items():
        values = [v for _, v in points]
        charts.append({"name": name, "svg": svg_chart(name, points, now=now), "latest": f"{values[-1]:.6g}",
                       "low": f"{min(values):.6g}", "high": f"{max(values):.6g}"})
    return charts
