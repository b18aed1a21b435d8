"""Who may watch live streams: the admin token, a scoped read-only token, a dashboard session.

The core's endpoints (live/http.py) and plugins' own stream routes (`ctx.live.authorize`)
ask the same question here, so a token an operator issued for an app opens a family's
own SSE or WebSocket shape exactly as it opens the core's:

- the admin token, in `Authorization: Bearer` (never in a URL: refused there);
- a scoped token (`gatewayd tokens add --scope live:<family>`), in that header or, for
  browsers' EventSource and WebSocket which cannot set headers, as `?token=`; it sees
  only its families' streams;
- the site dashboard's session cookie (`session`: the owner name of a live session from
  the same origin, or None), which sees what the admin token sees.

The answer names the *owner* of the connection: connections are counted per owner
(`live.per_token`).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping

from ..http.app import AdminGuard
from ..http.tokens import TokenStore

__all__ = ["Authorizer", "LiveAccess", "LiveDenied"]

Authorizer = Callable[[str], bool]
"""May this credential watch a pattern (`paku.#`)?"""


class LiveDenied(Exception):
    """Watching refused: `status` 401 (no, or a wrong, credential) or 403 (a token that
    may not watch this family); `reason` is safe to show the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class LiveAccess:
    """The credentials of live subscribers (see the module docstring)."""

    def __init__(self, admin: AdminGuard, tokens: TokenStore,
                 session: Callable[[Mapping[str, str]], str | None] | None = None) -> None:
        self.admin = admin
        self.tokens = tokens
        self.session = session

    async def grant(self, headers: Mapping[str, str], args: Mapping[str, str]) -> tuple[str, Authorizer]:
        """(owner, may-watch) for the credentials of a request; LiveDenied(401) if none is good."""
        scheme, _, value = headers.get("Authorization", "").partition(" ")
        offered = value.strip() if scheme.lower() == "bearer" else ""
        admin_token = self.admin.token()
        in_url = args.get("token", "")
        if admin_token and in_url and hmac.compare_digest(in_url.encode(), admin_token.encode()):
            raise LiveDenied(401, "the admin token never goes in a URL: send it as Authorization: Bearer, "
                                  "or use a scoped token")
        if admin_token and offered and hmac.compare_digest(offered.encode(), admin_token.encode()):
            return "admin", lambda pattern: True
        given = offered or in_url
        if not given and self.session is not None and (owner := self.session(headers)) is not None:
            return owner, lambda pattern: True  # the dashboard: what the admin token sees
        found = await self.tokens.check(given) if given else None
        if found is None:
            raise LiveDenied(401, "missing, expired or wrong token (the admin token, or a scoped one from "
                                  "gatewayd tokens add)")

        def may(pattern: str) -> bool:
            family = pattern.split(".", 1)[0]
            return family not in ("*", "#") and found.may_watch(family)

        return f"token:{found.name}", may

    async def owner_for(self, family: str, headers: Mapping[str, str], args: Mapping[str, str]) -> str:
        """The owner of a connection that watches `family`'s streams; LiveDenied (401, 403)."""
        owner, may = await self.grant(headers, args)
        if not may(f"{family}.#"):
            raise LiveDenied(403, f"this token may not watch {family}'s streams (its scope: live:{family} or live:*)")
        return owner
