"""Routes declared once: what they take, what they answer, who may call them.

One declaration per route validates its request and is its operation in the OpenAPI
documents (`http.openapi`)::

    class NewReading(Struct, forbid_unknown_fields=True):
        value: Annotated[float, Meta(ge=-1e6, le=1e6)]

    routes = Routes(bp, tag="meter")           # errors in the gateway's shape (ErrorBody)

    @routes.post("/devices/<device_id>/readings", body=NewReading, responses={201: Stored},
                 auth=DeviceAuth.api_key(), summary="Store a reading")
    async def post_reading(device_id: str, body: NewReading) -> tuple[dict[str, Any], int]:
        ...

The view gets the validated `body=` and `query=` (msgspec Structs) as keyword arguments
after its path parameters. A request that does not fit raises `InvalidInput` (a
`BadJSON`: field, reason) before the view runs, and the Blueprint's BadJSON handler
answers it in the family's shape: the body is read strictly first (`parse_json`:
not UTF-8, NaN, nesting, 64-bit integers), then converted (`protocol.validate`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar, Unpack

import msgspec
from quart import Blueprint, has_websocket_context, request, websocket
from werkzeug.datastructures import ImmutableMultiDict

from ...protocol.encoding import EncodingError
from ...protocol.strict_json import BadJSON, parse_json
from ...protocol.validate import InvalidInput, PathParser, QueryParser, convert
from .body import BodyTooLarge, read_body, request_data

__all__ = ["ADMIN_TOKEN", "CORE", "FAMILY", "Answerer", "AuthScheme", "Declaration", "DeviceAuth", "ErrorBody", "ErrorDetail", "InvalidInput",
           "Operation", "Raw", "Routes", "operation_of"]

View = TypeVar("View", bound=Callable[..., Awaitable[Any]])
FAMILY = "family"  # a refusal the family's own code answers, in its shape
CORE = "core"  # a refusal in the core's shape whatever the Blueprint's
Answerer = type[Exception] | str  # FAMILY, CORE, or the exception the core raises for it
_ATTRIBUTE = "__gatewayd_operation__"


class ErrorDetail(msgspec.Struct):
    status: int
    code: str
    message: str


class ErrorBody(msgspec.Struct):
    """The gateway's error shape: `{"error": {"status", "code", "message"}}` (`error_response`)."""

    error: ErrorDetail


@dataclass(frozen=True)
class Raw:
    """A body that is not JSON: `Raw("application/octet-stream")`, `Raw("text/plain")`."""

    media_type: str
    description: str = ""


@dataclass(frozen=True)
class AuthScheme:
    """How a caller proves who it is, as OpenAPI says it (`security_schemes`, each an
    OpenAPI Security Scheme Object, all required together), and what a refusal is.

    The declaration documents; the route's code checks (`ctx.auth.*`,
    `ctx.http.require_admin()`), and the schemathesis test sends requests without the
    credentials to every operation that declares one, so the two cannot drift apart."""

    security_schemes: Mapping[str, Mapping[str, Any]]
    refusals: Mapping[int, str]
    core_shaped: bool = False  # refusals in the core's shape whatever the Blueprint's
    either: bool = False  # any one of the schemes will do (else all of them, together)

    def requirements(self) -> list[dict[str, list[str]]]:
        """The operation's OpenAPI `security`: alternatives, each a set of schemes."""
        names = list(self.security_schemes)
        return [{n: []} for n in names] if self.either else [{n: [] for n in names}]


ADMIN_TOKEN = AuthScheme(
    {"adminToken": {"type": "http", "scheme": "bearer",
                    "description": "The admin token: the value of the environment variable http.admin_token_env "
                                   "names (GATEWAYD_ADMIN_TOKEN)."}},
    {401: "missing or wrong admin token", 503: "no admin token is configured: the admin API is disabled"},
    core_shaped=True,
)
"""The admin token (`Authorization: Bearer`); refusals in the core's shape."""

_DEVICE_REFUSALS = {401: "unknown device or wrong credential", 403: "the device is disabled (or not yet claimed)",
                    429: "too many failures from this address: locked out for a while (Retry-After)"}


