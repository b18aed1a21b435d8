"""The admin HTTP API for devices, under `/api/gateway/devices` (needs the admin token).

    GET    /api/gateway/devices[?family=F&status=S]      list
    POST   /api/gateway/devices                          provision -> 201, credentials once
    GET    /api/gateway/devices/<id>[?family=F]          one device
    POST   /api/gateway/devices/<id>/disable | /enable   status
    POST   /api/gateway/devices/<id>/rotate              new credentials once {"grace_s"}
    POST   /api/gateway/devices/<id>/revoke              revoke every credential and token
    POST   /api/gateway/devices/<id>/commands            enqueue {"payload","ttl_s","priority"}
    GET    /api/gateway/devices/<id>/commands            the device's commands, newest first
    POST   /api/gateway/devices/claim-codes              {"family","ttl_s","device_id"} -> 201

Every request needs `Authorization: Bearer <token>` where the token is the value of
the environment variable `http.admin_token_env` names. Errors use the core shape.
A device id that exists in several families needs `?family=`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Blueprint, Response, request

from .devices import ClaimError, DeviceExists, UnknownDevice
from .http import error_response, read_json_object, require_admin

if TYPE_CHECKING:
    from .devices import Device
    from .runtime import Gateway

__all__ = ["admin_blueprint"]

PREFIX = "/api/gateway/devices"


def admin_blueprint(gateway: Gateway) -> Blueprint:
    """The Blueprint; the runtime registers it on the main listener."""
    bp = Blueprint("gatewayd_devices_admin", __name__, url_prefix=PREFIX)
    services = gateway.devices
    registry = services.registry

    @bp.before_request
    async def _admin_only() -> Response | None:
        return require_admin(gateway)

    def describe(device: Device) -> dict[str, Any]:
        return {**device.as_json(), "online": services.presence.is_online(device.family, device.id)}

    async def body() -> dict[str, Any]:
        return await read_json_object()  # strict; BadJSON is the app's 400

    async def one(device_id: str) -> Device | Response:
        family = request.args.get("family")
        found = await registry.find(device_id, family)
        if not found:
            return error_response(404, f"no device {device_id!r}" + (f" in family {family!r}" if family else ""))
        if len(found) > 1:
            families = ", ".join(d.family for d in found)
            return error_response(409, f"device id {device_id!r} exists in several families ({families}); add ?family=")
        return found[0]

    @bp.get("")
    async def list_devices() -> Any:
        devices = await registry.list(request.args.get("family") or None, status=request.args.get("status") or None)
        return {"devices": [describe(d) for d in devices]}

    @bp.post("")
    async def create() -> Any:
        doc = await body()
        family = doc.get("family")
        if not isinstance(family, str) or not family:
            return error_response(400, "'family' is required")
        fields = {k: doc[k] for k in ("name", "model", "firmware", "metadata", "key", "signing_secret") if k in doc}
        if not all(isinstance(v, str) for k, v in fields.items() if k != "metadata"):
            return error_response(400, "name, model, firmware, key and signing_secret must be strings")
        if not isinstance(fields.get("metadata", {}), dict):
            return error_response(400, "'metadata' must be an object")
        try:
            device, creds = await registry.provision(family, doc.get("id") or None, **fields)
        except DeviceExists as e:
            return error_response(409, str(e))
        except ValueError as e:
            return error_response(400, str(e))
        return {"device": describe(device), "credentials": creds.as_json()}, 201

    @bp.post("/claim-codes")
    async def claim_code() -> Any:
        doc = await body()
        family, ttl = doc.get("family"), doc.get("ttl_s", gateway.config.devices.claim_code_ttl_s)
        if not isinstance(family, str) or not family:
            return error_response(400, "'family' is required")
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
            return error_response(400, "'ttl_s' must be a positive number")
        try:
            code = await registry.create_claim_code(family, ttl_s=float(ttl), device_id=doc.get("device_id"))
        except UnknownDevice as e:
            return error_response(404, str(e))
        return {"claim_code": code.as_json()}, 201

    @bp.get("/<device_id>")
    async def show(device_id: str) -> Any:
        device = await one(device_id)
        return device if isinstance(device, Response) else {"device": describe(device)}

    async def set_status(device_id: str, status: str) -> Any:
        device = await one(device_id)
        if isinstance(device, Response):
            return device
        return {"device": describe(await registry.set_status(device.family, device.id, status))}

    @bp.post("/<device_id>/disable")
    async def disable(device_id: str) -> Any:
        return await set_status(device_id, "disabled")

    @bp.post("/<device_id>/enable")
    async def enable(device_id: str) -> Any:
        return await set_status(device_id, "active")

    @bp.post("/<device_id>/rotate")
    async def rotate(device_id: str) -> Any:
        doc = await body()
        grace = doc.get("grace_s", 0)
        if not isinstance(grace, (int, float)) or isinstance(grace, bool) or grace < 0:
            return error_response(400, "'grace_s' must be a number >= 0")
        device = await one(device_id)
        if isinstance(device, Response):
            return device
        creds = await registry.rotate(device.family, device.id, grace_s=float(grace))
        return {"device": describe(device), "credentials": creds.as_json()}

    @bp.post("/<device_id>/revoke")
    async def revoke(device_id: str) -> Any:
        device = await one(device_id)
        if isinstance(device, Response):
            return device
        await registry.revoke(device.family, device.id)
        return {"device": describe(device), "revoked": True}

    @bp.post("/<device_id>/commands")
    async def enqueue(device_id: str) -> Any:
        doc = await body()
        if "payload" not in doc:
            return error_response(400, "'payload' is required")
        ttl, priority = doc.get("ttl_s"), doc.get("priority", 0)
        if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0):
            return error_response(400, "'ttl_s' must be a positive number")
        if not isinstance(priority, int) or isinstance(priority, bool):
            return error_response(400, "'priority' must be an integer")
        device = await one(device_id)
        if isinstance(device, Response):
            return device
        command = await services.commands.enqueue(device.family, device.id, doc["payload"], ttl_s=ttl, priority=priority)
        return {"command": command.as_json()}, 201

    @bp.get("/<device_id>/commands")
    async def commands(device_id: str) -> Any:
        device = await one(device_id)
        if isinstance(device, Response):
            return device
        items = await services.commands.list(device.family, device.id, status=request.args.get("status") or None)
        return {"commands": [c.as_json() for c in items]}

    @bp.errorhandler(ClaimError)
    async def _claim(e: ClaimError) -> Response:
        return error_response(409, str(e))

    return bp
