"""edgesentinel's options: the plugin's `[plugins.<name>]` table in gatewayd.toml.

Every option has a working default; README.md ("Configuration") shows them as TOML. A
mistyped key is an error naming it (`plugins.edgesentinel.windows.bands_hz.vibration[0]:
...`), before anything starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from gatewayd.plugins.api import ConfigError

HOURS = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")
OFFSET = re.compile(r"[+-]\d{2}:\d{2}")
EMAIL = re.compile(r"[^@\s,;<>\"]+@[^@\s,;<>\"]+\.[^@\s,;<>\"]+")  # as the core's email action checks it


@dataclass
class Profile:
    """A node's configuration profile (`GET /api/iot/v1/config`), per model."""

    sampling_hz: dict[str, float] = field(default_factory=lambda: {
        "vibration": 1000.0, "acoustic": 4000.0, "current": 1000.0, "temperature": 0.1, "humidity": 0.1})
    """Sampling rate per sensor. Under sustained backpressure the answer scales the rates down."""
    window_s: float = 1.0
    """Length of one statistics window (raw waveforms are cut into windows of this length)."""
    upload_interval_s: float = 60.0
    """How often a node uploads a batch when it has data."""
    batch_max_records: int = 5000
    thresholds: dict[str, float] = field(default_factory=lambda: {
        "over_torque_nm": 40.0, "vibration_rms_g": 1.5, "acoustic_db": 85.0, "stator_temp_c": 90.0})
    ntp_servers: list[str] = field(default_factory=lambda: ["pool.ntp.org"])

    def check(self) -> None:
        for sensor, hz in self.sampling_hz.items():
            if not 0 < hz <= 1_000_000:
                raise ConfigError(f"sampling_hz.{sensor}", f"must be > 0 and at most 1000000 Hz, got {hz}")
        if not 0 < self.window_s <= 3600:
            raise ConfigError("window_s", f"must be > 0 and at most 3600 s, got {self.window_s}")
        if not 1 <= self.upload_interval_s <= 86400:
            raise ConfigError("upload_interval_s", f"must be 1 .. 86400 s, got {self.upload_interval_s}")
        if not 1 <= self.batch_max_records <= 100_000:
            raise ConfigError("batch_max_records", f"must be 1 .. 100000, got {self.batch_max_records}")


@dataclass
class DeviceSettings:
    """`[plugins.edgesentinel.devices.<id>]`: one node's overrides; unset keys keep its model's profile."""

    profile: str = ""
    """Use this profile instead of the one named after the device's model."""
    sampling_hz: dict[str, float] = field(default_factory=dict)
    """Merged over the profile's rates."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Merged over the profile's thresholds."""
    window_s: float | None = None
    upload_interval_s: float | None = None
    signature: Literal["", "optional", "required"] = ""
    """"" = the site's `signature` option."""


@dataclass
class Backpressure:
    """When the gateway tells nodes to slow down (README.md, "Backpressure")."""

    elevated_fill: float = 0.7
    """Outbox fill (0-1) from which 200 answers carry `next_hint: "backoff_ms: N"`."""
    reject_fill: float = 0.9
    """Outbox fill from which batches are refused with 429 (nothing stored)."""
    max_inflight: int = 4
    """Batches being decoded or stored at once; one more is refused with 429."""
    max_writer_queue: int = 200
    """Write jobs queued for the database; beyond this, batches are refused with 429."""
    max_inflight_bytes: int = 32 * 1024 * 1024
    """Inflated bytes of the batches being parsed and stored at once; a batch that would
    exceed it (with others in flight) is refused with 429. Parsed, a batch takes about 6x
    its inflated size in memory (README.md, "Memory")."""
    backoff_ms: int = 5000
    """The hint at the threshold; it grows towards `max_backoff_ms` as the outbox fills."""
    max_backoff_ms: int = 300_000
    degrade_after_s: float = 300.0
    """Pressure (elevated or worse) this long lowers the sampling rates in `/config` answers."""
    degrade_factor: float = 0.5
    """What the rates are multiplied by while degraded."""

    def check(self) -> None:
        if not 0 < self.elevated_fill < self.reject_fill <= 1:
            raise ConfigError("elevated_fill", "0 < elevated_fill < reject_fill <= 1 must hold, got "
                                               f"{self.elevated_fill} and {self.reject_fill}")
        if self.max_inflight < 1:
            raise ConfigError("max_inflight", f"must be at least 1, got {self.max_inflight}")
        if self.max_inflight_bytes < 1024:
            raise ConfigError("max_inflight_bytes", f"must be at least 1024, got {self.max_inflight_bytes}")
        if self.max_writer_queue < 1:
            raise ConfigError("max_writer_queue", f"must be at least 1, got {self.max_writer_queue}")
        if not 1 <= self.backoff_ms <= self.max_backoff_ms <= 3_600_000:
            raise ConfigError("backoff_ms", "1 <= backoff_ms <= max_backoff_ms <= 3600000 must hold, got "
                                            f"{self.backoff_ms} and {self.max_backoff_ms}")
        if not 0 < self.degrade_factor <= 1:
            raise ConfigError("degrade_factor", f"must be > 0 and at most 1, got {self.degrade_factor}")
        if self.degrade_after_s < 0:
            raise ConfigError("degrade_after_s", f"must be >= 0, got {self.degrade_after_s}")


