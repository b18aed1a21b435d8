"""The device registry: who may talk to the gateway, with which credentials.

A device is unique per (family, id). Its life: `provisioned` (created, credentials
issued) -> `claimed` (a technician redeemed a claim code; only families that require
claiming wait for this) -> `active` (authenticated at least once) -> `disabled`
(refused with 403 until enabled again).

Each device holds two secrets, issued together and shown once:

- the *key*: API key, body token, X-Auth-Key and MQTT password all in one; kept as a
  salted hash, a keyed lookup digest and mosquitto's `$7$` hash (for the broker);
- the *signing secret*: the HMAC key for signed bodies; kept encrypted (AES-GCM).

Rotation issues a new pair and revokes the old one, optionally after a grace period
during which both work. Device JWTs carry the device's token epoch; rotation and
revocation bump it, which invalidates every token issued before.
"""

from __future__ import annotations

import inspect
import json
import re
import secrets as random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import peewee
import trio
import trio

from ...protocol.passwd import hash_password
from ..logs import get_logger
from ..storage import SchemaSpec
from .secrets import Keyring, hash_secret, new_secret, verify_secret

if TYPE_CHECKING:
    from ..storage import Storage

__all__ = [
    "Device",
    "Credentials",
    "ClaimCode",
    "DeviceRegistry",
    "DeviceExists",
    "UnknownDevice",
    "ClaimError",
    "STATUSES",
    "DEVICE_SCHEMA",
    "valid_device_id",
    "check_seconds",
    "MAX_TTL_S",
]

log = get_logger("gatewayd.devices")
T = TypeVar("T")

STATUSES = ("provisioned", "claimed", "active", "disabled")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
_FAMILY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_MQTT_USER_BAD = re.compile(r"[^A-Za-z0-9_.@-]")
_CLAIM_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read off a label

# Field limits (docs/devices.md). Generous for any real device, small enough that one
# request can't bloat every device list or the database.
MAX_LENGTHS = {
    "name": 256,  # a label people read
    "model": 128,  # a product code; the OTA manifest matches on it
    "firmware": 64,  # a version string (semver with pre-release and build fits)
}
# Characters of the metadata object as JSON: notes and a few tags, not a data store.
MAX_METADATA = 16384
# Imported secrets. At least 16 characters: a shorter key can be guessed offline from the
# broker's password file (a backup, a stolen SD card) and online from many addresses.
# At most 256: it travels in HTTP headers and MQTT passwords. Printable ASCII without
# spaces: headers are ASCII and their values are stripped of surrounding whitespace.
SECRET_LENGTH = (16, 256)
_SECRET_RE = re.compile(r"[!-~]+")
# The longest claim-code, command or rotation-grace lifetime: ten years is "for ever" for
# a code on a label, and keeps expiry times ordinary numbers.
MAX_TTL_S = 10 * 365 * 86400.0


class DeviceExists(Exception):
    """A device with this (family, id) is already registered."""


class UnknownDevice(LookupError):
    """No such device."""


class ClaimError(Exception):
    """A claim code that is unknown, used, expired or for another device."""


def valid_device_id(device_id: str) -> bool:
    """Ids are 1-128 characters of letters, digits and `_ . : @ -`, not starting with a symbol."""
    return isinstance(device_id, str) and bool(_ID_RE.fullmatch(device_id))


