"""kaiabc's options: the plugin's `[plugins.kaiabc]` table in gatewayd.toml."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gatewayd.plugins.api import ConfigError, SerialSettings


@dataclass
class KaiabcConfig:
    """`[plugins.kaiabc]` (README.md, "Configuration")."""

    tick_s: float = 1.0
    """Wall seconds between two advances of every live oscillator (one batch)."""
    time_acceleration: float = 1.0
    """Simulated seconds per wall second (1 = real time; the spec's `time_acceleration`)."""
    persist_every_s: float = 10.0
    """How often every oscillator's state is written, so a restart resumes it."""
    stale_after_s: float = 300.0
    """A node silent this long is flagged `temperature_stale` (its oscillator runs on its last filtered
    temperature)."""
    state_every_s: float = 5.0
    """How often every oscillator's state goes to WebSocket watchers (the spec: every 1-10 s)."""
    phase_shift_settle_hours: float = 24.0
    """Simulated hours after a phase shift's pulse before its shift is measured (phase_shift.complete)."""
    history_every_s: float = 60.0
    """How often every oscillator is sampled into its history (GET /oscillator/history)."""
    history_days: float = 30.0
    """History older than this is deleted."""
    readings_retention_days: float = 30.0
    """Sensor readings (`<name>_reading`) are kept this long after they arrived, then deleted
    in parts of `PRUNE_PART` rows (models.py), oldest first."""
    history_full_days: float = 1.0
    """History is kept at `history_every_s` this long; older, it is thinned to one sample per
    `history_coarse_s` (README, "History": bytes per node and day)."""
    history_coarse_s: float = 600.0
    """One sample per node per this many seconds in the history older than `history_full_days`."""
    ws_query_token: bool = False
    """Accept a role token (or a core token scoped live:kaiabc) as `?token=` on the WebSocket, the
    spec's way; off by default: a URL ends up in proxies' and browsers' logs. Never the admin token
    nor a node's key, even on."""
    serial: SerialSettings | None = None
    """A UART with Pico nodes on it (`[plugins.kaiabc.serial] port = "/dev/ttyACM0"`): JSON lines."""
    max_nodes: int = 20000
    """Registrations beyond this many nodes are refused (503)."""
    ingestion_per_minute: int = 100
    """Sensor data requests per node and minute (the spec's rate limit)."""
    queries_per_minute: int = 60
    """State queries per node or person and minute (the spec's)."""
    configuration_per_minute: int = 10
    """Configuration changes per node or person and minute (the spec's)."""

    def validate(self) -> None:
        for key in ("tick_s", "time_acceleration", "persist_every_s", "stale_after_s", "state_every_s", "history_every_s", "phase_shift_settle_hours",
                    "history_days", "history_full_days", "history_coarse_s", "readings_retention_days"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(key, f"must be a finite number > 0, got {value}")
        if self.readings_retention_days > 36500:
            raise ConfigError("readings_retention_days", f"must be at most 36500 (100 years), "
                              f"got {self.readings_retention_days}")
        if self.history_coarse_s < self.history_every_s:
            raise ConfigError("history_coarse_s", f"must be at least history_every_s ({self.history_every_s}), "
                              f"got {self.history_coarse_s}")
        if self.history_full_days > self.history_days:
            raise ConfigError("history_full_days", f"must be at most history_days ({self.history_days}), "
                              f"got {self.history_full_days}")
        if not 0.05 <= self.tick_s <= 3600:
            raise ConfigError("tick_s", f"must be within 0.05 .. 3600, got {self.tick_s}")
        if self.time_acceleration > 1e5:
            raise ConfigError("time_acceleration", f"must be at most 100000, got {self.time_acceleration}")
        for key in ("ingestion_per_minute", "queries_per_minute", "configuration_per_minute"):
            if not 1 <= getattr(self, key) <= 1_000_000:
                raise ConfigError(key, f"must be within 1 .. 1000000, got {getattr(self, key)}")
        if not 1 <= self.max_nodes <= 1_000_000:
            raise ConfigError("max_nodes", f"must be within 1 .. 1000000, got {self.max_nodes}")
