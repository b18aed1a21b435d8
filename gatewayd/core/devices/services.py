"""Device identity and access, assembled: registry, auth, rate limits, presence, commands.

The Gateway owns one `DeviceServices`. It installs the core device tables, runs the
presence and command-expiry services in the core nursery, and hands each plugin four
facades bound to its family (`ctx.devices`, `ctx.auth`, `ctx.ratelimit`,
`ctx.commands`). What it tells the rest of the core comes through its constructor:

- `on_credentials_changed(family)`: MQTT accounts changed (also fired for changes made
  by `gatewayd devices ...` in another process, noticed within `devices.presence_flush_s`,
  as are commands another process queued);
- `emit(family, device_id, type, data)` (async): a device went online or offline;
- `publish(topic, payload)` (async): the MQTT push of commands;
- `check_command(family, payload)`: the family plugin's check of a queued command
  (`gatewayd_check_command`), returning what to store or raising ValueError.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import peewee
import trio

from ..logs import get_logger
from .auth import Authenticator, FamilyAuth
from .commands import COMMAND_SCHEMA, CommandQueue, FamilyCommands
from .presence import Emit, Presence, log_transition
from .ratelimit import FamilyRateLimits, RateLimiter
from .registry import DEVICE_SCHEMA, CredentialRow, Credentials, Device, DeviceRegistry, DeviceRow
from .secrets import Keyring, load_master_key

if TYPE_CHECKING:
    from ..config import Config
    from ..metrics import Metrics
    from ..storage import Storage

__all__ = ["DeviceServices", "FamilyDevices"]

log = get_logger("gatewayd.devices")


class FamilyDevices:
    """`ctx.devices`: the registry and presence bound to one family."""

    def __init__(self, services: DeviceServices, family: str):
        self._s = services
        self.family = family

    async def provision(self, device_id: str | None = None, **fields: Any) -> tuple[Device, Credentials]:
        """Register a device; returns it and its credentials (shown once). See `DeviceRegistry.provision`."""
        return await self._s.registry.provision(self.family, device_id, **fields)

    async def get(self, device_id: str, *, max_age_s: float = 0.0) -> Device | None:
        """The device, or None if it isn't registered.

        `max_age_s` > 0: an answer read up to that long ago will do (a per-message
        lookup on a hot path); changes made in this process are seen at once, the
        CLI's within `max_age_s`.
        """
        if max_age_s > 0:
            return await self._s.registry.recent(self.family, device_id, max_age_s)
        found = await self._s.registry.find(device_id, self.family)
        return found[0] if found else None

    async def list(self, *, status: str | None = None) -> list[Device]:
        return await self._s.registry.list(self.family, status=status)

    async def update(self, device_id: str, **fields: Any) -> Device:
        """Update name / model / firmware / metadata (merged), e.g. from a configure request."""
        return await self._s.registry.update(self.family, device_id, **fields)

    async def claim(self, code: str, device_id: str | None = None, **fields: Any) -> tuple[Device, Credentials | None]:
        """Redeem a one-time claim code (raises `ClaimError`); see `DeviceRegistry.redeem_claim_code`."""
        return await self._s.registry.redeem_claim_code(self.family, code, device_id, **fields)

    def touch(self, device_id: str) -> None:
        """Heard from the device (auth helpers do this; call it for MQTT/serial traffic)."""
        self._s.presence.touch(self.family, device_id)

    async def activate(self, device: Device) -> Device:
        """The device authenticated and spoke: `provisioned`/`claimed` become `active`.

        The HTTP auth helpers do this themselves; call it for traffic the core did not
        authenticate for you (MQTT, where the broker checked the password; serial).
        A disabled device stays disabled. Cheap once active: no write.
        """
        if device.status in ("provisioned", "claimed"):
            # Read again in the write: disabled since `device` was read stays disabled.
            return await self._s.registry.set_status(self.family, device.id, "active",
                                                     only_from=("provisioned", "claimed"))
        return device

    def leave(self, device_id: str, *, reason: str = "said offline") -> bool:
        """The device said it is going (an offline state, its last will): offline at once,
        with a `device_offline` event carrying `reason`; its last-seen time stays when
        it last spoke. False if it was not online."""
        return self._s.presence.leave(self.family, device_id, reason=reason)

    def is_online(self, device_id: str) -> bool:
        return self._s.presence.is_online(self.family, device_id)

    def set_offline_after(self, seconds: float) -> None:
        """The family's offline threshold (default `devices.offline_after_s`)."""
        self._s.presence.offline_after(self.family, seconds)

    async def mqtt_accounts(self) -> list[tuple[str, str]]:
        return await self._s.registry.mqtt_accounts(self.family)

    async def issue_key(self, device_id: str, *, mqtt_username: str | None = None) -> str:
        """A fresh key (API key and MQTT password) for a device, in clear, once; its other
        keys stop working now, its signing secret and JWTs stay valid. For a protocol that
        hands the device its own login (streetlight's configure); see `DeviceRegistry.issue_key`."""
        return await self._s.registry.issue_key(self.family, device_id, mqtt_username=mqtt_username)


