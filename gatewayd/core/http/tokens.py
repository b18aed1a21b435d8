"""Scoped, read-only API tokens, issued by an operator for apps that only watch.

The admin token opens everything and never goes into a URL. An app that only needs to
watch live streams gets a token of its own, limited to scopes and to a lifetime:

    gatewayd tokens add --name lobby-screen --scope live:thingsnxt --ttl 30d

Scopes: `live:<family>` (that family's live streams) and `live:*` (every family's).
A token is shown once; the gateway keeps its SHA-256 (the token is 32 random bytes, so
a fast hash is enough to make the stored value useless to a thief) and can revoke it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peewee

from ..storage import SchemaSpec, Storage

__all__ = ["ApiToken", "TOKEN_SCHEMA", "TokenGrant", "TokenStore", "parse_ttl"]

_PREFIX = "gwt_"
_SCOPE = re.compile(r"^live:(\*|[a-z][a-z0-9_]{0,63})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ApiToken(peewee.Model):
    name = peewee.CharField(unique=True)
    scopes = peewee.TextField()  # space-separated
    digest = peewee.CharField(unique=True)  # SHA-256 of the token, hex
    created_at = peewee.FloatField()
    expires_at = peewee.FloatField()
    revoked_at = peewee.FloatField(null=True)

    class Meta:
        table_name = "core_api_token"


TOKEN_SCHEMA = SchemaSpec("core_api_token", [ApiToken])


@dataclass(frozen=True)
class TokenGrant:
    """What a valid token allows: its name (the owner of its connections) and scopes."""

    name: str
    scopes: frozenset[str]

    def may_watch(self, family: str) -> bool:
        return "live:*" in self.scopes or f"live:{family}" in self.scopes


def parse_ttl(text: str) -> float:
    """`30d`, `12h`, `90m`, `3600s` or seconds -> seconds (ValueError otherwise)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"ttl: expected a duration such as 30d, 12h, 90m or 3600s, got {text!r}")
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not 60 <= seconds <= 10 * 365 * 86400:
        raise ValueError(f"ttl: expected between 1 minute and 10 years, got {text!r}")
    return seconds


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class TokenStore:
    """Issue, list, check and revoke API tokens (blocking methods: CLI; `check`: async)."""

    def __init__(self, storage: Storage, *, clock: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.clock = clock

    def add_blocking(self, name: str, scopes: list[str], ttl_s: float) -> str:
        """A new token, returned once. ValueError for a bad name or scope, or a name in use."""
        if not _NAME.match(name):
            raise ValueError(f"name: expected 1-64 of letters, digits and _ . - , got {name!r}")
        if not scopes:
            raise ValueError("scope: at least one (live:<family> or live:*)")
        for scope in scopes:
            if not _SCOPE.match(scope):
                raise ValueError(f"scope: expected live:<family> or live:*, got {scope!r}")
        token = _PREFIX + secrets.token_urlsafe(32)
        now = self.clock()

        def insert() -> None:
            if ApiToken.get_or_none(ApiToken.name == name) is not None:
                raise ValueError(f"name: a token named {name!r} exists (revoke it first)")
            ApiToken.create(name=name, scopes=" ".join(sorted(set(scopes))), digest=_digest(token),
                            created_at=now, expires_at=now + ttl_s)

        self.storage.run_blocking(insert)
        return token

    def list_blocking(self) -> list[dict[str, Any]]:
        def rows() -> list[dict[str, Any]]:
            return [{"name": t.name, "scopes": t.scopes.split(), "created_at": t.created_at,
                     "expires_at": t.expires_at, "revoked": t.revoked_at is not None}
                    for t in ApiToken.select().order_by(ApiToken.created_at)]

        return self.storage.run_blocking(rows)

    def revoke_blocking(self, name: str) -> bool:
        now = self.clock()
        return bool(self.storage.run_blocking(
            lambda: ApiToken.update(revoked_at=now).where((ApiToken.name == name) & ApiToken.revoked_at.is_null())
            .execute()))

    async def check(self, token: str) -> TokenGrant | None:
        """What `token` grants, or None (unknown, expired, revoked, not a token)."""
        if not token.startswith(_PREFIX) or len(token) > 128:
            return None
        now = self.clock()

        def find() -> TokenGrant | None:
            row = ApiToken.get_or_none(ApiToken.digest == _digest(token))
            if row is None or row.revoked_at is not None or row.expires_at <= now:
                return None
            return TokenGrant(row.name, frozenset(row.scopes.split()))

        return await self.storage.read(find)
