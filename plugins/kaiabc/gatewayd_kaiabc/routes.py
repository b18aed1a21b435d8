"""The specification's HTTP API under the plugin's mount: `/<mount>/v1/...`
(`http://<gateway>:8080/kaiabc/v1/health`). Each route is declared once (what it takes,
what it answers, who may call it); every error is the spec's error object (errors.py).
README.md has the table and the decisions taken where the spec is silent."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct
from quart import Blueprint, Response, current_app, g, request
from quart.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from gatewayd.plugins.api import (ADMIN_TOKEN, AuthError, AuthScheme, BadJSON, DeviceAuth, EncodingError,
                                  InvalidInput, PluginContext, PluginUnavailable, Routes, StorageError,
                                  StorageFull)

from . import paging
from .paging import CursorParam, SortParam
from .analytics import Analytics
from .control import Control
from .ops import Ops
from .people import ROLES, People
from .ws import Socket
from .engine import RUST_2007
from .errors import Fail, SpecError, answer, invalid, iso
from .models import NodeInfo
from .service import Reading, check_reading

if TYPE_CHECKING:
    from .config import KaiabcConfig
    from .service import Kaiabc

API_VERSION = "1.0.0"
READING_SKEW_S = 300.0  # how far ahead of the gateway's clock a reading's timestamp may be
_STATUS_CODES = {400: "INVALID_PARAMETER", 401: "AUTHENTICATION_FAILED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 405: "METHOD_NOT_ALLOWED", 409: "CONFLICT", 413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE",
                 429: "RATE_LIMIT_EXCEEDED", 503: "SERVICE_UNAVAILABLE"}
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*): ")
NodeId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")]
Text = Annotated[str, Meta(max_length=256)]
Number = Annotated[float, Meta(ge=-1e12, le=1e12)]
SensorType = Literal["temperature", "humidity", "pressure", "light"]

NODE_OR_PERSON = AuthScheme({**DeviceAuth.api_key().security_schemes, **ADMIN_TOKEN.security_schemes},
                            {401: "no credentials, or wrong ones (AUTHENTICATION_FAILED)",
                             403: "a node's key used for another node (PERMISSION_DENIED)",
                             429: "too many requests (RATE_LIMIT_EXCEEDED)"}, either=True)
PERSON = AuthScheme(ADMIN_TOKEN.security_schemes, {401: "missing or wrong token (AUTHENTICATION_FAILED)",
                                                   403: "the token's role may not do this (PERMISSION_DENIED)",
                                                   429: "too many requests (RATE_LIMIT_EXCEEDED)"})


# -- request bodies and queries (the spec's, as written) ----------------------------------


class Calibration(Struct, frozen=True, forbid_unknown_fields=True):
    temperature_offset: Annotated[float, Meta(ge=-50, le=50)] = 0.0
    humidity_offset: Annotated[float, Meta(ge=-100, le=100)] = 0.0


class NodeRegistration(Struct, kw_only=True, forbid_unknown_fields=True):
    node_id: NodeId
    hardware_type: Literal["raspberry_pi_pico", "elm11"]
    runtime: Literal["micropython", "lua"]
    name: Text = ""
    sensor_types: Annotated[list[SensorType], Meta(max_length=4)] = msgspec.field(default_factory=lambda: ["temperature"])
    location: Text = ""
    calibration: Calibration = Calibration()
    firmware_version: Annotated[str, Meta(max_length=64)] = ""


class TemperatureReading(Struct, kw_only=True, forbid_unknown_fields=True):
    node_id: NodeId
    temperature_kelvin: Number
    timestamp: Annotated[str, Meta(max_length=64)] | None = None
    raw_value: Number | None = None
    sensor_type: Annotated[str, Meta(max_length=32)] | None = None
    quality: Literal["good", "fair", "poor"] | None = None


class BatchReading(Struct, kw_only=True, forbid_unknown_fields=True):
    timestamp: Annotated[str, Meta(max_length=64)]
    temperature_kelvin: Number | None = None
    humidity_percent: Number | None = None
    pressure_pa: Number | None = None
    node_id: NodeId | None = None  # the Pico client repeats it in each reading
    raw_value: Number | None = None
    sensor_type: Annotated[str, Meta(max_length=32)] | None = None
    quality: Literal["good", "fair", "poor"] | None = None


class Batch(Struct, forbid_unknown_fields=True):
    node_id: NodeId
    readings: Annotated[list[BatchReading], Meta(min_length=1, max_length=1000)]


class StateQuery(Struct, forbid_unknown_fields=True):
    node_id: NodeId | None = None
    detail_level: Literal["minimal", "standard", "full"] = "standard"


RESOLUTIONS = {"1s": 1.0, "10s": 10.0, "1m": 60.0, "10m": 600.0, "1h": 3600.0}
SERIES = ("C_U", "C_S", "C_T", "C_ST", "A_free", "CABC_complex", "koa_metric", "temperature_kelvin")


NODE_SORTS = ("node_id", "registered_at")


class HistoryQuery(Struct, forbid_unknown_fields=True):
    node_id: NodeId | None = None
    start_time: Annotated[str, Meta(max_length=64)] | None = None
    end_time: Annotated[str, Meta(max_length=64)] | None = None
    resolution: Literal["1s", "10s", "1m", "10m", "1h"] = "1m"
    variables: Annotated[str, Meta(max_length=200)] | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 50  # the spec's "Pagination" (its history section says none)
    cursor: CursorParam = None
    sort: SortParam = None  # timestamp:asc (default) or timestamp:desc


class NodesQuery(Struct, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=1000)] = 50
    cursor: CursorParam = None
    sort: SortParam = None  # node_id:asc (default), node_id:desc, registered_at:asc, registered_at:desc


class Api:
    """The routes of the plugin; `blueprint()` mounts them."""

    def __init__(self, ctx: PluginContext[KaiabcConfig, Kaiabc]) -> None:
        self.ctx = ctx
        self.sockets = 0  # open WebSockets
        self.person_auth = PERSON
        config = ctx.config
        self.limits = {"ingestion": config.ingestion_per_minute, "query": config.queries_per_minute,
                       "configuration": config.configuration_per_minute}  # the spec's "Rate Limiting"
        for cls, limit in self.limits.items():
            ctx.ratelimit.define(cls, limit, 60)

    def blueprint(self) -> Blueprint:
        bp = Blueprint(self.ctx.name, __name__)
        routes = Routes(bp, error=SpecError, tag=self.ctx.name, auth=NODE_OR_PERSON)
        r = routes
        r.get("/v1/health", auth=None, responses={200: dict[str, Any]})(self.health)
        r.get("/v1/sensors/nodes", auth=PERSON, query=NodesQuery, responses={200: dict[str, Any]})(self.list_nodes)
        r.post("/v1/sensors/nodes", body=NodeRegistration, responses={201: dict[str, Any]},
               errors={409: "the node is registered already (CONFLICT)"})(self.register)
        r.post("/v1/sensors/temperature", body=TemperatureReading, responses={200: dict[str, Any]},
               errors={404: "the node is not registered (NODE_NOT_FOUND)"})(self.temperature)
        r.post("/v1/sensors/batch", body=Batch, responses={200: dict[str, Any]},
               errors={404: "the node is not registered (NODE_NOT_FOUND)"})(self.batch)
        r.get("/v1/oscillator/state", query=StateQuery, responses={200: dict[str, Any]},
              errors={404: "the node is not registered (NODE_NOT_FOUND)"})(self.state)
        r.get("/v1/oscillator/history", query=HistoryQuery, responses={200: dict[str, Any]},
              errors={404: "the node is not registered (NODE_NOT_FOUND)"})(self.history)
        Control(self).register(routes)
        Socket(self).register(routes)
        Ops(self).register(routes)
        Analytics(self).register(routes)
        People(self).register(routes)
        bp.register_error_handler(Fail, self.failed)
        bp.register_error_handler(BadJSON, self.bad_json)  # InvalidInput too: names the field
        bp.register_error_handler(EncodingError, self.bad_encoding)
        bp.register_error_handler(AuthError, self.auth_failed)
        bp.register_error_handler(StorageFull, self.storage_full)
        bp.register_error_handler(StorageError, self.storage_error)
        bp.register_error_handler(PluginUnavailable, self.plugin_failed)
        bp.register_error_handler(Exception, self.unexpected)  # the rest, HTTPExceptions too
        bp.before_request(self.started)
        bp.after_request(self.headers)
        bp.record(self._unrouted_on)
        return bp

    def _unrouted_on(self, setup: Any) -> None:
        """On each app the Blueprint is registered on (the main one under the mount, a listener
        of its own at /): a path under `v1` that no route has, or a method a route has not,
        is answered here, in the spec's error object. Quart knows no Blueprint for such a
        request, so neither the Blueprint's handlers nor its `after_request` would run, and
        the core would answer in its own shape."""
        prefix = (setup.url_prefix or "").rstrip("/") + "/v1"

        async def unrouted() -> ResponseReturnValue | None:
            e = request.routing_exception
            if e is None or not (request.path == prefix or request.path.startswith(prefix + "/")):
                return None
            status = int(getattr(e, "code", None) or 404)
            allowed = sorted(getattr(e, "valid_methods", None) or ())
            if status == 405:
                fail = Fail(405, "METHOD_NOT_ALLOWED", f"{request.method} is not a method of {request.path}",
                            {"parameter": "method", "provided": request.method, "allowed": allowed},
                            headers={"Allow": ", ".join(allowed)})
            elif status == 404:
                fail = Fail(404, "NOT_FOUND", f"no route {request.path} in this API",
                            {"parameter": "path", "provided": request.path})
            else:
                fail = invalid("path", str(getattr(e, "description", None) or e), request.path)
            response = await current_app.make_response(await self.failed(fail))
            assert isinstance(response, Response)  # ours: answer() makes a quart Response
            return await self.headers(response)

        # Only for requests no route matched, where the app offers it (the gateway's LeanQuart):
        # an app-wide before_request would run for every family's every request.
        getattr(setup.app, "before_unrouted", setup.app.before_request)(unrouted)

    # -- 1. health -------------------------------------------------------------------------

    async def health(self) -> ResponseReturnValue:
        """System status: the solver, the database and the nodes"""
        state = self.ctx.state
        online = sum(1 for n in state.nodes if self.ctx.devices.is_online(n))
        return {"status": "healthy", "version": API_VERSION,
                "uptime_seconds": int(self.ctx.now() - state.started), "timestamp": iso(self.ctx.now()),
                "components": {"ode_solver": "operational" if state.ready.is_set() else "starting",
                               "database": "operational",
                               "sensor_nodes": {"connected": online, "total": len(state.nodes)}}}

    # -- 3. sensors ------------------------------------------------------------------------

    async def list_nodes(self, query: NodesQuery) -> ResponseReturnValue:
        """Every registered node, with its presence"""
        await self.person("query")
        sort = paging.parse_sort(query.sort, NODE_SORTS, "node_id:asc")
        cursor = paging.decode(query.cursor, sort)
        by_time = sort.field == "registered_at"  # the node_id breaks ties: keys are unique

        def key(info: NodeInfo) -> Any:
            return (info.registered_at, info.node_id) if by_time else info.node_id

        page, pagination = paging.page_of(list(self.ctx.state.nodes.values()), key, sort, cursor, query.limit)
        nodes = []
        for info in page:
            node_id = info.node_id
            device = await self.ctx.devices.get(node_id)
            last = device.last_seen if device is not None else None
            nodes.append({"node_id": node_id, "name": info.name, "hardware_type": info.hardware_type,
                          "runtime": info.runtime, "status": "online" if self.ctx.devices.is_online(node_id)
                          else "offline", "last_seen": None if last is None else iso(last),
                          "sensor_types": info.sensor_types, "firmware_version": info.firmware_version,
                          "location": info.location, "registered_at": iso(info.registered_at)})
        return {"nodes": nodes, "pagination": pagination}

    async def register(self, body: NodeRegistration) -> ResponseReturnValue:
        """Register a sensor node: by the node with its flashed key, or by a person"""
        key = request.headers.get("X-API-Key")
        if key is not None and await self.ctx.devices.get(body.node_id) is not None:
            await self.node_key(body.node_id, "configuration")
        else:
            await self.person("configuration")
            key = None
        info = NodeInfo(body.node_id, body.name, body.hardware_type, body.runtime, list(body.sensor_types),
                        body.location, {"temperature_offset": body.calibration.temperature_offset,
                                        "humidity_offset": body.calibration.humidity_offset},
                        body.firmware_version, self.ctx.now())
        new_key = await self.ctx.state.register(info, None)
        return {"success": True, "node_id": body.node_id, "hardware_type": body.hardware_type,
                "api_key": new_key if new_key is not None else key,
                "mqtt_topic": f"{self.ctx.name}/sensors/{body.node_id}"}, 201

    async def temperature(self, body: TemperatureReading) -> ResponseReturnValue:
        """One temperature reading"""
        await self.caller(body.node_id, "ingestion")
        reading = Reading(reading_time(body.timestamp, "timestamp", self.ctx.now()), body.temperature_kelvin,
                          quality=body.quality, stamped=body.timestamp is None)
        check_reading(reading, "")
        result = await self.ctx.state.ingest(body.node_id, [reading], "http")
        accepted = result["accepted"] == 1
        message = "Sensor data processed" if accepted else "not newer than the last reading: not stored"
        if result["restamped"]:
            message = ("Sensor data processed; the gateway's clock is behind this node's last reading: stamped just "
                       "after it")
        return {"accepted": accepted, "filtered_value": result["latest_filtered"]["temperature_kelvin"],
                "kalman_variance": result["kalman_variance"], "filter_diverged": result["filter_diverged"],
                "timestamp_adjusted": bool(result["restamped"]), "message": message}

    async def batch(self, body: Batch) -> ResponseReturnValue:
        """Readings of one node (temperature, humidity, pressure)"""
        await self.caller(body.node_id, "ingestion")
        readings = []
        for i, r in enumerate(body.readings):
            where = f"readings[{i}]."
            if r.node_id is not None and r.node_id != body.node_id:
                raise invalid(f"{where}node_id", "a reading of another node", r.node_id, expected=body.node_id)
            reading = Reading(reading_time(r.timestamp, f"{where}timestamp", self.ctx.now()), r.temperature_kelvin,
                              r.humidity_percent, r.pressure_pa, r.quality)
            check_reading(reading, where)
            readings.append(reading)
        result = await self.ctx.state.ingest(body.node_id, readings, "http")
        return {"accepted": result["accepted"], "rejected": result["rejected"],
                "latest_filtered": result["latest_filtered"], "rejections": result["rejections"],
                "filter_diverged": result["filter_diverged"]}

    # -- 2. oscillator ---------------------------------------------------------------------

    async def state(self, query: StateQuery) -> ResponseReturnValue:
        """The live oscillator of a node"""
        state = self.ctx.state
        node_id = query.node_id
        if node_id is None:
            await self.person("query")
            if len(state.nodes) != 1:
                raise invalid("node_id", f"node_id is required: this gateway has {len(state.nodes)} nodes")
            node_id = next(iter(state.nodes))
        else:
            await self.caller(node_id, "query")
        state.node(node_id)
        now = self.ctx.now()
        snap = state.fleet.snapshot(node_id, now, self.ctx.config.stale_after_s)
        return state.fleet.describe(snap, now, iso(now), query.detail_level)

    async def history(self, query: HistoryQuery) -> ResponseReturnValue:
        """A node's oscillator over time, averaged per `resolution`, a page at a time"""
        state = self.ctx.state
        if query.node_id is None:
            await self.person("query")
        else:
            await self.caller(query.node_id, "query")
        node_id = _one(state.nodes, query.node_id)
        info = state.node(node_id)
        now = self.ctx.now()
        end = _time(query.end_time, "end_time", now)
        start = _time(query.start_time, "start_time", end - 86400)
        if not start < end:
            raise invalid("start_time", "start_time must be before end_time", query.start_time)
        wanted = SERIES if query.variables is None else tuple(v.strip() for v in query.variables.split(","))
        unknown = [v for v in wanted if v not in SERIES]
        if unknown:
            raise invalid("variables", f"unknown variables {unknown}; choose from {list(SERIES)}", query.variables)
        sort = paging.parse_sort(query.sort, ("timestamp",), "timestamp:asc")
        cursor = paging.decode(query.cursor, sort)
        if cursor is not None and (isinstance(cursor.key, bool) or not isinstance(cursor.key, (int, float))):
            raise invalid("cursor", "not a cursor this route gave", query.cursor)
        resolution = RESOLUTIONS[query.resolution]
        rows, position, total = await self.ctx.storage.read(
            state.store.history_page, node_id, start, end, resolution, query.limit, sort.descending,
            None if cursor is None else float(cursor.key), "after" if cursor is None else cursor.side)
        series: dict[str, list[Any]] = {"timestamp": [iso(r[0]) for r in rows]}
        found = state.fleet.cycle_of(node_id)
        low, high = found[1] if found is not None else (0.0, 1.0)
        for name in wanted:
            series[name] = [_series_value(name, r, low, high) for r in rows]
        return {"node_id": node_id, "hardware_type": info.hardware_type, "start_time": iso(start),
                "end_time": iso(end), "resolution": query.resolution, "data_points": len(rows), "series": series,
                "pagination": paging.pagination([r[0] for r in rows], position, total, query.limit, sort, cursor)}

    def time(self, text: str | None, field: str) -> float:
        return _time(text, field, self.ctx.now())

    def reading_time(self, text: str | None, field: str) -> float:
        return reading_time(text, field, self.ctx.now())

    # -- who asks ---------------------------------------------------------------------------

    async def caller(self, node_id: str, cls: str) -> None:
        """A node for its own node_id (X-API-Key), or a person (the admin token)."""
        if request.headers.get("X-API-Key") is not None or request.headers.get("Authorization") is None:
            await self.node_key(node_id, cls)
        else:
            await self.person(cls)

    async def node_key(self, node_id: str | None, cls: str) -> str:
        """The node of the X-API-Key (which must be `node_id`'s when given); rate limited as it."""
        try:
            device = await self.ctx.auth.api_key(request.headers, request.remote_addr, device_id=node_id)
        except AuthError as e:
            if e.status == 401 and request.headers.get("X-API-Key") and node_id is not None \
                    and await self.ctx.devices.get(node_id) is None:
                e = AuthError(401, f"no node {node_id!r} holds this key")
            raise e from None
        self.limit(device.id, cls)
        return device.id

    async def person(self, cls: str, role: str | None = None) -> None:
        """A person or an app: the gateway's admin token, or a token with a role (people.py) of at
        least `role` (default: observer for queries, admin for the rest)."""
        need = role or ("observer" if cls == "query" else "admin")
        if self.ctx.http.require_admin() is None:
            self.limit("person:admin", cls)
            return
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        found = self.ctx.state.tokens.role_of(value.strip(), self.ctx.now()) if scheme.lower() == "bearer" else None
        if found is None:
            raise Fail(401, "AUTHENTICATION_FAILED", "this route needs a person's token: Authorization: Bearer "
                       "<admin token, or a token from POST /v1/auth/tokens>")
        name, have = found
        if ROLES.index(have) < ROLES.index(need):
            raise Fail(403, "PERMISSION_DENIED", f"the role {have} may not do this; it needs {need}",
                       {"role": have, "required_role": need})
        self.limit(f"person:{name}", cls)

    def limit(self, key: str, cls: str) -> None:
        decision = self.ctx.ratelimit.check(key, cls)
        headers = self.ctx.ratelimit.headers(decision)
        g.kaiabc_limit = headers
        if not decision.allowed:
            retry = int(float(headers.get("Retry-After", "60")))
            raise Fail(429, "RATE_LIMIT_EXCEEDED", f"Rate limit of {self.limits[cls]} requests per minute exceeded",
                       headers=headers, retry_after_s=retry)

    # -- errors and headers -----------------------------------------------------------------

    async def started(self) -> None:
        g.kaiabc_started = time.perf_counter()
        rule = request.url_rule
        if rule is not None and rule.rule.endswith("/v1/health"):
            return  # health answers during the startup ("ode_solver": "starting")
        if not await self.ctx.state.wait_started():
            raise Fail(503, "SERVICE_UNAVAILABLE", "the plugin is still resuming its oscillators",
                       headers={"Retry-After": "5"})

    async def headers(self, response: Response) -> Response:
        state = self.ctx.state
        state.requests += 1
        state.errors += response.status_code >= 400
        state.response_seconds += time.perf_counter() - getattr(g, "kaiabc_started", time.perf_counter())
        response.headers["X-API-Version"] = API_VERSION
        for name, value in getattr(g, "kaiabc_limit", {}).items():
            response.headers.setdefault(name, value)
        return response

    async def failed(self, e: Fail) -> ResponseReturnValue:
        self.ctx.state.refused.inc(code=e.code)
        return answer(e, self.ctx.now())

    async def bad_json(self, e: BadJSON) -> ResponseReturnValue:
        if isinstance(e, InvalidInput):
            return await self.failed(invalid(e.field, str(e), location=e.location))
        # The core's strict JSON says where a refused value sits ("readings[0].temperature_kelvin:
        # NaN is not a JSON number"): that place is the parameter.
        where = _FIELD.match(str(e))
        return await self.failed(invalid(where.group(1) if where else "body", str(e)))

    async def bad_encoding(self, e: EncodingError) -> ResponseReturnValue:
        code = {413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}.get(e.status, "INVALID_PARAMETER")
        return await self.failed(Fail(e.status, code, str(e), {"parameter": "body"}))

    async def auth_failed(self, e: AuthError) -> ResponseReturnValue:
        code = {401: "AUTHENTICATION_FAILED", 403: "PERMISSION_DENIED", 429: "RATE_LIMIT_EXCEEDED"}.get(
            e.status, "AUTHENTICATION_FAILED")
        headers = {"Retry-After": str(int(e.retry_after_s))} if e.retry_after_s else {}
        return await self.failed(Fail(e.status, code, e.reason, headers=headers,
                                      retry_after_s=int(e.retry_after_s) if e.retry_after_s else None))

    async def storage_full(self, e: StorageFull) -> ResponseReturnValue:
        return await self.failed(Fail(507, "STORAGE_FULL", f"storage full: nothing was stored ({e})"))

    async def storage_error(self, e: StorageError) -> ResponseReturnValue:
        return await self.failed(Fail(503, "SERVICE_UNAVAILABLE", f"storage unavailable: nothing was stored ({e})"))

    async def plugin_failed(self, e: PluginUnavailable) -> ResponseReturnValue:
        """The core's 503 for a failed plugin, in the spec's object. The plugin's state is
        whatever the failed startup left: this answer uses none of it."""
        return answer(Fail(503, "SERVICE_UNAVAILABLE", str(e.description), {"reason": e.reason},
                           headers={"Retry-After": "60"}), self.ctx.now())

    async def unexpected(self, e: Exception) -> ResponseReturnValue:
        """Any other error of a route, in the spec's object: an HTTP error by its status, a bug
        as 500 INTERNAL_ERROR (logged with its traceback, nothing of it told to the caller)."""
        if isinstance(e, HTTPException):
            status = e.code or 500
            code = _STATUS_CODES.get(status, "INVALID_PARAMETER" if status < 500 else "INTERNAL_ERROR")
            message = e.description or e.name
            if status == 413:  # as the core says it (app.py answers Quart's 413 as a BodyTooLarge)
                limit = current_app.config["MAX_CONTENT_LENGTH"]
                message = f"the body is larger than {limit} bytes (http.max_body_bytes)"
                return await self.failed(Fail(413, code, message, {"parameter": "body"}))
            return await self.failed(Fail(status, code, message))
        self.ctx.log.exception("unhandled error in a kaiabc route", path=request.path, error=repr(e))
        return await self.failed(Fail(500, "INTERNAL_ERROR", "internal error; see the gateway log"))


