"""The OTA firmware store: images, signatures, channels, rollout, device reports.

Images live under `<data_dir>/firmware/` named by their SHA-256; `core_firmware` holds
family, model, semantic version, channel, size, hash, optional Ed25519 signature and
the rollout percentage. A plugin asks `await ctx.ota.newest_for(family, model,
current_version, channel, device_id)` and serves the image with
`await ctx.ota.response(firmware)` under its own route (Range, ETag and all; see
`ota/http.py`); devices' progress goes to `await ctx.ota.report(...)`.

Signatures: Ed25519 over the *manifest line* (not the whole image, so a device can
verify while streaming: it hashes as it downloads, then checks one short message)::

    gatewayd-firmware-v1\\n<family>\\n<model>\\n<version>\\n<sha256 hex>\\n

Binding family, model and version stops a validly signed image being offered as
another model or as a newer version than it is. Images added without a key or a
signature of their own are signed with the site key (`signing.SiteKey`).

URLs handed to devices are `ctx.ota.url(path)`: `http.public_url` + path, never built
from the request's `Host` header.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import peewee
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ...protocol.semver import Version, parse_version
from ..logs import get_logger
from ..storage import SchemaSpec
from .signing import (
    SigningError,
    SiteKey,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    signed_message,
    verify_signature,
)

if TYPE_CHECKING:
    from ..alerts.events import EventBus
    from ..storage import Storage

__all__ = [
    "OtaStore", "OtaError", "Firmware", "OTA_SCHEMA", "CHANNELS", "REPORT_STATUSES",
    "rollout_bucket", "signed_message", "generate_keypair", "load_private_key", "load_public_key",
    "key_id", "coerce_version", "manifest", "SigningError", "is_row_id", "MAX_ID", "SiteKey",
]

log = get_logger("gatewayd.ota")
CHANNELS = ("stable", "beta")
# What a device on each channel may be offered: beta devices also take stable releases.
VISIBLE = {"stable": ("stable",), "beta": ("stable", "beta")}
REPORT_STATUSES = ("started", "downloaded", "verified", "installed", "failed", "rolled_back")
_REPORT_EVENTS = {"failed": ("ota_failed", "warning"), "rolled_back": ("ota_rolled_back", "warning"),
                  "installed": ("ota_installed", "info")}


#: The largest row id SQLite can hold (a signed 64-bit INTEGER). A larger number from a
#: URL or a device must not reach a query: sqlite3 raises OverflowError for it.
MAX_ID = 2**63 - 1


def is_row_id(value: object) -> bool:
    """Whether `value` can name a stored row (an int 1..MAX_ID); anything else names none."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


class OtaError(Exception):
    """A firmware operation was refused (bad version, bad signature, duplicate, missing file)."""


class CoreFirmware(peewee.Model):
    family = peewee.CharField(max_length=64)
    model = peewee.CharField(max_length=128)
    version = peewee.CharField(max_length=64)
    channel = peewee.CharField(max_length=16)
    filename = peewee.CharField(max_length=255)
    size = peewee.IntegerField()
    sha256 = peewee.CharField(max_length=64)
    signature = peewee.TextField(null=True)
    key_id = peewee.CharField(max_length=32, null=True)
    rollout_percent = peewee.FloatField(default=100.0)
    created_at = peewee.FloatField()

    class Meta:
        table_name = "core_firmware"
        indexes = ((("family", "model", "version"), True),)


class CoreOtaReport(peewee.Model):
    ts = peewee.FloatField()
    family = peewee.CharField(max_length=64)
    device_id = peewee.CharField(max_length=128)
    firmware_id = peewee.IntegerField(null=True)
    version = peewee.CharField(max_length=64, null=True)
    status = peewee.CharField(max_length=16)
    detail = peewee.TextField(default="")

    class Meta:
        table_name = "core_ota_report"
        indexes = ((("family", "device_id", "ts"), False),)


OTA_SCHEMA = SchemaSpec("core_ota", [CoreFirmware, CoreOtaReport], version=1)


