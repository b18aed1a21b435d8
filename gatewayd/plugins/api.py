"""What a plugin imports: everything it needs, from one place.

A plugin is a module (or object) registered under the `gatewayd.plugins` entry-point
group. It implements hooks (`gatewayd/plugins/hookspecs.py`, docs/plugins.md), and talks
to the core only through its `PluginContext` and the names below; it never imports
`gatewayd.core` or another plugin. A minimal one::

    # gatewayd_hello/__init__.py
    from dataclasses import dataclass

    from quart import Blueprint

    from gatewayd.plugins.api import PluginContext, hookimpl

    @dataclass
    class HelloConfig:
        greeting: str = "hello"

    @hookimpl
    def gatewayd_config_schema() -> type:
        return HelloConfig

    @hookimpl
    def gatewayd_http_routes(ctx: PluginContext[HelloConfig, None]) -> Blueprint:
        bp = Blueprint("hello", __name__)

        @bp.get("/")
        async def index() -> dict:
            return {"greeting": ctx.config.greeting}

        return bp

    # pyproject.toml
    # [project.entry-points."gatewayd.plugins"]
    # hello = "gatewayd_hello"

`gatewayd plugin new NAME` writes a complete one (routes, a topic, a model, tests).
"""

from __future__ import annotations

import pluggy
from markupsafe import Markup
from msgspec import Meta, Struct

from ..core.admission import waiting_elsewhere, waiting_elsewhere_for
from ..core.alerts.events import Event, EventError
from ..core.devices.auth import AuthError, IssuedToken
from ..core.devices.commands import Command
from ..core.devices.ratelimit import Decision
from ..core.devices.registry import ClaimError, Credentials, Device, DeviceExists
from ..core.http.body import read_body, read_json_object
from ..core.http.declare import ADMIN_TOKEN, AuthScheme, DeviceAuth, ErrorBody, ErrorDetail, Raw, Routes
from ..core.http.errors import PluginUnavailable, error_response
from ..core.live.access import LiveDenied
from ..core.live.frames import Chunk, StreamWriter, TextFrames, send_frames, stream_writer
from ..core.live.hub import Gap, LiveEvent, LiveLimit, Subscription
from ..core.logs import StructLogger
from ..core.maintenance import MaintenanceState
from ..core.metrics import Counter, Gauge
from ..core.mqtt.delivery import InboundMessage, MessageHandler, Rejected
from ..core.mqtt.service import MQTTUnavailable
from ..core.ota.store import CHANNELS, REPORT_STATUSES, Firmware
from ..core.outbox.ingest import Ingested, IngestError, IngestPressure, Record
from ..core.schema import ConfigError
from ..core.serial.link import FrameHandler, SerialLink, SerialSettings
from ..core.storage import StorageError, StorageFull, StorageUnavailable
from ..protocol.cursors import decode_cursor, encode_cursor
from ..protocol.encoding import EncodingError
from ..protocol.json_encoders import json_encoder
from ..protocol.json_text import Encoded, encoded, encoded_object
from ..protocol.strict_json import MAX_JSON_DEPTH, BadJSON, json_kind, parse_json
from ..protocol.times import TS_MAX, TS_MIN, parse_time, plausible_ts
from ..protocol.validate import InvalidInput, convert
from .context import PluginContext, PluginHTTP, PluginMetrics, PluginStorage
from .hookspecs import PROJECT
from .registries import CommandRegistry, ModelRegistry, SerialRegistry, TaskRegistry, TopicRegistry

__all__ = [
    # hooks and the context
    "hookimpl",
    "PluginContext",
    "PluginHTTP",
    "PluginMetrics",
    "PluginStorage",
    # declared routes (their OpenAPI operations): docs/plugins.md, "Declaring routes"
    "Routes",
    "DeviceAuth",
    "ADMIN_TOKEN",
    "AuthScheme",
    "ErrorBody",
    "ErrorDetail",
    "Raw",
    "Struct",
    "Meta",
    "convert",
    # what hooks register into
    "CommandRegistry",
    "ModelRegistry",
    "SerialRegistry",
    "TaskRegistry",
    "TopicRegistry",
    # what services hand back
    "Command",
    "Counter",
    "Credentials",
    "Decision",
    "Device",
    "Event",
    "Firmware",
    "Gap",
    "InboundMessage",
    "LiveEvent",
    "Ingested",
    "IngestPressure",
    "IssuedToken",
    "MaintenanceState",
    "MessageHandler",
    "Record",
    "FrameHandler",
    "Markup",
    "SerialLink",
    "SerialSettings",
    "StructLogger",
    "Subscription",
    "TextFrames",
    "Chunk",
    "StreamWriter",
    "Gauge",
    # errors
    "AuthError",
    "BadJSON",
    "ClaimError",
    "ConfigError",
    "DeviceExists",
    "EncodingError",
    "EventError",
    "IngestError",
    "InvalidInput",
    "LiveDenied",
    "LiveLimit",
    "MQTTUnavailable",
    "PluginUnavailable",
    "Rejected",
    "StorageError",
    "StorageFull",
    "StorageUnavailable",
    # helpers
    "CHANNELS",
    "MAX_JSON_DEPTH",
    "REPORT_STATUSES",
    "TS_MAX",
    "TS_MIN",
    "decode_cursor",
    "encode_cursor",
    "Encoded",
    "encoded",
    "encoded_object",
    "error_response",
    "json_encoder",
    "json_kind",
    "parse_json",
    "parse_time",
    "plausible_ts",
    "read_body",
    "read_json_object",
    "send_frames",
    "stream_writer",
    "waiting_elsewhere",
    "waiting_elsewhere_for",
]

hookimpl = pluggy.HookimplMarker(PROJECT)
"""Mark a plugin's hook implementations: `@hookimpl def gatewayd_http_routes(ctx): ...`."""
