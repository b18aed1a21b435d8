"""`LeanQuart`: QuartTrio without the per-request work the gateway has no use for.

Each change is an override of a class attribute or method of Quart's or quart-trio's;
the answers are the same bytes:

- no sessions: the gateway keeps none (no secret key, no cookie), yet Quart opened a
  null session per request (`NoSessions` hands out one shared `NullSession`, which
  refuses every write as Quart's does);
- `ensure_async` remembers what it answered for a function (Quart looks each before and
  after-request function up again on every request: `inspect.iscoroutinefunction`);
- `request.blueprints`, asked three times a request, is worked out once per endpoint
  (Quart imports its helper and splits the endpoint at each ask);
- the request's handler runs in the task hypercorn started for the request, beside the
  task that reads its body, where quart-trio starts a third (`LeanHTTPConnection`: a task
  start and switch less per request, the same nursery, cancellation and errors), with
  whatever of the body hypercorn already queued (all of a small one) handed over first,
  so that the handler, now first to run, finds it in rather than waits for it;
- when that is all of the body (every small request), no task at all waits for the rest:
  quart-trio's messages task would only wait for the client's leaving and cancel the
  handler; here hypercorn's queue (`handoff.AppQueue`) cancels it as that message is
  queued, and the response timeout is the same scope's deadline (a task start, its
  wake-ups, a nursery and a cancel scope less per request); that handler runs in its turn
  (`admission.Admission`: so many at once, first come first served) when the app has one;
- the request's headers are built as one list (`LeanHeaders`: a header asked for that is
  not there costs no exception);
- the URL rule each (method, path, Host) matched is remembered (`Routes`, bounded;
  werkzeug's converters only; a 404, 405 or redirect is matched again each time), and the
  request's URL adapter is bound only when something asks for it (`LeanRequestContext`);
- `before_unrouted` functions run only for requests no route matched, where an app-wide
  `before_request` would run for every request (kaiabc's answer in its own error shape);
- an answer of text or bytes with no headers given (every JSON answer) is built without
  werkzeug's header checks (`LeanResponse`: 4.1 -> 1.2 us; the same headers, in the same order).

The connection class, the request building and the URL matches rest on quart-trio's,
quart's and werkzeug's internals, so they are used only under the releases they were read
against (pinned in constraints.txt); under others, quart-trio's own are kept (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import cache, lru_cache, partial
from typing import Any, cast
from urllib.parse import urlparse

import trio
from quart.asgi import _normalise_path
from quart.ctx import RequestContext
from quart.globals import _cv_request, request_ctx
from quart.sessions import NullSession, SecureCookieSessionInterface
from quart.wrappers import Response
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers import TrioRequest, TrioResponse
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule
from werkzeug.utils import get_content_type
from werkzeug.routing.converters import (AnyConverter, FloatConverter, IntegerConverter, PathConverter,
                                         UnicodeConverter, UUIDConverter)

from ..admission import Admission, Seat, current
from .gate import untested
from .handoff import AppQueue

__all__ = ["LeanHTTPConnection", "LeanHeaders", "LeanQuart", "LeanRequest", "LeanRequestContext", "LeanResponse",
           "NoSessions", "Routes"]

log = logging.getLogger(__name__)

#: The releases (major.minor) whose internals `LeanHTTPConnection`, `LeanRequestContext` and
#: `Routes` were read against (quart-trio's connection, quart's request building, werkzeug's rules).
TESTED = {"quart-trio": "0.12", "quart": "0.22", "werkzeug": "3.1"}

_ASYNC_CACHE_MAX = 1024  # functions are the app's handlers; one made per request is not kept


class NoSessions(SecureCookieSessionInterface):
    """Sessions off: one shared, read-only `NullSession` for every request (nothing saved)."""

    _null = NullSession()

    async def open_session(self, app: Any, request: Any) -> NullSession:
        return self._null

    async def make_null_session(self, app: Any) -> NullSession:
        return self._null


@cache
def _blueprints(endpoint: str) -> list[str]:
    # Quart's `_split_blueprint_path(endpoint.rsplit(".", 1)[0])`, shared the same way.
    if "." not in endpoint:
        return []
    names = [endpoint.rsplit(".", 1)[0]]
    while "." in names[-1]:
        names.append(names[-1].rpartition(".")[0])
    return names


# werkzeug's own converters: what they make of a path segment depends on it alone (a plugin's
# may look things up), and is a str, int, float or UUID, shared safely between requests.
_PURE_CONVERTERS = (AnyConverter, FloatConverter, IntegerConverter, PathConverter, UnicodeConverter, UUIDConverter)
_ROUTES_MAX = 4096  # (method, path) pairs: a fleet's devices each poll one or two paths
# A longer path and Host are matched each time: a device's own are short (ids of at most 128
# characters), and each remembered match holds its path twice (the key, the arguments) and its
# Host, so a flood of made-up 16 KB paths or Hosts (h11's limit) would have held ~128 MB.
_ROUTE_KEY_MAX = 512


class Routes:
    """The URL rule and arguments each (method, path, Host) matched, remembered (a bounded
    number, the oldest forgotten first): werkzeug's matcher walks its rules for every
    request, and binding its adapter (the Host's IDNA check among it) costs as much again.

    Only what cannot differ between two requests of the same method, path and Host is kept
    (and only for a path and Host of at most `_ROUTE_KEY_MAX` characters: memory, not just a
    count): a match (never a 404, 405 or redirect: those are raised again each time), of a rule whose
    converters are werkzeug's own, on an app with no SERVER_NAME, subdomain or host matching.
    A rule added clears it."""

    def __init__(self, size: int = _ROUTES_MAX) -> None:
        self.size = size
        self._matched: dict[tuple[str, str, str | None], tuple[Rule, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._matched)

    def clear(self) -> None:
        """Forget every match (the rules changed)."""
        self._matched.clear()

    @staticmethod
    def key(request: Any) -> tuple[str, str, str | None]:
        """What a remembered match is looked up by."""
        return request.method, request.path, request.headers.get("Host")

    def get(self, key: tuple[str, str, str | None]) -> tuple[Rule, dict[str, Any]] | None:
        """The rule and a fresh copy of the arguments remembered for `key`, or None."""
        found = self._matched.get(key)
        if found is None:
            return None
        return found[0], dict(found[1])  # the request's own: url_value_preprocessors may change it

    def match(self, key: tuple[str, str, str | None], adapter: Any) -> tuple[Rule, dict[str, Any]]:
        """`adapter.match(return_rule=True)` (bound to the request of `key`), remembered when it may be."""
        rule, args = adapter.match(return_rule=True)
        if (len(key[1]) + len(key[2] or "") <= _ROUTE_KEY_MAX
                and all(type(c) in _PURE_CONVERTERS for c in rule._converters.values())):
            if len(self._matched) >= self.size:
                del self._matched[next(iter(self._matched))]
            self._matched[key] = (rule, dict(args))
        return rule, args


_UNBOUND: Any = object()


class LeanRequestContext(RequestContext):
    """Quart's request context, the URL match looked up in the app's `Routes` first and its
    URL adapter bound only when asked for (a match not remembered, `url_for`, OPTIONS)."""

    def __init__(self, app: Any, request: Any, session: Any = None) -> None:
        # quart 0.22's, but `url_adapter` is bound when first read (below)
        self.app = app
        self.request_websocket = request
        self._url_adapter = _UNBOUND
        request.routing_exception = None
        request.json_module = app.json
        self.session = session
        self.preserved = False
        self._cv_tokens = []
        self.flashes = None
        self._after_request_functions = []

    @property
    def url_adapter(self) -> Any:  # type: ignore[override]
        """Quart's: the app's URL map bound to this request (None without one)."""
        if self._url_adapter is _UNBOUND:
            self._url_adapter = self.app.create_url_adapter(self.request_websocket)
        return self._url_adapter

    @url_adapter.setter
    def url_adapter(self, value: Any) -> None:
        self._url_adapter = value

    async def push(self) -> None:
        # quart's (whose `super()._push()` would skip the `_push` below)
        await self._push_appctx(_cv_request.set(self))
        await self._push()

    async def _push(self) -> None:
        # quart's, the match first looked up (`match_request`), the adapter bound only if need be
        if self.session is None:
            session_interface = self.app.session_interface
            self.session = await self.app.ensure_async(session_interface.open_session)(self.app, self.request_websocket)
            if self.session is None:
                self.session = await session_interface.make_null_session(self.app)
        self.match_request()

    def match_request(self) -> None:
        """Quart's: the request's url_rule and view_args, or its routing_exception."""
        app = cast(LeanQuart, self.app)
        request = self.request_websocket
        key = None
        if app.routes_cached():
            key = Routes.key(request)
            found = app.routes.get(key)
            if found is not None:
                request.url_rule, request.view_args = found
                return
        adapter = self.url_adapter  # a bad Host raises here, as where Quart binds it
        if adapter is None:
            return
        try:
            if key is not None:
                request.url_rule, request.view_args = app.routes.match(key, adapter)
            else:
                request.url_rule, request.view_args = adapter.match(return_rule=True)
        except HTTPException as exception:
            request.routing_exception = exception  # type: ignore[assignment]


class LeanRequest(TrioRequest):
    """quart-trio's request, its `blueprints` worked out once per endpoint."""

    @property
    def blueprints(self) -> list[str]:
        """The names of the matched endpoint's blueprints, innermost first (Quart's)."""
        rule = self.url_rule
        return [] if rule is None else _blueprints(rule.endpoint)


class LeanHTTPConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, the handler run in the request's own task."""

    async def __call__(self, receive: Any, send: Any) -> None:
        request = self._create_request_from_scope(send)
        queue = getattr(receive, "__self__", None)
        queue = queue if isinstance(queue, AppQueue) else None
        whole = _take_what_came(request, queue)
        if whole is None:
            return  # the client left before its request was handled: quart-trio cancels it unhandled
        if whole and queue is not None:
            # The body is in: the only message left to come is the client's leaving, which
            # cancels the handler as quart-trio's messages task would (no task to wait for it).
            with trio.CancelScope() as scope:
                queue.on_disconnect = scope.cancel
                if _left(queue):
                    scope.cancel()
                await self._answer(scope, request, send)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.handle_messages, nursery, request, receive)
            # quart-trio starts this as a second child; the nursery's body is the same scope.
            await self.handle_request(nursery, request, send)

    async def _answer(self, scope: trio.CancelScope, request: Any, send: Any) -> None:
        """quart-trio's `handle_request` in `scope`, whose deadline is its response timeout:
        quart-trio's own sends the answer within a `move_on_after` of its own, then cancels the
        nursery, and either way the request ends there, its answer cut short. The handler runs
        in its turn (`LeanQuart.admission`), the answer is sent after it."""
        admission = cast(LeanQuart, self.app).admission
        if admission is None:
            response = await self.app.handle_request(request)
        else:
            seat = Seat(admission, await admission.enter(), trio.lowlevel.current_task())
            held = current.set(seat)  # for a wait elsewhere (admission.waiting_elsewhere)
            try:
                response = await self.app.handle_request(request)
            finally:
                current.reset(held)
                seat.leave()
        if isinstance(response, Response) and response.timeout != Ellipsis:
            timeout = cast(Any, response.timeout)
        else:
            timeout = self.app.config["RESPONSE_TIMEOUT"]
        if timeout is not None:
            scope.deadline = trio.current_time() + timeout
        await self._send_response(send, response)
        scope.cancel()

    def _create_request_from_scope(self, send: Any) -> Any:
        # quart's, the headers' list made at once (werkzeug's `add` checks each value for
        # newlines, which h11 refused already): the same names, values and order, in
        # `LeanHeaders` (a missing one asked for costs no exception)
        scope = self.scope
        headers = LeanHeaders()
        headers._list = [("Remote-Addr", (scope.get("client") or ["<local>"])[0]),
                         *[(name.decode("latin1").title(), value.decode("latin1")) for name, value in scope["headers"]]]
        if scope["http_version"] < "1.1":
            headers.setdefault("Host", self.app.config["SERVER_NAME"] or "")
        path = scope["path"]
        path = path if path[0] == "/" else urlparse(path).path
        root_path = scope.get("root_path", "")
        if root_path != "":
            path = _normalise_path(path, root_path)
        return self.app.request_class(
            scope["method"], scope["scheme"], path, scope["query_string"], headers, root_path,
            scope["http_version"], max_content_length=self.app.config["MAX_CONTENT_LENGTH"],
            body_timeout=self.app.config["BODY_TIMEOUT"], send_push_promise=partial(self._send_push_promise, send),
            scope=scope)