@dataclass(frozen=True)
class Firmware:
    """One stored image. `path` is the file on disk; `etag` is its quoted SHA-256."""

    id: int
    family: str
    model: str
    version: str
    channel: str
    filename: str
    size: int
    sha256: str
    signature: str | None
    key_id: str | None
    rollout_percent: float
    created_at: float
    path: Path

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'

    @property
    def semver(self) -> Version:
        return parse_version(self.version)

    def signed_message(self) -> bytes:
        return signed_message(self.family, self.model, self.version, self.sha256)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "family": self.family, "model": self.model, "version": self.version,
            "channel": self.channel, "filename": self.filename, "size": self.size, "sha256": self.sha256,
            "signature": self.signature, "key_id": self.key_id, "rollout_percent": self.rollout_percent,
            "created_at": self.created_at,
        }


# -- names ------------------------------------------------------------------------

#: Unicode categories a name must not hold: controls (a newline breaks the download's
#: headers), invisible formatting (a right-to-left override disguises an extension),
#: line/paragraph separators, and surrogates (bytes of a file name that are not UTF-8).
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def unprintable(text: str) -> str | None:
    """The first character of `text` that a name must not hold, or None."""
    return next((c for c in text if unicodedata.category(c) in _UNPRINTABLE), None)


def check_file_name(name: str) -> str:
    """`name` if it can be an image's file name (shown in downloads and listings); else OtaError."""
    bad = unprintable(name)
    if bad is not None:
        raise OtaError(f"file name {name!r}: a control or formatting character (U+{ord(bad):04X}) "
                       "is not allowed; rename the file")
    if not name or len(name) > 255:
        raise OtaError(f"file name {name!r}: expected 1-255 characters")
    return name


# -- rollout ----------------------------------------------------------------------


