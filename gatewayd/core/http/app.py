"""The gateway's QuartTrio apps: the core's error handling, the admin token, the core routes.

Core routes answer errors in one shape (`http.errors.error_response`); plugins keep their
family's own with error handlers on their Blueprint. Request bodies are read strictly
(`http.body.read_json_object`) and responses are encoded strictly: NaN and Infinity are
not JSON, and a strict client would refuse the whole answer.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from msgspec import Meta, Struct
from quart import Blueprint, Response, current_app, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ...protocol.encoding import EncodingError
from ...protocol.strict_json import BadJSON
from ..schema import read_secret
from ..storage import StorageError, StorageFull
from .body import BodyTooLarge, StrictJSONProvider, body_received
from .declare import ADMIN_TOKEN, Raw, Routes
from .errors import PluginUnavailable, error_response
from .lean import LeanQuart

if TYPE_CHECKING:
    from ..health import Health
    from ..logs import StructLogger
    from ..metrics import Metrics

__all__ = ["AdminGuard", "core_blueprint", "create_app", "guard_plugin"]


class AdminGuard:
    """The admin token that guards `/api/gateway/*` and plugins' admin routes.

    The token is read from the environment variable `token_env` at each check, so a
    rotated token takes effect without a restart.
    """

    def __init__(self, token_env: str) -> None:
        self.token_env = token_env

    def token(self) -> str | None:
        return read_secret(self.token_env)

    def check(self) -> Response | None:
        """In a route: None when the request carries the admin token, else the 401/503 to return."""
        token = self.token()
        if token is None:
            return error_response(503, f"the admin API is disabled: set the environment variable {self.token_env}")
        if not self.presented(token):
            return error_response(401, "missing or wrong admin token (Authorization: Bearer <token>)")
        return None

    def presented(self, token: str | None = None) -> bool:
        """Whether the current request (or WebSocket handshake) carries the admin token (False
        when none is set)."""
        token = self.token() if token is None else token
        headers = websocket.headers if has_websocket_context() else request.headers
        scheme, _, value = headers.get("Authorization", "").partition(" ")
        return token is not None and scheme.lower() == "bearer" and \
            hmac.compare_digest(value.strip().encode(), token.encode())


class ComponentOut(Struct, forbid_unknown_fields=False):
    """One component or plugin; components add details of their own (e.g. `listen`)."""

    state: Annotated[str, Meta(description="ok, disabled and off are healthy; starting, degraded, failed, ... "
                                           "are not")]
    reason: str | None = None
    severity: Annotated[str | None, Meta(description="\"warning\": not healthy, yet the gateway does its job "
                                                     "(/health stays 200)")] = None


class HealthOut(Struct):
    status: Annotated[str, Meta(description="ok (200); warning (200: a component needs attention, the gateway "
                                            "does its job); degraded (503: it cannot)",
                                pattern="^(ok|warning|degraded)$")]
    components: dict[str, ComponentOut]
    plugins: dict[str, ComponentOut]


class PluginOut(Struct):
    name: str
    version: str
    enabled: bool
    state: str
    reason: str | None
    mount: str | None


class Plugins(Struct):
    plugins: list[PluginOut]


def core_blueprint(health: Health, metrics: Metrics, admin: AdminGuard,
                   plugin_table: Callable[[], list[dict[str, Any]]]) -> Blueprint:
    """`/health`, `/metrics` and `/api/gateway/plugins`."""
    bp = Blueprint("gatewayd_core", __name__)
    routes = Routes(bp, tag="gateway")

    @routes.get("/health", responses={200: HealthOut, 503: HealthOut})
    async def health_route() -> Any:
        """Each component and plugin: 200 when the gateway can do its job (all healthy, or only
        warnings: `status` "warning"), else 503 (with the same body, `status` "degraded")."""
        ok, doc = health.snapshot()
        return doc, (200 if ok else 503)

    @routes.get("/metrics", responses={200: Raw("text/plain", "Prometheus text format 0.0.4")})
    async def metrics_route() -> Any:
        """Counters and gauges for Prometheus."""
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    @routes.get("/api/gateway/plugins", responses={200: Plugins}, auth=ADMIN_TOKEN)
    async def plugins() -> Any:
        """Every installed plugin: version, enabled, state, and why it failed."""
        # Behind the token like all of /api/gateway/*: versions and failure reasons
        # tell an attacker what to aim at.
        if denied := admin.check():
            return denied
        return {"plugins": plugin_table()}

    return bp


def _body_done() -> bool:
    """Whether the request's body is all in (or there is none): nothing left to read."""
    if body_received():  # first: the common case, and cheaper than parsing the headers
        return True
    length = request.content_length
    return length == 0 or (length is None and "Transfer-Encoding" not in request.headers)


async def _http_error(e: HTTPException) -> Response:
    return error_response(e.code or 500, e.description or e.name)


def create_app(name: str, *, max_body_bytes: int, log: StructLogger) -> QuartTrio:
    """An app with the core's error handling and strict JSON, and no routes yet (a `LeanQuart`:
    no sessions, fewer lookups and tasks per request)."""
    app = LeanQuart(name)
    app.json = StrictJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.register_error_handler(HTTPException, _http_error)

    @app.after_request
    async def _read_body_first(response: Response) -> Response:
        # hypercorn 0.18 neither answers nor closes a keep-alive connection whose response
        # went out before the request's body came in (a 401 from the token check, a 429):
        # the client's next request on it hangs for ever. So the body (at most
        # http.max_body_bytes) is read before any answer; one too large closes instead.
        # Not again when the route read it all (every accepted body) or none was sent.
        if _body_done():
            return response
        try:
            await request.get_data()
        except HTTPException:
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(RequestEntityTooLarge)
    async def _too_large(e: RequestEntityTooLarge) -> Any:
        # Quart's 413 knows nothing of Blueprints: as a BodyTooLarge (an EncodingError) it
        # reaches the Blueprint's handler, so a family's device gets the family's shape (and
        # the document says which shape: http.openapi asks the Blueprint the same way).
        return await current_app.handle_user_exception(BodyTooLarge(max_body_bytes))

    # The core shape for these; a plugin answers in its own with handlers on its Blueprint.
    @app.errorhandler(BadJSON)
    async def _bad_json(e: BadJSON) -> Response:
        return error_response(400, str(e))

    @app.errorhandler(EncodingError)
    async def _bad_encoding(e: EncodingError) -> Response:
        return error_response(e.status, e.message, code=e.code)

    @app.errorhandler(StorageFull)
    async def _storage_full(e: StorageFull) -> Response:
        return error_response(507, f"storage full: nothing was stored ({e})")

    @app.errorhandler(StorageError)
    async def _storage_error(e: StorageError) -> Response:
        return error_response(503, f"storage unavailable: nothing was stored ({e})")

    @app.errorhandler(Exception)
    async def _crash(e: Exception) -> Response:
        # On a WebSocket there is no request context: request.path would raise here and hide e.
        log.exception("unhandled error in request", path=websocket.path if has_websocket_context() else request.path)
        return error_response(500, "internal error; see the gateway log")

    return app


def guard_plugin(blueprint: Blueprint, is_failed: Callable[[], str | None]) -> None:
    """Answer 503 on a failed plugin's routes instead of running half-started code: before
    the Blueprint's own before_request functions (a plugin's may wait for a startup that failed)."""

    async def _plugin_failed() -> None:
        reason = is_failed()
        if reason is not None:
            raise PluginUnavailable(blueprint.name, reason)

    blueprint.before_request_funcs.setdefault(None, []).insert(0, _plugin_failed)
