"""Tokens with the spec's roles for people and apps, issued by the gateway:
`POST /v1/auth/tokens` (the admin token) answers a token once; only its SHA-256 is kept.

* `observer`: read-only (every GET, the bulk state query, the WebSocket);
* `researcher`: also simulation and entrainment (parameters, phase shifts, solver,
  pause and resume, oscillator reset);
* `admin`: everything, like the gateway's admin token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING, Annotated, Any, Literal

from msgspec import Meta, Struct
from quart.typing import ResponseReturnValue

from .errors import Fail, iso

if TYPE_CHECKING:
    from gatewayd.plugins.api import Routes

    from .routes import Api

ROLES = ("observer", "researcher", "admin")
PREFIX = "kbt_"


class TokenBody(Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    role: Literal["observer", "researcher", "admin"]
    ttl_days: Annotated[float, Meta(gt=0, le=3650)] = 30.0


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    """The issued tokens, in memory (loaded at start, changed with the table)."""

    def __init__(self) -> None:
        self.by_digest: dict[str, tuple[str, str, float]] = {}  # digest -> (name, role, expires_at)

    def load(self, rows: list[dict[str, Any]]) -> None:
        self.by_digest = {r["digest"]: (r["name"], r["role"], r["expires_at"]) for r in rows}

    def role_of(self, bearer: str, now: float) -> tuple[str, str] | None:
        """(name, role) of a live token, or None."""
        if not bearer.startswith(PREFIX):
            return None
        wanted = digest(bearer)
        for known, (name, role, expires) in self.by_digest.items():
            if hmac.compare_digest(known, wanted):
                return (name, role) if expires > now else None
        return None


class People:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.ctx = api.ctx

    def register(self, r: Routes) -> None:
        auth = self.api.person_auth
        r.post("/v1/auth/tokens", body=TokenBody, responses={201: dict[str, Any]}, auth=auth,
               errors={409: "a token of that name exists (CONFLICT)"})(self.issue)
        r.get("/v1/auth/tokens", responses={200: dict[str, Any]}, auth=auth)(self.list)
        r.delete("/v1/auth/tokens/<name>", responses={200: dict[str, Any]}, auth=auth,
                 errors={404: "no token of that name (NOT_FOUND)"})(self.revoke)

    async def issue(self, body: TokenBody) -> ResponseReturnValue:
        """Issue a token with a role (answered once)"""
        await self.api.person("configuration", "admin")
        state, now = self.ctx.state, self.ctx.now()
        token = PREFIX + secrets.token_urlsafe(24)
        expires = now + body.ttl_days * 86400
        if not await self.ctx.storage.write(state.store.add_token, body.name, body.role, digest(token), now, expires):
            raise Fail(409, "CONFLICT", f"a token named {body.name!r} exists; revoke it first",
                       {"parameter": "name", "provided": body.name})
        state.tokens.by_digest[digest(token)] = (body.name, body.role, expires)
        state.note("info", "token issued", None, name=body.name, role=body.role)
        return {"name": body.name, "role": body.role, "token": token, "expires_at": iso(expires)}, 201

    async def list(self) -> ResponseReturnValue:
        """Every token's name, role and expiry (never the token)"""
        await self.api.person("query", "admin")
        rows = await self.ctx.storage.read(self.ctx.state.store.tokens)
        return {"tokens": [{"name": r["name"], "role": r["role"], "created_at": iso(r["created_at"]),
                            "expires_at": iso(r["expires_at"])} for r in rows]}

    async def revoke(self, name: str) -> ResponseReturnValue:
        """Revoke a token at once"""
        await self.api.person("configuration", "admin")
        state = self.ctx.state
        if not await self.ctx.storage.write(state.store.revoke_token, name):
            raise Fail(404, "NOT_FOUND", f"no token named {name!r}", {"parameter": "name", "provided": name})
        state.tokens.by_digest = {d: v for d, v in state.tokens.by_digest.items() if v[0] != name}
        return {"success": True, "name": name}