@dataclass
class Windows:
    """Window statistics computed from raw waveforms (README.md, "Windows")."""

    bands_hz: dict[str, list[list[float]]] = field(default_factory=lambda: {
        "vibration": [[10.0, 100.0], [100.0, 500.0]], "acoustic": [[20.0, 500.0], [500.0, 2000.0]],
        "current": [[45.0, 65.0], [65.0, 500.0]]})
    """Band power per waveform metric: `[low, high)` in Hz; other metrics get the whole band."""
    nperseg: int = 256
    """Welch segment length (capped at the window's length)."""
    raw_retention_days: float = 7.0
    """Raw waveforms are kept locally this long (0: not kept)."""
    forward_raw: bool = False
    """Forward raw waveforms upstream, in the lowest class (`log`); statistics always go."""
    max_samples: int = 65536
    """Longest raw waveform accepted (samples)."""

    def check(self) -> None:
        for metric, bands in self.bands_hz.items():
            for i, band in enumerate(bands):
                if len(band) != 2 or not 0 <= band[0] < band[1]:
                    raise ConfigError(f"bands_hz.{metric}[{i}]", f"expected [low, high] with 0 <= low < high, got {band}")
        if not 8 <= self.nperseg <= 65536:
            raise ConfigError("nperseg", f"must be 8 .. 65536, got {self.nperseg}")
        if self.raw_retention_days < 0:
            raise ConfigError("raw_retention_days", f"must be >= 0, got {self.raw_retention_days}")
        if not 16 <= self.max_samples <= 1 << 20:
            raise ConfigError("max_samples", f"must be 16 .. 1048576, got {self.max_samples}")


@dataclass
class Webhook:
    """The core's webhook action: the alert as JSON, signed with the secret `secret_env` names."""

    url: str
    secret_env: str = ""


@dataclass
class Team:
    """Who hears of a workflow (README.md, "Workflows"): the core's alert actions."""

    email: list[str] = field(default_factory=list)
    """Addresses mailed through `[notifications.smtp]` (and passed to the webhooks as `to`)."""
    webhooks: list[Webhook] = field(default_factory=list)
    slack: list[str] = field(default_factory=list)
    """Slack incoming-webhook URLs."""
    msteams: list[str] = field(default_factory=list)
    """Microsoft Teams Workflows webhook URLs (an Adaptive Card each)."""


