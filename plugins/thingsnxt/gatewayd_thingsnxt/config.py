"""thingsnxt's options: the plugin's `[plugins.<name>]` table in gatewayd.toml (README.md,
"Configuration"). Every key is checked when the gateway starts; a typo names the key."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from gatewayd.plugins.api import ConfigError

# A key glob: the characters of a telemetry key (telemetry.KEY), `*` and `?`.
_GLOB = re.compile(r"[A-Za-z0-9_.:*?-]{1,64}")
WEBHOOK_EVENTS = ("telemetry_update", "device_online", "device_offline")
WebhookEvent = Literal["telemetry_update", "device_online", "device_offline"]


def _check_globs(name: str, globs: list[str] | None) -> None:
    for i, glob in enumerate(globs or []):
        if not _GLOB.fullmatch(glob):
            raise ConfigError(f"{name}[{i}]", f"expected a key or a glob of letters, digits, _ . : - * ?, got {glob!r}")


@dataclass
class KeyRules:
    """The specification's security rules for one model or one device: which telemetry
    keys the device may write, which keys an app or operator may set. A list left out
    is the default's (`[plugins.<name>.security]`)."""

    device_writes: list[str] | None = None
    """Globs of the keys a device's telemetry may carry; any other key is refused (403)."""
    app_sets: list[str] | None = None
    """Globs of the keys an app or an operator may set (the virtual pins); others are refused (403)."""

    def validate(self) -> None:
        _check_globs("device_writes", self.device_writes)
        _check_globs("app_sets", self.app_sets)


@dataclass
class Security:
    """`[plugins.<name>.security]`: the default rules, then per model and per device."""

    device_writes: list[str] = field(default_factory=lambda: ["*"])
    app_sets: list[str] = field(default_factory=lambda: ["v*"])
    models: dict[str, KeyRules] = field(default_factory=dict)
    """`[plugins.<name>.security.models.<model>]`: for the devices of that model."""
    devices: dict[str, KeyRules] = field(default_factory=dict)
    """`[plugins.<name>.security.devices.<id>]`: for one device (before its model's)."""

    def validate(self) -> None:
        _check_globs("device_writes", self.device_writes)
        _check_globs("app_sets", self.app_sets)


@dataclass
class Webhook:
    """`[[plugins.<name>.webhooks]]`: a URL the gateway POSTs to (signed, retried)."""

    url: str
    secret_env: str = ""
    """The environment variable holding the HMAC secret (`X-Gatewayd-Signature`); "" = unsigned."""
    devices: list[str] = field(default_factory=lambda: ["*"])
    """Device ids or globs: `["*"]` (every device) is a global webhook."""
    events: list[WebhookEvent] = field(default_factory=lambda: ["telemetry_update"])
    """Any of telemetry_update, device_online, device_offline."""

    def validate(self) -> None:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.url):
            raise ConfigError("url", f"expected an http:// or https:// URL, got {self.url!r}")
        if not self.devices or not all(isinstance(d, str) and 0 < len(d) <= 128 for d in self.devices):
            raise ConfigError("devices", "expected device ids or globs (\"*\" for every device)")
        if not self.events:
            raise ConfigError("events", f"expected at least one of {', '.join(WEBHOOK_EVENTS)}")


@dataclass
class ThingsnxtConfig:
    """`[plugins.thingsnxt]` (README.md, "Configuration")."""

    api_base_url: str = ""
    """The `API_BASE_URL` written to devices at provisioning; "" = `http.public_url` + the mount."""
    rate_limit: int = 100
    """Requests per `rate_window_s` per client address (the specification's 100 per 60 s); 0 = none."""
    rate_window_s: float = 60.0
    offline_after_s: float = 60.0
    """A device not heard from for this long is offline (it sends every 10 s and polls every 5 s)."""
    notify_cooldown_s: float = 300.0
    """After an online (offline) notification, the same device's next ones wait this long."""
    max_keys: int = 64
    """Keys in one telemetry message's `data`."""
    max_data_bytes: int = 16384
    """One message's `data`, as JSON."""
    max_bulk: int = 1000
    """Readings in one bulk request."""
    max_decompressed_bytes: int = 4 * 1024 * 1024
    """A gzip request body, once inflated; a larger one is refused (413)."""
    security: Security = field(default_factory=Security)
    webhooks: list[Webhook] = field(default_factory=list)

    def validate(self) -> None:
        if self.api_base_url and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.api_base_url):
            raise ConfigError("api_base_url", f"expected an http:// or https:// URL, got {self.api_base_url!r}")
        if self.rate_limit < 0:
            raise ConfigError("rate_limit", f"must be >= 0 (0: no limit), got {self.rate_limit}")
        if self.rate_window_s <= 0:
            raise ConfigError("rate_window_s", f"must be > 0, got {self.rate_window_s}")
        if self.offline_after_s < 5:
            raise ConfigError("offline_after_s", f"must be at least 5 (devices poll every 5 s), got {self.offline_after_s}")
        if self.notify_cooldown_s < 0:
            raise ConfigError("notify_cooldown_s", f"must be >= 0, got {self.notify_cooldown_s}")
        if not 1 <= self.max_keys <= 1024:
            raise ConfigError("max_keys", f"must be 1 .. 1024, got {self.max_keys}")
        if not 256 <= self.max_data_bytes <= 65536:
            # An event's data holds 64 KiB at most: a telemetry message goes through the rules.
            raise ConfigError("max_data_bytes", f"must be 256 .. 65536, got {self.max_data_bytes}")
        if not 1 <= self.max_bulk <= 10000:
            raise ConfigError("max_bulk", f"must be 1 .. 10000, got {self.max_bulk}")
        if not 1024 <= self.max_decompressed_bytes <= 64 * 1024 * 1024:
            raise ConfigError("max_decompressed_bytes", f"must be 1024 .. 67108864, got {self.max_decompressed_bytes}")
