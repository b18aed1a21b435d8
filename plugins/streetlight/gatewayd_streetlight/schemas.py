"""The routes' declared bodies (msgspec Structs): their OpenAPI schemas and the first check
of every request, in the specification's field names (seed 001, sections 1-3 and 12).

The declaration checks types and ranges, once, for HTTP bodies and MQTT payloads alike
(`convert`); `messages.py` then checks only what a schema cannot say (a plausible clock,
coordinates in the service area, a body's `device_id` being the path's) and normalises. Unknown fields are ignored, not refused: the specification says a
light sends "all data", and a firmware that adds a field must keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from gatewayd.plugins.api import Meta, Struct


def whole(regex: str) -> str:
    """A pattern the whole string must match: msgspec uses Python's `re.search`, whose `$`
    also matches before a final newline ("battery_low\\n"); `(?!\\n)$` does not, in Python
    and in the OpenAPI document's ECMA dialect alike."""
    return rf"^(?:{regex})(?!\n)$"


Pct = Annotated[float, Meta(ge=0, le=100)]
Signal = Annotated[float, Meta(ge=-200, le=200)]
Time = Annotated[str, Meta(max_length=64)] | float
# An integer the spec gives as one, also sent as 864000.0 (firmware whose JSON encoder
# writes every number as a float); stored as an int (messages.parse_status).
WholeSeconds = Annotated[float, Meta(ge=0, le=2**40, multiple_of=1)]
Text = Annotated[str, Meta(max_length=256)]
DeviceId = Annotated[str, Meta(pattern=whole(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}"))]
PowerState = Literal["on", "off", "error"]


class Error(Struct):
    """Every refusal (the specification's error body)."""

    status: Literal["error"]
    code: str
    message: str
    retry_after_seconds: int


# -- configure (section 1) ------------------------------------------------------------


class ConfigureRequest(Struct, omit_defaults=True):
    device_id: DeviceId | None = None
    device_type: Annotated[str, Meta(max_length=128)] | None = None
    name: Text | None = None
    city: Text | None = None
    latitude: Annotated[float, Meta(ge=-90, le=90)] | None = None
    longitude: Annotated[float, Meta(ge=-180, le=180)] | None = None
    address: Text | None = None
    status: PowerState | None = None
    battery_backup_hours: Annotated[float, Meta(ge=0, le=10000)] | None = None
    gsm_imei: Annotated[str, Meta(pattern=whole(r"[0-9]{14,16}"))] | None = None
    gsm_signal_strength: Signal | None = None
    communication_type: Annotated[str, Meta(max_length=32)] | None = None
    firmware_version: Annotated[str, Meta(max_length=64)] | None = None
    timestamp: Time | None = None


class LightConfig(Struct):
    schedule_enabled: bool
    sunrise_time: str
    sunset_time: str
    brightness_level: int
    auto_dimming: bool


class Topics(Struct):
    subscribe: str
    publish: str


class Configured(Struct, omit_defaults=True):
    """The configure answer: section 1's, with the device token and section 4's MQTT settings."""

    status: Literal["success"]
    message: str
    light_id: str
    config: LightConfig
    device_token: str
    token_expires_at: str
    mqtt_enabled: bool
    server_timestamp: str
    mqtt_broker: str | None = None
    mqtt_port: int | None = None
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    topics: Topics | None = None


# -- status (sections 2 and 4) ----------------------------------------------------------


class StatusBlock(Struct, omit_defaults=True):
    power_state: PowerState | None = None
    brightness: Pct | None = None
    temperature_celsius: Annotated[float, Meta(ge=-100, le=200)] | None = None
    battery_percentage: Pct | None = None
    gsm_signal_strength: Signal | None = None
    uptime_seconds: WholeSeconds | None = None
    error_flags: Annotated[list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=32)] | None = None


class EnergyBlock(Struct, omit_defaults=True):
    voltage: Annotated[float, Meta(ge=0, le=100000)] | None = None
    current: Annotated[float, Meta(ge=0, le=100000)] | None = None
    power_watts: Annotated[float, Meta(ge=0, le=10000000)] | None = None
    frequency: Annotated[float, Meta(ge=0, le=100000)] | None = None
    cumulative_kwh: Annotated[float, Meta(ge=0, le=1e15)] | None = None


class StatusReport(Struct, omit_defaults=True):
    """Section 2's report (`status` an object, `energy` beside it), or section 4's compact
    one (`status` "on" / "off" / "error", `brightness` and `battery` beside it, and the
    block's other fields too)."""

    status: StatusBlock | PowerState
    device_id: DeviceId | None = None
    light_id: Annotated[str, Meta(max_length=64)] | None = None
    timestamp: Time | None = None
    energy: EnergyBlock | None = None
    brightness: Pct | None = None
    battery: Pct | None = None
    temperature_celsius: Annotated[float, Meta(ge=-100, le=200)] | None = None
    gsm_signal_strength: Signal | None = None
    uptime_seconds: WholeSeconds | None = None
    error_flags: Annotated[list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=32)] | None = None


