"""paku's HTTP API under the plugin's mount (`/paku`): one method per route, in the
gateway's error shape (`error_response`). README.md has the table with the answers."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from quart import Blueprint, jsonify, request
from quart.typing import ResponseReturnValue

from gatewayd.plugins.api import (
    CHANNELS,
    BadJSON,
    ClaimError,
    Device,
    DeviceExists,
    PluginContext,
    StorageError,
    StorageFull,
    decode_cursor,
    error_response,
    parse_time,
    read_json_object,
)

from . import models

if TYPE_CHECKING:
    from .config import PakuConfig
    from .topics import Paku

# The id is the MQTT username and a topic level: nothing mosquitto or a topic can't hold.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
# The longest text of each field: the core registry's limits (docs/devices.md); notes
# live in the device's metadata, which holds up to 16,384 characters of JSON.
MAX_LENGTHS = {"name": 256, "model": 128, "firmware": 64, "notes": 4096}


class Refused(Exception):
    """A request answered with an error: `raise Refused(404, "no such device")`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Routes:
    """The routes of one plugin; `blueprint()` mounts them."""

    def __init__(self, ctx: PluginContext[PakuConfig, Paku]) -> None:
        self.ctx = ctx
        ctx.ratelimit.define("claim", 10, 60)  # per client address: claim codes are not for guessing

    def blueprint(self) -> Blueprint:
        bp = Blueprint(self.ctx.name, __name__)
        bp.get("/health")(self.health)
        bp.post("/devices")(self.provision)  # admin
        bp.get("/devices")(self.list_devices)  # admin
        bp.get("/devices/<device_id>")(self.show)  # admin
        bp.patch("/devices/<device_id>")(self.update)  # admin
        bp.get("/devices/<device_id>/telemetry")(self.telemetry)  # admin
        bp.post("/claim")(self.claim)  # a claim code
        bp.get("/ota/manifest.json")(self.manifest)
        bp.get("/ota/<int:firmware_id>/firmware.bin")(self.firmware)
        bp.register_error_handler(Refused, self.refused)
        bp.register_error_handler(BadJSON, self.bad_json)  # read_json_object's: names the field
        bp.register_error_handler(StorageFull, self.storage_full)  # nothing was stored: 507
        bp.register_error_handler(StorageError, self.storage_error)  # nothing was stored: 503
        return bp

    async def health(self) -> ResponseReturnValue:
        connected = self.ctx.mqtt.connected
        detail = "receiving device topics" if connected else \
            "idle: MQTT is off or the broker is not reachable; the HTTP API works"
        return {"status": "ok", "mqtt": {"connected": connected, "detail": detail}}

    async def provision(self) -> ResponseReturnValue:
        if denied := self.ctx.http.require_admin():
            return denied
        doc = await read_json_object()
        device_id = _device_id(doc)
        fields = {"model": self._default_model(), **_fields(doc, MAX_LENGTHS)}
        try:
            device, creds = await self.ctx.devices.provision(device_id, **fields)
        except DeviceExists:
            raise Refused(409, f"device {device_id!r} already exists") from None
        except ValueError as e:
            raise Refused(400, str(e)) from None
        self.ctx.log.info("device provisioned", device=device.id, via="api")
        return self._credentials(device, creds.key), 201

    async def list_devices(self) -> ResponseReturnValue:
        if denied := self.ctx.http.require_admin():
            return denied
        return {"devices": [self._describe(d) for d in await self.ctx.devices.list()]}

    async def show(self, device_id: str) -> ResponseReturnValue:
        if denied := self.ctx.http.require_admin():
            return denied
        doc = {**self._describe(await self._device(device_id)),
               **await self.ctx.storage.read(models.latest, device_id)}
        # The registry's last-seen time is written every `devices.presence_flush_s`; the
        # newest telemetry may be newer. (A state saying offline is no sign of life.)
        if doc["telemetry"] is not None and (doc["lastSeenAt"] or 0) < doc["telemetry"]["receivedAt"]:
            doc["lastSeenAt"] = doc["telemetry"]["receivedAt"]
        return doc

    async def update(self, device_id: str) -> ResponseReturnValue:
        if denied := self.ctx.http.require_admin():
            return denied
        changes = _fields(await read_json_object(), MAX_LENGTHS)
        await self._device(device_id)
        try:
            return self._describe(await self.ctx.devices.update(device_id, **changes))
        except ValueError as e:  # the merged notes and metadata too large, say
            raise Refused(400, str(e)) from None

    async def telemetry(self, device_id: str) -> ResponseReturnValue:
        if denied := self.ctx.http.require_admin():
            return denied
        args = request.args
        since, until = _time(args, "since"), _time(args, "until")
        try:
            after = decode_cursor(args["cursor"], (float, int)) if args.get("cursor") else None
        except ValueError as e:
            raise Refused(400, str(e)) from None
        limit = args.get("limit", "100")
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if not (limit.isascii() and limit.isdigit() and len(limit) <= 4) or not 1 <= int(limit) <= 1000:
            raise Refused(400, f"limit: expected an integer 1-1000, got {limit!r}")
        await self._device(device_id)
        position = None if after is None else (float(after[0]), int(after[1]))
        items, cursor = await self.ctx.storage.read(models.telemetry_page, device_id, since, until, int(limit),
                                                    position)
        return {"device": device_id, "telemetry": items, "next_cursor": cursor}

    async def claim(self) -> ResponseReturnValue:
        decision = self.ctx.ratelimit.check(request.remote_addr or "-", "claim")
        if not decision.allowed:
            raise Refused(429, "too many claim attempts; retry later", self.ctx.ratelimit.headers(decision))
        doc = await read_json_object()
        code = doc.get("code")
        if not isinstance(code, str) or not code.strip():
            raise Refused(400, 'expected {"code": "ABCD-EFGH-JKLM", "id"?, "model"?}')
        device_id = _device_id(doc)
        fields = {"model": self._default_model(), **_fields(doc, {k: MAX_LENGTHS[k] for k in ("name", "model")})}
        try:
            device, creds = await self.ctx.devices.claim(code, device_id, **fields)
        except ClaimError as e:
            raise Refused(403, f"claim refused: {e}") from None
        except DeviceExists:
            raise Refused(409, f"device {device_id!r} already exists") from None
        except ValueError as e:
            raise Refused(400, str(e)) from None
        self.ctx.log.info("device claimed", device=device.id)
        if creds is None:  # a code made for a provisioned device: its password was given then
            return self._credentials(device, None), 200
        return self._credentials(device, creds.key), 201

    async def manifest(self) -> ResponseReturnValue:
        args = request.args
        model, current = args.get("model") or None, args.get("current") or None
        channel, device = args.get("channel") or "stable", args.get("device") or None
        if channel not in CHANNELS:
            raise Refused(400, f"channel: expected one of {', '.join(CHANNELS)}, got {channel!r}")
        wanted = [model] if model else sorted({fw.model for fw in await self.ctx.ota.list()})
        try:
            newest = [await self.ctx.ota.newest_for(m, current, channel, device) for m in wanted]
        except ValueError as e:
            raise Refused(400, f"current: {e}") from None
        return jsonify(self.ctx.ota.manifest([fw for fw in newest if fw is not None],
                                             lambda fw: f"{self.ctx.mount}/ota/{fw.id}/firmware.bin"))

    async def firmware(self, firmware_id: int) -> ResponseReturnValue:
        # An id past SQLite's integers can't exist (and would be an OverflowError in the query).
        fw = await self.ctx.ota.get(firmware_id) if firmware_id < 2**63 else None
        if fw is None:
            raise Refused(404, f"no {self.ctx.name} firmware {firmware_id}")
        response: ResponseReturnValue = await self.ctx.ota.response(fw)
        return response

    # -- errors ----------------------------------------------------------------------------

    async def refused(self, e: Refused) -> ResponseReturnValue:
        return error_response(e.status, e.message, **e.headers)

    async def bad_json(self, e: BadJSON) -> ResponseReturnValue:
        return error_response(400, str(e))

    async def storage_full(self, e: StorageFull) -> ResponseReturnValue:
        return error_response(507, f"storage full: nothing was stored ({e})")

    async def storage_error(self, e: StorageError) -> ResponseReturnValue:
        return error_response(503, f"storage unavailable: nothing was stored ({e})")

    # -- what the routes share -------------------------------------------------------------

    async def _device(self, device_id: str) -> Device:
        device = await self.ctx.devices.get(device_id)
        if device is None:
            raise Refused(404, f"no {self.ctx.name} device {device_id!r}")
        return device

    def _default_model(self) -> str:
        return self.ctx.config.default_model or self.ctx.name

    def _credentials(self, device: Device, password: str | None) -> dict[str, Any]:
        # The gateway's own configured address (http.public_url), never the request's Host header.
        host = self.ctx.config.mqtt_host or urlsplit(self.ctx.http.url("/")).hostname or "127.0.0.1"
        port = self.ctx.config.mqtt_port or self.ctx.mqtt.device_port or 1883
        mqtt = {"host": host, "port": port, "username": device.id, "password": password}
        base = f"{self.ctx.name}/{device.id}"
        return {"id": device.id, "model": device.model, "status": device.status,
                "mqtt": {k: v for k, v in mqtt.items() if v is not None},
                "topics": {"telemetry": f"{base}/telemetry", "state": f"{base}/state",
                           "event": f"{base}/event/<name>", "cmd": f"{base}/cmd"}}

    def _describe(self, device: Device) -> dict[str, Any]:
        return {"id": device.id, "name": device.name, "model": device.model, "status": device.status,
                "createdAt": device.created_at, "fwVersion": device.firmware or None, "lastSeenAt": device.last_seen,
                "online": self.ctx.state.is_online(device.id), "notes": device.metadata.get("notes", "")}


def _device_id(doc: dict[str, Any]) -> str | None:
    device_id = doc.get("id")
    if device_id is not None and not (isinstance(device_id, str) and DEVICE_ID.fullmatch(device_id)):
        raise Refused(400, f"id: expected 1-128 of letters, digits and _ . @ -, got {device_id!r}")
    return device_id


def _fields(doc: dict[str, Any], limits: dict[str, int]) -> dict[str, Any]:
    """The registry's fields of a request (notes go in the metadata); Refused naming a bad one."""
    out: dict[str, Any] = {}
    for key, limit in limits.items():
        if key in doc:
            if not isinstance(doc[key], str) or len(doc[key]) > limit:
                raise Refused(400, f"'{key}' must be a string (at most {limit} characters)")
            out[key] = doc[key]
    if "notes" in out:
        out["metadata"] = {"notes": out.pop("notes")}
    return out


def _time(args: Any, name: str) -> float | None:
    """`since` / `until`: epoch seconds or ISO 8601."""
    try:
        return parse_time(args[name]) if args.get(name) else None
    except ValueError as e:
        raise Refused(400, f"{name}: {e}") from None
