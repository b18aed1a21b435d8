"""Ed25519 signatures of firmware images: key pairs, signing, verification.

What is signed is the *manifest line*, not the whole image, so a device can verify while
streaming (it hashes as it downloads, then checks one short message)::

    gatewayd-firmware-v1\n<family>\n<model>\n<version>\n<sha256 hex>\n

Binding family, model and version stops a validly signed image being offered as
another model or as a newer version than it is.

Images are signed by default with the site key (`SiteKey`): `<data_dir>/firmware-signing.pem`,
created 0600 the first time an image is added, its public half beside it (`.pub`) for
the devices' flash.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..logs import get_logger

__all__ = [
    "SigningError", "signed_message", "key_id", "generate_keypair", "load_private_key", "load_public_key",
    "load_public_keys",
    "verify_signature", "SiteKey", "SITE_KEY_NAME",
]

log = get_logger("gatewayd.ota")
SITE_KEY_NAME = "firmware-signing.pem"


class SigningError(Exception):
    """A key could not be read, or a signature does not verify."""


def signed_message(family: str, model: str, version: str, sha256: str) -> bytes:
    return f"gatewayd-firmware-v1\n{family}\n{model}\n{version}\n{sha256}\n".encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key (first 16 hex of the SHA-256 of its raw bytes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_keypair(path: str | Path) -> tuple[Path, Path]:
    """Write an Ed25519 private key (PEM, mode 0600) to `path` and its public key to `path.pub`."""
    path = Path(path)
    if path.exists():
        raise SigningError(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(_private_pem(key))
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(public_pem(key.public_key()))
    return path, pub


class SiteKey:
    """The site's own firmware signing key: `<data_dir>/firmware-signing.pem` (0600), and
    its public half in `firmware-signing.pem.pub`; made the first time it is needed.

    The daemon and a `gatewayd firmware add` may both need it first at the same moment:
    the key is written to a private temporary file and linked into place, so exactly one
    key ever lands and both use it.
    """

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir) / SITE_KEY_NAME
        self.public_path = self.path.with_name(self.path.name + ".pub")
        self._key: Ed25519PrivateKey | None = None

    def exists(self) -> bool:
        return self._key is not None or self.path.exists()

    def private_key(self) -> Ed25519PrivateKey:
        """The key, created on first use (blocking: file I/O). Raises SigningError."""
        if self._key is None:
            if not self.path.exists():
                self._create()
            self._key = self._load()
            if not self.public_path.exists():
                self._write_public(self._key.public_key())
        return self._key

    def public_key(self) -> Ed25519PublicKey | None:
        """The public half, or None while no site key exists (none is made for asking)."""
        return self.private_key().public_key() if self.exists() else None

    def _load(self) -> Ed25519PrivateKey:
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
            if mode & 0o077:  # a copy restored with loose permissions: it signs firmware
                os.chmod(self.path, 0o600)
                log.warning("site firmware signing key was readable by others; now 0600", path=str(self.path),
                            was=oct(mode))
        except OSError as e:
            raise SigningError(f"cannot read the site signing key {self.path}: {e.strerror}") from None
        return load_private_key(self.path)

    def _create(self) -> None:
        key = Ed25519PrivateKey.generate()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".firmware-signing-")  # mode 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_private_pem(key))
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, self.path)  # never replaces a key another process just made
            finally:
                os.unlink(tmp)
        except FileExistsError:
            return  # another process made it first: use that one
        except OSError as e:
            raise SigningError(f"cannot create the site signing key {self.path}: {e.strerror}") from None
        log.info("site firmware signing key created; put its public half in your devices", path=str(self.path),
                 public_key=str(self.public_path), key_id=key_id(key.public_key()))

    def _write_public(self, key: Ed25519PublicKey) -> None:
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".firmware-signing-pub-")
            with os.fdopen(fd, "wb") as f:
                f.write(public_pem(key))
            os.chmod(tmp, 0o644)  # public: anyone may read it
            os.replace(tmp, self.public_path)
            tmp = None
        except OSError as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise SigningError(f"cannot write {self.public_path}: {e.strerror}") from None


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


def load_public_keys(paths: list[str], base: Path | None) -> tuple[list[Ed25519PublicKey], list[str]]:
    """The keys at `paths` (relative ones under `base`, the config file's folder), and
    what was wrong with those that could not be loaded."""
    keys, errors = [], []
    for path in paths:
        full = Path(path) if Path(path).is_absolute() or base is None else base / path
        try:
            keys.append(load_public_key(full))
        except SigningError as e:
            errors.append(str(e))
    return keys, errors