class LeanHeaders(Headers):
    """werkzeug's request headers, a name that is not there answered without an exception:
    werkzeug's `get` and `in` build a BadRequestKeyError (an HTTPException) for each miss, and
    a request asks for several headers it does not carry (Transfer-Encoding, X-API-Key, ...)."""

    def get(self, key: str, default: Any = None,  # type: ignore[override]
            type: Callable[[str], Any] | None = None) -> Any:
        """werkzeug's: the first value of `key` (any case), converted by `type` if given;
        `default` when it is missing or `type` raises ValueError."""
        wanted = key.lower()
        for name, value in self._list:
            if name.lower() == wanted:
                break
        else:
            return default
        if type is None:
            return value
        try:
            return type(value)
        except ValueError:
            return default

    def __contains__(self, key: object) -> bool:
        wanted = key.lower()  # type: ignore[attr-defined]  # werkzeug's: a name (str)
        return any(name.lower() == wanted for name, _ in self._list)

    def __eq__(self, other: object) -> bool:
        # werkzeug's compares only headers of the very same class: these equal werkzeug's own
        if isinstance(other, Headers) and other.__class__ is not self.__class__:
            return Headers(self._list) == other
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]


@lru_cache(maxsize=64)
def _content_type(mimetype: str) -> str:
    return get_content_type(mimetype, "utf-8")  # werkzeug's: a charset added to text types


