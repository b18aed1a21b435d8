"""gatewayd.core.http.lean (`LeanQuart`) and serve.GatewayConfig: the same answers, byte for
byte, as QuartTrio on hypercorn's own config, over real sockets; the pieces one by one; the
quart-trio release gate."""

from __future__ import annotations

import re
from typing import Any

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Blueprint, Response, request, session
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection

from gatewayd.core.http import lean, serve as gw_serve
from gatewayd.core.http.lean import LeanHTTPConnection, LeanQuart, LeanRequest, NoSessions
from gatewayd.core.http.serve import GatewayConfig
from gatewayd.testing.ports import reserved_port


def _app(cls: type[QuartTrio], seen: list[str]) -> QuartTrio:
    app = cls("lean")
    app.config["MAX_CONTENT_LENGTH"] = 1000
    outer = Blueprint("outer", __name__, url_prefix="/outer")
    inner = Blueprint("inner", __name__, url_prefix="/inner")

    @app.before_request
    async def app_before() -> None:
        seen.append(f"app before {request.blueprints}")

    @outer.before_request
    async def outer_before() -> Any:
        seen.append(f"outer before {request.blueprints}")
        if request.args.get("stop"):
            return {"stopped": "by outer"}, 409
        return None

    @inner.after_request
    def inner_after(response: Response) -> Response:  # a sync one: Quart runs it in a thread
        response.headers["X-Inner"] = "yes"
        return response

    @app.after_request
    async def app_after(response: Response) -> Response:
        seen.append(f"app after {request.blueprints}")
        return response

    @inner.get("/json")
    async def json_route() -> Any:
        return {"blueprints": request.blueprints, "endpoint": request.endpoint, "session": dict(session)}

    @inner.post("/echo")
    async def echo() -> Any:
        return Response(await request.get_data(), content_type="application/octet-stream", status=201)

    @app.get("/sync")
    def sync_route() -> str:
        return "from a thread"

    @app.get("/write-session")
    async def write_session() -> str:
        session["user"] = "x"  # no secret key: Quart's null session refuses
        return "written"

    @app.errorhandler(RuntimeError)
    async def runtime_error(e: RuntimeError) -> Any:
        return {"error": str(e)}, 500

    outer.register_blueprint(inner)
    app.register_blueprint(outer)
    return app


REQUESTS = [
    b"GET /outer/inner/json HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /outer/inner/json?stop=1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"POST /outer/inner/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    b"POST /outer/inner/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 2000\r\nConnection: close\r\n\r\n" + b"x" * 2000,
    b"GET /outer/inner/echo HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",  # 405
    b"GET /nowhere HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",  # 404
    b"GET /sync HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"HEAD /sync HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /write-session HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /outer/inner/json HTTP/1.0\r\n\r\n",
]


async def _one_answer(client: trio.SocketStream, *, head_only: bool) -> bytes:
    """One whole answer of known length (hypercorn 0.18 keeps the connection open after it)."""
    answer = bytearray()
    while b"\r\n\r\n" not in answer:
        data = await client.receive_some(65536)
        assert data, bytes(answer)
        answer += data
    head = bytes(answer).partition(b"\r\n\r\n")[0]
    length = 0 if head_only else int(re.search(rb"\r\ncontent-length: (\d+)", head).group(1))
    while len(answer) < len(head) + 4 + length:
        data = await client.receive_some(65536)
        assert data, bytes(answer)
        answer += data
    return bytes(answer)


async def _answers(app: QuartTrio, config: Config) -> list[bytes]:
    port = reserved_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    stop = trio.Event()
    got = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(app, config, shutdown_trigger=stop.wait,
                                                          task_status=task_status))
            for raw in REQUESTS:
                client = await trio.open_tcp_stream("127.0.0.1", port)
                await client.send_all(raw)
                answer = await _one_answer(client, head_only=raw.startswith(b"HEAD"))
                await client.aclose()
                got.append(re.sub(rb"\r\ndate: [^\r]+\r\n", b"\r\ndate: -\r\n", bytes(answer)))
            stop.set()
    return got


async def test_the_lean_app_answers_what_quart_trio_answers_byte_for_byte():
    gw_serve.lean_framework()  # (process-wide, as in the daemon: both servers below run with it)
    seen_plain: list[str] = []
    seen_lean: list[str] = []
    plain = await _answers(_app(QuartTrio, seen_plain), Config())
    leaner = await _answers(_app(LeanQuart, seen_lean), GatewayConfig())
    assert leaner == plain
    assert seen_lean == seen_plain
    # what they were: the routes ran, the blueprints seen, the null session refused a write
    assert plain[0].startswith(b"HTTP/1.1 200") and b'"blueprints":["outer.inner","outer"]' in plain[0]
    assert b"x-inner: yes" in plain[0] and b'"session":{}' in plain[0]
    assert plain[1].startswith(b"HTTP/1.1 409") and plain[2].endswith(b"\r\n\r\nhello")
    assert plain[3].startswith(b"HTTP/1.1 413") and plain[4].startswith(b"HTTP/1.1 405")
    assert plain[5].startswith(b"HTTP/1.1 404") and plain[6].endswith(b"from a thread")
    assert plain[8].startswith(b"HTTP/1.1 500") and b"secret" in plain[8]
    assert "outer before ['outer.inner', 'outer']" in seen_plain and "app before []" in seen_plain


