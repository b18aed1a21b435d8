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

Each route is declared (`http.declare`): bodies are read strictly and converted to
the Structs below, whose schemas are the OpenAPI document's; an unknown field is
refused, not ignored (a `grace` meant as `grace_s` would revoke the old key at once).
The registry and the command queue check each field again (the CLI has no
declarations) and raise ValueError naming the field (a 400 here); a full disk is 507
and another storage failure 503 (the app's handlers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from msgspec import UNSET, Meta, Struct, UnsetType
from quart import Blueprint, Response

from ...protocol.strict_json import BadJSON
from ..http.app import AdminGuard
from ..http.declare import ADMIN_TOKEN, Routes
from ..http.errors import error_response
from .commands import COMMAND_STATUSES, MAX_PAYLOAD
from .registry import MAX_LENGTHS, MAX_TTL_S, SECRET_LENGTH, STATUSES, ClaimError, DeviceExists, UnknownDevice

if TYPE_CHECKING:
    from .registry import Device
    from .services import DeviceServices

__all__ = ["admin_blueprint"]

PREFIX = "/api/gateway/devices"

# -- what the routes take and answer (their OpenAPI schemas) ---------------------------

Family = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$",
                             description="a plugin name: 1-64 lower-case letters, digits and _")]
DeviceId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$",
                               description="a device id: 1-128 of letters, digits and _ . : @ -, starting with a "
                                           "letter or digit")]
Secret = Annotated[str, Meta(min_length=SECRET_LENGTH[0], max_length=SECRET_LENGTH[1], pattern=r"^[!-~]+$",
                             description="printable ASCII without spaces")]
Seconds = Annotated[float, Meta(gt=0, le=MAX_TTL_S)]
Status = Annotated[str, Meta(pattern="^(" + "|".join(STATUSES) + ")$")]


class NewDevice(Struct, forbid_unknown_fields=True):
    """A device to register; `key` and `signing_secret` import credentials the firmware already has."""

    family: Family
    id: DeviceId | None = None
    name: Annotated[str, Meta(max_length=MAX_LENGTHS["name"])] = ""
    model: Annotated[str, Meta(max_length=MAX_LENGTHS["model"])] = ""
    firmware: Annotated[str, Meta(max_length=MAX_LENGTHS["firmware"])] = ""
    metadata: Annotated[dict[str, Any], Meta(description="at most 16,384 characters as JSON")] = {}
    key: Secret | None = None
    signing_secret: Secret | None = None


class NewClaimCode(Struct, forbid_unknown_fields=True):
    """A one-time code: for a registered device (`device_id`), or one that registers a new device."""

    family: Family
    device_id: DeviceId | None = None
    ttl_s: Seconds | UnsetType = UNSET


class Rotation(Struct, forbid_unknown_fields=True):
    grace_s: Annotated[float, Meta(ge=0, le=MAX_TTL_S, description="how long the old key keeps working")] = 0


class NewCommand(Struct, forbid_unknown_fields=True):
    payload: Annotated[Any, Meta(description=f"the command: any JSON value, at most {MAX_PAYLOAD} characters")]
    ttl_s: Seconds | None = None
    priority: Annotated[int, Meta(description="higher first")] = 0


class DeviceQuery(Struct, forbid_unknown_fields=True):
    family: Annotated[str, Meta(description="needed when the id exists in several families")] = ""


class ListQuery(Struct, forbid_unknown_fields=True):
    family: str = ""
    status: str = ""


class CommandsQuery(Struct, forbid_unknown_fields=True):
    family: str = ""
    status: Annotated[str, Meta(description="one of " + ", ".join(COMMAND_STATUSES))] = ""


class DeviceOut(Struct):
    family: str
    id: str
    name: str
    model: str
    firmware: str
    metadata: dict[str, Any]
    status: Status
    created_at: float
    first_seen: float | None
    last_seen: float | None
    online: bool


class CredentialsOut(Struct):
    """Shown once: the gateway keeps only hashes and encrypted copies."""

    family: str
    device_id: str
    key: str
    signing_secret: str
    mqtt_username: str


class CommandOut(Struct):
    id: str
    family: str
    device_id: str
    payload: Any
    priority: int
    status: str
    created_at: float
    expires_at: float | None
    delivered_at: float | None
    completed_at: float | None
    attempts: int
    result: Any


class ClaimCodeOut(Struct):
    code: str
    family: str
    device_id: str | None
    expires_at: float


class Devices(Struct):
    devices: list[DeviceOut]


class OneDevice(Struct):
    device: DeviceOut


class Provisioned(Struct):
    device: DeviceOut
    credentials: CredentialsOut


class Revoked(Struct):
    device: DeviceOut
    revoked: bool


class Commands(Struct):
    commands: list[CommandOut]


class OneCommand(Struct):
    command: CommandOut


class OneClaimCode(Struct):
    claim_code: ClaimCodeOut


STORAGE = {507: "the disk is full: nothing was stored", 503: "the database failed: nothing was stored"}
FOUND = {404: "no such device", 409: "the id exists in several families: add ?family="}


