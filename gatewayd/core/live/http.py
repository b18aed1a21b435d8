"""Live streams over WebSocket and Server-Sent Events, from the main listener.

    WS   /api/gateway/live?streams=paku.#              send {"subscribe": [...]} / {"unsubscribe": [...]}
    GET  /api/gateway/live/events?streams=a.*,b.#      text/event-stream; Last-Event-ID resumes

Each event is `{"id", "stream", "ts", "data"}` (SSE: `id:`, `event: <stream>`, `data:`);
a subscriber that fell behind first gets `{"gap": n}` (SSE: `event: gap`). Heartbeats
every `live.heartbeat_s` (WebSocket: `{"heartbeat": <ts>}`; SSE: a comment line).

A WebSocket message is either a JSON array of the events (and gaps) that were ready
together, in order, or a JSON object: an answer (`{"ok"}`, `{"error"}`) or a heartbeat.
One message per event would cost a frame and a scheduler round trip per subscriber per
event; an array costs one per wake-up, and subscribers of the same patterns send the same
array, encoded once (the hub's `next_encoded`; bench/live_bench.py).

Who may watch: live/access.py (the admin token, a scoped read-only token, the dashboard's
session). At most `live.per_token` connections per token or session (5, as the kaiabc
spec says), `live.max_subscribers` in all.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

import trio
from msgspec import Meta, Struct
from quart import Blueprint, Response, request, websocket

from ..http.declare import ADMIN_TOKEN, AuthScheme, Raw, Routes
from ..http.errors import error_response
from .access import Authorizer, LiveAccess, LiveDenied
from .frames import Chunk, StreamWriter, TextFrames, direct_frames, send_frames, stream_writer
from .hub import Gap, LiveEvent, LiveHub, LiveLimit, Subscription, validate_pattern

__all__ = ["live_blueprint"]


Streams = Annotated[str, Meta(description="stream patterns, comma-separated: <family>.<kind>.<device>, "
                                          "* one part, # the rest (paku.#, thingsnxt.telemetry.*)")]
ScopedToken = Annotated[str, Meta(description="a scoped token (gatewayd tokens add), for clients that cannot "
                                              "set headers; never the admin token")]

WATCHERS = AuthScheme(
    {**ADMIN_TOKEN.security_schemes,
     "scopedToken": {"type": "http", "scheme": "bearer",
                     "description": "A read-only token from gatewayd tokens add --scope live:<family>."},
     "scopedTokenQuery": {"type": "apiKey", "in": "query", "name": "token",
                          "description": "The same scoped token in the URL (EventSource, WebSocket)."}},
    {401: "missing, expired or wrong token (or the admin token in the URL)"}, core_shaped=True, either=True)


class EventsQuery(Struct, forbid_unknown_fields=True):
    streams: Streams = ""
    last_id: Annotated[str, Meta(description="resume after this event id (as Last-Event-ID)")] = ""
    token: ScopedToken = ""


class SocketQuery(Struct, forbid_unknown_fields=True):
    streams: Streams = ""
    token: ScopedToken = ""


def live_blueprint(hub: LiveHub, access: LiveAccess, *, heartbeat_s: float = 15.0) -> Blueprint:
    bp = Blueprint("gatewayd_live", __name__)
    routes = Routes(bp, tag="live", auth=WATCHERS)

    async def grant(headers: Mapping[str, str], args: Mapping[str, str]) -> tuple[str, Authorizer] | str:
        """(owner, may-watch) for the credentials given, or why not."""
        try:
            return await access.grant(headers, args)
        except LiveDenied as e:
            return e.reason

    def patterns_from(text: str, may: Authorizer) -> list[str]:
        """Validated, allowed patterns (ValueError/PermissionError naming the bad one)."""
        patterns = [p.strip() for p in text.split(",") if p.strip()]
        if len(patterns) > 32:
            raise ValueError("streams: at most 32 patterns")
        for pattern in patterns:
            validate_pattern(pattern)
            if not may(pattern):
                raise PermissionError(f"streams: this token may not watch {pattern!r}")
        return patterns

    @routes.get("/api/gateway/live/events", query=EventsQuery,
                responses={200: Raw("text/event-stream", "the events, as they happen (docs/live.md)")},
                errors={403: "this token may not watch one of the streams",
                        429: "too many connections (for this token, or in all): retry later"})
    async def sse(query: EventsQuery) -> Any:
        """Watch live streams as Server-Sent Events; Last-Event-ID resumes."""
        credentials = await grant(request.headers, request.args)
        if isinstance(credentials, str):
            return error_response(401, credentials)
        owner, may = credentials
        try:
            patterns = patterns_from(query.streams, may)
            resume = request.headers.get("Last-Event-ID") or query.last_id
            last_id = _event_id(resume) if resume else None
            sub = hub.subscribe(patterns, owner=owner, last_id=last_id)
        except PermissionError as e:
            return error_response(403, str(e))
        except ValueError as e:
            return error_response(400, str(e))
        except LiveLimit as e:
            return error_response(429, str(e), **{"Retry-After": "5"})
        response = Response(_sse_stream(sub, heartbeat_s, stream_writer()), content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"  # a proxy in front must not hold it back
        response.timeout = None  # a stream lasts as long as the client watches
        return response

    @routes.websocket("/api/gateway/live", query=SocketQuery, responses={101: None},
                      errors={400: "not a WebSocket handshake"})
    async def ws(query: SocketQuery) -> None:
        """Watch live streams over a WebSocket; send {"subscribe": [...]} / {"unsubscribe": [...]}.

        A refusal closes the socket after the handshake: 4401 (credentials), 4400 (a bad pattern),
        4429 (too many connections)."""
        credentials = await grant(websocket.headers, websocket.args)
        await websocket.accept()
        if isinstance(credentials, str):
            await websocket.close(4401, credentials[:120])
            return
        owner, may = credentials
        try:
            sub = hub.subscribe(patterns_from(query.streams, may), owner=owner)
        except (ValueError, PermissionError) as e:
            await websocket.close(4400, str(e)[:120])
            return
        except LiveLimit as e:
            await websocket.close(4429, str(e)[:120])
            return
        with sub:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_ws_commands, sub, may)
                await _ws_events(sub, heartbeat_s)
                nursery.cancel_scope.cancel()
        await websocket.close(1001, "the gateway is shutting down")

    return bp


def _event_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"Last-Event-ID: expected an event id, got {text[:32]!r}") from None
    if not 0 <= value < 2**63:
        raise ValueError(f"Last-Event-ID: expected an event id, got {text[:32]!r}")
    return value


def _sse_chunk(batch: list[LiveEvent | Gap]) -> Chunk:
    """A batch as one SSE write (encoded once for every subscriber that reads the same batch)."""
    return Chunk("".join(f"event: gap\ndata: {item.json()}\n\n" if isinstance(item, Gap) else
                         f"id: {item.id}\nevent: {item.stream}\ndata: {item.json()}\n\n" for item in batch).encode())


def _ws_frame(batch: list[LiveEvent | Gap]) -> TextFrames:
    """A batch as one WebSocket message, a JSON array (its frame built once, as _sse_chunk)."""
    return TextFrames(["[" + ",".join(item.json() for item in batch) + "]"])


async def _sse_stream(sub: Subscription, heartbeat_s: float, writer: StreamWriter | None) -> AsyncIterator[bytes]:
    with sub:
        yield b"retry: 2000\n\n"
        direct = writer.direct() if writer is not None else None
        beat = _Heartbeat(sub, heartbeat_s)
        while True:
            with trio.move_on_at(beat.due) as idle:
                chunk = await sub.next_encoded(_sse_chunk, direct=direct)
            if idle.cancelled_caught:
                if beat.idle():
                    yield b": heartbeat\n\n"
                continue
            beat.sent()
            if chunk is None:
                return  # closed: the gateway is shutting down
            if writer is None or not await writer.write(chunk):  # straight to the connection
                yield chunk.data


async def _ws_events(sub: Subscription, heartbeat_s: float) -> None:
    # One frame per batch: the hub cuts a channel's events at most once per live.batch_ms, so
    # under load what arrives meanwhile goes out together, and every subscriber of the same
    # patterns sends the same frame, encoded once (a frame per event per subscriber took the
    # CPU ingest needs: bench/live_bench.py). Latency: at most batch_ms more. With many
    # subscribers the hub writes the frames itself (`direct`), and this task sleeps on.
    direct = direct_frames()
    beat = _Heartbeat(sub, heartbeat_s)
    while True:
        with trio.move_on_at(beat.due) as idle:
            frame = await sub.next_encoded(_ws_frame, direct=direct)
        if idle.cancelled_caught:
            if beat.idle():
                await websocket.send(json.dumps({"heartbeat": sub.hub.clock()}))
            continue
        beat.sent()
        if frame is None:
            return
        await send_frames(frame)  # the shared frame's bytes, in one write


class _Heartbeat:
    """When a connection is due a heartbeat: `heartbeat_s` after the last batch sent on it, by
    its own task or by the hub (`Subscription.written_at`): a connection the hub writes to gets
    none, and its task, asleep meanwhile, one deadline per `heartbeat_s`, not a timer a batch."""

    def __init__(self, sub: Subscription, heartbeat_s: float) -> None:
        self.sub, self.every = sub, heartbeat_s
        self.due = trio.current_time() + heartbeat_s

    def idle(self) -> bool:
        """At `due`: True if nothing went out for `heartbeat_s` (send one now), else False
        and `due` moves to `heartbeat_s` after the hub's last write."""
        now = trio.current_time()
        last = self.sub.written_at
        if last + self.every > now:
            self.due = last + self.every
            return False
        self.due = now + self.every
        return True

    def sent(self) -> None:
        self.due = trio.current_time() + self.every


async def _ws_commands(sub: Subscription, may: Authorizer) -> None:
    """{"subscribe": [...]} / {"unsubscribe": [...]}; each answered {"ok": ...} or {"error": ...}."""
    while True:
        raw = await websocket.receive()
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or not ({"subscribe", "unsubscribe"} & doc.keys()):
                raise ValueError('expected {"subscribe": [patterns]} or {"unsubscribe": [patterns]}')
            add, drop = doc.get("subscribe", []), doc.get("unsubscribe", [])
            if not all(isinstance(x, list) and all(isinstance(p, str) for p in x) for x in (add, drop)):
                raise ValueError("patterns: expected a list of strings")
            for pattern in add:
                validate_pattern(pattern)
                if not may(pattern):
                    raise PermissionError(f"this token may not watch {pattern!r}")
            if len(sub.patterns | set(add)) > 32:
                raise ValueError("at most 32 patterns")
            sub.add(add)
            sub.remove(drop)
            reply: dict[str, Any] = {"ok": sorted(sub.patterns)}
        except (ValueError, PermissionError, RecursionError) as e:
            reply = {"error": str(e)[:200]}
        await websocket.send(json.dumps(reply))