class StatusRecorded(Struct, omit_defaults=True):
    status: Literal["success"]
    message: str
    next_update_seconds: int
    server_timestamp: str
    device_token: str | None = None
    token_expires_at: str | None = None


class Sync(Struct):
    """The offline sync: cached readings, each with the time it was taken."""

    readings: Annotated[list[StatusReport], Meta(min_length=1)]
    device_id: DeviceId | None = None


class Synced(Struct):
    status: Literal["success"]
    message: str
    stored: int
    server_timestamp: str


# -- commands (section 3) -----------------------------------------------------------------


class CommandsQuery(Struct, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=100)] = 20


class PendingCommands(Struct):
    status: Literal["ok"]
    commands: list[dict[str, Any]]
    next_poll_seconds: int
    server_timestamp: str


class CommandAck(Struct, omit_defaults=True):
    command_id: Annotated[str, Meta(min_length=1, max_length=128)]
    status: Literal["executed", "failed"]
    device_id: DeviceId | None = None
    execution_timestamp: Time | None = None
    timestamp: Time | None = None
    result: Any = None


class Acked(Struct):
    status: Literal["success"]
    message: str
    command_id: str
    command_status: str
    server_timestamp: str


# -- alerts, logs, health, firmware (section 12; README.md's decisions) ------------------


class AlertRequest(Struct, omit_defaults=True):
    alert_type: Annotated[str, Meta(pattern=whole(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"))]
    severity: Literal["info", "warning", "critical"] = "critical"
    message: Annotated[str, Meta(max_length=1024)] = ""
    device_id: DeviceId | None = None
    timestamp: Time | None = None
    data: dict[str, Any] | None = None


class LogEntry(Struct, omit_defaults=True):
    message: Annotated[str, Meta(max_length=4096)]
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    timestamp: Time | None = None


class LogsRequest(Struct):
    logs: Annotated[list[LogEntry], Meta(min_length=1, max_length=1000)]
    device_id: DeviceId | None = None


class Recorded(Struct):
    status: Literal["success"]
    message: str
    server_timestamp: str


class MetricState(Struct):
    metric: str
    value: float | None
    threshold: float
    state: Literal["ok", "alert"]


class HealthReport(Struct):
    status: Literal["ok"]
    device_id: str
    light_id: str | None
    online: bool
    indicator: Literal["green", "yellow", "red", "gray"]
    reason: str
    last_status: dict[str, Any] | None
    metrics: list[MetricState]
    pending_commands: int
    server_timestamp: str


class FirmwareRequest(Struct, omit_defaults=True):
    firmware_version: Annotated[str, Meta(min_length=1, max_length=64)]
    status: str | None = None
    detail: Annotated[str, Meta(max_length=1024)] = ""
    channel: str = "stable"
    device_id: DeviceId | None = None


class FirmwareImage(Struct):
    version: str
    url: str
    sha256: str
    size: int


class FirmwareAnswer(Struct, omit_defaults=True):
    status: Literal["success"]
    message: str
    update_available: bool
    server_timestamp: str
    firmware: FirmwareImage | None = None
