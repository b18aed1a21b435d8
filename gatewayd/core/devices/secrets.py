"""Device secrets: salted hashes, encrypted signing keys, lookup digests and JWTs.

Three ways a secret is kept, chosen by what the gateway must do with it:

- A device key (API key, body token, X-Auth-Key, MQTT password) is only ever *compared*:
  it is stored as a salted PBKDF2-SHA256 hash and checked in constant time. Because
  some schemes present the key alone (`X-API-Key`, a token in the body), a keyed
  digest `HMAC(lookup key, secret)` is stored beside it as an index to find the row.
- A signing secret (HMAC of the body) must be *read back* to recompute a signature:
  it is stored encrypted with AES-GCM, the device's identity bound in as associated
  data, so a row copied onto another device does not decrypt.
- Device JWTs are signed (HS256, with PyJWT) with a key derived from the master key;
  nothing is stored for them but the device's token epoch (bumped on rotation/revocation).

Every derived key comes from one master key: `<data_dir>/master.key` (mode 0600,
created on first use), or the base64 value of the environment variable the config
names (`auth.master_key_env`). Losing the master key makes signing secrets, JWTs and
key lookups unusable: back it up with the database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "Keyring",
    "JWTError",
    "hash_secret",
    "verify_secret",
    "new_secret",
    "load_master_key",
    "encode_jwt",
    "decode_jwt",
    "JWTVerifier",
]

# Device keys are 192-bit random tokens issued by the gateway, so stretching adds
# little; 20k iterations still slow an offline attack on an imported weak key and
# cost ~10 ms on a Raspberry Pi (verification runs on a worker thread).
PBKDF2_ITERATIONS = 20_000
_SALT_BYTES = 16
_SCHEME = "pbkdf2_sha256"


def new_secret(nbytes: int = 24) -> str:
    """A fresh random secret, URL-safe (192 bits by default), never starting with '-'.

    A leading '-' reads as an option to command-line tools (`device.py --password -x…`,
    `mosquitto_pub -P`), so such a draw is replaced: it costs under a bit of entropy.
    """
    while True:
        secret = secrets.token_urlsafe(nbytes)
        if not secret.startswith("-"):
            return secret


def hash_secret(plain: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """`pbkdf2_sha256$<iterations>$<b64 salt>$<b64 digest>` of `plain`."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", plain.encode("utf-8"), salt, iterations)
    return f"{_SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def verify_secret(plain: str, stored: str) -> bool:
    """Constant-time check of `plain` against `hash_secret` output (False if malformed)."""
    try:
        scheme, iterations, salt, want = stored.split("$")
        if scheme != _SCHEME:
            return False
        got = hashlib.pbkdf2_hmac("sha256", plain.encode("utf-8"), _unb64(salt), int(iterations))
        return hmac.compare_digest(got, _unb64(want))
    except (ValueError, TypeError):
        return False


def load_master_key(data_dir: Path, env_name: str = "") -> bytes:
    """The 32-byte master key: from `env_name` (base64) if set, else `data_dir/master.key`.

    The file is created on first use with mode 0600 (written to a temporary name and
    renamed, so a crash never leaves a half-written key).
    """
    value = os.environ.get(env_name) if env_name else None
    if value:
        try:
            key = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            raise ValueError(f"{env_name}: expected a base64 master key") from None
        if len(key) < 32:
            raise ValueError(f"{env_name}: the master key must be at least 32 bytes (got {len(key)})")
        return key
    path = Path(data_dir) / "master.key"
    if path.exists():
        key = base64.b64decode(path.read_text().strip())
        if len(key) < 32:
            raise ValueError(f"{path}: the master key is too short ({len(key)} bytes)")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    tmp = path.with_name(f"master.key.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(key).decode() + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        # Two processes (daemon and CLI) may race on first use: the first link wins
        # and both read the winner's key.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return base64.b64decode(path.read_text().strip())


class Keyring:
    """Keys derived from the master key: encryption, lookup digests, JWT signing."""

    def __init__(self, master_key: bytes):
        if len(master_key) < 32:
            raise ValueError("the master key must be at least 32 bytes")
        self._aead = AESGCM(self._derive(master_key, b"gatewayd/aes-gcm/v1"))
        self._lookup = self._derive(master_key, b"gatewayd/lookup/v1")
        self.jwt_key = self._derive(master_key, b"gatewayd/jwt/v1")
        self.jwt = JWTVerifier(self.jwt_key)

    @staticmethod
    def _derive(master: bytes, label: bytes) -> bytes:
        return hmac.new(master, label, hashlib.sha256).digest()

    def lookup(self, plain: str) -> str:
        """A keyed digest of a secret: an index to find its row, useless without the key."""
        return hmac.new(self._lookup, plain.encode("utf-8"), hashlib.sha256).hexdigest()

    def encrypt(self, plain: str, context: str) -> bytes:
        """AES-GCM: 12-byte nonce + ciphertext; `context` must be given again to decrypt."""
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, plain.encode("utf-8"), context.encode("utf-8"))

    def decrypt(self, blob: bytes, context: str) -> str:
        """Inverse of `encrypt`; raises `cryptography.exceptions.InvalidTag` on tampering."""
        return self._aead.decrypt(bytes(blob[:12]), bytes(blob[12:]), context.encode("utf-8")).decode("utf-8")


