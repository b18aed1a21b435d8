"""The spec's sections 9–11: bulk readings and states, diagnostics, configuration templates
and their validation."""

from __future__ import annotations

import os
import resource
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import trio
from msgspec import Meta, Struct
from quart import request
from quart.typing import ResponseReturnValue

from . import paging
from .paging import CursorParam, SortParam
from .engine.kalman import DEFAULT_MEASUREMENT_NOISE, DEFAULT_PROCESS_NOISE
from .errors import Fail, invalid, iso
from .service import Reading, check_reading

if TYPE_CHECKING:
    from gatewayd.plugins.api import Routes

    from .routes import Api

NodeId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")]
Number = Annotated[float, Meta(ge=-1e12, le=1e12)]
Component = Literal["database", "oscillator", "network", "filter"]
COMPONENTS: tuple[Component, ...] = ("database", "oscillator", "network", "filter")
LEVELS = ("debug", "info", "warning", "error")
BULK_MAX = 250  # readings or node ids per bulk request: the largest such body stays well under 64 KiB


class BulkReading(Struct, kw_only=True, forbid_unknown_fields=True):
    node_id: NodeId
    timestamp: Annotated[str, Meta(max_length=64)]
    temperature_kelvin: Number | None = None
    humidity_percent: Number | None = None
    pressure_pa: Number | None = None
    light_lux: Annotated[float, Meta(ge=0, le=200_000)] | None = None
    sensor_type: Annotated[str, Meta(max_length=32)] | None = None
    quality: Literal["good", "fair", "poor"] | None = None


class BulkReadings(Struct, forbid_unknown_fields=True):
    readings: Annotated[list[BulkReading], Meta(min_length=1, max_length=BULK_MAX)]


class BulkStates(Struct, forbid_unknown_fields=True):
    node_ids: Annotated[list[NodeId], Meta(min_length=1, max_length=BULK_MAX)]
    detail_level: Literal["minimal", "standard", "full"] = "standard"


