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

Bodies are read strictly (`read_json_object`); an unknown field is refused, not
ignored (a `grace` meant as `grace_s` would revoke the old key at once). The
registry and the command queue check each field's type, range and length and raise
ValueError naming the field (a 400 here); a full disk is 507 and another storage
failure 503 (the app's handlers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from quart import Blueprint, Response, request

from ...protocol.strict_json import BadJSON
from ..http.app import AdminGuard
from ..http.body import read_json_object
from ..http.errors import error_response
from .registry import ClaimError, DeviceExists, UnknownDevice

if TYPE_CHECKING:
    from .registry import Device
    from .services import DeviceServices

__all__ = ["admin_blueprint"]

PREFIX = "/api/gateway/devices"


def admin_blueprint(services: DeviceServices, admin: AdminGuard, families: Callable[[], list[str]]) -> Blueprint:
    """The Blueprint; the runtime registers it on the main listener. `families()` names
    the enabled plugins: a device of no plugin could never talk to the gateway."""
    bp = Blueprint("gatewayd_devices_admin", __name__, url_prefix=PREFIX)
    registry = services.registry
    claim_code_ttl_s = services.config.devices.claim_code_ttl_s

    @bp.before_request
    async def _admin_only() -> Response | None:
        return admin.check()

    def describe(device: Device) -> dict[str, Any]:
        return {**device.as_json(), "online": services.presence.is_online(device.family, device.id)}

    async def body(*fields: str) -> dict[str, Any]:
        """The request's JSON object with only `fields` in it (BadJSON otherwise)."""
        doc = await read_json_object()
        unknown = sorted(set(doc) - set(fields))
        if unknown:
            raise BadJSON(f"{unknown[0][:40]!r}: unknown field (expected {', '.join(fields) or 'no body'})")
        return doc

    def family_of(doc: dict[str, Any]) -> str:
        """The body's family: one of an enabled plugin (a device of no plugin can't talk)."""
        family, known = doc.get("family"), families()
        if family is None:
            raise BadJSON("family: required (the plugin name of the device family)")
        if family not in known:
            shown = repr(family) if isinstance(family, str) and len(family) <= 64 else f"{repr(family)[:40]}..."
            raise BadJSON(f"family: no enabled plugin {shown} (enabled: {', '.join(known) or 'none'})")
        return family

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
        doc = await body("family", "id", "name", "model", "firmware", "metadata", "key", "signing_secret")
        family = family_of(doc)
        fields = {k: doc[k] for k in ("name", "model", "firmware", "metadata", "key", "signing_secret") if k in doc}
        try:  # an id that is absent or null is made up
            device, creds = await registry.provision(family, doc.get("id"), **fields)
        except DeviceExists as e:
            return error_response(409, str(e))
        except ValueError as e:
            return error_response(400, str(e))
        return {"device": describe(device), "credentials": creds.as_json()}, 201

    @bp.post("/claim-codes")
    async def claim_code() -> Any:
        doc = await body("family", "device_id", "ttl_s")
        family = family_of(doc)
        ttl = doc.get("ttl_s", claim_code_ttl_s)
        try:
            code = await registry.create_claim_code(family, ttl_s=ttl, device_id=doc.get("device_id"))
        except UnknownDevice as e:
            return error_response(404, str(e))
        except ValueError as e:
            return error_response(400, str(e))
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
        doc = await body("grace_s")
        device = await one(device_id)
        if isinstance(device, Response):
            return device
        try:
            creds = await registry.rotate(device.family, device.id, grace_s=doc.get("grace_s", 0))
        except ValueError as e:
            return error_response(400, str(e))
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
        doc = await body("payload", "ttl_s", "priority")
        if "payload" not in doc:
            raise BadJSON("payload: required (the command, any JSON value)")
        device = await one(device_id)
        if isinstance(device, Response):
            return device
        try:
            command = await services.commands.enqueue(
                device.family, device.id, doc["payload"], ttl_s=doc.get("ttl_s"), priority=doc.get("priority", 0)
            )
        except ValueError as e:
            return error_response(400, str(e))
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
