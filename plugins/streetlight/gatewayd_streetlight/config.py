"""The streetlight options: the plugin's `[plugins.<name>]` table in gatewayd.toml.

Three tables: the plugin's own keys, `[plugins.streetlight.light]` (the config every
light gets at configure: the site's defaults, overridden per light by an operator) and
`[plugins.streetlight.health]` (the specification's health thresholds, section 9, and
its cadence rules, section 2). README.md, "Configuration", shows them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gatewayd.plugins.api import ConfigError

from .messages import check_light_config

DAY = 86400.0


@dataclass
class LightDefaults:
    """`[plugins.streetlight.light]`: the `config` object of the configure answer."""

    schedule_enabled: bool = True
    sunrise_time: str = "06:00:00"
    """Lamp off (HH:MM:SS, site time)."""
    sunset_time: str = "18:30:00"
    """Lamp on."""
    brightness_level: int = 100
    """Percent, 0-100."""
    auto_dimming: bool = True

    def validate(self) -> None:
        for key, reason in check_light_config(self.as_dict()):
            raise ConfigError(key, reason)

    def as_dict(self) -> dict[str, object]:
        return {"schedule_enabled": self.schedule_enabled, "sunrise_time": self.sunrise_time,
                "sunset_time": self.sunset_time, "brightness_level": self.brightness_level,
                "auto_dimming": self.auto_dimming}

    def merged(self, overrides: object) -> tuple[dict[str, object], dict[str, str]]:
        """A light's config: these defaults, overridden by an operator's (the light's
        metadata `config`); and the overrides not valid, ignored: {key: reason}."""
        config = self.as_dict()
        if not isinstance(overrides, dict):
            return config, {}
        bad = dict(check_light_config(overrides))
        config.update({k: v for k, v in overrides.items() if k not in bad})
        return config, bad


@dataclass
class Health:
    """`[plugins.streetlight.health]`: when a light is offline, low, hot, poorly connected
    or failing (the specification's section 9), and how often it reports (section 2)."""

    offline_after_s: float = 120.0
    """No status for this long: offline (yellow, the `<name>-offline` alert)."""
    battery_critical_pct: float = 10.0
    """Below: critical (red, the `<name>-battery-critical` alert)."""
    battery_low_pct: float = 20.0
    """Below: low (yellow); status every `fast_status_s`, commands polled every `poll_low_battery_s`."""
    temperature_max_c: float = 65.0
    """Above: overheating (red, the `<name>-overheating` alert)."""
    temperature_high_c: float = 60.0
    """Above: status every `fast_status_s`."""
    gsm_signal_min: float = 10.0
    """Below: poor connectivity (yellow, the `<name>-poor-connectivity` alert)."""
    errors_per_hour_max: int = 5
    """More errors than this within an hour: malfunction (red, the `<name>-malfunction` alert)."""
    status_s: int = 30
    """`next_update_seconds` in normal operation."""
    fast_status_s: int = 10
    """`next_update_seconds` while hot or low on battery."""
    poll_s: int = 10
    """How often a light polls for commands (`next_poll_seconds`)."""
    poll_low_battery_s: int = 60
    poll_priority_s: int = 2
    """While a high-priority command waits for its acknowledgement."""

    def validate(self) -> None:
        if self.offline_after_s < 10:
            raise ConfigError("offline_after_s", f"must be at least 10, got {self.offline_after_s}")
        for name in ("battery_critical_pct", "battery_low_pct"):
            if not 0 <= getattr(self, name) <= 100:
                raise ConfigError(name, f"must be a percentage 0-100, got {getattr(self, name)}")
        if self.battery_critical_pct > self.battery_low_pct:
            raise ConfigError("battery_critical_pct",
                              f"must not be above battery_low_pct ({self.battery_low_pct}), got {self.battery_critical_pct}")
        if self.temperature_high_c > self.temperature_max_c:
            raise ConfigError("temperature_high_c",
                              f"must not be above temperature_max_c ({self.temperature_max_c}), got {self.temperature_high_c}")
        if self.errors_per_hour_max < 0:
            raise ConfigError("errors_per_hour_max", f"must be >= 0, got {self.errors_per_hour_max}")
        for name in ("status_s", "fast_status_s", "poll_s", "poll_low_battery_s", "poll_priority_s"):
            if not 1 <= getattr(self, name) <= 3600:
                raise ConfigError(name, f"must be 1-3600 seconds, got {getattr(self, name)}")


@dataclass
class StreetlightConfig:
    """`[plugins.streetlight]` (README.md, "Configuration")."""

    light: LightDefaults = field(default_factory=LightDefaults)
    health: Health = field(default_factory=Health)
    enrollment: bool = False
    """Unknown lights that configure wait as pending until an operator approves them
    (false: they are answered 404 until registered with `gatewayd devices add`)."""
    require_signatures: bool = False
    """Every light must sign its requests (`X-Device-Signature`); otherwise only lights
    marked `"signed": true` in their metadata, or that have signed once, must."""
    light_id_prefix: str = "SL"
    """Light ids the gateway assigns: the prefix and a number (`SL001`)."""
    service_area: list[float] = field(default_factory=list)
    """`[south, west, north, east]` in degrees: a light configuring outside is refused
    (`CONFIG_INVALID`); empty: anywhere."""
    mqtt: bool = True
    """Hand lights their MQTT settings at configure when the gateway runs MQTT."""
    mqtt_host: str = ""
    """The broker address given to lights; "" = the host of `http.public_url`."""
    mqtt_port: int = 0
    """The broker port given to lights; 0 = the gateway's own (`mqtt.listen`)."""
    mqtt_topic_prefix: str = "devices"
    """The specification's topics: `devices/<light_id>/commands`, `.../status`."""
    token_ttl_s: float = 7 * DAY
    """Device tokens (JWT) expire after this (the specification: 7 days)."""
    token_refresh_before_s: float = DAY
    """A status answer carries a fresh token when the light's expires within this."""
    token_max_silence_s: float = 30 * DAY
    """A token of a light not heard from for this long is refused (it configures again)."""
    requests_per_minute: int = 120
    """Per light, all its requests together; over it: 429 with `retry_after_seconds`."""
    configure_per_minute: int = 10
    """Configure requests per light, counted once the request passed the light's checks
    (its signature, when it signs; else per light and client address): a stranger cannot
    use up a light's configures."""
    configure_per_address_per_minute: int = 600
    """Configure requests per client address, counted before anything else (lights behind
    one NAT share it): what a flood of forged or unknown ids can cost the gateway."""
    command_redeliver_s: float = 30.0
    """A command handed out (or pushed) and not acknowledged is handed out again after this."""
    max_sync_readings: int = 2000
    """Readings in one offline sync (3 hours at 10 s is 1,080)."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest body once decompressed (gzip): offline syncs and logs."""
    retention_days: float = 30.0
    """The plugin's own tables keep this many days (the upstream outbox keeps what is
    not delivered yet, whatever its age)."""
    pending_retry_s: int = 300
    """`retry_after_seconds` of a light waiting for approval, or not registered."""

    def validate(self) -> None:
        if not (1 <= len(self.light_id_prefix) <= 16 and self.light_id_prefix.isascii()
                and self.light_id_prefix.isalnum()):
            raise ConfigError("light_id_prefix", f"expected 1-16 ASCII letters or digits, got {self.light_id_prefix!r}")
        if self.service_area:
            if len(self.service_area) != 4:
                raise ConfigError("service_area", f"expected [south, west, north, east], got {self.service_area}")
            south, west, north, east = self.service_area
            if not (-90 <= south < north <= 90 and -180 <= west < east <= 180):
                raise ConfigError("service_area", "expected -90 <= south < north <= 90 and -180 <= west < east <= 180, "
                                  f"got {self.service_area}")
        if not 0 <= self.mqtt_port < 65536:
            raise ConfigError("mqtt_port", f"must be a TCP port 1-65535 (0: the gateway's MQTT port), got {self.mqtt_port}")
        if not self.mqtt_topic_prefix or any(c in self.mqtt_topic_prefix for c in "+#\0") \
                or self.mqtt_topic_prefix.startswith("/") or self.mqtt_topic_prefix.endswith("/"):
            raise ConfigError("mqtt_topic_prefix", f"expected topic levels without + # or a leading or trailing /, "
                              f"got {self.mqtt_topic_prefix!r}")
        if not 3600 <= self.token_ttl_s <= 365 * DAY:
            raise ConfigError("token_ttl_s", f"must be 3600 s to 365 days, got {self.token_ttl_s}")
        if not 0 <= self.token_refresh_before_s < self.token_ttl_s:
            raise ConfigError("token_refresh_before_s", f"must be >= 0 and below token_ttl_s ({self.token_ttl_s}), "
                              f"got {self.token_refresh_before_s}")
        if self.token_max_silence_s < 3600:
            raise ConfigError("token_max_silence_s", f"must be at least 3600, got {self.token_max_silence_s}")
        for name in ("requests_per_minute", "configure_per_minute", "configure_per_address_per_minute"):
            if not 1 <= getattr(self, name) <= 100_000:
                raise ConfigError(name, f"must be 1-100000, got {getattr(self, name)}")
        if self.command_redeliver_s < 1:
            raise ConfigError("command_redeliver_s", f"must be at least 1, got {self.command_redeliver_s}")
        if not 1 <= self.max_sync_readings <= 100_000:
            raise ConfigError("max_sync_readings", f"must be 1-100000, got {self.max_sync_readings}")
        if not 64 * 1024 <= self.max_body_bytes <= 256 * 1024 * 1024:
            raise ConfigError("max_body_bytes", f"must be 65536-268435456, got {self.max_body_bytes}")
        if self.retention_days <= 0:
            raise ConfigError("retention_days", f"must be > 0, got {self.retention_days}")
        if not 1 <= self.pending_retry_s <= 86400:
            raise ConfigError("pending_retry_s", f"must be 1-86400, got {self.pending_retry_s}")