class LeanResponse(TrioResponse):
    """quart-trio's response (its file and iterable bodies run under trio: quart's own run a
    sync iterable in asyncio's executor); one of text or bytes with no headers, status or
    content type given (what the JSON provider makes) gets its Content-Type and
    Content-Length set straight into a new header list, as werkzeug's `__init__` and
    `set_data` would set them (werkzeug checks each value for newlines, and looks for a
    Content-Type by raising a KeyError)."""

    def __init__(self, response: Any = None, status: int | None = None, headers: Any = None,
                 mimetype: str | None = None, content_type: str | None = None) -> None:
        kind = type(response)
        if ((kind is str or kind is bytes) and status is None and headers is None and content_type is None
                and self.automatically_set_content_length):
            data = response.encode() if kind is str else response
            self.headers = Headers()
            if mimetype is None:
                mimetype = self.default_mimetype
            self.headers._list = [("Content-Type", _content_type(mimetype)), ("Content-Length", str(len(data)))]
            if self.default_status == 200:
                self._status, self._status_code = "200 OK", 200  # what werkzeug's status setter makes of 200
            else:
                self.status = self.default_status
            self.timeout = Ellipsis
            self.response = self.data_body_class(data)
            return
        super().__init__(response, status, headers, mimetype, content_type)


