"""Device authentication: one helper per scheme the device families use.

Each helper takes what it needs of the request (headers, raw body, parsed JSON or
query, the client address), returns the authenticated `Device`, or raises
`AuthError(status, reason, device_id)`: 401 for an unknown or wrong credential, 403
for a disabled device or one of a claiming family not yet claimed, 429 while the
client address is locked out. The plugin answers in its family's error shape.

| scheme        | helper                 | families                          |
|---------------|------------------------|-----------------------------------|
| X-API-Key     | `api_key`              | kaiabc                            |
| Bearer JWT    | `bearer_jwt`           | streetlight (tokens from `issue_jwt`) |
| body token    | `body_token`           | thingsnxt (`device_token`)        |
| id + key      | `device_key`           | edgesentinel                      |
| HMAC of body  | `signature`            | streetlight, edgesentinel         |
| MQTT user/pw  | the managed broker     | paku (accounts from the registry) |

Brute force: every failure is counted (`gatewayd_auth_failures_total{family,scheme}`)
per client address and device; `max_failures` failures within `failure_window_s` from
one address lock that address out for `lockout_s`: its attempts are answered 429 with
Retry-After before any secret is looked at.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..logs import get_logger
from .registry import Device, DeviceRegistry, UnknownDevice
from .secrets import JWTError, encode_jwt

if TYPE_CHECKING:
    from ..metrics import Metrics

__all__ = ["AuthError", "Authenticator", "FamilyAuth", "IssuedToken", "FamilyPolicy"]

log = get_logger("gatewayd.auth")
_MAX_TRACKED = 10_000  # client addresses / nonces kept in memory at most
# How long a JWT's device row is held (registry.recent) when nothing reports a change:
# this process's writes clear it at once, another process's (`gatewayd devices rotate`,
# `disable`) through DeviceServices' change watch within `devices.presence_flush_s`.
# This is the fallback should the watch miss one.
JWT_DEVICE_MAX_AGE_S = 300.0


class AuthError(Exception):
    """Authentication refused: `status` 401/403/429, a `reason` safe to show the device."""

    def __init__(self, status: int, reason: str, device_id: str | None = None, *, retry_after_s: float | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.device_id = device_id
        self.retry_after_s = retry_after_s


@dataclass
class IssuedToken:
    token: str
    expires_at: float


@dataclass
class FamilyPolicy:
    """Per-family rules; a plugin sets them with `ctx.auth.configure(...)` at startup."""

    require_claim: bool = False
    jwt_ttl_s: float | None = None


class Headers(Protocol):
    """What the auth helpers read headers from: Quart's `request.headers`, or a dict."""

    def get(self, key: str, /) -> str | None: ...


def header(headers: Headers, name: str) -> str | None:
    """A header by case-insensitive name (Quart's Headers already are; plain dicts too)."""
    value = headers.get(name)
    if value is None and isinstance(headers, dict):
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value


