"""paku's HTTP API, under the plugin's mount (default `/paku`).

    GET   /health                               200 with the MQTT side's state
    POST  /devices                    admin     provision: credentials, returned once -> 201
    GET   /devices                    admin     the paku devices
    GET   /devices/<id>               admin     one device with its latest state and telemetry
    PATCH /devices/<id>               admin     notes, name, model
    GET   /devices/<id>/telemetry     admin     ?since=&until=&limit=&cursor= newest first
    POST  /claim                      code      {"code"} -> credentials of a new device, once
    GET   /ota/manifest.json                    ?model=&current=&channel=&device= -> [{model, version, url, sha256}]
    GET   /ota/<id>/firmware.bin                the image (Range, ETag)

"admin": `Authorization: Bearer <admin token>` (the core's admin token). Errors use the
gateway's shape, `{"error": {"status", "code", "message"}}`: 400 names the field that is
wrong (bodies are parsed strictly by the core's `read_json_object`), 507 when the disk
is full, 503 when the database fails otherwise; nothing was stored in either case.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from quart import Blueprint, jsonify, request

from gatewayd.plugins.api import (
    BadJSON,
    ClaimError,
    DeviceExists,
    PluginContext,
    StorageError,
    StorageFull,
    read_json_object,
)

from . import models

# The id is the MQTT username and a topic level: nothing mosquitto or a topic can't hold.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
# The longest text of each field: the core registry's limits (docs/devices.md); notes
# live in the device's metadata, which holds up to 16,384 characters of JSON.
MAX_LENGTHS = {"name": 256, "model": 128, "firmware": 64, "notes": 4096}
_CODES = {400: "bad_request", 403: "forbidden", 404: "not_found", 409: "conflict", 429: "rate_limited",
          503: "unavailable", 507: "insufficient_storage"}


def problem(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    return {"error": {"status": status, "code": _CODES.get(status, "error"), "message": message}}, status, headers or {}


def parse_time(name: str, text: str) -> float:
    """Epoch seconds or ISO 8601 (UTC unless it says otherwise); ValueError naming the parameter."""
    try:
        value = float(text)
        if math.isfinite(value):
            return value
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
            return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
        except ValueError:
            pass
    raise ValueError(f"{name}: expected epoch seconds or an ISO 8601 time, got {text!r}")


def blueprint(ctx: PluginContext) -> Blueprint:
    bp = Blueprint("paku", __name__)
    ctx.ratelimit.define("claim", 10, 60)  # per client address: claim codes are not for guessing

    @bp.errorhandler(BadJSON)
    async def _bad_json(e: BadJSON) -> Any:
        return problem(400, str(e))

    @bp.errorhandler(StorageFull)
    async def _storage_full(e: StorageFull) -> Any:
        return problem(507, f"storage full: nothing was stored ({e})")

    @bp.errorhandler(StorageError)
    async def _storage_error(e: StorageError) -> Any:
        return problem(503, f"storage unavailable: nothing was stored ({e})")

    def valid_id(device_id: Any) -> bool:
        return isinstance(device_id, str) and DEVICE_ID.fullmatch(device_id) is not None

    def broker(device_id: str, password: str | None) -> dict[str, Any]:
        # The gateway's own configured address (http.public_url), never the request's Host header.
        host = ctx.config.mqtt_host or urlsplit(ctx.http.url("/")).hostname or "127.0.0.1"
        port = ctx.config.mqtt_port or ctx.mqtt.device_port or 1883
        doc = {"host": host, "port": port, "username": device_id}
        return {**doc, "password": password} if password is not None else doc

    def credentials(device: Any, password: str | None) -> dict[str, Any]:
        topics = {k: f"paku/{device.id}/{k}" for k in ("telemetry", "state", "cmd")}
        return {"id": device.id, "model": device.model, "status": device.status,
                "mqtt": broker(device.id, password), "topics": {**topics, "event": f"paku/{device.id}/event/<name>"}}

    def describe(device: Any) -> dict[str, Any]:
        return {"id": device.id, "name": device.name, "model": device.model, "status": device.status,
                "createdAt": device.created_at, "fwVersion": device.firmware or None, "lastSeenAt": device.last_seen,
                "online": ctx.devices.is_online(device.id), "notes": device.metadata.get("notes", "")}

    def fields(doc: dict[str, Any]) -> dict[str, Any] | str:
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

    @bp.get("/health")
    async def health() -> Any:
        connected = ctx.mqtt is not None and ctx.mqtt.connected
        return {"status": "ok", "mqtt": {
            "connected": connected,
            "detail": "receiving device topics" if connected
            else "idle: MQTT is off or the broker is not reachable; the HTTP API works",
        }}

    @bp.post("/devices")
    async def provision() -> Any:
        if denied := ctx.http.require_admin():
            return denied
        doc = await read_json_object()
        device_id = doc.get("id")
        if device_id is not None and not valid_id(device_id):
            return problem(400, f"id: expected 1-128 of letters, digits and _ . @ -, got {device_id!r}")
        extra = fields(doc)
        if isinstance(extra, str):
            return problem(400, extra)
        extra.setdefault("model", ctx.config.default_model)
        try:
            device, creds = await ctx.devices.provision(device_id, **extra)
        except DeviceExists:
            return problem(409, f"device {device_id!r} already exists")
        except ValueError as e:
            return problem(400, str(e))
        ctx.log.info("device provisioned", device=device.id, via="api")
        return credentials(device, creds.key), 201

    @bp.get("/devices")
    async def list_devices() -> Any:
        if denied := ctx.http.require_admin():
            return denied
        return {"devices": [describe(d) for d in await ctx.devices.list()]}

    @bp.get("/devices/<device_id>")
    async def show(device_id: str) -> Any:
        if denied := ctx.http.require_admin():
            return denied
        device = await ctx.devices.get(device_id)
        if device is None:
            return problem(404, f"no paku device {device_id!r}")
        latest = await ctx.storage.read(models.latest, device_id)
        doc = describe(device)
        seen = [t for t in (doc["lastSeenAt"], latest.pop("lastReceivedAt")) if t is not None]
        return {**doc, "lastSeenAt": max(seen, default=None), **latest}

    @bp.patch("/devices/<device_id>")
    async def update(device_id: str) -> Any:
        if denied := ctx.http.require_admin():
            return denied
        changes = fields(await read_json_object())
        if isinstance(changes, str):
            return problem(400, changes)
        if await ctx.devices.get(device_id) is None:
            return problem(404, f"no paku device {device_id!r}")
        try:
            return describe(await ctx.devices.update(device_id, **changes))
        except ValueError as e:  # the merged notes and metadata too large, say
            return problem(400, str(e))

    @bp.get("/devices/<device_id>/telemetry")
    async def telemetry(device_id: str) -> Any:
        if denied := ctx.http.require_admin():
            return denied
        args = request.args
        try:
            since = parse_time("since", args["since"]) if args.get("since") else None
            until = parse_time("until", args["until"]) if args.get("until") else None
            cursor = models.decode_cursor(args["cursor"]) if args.get("cursor") else None
        except ValueError as e:
            return problem(400, str(e))
        limit = args.get("limit", "100")
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if not (limit.isascii() and limit.isdigit() and len(limit) <= 4) or not 1 <= int(limit) <= 1000:
            return problem(400, f"limit: expected an integer 1-1000, got {limit!r}")
        if await ctx.devices.get(device_id) is None:
            return problem(404, f"no paku device {device_id!r}")
        items, next_cursor = await ctx.storage.read(models.telemetry_page, device_id, since, until, int(limit), cursor)
        return {"device": device_id, "telemetry": items, "next_cursor": next_cursor}

    @bp.post("/claim")
    async def claim() -> Any:
        decision = ctx.ratelimit.check(request.remote_addr or "-", "claim")
        if not decision.allowed:
            return problem(429, "too many claim attempts; retry later", ctx.ratelimit.headers(decision))
        doc = await read_json_object()
        code = doc.get("code")
        if not isinstance(code, str) or not code.strip():
            return problem(400, "expected {\"code\": \"ABCD-EFGH-JKLM\", \"id\"?, \"model\"?}")
        device_id = doc.get("id")
        if device_id is not None and not valid_id(device_id):
            return problem(400, f"id: expected 1-128 of letters, digits and _ . @ -, got {device_id!r}")
        extra = fields({k: v for k, v in doc.items() if k in ("model", "name")})
        if isinstance(extra, str):
            return problem(400, extra)
        try:
            device, creds = await ctx.devices.claim(code, device_id, model=extra.get("model", ctx.config.default_model),
                                                    **({"name": extra["name"]} if "name" in extra else {}))
        except ClaimError as e:
            return problem(403, f"claim refused: {e}")
        except DeviceExists:
            return problem(409, f"device {device_id!r} already exists")
        except ValueError as e:
            return problem(400, str(e))
        ctx.log.info("device claimed", device=device.id)
        if creds is None:  # a code made for a provisioned device: its password was given then
            return credentials(device, None), 200
        return credentials(device, creds.key), 201

    @bp.get("/ota/manifest.json")
    async def manifest() -> Any:
        args = request.args
        model, current = args.get("model") or None, args.get("current") or None
        channel, device = args.get("channel") or "stable", args.get("device") or None
        if channel not in ("stable", "beta"):
            return problem(400, f"channel: expected stable or beta, got {channel!r}")
        wanted = [model] if model else sorted({fw.model for fw in await ctx.ota.list()})
        entries = []
        try:
            for m in wanted:
                fw = await ctx.ota.newest_for(m, current, channel, device)
                if fw is not None:
                    entries.append({"model": fw.model, "version": fw.version, "sha256": fw.sha256, "size": fw.size,
                                    "url": ctx.ota.url(f"{ctx.mount}/ota/{fw.id}/firmware.bin"),
                                    "signature": fw.signature})
        except ValueError as e:
            return problem(400, f"current: {e}")
        return jsonify(entries)

    @bp.get("/ota/<int:firmware_id>/firmware.bin")
    async def firmware(firmware_id: int) -> Any:
        # An id past SQLite's integers can't exist (and would be an OverflowError in the query).
        fw = await ctx.ota.get(firmware_id) if firmware_id < 2**63 else None
        if fw is None or fw.family != "paku":
            return problem(404, f"no paku firmware {firmware_id}")
        return await ctx.ota.response(fw)

    return bp
