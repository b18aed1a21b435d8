"""The HTTP side: a QuartTrio app, the core routes, and hypercorn served in-process.

Core routes answer errors in one shape: `{"error": {"status", "code", "message"}}`.
Plugins keep their family's own shape with error handlers on their Blueprint.

Request bodies are read with `read_json_object()` / `parse_json()`: strict JSON only
(BadJSON names what is wrong and where). Responses are encoded strictly too: NaN and
Infinity are not JSON, and a strict client would refuse the whole answer.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
from flask.json.provider import DefaultJSONProvider
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Blueprint, Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..schema import Address
from ..storage import StorageError, StorageFull

if TYPE_CHECKING:
    from ..runtime import Gateway

__all__ = [
    "create_app",
    "create_plugin_app",
    "error_response",
    "serve_app",
    "require_admin",
    "BadJSON",
    "parse_json",
    "read_json_object",
    "MAX_JSON_DEPTH",
]

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


# -- strict JSON request bodies --------------------------------------------------------

# No admin or device document nests anywhere near this; json's C parser recurses (a
# RecursionError near 1,000 levels), and everything downstream that walks a document
# recurses too, so the limit sits far below either.
MAX_JSON_DEPTH = 64
# SQLite stores integers as signed 64-bit; a larger one raises OverflowError on insert.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # UTF-8 cannot encode them: SQLite refuses the string
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class BadJSON(ValueError):
    """A request body (or a field of it) the route refuses; the message names the field
    and what was wrong. Core routes answer 400 in the core shape; plugins catch it (or
    register an error handler on their Blueprint) to answer in their own."""


class _Refused:
    """What `NaN`, `Infinity`, `-Infinity`, a float beyond a double and an integer too
    long for SQLite parse to: kept as text so the walk can say what was where. (A huge
    integer is never converted: that costs quadratic time, and Python refuses more than
    4,300 digits.)"""

    def __init__(self, text: str, why: str):
        self.text, self.why = text, why


def _parse_constant(text: str) -> _Refused:
    return _Refused(text, "is not a JSON number (only finite numbers are)")


def _parse_int(text: str) -> Any:
    if len(text) <= 20:  # 19 digits and a sign; the range check is in the walk
        return int(text)
    return _Refused(text, f"is outside the signed 64-bit range {INT_MIN}..{INT_MAX}")


def _parse_float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _Refused(text, "is out of range for a 64-bit float")


def field_path(parts: tuple[Any, ...]) -> str:
    """`metadata.a[3]["odd key"]`: where a value sits in a document (`body` is the top)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _NAME.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part[:40] + ('...' if len(part) > 40 else ''))}]"
    return out if out[:1].isalpha() or out[:1] == "_" else f"body{out}"


