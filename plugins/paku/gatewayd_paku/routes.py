"""paku's HTTP API, under the plugin's mount (`/paku` by default): one method per route.

    GET   /health                               200 with the MQTT side's state
    POST  /devices                    admin     provision: credentials, returned once -> 201
    GET   /devices                    admin     the family's devices
    GET   /devices/<id>               admin     one device with its latest state and telemetry
    PATCH /devices/<id>               admin     notes, name, model
    GET   /devices/<id>/telemetry     admin     ?since=&until=&limit=&cursor= newest first
    POST  /claim                      code      {"code"} -> credentials of a new device, once
    GET   /ota/manifest.json                    ?model=&current=&channel=&device= -> [{model, version, url, sha256}]
    GET   /ota/<id>/firmware.bin                the image (Range, ETag)

"admin": `Authorization: Bearer <admin token>` (the core's admin token). Errors use the
gateway's shape (`error_response`): 400 names the field that is wrong (bodies are parsed
strictly by the core's `read_json_object`), 507 when the disk is full, 503 when the
database fails otherwise; nothing was stored in either case.
"""

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


class Routes:
    """The routes of one plugin context; `blueprint()` mounts them."""

    def __init__(self, ctx: PluginContext[PakuConfig, Paku]) -> None:
        self.ctx = ctx
        ctx.ratelimit.define("claim", 10, 60)  # per client address: claim codes are not for guessing

    def blueprint(self) -> Blueprint:
        bp = Blueprint(self.ctx.name, __name__)
        bp.get("/health")(self.health)
        bp.post("/devices")(self.provision)
        bp.get("/devices")(self.list_devices)
        bp.get("/devices/<device_id>")(self.show)
        bp.patch("/devices/<device_id>")(self.update)
        bp.get("/devices/<device_id>/telemetry")(self.telemetry)
        bp.post("/claim")(self.claim)
        bp.get("/ota/manifest.json")(self.manifest)
        bp.get("/ota/<int:firmware_id>/firmware.bin")(self.firmware)
        bp.register_error_handler(BadJSON, self.bad_json)
        bp.register_error_handler(StorageFull, self.storage_full)
        bp.register_error_handler(StorageError, self.storage_error)
        return bp

    async def health(self) -> ResponseReturnValue:
        connected = self.ctx.mqtt.connected
        return {"status": "ok", "mqtt": {
            "connected": connected,
            "detail": "receiving device topics" if connected
            else "idle: MQTT is off or the broker is not reachable; the HTTP API works",
        }}

    async def provision(self) -> ResponseReturnValue:
        if denied := self.ctx.http.require_admin():
            return denied
        doc = await read_json_object()
        device_id = doc.get("id")
        if device_id is not None and not _valid_id(device_id):
            return error_response(400, f"id: expected 1-128 of letters, digits and _ . @ -, got {device_id!r}")
        extra = _fields(doc)
        if isinstance(extra, str):
            return error_response(400, extra)
        extra.setdefault("model", self.ctx.config.default_model or self.ctx.name)
        try:
            device, creds = await self.ctx.devices.provision(device_id, **extra)
        except DeviceExists:
            return error_response(409, f"device {device_id!r} already exists")
        except ValueError as e:
            return error_response(400, str(e))
        self.ctx.log.info("device provisioned", device=device.id, via="api")
        return self._credentials(device, creds.key), 201

    async def list_devices(self) -> ResponseReturnValue:
        if denied := self.ctx.http.require_admin():
            return denied
        return {"devices": [self._describe(d) for d in await self.ctx.devices.list()]}

    async def show(self, device_id: str) -> ResponseReturnValue:
        if denied := self.ctx.http.require_admin():
            return denied
        device = await self.ctx.devices.get(device_id)
        if device is None:
            return self._no_device(device_id)
        doc = {**self._describe(device), **await self.ctx.storage.read(models.latest, device_id)}
        # The registry's last-seen time is written every `devices.presence_flush_s`; the
        # newest telemetry may be newer. (A state saying offline is no sign of life.)
        if doc["telemetry"] is not None and (doc["lastSeenAt"] or 0) < doc["telemetry"]["receivedAt"]:
            doc["lastSeenAt"] = doc["telemetry"]["receivedAt"]
        return doc

    async def update(self, device_id: str) -> ResponseReturnValue:
        if denied := self.ctx.http.require_admin():
            return denied
        changes = _fields(await read_json_object())
        if isinstance(changes, str):
            return error_response(400, changes)
        if await self.ctx.devices.get(device_id) is None:
            return self._no_device(device_id)
        try:
            return self._describe(await self.ctx.devices.update(device_id, **changes))
        except ValueError as e:  # the merged notes and metadata too large, say
            return error_response(400, str(e))

    async def telemetry(self, device_id: str) -> ResponseReturnValue:
        if denied := self.ctx.http.require_admin():
            return denied
        args = request.args
        try:
            since = _time("since", args.get("since"))
            until = _time("until", args.get("until"))
            cursor = args.get("cursor")
            after = decode_cursor(cursor, (float, int)) if cursor else None
        except ValueError as e:
            return error_response(400, str(e))
        limit = args.get("limit", "100")
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if not (limit.isascii() and limit.isdigit() and len(limit) <= 4) or not 1 <= int(limit) <= 1000:
            return error_response(400, f"limit: expected an integer 1-1000, got {limit!r}")
        if await self.ctx.devices.get(device_id) is None:
            return self._no_device(device_id)
        position = None if after is None else (float(after[0]), int(after[1]))
        items, next_cursor = await self.ctx.storage.read(models.telemetry_page, device_id, since, until, int(limit),
                                                         position)
        return {"device": device_id, "telemetry": items, "next_cursor": next_cursor}

    async def claim(self) -> ResponseReturnValue:
        decision = self.ctx.ratelimit.check(request.remote_addr or "-", "claim")
        if not decision.allowed:
            return error_response(429, "too many claim attempts; retry later", **self.ctx.ratelimit.headers(decision))
        doc = await read_json_object()
        code = doc.get("code")
        if not isinstance(code, str) or not code.strip():
            return error_response(400, 'expected {"code": "ABCD-EFGH-JKLM", "id"?, "model"?}')
        device_id = doc.get("id")
        if device_id is not None and not _valid_id(device_id):
            return error_response(400, f"id: expected 1-128 of letters, digits and _ . @ -, got {device_id!r}")
        extra = _fields({k: v for k, v in doc.items() if k in ("model", "name")})
        if isinstance(extra, str):
            return error_response(400, extra)
        extra.setdefault("model", self.ctx.config.default_model or self.ctx.name)
        try:
            device, creds = await self.ctx.devices.claim(code, device_id, **extra)
        except ClaimError as e:
            return error_response(403, f"claim refused: {e}")
        except DeviceExists:
            return error_response(409, f"device {device_id!r} already exists")
        except ValueError as e:
            return error_response(400, str(e))
        self.ctx.log.info("device claimed", device=device.id)
        if creds is None:  # a code made for a provisioned device: its password was given then
            return self._credentials(device, None), 200
        return self._credentials(device, creds.key), 201

    async def manifest(self) -> ResponseReturnValue:
        args = request.args
        model, current = args.get("model") or None, args.get("current") or None
        channel, device = args.get("channel") or "stable", args.get("device") or None
        if channel not in CHANNELS:
            return error_response(400, f"channel: expected one of {', '.join(CHANNELS)}, got {channel!r}")
        wanted = [model] if model else sorted({fw.model for fw in await self.ctx.ota.list()})
        try:
            newest = [await self.ctx.ota.newest_for(m, current, channel, device) for m in wanted]
        except ValueError as e:
            return error_response(400, f"current: {e}")
        return jsonify(self.ctx.ota.manifest([fw for fw in newest if fw is not None],
                                             lambda fw: f"{self.ctx.mount}/ota/{fw.id}/firmware.bin"))

    async def firmware(self, firmware_id: int) -> ResponseReturnValue:
        # An id past SQLite's integers can't exist (and would be an OverflowError in the query).
        fw = await self.ctx.ota.get(firmware_id) if firmware_id < 2**63 else None
        if fw is None:
            return error_response(404, f"no {self.ctx.name} firmware {firmware_id}")
        response: ResponseReturnValue = await self.ctx.ota.response(fw)
        return response

    # -- errors raised by the core's helpers, in the gateway's shape ----------------------

    async def bad_json(self, e: BadJSON) -> ResponseReturnValue:
        return error_response(400, str(e))

    async def storage_full(self, e: StorageFull) -> ResponseReturnValue:
        return error_response(507, f"storage full: nothing was stored ({e})")

    async def storage_error(self, e: StorageError) -> ResponseReturnValue:
        return error_response(503, f"storage unavailable: nothing was stored ({e})")

    # -- answers -------------------------------------------------------------------------

    def _credentials(self, device: Device, password: str | None) -> dict[str, Any]:
        # The gateway's own configured address (http.public_url), never the request's Host header.
        host = self.ctx.config.mqtt_host or urlsplit(self.ctx.http.url("/")).hostname or "127.0.0.1"
        port = self.ctx.config.mqtt_port or self.ctx.mqtt.device_port or 1883
        mqtt: dict[str, Any] = {"host": host, "port": port, "username": device.id}
        if password is not None:
            mqtt["password"] = password
        base = f"{self.ctx.name}/{device.id}"
        topics = {"telemetry": f"{base}/telemetry", "state": f"{base}/state", "event": f"{base}/event/<name>",
                  "cmd": f"{base}/cmd"}
        return {"id": device.id, "model": device.model, "status": device.status, "mqtt": mqtt, "topics": topics}

    def _describe(self, device: Device) -> dict[str, Any]:
        return {"id": device.id, "name": device.name, "model": device.model, "status": device.status,
                "createdAt": device.created_at, "fwVersion": device.firmware or None, "lastSeenAt": device.last_seen,
                "online": self.ctx.state.is_online(device.id), "notes": device.metadata.get("notes", "")}

    def _no_device(self, device_id: str) -> ResponseReturnValue:
        return error_response(404, f"no {self.ctx.name} device {device_id!r}")


def _valid_id(device_id: Any) -> bool:
    return isinstance(device_id, str) and DEVICE_ID.fullmatch(device_id) is not None


def _fields(doc: dict[str, Any]) -> dict[str, Any] | str:
    """name / model / notes / firmware of a request, or what is wrong with them."""
    out: dict[str, Any] = {}
    for key, limit in MAX_LENGTHS.items():
        if key in doc:
            if not isinstance(doc[key], str) or len(doc[key]) > limit:
                return f"'{key}' must be a string (at most {limit} characters)"
            out[key] = doc[key]
    if "notes" in out:
        out["metadata"] = {"notes": out.pop("notes")}
    return out


def _time(name: str, text: str | None) -> float | None:
    """A `since`/`until` parameter: epoch seconds or ISO 8601; ValueError naming it."""
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
