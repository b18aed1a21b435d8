"""A test device family ("meter") that uses ctx.auth, ctx.ratelimit, ctx.devices and
ctx.commands the way the family plugins do, through the real HTTP app."""

from __future__ import annotations

from quart import Blueprint, request

from gatewayd.core.devices.auth import AuthError
from gatewayd.plugins.api import PluginContext, hookimpl

PLUGIN_NAME = "meter"


def family_error(e: AuthError):
    headers = {"Retry-After": str(int(e.retry_after_s))} if e.retry_after_s else {}
    return {"ok": False, "reason": e.reason}, e.status, headers


@hookimpl
async def gatewayd_startup(ctx: PluginContext):
    ctx.ratelimit.define("ingest", 5, 60)
    ctx.devices.set_offline_after(120)


@hookimpl
def gatewayd_http_routes(ctx: PluginContext):
    bp = Blueprint("meter", __name__)

    @bp.post("/ingest")
    async def ingest():
        try:
            device = await ctx.auth.api_key(request.headers, request.remote_addr)
        except AuthError as e:
            return family_error(e)
        decision = ctx.ratelimit.check(device.id, "ingest")
        headers = ctx.ratelimit.headers(decision)
        if not decision.allowed:
            return {"ok": False, "reason": "rate limited"}, 429, headers
        return {"ok": True, "device": device.id}, 200, headers

    @bp.post("/signed/<device_id>")
    async def signed(device_id: str):
        body = await request.get_data()
        try:
            device = await ctx.auth.signature(request.headers, body, request.remote_addr, device_id=device_id,
                                              timestamp_header="X-Timestamp")
        except AuthError as e:
            return family_error(e)
        return {"ok": True, "device": device.id}

    @bp.post("/configure/<device_id>")
    async def configure(device_id: str):
        try:
            device = await ctx.auth.device_key(request.headers, request.remote_addr)
        except AuthError as e:
            return family_error(e)
        token = ctx.auth.issue_jwt(device)
        return {"token": token.token, "expires_at": token.expires_at}

    @bp.post("/status/<device_id>")
    async def status(device_id: str):
        try:
            device = await ctx.auth.bearer_jwt(request.headers, request.remote_addr, device_id=device_id)
        except AuthError as e:
            return family_error(e)
        return {"ok": True, "token": ctx.auth.issue_jwt(device).token}

    @bp.get("/commands")
    async def poll():
        try:
            device = await ctx.auth.body_token(request.remote_addr, query=request.args)
        except AuthError as e:
            return family_error(e)
        return {"commands": [c.as_json() for c in await ctx.commands.next_for(device.id, limit=10)]}

    @bp.post("/commands/<command_id>/ack")
    async def ack(command_id: str):
        doc = await request.get_json(force=True)
        try:
            device = await ctx.auth.body_token(request.remote_addr, json=doc)
        except AuthError as e:
            return family_error(e)
        command = await ctx.commands.ack(command_id, bool(doc.get("ok")), doc.get("result"), device_id=device.id)
        if command is None:
            return {"ok": False, "reason": "unknown command"}, 404
        return {"ok": True, "status": command.status}

    return bp