class Authenticator:
    """The scheme helpers for every family, with failure counting and lockout."""

    def __init__(
        self,
        registry: DeviceRegistry,
        metrics: Metrics,
        *,
        max_failures: int = 10,
        failure_window_s: float = 60.0,
        lockout_s: float = 300.0,
        jwt_ttl_s: float = 7 * 86400,
        max_skew_s: float = 300.0,
        key_cache_s: float = 0.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = trio.current_time,
        presence: Any = None,
    ):
        self.registry = registry
        self.max_failures = max_failures
        self.failure_window_s = failure_window_s
        self.lockout_s = lockout_s
        self.jwt_ttl_s = jwt_ttl_s
        self.max_skew_s = max_skew_s
        self.key_cache_s = key_cache_s  # a key that passed its hash is accepted from memory this long
        self.clock = clock
        self.monotonic = monotonic
        self.policies: dict[str, FamilyPolicy] = {}
        self.presence = presence  # anything with touch(family, device_id), or None
        self.device_failures: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._locked: dict[str, float] = {}
        self._nonces: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._failed = metrics.counter(
            "gatewayd_auth_failures_total", "Device authentication failures", ("family", "scheme")
        )
        self._lockouts = metrics.counter(
            "gatewayd_auth_lockouts_total", "Client addresses locked out after repeated failures", ("family",)
        )

    def policy(self, family: str) -> FamilyPolicy:
        return self.policies.setdefault(family, FamilyPolicy())

    # -- the schemes -------------------------------------------------------------------

    async def api_key(
        self, family: str, headers: Headers, client: str | None, *,
        header_name: str = "X-API-Key", device_id: str | None = None,
    ) -> Device:
        """A key in a header that alone identifies the device (kaiabc's `X-API-Key`).

        With `device_id` (e.g. the body's `node_id`) the key must belong to that device.
        """
        self._check_lockout(family, client)
        key = header(headers, header_name)
        if not key:
            raise self._fail(family, "api_key", client, device_id, f"missing {header_name} header")
        device = await self.registry.verify_key(family, key.strip(), device_id, max_age_s=self.key_cache_s)
        if device is None:
            raise self._fail(family, "api_key", client, device_id, "invalid API key")
        return await self._accept(family, "api_key", device, client)

    async def body_token(
        self, family: str, client: str | None, *,
        json: Any = None, query: Mapping[str, str] | None = None, field: str = "device_token",
        device_id: str | None = None,
    ) -> Device:
        """A token in the parsed JSON body or the query string (thingsnxt's `device_token`).

        With `device_id` (thingsnxt's `/devices/{device_id}/telemetry`) the token must be
        that device's.
        """
        self._check_lockout(family, client)
        token = json.get(field) if isinstance(json, dict) else None
        if token is None and query is not None:
            token = query.get(field)
        if not isinstance(token, str) or not token:
            raise self._fail(family, "token", client, device_id, f"missing {field}")
        device = await self.registry.verify_key(family, token, device_id, max_age_s=self.key_cache_s)
        if device is None:
            raise self._fail(family, "token", client, device_id, f"invalid {field}")
        return await self._accept(family, "token", device, client)

    async def device_key(
        self, family: str, headers: Headers, client: str | None, *,
        id_header: str = "X-Device-Id", key_header: str = "X-Auth-Key",
    ) -> Device:
        """An id header plus a key header (edgesentinel's `X-Device-Id` + `X-Auth-Key`)."""
        self._check_lockout(family, client)
        device_id, key = header(headers, id_header), header(headers, key_header)
        if not device_id or not key:
            raise self._fail(family, "device_key", client, device_id, f"missing {id_header} or {key_header} header")
        device = await self.registry.verify_key(family, key.strip(), device_id.strip(), max_age_s=self.key_cache_s)
        if device is None:
            raise self._fail(family, "device_key", client, device_id, "unknown device or wrong key")
        return await self._accept(family, "device_key", device, client)

    async def bearer_jwt(
        self, family: str, headers: Headers, client: str | None, *, device_id: str | None = None
    ) -> Device:
        """`Authorization: Bearer <jwt>` issued by `issue_jwt` (streetlight device tokens).

        With `device_id` (e.g. from the URL) the token must be that device's.
        """
        if self._locked:  # (nobody locked out: nothing to look up)
            self._check_lockout(family, client)
        scheme, _, token = (header(headers, "Authorization") or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise self._fail(family, "jwt", client, device_id, "missing bearer token")
        try:
            claims = self.registry.keyring.jwt.decode(token, now=self.clock())
        except JWTError as e:
            raise self._fail(family, "jwt", client, device_id, "token expired" if e.expired else "invalid token")
        sub = claims.get("sub")
        if claims.get("fam") != family or not isinstance(sub, str) or (device_id is not None and sub != device_id):
            raise self._fail(family, "jwt", client, device_id, "token is not for this device")
        # From the registry's recent reads: a light that reports every few seconds costs no
        # read per request. Rotations and revocations through this registry are seen at
        # once, another process's (the CLI's) when the change watch reports them.
        device = await self.registry.recent(family, sub, JWT_DEVICE_MAX_AGE_S)
        if device is None:
            raise self._fail(family, "jwt", client, sub, "unknown device")
        epoch = claims.get("ep")
        in_grace = epoch == device.jwt_epoch - 1 and (device.jwt_grace_until or 0) > self.clock()
        if epoch != device.jwt_epoch and not in_grace:
            raise self._fail(family, "jwt", client, sub, "token revoked")
        if device.status == "active" and self.presence is not None:
            self.presence.touch(family, device.id)  # `_accept`'s common case, without its coroutine
            return device
        return await self._accept(family, "jwt", device, client)

    async def signature(
        self, family: str, headers: Headers, body: bytes, client: str | None, *,
        device_id: str, header_name: str = "X-Device-Signature",
        timestamp_header: str | None = None, nonce_header: str | None = None,
    ) -> Device:
        """HMAC-SHA256 of the raw body with the device's signing secret, in a header.

        The header holds hex or base64, optionally prefixed `sha256=`. With
        `timestamp_header` the signed message is `<timestamp>.<body>` (with
        `nonce_header`: `<timestamp>.<nonce>.<body>`), the timestamp (Unix seconds or
        ISO 8601) must be within `max_skew_s` of the gateway clock, and a nonce is
        accepted once within that window: a captured request can't be replayed.
        """
        self._check_lockout(family, client)
        given = _decode_signature(header(headers, header_name) or "")
        if given is None:
            raise self._fail(family, "signature", client, device_id, f"missing or malformed {header_name} header")
        prefix = b""
        nonce = None
        if timestamp_header:
            stamp = header(headers, timestamp_header) or ""
            when = _parse_time(stamp)
            if when is None:
                raise self._fail(family, "signature", client, device_id, f"missing or malformed {timestamp_header}")
            if abs(self.clock() - when) > self.max_skew_s:
                raise self._fail(family, "signature", client, device_id, "timestamp outside the allowed window")
            prefix = stamp.encode() + b"."
            if nonce_header:
                nonce = header(headers, nonce_header) or ""
                if not nonce:
                    raise self._fail(family, "signature", client, device_id, f"missing {nonce_header}")
                prefix += nonce.encode() + b"."
        try:
            device, keys = await self.registry.signing_secrets(family, device_id)
        except UnknownDevice:
            raise self._fail(family, "signature", client, device_id, "unknown device") from None
        message = prefix + body
        if not any(
            hmac.compare_digest(hmac.new(k.encode(), message, hashlib.sha256).digest(), given) for k in keys
        ):
            raise self._fail(family, "signature", client, device_id, "bad signature")
        if nonce is not None and not self._fresh_nonce(family, device_id, nonce):
            raise self._fail(family, "signature", client, device_id, "replayed request (nonce already used)")
        return await self._accept(family, "signature", device, client)

    # -- tokens ------------------------------------------------------------------------

    def issue_jwt(self, device: Device, *, ttl_s: float | None = None) -> IssuedToken:
        """A signed device token (HS256) valid for `ttl_s` (default: family's, else `auth.jwt_ttl_s`)."""
        ttl = ttl_s or self.policy(device.family).jwt_ttl_s or self.jwt_ttl_s
        now = self.clock()
        claims = {"sub": device.id, "fam": device.family, "ep": device.jwt_epoch, "iat": int(now), "exp": int(now + ttl)}
        return IssuedToken(encode_jwt(claims, self.registry.keyring.jwt_key), float(int(now + ttl)))

    # -- bookkeeping -------------------------------------------------------------------

    def retry_after(self, client: str | None) -> float | None:
        """Seconds the address stays locked out, or None."""
        until = self._locked.get(client or "")
        if until is None:
            return None
        left = until - self.monotonic()
        if left <= 0:
            del self._locked[client or ""]
            return None
        return left

    def _check_lockout(self, family: str, client: str | None) -> None:
        left = self.retry_after(client)
        if left is not None:
            self._failed.inc(family=family, scheme="locked_out")
            raise AuthError(429, "too many failed attempts; try again later", retry_after_s=max(1, int(left + 0.999)))

    def _fail(self, family: str, scheme: str, client: str | None, device_id: str | None, reason: str) -> AuthError:
        self._failed.inc(family=family, scheme=scheme)
        if device_id:
            key = (family, device_id)
            self.device_failures[key] = self.device_failures.pop(key, 0) + 1
            while len(self.device_failures) > _MAX_TRACKED:
                self.device_failures.popitem(last=False)
        address = client or ""
        now = self.monotonic()
        window = self._failures.pop(address, None) or deque()
        window.append(now)
        while window and window[0] <= now - self.failure_window_s:
            window.popleft()
        self._failures[address] = window
        while len(self._failures) > _MAX_TRACKED:
            self._failures.popitem(last=False)
        if len(window) >= self.max_failures:
            self._locked[address] = now + self.lockout_s
            window.clear()
            self._lockouts.inc(family=family)
            log.warning("client locked out after failed authentications", family=family, client=address,
                        lockout_s=self.lockout_s)
        # The reason names the check, never the secret that was presented.
        log.info("authentication failed", family=family, scheme=scheme, device=device_id or "", client=address,
                 reason=reason)
        return AuthError(401, reason, device_id)

    async def _accept(self, family: str, scheme: str, device: Device, client: str | None) -> Device:
        if device.status == "disabled":
            self._failed.inc(family=family, scheme=scheme)
            raise AuthError(403, "device is disabled", device.id)
        if device.status == "provisioned" and self.policy(family).require_claim:
            self._failed.inc(family=family, scheme=scheme)
            raise AuthError(403, "device is not claimed yet", device.id)
        if device.status != "active":
            # Read again in the write: disabled meanwhile stays disabled, and is refused.
            device = await self.registry.set_status(family, device.id, "active", only_from=("provisioned", "claimed"))
            if device.status == "disabled":
                self._failed.inc(family=family, scheme=scheme)
                raise AuthError(403, "device is disabled", device.id)
        if self.presence is not None:
            self.presence.touch(family, device.id)
        return device

    def _fresh_nonce(self, family: str, device_id: str, nonce: str) -> bool:
        now = self.monotonic()
        while self._nonces and (next(iter(self._nonces.values())) <= now or len(self._nonces) > _MAX_TRACKED):
            self._nonces.popitem(last=False)
        key = (family, device_id, nonce)
        if key in self._nonces:
            return False
        # Kept for twice the skew: any timestamp the window accepts is covered.
        self._nonces[key] = now + 2 * self.max_skew_s
        return True


def _decode_signature(value: str) -> bytes | None:
    value = value.strip()
    if value.lower().startswith("sha256="):
        value = value[7:]
    if len(value) == 64:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_" if "-" in value or "_" in value else None,
                               validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _parse_time(value: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # "nan" would pass every skew check (comparisons with NaN are false)
        return seconds if math.isfinite(seconds) else None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo else None


class FamilyAuth:
    """`ctx.auth`: the scheme helpers bound to one family (see `Authenticator`)."""

    def __init__(self, auth: Authenticator, family: str):
        self._auth = auth
        self.family = family

    def configure(self, *, require_claim: bool | None = None, jwt_ttl_s: float | None = None) -> None:
        """Family rules: devices must be claimed before they authenticate; token lifetime."""
        policy = self._auth.policy(self.family)
        if require_claim is not None:
            policy.require_claim = require_claim
        if jwt_ttl_s is not None:
            policy.jwt_ttl_s = jwt_ttl_s

    async def api_key(self, headers: Headers, client: str | None, *, header_name: str = "X-API-Key",
                      device_id: str | None = None) -> Device:
        return await self._auth.api_key(self.family, headers, client, header_name=header_name, device_id=device_id)

    async def body_token(self, client: str | None, *, json: Any = None, query: Mapping[str, str] | None = None,
                         field: str = "device_token", device_id: str | None = None) -> Device:
        return await self._auth.body_token(self.family, client, json=json, query=query, field=field,
                                           device_id=device_id)

    async def device_key(self, headers: Headers, client: str | None, *, id_header: str = "X-Device-Id",
                         key_header: str = "X-Auth-Key") -> Device:
        return await self._auth.device_key(self.family, headers, client, id_header=id_header, key_header=key_header)

    async def bearer_jwt(self, headers: Headers, client: str | None, *,
                         device_id: str | None = None) -> Device:
        return await self._auth.bearer_jwt(self.family, headers, client, device_id=device_id)

    async def signature(self, headers: Headers, body: bytes, client: str | None, *, device_id: str,
                        header_name: str = "X-Device-Signature", timestamp_header: str | None = None,
                        nonce_header: str | None = None) -> Device:
        return await self._auth.signature(
            self.family, headers, body, client, device_id=device_id, header_name=header_name,
            timestamp_header=timestamp_header, nonce_header=nonce_header,
        )

    def issue_jwt(self, device: Device, *, ttl_s: float | None = None) -> IssuedToken:
        """A fresh device token; call it at configure and on each status answer to refresh."""
        if device.family != self.family:
            raise ValueError(f"device {device.family}/{device.id} is not of family {self.family}")
        return self._auth.issue_jwt(device, ttl_s=ttl_s)