def _one(nodes: Any, node_id: str | None) -> str:
    if node_id is None:
        if len(nodes) != 1:
            raise invalid("node_id", f"node_id is required: this gateway has {len(nodes)} nodes")
        return str(next(iter(nodes)))
    return node_id


def _series_value(name: str, row: tuple[float, ...], koa_low: float, koa_high: float) -> float:
    """One variable of a history bucket (bucket start, c_t, c_st, c_s, koa, temperature_k)."""
    _, c_t, c_st, c_s, koa_value, temperature = row
    a_free = max(RUST_2007.kaia_total - RUST_2007.sequestration * c_s, 0.0)
    value = {"C_T": c_t, "C_ST": c_st, "C_S": c_s, "C_U": RUST_2007.kaic_total - c_t - c_st - c_s,
             "A_free": a_free, "CABC_complex": RUST_2007.kaia_total - a_free, "temperature_kelvin": temperature,
             "koa_metric": min(max((koa_value - koa_low) / (koa_high - koa_low), 0.0), 1.0)}[name]
    return round(value, 6)


def reading_time(text: str | None, field: str, now: float) -> float:
    """A reading's timestamp (`_time`), at most READING_SKEW_S ahead of the gateway's clock: a
    node whose clock ran ahead would otherwise move its filter into the future, and every true
    reading after it would be refused as not newer."""
    ts = _time(text, field, now)
    if ts > now + READING_SKEW_S:
        raise invalid(field, f"{field}: {text} is ahead of the gateway's clock by more than {READING_SKEW_S:g} s "
                      "(is the node's clock set?)", text, gateway_time=iso(now))
    return ts


def _time(text: str | None, field: str, now: float) -> float:
    """An ISO 8601 timestamp as epoch seconds (UTC when it names no zone); `now` when absent."""
    if text is None:
        return now
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(field, f"{field}: expected an ISO 8601 timestamp like 2025-10-06T12:00:00.123Z",
                      text) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()
