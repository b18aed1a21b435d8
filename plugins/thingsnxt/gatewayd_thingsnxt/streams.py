"""The family's live streams, on the core's hub (`ctx.live`), in the shapes an app of the
specification's platform reads: one JSON object per message, its `type` first.

    GET /thingsnxt/sse                    Server-Sent Events, every device   (`data: {...}`)
    GET /thingsnxt/sse/<device_id>        one device's, its state first
    WS  /thingsnxt/ws                     WebSocket, every device            (one object a frame)
    WS  /thingsnxt/ws/<device_id>         one device's, its state first

Messages: `{"type": "state", "device_id", "data", "timestamp"}` (a device's whole state,
first, so a late subscriber shows the current values at once), then
`{"type": "telemetry_update", "device_id", "timestamp", "data", "source"}` for each
reading or app change, `{"type": "status_update", "status": "online" | "offline"}` when a
device comes and goes. Who may watch is the core's rule (`ctx.live.authorize`): the
admin token, a token scoped `live:<name>` (header, or `?token=` for browsers), a
dashboard session; at most `live.per_token` connections each.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import trio
from quart import Blueprint, Response, request, websocket

from gatewayd.plugins.api import (
    AuthScheme,
    Chunk,
    Gap,
    LiveDenied,
    LiveEvent,
    LiveLimit,
    Meta,
    PluginContext,
    Raw,
    Routes,
    Struct,
    Subscription,
    TextFrames,
    send_frames,
    stream_writer,
)

from .errors import Detail, detail
from .routes import PATH
from .telemetry import latest_answer

if TYPE_CHECKING:
    from .config import ThingsnxtConfig
    from .service import Thingsnxt

HEARTBEAT_S = 15.0
T = TypeVar("T")

WATCHERS = AuthScheme(
    {"liveToken": {"type": "http", "scheme": "bearer",
                   "description": "The admin token, or a token from gatewayd tokens add --scope live:<name>."},
     "liveTokenQuery": {"type": "apiKey", "in": "query", "name": "token",
                        "description": "A scoped token in the URL (EventSource, WebSocket); never the admin token."}},
    {401: "missing, expired or wrong token", 403: "this token may not watch this family's streams"}, either=True)


class StreamQuery(Struct, forbid_unknown_fields=True):
    token: Annotated[str, Meta(max_length=256, description="a scoped token, for clients that cannot set headers")] = ""


Ctx = PluginContext["ThingsnxtConfig", "Thingsnxt"]


class Streams:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.encoded = _Encoded()

    def register(self, bp: Blueprint) -> None:
        routes = Routes(bp, error=Detail, tag=self.ctx.name, auth=WATCHERS)
        sse = {"query": StreamQuery, "responses": {200: Raw("text/event-stream", "the messages, as they happen")},
               "errors": {429: "too many connections: retry later"}}
        routes.get("/sse", **sse)(self.sse_all)  # type: ignore[arg-type]
        routes.get("/sse/<device_id>", path=PATH, **sse)(self.sse_device)  # type: ignore[arg-type]
        routes.websocket("/ws", query=StreamQuery, responses={101: None})(self.ws_all)
        routes.websocket("/ws/<device_id>", path=PATH, query=StreamQuery, responses={101: None})(self.ws_device)

    # -- Server-Sent Events ------------------------------------------------------------------

    async def sse_all(self, query: StreamQuery) -> Any:
        """Every device's telemetry as Server-Sent Events."""
        return await self._sse(None)

    async def sse_device(self, device_id: str, query: StreamQuery) -> Any:
        """One device's telemetry as Server-Sent Events, its current state first."""
        return await self._sse(device_id)

    async def _sse(self, device_id: str | None) -> Any:
        try:
            owner = await self.ctx.live.authorize(request.headers, request.args)  # type: ignore[arg-type]
            sub = self.ctx.live.subscribe([_stream(device_id)], owner=owner)
        except LiveDenied as e:
            return detail(e.reason), e.status
        except LiveLimit as e:
            return detail(str(e)), 429, {"Retry-After": "5"}
        first = await self._first(device_id)
        writer = stream_writer()

        async def events() -> AsyncIterator[bytes]:
            with sub:
                for message in first:
                    yield f"data: {json.dumps(message)}\n\n".encode()
                async for chunk in _batches(sub, self.sse_chunk):
                    # A batch is one write, encoded once for every subscriber of the same stream,
                    # straight to the connection where it can be (quart sent the headers before).
                    if chunk is None:
                        yield b": heartbeat\n\n"
                    elif writer is None or not await writer.write(chunk):
                        yield chunk.data

        response = Response(events(), content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    # -- WebSocket ---------------------------------------------------------------------------

    async def ws_all(self, query: StreamQuery) -> None:
        """Every device's telemetry over a WebSocket, one JSON object a frame (refusals: close 4401/4403/4429)."""
        await self._ws(None)

    async def ws_device(self, device_id: str, query: StreamQuery) -> None:
        """One device's telemetry over a WebSocket, its current state first."""
        await self._ws(device_id)

    async def _ws(self, device_id: str | None) -> None:
        try:
            owner = await self.ctx.live.authorize(websocket.headers, websocket.args)  # type: ignore[arg-type]
            sub = self.ctx.live.subscribe([_stream(device_id)], owner=owner)
        except LiveDenied as e:
            await websocket.accept()
            await websocket.close(4000 + e.status, e.reason[:120])
            return
        except LiveLimit as e:
            await websocket.accept()
            await websocket.close(4429, str(e)[:120])
            return
        await websocket.accept()
        with sub:
            for message in await self._first(device_id):
                await websocket.send(json.dumps(message))
            async for frames in _batches(sub, self.ws_frames):
                if frames is None:
                    await websocket.send(json.dumps({"type": "heartbeat"}))
                else:  # one object a frame (the family's shape), a batch's frames in one write
                    await send_frames(frames)
        await websocket.close(1001, "the gateway is shutting down")

    def _texts(self, batch: list[LiveEvent | Gap]) -> list[tuple[int, str]]:
        """(event id, message JSON) for each item; a gap (a client too slow to keep up) is
        `{"type": "gap", "missed": n}`, id 0."""
        return [(0, json.dumps({"type": "gap", "missed": item.dropped})) if isinstance(item, Gap)
                else (item.id, self.encoded(item)) for item in batch]

    def sse_chunk(self, batch: list[LiveEvent | Gap]) -> Chunk:
        return Chunk("".join(f"id: {id}\ndata: {text}\n\n" for id, text in self._texts(batch)).encode())

    def ws_frames(self, batch: list[LiveEvent | Gap]) -> TextFrames:
        return TextFrames([text for _, text in self._texts(batch)])

    async def _first(self, device_id: str | None) -> list[dict[str, Any]]:
        """A device's stream opens with its whole state (the widgets' values)."""
        if device_id is None or await self.ctx.devices.get(device_id, max_age_s=2.0) is None:
            return []
        return [{"type": "state", **latest_answer(device_id, await self.ctx.state.state(device_id))}]


def _stream(device_id: str | None) -> str:
    """The pattern of one device's stream, or every device's (the hub writes an id's dots as _)."""
    return "telemetry." + (device_id.replace(".", "_") if device_id else "*")


async def _batches(sub: Subscription, encode: Callable[[list[LiveEvent | Gap]], T]) -> AsyncIterator[T | None]:
    """The subscription's events, a batch (what arrived since the last) at a time, as `encode`
    makes it, once for every subscriber of the same stream (the hub's `next_encoded`: pass the
    same function each time); None for a heartbeat; ends when the hub closes."""
    while True:
        with trio.move_on_after(HEARTBEAT_S) as idle:
            encoded = await sub.next_encoded(encode)
        if idle.cancelled_caught:
            yield None
            continue
        if encoded is None:
            return
        yield encoded


class _Encoded:
    """Events' data as JSON, encoded once however many subscribers send it (the newest 1024)."""

    def __init__(self) -> None:
        self._texts: OrderedDict[int, str] = OrderedDict()

    def __call__(self, event: LiveEvent) -> str:
        text = self._texts.get(event.id)
        if text is None:
            text = self._texts[event.id] = json.dumps(event.data, separators=(",", ":"))
            if len(self._texts) > 1024:
                self._texts.popitem(last=False)
        return text
