"""thingsnxt's HTTP API under the plugin's mount (`/thingsnxt`, the firmware's
`API_BASE_URL`), declared once (`Routes`: validated, published at
`/thingsnxt/openapi.json`), refusals in the family's shape `{"detail": ...}`.
README.md has the table with the answers; streams.py the live routes.

Telemetry bodies are declared like every other (telemetry.py's Structs) with
`max_inflated`: a device may send them gzipped or zstd-compressed (`Content-Encoding`),
inflated within `max_decompressed_bytes` before they are parsed. The rate limit runs
before any of it (`before_request`): a client over its limit is answered 429 unread.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any

from quart import Blueprint, request
from quart.typing import ResponseReturnValue

from gatewayd.plugins.api import (
    ADMIN_TOKEN,
    AuthError,
    BadJSON,
    Device,
    DeviceExists,
    EncodingError,
    Meta,
    PluginContext,
    Routes,
    StorageError,
    StorageFull,
    Struct,
)

from .errors import Detail, Refused, detail
from .telemetry import (
    BulkIn,
    DeviceState,
    TelemetryIn,
    latest_answer,
    legacy_answer,
    parse_app_values,
    parse_bulk,
    parse_telemetry,
    v2_answer,
)

if TYPE_CHECKING:
    from .config import ThingsnxtConfig
    from .service import Thingsnxt

DEVICE_ID = r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}"
DeviceId = Annotated[str, Meta(pattern=f"^{DEVICE_ID}$", description="the device's id (the firmware's DEVICE_ID)")]
PATH = {"device_id": DeviceId}
Json = Any

LIMITED = {429: "more than plugins.<name>.rate_limit requests from this address in rate_window_s (Retry-After)"}
DEVICE = {400: "the body is not JSON, or a field is wrong (the message names it)",
          403: "wrong device_token, a disabled device, or a key the security rules refuse",
          413: "the body is larger than allowed (once inflated)", 415: "a Content-Encoding other than gzip or zstd",
          **LIMITED, 503: "storage unavailable: nothing was stored, retry",
          507: "storage full: nothing was stored"}


class Health(Struct):
    status: str


class V2Answer(Struct):
    message: str
    device_id: str
    data: dict[str, Json]
    timestamp: str


class LegacyAnswer(Struct):
    message: str
    device_id: str
    led: Json
    updated_data: dict[str, Json]
    timestamp: str


class BulkAnswer(Struct):
    message: str
    device_id: str
    stored: int
    data: dict[str, Json]
    timestamp: str


class Latest(Struct):
    device_id: str
    data: dict[str, Json]
    timestamp: str | None


class LatestQuery(Struct, forbid_unknown_fields=True):
    device_token: Annotated[str, Meta(min_length=1, max_length=256, description="the device's token")]


class NewDevice(Struct, forbid_unknown_fields=True):
    device_id: DeviceId | None = None
    name: Annotated[str, Meta(max_length=256)] = ""
    model: Annotated[str, Meta(max_length=128)] = ""


class Registered(Struct):
    device_id: str
    device_token: str
    api_base_url: str


class DeviceStateOut(Struct):
    device_id: str
    data: dict[str, Json]
    pending: dict[str, Json]
    timestamp: str | None


class NewValues(Struct, forbid_unknown_fields=True):
    data: dict[str, Json]


class Api:
    """The routes of one plugin; `register(bp)` declares them."""

    def __init__(self, ctx: PluginContext[ThingsnxtConfig, Thingsnxt]) -> None:
        self.ctx = ctx

    def register(self, bp: Blueprint) -> Routes:
        routes = Routes(bp, error=Detail, tag=self.ctx.name)
        inflated = self.ctx.config.max_decompressed_bytes  # gzip or zstd bodies, inflated to at most this
        routes.get("/health", responses={200: Health}, auth=None)(self.health)
        routes.post("/devices/<device_id>/telemetry", path=PATH, body=TelemetryIn, max_inflated=inflated,
                    responses={200: V2Answer}, errors={**DEVICE, 404: "no such device"})(self.v2)
        routes.post("/telemetry", body=TelemetryIn, max_inflated=inflated, responses={200: LegacyAnswer},
                    errors=DEVICE)(self.legacy)
        routes.get("/telemetry/latest", query=LatestQuery, responses={200: Latest},
                   errors={403: DEVICE[403], **LIMITED})(self.latest)
        routes.post("/devices/<device_id>/telemetry/bulk", path=PATH, body=BulkIn, max_inflated=inflated,
                    responses={200: BulkAnswer}, errors={**DEVICE, 404: "no such device"})(self.bulk)
        routes.post("/devices", body=NewDevice, auth=ADMIN_TOKEN, responses={201: Registered},
                    errors={409: "the device exists", **LIMITED})(self.register_device)
        routes.get("/devices/<device_id>/state", path=PATH, auth=ADMIN_TOKEN, responses={200: DeviceStateOut},
                   errors={404: "no such device", **LIMITED})(self.show_state)
        routes.put("/devices/<device_id>/state", path=PATH, body=NewValues, auth=ADMIN_TOKEN,
                   responses={200: DeviceStateOut},
                   errors={403: "a key the security rules keep from apps", 404: "no such device", **LIMITED,
                           503: DEVICE[503], 507: DEVICE[507]})(self.set_state)
        limited = {self.v2, self.legacy, self.latest, self.bulk, self.register_device, self.show_state, self.set_state}
        # All but /health (and the docs), by the views' own names: on the plugin's own listener
        # the blueprint's endpoints are `<name>_root.<view>`, not `<name>.<view>`.
        self._limited = {view.__name__ for view in limited}
        bp.before_request(self.limit)
        bp.register_error_handler(Refused, self.refused)
        bp.register_error_handler(AuthError, self.auth_refused)
        bp.register_error_handler(BadJSON, self.bad_json)  # InvalidInput too: names the field
        bp.register_error_handler(EncodingError, self.bad_encoding)
        bp.register_error_handler(StorageFull, self.storage_full)
        bp.register_error_handler(StorageError, self.storage_error)
        return routes

    # -- the device's --------------------------------------------------------------------

    async def health(self) -> Health:
        """The firmware's health check (`API_BASE_URL + "/health"`, every 60 s); never rate-limited."""
        return Health("ok")

    async def v2(self, device_id: str, body: TelemetryIn) -> V2Answer:
        """Telemetry (v2): `{device_token, data}`; answers the device's whole state to sync its pins from.

        The body may be gzip or zstd (`Content-Encoding`)."""
        telemetry = parse_telemetry(body, self.ctx.state.limits)
        device = await self._device(device_id, telemetry.token)
        state = await self.ctx.state.telemetry(device, telemetry.readings, "v2")
        return V2Answer(**v2_answer(device.id, state, self.ctx.now()))

    async def legacy(self, body: TelemetryIn) -> LegacyAnswer:
        """Telemetry (legacy): the token identifies the device; answers the LED state.

        The body may be gzip or zstd (`Content-Encoding`)."""
        telemetry = parse_telemetry(body, self.ctx.state.limits)
        device = await self.ctx.auth.body_token(request.remote_addr, json={"device_token": telemetry.token})
        state = await self.ctx.state.telemetry(device, telemetry.readings, "legacy")
        return LegacyAnswer(**legacy_answer(device.id, state, self.ctx.now()))

    async def latest(self, query: LatestQuery) -> Latest:
        """The device's state for polling (every 5 s): what apps set is in it."""
        device = await self.ctx.auth.body_token(request.remote_addr, query={"device_token": query.device_token})
        return Latest(**latest_answer(device.id, await self.ctx.state.state(device.id)))

    async def bulk(self, device_id: str, body: BulkIn) -> BulkAnswer:
        """Many readings with their own timestamps (`{device_token, readings: [{timestamp, data}]}`), for a
        device that cached while offline; stored in one transaction.

        The body may be gzip or zstd (`Content-Encoding`)."""
        telemetry = parse_bulk(body, self.ctx.state.limits, self.ctx.now())
        device = await self._device(device_id, telemetry.token)
        state = await self.ctx.state.telemetry(device, telemetry.readings, "bulk")
        answer = v2_answer(device.id, state, self.ctx.now())
        return BulkAnswer(answer["message"], device.id, len(telemetry.readings), answer["data"], answer["timestamp"])

    # -- the operator's and apps' ----------------------------------------------------------

    async def register_device(self, body: NewDevice) -> Any:
        """Register a device (operators): its token, shown once, to provision it with."""
        if denied := self.ctx.http.require_admin():
            return denied  # the core's 401/503, in the core's shape (ADMIN_TOKEN says so)
        fields = {k: v for k, v in (("name", body.name), ("model", body.model)) if v}
        try:
            device, creds = await self.ctx.devices.provision(body.device_id, **fields)
        except DeviceExists:
            raise Refused(409, f"Device {body.device_id} already exists") from None
        except ValueError as e:
            raise Refused(400, str(e)) from None
        self.ctx.log.info("device registered", device=device.id)
        return Registered(device.id, creds.key, self.api_base_url()), 201

    async def show_state(self, device_id: str) -> Any:
        """A device's state as the server sees it, and what apps set that it has not confirmed."""
        if denied := self.ctx.http.require_admin():
            return denied
        device = await self._known(device_id)
        return _state_out(device.id, await self.ctx.state.state(device.id))

    async def set_state(self, device_id: str, body: NewValues) -> Any:
        """Set virtual pins (`{"data": {"v0": 1}}`): the device reads them in its next answer or poll."""
        if denied := self.ctx.http.require_admin():
            return denied
        values = parse_app_values({"data": body.data}, self.ctx.state.limits)
        device = await self._known(device_id)
        return _state_out(device.id, await self.ctx.state.set_values(device, values))

    def api_base_url(self) -> str:
        """What a device is provisioned with: the configured one, else the gateway's public URL."""
        return self.ctx.config.api_base_url or self.ctx.http.url(self.ctx.http.mount)

    # -- errors ----------------------------------------------------------------------------

    async def refused(self, e: Refused) -> ResponseReturnValue:
        return detail(e.detail), e.status, e.headers

    async def auth_refused(self, e: AuthError) -> ResponseReturnValue:
        # The specification's codes: a wrong token is 403 (the core says 401: unauthenticated).
        retry = {"Retry-After": str(math.ceil(e.retry_after_s))} if e.retry_after_s else {}
        message = "Invalid device token" if e.status == 401 else e.reason
        return detail(message), 403 if e.status == 401 else e.status, retry

    async def bad_json(self, e: BadJSON) -> ResponseReturnValue:
        return detail(str(e)), 400

    async def bad_encoding(self, e: EncodingError) -> ResponseReturnValue:
        return detail(e.message), e.status

    async def storage_full(self, e: StorageFull) -> ResponseReturnValue:
        return detail(f"Storage full: nothing was stored ({e})"), 507

    async def storage_error(self, e: StorageError) -> ResponseReturnValue:
        return detail(f"Storage unavailable: nothing was stored ({e})"), 503

    # -- what the routes share -------------------------------------------------------------

    async def limit(self) -> None:
        """Before every route but /health and the docs: the specification's rate limit, per client
        address, before the body is read (Refused(429) with Retry-After)."""
        if not self.ctx.config.rate_limit:
            return  # no limit (the config is fixed while the plugin runs): not even the endpoint looked up
        if request.endpoint is not None and request.endpoint.rpartition(".")[2] in self._limited:
            self.ctx.state.limit(request.remote_addr)

    async def _device(self, device_id: str, token: str) -> Device:
        """The URL's device (404 if unknown), if the token is its own (else 403)."""
        await self._known(device_id)
        return await self.ctx.auth.body_token(request.remote_addr, json={"device_token": token}, device_id=device_id)

    async def _known(self, device_id: str) -> Device:
        device = await self.ctx.devices.get(device_id, max_age_s=2.0)
        if device is None:
            raise Refused(404, "Device not found")
        return device


def _state_out(device_id: str, state: DeviceState) -> DeviceStateOut:
    answer = latest_answer(device_id, state)
    return DeviceStateOut(device_id, answer["data"], state.pending, answer["timestamp"])