class LogsQuery(Struct, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"] | None = None
    node_id: NodeId | None = None
    start_time: Annotated[str, Meta(max_length=64)] | None = None
    end_time: Annotated[str, Meta(max_length=64)] | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    cursor: CursorParam = None
    sort: SortParam = None  # timestamp:desc (default, newest first) or timestamp:asc


class HealthCheck(Struct, forbid_unknown_fields=True):
    components: Annotated[list[Component], Meta(max_length=16)] = msgspec.field(
        default_factory=lambda: list(COMPONENTS))
    detailed: bool = False


class TemplatesQuery(Struct, forbid_unknown_fields=True):
    hardware_type: Literal["raspberry_pi_pico", "elm11"] | None = None
    runtime: Literal["micropython", "lua"] | None = None


class ValidateBody(Struct, forbid_unknown_fields=True):
    config: dict[str, Any]
    node_id: NodeId | None = None


class Ops:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.ctx = api.ctx
        self.cpu_mark = (time.monotonic(), time.process_time())

    def register(self, r: Routes) -> None:
        ok: dict[int, Any] = {200: dict[str, Any]}
        person = self.api.person_auth
        r.post("/v1/bulk/sensor-readings", body=BulkReadings, responses=ok)(self.bulk_readings)
        r.post("/v1/bulk/oscillator-states", body=BulkStates, responses=ok)(self.bulk_states)
        r.get("/v1/diagnostics/performance", responses=ok, auth=person)(self.performance)
        r.get("/v1/diagnostics/logs", query=LogsQuery, responses=ok, auth=person)(self.logs)
        r.post("/v1/diagnostics/health-check", body=HealthCheck, responses=ok, auth=person)(self.health_check)
        r.get("/v1/config/templates", query=TemplatesQuery, responses=ok, auth=None)(self.templates)
        r.post("/v1/config/validate", body=ValidateBody, responses=ok, auth=person,
               errors={404: "node_id names a node that is not registered (NODE_NOT_FOUND)"})(self.validate)

    # -- 9. bulk -------------------------------------------------------------------------

    async def bulk_readings(self, body: BulkReadings) -> ResponseReturnValue:
        """Readings of many nodes: each node's committed on its own, a result per reading"""
        clock = time.perf_counter()
        nodes = {r.node_id for r in body.readings}
        await self._who(nodes, "ingestion")
        state = self.ctx.state
        groups: dict[str, list[tuple[int, Reading]]] = {}
        for i, r in enumerate(body.readings):
            reading = Reading(self.api.reading_time(r.timestamp, f"readings[{i}].timestamp"), r.temperature_kelvin,
                              r.humidity_percent, r.pressure_pa, r.quality)
            check_reading(reading, f"readings[{i}].")
            groups.setdefault(r.node_id, []).append((i, reading))
        results: list[dict[str, Any]] = [{} for _ in body.readings]
        for node_id, items in groups.items():
            if node_id not in state.nodes:
                for i, _ in items:
                    results[i] = {"node_id": node_id, "status": "rejected", "error": "NODE_NOT_FOUND"}
                continue
            out = await state.ingest(node_id, [r for _, r in items], "bulk")
            late = {x["index"] for x in out["rejections"]}
            ordered = sorted(items, key=lambda item: item[1].ts)
            for k, (i, _) in enumerate(ordered):
                results[i] = {"node_id": node_id, "status": "rejected", "error": "not newer than the last reading"} \
                    if k in late else {"node_id": node_id, "status": "processed",
                                       "filtered_temperature": out["latest_filtered"]["temperature_kelvin"]}
        accepted = sum(1 for r in results if r["status"] == "processed")
        return {"accepted": accepted, "rejected": len(results) - accepted,
                "processing_time_ms": round(1e3 * (time.perf_counter() - clock), 1), "results": results}

    async def bulk_states(self, body: BulkStates) -> ResponseReturnValue:
        """Many nodes' oscillator states at once"""
        await self._who(set(body.node_ids), "query")
        state, now = self.ctx.state, self.ctx.now()
        states: dict[str, Any] = {}
        for node_id in body.node_ids:
            if node_id not in state.nodes:
                states[node_id] = {"error": "node_not_found"}
                continue
            online = self.ctx.devices.is_online(node_id)
            if not online:
                device = await self.ctx.devices.get(node_id, max_age_s=2.0)
                last = device.last_seen if device is not None else None
                states[node_id] = {"error": "node_offline", "last_seen": None if last is None else iso(last)}
                continue
            snap = state.fleet.snapshot(node_id, now, self.ctx.config.stale_after_s)
            doc = state.fleet.describe(snap, now, iso(now), body.detail_level)
            doc.pop("node_id")
            doc.pop("timestamp")
            states[node_id] = {**doc, "status": "online"}
        return {"states": states, "timestamp": iso(now)}

    async def _who(self, nodes: set[str], cls: str) -> None:
        """A person for any nodes; a node (its X-API-Key) only for itself."""
        if request.headers.get("X-API-Key") is None and request.headers.get("Authorization") is not None:
            await self.api.person(cls)
            return
        device = await self.api.node_key(None, cls)
        if nodes != {device}:
            raise Fail(403, "PERMISSION_DENIED", f"node {device!r} may send and ask only for itself",
                       {"parameter": "node_id"})

    # -- 10. diagnostics -----------------------------------------------------------------

    async def performance(self) -> ResponseReturnValue:
        """The gateway's process, the oscillators, the database and this API"""
        await self.api.person("query")
        state, fleet = self.ctx.state, self.ctx.state.fleet
        wall, cpu = time.monotonic(), time.process_time()
        then_wall, then_cpu = self.cpu_mark
        self.cpu_mark = (wall, cpu)
        latency = await self._db_latency()
        attempted = fleet.accepted_steps + fleet.rejected_steps
        requests = max(state.requests, 1)
        uptime = max(self.ctx.now() - state.started, 1e-9)
        return {
            "server": {"cpu_usage_percent": round(100 * (cpu - then_cpu) / max(wall - then_wall, 1e-9), 1),
                       "memory_usage_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                       "active_connections": self.api.sockets, "uptime_seconds": int(uptime)},
            "oscillator": {"average_integration_time_ms": round(1e3 * fleet.tick_seconds / max(fleet.ticks, 1), 3),
                           "stability_index": round(fleet.accepted_steps / attempted, 4) if attempted else 1.0,
                           "active_nodes": int((~fleet.paused[:len(fleet.ids)]).sum()),
                           "total_simulations": fleet.ticks},
            "database": {"query_latency_ms": round(latency, 3), "storage_used_gb": round(self._db_bytes() / 1e9, 6)},
            "network": {"requests_per_second": round(state.requests / uptime, 3),
                        "error_rate_percent": round(100 * state.errors / requests, 3),
                        "average_response_time_ms": round(1e3 * state.response_seconds / requests, 3)}}

    async def logs(self, query: LogsQuery) -> ResponseReturnValue:
        """The plugin's notable log lines since the gateway started (newest first)"""
        await self.api.person("query")
        now = self.ctx.now()
        start = self.api.time(query.start_time, "start_time") if query.start_time else 0.0
        end = self.api.time(query.end_time, "end_time") if query.end_time else now + 1
        sort = paging.parse_sort(query.sort, ("timestamp",), "timestamp:desc")
        cursor = paging.decode(query.cursor, sort)
        wanted = LEVELS[LEVELS.index(query.level):] if query.level else LEVELS
        found = [n for n in self.ctx.state.notes if n["level"] in wanted and start <= n["timestamp"] < end
                 and (query.node_id is None or n["node_id"] == query.node_id)]
        page, pagination = paging.page_of(found, lambda n: (n["timestamp"], n["seq"]), sort, cursor, query.limit)
        return {"logs": [{k: v for k, v in {**n, "timestamp": iso(n["timestamp"])}.items() if k != "seq"}
                         for n in page], "pagination": pagination}

    async def health_check(self, body: HealthCheck) -> ResponseReturnValue:
        """Check the database, the oscillators, the network and the filters now"""
        await self.api.person("query")
        state, fleet = self.ctx.state, self.ctx.state.fleet
        checks: dict[str, Any] = {}
        for name in dict.fromkeys(body.components):
            if name == "database":
                try:
                    latency = await self._db_latency()
                    checks[name] = {"status": "healthy", "latency_ms": round(latency, 3)}
                except Exception as e:  # noqa: BLE001 - the answer says what failed
                    checks[name] = {"status": "unhealthy", "error": str(e)[:200]}
            elif name == "oscillator":
                n = len(fleet.ids)
                finite = bool(fleet.y[:, :n].size == 0 or (fleet.y[:, :n] == fleet.y[:, :n]).all())
                late = trio.current_time() - fleet.last_tick_at if fleet.ticks else 0.0
                ok = finite and late <= 3 * self.ctx.config.tick_s + 5
                checks[name] = {"status": "healthy" if ok else "unhealthy",
                                "stability_check": "passed" if finite else "failed", "active_nodes": n,
                                "seconds_since_last_tick": round(late, 3)}
            elif name == "network":
                checks[name] = {"status": "healthy", "mqtt_connected": self.ctx.mqtt.connected,
                                "nodes_online": sum(1 for n in state.nodes if self.ctx.devices.is_online(n))}
            else:
                diverged = [n for n in fleet.ids if state.diverged.get(n)]
                checks[name] = {"status": "warning" if diverged else "healthy", "diverged_nodes": diverged}
        statuses = {c["status"] for c in checks.values()}
        overall = "unhealthy" if "unhealthy" in statuses else "warning" if "warning" in statuses else "healthy"
        return {"overall_status": overall, "checks": checks, "timestamp": iso(self.ctx.now())}

    async def _db_latency(self) -> float:
        clock = time.perf_counter()
        await self.ctx.storage.read(lambda: self.ctx.storage.connection().execute("SELECT 1").fetchone())
        return 1e3 * (time.perf_counter() - clock)

    def _db_bytes(self) -> int:
        path = getattr(self.ctx.storage.database, "database", "")
        return os.path.getsize(path) if isinstance(path, str) and os.path.exists(path) else 0

    # -- 11. configuration ---------------------------------------------------------------

    async def templates(self, query: TemplatesQuery) -> ResponseReturnValue:
        """A node's configuration template, with this gateway's addresses"""
        lua = query.runtime == "lua" or query.hardware_type == "elm11"
        port = self.ctx.mqtt.device_port
        return {"hardware_type": query.hardware_type, "runtime": query.runtime, "templates": {
            "sensor_config": {
                "bme280": {"i2c_address": "0x76", "mode": "normal",
                           "oversampling": {"temperature": 2, "humidity": 2, "pressure": 2},
                           "filter_coefficient": 2, "standby_time": 1000},
                "kalman_filter": {"process_noise": dict(DEFAULT_PROCESS_NOISE),
                                  "measurement_noise": dict(DEFAULT_MEASUREMENT_NOISE)}},
            "network_config": {
                "wifi": {"ssid": "KaiABC_Network", "security": "wpa2", "reconnect_attempts": 5,
                         "reconnect_delay_ms": 1000},
                "api_base": self.ctx.http.url(f"{self.ctx.mount}/v1"),
                "mqtt": None if port is None else {"broker": self.ctx.http.url("/").split("//")[1].split(":")[0]
                                                   .rstrip("/"), "port": port, "tls": False,
                                                   "keepalive_seconds": 60, "qos": 1,
                                                   "topic": f"{self.ctx.name}/sensors/<node_id>"}},
            "oscillator_config": {"update_interval_ms": 5000, "pwm_frequency_hz": 1000,
                                  "pwm_resolution": "duty 0-1023" if lua else "duty_u16 0-65535",
                                  "buffer_size": 100, "fallback_mode": "local_pwm"}}}

    async def validate(self, body: ValidateBody) -> ResponseReturnValue:
        """Check a node's configuration before it is flashed: errors, warnings, optimizations"""
        await self.api.person("configuration")
        if body.node_id is not None:
            self.ctx.state.node(body.node_id)
        errors, warnings, notes = check_config(body.config)
        return {"valid": not errors, "errors": errors, "warnings": warnings, "optimizations": notes}


def check_config(config: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(errors, warnings, optimizations) of a node configuration in the templates' shape."""
    errors: list[dict[str, str]] = []
    warnings: list[dict[str, str]] = []
    notes: list[dict[str, str]] = []

    def get(path: str) -> Any:
        node: Any = config
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    for key in config:
        if key not in ("sensor", "network", "oscillator"):
            warnings.append({"field": key, "message": "unknown section; sections are sensor, network, oscillator"})
    address = get("sensor.bme280.i2c_address")
    if address is not None and address not in ("0x76", "0x77"):
        errors.append({"field": "sensor.bme280.i2c_address", "message": "a BME280 answers at 0x76 or 0x77"})
    for channel in ("temperature", "humidity", "pressure"):
        field = f"sensor.bme280.oversampling.{channel}"
        value = get(field)
        if value is None:
            continue
        if value not in (0, 1, 2, 4, 8, 16):
            errors.append({"field": field, "message": "oversampling is one of 0, 1, 2, 4, 8, 16"})
        elif value > 2:
            warnings.append({"field": field, "message": "High oversampling may increase power consumption",
                             "suggestion": "Consider reducing to 2 for battery-powered applications"})
    wifi = get("network.wifi")
    if isinstance(wifi, dict):
        ssid, password = wifi.get("ssid"), wifi.get("password")
        if not (isinstance(ssid, str) and 1 <= len(ssid) <= 32):
            errors.append({"field": "network.wifi.ssid", "message": "an SSID is 1-32 characters"})
        elif password is not None and not (isinstance(password, str) and 8 <= len(password) <= 63):
            errors.append({"field": "network.wifi.password", "message": "a WPA2 passphrase is 8-63 characters"})
        else:
            notes.append({"field": "network.wifi", "message": "WiFi credentials validated successfully"})
    interval = get("oscillator.update_interval_ms")
    if interval is not None:
        if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval <= 0:
            errors.append({"field": "oscillator.update_interval_ms", "message": "a positive number of milliseconds"})
        elif interval < 600:
            warnings.append({"field": "oscillator.update_interval_ms",
                             "message": "faster than the ingestion limit (100 requests per minute)",
                             "suggestion": "600 ms or more; 5000 is the template's"})
    port = get("network.mqtt.port")
    if port is not None and not (isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535):
        errors.append({"field": "network.mqtt.port", "message": "a TCP port 1-65535"})
    return errors, warnings, notes