def _shorten(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _check(doc: Any, max_depth: int) -> None:
    """Walk the parsed document without recursion; BadJSON at the first value a strict
    parser, SQLite or a UTF-8 encoder would refuse, naming its path."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(doc, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                raise BadJSON(f"{field_path(path)}: a lone surrogate (\\ud800-\\udfff) is not a Unicode character")
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if not INT_MIN <= value <= INT_MAX:
                raise BadJSON(f"{field_path(path)}: {value} is outside the signed 64-bit range {INT_MIN}..{INT_MAX}")
        elif isinstance(value, float):
            pass
        elif isinstance(value, _Refused):
            raise BadJSON(f"{field_path(path)}: {_shorten(value.text)} {value.why}")
        else:
            if len(path) >= max_depth:
                raise BadJSON(f"body: nested deeper than {max_depth} levels (at {field_path(path)})")
            if isinstance(value, dict):
                for key, item in value.items():
                    if _LONE_SURROGATE.search(key):
                        raise BadJSON(f"{field_path(path)}: a key with a lone surrogate (\\ud800-\\udfff)")
                    stack.append((item, (*path, key)))
            else:
                stack.extend((item, (*path, i)) for i, item in enumerate(value))


def parse_json(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH, name: str = "body") -> Any:
    """Parse a request body (or an MQTT payload: `name="payload"`) strictly, or raise
    BadJSON saying what and where.

    Refused: bytes that are not UTF-8; anything that is not JSON; nesting deeper than
    `max_depth`; `NaN`, `Infinity`, `-Infinity` and numbers too large for a double
    (they would come back out as non-standard JSON); integers outside SQLite's signed
    64-bit range; strings with lone surrogates (no UTF-8 for them, so SQLite refuses).
    """
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadJSON(f"{name}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        doc = json.loads(raw, parse_constant=_parse_constant, parse_int=_parse_int, parse_float=_parse_float)
    except RecursionError:
        raise BadJSON(f"{name}: nested deeper than {max_depth} levels") from None
    except ValueError as e:
        raise BadJSON(f"{name}: not JSON ({e})") from None
    try:
        _check(doc, max_depth)
    except BadJSON as e:
        text = str(e)
        raise BadJSON(name + text[4:] if name != "body" and text.startswith("body") else text) from None
    return doc


_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


async def read_json_object(*, required: bool = False) -> dict[str, Any]:
    """The current request's body as a JSON object, parsed strictly (`parse_json`).

    An empty body is `{}` unless `required`. Raises BadJSON (answer 400); a body over
    `http.max_body_bytes` has already been refused with 413. The Content-Type is not
    checked: device firmware often sends none.
    """
    raw = await request.get_data()
    if not raw:
        if required:
            raise BadJSON("body: expected a JSON object, got an empty body")
        return {}
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        raise BadJSON(f"body: expected a JSON object, got {_KINDS.get(type(doc), 'a number')}")
    return doc


class StrictJSONProvider(DefaultJSONProvider):
    """Quart's JSON provider, strict both ways: responses never hold NaN or Infinity
    (a ValueError, logged as a 500, instead of a body strict parsers refuse), and
    `request.get_json()` parses like `parse_json` (a BadJSON is Quart's 400)."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return parse_json(s) if not kwargs else super().loads(s, **kwargs)


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
        # Behind the token like all of /api/gateway/*: versions and failure reasons
        # tell an attacker what to aim at.
        if denied := require_admin(gateway):
            return denied
        return {"plugins": gateway.plugin_table()}

    return bp


def _base_app(name: str, gateway: Gateway) -> QuartTrio:
    app = QuartTrio(name)
    app.json = StrictJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = gateway.config.http.max_body_bytes
    app.register_error_handler(HTTPException, _http_error)

    @app.after_request
    async def _read_body_first(response: Response) -> Response:
        # hypercorn 0.18 neither answers nor closes a keep-alive connection whose response
        # went out before the request's body came in (a 401 from the token check, a 429):
        # the client's next request on it hangs for ever. So the body (at most
        # http.max_body_bytes) is read before any answer; one too large closes instead.
        try:
            await request.get_data()
        except HTTPException:
            response.headers["Connection"] = "close"
        return response

    # The core shape for these; a plugin answers in its own with handlers on its Blueprint.
    @app.errorhandler(BadJSON)
    async def _bad_json(e: BadJSON) -> Response:
        return error_response(400, str(e))

    @app.errorhandler(StorageFull)
    async def _storage_full(e: StorageFull) -> Response:
        return error_response(507, f"storage full: nothing was stored ({e})")

    @app.errorhandler(StorageError)
    async def _storage_error(e: StorageError) -> Response:
        return error_response(503, f"storage unavailable: nothing was stored ({e})")

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
    await serve(RefuseBadHost(app), config, shutdown_trigger=shutdown_trigger, task_status=task_status)


class RefuseBadHost:
    """ASGI wrapper: a request whose Host header is no valid host name (an empty label:
    `a..b`, a label over 63 characters) gets a 400 in the core shape. Werkzeug refuses it
    while Quart builds the request context, before any error handler of ours can answer,
    and hypercorn then sends an empty 500 (found by tests/test_fuzz_http.py)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not _valid_host(scope):
            body = json.dumps({"error": {"status": 400, "code": "bad_request",
                                         "message": "the Host header is not a valid host name"}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _valid_host(scope: dict[str, Any]) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"host":
            try:
                value.decode("latin-1").lower().encode("idna")  # what werkzeug does with it
            except UnicodeError:
                return False
    return True
