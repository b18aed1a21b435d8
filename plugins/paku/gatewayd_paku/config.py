"""paku's options: the plugin's `[plugins.<name>]` table in gatewayd.toml."""

from __future__ import annotations

from dataclasses import dataclass, field

from gatewayd.plugins.api import ConfigError

ALERT_EVENTS = ["error*", "*error", "alarm*", "*alarm", "fault*", "*fault", "panic", "crash", "tamper*"]


@dataclass
class PakuConfig:
    """`[plugins.paku]` (README.md, "Configuration")."""

    mqtt_host: str = ""
    """The broker address handed to devices at provisioning; "" = the host of `http.public_url`."""
    mqtt_port: int = 0
    """The broker port handed to devices; 0 = the gateway's own (`mqtt.listen`, or the external port)."""
    default_model: str = ""
    """The model of a device provisioned without one (the OTA manifest is per model); "" = the plugin's name."""
    max_payload_bytes: int = 65536
    """Larger MQTT payloads are rejected."""
    alert_events: list[str] = field(default_factory=lambda: list(ALERT_EVENTS))
    """Event names (globs) forwarded upstream as alerts; every other event goes as history."""
    command_retry_s: float = 30.0
    """How often pending commands are offered again to devices that are online."""

    def validate(self) -> None:
        if not 0 <= self.mqtt_port < 65536:
            raise ConfigError("mqtt_port", f"must be a TCP port 1-65535 (0: the gateway's MQTT port), got {self.mqtt_port}")
        if not 256 <= self.max_payload_bytes <= 16 * 1024 * 1024:
            raise ConfigError("max_payload_bytes", f"must be 256 .. 16777216, got {self.max_payload_bytes}")
        if self.command_retry_s <= 0:
            raise ConfigError("command_retry_s", f"must be > 0, got {self.command_retry_s}")
