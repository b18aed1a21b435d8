"""Review 6 of the HTTP hot path (hx5: LeanQuart, keepalive, handoff, the Date cache) over real
sockets, with the gateway's own app (`create_app`) served by `serve_app`.

A connection whose answer says `Connection: close` (an HTTP/1.0 request, a client's own
`Connection: close`, the core's 413 that closes) must be closed by the gateway once the answer
is out: the client may read until EOF, and nothing else (no keep-alive timer runs on it) would
ever close it. And a refusal of a body over `http.max_body_bytes` goes out even when the client
pipelined its next request behind that body.
"""

from __future__ import annotations

import pytest
import trio
from quart import Response, request

from gatewayd.core.http.app import create_app
from gatewayd.core.http.serve import serve_app
from gatewayd.core.logs import get_logger
from gatewayd.core.schema import Address
from gatewayd.testing.ports import reserved_port

H = b"Host: gw\r\n"
CLOSING = {
    "http/1.0": b"GET /json HTTP/1.0\r\n" + H + b"\r\n",
    "connection: close": b"GET /json HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
    "413, closes": b"POST /raw HTTP/1.1\r\n" + H + b"Content-Length: 200\r\n\r\n" + b"x" * 200,
    # A body over http.max_body_bytes with the next request pipelined behind it: the refusal
    # must still go out (main lost it about half the time: EOF and no answer at all).
    "413, then a pipelined request": b"POST /raw HTTP/1.1\r\n" + H + b"Content-Length: 200\r\n\r\n" + b"x" * 200
    + b"GET /json HTTP/1.1\r\n" + H + b"\r\n",
    "401 before a large body, then a pipelined request": b"POST /early401 HTTP/1.1\r\n" + H
    + b"Content-Length: 200\r\n\r\n" + b"x" * 200 + b"GET /json HTTP/1.1\r\n" + H + b"\r\n",
}
HANG_S = 10  # no answer's close takes this long: the keep-alive timeout (5 s) never applies to these


def _app():
    app = create_app("review6", max_body_bytes=100, log=get_logger("review6"))

    @app.before_request
    async def refuse() -> Response | None:  # as a token check does: before the body is read
        if request.path == "/early401":
            return Response('{"error":"no"}', status=401, content_type="application/json")
        return None

    @app.get("/json")
    async def answer() -> dict:
        return {"ok": True}

    @app.post("/raw")
    async def raw() -> dict:
        return {"n": len(await request.get_data())}

    return app


async def _until_eof(client: trio.SocketStream) -> bytes:
    got = b""
    while True:
        try:
            data = await client.receive_some(65536)
        except trio.BrokenResourceError:
            return got
        if not data:
            return got
        got += data


@pytest.mark.parametrize("kind", sorted(CLOSING))
async def test_a_connection_whose_answer_says_close_is_closed_by_the_gateway(kind):
    port = reserved_port()
    stop = trio.Event()
    never_closed = []
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_app(
            _app(), Address("127.0.0.1", port), shutdown_trigger=stop.wait, graceful_timeout=1,
            access_log=False, task_status=task_status))

        async def one() -> None:
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(CLOSING[kind])
            with trio.move_on_after(HANG_S):  # a hang detector, not a timing figure
                got = await _until_eof(client)
                assert got.startswith(b"HTTP/1.1 "), got
                assert b"onnection: close" in got, got
                assert got.count(b"HTTP/1.1 ") == 1, got  # nothing after a closing answer
                return
            never_closed.append(kind)
            await client.aclose()

        async with trio.open_nursery() as clients:
            for _ in range(12):  # each lost the race about half the time: all twelve must close
                clients.start_soon(one)
        stop.set()
    assert never_closed == []
