"""Review 4: `send_frames` on a WebSocket that runs over cleartext HTTP/2 (h2c prior
knowledge, RFC 8441 extended CONNECT). hypercorn serves that on every plain listener;
such a stream's bytes must go out in HTTP/2 DATA frames, never straight to the socket."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import trio
from quart import Blueprint, websocket
from wsproto.frame_protocol import FrameProtocol, Opcode

from gatewayd.plugins.api import TextFrames, hookimpl, send_frames
from gatewayd.testing import gw_url

MESSAGES = ["a", "é" * 70, "x" * 200, "y" * 70_000]


class Framer:
    """A quart send, a batch through `send_frames`, a quart send."""

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint("h2framer", __name__)

        @bp.websocket("/ws")
        async def ws():
            await websocket.accept()
            await websocket.send("before")
            await send_frames(TextFrames(MESSAGES))
            await websocket.send("after")
            await websocket.receive()  # until the client goes

        return bp


async def _messages_over_h2c(host: str, port: int, path: str, count: int) -> list[str]:
    """Open a WebSocket over h2c prior knowledge; the first `count` text messages."""
    stream = await trio.open_tcp_stream(host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    await stream.send_all(conn.data_to_send())
    frames = FrameProtocol(client=True, extensions=[])
    got: list[str] = []
    part = ""
    sent_request = False
    try:
        with trio.move_on_after(20) as hung:  # a guard: the client's h2 waits for ever on bytes that are no frame
            while len(got) < count:
                data = await stream.receive_some(65536)
                assert data, f"the server closed the connection after {got!r}"
                for event in conn.receive_data(data):  # bytes that are no HTTP/2 frames: an error, or a hang
                    if isinstance(event, h2.events.RemoteSettingsChanged) and not sent_request:
                        conn.send_headers(1, [(":method", "CONNECT"), (":protocol", "websocket"),
                                              (":scheme", "http"), (":path", path),
                                              (":authority", f"{host}:{port}"), ("sec-websocket-version", "13")])
                        sent_request = True
                    elif isinstance(event, h2.events.ResponseReceived):
                        assert dict(event.headers)[":status"] == "200", event.headers
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        frames.receive_bytes(event.data)
                        for frame in frames.received_frames():
                            if frame.opcode in (Opcode.TEXT, Opcode.CONTINUATION):
                                part += frame.payload
                                if frame.message_finished:
                                    got.append(part)
                                    part = ""
                    elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        raise AssertionError(f"the server ended the stream: {event} after {got!r}")
                await stream.send_all(conn.data_to_send())
    finally:
        await stream.aclose()
    assert not hung.cancelled_caught, f"stuck after {got!r}: the server's bytes are not HTTP/2 frames"
    return got


async def test_frames_reach_an_h2c_websocket_client_in_data_frames(gateway_factory):
    async with gateway_factory(plugins=[("h2framer", Framer())]) as gw:
        host, port = gw_url(gw).removeprefix("http://").split(":")
        got = await _messages_over_h2c(host, int(port), "/h2framer/ws", len(MESSAGES) + 2)
    assert got == ["before", *MESSAGES, "after"]
