"""Dashboard sessions: the admin token, exchanged once for a cookie, kept server-side.

A technician types the admin token into the log-in form (a POST body: never a URL);
the gateway answers with a random session id in a cookie (HttpOnly, SameSite=Strict,
Secure over TLS) and keeps only the id's SHA-256, in memory: a restart logs everybody
out, which a site box can afford. A session ends at log-out, `idle_s` after its last
request, `ttl_s` after log-in, or when the admin token changes (rotating the token is
how an operator throws everybody out). At most `max_sessions` live at once; a new one
pushes out the one used longest ago, so memory stays bounded whoever logs in.

Log-out (like anything that will change state) needs the session's CSRF token in the
form *and*, when the browser says where the request comes from (every browser does
for a POST), the same origin; log-in needs the same origin (forging one would take
the admin token itself). Read-only pages need only the cookie, which SameSite=Strict
keeps off requests that other sites start.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

from ..http.app import AdminGuard

__all__ = ["COOKIE", "DashboardSessions", "Session", "same_origin"]

COOKIE = "gatewayd_session"


@dataclass
class Session:
    csrf: str  # the token every state-changing form carries
    owner: str  # its name as a live-stream subscriber (the per-token connection limit)
    token_digest: bytes  # SHA-256 of the admin token it was opened with
    created: float
    last_used: float


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def same_origin(headers: Mapping[str, str]) -> bool:
    """False when the request says it comes from another origin than the one it is sent to.

    Browsers send `Origin` on every POST and WebSocket handshake; a request without
    one (a same-origin GET, curl) passes. Proxies that rewrite `Host` need to keep it.
    """
    origin = headers.get("Origin")
    if origin is None:
        return True
    host = headers.get("Host", "")
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(host) and netloc.lower() == host.lower()


def cookie_value(headers: Mapping[str, str]) -> str | None:
    """The session cookie from a `Cookie` header (WebSocket handshakes have no cookie jar of Quart's)."""
    raw = headers.get("Cookie", "")
    if COOKIE not in raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


class DashboardSessions:
    """Log-in, look-up and log-out of dashboard sessions (see the module docstring)."""

    def __init__(self, admin: AdminGuard, *, ttl_s: float = 12 * 3600, idle_s: float = 3600,
                 max_sessions: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        self.admin = admin
        self.ttl_s = ttl_s
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        # Monotonic by default: a site box without a battery-backed clock jumps by years
        # when NTP first answers, and must not end (or extend) every session then.
        self.clock = clock
        self._sessions: dict[bytes, Session] = {}  # SHA-256 of the cookie value -> session

    def __len__(self) -> int:
        return len(self._sessions)

    def login(self, offered: str) -> tuple[str, Session] | str:
        """(cookie value, session) for the right admin token, else why not (a message to show)."""
        token = self.admin.token()
        if token is None:
            return f"the admin token is not set: set the environment variable {self.admin.token_env} and restart"
        if not offered or not hmac.compare_digest(_digest(offered), _digest(token)):
            return "wrong token"
        now = self.clock()
        self._expire(now)
        while len(self._sessions) >= self.max_sessions:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].last_used)
            del self._sessions[oldest]
        value = secrets.token_urlsafe(32)
        key = _digest(value)
        session = Session(csrf=secrets.token_urlsafe(32), owner=f"session:{key.hex()[:12]}",
                          token_digest=_digest(token), created=now, last_used=now)
        self._sessions[key] = session
        return value, session

    def find(self, value: str | None) -> Session | None:
        """The live session of this cookie value (and it counts as used), or None."""
        if not value or len(value) > 128:
            return None
        key = _digest(value)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self.clock()
        token = self.admin.token()
        if (now - session.created > self.ttl_s or now - session.last_used > self.idle_s or token is None
                or not hmac.compare_digest(session.token_digest, _digest(token))):
            del self._sessions[key]
            return None
        session.last_used = now
        return session

    def form_token(self, cookies: Mapping[str, str]) -> str | None:
        """The form token (CSRF) of the live session in these cookies, for a form a page
        (or a plugin's panel) draws; None without a session."""
        session = self.find(cookies.get(COOKIE))
        return session.csrf if session is not None else None

    def form_allowed(self, headers: Mapping[str, str], cookies: Mapping[str, str], token: str) -> bool:
        """Whether a state-changing form may be obeyed: a live session in the cookies, the
        same origin, and that session's form token in the form (`token`)."""
        session = self.find(cookies.get(COOKIE))
        return (session is not None and same_origin(headers)
                and hmac.compare_digest(token.encode("utf-8", "surrogatepass"), session.csrf.encode()))

    def signed_in(self, cookies: Mapping[str, str]) -> bool:
        """Whether these cookies hold a live session (the API documents' page accepts one)."""
        return self.find(cookies.get(COOKIE)) is not None

    def logout(self, value: str | None) -> bool:
        """End the session of this cookie value; False if there was none."""
        if not value:
            return False
        return self._sessions.pop(_digest(value), None) is not None

    def live_owner(self, headers: Mapping[str, str]) -> str | None:
        """For the live endpoints: the subscriber name of the session in `headers`' cookie,
        or None (no cookie, no such session, or a request from another origin)."""
        if not same_origin(headers):
            return None
        session = self.find(cookie_value(headers))
        return session.owner if session is not None else None

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items()
                    if now - s.created > self.ttl_s or now - s.last_used > self.idle_s]:
            del self._sessions[key]
