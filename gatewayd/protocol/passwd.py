"""mosquitto's password file format: ``$7$`` PBKDF2-SHA512 hashes. Pure functions, no I/O.

The device registry stores each device's MQTT password hashed this way, and the managed
mosquitto reads the same strings from its ``passwd`` file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

__all__ = ["hash_password", "is_password_hash", "verify_password"]

# mosquitto_passwd's defaults (mosquitto 2.0): 12 random salt bytes, 101 iterations.
# Device passwords are random tokens issued at provisioning, not human passwords, so
# the low count is no weakness; it keeps every device login cheap on a Raspberry Pi.
_SALT_BYTES = 12
_DEFAULT_ITERATIONS = 101
_HASH_RE = re.compile(r"^\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


def hash_password(plain: str, *, iterations: int = _DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """Hash ``plain`` in mosquitto's ``$7$`` format (what ``mosquitto_passwd`` writes).

    ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512(password, salt)>``,
    as read by mosquitto 2.0's password file (``pw_sha512_pbkdf2``).
    """
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", plain.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(plain: str, hashed: str) -> bool:
    """Constant-time check of ``plain`` against a ``$7$`` hash (False if malformed)."""
    m = _HASH_RE.match(hashed)
    if not m:
        return False
    try:
        salt = base64.b64decode(m.group(2), validate=True)
        want = base64.b64decode(m.group(3), validate=True)
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", plain.encode("utf-8"), salt, int(m.group(1)))
    return hmac.compare_digest(got, want)


def is_password_hash(text: str) -> bool:
    """True if ``text`` has the shape of a ``$7$`` hash."""
    return _HASH_RE.match(text) is not None
