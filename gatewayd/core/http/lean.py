"""`LeanQuart`: QuartTrio without the per-request work the gateway has no use for.

Every change goes through a hook Quart documents for it (a class attribute, a method to
override); the answers are the same bytes:

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
  so that the handler, now first to run, finds it in rather than waits for it. It
  overrides quart-trio's connection class, so only under the release it was read against
  (pinned in constraints.txt); under another, quart-trio's own is kept (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

import trio
from quart.sessions import NullSession, SecureCookieSessionInterface
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers import TrioRequest

from .gate import release as _release

__all__ = ["LeanHTTPConnection", "LeanQuart", "LeanRequest", "NoSessions"]

log = logging.getLogger(__name__)

#: The release (major.minor) of quart-trio whose connection class `LeanHTTPConnection` overrides.
TESTED = {"quart-trio": "0.12"}

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
        if not _take_what_came(request, receive):
            return  # the client left before its request was handled: quart-trio cancels it unhandled
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.handle_messages, nursery, request, receive)
            # quart-trio starts this as a second child; the nursery's body is the same scope.
            await self.handle_request(nursery, request, send)


def _take_what_came(request: Any, receive: Any) -> bool:
    """Hand the request what the server already queued of its body (all of a small one: it
    came with the head), as quart's `handle_messages` does, so a handler running before that
    task finds it in and does not wait. False when the queue says the client left.

    `receive` is hypercorn's memory channel's `receive` (trio's public type); anything else
    is left to `handle_messages`."""
    channel = getattr(receive, "__self__", None)
    if not isinstance(channel, trio.MemoryReceiveChannel):
        return True
    while True:
        try:
            message = channel.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return True
        if message["type"] == "http.request":
            request.body.append(message.get("body", b""))
            if not message.get("more_body", False):
                request.body.set_complete()
                return True
        elif message["type"] == "http.disconnect":
            return False


def _connection_class() -> type[TrioASGIHTTPConnection]:
    found = _release("quart-trio")
    if found != TESTED["quart-trio"]:
        log.warning("http: quart-trio %s (tested: %s): its own connection class, a task more per request",
                    found, TESTED["quart-trio"])
        return TrioASGIHTTPConnection
    return LeanHTTPConnection


class LeanQuart(QuartTrio):
    """QuartTrio without sessions and with the per-request lookups above remembered."""

    asgi_http_class = _connection_class()
    request_class = LeanRequest
    session_interface = NoSessions()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._async_of: dict[Callable[..., Any], Callable[..., Awaitable[Any]]] = {}

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
