"""Review of one_write (hypercorn's HTTP/1.1 answers in one write, commit a4c6449), over real
sockets: answers without a body (HEAD, 204, 304), a wrong Content-Length either way, several
MB, a body that streams under a Content-Length, 100-continue, 413, pipelining, HTTP/1.0,
the core's and hypercorn's 400s, a 500, and a WebSocket upgrade after an answer on the same
connection. Each connection must carry what hypercorn's own three writes carried: every
answer whole and in order, and the next request on it answered."""

from __future__ import annotations

import re

import pytest
import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio

from gatewayd.core.http import one_write
from gatewayd.core.http.serve import serve_app
from gatewayd.core.schema import Address
from gatewayd.testing.ports import reserved_port

G = b"GET /json HTTP/1.1\r\nHost: gw\r\n\r\n"
JSON = b'{"ok":true}\n'
WS = (b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def _app() -> QuartTrio:
    app = QuartTrio("review5-one-write")
    app.config["MAX_CONTENT_LENGTH"] = 1000

    @app.get("/json")
    async def json_answer() -> dict:
        return {"ok": True}

    @app.get("/204")
    async def no_content():
        return "", 204

    @app.get("/304")
    async def not_modified():
        return Response(b"", status=304, headers={"ETag": '"x"'})

    @app.get("/big")
    async def big():
        return Response(b"y" * 5_000_000, content_type="application/octet-stream")

    @app.get("/short")
    async def short():  # says less than it sends
        r = Response(b"0123456789")
        r.headers["Content-Length"] = "5"
        return r

    @app.get("/long")
    async def long():  # says more than it sends
        r = Response(b"0123456789")
        r.headers["Content-Length"] = "100"
        return r

    @app.get("/gen")
    async def gen():
        async def parts():
            yield b"abc"
            await trio.sleep(0)
            yield b"def"

        r = Response(parts())
        r.headers["Content-Length"] = "6"
        return r

    @app.get("/boom")
    async def boom():
        raise RuntimeError("review5: a handler's bug")

    @app.post("/echo")
    async def echo():
        return await request.get_data()

    @app.websocket("/ws")
    async def ws():
        await websocket.accept()
        await websocket.send("hi")

    return app


def _answers(wire: bytes, head_first: bool) -> list[tuple[int, bytes]]:
    """(status, body) of each answer on the wire, Content-Length framed; b"<cut>" for one cut
    short. `head_first`: the first answers a HEAD (its Content-Length is not followed by a body)."""
    out: list[tuple[int, bytes]] = []
    while wire:
        head, sep, rest = wire.partition(b"\r\n\r\n")
        assert sep, wire
        status = int(head.split(b" ")[1])
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        n = int(length.group(1)) if length and status >= 200 and status not in (204, 304) else 0
        if head_first and not out:
            n = 0
        if status == 101:
            out.append((101, rest))
            break
        out.append((status, rest[:n] if len(rest) >= n else b"<cut>" + rest))
        wire = rest[n:]
    return out


async def _exchange(port: int, parts: list[bytes]) -> tuple[bytes, bool]:
    """What the server sent for `parts` (each sent once the previous one's answers came), and
    whether it closed the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = bytearray()
    closed = False
    for part in parts:
        await stream.send_all(part)
        with trio.move_on_after(0.5):  # a wait for what does not come (a closed or idle connection), not a timing check
            while True:
                data = await stream.receive_some(1 << 20)
                if not data:
                    closed = True
                    break
                got += data
    await stream.aclose()
    return bytes(got), closed


CASES = [
    ("head", [b"HEAD /json HTTP/1.1\r\nHost: gw\r\n\r\n", G], [(200, b""), (200, JSON)], False),
    ("204", [b"GET /204 HTTP/1.1\r\nHost: gw\r\n\r\n", G], [(204, b""), (200, JSON)], False),
    ("304", [b"GET /304 HTTP/1.1\r\nHost: gw\r\n\r\n", G], [(304, b""), (200, JSON)], False),
    ("big", [b"GET /big HTTP/1.1\r\nHost: gw\r\n\r\n", G], [(200, b"y" * 5_000_000), (200, JSON)], False),
    ("short", [b"GET /short HTTP/1.1\r\nHost: gw\r\n\r\n", G], [(200, b"<cut>")], True),  # head alone, closed
    ("long", [b"GET /long HTTP/1.1\r\nHost: gw\r\n\r\n", G], [(200, b"<cut>0123456789")], True),
    ("gen", [b"GET /gen HTTP/1.1\r\nHost: gw\r\n\r\n", G], [(200, b"abcdef"), (200, JSON)], False),
    ("500", [b"GET /boom HTTP/1.1\r\nHost: gw\r\n\r\n", G], [(500, None), (200, JSON)], False),
    ("pipelined", [G * 3], [(200, JSON)] * 3, False),
    ("http/1.0", [b"GET /json HTTP/1.0\r\nHost: gw\r\n\r\n"], [(200, JSON)], None),  # closed later (hypercorn's own, with or without one_write)
    ("100-continue", [b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
                      b"hello" + G], [(100, b""), (200, b"hello"), (200, JSON)], False),
    ("413", [b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 2000\r\n\r\n" + b"z" * 2000, G],
     [(413, None), (200, JSON)], False),
    ("hypercorn 400", [b"GARBAGE\r\n\r\n"], [(400, b"")], True),
    ("core 400 (Host)", [b"GET /json HTTP/1.1\r\nHost: a..b\r\n\r\n", G], [(400, None), (200, JSON)], False),
    ("websocket after", [G, WS], [(200, JSON), (101, b"\x81\x02hi\x88\x02\x03\xe8")], True),
]


@pytest.mark.parametrize("name, parts, answers, closes", CASES, ids=[c[0] for c in CASES])
async def test_each_connection_carries_whole_answers_in_order(name, parts, answers, closes):
    assert one_write.enable()
    port = reserved_port()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_app(
            _app(), Address("127.0.0.1", port), shutdown_trigger=stop.wait, graceful_timeout=1,
            access_log=False, task_status=task_status))
        wire, closed = await _exchange(port, parts)
        stop.set()
    got = _answers(wire, head_first=parts[0].startswith(b"HEAD"))
    assert [(s, b if want is not None else None) for (s, b), (_, want) in zip(got, answers)] == answers, wire[:400]
    assert len(got) == len(answers) and closes in (None, closed), wire[:400]


async def test_over_tls_and_after_a_client_gone_mid_answer(tmp_path):
    """The same answers over HTTPS (hypercorn's TLS stream under the patched protocol); a
    client that closes while 5 MB are on their way does not stop the server answering the next."""
    import ssl

    from gatewayd.core.tls import SiteTls, TlsSection, init_site

    data = tmp_path / "var"
    init_site(data / "tls", "gw", ["gw.example"], ["127.0.0.1"])
    site = SiteTls(TlsSection(http=True), data, None)
    site.load()
    client_ctx = ssl.create_default_context(cafile=str(data / "tls" / "ca.crt"))
    assert one_write.enable()
    port = reserved_port()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_app(
            _app(), Address("127.0.0.1", port), shutdown_trigger=stop.wait, graceful_timeout=1,
            access_log=False, tls=site, task_status=task_status))

        async def tls_exchange(parts: list[bytes], read: bool = True) -> bytes:
            stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_ctx,
                                    server_hostname="gw.example")
            got = bytearray()
            for part in parts:
                await stream.send_all(part)
                if not read:
                    break
                with trio.move_on_after(0.5):  # waits for what does not come; no timing checked
                    while data := await stream.receive_some(1 << 20):
                        got += data
            await trio.aclose_forcefully(stream)
            return bytes(got)

        wire = await tls_exchange([b"HEAD /json HTTP/1.1\r\nHost: gw\r\n\r\n", G * 2, b"GET /204 HTTP/1.1\r\nHost: gw\r\n\r\n"
                                   + b"GET /big HTTP/1.1\r\nHost: gw\r\n\r\n"])
        assert _answers(wire, head_first=True) == [(200, b""), (200, JSON), (200, JSON), (204, b""),
                                                   (200, b"y" * 5_000_000)]
        for _ in range(3):  # gone mid-answer, each time
            await tls_exchange([b"GET /big HTTP/1.1\r\nHost: gw\r\n\r\n"], read=False)
        assert _answers(await tls_exchange([G]), head_first=False) == [(200, JSON)]
        stop.set()