# -- JWT (HS256, through PyJWT) ------------------------------------------------------

# Only HS256 is registered, and `algorithms=` pins it again at each decode: a token
# whose header names "none", HS512 or RS256 is refused before its signature is looked at.
_ALGORITHM = "HS256"
_JWS = jwt.PyJWS(algorithms=[_ALGORITHM])


class JWTError(Exception):
    """A token that is malformed, wrongly signed or expired; `expired` tells which."""

    def __init__(self, reason: str, *, expired: bool = False):
        super().__init__(reason)
        self.expired = expired


def encode_jwt(claims: dict[str, Any], key: bytes) -> str:
    """A compact HS256 JWT of `claims` (RFC 7519); callers set `exp` and `iat`.

    The claims are serialized here (sorted keys, no NaN) and signed by PyJWS, so the
    bytes are those the hand-written encoder produced: a token is the same string
    whichever version of the gateway issued it.
    """
    payload = json.dumps(claims, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    return _JWS.encode(payload, key, algorithm=_ALGORITHM)


def decode_jwt(token: str, key: bytes, *, now: float, leeway_s: float = 0) -> dict[str, Any]:
    """Verify signature and expiry of an HS256 token; return its claims or raise JWTError.

    Expiry is checked against `now` (the gateway's clock, which tests move), not the
    wall clock PyJWT's claim checks would read, so PyJWS verifies the signature and the
    claims are read here.
    """
    if token.count(".") != 2:
        raise JWTError("not a JWT (expected three dot-separated parts)")
    if not token.isascii():  # a header value can hold any byte; a JWT is base64url
        raise JWTError("malformed JWT")
    try:
        # PyJWS parses the header before it checks the signature (anyone can send it:
        # "[[[[..." recurses); it turns RecursionError into DecodeError since 2.14.
        payload = _JWS.decode(token, key, algorithms=[_ALGORITHM])
    except jwt.InvalidAlgorithmError:
        raise JWTError("unsupported JWT algorithm (only HS256)") from None
    except jwt.InvalidSignatureError:
        raise JWTError("bad JWT signature") from None
    except (jwt.InvalidTokenError, RecursionError):
        raise JWTError("malformed JWT") from None
    try:
        claims = json.loads(payload)
    except (ValueError, RecursionError):
        raise JWTError("malformed JWT payload") from None
    if not isinstance(claims, dict):
        raise JWTError("malformed JWT payload")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)):
        raise JWTError("JWT without expiry")
    if now > exp + leeway_s:
        raise JWTError("JWT expired", expired=True)
    return claims


class JWTVerifier:
    """`decode_jwt` under one key, remembering the tokens whose signature it verified.

    A light presents the same token on every request for days: its HMAC (and PyJWS's
    parse of the header) is done once, not per request. The expiry is checked on every
    call; a token that fails is not remembered.
    """

    MAX_TOKENS = 10_000  # a token per device in use; cleared whole when full

    def __init__(self, key: bytes):
        self._key = key
        self._claims: dict[str, dict[str, Any]] = {}

    def decode(self, token: str, *, now: float, leeway_s: float = 0) -> dict[str, Any]:
        """As `decode_jwt(token, key, now=now, leeway_s=leeway_s)`."""
        claims = self._claims.get(token)
        if claims is None:
            claims = decode_jwt(token, self._key, now=now, leeway_s=leeway_s)
            if len(self._claims) >= self.MAX_TOKENS:
                self._claims.clear()
            self._claims[token] = claims
        elif now > claims["exp"] + leeway_s:
            raise JWTError("JWT expired", expired=True)
        return dict(claims)  # the caller's to change


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