@dataclass
class EdgesentinelConfig:
    """`[plugins.edgesentinel]` (README.md, "Configuration")."""

    require_claim: bool = True
    """Nodes are refused (403) until claimed with a claim code (the spec's claiming)."""
    signature: Literal["optional", "required"] = "optional"
    """`X-Signature` (HMAC-SHA256 of the body): checked when sent; `required`: with `X-Timestamp`."""
    max_skew_s: float = 120.0
    """A signed request's `X-Timestamp` may be this far from the gateway's clock (the spec's ±2 min)."""
    nonce_ttl_s: float = 120.0
    """A handshake's nonce is good this long, once."""
    dedup_days: float = 30.0
    """Idempotency keys and record hashes are kept this long (the spec's 30 days)."""
    retention_days: float = 90.0
    """Telemetry, windows and events are kept locally this long (0: forever)."""
    max_decompressed_bytes: int = 16 * 1024 * 1024
    """A batch that decompresses to more is refused (400): a compression bomb. The spec's
    batches are 1-5 MB; a small board sets less (README.md, "Memory")."""
    max_records: int = 20_000
    """Records in one batch at most (the spec: 5-10k)."""
    silence_s: float = 120.0
    """A node silent this long is offline (`device_offline`): a connectivity loss begins."""
    connectivity_lost_s: float = 300.0
    """Silence this long raises `connectivity-lost` (the spec: "Duration > 5 minutes")."""
    operating_hours: str = "07:00-19:00"
    """The site's working hours: a light-curtain breach outside them is a security alert."""
    utc_offset: str = "+00:00"
    """The site's offset from UTC, for the hours and the daily histograms."""
    safety_edge_max: int = 3
    """More safety-edge triggers than this within `safety_edge_window_s` is a safety-audit alert."""
    safety_edge_window_s: float = 600.0
    retry_alert_after: int = 5
    """A node reporting more failed upload attempts than this raises `server_unreachable`."""
    escalate_l2_s: float = 1800.0
    """An unresolved alert escalates to the `l2` team this long after it began, ..."""
    escalate_l3_s: float = 3600.0
    """... and to the `l3` team this long after."""
    url_ttl_s: float = 3600.0
    """How long a signed firmware download URL from `/ota/check` works."""
    profiles: dict[str, Profile] = field(default_factory=lambda: {"default": Profile()})
    """Per model; `default` for a model without its own."""
    devices: dict[str, DeviceSettings] = field(default_factory=dict)
    backpressure: Backpressure = field(default_factory=Backpressure)
    windows: Windows = field(default_factory=Windows)
    teams: dict[str, Team] = field(default_factory=dict)
    """`maintenance`, `security`, `safety`, `it`, `l2`, `l3`: who each workflow tells."""

    def validate(self) -> None:
        for name, profile in self.profiles.items():
            _under(f"profiles.{name}", profile.check)
        for device, settings in self.devices.items():
            for sensor, hz in settings.sampling_hz.items():
                if not 0 < hz <= 1_000_000:
                    raise ConfigError(f"devices.{device}.sampling_hz.{sensor}", f"must be > 0 Hz, got {hz}")
            if settings.profile and settings.profile not in self.profiles:
                raise ConfigError(f"devices.{device}.profile",
                                  f"no profile {settings.profile!r} (profiles: {', '.join(sorted(self.profiles))})")
        _under("backpressure", self.backpressure.check)
        _under("windows", self.windows.check)
        for key in ("max_skew_s", "nonce_ttl_s", "silence_s", "safety_edge_window_s", "escalate_l2_s", "url_ttl_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"must be > 0, got {getattr(self, key)}")
        if self.connectivity_lost_s <= self.silence_s:
            raise ConfigError("connectivity_lost_s", f"must be longer than silence_s ({self.silence_s}), "
                                                     f"got {self.connectivity_lost_s}")
        if self.escalate_l2_s <= self.connectivity_lost_s:
            raise ConfigError("escalate_l2_s", f"must be after connectivity_lost_s ({self.connectivity_lost_s}), "
                                               f"got {self.escalate_l2_s}")
        if self.escalate_l3_s <= self.escalate_l2_s:
            raise ConfigError("escalate_l3_s", f"must be after escalate_l2_s ({self.escalate_l2_s}), "
                                               f"got {self.escalate_l3_s}")
        for key in ("dedup_days", "retention_days"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.dedup_days == 0:
            raise ConfigError("dedup_days", "must be > 0: duplicate protection needs the keys for a while")
        if not 1024 <= self.max_decompressed_bytes <= 1 << 30:
            raise ConfigError("max_decompressed_bytes", f"must be 1024 .. 1073741824, got {self.max_decompressed_bytes}")
        if not 1 <= self.max_records <= 1_000_000:
            raise ConfigError("max_records", f"must be 1 .. 1000000, got {self.max_records}")
        m = HOURS.fullmatch(self.operating_hours)
        if not m or int(m[1]) > 24 or int(m[3]) > 24 or int(m[2]) > 59 or int(m[4]) > 59:
            raise ConfigError("operating_hours", f"expected 'HH:MM-HH:MM', got {self.operating_hours!r}")
        if not OFFSET.fullmatch(self.utc_offset):
            raise ConfigError("utc_offset", f"expected an offset like '+01:00', got {self.utc_offset!r}")
        if self.safety_edge_max < 1 or self.retry_alert_after < 0:
            raise ConfigError("safety_edge_max" if self.safety_edge_max < 1 else "retry_alert_after",
                              "must be a positive count")
        for name, team in self.teams.items():
            urls = [(f"webhooks[{i}].url", hook.url) for i, hook in enumerate(team.webhooks)]
            urls += [(f"{kind}[{i}]", url) for kind in ("slack", "msteams") for i, url in enumerate(getattr(team, kind))]
            for key, url in urls:
                if not re.match(r"https?://[^\s/]+", url):
                    raise ConfigError(f"teams.{name}.{key}", f"expected an http(s) URL, got {url!r}")
            for i, address in enumerate(team.email):
                if not EMAIL.fullmatch(address):
                    raise ConfigError(f"teams.{name}.email[{i}]", f"expected an e-mail address, got {address!r}")

    def offset_s(self) -> float:
        sign = -1 if self.utc_offset[0] == "-" else 1
        hours, minutes = self.utc_offset[1:].split(":")
        return sign * (int(hours) * 3600 + int(minutes) * 60)


def _under(prefix: str, check: Callable[[], None]) -> None:
    try:
        check()
    except ConfigError as e:
        raise e.under(prefix) from None