def _take_what_came(request: Any, queue: AppQueue | None) -> bool | None:
    """Hand the request what the server already queued of its body (all of a small one: it
    came with the head), as quart's `handle_messages` does, so a handler running before that
    task finds it in and does not wait. True when the body is all in, False when more is to
    come, None when the queue says the client left.

    `queue` is handoff's `AppQueue` (None: another server, or hypercorn's own channel:
    everything is left to `handle_messages`)."""
    if queue is None:
        return False
    while True:
        try:
            message = queue.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return False
        if message["type"] == "http.request":
            request.body.append(message.get("body", b""))
            if not message.get("more_body", False):
                request.body.set_complete()
                return True
        elif message["type"] == "http.disconnect":
            return None


def _left(queue: AppQueue) -> bool:
    """Whether the client's leaving is queued already (after a whole body nothing else comes)."""
    try:
        return queue.receive_nowait()["type"] == "http.disconnect"
    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
        return False


def _why_not() -> str:
    """Why the overrides are off ("" when they may be on)."""
    return untested(TESTED)


_gated = _why_not()  # at import: what each request's URL match asks


def _connection_class() -> type[TrioASGIHTTPConnection]:
    why = _why_not()
    if why:
        log.warning("http: %s: quart-trio's own connection class (a task more per request) and "
                    "URL matching (no match remembered)", why)
        return TrioASGIHTTPConnection
    return LeanHTTPConnection


