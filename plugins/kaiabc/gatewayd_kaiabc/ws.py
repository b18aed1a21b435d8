"""The spec's WebSocket at `/<mount>/v1/ws`, on the gateway's live hub.

A client subscribes by message, `{"action": "subscribe", "streams":
["oscillator.state.pico_001", "sensors.temperature.pico_001", "output.koa.pico_001"]}`
(and `"unsubscribe"`), and receives the spec's events one per frame: `oscillator.state`,
`sensors.reading`, `output.pwm`, `alert`, `phase_shift.complete`. States and PWM duties
come from the hub as a few columnar batches per tick (`live.batches`: 10,000 per-node hub
events a second would cost more than the oscillators, and overflow every subscriber's
queue); `frames` turns a batch into the spec's frames of the nodes this client watches. A person (the admin
token, or any role's token) may watch every node, `*` for all; a node (its `X-API-Key`) only itself. At most
5 connections per client (the hub's `live.per_token`, the spec's limit): the sixth is
closed with 4429.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from msgspec import Struct
from quart import websocket

from gatewayd.plugins.api import AuthError, Gap, LiveDenied, LiveLimit, Subscription

from .live import BATCHED, stream_name

if TYPE_CHECKING:
    from gatewayd.plugins.api import Routes

    from .routes import Api

# The spec's stream names (`<what>.<node>`) -> the hub's kind (`kaiabc.<kind>.<node>`).
STREAMS = {"oscillator.state": "oscillator_state", "sensors.temperature": "sensors_reading",
           "sensors.reading": "sensors_reading", "output.koa": "output_pwm", "output.pwm": "output_pwm",
           "alert": "alert", "phase_shift.complete": "phase_shift_complete", "phase_shift": "phase_shift_complete"}
MAX_PATTERNS = 64


_encode = msgspec.json.Encoder().encode


def frame(event: Any) -> str:
    """One event as the text frame the socket sends (msgspec: 7x cheaper than json.dumps, which
    counts at 10,000 state events a second; the hub checked the event is JSON when published)."""
    return _encode(event).decode()


def frames(kind: str, batch: dict[str, Any], watched: set[str]) -> list[str]:
    """The spec's frame (`oscillator.state` or `output.pwm`, by the hub's `kind`) of each node of a
    batch that `watched` names (node ids as the hub writes them, `.` as `_`; `*` for every node)."""
    every = "*" in watched
    ts, ids = batch["timestamp"], batch["node_id"]
    chosen = [i for i, node_id in enumerate(ids) if every or stream_name(node_id) in watched]
    if kind == "oscillator_state":
        ct, ph, koa, c_st, a_free = (batch[k] for k in ("circadian_time", "phase", "koa_metric", "C_ST", "A_free"))
        return [frame({"event": "oscillator.state", "node_id": ids[i], "timestamp": ts, "data": {
            "circadian_time": ct[i], "phase": ph[i], "state_variables": {"C_ST": c_st[i], "A_free": a_free[i]},
            "koa_metric": koa[i]}}) for i in chosen]
    duty, koa, forced = batch["duty_cycle"], batch["koa_source"], batch["manual_override"]
    return [frame({"event": "output.pwm", "node_id": ids[i], "timestamp": ts, "data": {
        "duty_cycle": duty[i], "duty_cycle_percent": round(100 * duty[i] / 255, 1), "koa_source": koa[i],
        "manual_override": forced[i]}}) for i in chosen]


class SocketQuery(Struct, forbid_unknown_fields=True):
    token: str | None = None
    """A role token or a core scoped token (the spec's `?token=`), only with `ws_query_token = true`."""


class Socket:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.ctx = api.ctx

    def register(self, r: Routes) -> None:
        r.websocket("/v1/ws", query=SocketQuery, responses={101: None})(self.ws)

    async def ws(self, query: SocketQuery) -> None:
        """The spec's event streams; subscribe by message. Refusals close the socket after the
        handshake: 4401 (credentials), 4403 (a core token not scoped for kaiabc), 4429 (more than
        5 connections)."""
        if not await self.ctx.state.wait_started():  # a node's key is checked against the loaded nodes
            await websocket.accept()
            await websocket.close(1013, "the plugin is still resuming its oscillators")
            return
        owner, node, (code, why) = await self._who(query)
        await websocket.accept()
        if owner is None:
            await websocket.close(code, why[:120])
            return
        try:
            sub = self.ctx.live.subscribe([], owner=owner)
        except LiveLimit as e:
            await websocket.close(4429, str(e)[:120])
            return
        self.api.sockets += 1
        try:
            with sub:
                async with trio.open_nursery() as nursery:
                    watched: dict[str, set[str]] = {kind: set() for kind in BATCHED}  # nodes watched, per kind
                    nursery.start_soon(self._commands, sub, node, watched)
                    await self._events(sub, watched)
                    nursery.cancel_scope.cancel()
        finally:
            self.api.sockets -= 1
        await websocket.close(1001, "the gateway is shutting down")

    async def _who(self, query: SocketQuery) -> tuple[str | None, str | None, tuple[int, str]]:
        """(owner, the node it is limited to or None for a person, (close code, why) when refused);
        owner None: refused.

        Credentials go in the handshake's headers: a node's `X-API-Key`, or `Authorization:
        Bearer` with a role token, the admin token or a core token scoped `live:kaiabc`.
        `?token=` (the spec's way) only when the operator enabled `ws_query_token`, and then
        never the admin token nor a node's key (README, "WebSocket")."""
        headers = websocket.headers
        if headers.get("X-API-Key"):
            try:
                device = await self.ctx.auth.api_key(headers, websocket.remote_addr)
            except AuthError:
                return None, None, (4401, "wrong X-API-Key")
            return f"node:{device.id}", device.id, (0, "")
        if query.token is not None and not self.ctx.config.ws_query_token:
            self.ctx.state.refused.inc(code="QUERY_TOKEN")
            return None, None, (4401, "a token in the URL is refused here (plugins.kaiabc.ws_query_token is "
                                      "off): send it as Authorization: Bearer")
        scheme, _, value = headers.get("Authorization", "").partition(" ")
        bearer = value.strip() if scheme.lower() == "bearer" else ""
        found = self.ctx.state.tokens.role_of(bearer or query.token or "", self.ctx.now())
        if found is not None:
            return f"person:{found[0]}", None, (0, "")
        try:  # the admin token (header only), a core token scoped live:kaiabc, the dashboard's session
            owner = await self.ctx.live.authorize(headers, {"token": query.token} if query.token else {})  # type: ignore[arg-type]
        except LiveDenied as e:
            return None, None, (4000 + e.status, e.reason)
        return f"person:{owner}", None, (0, "")

    async def _events(self, sub: Subscription, watched: dict[str, set[str]]) -> None:
        batched = {f"{self.ctx.name}.{hub_kind}": kind for kind, hub_kind in BATCHED.items()}
        while True:
            with trio.move_on_after(15) as idle:
                batch = await sub.next()
            if idle.cancelled_caught:
                await websocket.send(json.dumps({"event": "heartbeat", "timestamp": self.ctx.now()}))
                continue
            if not batch:
                return
            for item in batch:
                if isinstance(item, Gap):
                    await websocket.send(json.dumps({"event": "gap", "dropped": item.dropped}))
                elif (kind := batched.get(item.stream.rsplit(".", 1)[0])) is not None:
                    for text in frames(kind, item.data, watched[kind]):
                        await websocket.send(text)
                else:
                    await websocket.send(frame(item.data))

    async def _commands(self, sub: Subscription, node: str | None, watched: dict[str, set[str]]) -> None:
        family = self.ctx.name
        while True:
            raw = await websocket.receive()
            try:
                doc = json.loads(raw)
                if not isinstance(doc, dict) or doc.get("action") not in ("subscribe", "unsubscribe"):
                    raise ValueError('expected {"action": "subscribe" | "unsubscribe", "streams": [...]}')
                streams = doc.get("streams")
                if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
                    raise ValueError("streams: expected a list of strings like oscillator.state.pico_001")
                patterns = [self._pattern(s, node) for s in streams]
                asked = {kind: {p.rsplit(".", 1)[1] for p in patterns if p.startswith(f"{family}.{kind}.")}
                         for kind in BATCHED}
                others = [p for p in patterns if p.split(".")[1] not in BATCHED]
                if doc["action"] == "subscribe":
                    count = len(sub.patterns | set(others)) + sum(len(watched[k] | asked[k]) for k in BATCHED)
                    if count > MAX_PATTERNS:
                        raise ValueError(f"at most {MAX_PATTERNS} streams")
                    for kind in BATCHED:
                        watched[kind] |= asked[kind]
                else:
                    for kind in BATCHED:
                        watched[kind] -= asked[kind]
                    sub.remove(others + [f"{family}.{BATCHED[k]}.*" for k in BATCHED if not watched[k]])
                sub.add((others if doc["action"] == "subscribe" else [])
                        + [f"{family}.{BATCHED[k]}.*" for k in BATCHED if watched[k]])
                reply: dict[str, Any] = {"action": f"{doc['action']}d", "streams": streams}
            except (ValueError, PermissionError, RecursionError) as e:
                reply = {"event": "error", "error": {"code": "PERMISSION_DENIED" if isinstance(e, PermissionError)
                                                     else "INVALID_PARAMETER", "message": str(e)[:200]}}
            await websocket.send(json.dumps(reply))

    def _pattern(self, stream: str, node: str | None) -> str:
        """A spec stream name as the hub's pattern (with the family), checked against who asks."""
        for name in sorted(STREAMS, key=len, reverse=True):
            if stream.startswith(name + "."):
                target = stream[len(name) + 1:]
                break
        else:
            raise ValueError(f"unknown stream {stream[:64]!r}; streams are {sorted(STREAMS)} followed by "
                             ".<node_id> or .*")
        if not target or "." in target or ("*" in target and target != "*") or "#" in target:
            raise ValueError(f"stream {stream[:64]!r}: expected one node id or * after the name")
        if node is not None and target != stream_name(node):
            raise PermissionError(f"a node may watch only its own streams ({name}.{node})")
        return f"{self.ctx.name}.{STREAMS[name]}.{target}"
