"""Ed25519 signatures of firmware images: key pairs, signing, verification.

What is signed is the *manifest line*, not the whole image, so a device can verify while
streaming (it hashes as it downloads, then checks one short message)::

    gatewayd-firmware-v1\n<family>\n<model>\n<version>\n<sha256 hex>\n

Binding family, model and version stops a validly signed image being offered as
another model or as a newer version than it is.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "SigningError", "signed_message", "key_id", "generate_keypair", "load_private_key", "load_public_key",
    "verify_signature",
]


class SigningError(Exception):
    """A key could not be read, or a signature does not verify."""


def signed_message(family: str, model: str, version: str, sha256: str) -> bytes:
    return f"gatewayd-firmware-v1\n{family}\n{model}\n{version}\n{sha256}\n".encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key (first 16 hex of the SHA-256 of its raw bytes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(path: str | Path) -> tuple[Path, Path]:
    """Write an Ed25519 private key (PEM, mode 0600) to `path` and its public key to `path.pub`."""
    path = Path(path)
    if path.exists():
        raise SigningError(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SigningError(f"cannot read the signing key {path}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise SigningError(f"cannot read the public key {path}: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} is not an Ed25519 public key")
    return key


def verify_signature(message: bytes, signature_b64: str, keys: Iterable[Ed25519PublicKey]) -> str:
    """The key id of the trusted key that signed `message`; SigningError if none did."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (ValueError, TypeError):
        raise SigningError("the signature is not valid base64") from None
    keys = list(keys)
    if not keys:
        raise SigningError("no trusted public key to verify the signature with (ota.trusted_keys or --public-key)")
    for key in keys:
        try:
            key.verify(signature, message)
            return key_id(key)
        except InvalidSignature:
            continue
    raise SigningError("bad signature: it does not verify with any trusted key (wrong key, or the image was altered)")
