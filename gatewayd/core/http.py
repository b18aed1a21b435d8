"""The HTTP side: a QuartTrio app, the core routes, and hypercorn served in-process.

Core routes answer errors in one shape: `{"error": {"status", "code", "message"}}`.
Plugins keep their family's own shape with error handlers on their Blueprint.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Blueprint, Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .schema import Address

if TYPE_CHECKING:
    from .runtime import Gateway

__all__ = ["create_app", "create_plugin_app", "error_response", "serve_app", "require_admin"]

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
    507: "insufficient_storage",
}


def error_response(status: int, message: str, code: str | None = None, **headers: str) -> Response:
    """The core's error shape, e.g. `error_response(404, "no such device")`."""
    body = {"error": {"status": status, "code": code or _CODES.get(status, "error"), "message": message}}
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers)
    return response


async def _http_error(e: HTTPException) -> Response:
    return error_response(e.code or 500, e.description or e.name)


def require_admin(gateway: Gateway) -> Response | None:
    """None when the request carries the admin token, else the 401/503 to return."""
    token = gateway.admin_token()
    if token is None:
        return error_response(
            503, f"the admin API is disabled: set the environment variable {gateway.config.http.admin_token_env}"
        )
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        return error_response(401, "missing or wrong admin token (Authorization: Bearer <token>)")
    return None


def _core_blueprint(gateway: Gateway) -> Blueprint:
    bp = Blueprint("gatewayd_core", __name__)

    @bp.get("/health")
    async def health() -> Any:
        ok, doc = gateway.health.snapshot()
        return doc, (200 if ok else 503)

    @bp.get("/metrics")
    async def metrics() -> Any:
        return Response(gateway.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    @bp.get("/api/gateway/plugins")
    async def plugins() -> Any:
        return {"plugins": gateway.plugin_table()}

    return bp


def _base_app(name: str, gateway: Gateway) -> QuartTrio:
    app = QuartTrio(name)
    app.config["MAX_CONTENT_LENGTH"] = gateway.config.http.max_body_bytes
    app.register_error_handler(HTTPException, _http_error)

    @app.errorhandler(Exception)
    async def _crash(e: Exception) -> Response:
        gateway.log.exception("unhandled error in request", path=request.path)
        return error_response(500, "internal error; see the gateway log")

    return app


def create_app(gateway: Gateway) -> QuartTrio:
    """The main app: core routes plus every plugin Blueprint at its mount point."""
    app = _base_app("gatewayd", gateway)
    app.register_blueprint(_core_blueprint(gateway))
    return app


def create_plugin_app(gateway: Gateway, plugin: str, blueprint: Blueprint) -> QuartTrio:
    """A dedicated listener's app: one plugin's routes at `/`."""
    app = _base_app(f"gatewayd-{plugin}", gateway)
    app.register_blueprint(blueprint, url_prefix=None, name=f"{blueprint.name}_root")
    return app


def guard_plugin(blueprint: Blueprint, is_failed: Callable[[], str | None]) -> None:
    """Answer 503 on a failed plugin's routes instead of running half-started code."""

    @blueprint.before_request
    async def _plugin_failed() -> Response | None:
        reason = is_failed()
        if reason is not None:
            return error_response(503, f"plugin unavailable: {reason}")
        return None


class _DropEarlyClose(logging.Filter):
    """hypercorn logs a request twice when the client closes its end first (`status=-`,
    then the real line once the response completes): keep only the real one."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, dict) and args.get("s") == "-")


_access_log = logging.getLogger("gatewayd.access")
_access_log.addFilter(_DropEarlyClose())


async def serve_app(
    app: QuartTrio,
    listen: Address,
    *,
    shutdown_trigger: Callable[[], Any],
    graceful_timeout: float,
    access_log: bool,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` with hypercorn in this trio run; `task_status.started(bound URLs)`."""
    config = HypercornConfig()
    config.bind = [str(listen)]
    config.graceful_timeout = graceful_timeout
    config.errorlog = logging.getLogger("gatewayd.http")
    config.accesslog = _access_log if access_log else None
    config.access_log_format = 'client=%(h)s method=%(m)s path="%(U)s" status=%(s)s bytes=%(b)s duration_us=%(D)s'
    await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
