"""hypercorn serving a QuartTrio app in this trio run (`serve_app`)."""

from __future__ import annotations

import json
import logging
from time import time
from collections.abc import Callable
from typing import Any
from wsgiref.handlers import format_date_time

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart_trio import QuartTrio

from ..schema import Address
from ..tls import SiteTls
from . import handoff, keepalive, one_write
from ..admission import Admission
from .lean import LeanQuart

__all__ = ["GatewayConfig", "RefuseBadHost", "lean_framework", "serve_app"]


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
    backlog: int = 1024,
    admission: Admission | None = None,
    tls: SiteTls | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` with hypercorn in this trio run; `task_status.started(bound URLs)`.
    With `tls` (and `tls.http` set) the listener speaks HTTPS only. `backlog`: the listen
    queue's length (`[http] backlog`; hypercorn's own default is 100). `admission`: how
    many of a `LeanQuart`'s handlers run at once (`[http] max_handlers`; None: no limit)."""
    if isinstance(app, LeanQuart):
        app.admission = admission
    config = GatewayConfig()
    config.bind = [str(listen)]
    config.backlog = backlog
    config.graceful_timeout = graceful_timeout
    config.errorlog = logging.getLogger("gatewayd.http")
    config.accesslog = _access_log if access_log else None
    config.access_log_format = 'client=%(h)s method=%(m)s path="%(U)s" status=%(s)s bytes=%(b)s duration_us=%(D)s'
    if tls is not None:
        tls.hypercorn(config)
    lean_framework()
    await serve(RefuseBadHost(app), config, shutdown_trigger=shutdown_trigger, task_status=task_status)


def lean_framework() -> None:
    """hypercorn's internals patched (each version-gated, logged and left alone otherwise):
    an answer of known length in one write (`one_write`), the keep-alive timeout without a
    task per request (`keepalive`), a request's messages and an answer's bytes handed on
    without a scheduling pass each (`handoff`)."""
    one_write.enable()
    keepalive.enable()
    handoff.enable()


class GatewayConfig(HypercornConfig):
    """hypercorn's config, the headers it adds to every answer (Date, Server) made once a
    second, not per answer: the Date header has whole seconds, so the bytes are the same."""

    _made: tuple[str, int, list[tuple[bytes, bytes]]] | None = None

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        now = int(time())
        made = self._made
        if made is None or made[0] != protocol or made[1] != now:
            date = format_date_time(now).encode("ascii")  # what hypercorn's formats within this second
            made = self._made = (protocol, now, [(name, date) if name == b"date" else (name, value)
                                                 for name, value in super().response_headers(protocol)])
        return list(made[2])  # a fresh list: callers may add to it


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


# Host values that passed: a gateway is reached by a handful of names, and the IDNA
# encoding costs more than the rest of this wrapper (a bounded set: clients choose them).
_GOOD_HOSTS: set[bytes] = set()
_GOOD_HOSTS_MAX = 256


def _valid_host(scope: dict[str, Any]) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"host" and value not in _GOOD_HOSTS:
            try:
                value.decode("latin-1").lower().encode("idna")  # what werkzeug does with it
            except UnicodeError:
                return False
            if len(_GOOD_HOSTS) < _GOOD_HOSTS_MAX:
                _GOOD_HOSTS.add(value)
    return True