def _response_class() -> type[Response]:
    return TrioResponse if _why_not() else LeanResponse  # (the connection class's warning says why)


class LeanQuart(QuartTrio):
    """QuartTrio without sessions and with the per-request lookups above remembered."""

    asgi_http_class = _connection_class()
    request_class = LeanRequest
    response_class = _response_class()
    session_interface = NoSessions()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.routes = Routes()  # before Quart's __init__, which adds the static route
        super().__init__(*args, **kwargs)
        self._async_of: dict[Callable[..., Any], Callable[..., Awaitable[Any]]] = {}
        self.unrouted_funcs: list[Callable[[], Awaitable[Any]]] = []
        #: How many handlers run at once (admission.py); None: no limit. The gateway's
        #: listeners share one (`[http] max_handlers`).
        self.admission: Admission | None = None

    def ensure_async(self, func: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:  # type: ignore[override]
        """Quart's, remembered per function (a bounded number: the app's own handlers)."""
        try:
            return self._async_of[func]
        except KeyError:
            pass
        except TypeError:  # unhashable: asked every time
            return super().ensure_async(func)
        result = super().ensure_async(func)
        if len(self._async_of) < _ASYNC_CACHE_MAX:
            self._async_of[func] = result
        return result

    def routes_cached(self) -> bool:
        """Whether URL matches may be remembered: no SERVER_NAME, subdomain or host matching,
        where the Host header would choose the rule."""
        return (not _gated and self.config["SERVER_NAME"] is None and not self.subdomain_matching
                and not self.url_map.host_matching)

    def add_url_rule(self, *args: Any, **kwargs: Any) -> None:
        """Quart's; the remembered URL matches forgotten."""
        super().add_url_rule(*args, **kwargs)
        self.routes.clear()

    def request_context(self, request: Any) -> RequestContext:
        """Quart's, a `LeanRequestContext` (the URL match remembered)."""
        return LeanRequestContext(self, request)

    def before_unrouted(self, func: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """Register an async function run before a request that no route matched (a 404,
        405 or redirect in `request.routing_exception`), first, as an app-wide
        `before_request` would be, but not for every other request: a Blueprint's answer
        in its own shape for paths under its mount that it has no route for. A response
        it returns is the answer."""
        self.unrouted_funcs.append(func)
        return func

    async def preprocess_request(self, request_context: Any = None) -> Any:
        """Quart's, after the `before_unrouted` functions when no route matched."""
        if self.unrouted_funcs and (request_context or request_ctx).request.routing_exception is not None:
            for function in self.unrouted_funcs:
                result = await function()
                if result is not None:
                    return result
        return await super().preprocess_request(request_context)