class DeviceAuth:
    """A family's device authentication, one constructor per `ctx.auth` helper."""

    @staticmethod
    def api_key(header: str = "X-API-Key") -> AuthScheme:
        """`await ctx.auth.api_key(...)`: the device's key in a header."""
        return AuthScheme({"deviceKey": {"type": "apiKey", "in": "header", "name": header,
                                         "description": "The device's own key."}}, _DEVICE_REFUSALS)

    @staticmethod
    def bearer_jwt() -> AuthScheme:
        """`await ctx.auth.bearer_jwt(...)`: `Authorization: Bearer <JWT>` from `ctx.auth.issue_jwt`."""
        return AuthScheme({"deviceJwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                         "description": "A device token the gateway issued (HS256)."}},
                          _DEVICE_REFUSALS)

    @staticmethod
    def signature(header: str = "X-Device-Signature") -> AuthScheme:
        """`await ctx.auth.signature(...)`: an HMAC-SHA256 of the body with the device's signing secret."""
        return AuthScheme({"deviceSignature": {"type": "apiKey", "in": "header", "name": header,
                                               "description": "HMAC-SHA256 of the raw body with the device's "
                                                              "signing secret, hex or base64."}}, _DEVICE_REFUSALS)

    @staticmethod
    def token(field: str = "device_token") -> AuthScheme:
        """`await ctx.auth.body_token(...)`: a token in the query (or the JSON body: see its description)."""
        return AuthScheme({"deviceToken": {"type": "apiKey", "in": "query", "name": field,
                                           "description": f"The device's token, as `{field}` in the query "
                                                          "string or in the JSON body."}}, _DEVICE_REFUSALS)

    @staticmethod
    def device_key(id_header: str = "X-Device-Id", key_header: str = "X-Auth-Key") -> AuthScheme:
        """`await ctx.auth.device_key(...)`: an id header and a key header, together."""
        return AuthScheme({"deviceId": {"type": "apiKey", "in": "header", "name": id_header},
                           "deviceAuthKey": {"type": "apiKey", "in": "header", "name": key_header}},
                          _DEVICE_REFUSALS)


@dataclass
class Operation:
    """One declared route: everything its OpenAPI operation says, and its validators."""

    summary: str
    description: str
    body: Any
    query: Any
    path: Mapping[str, Any]
    responses: Mapping[int, Any]
    errors: Mapping[int, str]
    auth: AuthScheme | None
    error: Any
    tag: str | None
    hidden: bool
    max_inflated: int | None = None
    body_required: bool = field(init=False)
    parse_query: QueryParser | None = field(init=False)
    parse_path: dict[str, PathParser] = field(init=False)

    def __post_init__(self) -> None:
        self.parse_path = {name: PathParser(tp) for name, tp in self.path.items()}
        self.parse_query = QueryParser(self.query) if self.query is not None else None
        self.body_required = self.body is not None and _required(self.body)

    def error_statuses(self) -> dict[int, tuple[str, tuple[Answerer, ...]]]:
        """status -> (description, who answers it) of every refusal this route may answer.

        Who answers: FAMILY (the family's code, in its shape), CORE (the core's shape
        whatever the Blueprint's), or the exception the core raises before the view runs:
        in the family's shape when the route's Blueprint handles it, else in the core's
        (`http.openapi` asks the Blueprint, as Quart does)."""
        out: dict[int, tuple[str, tuple[Answerer, ...]]] = {}
        if self.body is not None or self.query is not None or self.path:
            out[400] = ("the request is invalid; the message names the field and what is wrong", (BadJSON,))
        if self.body is not None:
            out[413] = ("the body is larger than http.max_body_bytes", (BodyTooLarge,))
        if self.body is not None and self.max_inflated is not None:
            out[400] = (out[400][0] + "; or a gzip or zstd body is corrupt or truncated", (BadJSON, EncodingError))
            out[413] = (f"the body is larger than http.max_body_bytes, or than {self.max_inflated} bytes once "
                        "inflated", (EncodingError,))
            out[415] = ("a Content-Encoding other than gzip, zstd or identity", (EncodingError,))
        if self.auth is not None:
            answerer: Answerer = CORE if self.auth.core_shaped else FAMILY
            out.update({s: (d, (answerer,)) for s, d in self.auth.refusals.items()})
        for status, description in self.errors.items():
            before = out.get(status)
            out[status] = (f"{before[0]}; or {description}", (*before[1], FAMILY)) if before else \
                (description, (FAMILY,))
        return out


def _required(tp: Any) -> bool:
    """A body is required unless an empty one (read as `{}`) converts."""
    try:
        msgspec.convert({}, tp)
    except msgspec.ValidationError:
        return True
    return False


def operation_of(view: Any) -> Operation | None:
    """The declaration of a registered view function, or None."""
    return getattr(view, _ATTRIBUTE, None)


class Declaration(TypedDict, total=False):
    """What a route may declare (every key optional): see `Routes.route`."""

    summary: str
    description: str
    body: Any
    query: Any
    path: Mapping[str, Any]
    responses: Mapping[int, Any]
    errors: Mapping[int, str]
    auth: AuthScheme | None
    hidden: bool
    max_inflated: int


class Routes:
    """Declared routes on a Quart Blueprint: `@routes.get(rule, ...)`, `.post`, `.put`,
    `.patch`, `.delete`, each `Blueprint.route` plus a declaration.

    `error` is the msgspec type of the family's error bodies (default: the gateway's
    `ErrorBody`); `tag` groups the operations in the documents; `auth` is the default
    of every route (`auth=None` on a route makes it public).
    """

    def __init__(self, blueprint: Blueprint, *, error: Any = ErrorBody, tag: str | None = None,
                 auth: AuthScheme | None = None) -> None:
        self.blueprint = blueprint
        self.error = error
        self.tag = tag
        self.auth = auth

    def route(self, rule: str, method: str, *, websocket: bool = False,
              **declaration: Unpack[Declaration]) -> Callable[[View], View]:
        """Register the decorated view for `method` on `rule`, declared.

        `body`: the JSON body's type (a msgspec Struct, or any type msgspec converts);
        the view gets it as `body=`. `query`: a Struct of the query string, the view gets
        it as `query=`. `path`: types of path parameters beyond the rule's converters
        (`{"device_id": Annotated[str, Meta(max_length=128)]}`). `responses`: status ->
        the body's type, `Raw(...)` or None (no body). `errors`: status -> when it happens,
        answered in the Blueprint's error shape. `auth`: an AuthScheme, None (public),
        or the Routes' default. `hidden`: served, but in no document (pages for people).
        `max_inflated`: a body sent with `Content-Encoding: gzip` or `zstd` is inflated
        (`read_body(max_inflated=N)`) before it is parsed; EncodingError refuses it.
        The view's docstring's first line is the summary unless `summary` is given.
        """
        d = declaration

        def register(view: View) -> View:
            first, _, rest = (view.__doc__ or "").strip().partition("\n\n")
            op = Operation(d.get("summary") or " ".join(first.split()), d.get("description") or " ".join(rest.split()),
                           d.get("body"), d.get("query"), dict(d.get("path", {})),
                           dict(d.get("responses", {200: None})), dict(d.get("errors", {})),
                           d["auth"] if "auth" in d else self.auth, self.error, self.tag, d.get("hidden", False),
                           d.get("max_inflated"))
            wrapped = _validating(op, view)
            self.blueprint.add_url_rule(rule, view_func=wrapped, methods=[method], websocket=websocket)
            return wrapped

        return register

    def get(self, rule: str, **declaration: Unpack[Declaration]) -> Callable[[View], View]:
        return self.route(rule, "GET", **declaration)

    def post(self, rule: str, **declaration: Unpack[Declaration]) -> Callable[[View], View]:
        return self.route(rule, "POST", **declaration)

    def put(self, rule: str, **declaration: Unpack[Declaration]) -> Callable[[View], View]:
        return self.route(rule, "PUT", **declaration)

    def patch(self, rule: str, **declaration: Unpack[Declaration]) -> Callable[[View], View]:
        return self.route(rule, "PATCH", **declaration)

    def delete(self, rule: str, **declaration: Unpack[Declaration]) -> Callable[[View], View]:
        return self.route(rule, "DELETE", **declaration)

    def websocket(self, rule: str, **declaration: Unpack[Declaration]) -> Callable[[View], View]:
        """A WebSocket route, documented as the GET of its handshake (its `query` is validated)."""
        return self.route(rule, "GET", websocket=True, **declaration)


def _validating(op: Operation, view: View) -> View:
    """The view, behind its declaration's checks; Structs it returns become JSON."""

    @functools.wraps(view)
    async def validated(**kwargs: Any) -> Any:
        for name, parse in op.parse_path.items():
            kwargs[name] = parse(kwargs[name]) if name in kwargs else None
        if op.parse_query is not None:
            source = websocket if has_websocket_context() else request
            # werkzeug parses even an empty query string into a new MultiDict (2.5 us): a poll sends none
            kwargs["query"] = op.parse_query(source.args if source.query_string else _NO_ARGS)
        if op.body is not None:
            raw = await request_data() if op.max_inflated is None else await read_body(max_inflated=op.max_inflated)
            if not raw and op.body_required:
                raise BadJSON("body: expected a JSON object, got an empty body")
            kwargs["body"] = convert(parse_json(raw) if raw else {}, op.body)
        return _plain(await view(**kwargs))

    setattr(validated, _ATTRIBUTE, op)
    return validated  # type: ignore[return-value]


_NO_ARGS: ImmutableMultiDict[str, str] = ImmutableMultiDict()


def _plain(result: Any) -> Any:
    """msgspec Structs in an answer (alone or first of a tuple) as plain JSON values."""
    if isinstance(result, msgspec.Struct):
        return msgspec.to_builtins(result)
    if isinstance(result, tuple) and result and isinstance(result[0], msgspec.Struct):
        return (msgspec.to_builtins(result[0]), *result[1:])
    return result


def declared_types(ops: Sequence[Operation]) -> list[Any]:
    """Every type the operations name (for one `schema_components` call)."""
    types: list[Any] = []
    for op in ops:
        types += [t for t in (op.body, op.query, op.error) if t is not None]
        types += [t for t in op.responses.values() if t is not None and not isinstance(t, Raw)]
        types += list(op.path.values())
    return types

