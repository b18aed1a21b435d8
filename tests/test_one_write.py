"""gatewayd.core.http.one_write: an answer of known length leaves in one write, head and
body; a chunked answer's head still leaves at once. Over real sockets, with hypercorn."""

from __future__ import annotations

import trio
from quart import Response
from quart_trio import QuartTrio

from gatewayd.core.http import handoff, one_write
from gatewayd.core.http.serve import serve_app
from gatewayd.core.schema import Address
from gatewayd.testing.ports import reserved_port


def _app(first_chunk: trio.Event) -> QuartTrio:
    app = QuartTrio("one-write")

    @app.get("/json")
    async def answer() -> dict:
        return {"ok": True, "text": "x" * 100}

    @app.get("/stream")
    async def stream() -> Response:
        async def chunks():
            await first_chunk.wait()  # only once the client has the head
            yield b"one"
            yield b"two"

        return Response(chunks(), content_type="text/plain")

    return app


async def _read_until(stream: trio.SocketStream, got: bytearray, end: bytes) -> None:
    while end not in got:
        data = await stream.receive_some(65536)
        assert data, bytes(got)
        got += data


async def test_an_answer_of_known_length_in_one_write_and_a_chunked_head_at_once(monkeypatch):
    assert one_write.enable() and one_write.enabled()  # the releases pinned are the ones tested
    port = reserved_port()
    writes: list[bytes] = []
    original = trio.SocketStream.send_all

    async def counted(self, data):
        if self.socket.getsockname()[1] == port:  # the server's side of a connection
            writes.append(bytes(data))
        await original(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", counted)
    real_write = handoff._write_fd

    def written(fd: int, data: bytes) -> int:  # handoff's write straight to the socket: the server's
        n = real_write(fd, data)
        writes.append(bytes(data[:n]))
        return n

    monkeypatch.setattr(handoff, "_write_fd", written)
    first_chunk = trio.Event()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_app(
            _app(first_chunk), Address("127.0.0.1", port), shutdown_trigger=stop.wait, graceful_timeout=1,
            access_log=False, task_status=task_status))
        client = await trio.open_tcp_stream("127.0.0.1", port)
        for method in (b"GET", b"GET", b"HEAD"):  # two answers on one keep-alive connection, then a HEAD
            writes.clear()
            await client.send_all(method + b" /json HTTP/1.1\r\nHost: gw\r\n\r\n")
            got = bytearray()
            await _read_until(client, got, b"\r\n\r\n")
            head, _, body = bytes(got).partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            if method == b"GET":
                while len(body) < length:
                    body += await client.receive_some(65536)
                assert body == b'{"ok":true,"text":"' + b"x" * 100 + b'"}\n'
            else:
                assert body == b""
            assert head.startswith(b"HTTP/1.1 200") and length == 122
            assert writes == [bytes(got) if method == b"HEAD" else head + b"\r\n\r\n" + body], writes  # one write
        writes.clear()
        await client.send_all(b"GET /stream HTTP/1.1\r\nHost: gw\r\n\r\n")
        got = bytearray()
        await _read_until(client, got, b"\r\n\r\n")  # the head, while the body waits for it
        assert got.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in got.lower()
        first_chunk.set()
        await _read_until(client, got, b"0\r\n\r\n")
        assert got.endswith(b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n") and b"".join(writes) == bytes(got)
        await client.aclose()
        stop.set()