def _show(value: Any) -> str:
    """A value as an error message quotes it: never 200,000 characters of it."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _check_family(family: Any) -> str:
    if not isinstance(family, str) or not _FAMILY_RE.fullmatch(family):
        raise ValueError(f"family: expected 1-64 lower-case letters, digits and _ (a plugin name), got {_show(family)}")
    return family


def _check_id(name: str, device_id: Any) -> str:
    if not valid_device_id(device_id):
        raise ValueError(f"{name}: bad device id {_show(device_id)}: expected 1-128 of letters, digits and _ . : @ -, "
                         "starting with a letter or digit")
    return device_id


def _check_text(name: str, value: Any) -> str:
    limit = MAX_LENGTHS[name]
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {_show(value)}")
    if len(value) > limit:
        raise ValueError(f"{name}: {len(value)} characters, more than {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name}: a lone surrogate is not a Unicode character") from None
    return value


def _check_secret(name: str, value: Any) -> str | None:
    if value is None:
        return None
    low, high = SECRET_LENGTH
    if not isinstance(value, str) or not low <= len(value) <= high or not _SECRET_RE.fullmatch(value):
        shown = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        raise ValueError(f"{name}: expected {low}-{high} printable ASCII characters without spaces, got {shown}")
    return value


def _metadata_json(metadata: Any) -> str:
    """The metadata as the stored JSON text, or ValueError naming what is wrong."""
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata: expected an object, got {_show(metadata)}")
    try:
        text = json.dumps(metadata, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"metadata: not storable as strict JSON ({e})") from None
    if len(text) > MAX_METADATA:
        raise ValueError(f"metadata: {len(text)} characters of JSON, more than {MAX_METADATA}")
    return text


def check_seconds(name: str, value: Any, *, zero: bool = False) -> float:
    """A duration in seconds: a finite number > 0 (>= 0 with `zero`) and at most MAX_TTL_S."""
    # Comparisons only (no float() of a 400-digit int); NaN fails every one of them.
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and (0 <= value if zero else 0 < value) and value <= MAX_TTL_S):
        low = ">= 0" if zero else "> 0"
        raise ValueError(f"{name}: expected a number of seconds {low} and at most {MAX_TTL_S:.0f}, got {_show(value)}")
    return float(value)


# -- models --------------------------------------------------------------------------


class DeviceRow(peewee.Model):
    family = peewee.CharField()
    device_id = peewee.CharField()
    name = peewee.CharField(default="")
    model = peewee.CharField(default="")
    firmware = peewee.CharField(default="")
    metadata = peewee.TextField(default="{}")
    status = peewee.CharField(default="provisioned")
    created_at = peewee.FloatField()
    updated_at = peewee.FloatField()
    first_seen = peewee.FloatField(null=True)
    last_seen = peewee.FloatField(null=True)
    jwt_epoch = peewee.IntegerField(default=0)
    # Tokens of epoch `jwt_epoch - 1` stay valid until then (rotation grace).
    jwt_grace_until = peewee.FloatField(null=True)

    class Meta:
        table_name = "core_device"
        indexes = ((("family", "device_id"), True),)


def _seen_update(column: str, *, only_unset: bool) -> str:
    """`UPDATE core_device SET <column> = ? WHERE family = ? AND device_id = ?` (and unset)."""
    fields = DeviceRow._meta.fields
    name = f'"{fields[column].column_name}"'
    where = f'"{fields["family"].column_name}" = ? AND "{fields["device_id"].column_name}" = ?'
    return f'UPDATE "{DeviceRow._meta.table_name}" SET {name} = ? WHERE {where}' + (f" AND {name} IS NULL" if only_unset else "")


_SET_LAST_SEEN = _seen_update("last_seen", only_unset=False)
_SET_FIRST_SEEN = _seen_update("first_seen", only_unset=True)


class CredentialRow(peewee.Model):
    device = peewee.ForeignKeyField(DeviceRow, on_delete="CASCADE", backref="credentials")
    kind = peewee.CharField()  # "key" | "signing"
    lookup = peewee.CharField(null=True, index=True)
    secret_hash = peewee.TextField(null=True)
    mqtt_username = peewee.CharField(null=True)
    mqtt_hash = peewee.TextField(null=True)
    ciphertext = peewee.BlobField(null=True)
    created_at = peewee.FloatField()
    expires_at = peewee.FloatField(null=True)
    revoked_at = peewee.FloatField(null=True)

    class Meta:
        table_name = "core_credential"


class ClaimCodeRow(peewee.Model):
    lookup = peewee.CharField(unique=True)
    family = peewee.CharField()
    device_id = peewee.CharField(null=True)
    created_at = peewee.FloatField()
    expires_at = peewee.FloatField()
    used_at = peewee.FloatField(null=True)
    used_by = peewee.CharField(null=True)

    class Meta:
        table_name = "core_claim_code"


DEVICE_SCHEMA = SchemaSpec("core_devices", [DeviceRow, CredentialRow, ClaimCodeRow], version=1)


# -- values --------------------------------------------------------------------------


@dataclass
class Device:
    """A registered device as plugins see it."""

    family: str
    id: str
    name: str = ""
    model: str = ""
    firmware: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str = "provisioned"
    created_at: float = 0.0
    first_seen: float | None = None
    last_seen: float | None = None
    jwt_epoch: int = 0
    jwt_grace_until: float | None = None

    def as_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("jwt_epoch")
        doc.pop("jwt_grace_until")
        return doc

    @classmethod
    def from_row(cls, row: DeviceRow) -> "Device":
        return cls(
            row.family, row.device_id, row.name, row.model, row.firmware, json.loads(row.metadata or "{}"),
            row.status, row.created_at, row.first_seen, row.last_seen, row.jwt_epoch, row.jwt_grace_until,
        )


@dataclass
class Credentials:
    """Secrets issued at provisioning or rotation. Shown once; never stored in clear."""

    family: str
    device_id: str
    key: str
    signing_secret: str
    mqtt_username: str

    def as_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class ClaimCode:
    code: str
    family: str
    device_id: str | None
    expires_at: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Material:
    """Everything derived from a new key pair, computed off the writer thread."""

    creds: Credentials
    lookup: str
    secret_hash: str
    mqtt_hash: str
    ciphertext: bytes


# -- the registry --------------------------------------------------------------------


class DeviceRegistry:
    """Devices, credentials and claim codes in the gateway database.

    Every method is async: hashing runs on a worker thread, writes go through the
    storage writer (returning after COMMIT), reads through the reader pool.
    `on_credentials_changed(family)` (sync or async) is called after anything that
    changes which MQTT accounts or keys are valid; the runtime points it at the broker.
    """

    def __init__(self, storage: Storage, keyring: Keyring | None = None, *, clock: Callable[[], float] = time.time,
                 on_credentials_changed: Callable[[str], Any] | None = None):
        self.storage = storage
        self.keyring = keyring
        self.clock = clock
        self.on_credentials_changed = on_credentials_changed
        # (family, id) -> (monotonic time read, Device or None): for `recent`. Cleared
        # by every write through this registry, and per family by `notify_changed`
        # (another process's writes, the CLI's); else kept up to the caller's `max_age_s`.
        self._recent: dict[tuple[str, str], tuple[float, Device | None]] = {}
        self._loading: dict[tuple[str, str], trio.Event] = {}  # `recent` reads under way
        # (family, key lookup digest, device_id) -> (monotonic time verified, the key's
        # expiry or None, Device): keys that passed their salted hash, for `verify_key`'s
        # `max_age_s`. Forgotten on every write through this registry and on
        # `notify_changed` (another process's changes, noticed by DeviceServices' watch).
        self._verified: dict[tuple[str, str, str | None], tuple[float, float | None, Device]] = {}
        self._verifying: dict[tuple[str, str, str | None], trio.Event] = {}
        # Bumped by every write and each forgetting: a `recent` read or a key check
        # that overlapped one is not kept.
        self._generation = 0

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self.storage.write(fn, *args)
        finally:
            self._recent.clear()
            self._forget_keys()

    def _forget_keys(self) -> None:
        self._verified.clear()
        self._generation += 1

    # -- provisioning -------------------------------------------------------------

    async def provision(
        self,
        family: str,
        device_id: str | None = None,
        *,
        name: str = "",
        model: str = "",
        firmware: str = "",
        metadata: dict[str, Any] | None = None,
        status: str = "provisioned",
        key: str | None = None,
        signing_secret: str | None = None,
    ) -> tuple[Device, Credentials]:
        """Register a device and issue its credentials (returned once, in clear).

        `key` / `signing_secret` import secrets already flashed into firmware; by
        default fresh random ones are made. Raises DeviceExists, or ValueError naming
        the field that is wrong (limits: MAX_LENGTHS, MAX_METADATA, SECRET_LENGTH).
        """
        _check_family(family)
        device_id = _check_id("id", f"{family}-{random.token_hex(4)}" if device_id is None else device_id)
        name, model, firmware = (_check_text(k, v) for k, v in (("name", name), ("model", model), ("firmware", firmware)))
        text = _metadata_json({} if metadata is None else metadata)
        key, signing_secret = _check_secret("key", key), _check_secret("signing_secret", signing_secret)
        if status not in STATUSES:
            raise ValueError(f"bad status {status!r} (one of {', '.join(STATUSES)})")
        material = await trio.to_thread.run_sync(self._material, family, device_id, key, signing_secret)
        now = self.clock()

        def insert() -> Device:
            if DeviceRow.get_or_none(family=family, device_id=device_id) is not None:
                raise DeviceExists(f"{family}/{device_id} is already registered")
            row = DeviceRow.create(
                family=family, device_id=device_id, name=name, model=model, firmware=firmware,
                metadata=text, status=status, created_at=now, updated_at=now,
            )
            self._insert_credentials(row, material, now)
            return Device.from_row(row)

        device = await self._write(insert)
        log.info("device provisioned", family=family, device=device_id)
        await self.notify_changed(family)
        return device, material.creds

    def _material(self, family: str, device_id: str, key: str | None, signing: str | None) -> _Material:
        key = key or new_secret()
        signing = signing or new_secret(32)
        username = _MQTT_USER_BAD.sub("_", device_id)
        return _Material(
            Credentials(family, device_id, key, signing, username),
            lookup=self._keys().lookup(f"{family}\x00{key}"),
            secret_hash=hash_secret(key),
            mqtt_hash=hash_password(key),
            ciphertext=self._keys().encrypt(signing, f"{family}/{device_id}"),
        )

    @staticmethod
    def _insert_credentials(row: DeviceRow, m: _Material, now: float) -> None:
        CredentialRow.create(
            device=row, kind="key", lookup=m.lookup, secret_hash=m.secret_hash,
            mqtt_username=m.creds.mqtt_username, mqtt_hash=m.mqtt_hash, created_at=now,
        )
        CredentialRow.create(device=row, kind="signing", ciphertext=m.ciphertext, created_at=now)

    def _keys(self) -> Keyring:
        if self.keyring is None:
            raise RuntimeError("the device registry has no keyring (storage not installed yet)")
        return self.keyring

    async def rotate(self, family: str, device_id: str, *, grace_s: float = 0.0) -> Credentials:
        """Issue a new key pair; the old one stops working now, or after `grace_s`.

        The MQTT username stays the one the device's key has (`issue_key` may have
        chosen it)."""
        grace_s = check_seconds("grace_s", grace_s, zero=True)
        material = await trio.to_thread.run_sync(self._material, family, device_id, None, None)
        now = self.clock()

        def swap() -> None:
            row = self._row(family, device_id)
            username = self._live_username(row, now)
            if username is not None:
                material.creds.mqtt_username = username
            end = now + grace_s if grace_s > 0 else None
            live = CredentialRow.update(expires_at=end) if end else CredentialRow.update(revoked_at=now)
            live.where(
                (CredentialRow.device == row) & CredentialRow.revoked_at.is_null() & CredentialRow.expires_at.is_null()
            ).execute()
            self._insert_credentials(row, material, now)
            DeviceRow.update(
                jwt_epoch=row.jwt_epoch + 1, jwt_grace_until=end, updated_at=now
            ).where(DeviceRow.id == row.id).execute()

        await self._write(swap)
        log.info("device credentials rotated", family=family, device=device_id, grace_s=grace_s)
        await self.notify_changed(family)
        return material.creds

    async def issue_key(self, family: str, device_id: str, *, mqtt_username: str | None = None) -> str:
        """A fresh key for the device, returned in clear once; its other keys stop working now.

        For a family whose own protocol hands a device its password (streetlight's
        configure answer carries the MQTT login): the key is the device's MQTT password
        (and API key), under `mqtt_username` when given (1-128 of letters, digits and
        `_ . @ -`; default: the username its key has, else the one provisioning gives).
        Unlike `rotate`, the signing secret (flashed at manufacture) and the device's
        JWTs stay valid. Raises UnknownDevice, or ValueError for a bad username.
        """
        if mqtt_username is not None and (not isinstance(mqtt_username, str) or not 0 < len(mqtt_username) <= 128
                                          or _MQTT_USER_BAD.search(mqtt_username)):
            raise ValueError(f"mqtt_username: expected 1-128 of letters, digits and _ . @ -, got {_show(mqtt_username)}")
        key = new_secret()
        lookup, secret_hash, mqtt_hash = await trio.to_thread.run_sync(
            lambda: (self._keys().lookup(f"{family}\x00{key}"), hash_secret(key), hash_password(key)))
        now = self.clock()

        def swap() -> None:
            row = self._row(family, device_id)
            username = mqtt_username or self._live_username(row, now) or _MQTT_USER_BAD.sub("_", device_id)
            CredentialRow.update(revoked_at=now).where(
                (CredentialRow.device == row) & (CredentialRow.kind == "key") & CredentialRow.revoked_at.is_null()
            ).execute()
            CredentialRow.create(device=row, kind="key", lookup=lookup, secret_hash=secret_hash,
                                 mqtt_username=username, mqtt_hash=mqtt_hash, created_at=now)
            DeviceRow.update(updated_at=now).where(DeviceRow.id == row.id).execute()

        await self._write(swap)
        log.info("device key issued", family=family, device=device_id)
        await self.notify_changed(family)
        return key

    @staticmethod
    def _live_username(row: DeviceRow, now: float) -> str | None:
        """The MQTT username of the device's newest live key."""
        cred = (
            CredentialRow.select(CredentialRow.mqtt_username)
            .where((CredentialRow.device == row) & (CredentialRow.kind == "key") & CredentialRow.revoked_at.is_null()
                   & (CredentialRow.expires_at.is_null() | (CredentialRow.expires_at > now)))
            .order_by(CredentialRow.created_at.desc(), CredentialRow.id.desc())
            .first()
        )
        return None if cred is None else cred.mqtt_username

    async def revoke(self, family: str, device_id: str) -> None:
        """Revoke every credential and token of a device (it can't authenticate until rotated)."""
        now = self.clock()

        def revoke() -> None:
            row = self._row(family, device_id)
            CredentialRow.update(revoked_at=now).where(
                (CredentialRow.device == row) & CredentialRow.revoked_at.is_null()
            ).execute()
            DeviceRow.update(jwt_epoch=row.jwt_epoch + 1, jwt_grace_until=None, updated_at=now).where(
                DeviceRow.id == row.id
            ).execute()

        await self._write(revoke)
        log.info("device credentials revoked", family=family, device=device_id)
        await self.notify_changed(family)

    async def set_status(self, family: str, device_id: str, status: str, *,
                         only_from: tuple[str, ...] | None = None) -> Device:
        """Change a device's status (`disabled` refuses it, `active` enables it again).

        With `only_from`, only a device whose status (read in the same write) is one of
        those changes: an automatic change must not undo an operator's `disabled` made
        a moment before.
        """
        if status not in STATUSES:
            raise ValueError(f"bad status {status!r} (one of {', '.join(STATUSES)})")
        now = self.clock()

        was: list[str] = []

        def update() -> Device:
            row = self._row(family, device_id)
            was.append(row.status)
            if only_from is not None and row.status not in only_from:
                return Device.from_row(row)
            row.status, row.updated_at = status, now
            if status == "active" and row.first_seen is None:
                row.first_seen = now
            row.save()
            return Device.from_row(row)

        device = await self._write(update)
        if device.status != status:
            return device
        log.info("device status changed", family=family, device=device_id, status=status, was=was[0])
        if (was[0] == "disabled") != (status == "disabled"):  # only that changes who may log in
            await self.notify_changed(family)
        return device

    async def disable(self, family: str, device_id: str) -> Device:
        return await self.set_status(family, device_id, "disabled")

    async def update(self, family: str, device_id: str, **fields: Any) -> Device:
        """Update `name`, `model`, `firmware` and/or `metadata` (merged into the existing dict)."""
        allowed = {"name", "model", "firmware", "metadata"}
        if set(fields) - allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}; only {sorted(allowed)}")
        texts = {k: _check_text(k, v) for k, v in fields.items() if k != "metadata"}
        if "metadata" in fields:
            _metadata_json(fields["metadata"])
        now = self.clock()

        def update() -> Device:
            row = self._row(family, device_id)
            for name, value in texts.items():
                setattr(row, name, value)
            if "metadata" in fields:
                # The merged object must fit as well (ValueError: nothing is written).
                row.metadata = _metadata_json({**json.loads(row.metadata or "{}"), **fields["metadata"]})
            row.updated_at = now
            row.save()
            return Device.from_row(row)

        return await self._write(update)

    # -- claim codes ----------------------------------------------------------------

    async def create_claim_code(self, family: str, *, ttl_s: float, device_id: str | None = None) -> ClaimCode:
        """A one-time code that claims `device_id`, or (if None) registers a new device.

        ValueError names a bad argument; UnknownDevice if `device_id` is not registered.
        """
        _check_family(family)
        ttl_s = check_seconds("ttl_s", ttl_s)
        if device_id is not None:
            _check_id("device_id", device_id)
        code = "-".join("".join(random.choice(_CLAIM_ALPHABET) for _ in range(4)) for _ in range(3))
        now = self.clock()
        lookup = self._keys().lookup(f"claim\x00{family}\x00{code}")

        def insert() -> None:
            if device_id is not None:
                self._row(family, device_id)
            ClaimCodeRow.create(lookup=lookup, family=family, device_id=device_id, created_at=now, expires_at=now + ttl_s)

        await self._write(insert)
        return ClaimCode(code, family, device_id, now + ttl_s)

    async def redeem_claim_code(
        self, family: str, code: str, device_id: str | None = None, **provision: Any
    ) -> tuple[Device, Credentials | None]:
        """Use a claim code once: the device becomes `claimed`.

        A code made for a device claims that device (no new credentials). A code made
        without one registers `device_id` (or a generated id) as a new, claimed device
        and returns its credentials. Raises ClaimError for a bad, used or expired code.
        """
        if not isinstance(code, str):
            raise ValueError(f"code: expected a string, got {_show(code)}")
        now = self.clock()
        lookup = self._keys().lookup(f"claim\x00{family}\x00{code.strip().upper()}")

        def use() -> str | None:
            row = ClaimCodeRow.get_or_none(lookup=lookup, family=family)
            if row is None:
                raise ClaimError("unknown claim code")
            if row.used_at is not None:
                raise ClaimError("claim code already used")
            if row.expires_at <= now:
                raise ClaimError("claim code expired")
            target = row.device_id
            if target is not None and device_id is not None and device_id != target:
                raise ClaimError("claim code is for another device")
            if target is not None:
                dev = self._row(family, target)
                if dev.status == "disabled":
                    raise ClaimError("device is disabled")
                if dev.status == "provisioned":
                    dev.status, dev.updated_at = "claimed", now
                    dev.save()
            # Marking used in the same transaction as the claim: a code works once.
            row.used_at, row.used_by = now, target or device_id or ""
            row.save()
            return target

        target = await self._write(use)
        if target is not None:
            await self.notify_changed(family)
            return await self.get(family, target), None
        try:
            device, creds = await self.provision(family, device_id, status="claimed", **provision)
        except Exception:
            # The code was spent on a registration that failed; give it back.
            await self._write(
                lambda: ClaimCodeRow.update(used_at=None, used_by=None).where(ClaimCodeRow.lookup == lookup).execute()
            )
            raise
        return device, creds

    # -- reads ----------------------------------------------------------------------

    async def get(self, family: str, device_id: str) -> Device:
        """The device, or UnknownDevice."""
        return await self.storage.read(lambda: Device.from_row(self._row(family, device_id)))

    async def recent(self, family: str, device_id: str, max_age_s: float) -> Device | None:
        """The device (None if unknown) as read at most `max_age_s` ago: for hot paths
        that look a device up per message. Changes made through this registry are
        seen at once (last-seen times excepted); changes by another process (the CLI)
        once `notify_changed` reports them (DeviceServices' watch), at the latest after
        `max_age_s`. Concurrent misses for one device share one read."""
        key = (family, device_id)
        while True:
            hit = self._recent.get(key)
            if hit is not None and time.monotonic() - hit[0] <= max_age_s:
                return hit[1]
            loading = self._loading.get(key)
            if loading is None:
                break
            # A burst from one device: one read, not one per message. If that read failed
            # or was overtaken by a write (nothing cached), look again: the first waiter
            # to wake reads, the others wait for it.
            await loading.wait()
        self._loading[key] = done = trio.Event()
        generation, now = self._generation, time.monotonic()
        try:
            found = await self.find(device_id, family)
            device = found[0] if found else None
            if generation == self._generation:  # else a write may have changed it meanwhile
                if len(self._recent) >= 10_000:  # bounded: ids are whatever devices send
                    self._recent.clear()
                self._recent[key] = (now, device)
            return device
        finally:
            del self._loading[key]
            done.set()

    async def find(self, device_id: str, family: str | None = None) -> list[Device]:
        """Devices with this id (in every family unless `family` is given)."""

        def query() -> list[Device]:
            q = DeviceRow.select().where(DeviceRow.device_id == device_id)
            if family:
                q = q.where(DeviceRow.family == family)
            return [Device.from_row(r) for r in q]

        return await self.storage.read(query)

    async def list(self, family: str | None = None, *, status: str | None = None) -> list[Device]:
        """Devices ordered by family and id."""

        def query() -> list[Device]:
            q = DeviceRow.select().order_by(DeviceRow.family, DeviceRow.device_id)
            if family:
                q = q.where(DeviceRow.family == family)
            if status:
                q = q.where(DeviceRow.status == status)
            return [Device.from_row(r) for r in q]

        return await self.storage.read(query)

    async def mqtt_accounts(self, family: str) -> list[tuple[str, str]]:
        """`(username, $7$ hash)` of every enabled device of `family` with a live key."""
        now = self.clock()

        def query() -> list[tuple[str, str]]:
            rows = (
                CredentialRow.select(CredentialRow, DeviceRow)
                .join(DeviceRow)
                .where(
                    (DeviceRow.family == family) & (DeviceRow.status != "disabled") & (CredentialRow.kind == "key")
                    & CredentialRow.revoked_at.is_null()
                    & (CredentialRow.expires_at.is_null() | (CredentialRow.expires_at > now))
                )
                .order_by(CredentialRow.created_at, CredentialRow.id)
            )
            # mosquitto's passwd holds one line per user: the newest key wins in a grace period.
            return list({r.mqtt_username: (r.mqtt_username, r.mqtt_hash) for r in rows}.values())

        return await self.storage.read(query)

    # -- verification (used by core/auth.py) -----------------------------------------

    async def verify_key(self, family: str, key: str, device_id: str | None = None, *,
                         max_age_s: float = 0.0) -> Device | None:
        """The device whose live key is `key` (and whose id is `device_id`, if given).

        The salted hash costs tens of milliseconds (PBKDF2, on a worker thread): with
        `max_age_s`, a key that passed it that recently is accepted from memory, until
        anything of the registry changes (this process's writes at once, another's when
        `notify_changed` reports it) or the key expires (a rotation's grace period).
        """
        now = self.clock()
        lookup = self._keys().lookup(f"{family}\x00{key}")
        cache_key = (family, lookup, device_id)
        if max_age_s > 0:
            if (device := self._recently_verified(cache_key, max_age_s, now)) is not None:
                return device
            # One hash check per key at a time: after the memory is cleared (a registry change),
            # every request in flight for that device would each run PBKDF2 on a worker thread.
            if (flight := self._verifying.get(cache_key)) is not None:
                await flight.wait()
                if (device := self._recently_verified(cache_key, max_age_s, now)) is not None:
                    return device
            else:
                flight = self._verifying[cache_key] = trio.Event()
                try:
                    return await self._verify_key(family, key, lookup, device_id, cache_key, now, max_age_s)
                finally:
                    del self._verifying[cache_key]
                    flight.set()
        return await self._verify_key(family, key, lookup, device_id, cache_key, now, max_age_s)

    def _recently_verified(self, cache_key: tuple[str, str, str | None], max_age_s: float,
                           now: float) -> Device | None:
        hit = self._verified.get(cache_key)
        if hit is None:
            return None
        verified_at, expires_at, device = hit
        if time.monotonic() - verified_at <= max_age_s and (expires_at is None or now < expires_at):
            return device
        del self._verified[cache_key]
        return None

    async def _verify_key(self, family: str, key: str, lookup: str, device_id: str | None,
                          cache_key: tuple[str, str, str | None], now: float, max_age_s: float) -> Device | None:

        def check() -> tuple[Device, float | None] | None:
            q = (
                CredentialRow.select(CredentialRow, DeviceRow).join(DeviceRow)
                .where((CredentialRow.lookup == lookup) & (DeviceRow.family == family) & (CredentialRow.kind == "key"))
            )
            for cred in q:
                if cred.revoked_at is not None or (cred.expires_at is not None and cred.expires_at <= now):
                    continue
                if device_id is not None and cred.device.device_id != device_id:
                    continue
                # The lookup digest found the row; the salted hash is the real check.
                if verify_secret(key, cred.secret_hash):
                    return Device.from_row(cred.device), cred.expires_at
            return None

        generation = self._generation
        found = await self.storage.read(check)
        if found is None:
            return None
        device, expires_at = found
        # Not if the registry changed while the hash was checked: the answer may be stale.
        if max_age_s > 0 and generation == self._generation:
            if len(self._verified) >= 10_000:  # bounded: one entry per device key in use
                self._verified.clear()
            self._verified[cache_key] = (time.monotonic(), expires_at, device)
        return device

    async def signing_secrets(self, family: str, device_id: str) -> tuple[Device, list[str]]:
        """The device and its live signing secrets (newest first), decrypted."""
        now = self.clock()
        keys = self._keys()

        def read() -> tuple[Device, list[str]]:
            row = self._row(family, device_id)
            creds = (
                CredentialRow.select()
                .where(
                    (CredentialRow.device == row) & (CredentialRow.kind == "signing")
                    & CredentialRow.revoked_at.is_null()
                    & (CredentialRow.expires_at.is_null() | (CredentialRow.expires_at > now))
                )
                .order_by(CredentialRow.created_at.desc(), CredentialRow.id.desc())
            )
            return Device.from_row(row), [keys.decrypt(c.ciphertext, f"{family}/{device_id}") for c in creds]

        return await self.storage.read(read)

    # -- presence --------------------------------------------------------------------

    async def record_seen(self, seen: dict[tuple[str, str], float]) -> None:
        """Store many last-seen times in one write (presence flushes through here)."""
        rows = [(ts, family, device_id) for (family, device_id), ts in seen.items()]
        database = self.storage.database

        def update() -> None:
            # Prepared statements, not two peewee queries per device: a fleet of 1,000 lights
            # is flushed every few seconds, and peewee's query building cost ~0.2 s of the
            # writer thread (holding the GIL) per flush; executemany ~3 ms.
            connection = database.connection()  # type: ignore[no-untyped-call]  # peewee's stubs
            connection.executemany(_SET_LAST_SEEN, rows)
            connection.executemany(_SET_FIRST_SEEN, rows)

        # Not through _write: last-seen times change every few seconds, and emptying the
        # cache of `recent` or of verified keys for them would send every hot path back
        # to the database. (`recent` answers last_seen as old as its max_age_s; presence
        # knows better.)
        await self.storage.write(update)

    # -- internals -------------------------------------------------------------------

    @staticmethod
    def _row(family: str, device_id: str) -> DeviceRow:
        row = DeviceRow.get_or_none(family=family, device_id=device_id)
        if row is None:
            raise UnknownDevice(f"no device {family}/{device_id}")
        return row

    async def notify_changed(self, family: str) -> None:
        """Something of `family`'s devices or credentials changed (here, or in another
        process): forget the verified keys, and call `on_credentials_changed(family)`, whose
        errors are logged, never raised."""
        self._forget_keys()
        # `recent` may hold a device for minutes (a JWT's device): another process's
        # change reaches it here, not when the entry ages out.
        for key in [k for k in self._recent if k[0] == family]:
            del self._recent[key]
        hook = self.on_credentials_changed
        if hook is None:
            return
        try:
            result = hook(family)
            if inspect.isawaitable(result):
                await result
        except Exception as e:
            log.error("credentials-changed hook failed", family=family, error=repr(e))