async def test_a_client_that_leaves_cancels_its_handler_as_in_quart_trio():
    gw_serve.lean_framework()
    app = LeanQuart("leaves")
    entered, cancelled = trio.Event(), trio.Event()

    @app.get("/wait")
    async def wait() -> str:
        entered.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        return "never"

    port = reserved_port()
    config = GatewayConfig()
    config.bind = [f"127.0.0.1:{port}"]
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(app, config, shutdown_trigger=stop.wait,
                                                          task_status=task_status))
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"GET /wait HTTP/1.1\r\nHost: gw\r\n\r\n")
            await entered.wait()
            await client.aclose()
            await cancelled.wait()
            stop.set()


def test_no_sessions_hands_out_one_read_only_null_session():
    interface = NoSessions()
    first = trio.run(interface.open_session, None, None)
    assert first is trio.run(interface.make_null_session, None) and interface.is_null_session(first)
    assert first.get("user") is None
    with pytest.raises(RuntimeError):
        first["user"] = "x"


def test_blueprints_are_quarts_worked_out_once_per_endpoint():
    class Rule:
        def __init__(self, endpoint: str) -> None:
            self.endpoint = endpoint

    def blueprints(endpoint: str | None) -> tuple[list[str], list[str]]:
        lean_req = LeanRequest.__new__(LeanRequest)
        plain_req = lean.TrioRequest.__new__(lean.TrioRequest)
        for r in (lean_req, plain_req):
            r.url_rule = None if endpoint is None else Rule(endpoint)
        return lean_req.blueprints, plain_req.blueprints

    for endpoint in (None, "hello", "outer.hello", "outer.inner.hello", "a.b.c.d"):
        mine, quarts = blueprints(endpoint)
        assert mine == quarts, endpoint
    assert blueprints("a.b.c.d")[0] == ["a.b.c", "a.b", "a"]


def test_ensure_async_is_quarts_remembered_and_bounded(monkeypatch):
    app = LeanQuart("async")

    async def coroutine() -> int:
        return 1

    def plain() -> int:
        return 2

    assert app.ensure_async(coroutine) is coroutine  # Quart's answer for a coroutine function
    wrapped = app.ensure_async(plain)
    assert wrapped is app.ensure_async(plain) and trio.run(wrapped) == 2  # made once, runs in a thread
    monkeypatch.setattr(lean, "_ASYNC_CACHE_MAX", len(app._async_of))
    made_per_request = [lambda: None for _ in range(3)]
    for f in made_per_request:
        app.ensure_async(f)
    assert not any(f in app._async_of for f in made_per_request)  # not kept past the bound


def test_the_connection_class_is_quart_trios_under_another_release(monkeypatch, caplog):
    assert LeanQuart.asgi_http_class is LeanHTTPConnection  # the pinned release (constraints.txt)
    assert lean._connection_class() is LeanHTTPConnection
    monkeypatch.setattr(lean, "_release", lambda name: "0.13")
    assert lean._connection_class() is TrioASGIHTTPConnection
    assert "quart-trio 0.13 (tested: 0.12)" in caplog.text


def test_the_config_makes_hypercorns_headers_once_a_second(monkeypatch):
    import hypercorn.config

    now = [1_700_000_000.25]
    monkeypatch.setattr(hypercorn.config, "time", lambda: now[0])
    monkeypatch.setattr(gw_serve, "time", lambda: now[0])
    ours, theirs = GatewayConfig(), Config()
    first = ours.response_headers("h11")
    assert first == theirs.response_headers("h11") and [n for n, _ in first] == [b"date", b"server"]
    first.append((b"x", b"y"))  # a caller adding to its list changes no other answer's
    now[0] += 0.7  # the same second
    assert ours.response_headers("h11") == theirs.response_headers("h11") == first[:2]
    now[0] += 0.1  # the next one
    assert ours.response_headers("h11") == theirs.response_headers("h11") != first[:2]
    assert ours.response_headers("h2") == theirs.response_headers("h2")


async def test_a_body_that_came_with_the_head_is_in_before_the_handler_runs_a_later_one_is_read():
    from gatewayd.core.http.body import body_received, request_data

    gw_serve.lean_framework()
    app = LeanQuart("body")
    found: list[tuple[bool, bytes]] = []

    @app.post("/body")
    async def body() -> str:
        already = body_received()
        found.append((already, await request_data()))
        return "ok"

    port = reserved_port()
    config = GatewayConfig()
    config.bind = [f"127.0.0.1:{port}"]
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(app, config, shutdown_trigger=stop.wait,
                                                          task_status=task_status))
            client = await trio.open_tcp_stream("127.0.0.1", port)
            head = b"POST /body HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\n"
            await client.send_all(head + b"0123456789")  # in one write: queued before the app runs
            await _one_answer(client, head_only=False)
            await client.send_all(head + b"01234")
            await trio.sleep(0.2)  # (the handler may run on half a body: it waits for the rest)
            await client.send_all(b"56789")
            answer = await _one_answer(client, head_only=False)
            stop.set()
    assert answer.startswith(b"HTTP/1.1 200")
    assert found[0] == (True, b"0123456789")
    assert found[1][1] == b"0123456789"