class DeviceServices:
    """Builds and runs everything device-facing for one Gateway (or one CLI command)."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        emit: Emit = log_transition,
        on_credentials_changed: Callable[[str], Any] | None = None,
        publish: Callable[[str, bytes], Awaitable[Any]] | None = None,
        check_command: Callable[[str, Any], Any] | None = None,
    ):
        self.config = config
        self.storage = storage
        self.registry = DeviceRegistry(storage, clock=clock, on_credentials_changed=on_credentials_changed)
        d = config.devices
        self.presence = Presence(self.registry, offline_after_s=d.offline_after_s, flush_s=d.presence_flush_s,
                                 clock=clock, emit=emit)
        a = config.auth
        self.auth = Authenticator(
            self.registry, metrics, max_failures=a.max_failures, failure_window_s=a.failure_window_s,
            lockout_s=a.lockout_s, jwt_ttl_s=a.jwt_ttl_s, max_skew_s=a.signature_max_skew_s,
            key_cache_s=a.key_cache_s, clock=clock,
            presence=self.presence,
        )
        self.ratelimit = RateLimiter(wall_clock=clock)
        self.commands = CommandQueue(storage, clock=clock, default_ttl_s=d.command_ttl_s, sweep_s=d.command_sweep_s,
                                     publish=publish, check=check_command)
        self._fingerprint: dict[str, tuple] | None = None

    def install(self) -> None:
        """Load the master key and create/migrate the core device tables (blocking)."""
        self.registry.keyring = Keyring(load_master_key(self.config.data_dir, self.config.auth.master_key_env))
        self.storage.install(DEVICE_SCHEMA)
        self.storage.install(COMMAND_SCHEMA)

    def context_fields(self, family: str) -> dict[str, Any]:
        """The `PluginContext` fields of one plugin."""
        return {
            "devices": FamilyDevices(self, family),
            "auth": FamilyAuth(self.auth, family),
            "ratelimit": FamilyRateLimits(self.ratelimit, family),
            "commands": FamilyCommands(self.commands, family),
        }

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Presence, command expiry and the external-change watch, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.presence.run)
            await nursery.start(self.commands.run)
            nursery.start_soon(self._watch_changes)
            task_status.started(self)

    async def _watch_changes(self) -> None:
        # `gatewayd devices add` in another process writes the same database; notice
        # it so the broker's accounts follow without a restart, a revoked or disabled
        # device is refused (the registry's held rows are dropped), and a command queued
        # by `gatewayd devices command` reaches its device's poll and push.
        while True:
            try:
                await self.commands.refresh()
            except Exception as e:
                log.error("command watch failed", error=repr(e))
            try:
                current = await self.storage.read(_fingerprint)
                if self._fingerprint is not None:
                    for family in sorted(set(current) | set(self._fingerprint)):
                        if current.get(family) != self._fingerprint.get(family):
                            await self.registry.notify_changed(family)
                self._fingerprint = current
            except Exception as e:
                log.error("device change watch failed", error=repr(e))
            await trio.sleep(self.config.devices.presence_flush_s)


def _fingerprint() -> dict[str, tuple]:
    devices = {
        r.family: (r.n, r.updated)
        for r in DeviceRow.select(
            DeviceRow.family, peewee.fn.COUNT(DeviceRow.id).alias("n"), peewee.fn.MAX(DeviceRow.updated_at).alias("updated")
        ).group_by(DeviceRow.family)
    }
    creds = {
        r.family: (r.latest, r.revoked)
        for r in CredentialRow.select(
            DeviceRow.family, peewee.fn.MAX(CredentialRow.id).alias("latest"),
            peewee.fn.COUNT(CredentialRow.revoked_at).alias("revoked"),
        ).join(DeviceRow).group_by(DeviceRow.family).objects()
    }
    return {f: (devices.get(f), creds.get(f)) for f in set(devices) | set(creds)}