def rollout_bucket(family: str, model: str, version: str, device_id: str) -> float:
    """A device's stable place in [0, 100) for one release; in the rollout when < percent.

    Raising the percentage only ever adds devices. Hashing the release in means each
    release picks a different first group, so the same devices are not always first.
    """
    digest = hashlib.sha256(f"{family}\0{model}\0{version}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 * 100.0


def coerce_version(text: str) -> Version:
    """A device-reported version: semver, or lenient `2.1` / `v2` padded with zeros."""
    try:
        return parse_version(text)
    except ValueError:
        parts = text.strip().lstrip("vV").split(".")
        if 1 <= len(parts) < 3 and all(p.isdigit() for p in parts):
            return parse_version(".".join(parts + ["0"] * (3 - len(parts))))
        raise


# -- the store --------------------------------------------------------------------


def _to_firmware(row: CoreFirmware, root: Path) -> Firmware:
    return Firmware(row.id, row.family, row.model, row.version, row.channel, row.filename, row.size, row.sha256,
                    row.signature, row.key_id, row.rollout_percent, row.created_at, root / f"{row.sha256}.bin")


class OtaStore:
    """Firmware images on disk plus their rows; the API plugins get as `ctx.ota`."""

    def __init__(
        self,
        storage: Storage,
        root: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        events: EventBus | None = None,
        trusted_keys: Iterable[Ed25519PublicKey] = (),
        require_signed: bool = False,
        default_rollout: dict[str, float] | None = None,
        public_url: Callable[[], str] | None = None,
        site_key: SiteKey | None = None,
        sign_by_default: bool = True,
    ):
        self.storage = storage
        self.root = Path(root)
        self.clock = clock
        self.events = events
        self.trusted_keys = list(trusted_keys)
        self.require_signed = require_signed
        self.default_rollout = dict(default_rollout or {})
        self._public_url = public_url
        #: Signs what is added without a key or signature of its own (when sign_by_default),
        #: and is trusted when verifying.
        self.site_key = site_key
        self.sign_by_default = sign_by_default and site_key is not None

    # -- adding (blocking: the CLI, or a thread) ------------------------------------

    def add_blocking(
        self,
        source: str | Path,
        *,
        family: str,
        model: str,
        version: str,
        channel: str = "stable",
        rollout_percent: float | None = None,
        sign_key: Ed25519PrivateKey | None = None,
        signature: str | None = None,
        extra_keys: Iterable[Ed25519PublicKey] = (),
        unsigned: bool = False,
    ) -> Firmware:
        """Copy an image into the store, hash it, sign or verify it, and record it.

        Give `sign_key` to sign here, or `signature` (base64) made elsewhere to have it
        verified against the trusted keys (+ `extra_keys`); with neither, the site key
        signs it (unless `unsigned`, or the store does not sign by default). Raises OtaError.
        """
        if unsigned and (sign_key is not None or signature is not None):
            raise OtaError("unsigned: cannot be combined with a signing key or a signature")
        if unsigned and self.require_signed:
            raise OtaError("ota.require_signed is on: an unsigned image is refused")
        try:
            parse_version(version)
        except ValueError as e:
            raise OtaError(str(e)) from None
        if channel not in CHANNELS:
            raise OtaError(f"channel: expected one of {', '.join(CHANNELS)}, got {channel!r}")
        percent = self.default_rollout.get(channel, 100.0) if rollout_percent is None else rollout_percent
        if not 0 <= percent <= 100:
            raise OtaError(f"rollout: expected a percentage 0-100, got {percent}")
        for name, value in (("family", family), ("model", model)):
            # No newline above all: the signed message is one field per line.
            if not value or unprintable(value) is not None or len(value) > 128:
                raise OtaError(f"{name}: expected a short name without control characters, got {value!r}")
        source = Path(source)
        filename = check_file_name(source.name)
        if not source.is_file():
            raise OtaError(f"no such file: {source}")
        self._check_new(family, model, version)
        if sign_key is None and signature is None and not unsigned and self.sign_by_default:
            try:
                sign_key = self.site_key.private_key()
            except SigningError as e:
                raise OtaError(f"{e} (or set ota.sign_with_site_key = false)") from None
        self.root.mkdir(parents=True, exist_ok=True)
        sha, size, tmp = self._copy_in(source)
        try:
            message = signed_message(family, model, version, sha)
            kid = None
            if sign_key is not None:
                signature = base64.b64encode(sign_key.sign(message)).decode()
                kid = key_id(sign_key.public_key())
            elif signature is not None:
                try:
                    kid = verify_signature(message, signature.strip(), self._keys(extra_keys))
                except SigningError as e:
                    raise OtaError(str(e)) from None
            elif self.require_signed:
                raise OtaError("ota.require_signed is on: give --sign-key or --signature")
            dest = self.root / f"{sha}.bin"
            os.replace(tmp, dest)  # content-addressed: the same image twice is one file
            tmp = None
            row_id = self.storage.write_blocking(self._insert, dict(
                family=family, model=model, version=version, channel=channel, filename=filename,
                size=size, sha256=sha, signature=signature, key_id=kid, rollout_percent=float(percent),
                created_at=self.clock()))
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        log.info("firmware added", id=row_id, family=family, model=model, version=version, channel=channel,
                 sha256=sha, signed=bool(signature), key_id=kid)
        return self.get_blocking(row_id)

    def _copy_in(self, source: Path) -> tuple[str, int, str]:
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        return digest.hexdigest(), size, tmp

    def _check_new(self, family: str, model: str, version: str) -> None:
        self.storage.run_blocking(self._refuse_duplicate, family, model, version)

    @staticmethod
    def _refuse_duplicate(family: str, model: str, version: str) -> None:
        exists = CoreFirmware.get_or_none((CoreFirmware.family == family) & (CoreFirmware.model == model)
                                          & (CoreFirmware.version == version))
        if exists is not None:
            raise OtaError(f"{family}/{model} {version} is already in the store (id {exists.id})")

    @classmethod
    def _insert(cls, fields: dict[str, Any]) -> int:
        cls._refuse_duplicate(fields["family"], fields["model"], fields["version"])  # a racing add
        return CoreFirmware.insert(**fields).execute()

    def get_blocking(self, firmware_id: int) -> Firmware:
        row = None
        if is_row_id(firmware_id):
            row = self.storage.run_blocking(lambda: CoreFirmware.get_or_none(CoreFirmware.id == firmware_id))
        if row is None:
            raise OtaError(f"no firmware with id {firmware_id}")
        return _to_firmware(row, self.root)

    def list_blocking(self) -> list[Firmware]:
        return self.storage.run_blocking(self._list)

    def _list(self, family: str | None = None) -> list[Firmware]:
        query = CoreFirmware.select().order_by(CoreFirmware.family, CoreFirmware.model, CoreFirmware.id)
        if family:
            query = query.where(CoreFirmware.family == family)
        return [_to_firmware(r, self.root) for r in query]

    def set_rollout_blocking(self, firmware_id: int, percent: float) -> Firmware:
        if not 0 <= percent <= 100:
            raise OtaError(f"rollout: expected a percentage 0-100, got {percent}")
        if not is_row_id(firmware_id):
            raise OtaError(f"no firmware with id {firmware_id}")
        updated = self.storage.write_blocking(
            lambda: CoreFirmware.update(rollout_percent=float(percent)).where(CoreFirmware.id == firmware_id).execute())
        if not updated:
            raise OtaError(f"no firmware with id {firmware_id}")
        return self.get_blocking(firmware_id)

    def verify_blocking(self, fw: Firmware, extra_keys: Iterable[Ed25519PublicKey] = ()) -> str | None:
        """Re-hash the file and check its signature; the signing key id (None if unsigned)."""
        digest = hashlib.sha256()
        try:
            with fw.path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError as e:
            raise OtaError(f"firmware {fw.id}: cannot read {fw.path}: {e.strerror}") from None
        if digest.hexdigest() != fw.sha256:
            raise OtaError(f"firmware {fw.id}: the file's SHA-256 no longer matches (corrupted on disk)")
        if fw.signature is None:
            return None
        try:
            return verify_signature(fw.signed_message(), fw.signature, self._keys(extra_keys))
        except SigningError as e:
            raise OtaError(f"firmware {fw.id}: {e}") from None

    def _keys(self, extra: Iterable[Ed25519PublicKey]) -> list[Ed25519PublicKey]:
        """The keys a signature may verify with: ota.trusted_keys, the site key (if made), `extra`."""
        try:
            site = self.site_key.public_key() if self.site_key is not None else None
        except SigningError as e:
            raise OtaError(str(e)) from None
        return [*self.trusted_keys, *([site] if site is not None else []), *extra]

    # -- the plugin API (async) ----------------------------------------------------

    async def get(self, firmware_id: int) -> Firmware | None:
        """The firmware with this id, or None (also for a number no row can have)."""
        if not is_row_id(firmware_id):
            return None
        row = await self.storage.read(lambda: CoreFirmware.get_or_none(CoreFirmware.id == firmware_id))
        return None if row is None else _to_firmware(row, self.root)

    async def list(self, family: str | None = None) -> list[Firmware]:
        """Every stored image (of one family)."""
        return await self.storage.read(self._list, family)

    def url(self, path: str) -> str:
        """The URL a device downloads `path` from (`f"{ctx.mount}/ota/{fw.id}"`): the
        configured `http.public_url` (or the address derived from `http.listen`) + path.

        Build every URL handed to a device with it, never from the request's `Host`
        header, which the client chooses.
        """
        if not path.startswith("/"):
            raise ValueError(f"path: expected an absolute path starting with '/', got {path!r}")
        if self._public_url is None:
            raise RuntimeError("this firmware store has no public URL (only the gateway's own has one)")
        return self._public_url() + path

    def manifest(self, firmwares: Iterable[Firmware], path: Callable[[Firmware], str]) -> list[dict[str, Any]]:
        """The paku manifest's shape, each image's URL `self.url(path(image))`."""
        return manifest(firmwares, lambda fw: self.url(path(fw)))

    async def newest_for(
        self, family: str, model: str, current_version: str | None, channel: str = "stable",
        device_id: str | None = None,
    ) -> Firmware | None:
        """The newest image this device should install, or None if it is up to date.

        Only images newer than `current_version` (semver order; None = offer the
        newest), on a channel the device's channel sees (beta devices also get stable
        releases), and whose rollout includes `device_id` (a stable hash; 100 % =
        everyone; a device id is needed below 100 %). Raises ValueError for an
        unparsable `current_version` or an unknown channel.
        """
        if channel not in VISIBLE:
            raise ValueError(f"channel: expected one of {', '.join(CHANNELS)}, got {channel!r}")
        current = coerce_version(current_version) if current_version else None
        rows = await self.storage.read(lambda: list(CoreFirmware.select().where(
            (CoreFirmware.family == family) & (CoreFirmware.model == model)
            & CoreFirmware.channel.in_(VISIBLE[channel]))))
        best: tuple[Version, CoreFirmware] | None = None
        for row in rows:
            version = parse_version(row.version)
            if current is not None and not version > current:
                continue
            if row.rollout_percent < 100:
                if device_id is None or rollout_bucket(family, model, row.version, device_id) >= row.rollout_percent:
                    continue
            if best is None or version > best[0]:
                best = (version, row)
        return None if best is None else _to_firmware(best[1], self.root)

    async def report(
        self, family: str, device_id: str, status: str, *, version: str | None = None,
        firmware_id: int | None = None, detail: str = "", ts: float | None = None,
    ) -> int:
        """Record a device's OTA progress; `failed`/`rolled_back`/`installed` also emit an event.

        `status`: started, downloaded, verified, installed, failed or rolled_back.
        Raises ValueError for an unknown status or a `firmware_id` no image can have.
        Returns the report's id.
        """
        if status not in REPORT_STATUSES:
            raise ValueError(f"status: expected one of {', '.join(REPORT_STATUSES)}, got {status!r}")
        if firmware_id is not None and not is_row_id(firmware_id):
            raise ValueError(f"firmware_id: expected an integer 1-{MAX_ID}, got {firmware_id!r}")
        when = self.clock() if ts is None else float(ts)
        fields = dict(ts=when, family=family, device_id=device_id, firmware_id=firmware_id, version=version,
                      status=status, detail=str(detail)[:2000])
        report_id = await self.storage.write(lambda: CoreOtaReport.insert(**fields).execute())
        if self.events is not None and status in _REPORT_EVENTS:
            etype, severity = _REPORT_EVENTS[status]
            await self.events.emit(family, device_id, etype, {"version": version, "firmware_id": firmware_id,
                                                              "detail": str(detail)[:500]}, severity=severity, ts=when)
        return report_id

    async def reports(self, device_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """OTA reports, newest first (of one device), by the time the device reported."""
        def read() -> list[dict[str, Any]]:
            # By ts, not arrival: MQTT handlers run concurrently, so rows may land out of order.
            query = CoreOtaReport.select().order_by(CoreOtaReport.ts.desc(), CoreOtaReport.id.desc()).limit(limit)
            if device_id:
                query = query.where(CoreOtaReport.device_id == device_id)
            return [{"id": r.id, "ts": r.ts, "family": r.family, "device_id": r.device_id,
                     "firmware_id": r.firmware_id, "version": r.version, "status": r.status, "detail": r.detail}
                    for r in query]
        return await self.storage.read(read)


def manifest(firmwares: Iterable[Firmware], url: Callable[[Firmware], str]) -> list[dict[str, Any]]:
    """`[{model, version, url, sha256, size, signature}]` (the paku manifest's shape)."""
    return [{"model": f.model, "version": f.version, "url": url(f), "sha256": f.sha256, "size": f.size,
             "signature": f.signature} for f in firmwares]

