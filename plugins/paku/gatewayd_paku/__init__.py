"""gatewayd plugin for paku devices: MQTT-first, provisioned over HTTP, updated over the air.

Read top to bottom: config, models, routes, topics, serial, tasks, events; each hook
hands over to the module that holds the details (`models.py`, `routes.py`,
`topics.py`). The specification is paku-iot's backend requirements: telemetry, state
and events over MQTT with per-device credentials and ACLs, commands down, a claim-code
flow, an OTA manifest, and an HTTP API for apps and admin tools. README.md has the
topics, routes, options and a walkthrough.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gatewayd.plugins.api import ConfigError, ModelRegistry, PluginContext, TaskRegistry, TopicRegistry, hookimpl

from . import routes
from .models import MODELS
from .topics import PakuMQTT

__version__ = "0.1.0"
__all__ = ["PakuConfig", "PakuMQTT"]




# -- config --------------------------------------------------------------------------


@dataclass
class PakuConfig:
    """`[plugins.paku]` options."""

    mqtt_host: str = ""
    """The broker address handed to devices at provisioning; "" = the host of `http.public_url`."""
    mqtt_port: int = 0
    """The broker port handed to devices; 0 = the gateway's own (`mqtt.listen`, or the external port)."""
    default_model: str = "paku"
    """The model of a device provisioned without one (the OTA manifest is per model)."""
    max_payload_bytes: int = 65536
    """Larger MQTT payloads are rejected."""
    alert_events: list[str] = field(default_factory=lambda: ["error*", "*error", "alarm*", "*alarm", "fault*",
                                                             "*fault", "panic", "crash", "tamper*"])
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
        if not self.default_model:
            raise ConfigError("default_model", "must not be empty")


@hookimpl
def gatewayd_config_schema() -> type:
    return PakuConfig


# -- models --------------------------------------------------------------------------


@hookimpl
def gatewayd_storage_models(models: ModelRegistry) -> None:
    models.add(*MODELS)  # paku_measurement, paku_event, paku_state (devices are the core's)


# -- the plugin's own state ------------------------------------------------------------


@hookimpl
def gatewayd_setup(ctx: PluginContext) -> PakuMQTT:
    return PakuMQTT(ctx)  # ctx.state: the MQTT handlers and the command push


# -- routes --------------------------------------------------------------------------


@hookimpl
def gatewayd_http_routes(ctx: PluginContext):
    return routes.blueprint(ctx)


# -- topics --------------------------------------------------------------------------


@hookimpl
def gatewayd_mqtt_topics(topics: TopicRegistry, ctx: PluginContext) -> None:
    ctx.state.register(topics)


# -- serial --------------------------------------------------------------------------
# paku devices speak MQTT only: no serial links.


# -- tasks ---------------------------------------------------------------------------


@hookimpl
def gatewayd_background_tasks(tasks: TaskRegistry, ctx: PluginContext) -> None:
    mqtt = ctx.state
    ctx.commands.on_enqueue(lambda command: mqtt.wake(command.device_id))
    tasks.add("push-commands", mqtt.push_commands)


# -- events --------------------------------------------------------------------------


@hookimpl
def gatewayd_alert_rules(ctx: PluginContext) -> list[dict]:
    # Every event is stored and forwarded; these rules only decide what an operator hears.
    return [
        {"name": "paku-error-burst", "type": ["error*", "*error", "fault*"], "more_than": 5, "within_s": 3600,
         "alert_severity": "warning", "actions": [{"kind": "log", "level": "warning"}]},
    ]