def admin_blueprint(services: DeviceServices, admin: AdminGuard, families: Callable[[], list[str]]) -> Blueprint:
    """The Blueprint; the runtime registers it on the main listener. `families()` names
    the enabled plugins: a device of no plugin could never talk to the gateway."""
    bp = Blueprint("gatewayd_devices_admin", __name__, url_prefix=PREFIX)
    routes = Routes(bp, tag="devices", auth=ADMIN_TOKEN)
    registry = services.registry
    claim_code_ttl_s = services.config.devices.claim_code_ttl_s

    @bp.before_request
    async def _admin_only() -> Response | None:
        return admin.check()

    def describe(device: Device) -> dict[str, Any]:
        return {**device.as_json(), "online": services.presence.is_online(device.family, device.id)}

    def enabled(family: str) -> str:
        """A device of no enabled plugin could never talk to the gateway."""
        known = families()
        if family not in known:
            raise BadJSON(f"family: no enabled plugin {family!r} (enabled: {', '.join(known) or 'none'})")
        return family

    async def one(device_id: str, family: str) -> Device | Response:
        found = await registry.find(device_id, family or None)
        if not found:
            return error_response(404, f"no device {device_id!r}" + (f" in family {family!r}" if family else ""))
        if len(found) > 1:
            families_ = ", ".join(d.family for d in found)
            return error_response(409, f"device id {device_id!r} exists in several families ({families_}); add ?family=")
        return found[0]

    @routes.get("", query=ListQuery, responses={200: Devices})
    async def list_devices(query: ListQuery) -> Any:
        """Every device (of a family, of a status), each with whether it is online."""
        devices = await registry.list(query.family or None, status=query.status or None)
        return {"devices": [describe(d) for d in devices]}

    @routes.post("", body=NewDevice, responses={201: Provisioned}, errors={409: "the device exists", **STORAGE})
    async def create(body: NewDevice) -> Any:
        """Register a device; its credentials are in this answer only."""
        family = enabled(body.family)
        fields = {k: getattr(body, k) for k in ("name", "model", "firmware", "metadata", "key", "signing_secret")}
        try:  # an id that is absent or null is made up
            device, creds = await registry.provision(family, body.id, **fields)
        except DeviceExists as e:
            return error_response(409, str(e))
        except ValueError as e:
            return error_response(400, str(e))
        return {"device": describe(device), "credentials": creds.as_json()}, 201

    @routes.post("/claim-codes", body=NewClaimCode, responses={201: OneClaimCode},
                 errors={404: "no such device", 409: "the device is already claimed", **STORAGE})
    async def claim_code(body: NewClaimCode) -> Any:
        """Make a one-time claim code (devices.md, Claim codes)."""
        family = enabled(body.family)
        ttl = claim_code_ttl_s if body.ttl_s is UNSET else body.ttl_s
        try:
            code = await registry.create_claim_code(family, ttl_s=ttl, device_id=body.device_id)
        except UnknownDevice as e:
            return error_response(404, str(e))
        except ValueError as e:
            return error_response(400, str(e))
        return {"claim_code": code.as_json()}, 201

    @routes.get("/<device_id>", query=DeviceQuery, responses={200: OneDevice}, errors=FOUND)
    async def show(device_id: str, query: DeviceQuery) -> Any:
        """One device."""
        device = await one(device_id, query.family)
        return device if isinstance(device, Response) else {"device": describe(device)}

    async def set_status(device_id: str, family: str, status: str) -> Any:
        device = await one(device_id, family)
        if isinstance(device, Response):
            return device
        return {"device": describe(await registry.set_status(device.family, device.id, status))}

    @routes.post("/<device_id>/disable", query=DeviceQuery, responses={200: OneDevice}, errors={**FOUND, **STORAGE})
    async def disable(device_id: str, query: DeviceQuery) -> Any:
        """Refuse the device (403) until it is enabled; its credentials stay."""
        return await set_status(device_id, query.family, "disabled")

    @routes.post("/<device_id>/enable", query=DeviceQuery, responses={200: OneDevice}, errors={**FOUND, **STORAGE})
    async def enable(device_id: str, query: DeviceQuery) -> Any:
        """Let a disabled device in again."""
        return await set_status(device_id, query.family, "active")

    @routes.post("/<device_id>/rotate", query=DeviceQuery, body=Rotation, responses={200: Provisioned},
                 errors={**FOUND, **STORAGE})
    async def rotate(device_id: str, query: DeviceQuery, body: Rotation) -> Any:
        """New credentials (in this answer only); the old ones end after `grace_s`."""
        device = await one(device_id, query.family)
        if isinstance(device, Response):
            return device
        try:
            creds = await registry.rotate(device.family, device.id, grace_s=body.grace_s)
        except ValueError as e:
            return error_response(400, str(e))
        return {"device": describe(device), "credentials": creds.as_json()}

    @routes.post("/<device_id>/revoke", query=DeviceQuery, responses={200: Revoked}, errors={**FOUND, **STORAGE})
    async def revoke(device_id: str, query: DeviceQuery) -> Any:
        """End every credential and token of the device at once."""
        device = await one(device_id, query.family)
        if isinstance(device, Response):
            return device
        await registry.revoke(device.family, device.id)
        return {"device": describe(device), "revoked": True}

    @routes.post("/<device_id>/commands", query=DeviceQuery, body=NewCommand, responses={201: OneCommand},
                 errors={**FOUND, **STORAGE})
    async def enqueue(device_id: str, query: DeviceQuery, body: NewCommand) -> Any:
        """Queue a command for the device (devices.md, Commands)."""
        device = await one(device_id, query.family)
        if isinstance(device, Response):
            return device
        try:
            command = await services.commands.enqueue(device.family, device.id, body.payload, ttl_s=body.ttl_s,
                                                      priority=body.priority)
        except ValueError as e:
            return error_response(400, str(e))
        return {"command": command.as_json()}, 201

    @routes.get("/<device_id>/commands", query=CommandsQuery, responses={200: Commands}, errors=FOUND)
    async def commands(device_id: str, query: CommandsQuery) -> Any:
        """The device's commands, newest first."""
        device = await one(device_id, query.family)
        if isinstance(device, Response):
            return device
        items = await services.commands.list(device.family, device.id, status=query.status or None)
        return {"commands": [c.as_json() for c in items]}

    @bp.errorhandler(ClaimError)
    async def _claim(e: ClaimError) -> Response:
        return error_response(409, str(e))

    return bp
