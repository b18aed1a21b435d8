"""Readings that come without HTTP: MQTT (`<name>/sensors/<node_id>`, the spec's
`mqtt_topic`) and JSON lines on a UART (a Pico wired to the gateway). Both take the body
of `POST /sensors/batch` (`{"node_id", "readings": [...]}`) or one reading
(`{"node_id", "timestamp"?, "temperature_kelvin", ...}`), and feed the same pipeline.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from gatewayd.plugins.api import BadJSON, InboundMessage, Rejected, SerialLink, convert, parse_json

from .errors import Fail
from .routes import Batch, TemperatureReading, reading_time
from .service import Reading, check_reading

if TYPE_CHECKING:
    from gatewayd.plugins.api import PluginContext

    from .config import KaiabcConfig
    from .service import Kaiabc

MAX_PAYLOAD = 256 * 1024


def parse(payload: bytes, now: float) -> tuple[str, list[Reading]]:
    """(node_id, readings) of a batch or a single reading; ValueError naming what is wrong."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload larger than {MAX_PAYLOAD} bytes")
    doc = parse_json(payload)
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object: a batch {node_id, readings} or one reading")
    try:
        if "readings" in doc:
            batch: Batch = convert(doc, Batch)
            readings = []
            for i, r in enumerate(batch.readings):
                if r.node_id is not None and r.node_id != batch.node_id:
                    raise ValueError(f"readings[{i}].node_id: a reading of another node")
                reading = Reading(reading_time(r.timestamp, f"readings[{i}].timestamp", now), r.temperature_kelvin,
                                  r.humidity_percent, r.pressure_pa, r.quality)
                check_reading(reading, f"readings[{i}].")
                readings.append(reading)
            return batch.node_id, readings
        one: TemperatureReading = convert(doc, TemperatureReading)
        reading = Reading(reading_time(one.timestamp, "timestamp", now), one.temperature_kelvin, quality=one.quality,
                          stamped=one.timestamp is None)
        check_reading(reading, "")
        return one.node_id, [reading]
    except Fail as e:  # the HTTP layer's INVALID_PARAMETER: here a plain reason
        raise ValueError(f"{(e.details or {}).get('parameter', 'payload')}: {e.message}") from None


class Intake:
    """The MQTT handler and the serial frame handler."""

    def __init__(self, ctx: PluginContext[KaiabcConfig, Kaiabc]) -> None:
        self.ctx = ctx

    async def on_mqtt(self, msg: InboundMessage) -> None:
        """`<name>/sensors/<node_id>`: the node's readings (its ACL: only its own topic)."""
        node_id = msg.topic.rsplit("/", 1)[-1]
        if msg.sender is not None and msg.sender != node_id:
            raise Rejected(f"{msg.sender!r} may not publish readings of {node_id!r}")
        try:
            sent_for, readings = parse(msg.payload, self.ctx.now())
        except (ValueError, BadJSON) as e:
            raise Rejected(str(e)) from None
        if sent_for != node_id:
            raise Rejected(f"node_id {sent_for!r} is not the topic's {node_id!r}")
        await self._ingest(node_id, readings, "mqtt")

    async def on_frame(self, frame: bytes, link: SerialLink) -> None:
        """A JSON line on the UART; answered with one line: accepted, rejected, output_pwm (or error)."""
        try:
            node_id, readings = parse(frame, self.ctx.now())
            result = await self._ingest(node_id, readings, "serial")
        except (ValueError, BadJSON, Rejected) as e:
            await link.send(json.dumps({"error": {"code": "INVALID_PARAMETER", "message": str(e)[:200]}}).encode())
            return
        await link.send(json.dumps(result).encode())

    async def _ingest(self, node_id: str, readings: list[Reading], via: str) -> dict[str, Any]:
        state = self.ctx.state
        if not await state.wait_started():
            raise Rejected("the plugin is still resuming its oscillators")
        if node_id not in state.nodes:
            raise Rejected(f"node {node_id!r} is not registered (POST /v1/sensors/nodes)")
        device = await self.ctx.devices.get(node_id, max_age_s=2.0)
        if device is None or device.status == "disabled":
            raise Rejected(f"node {node_id!r} is disabled or unknown to the registry")
        self.ctx.devices.touch(node_id)
        await self.ctx.devices.activate(device)
        out = await state.ingest(node_id, readings, via)
        now = self.ctx.now()
        snap = state.fleet.snapshot(node_id, now, self.ctx.config.stale_after_s)
        return {"node_id": node_id, "accepted": out["accepted"], "rejected": out["rejected"],
                "output_pwm": state.fleet.output(snap, now)["duty"]}
