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
from quart_trio.wrappers import TrioResponse

from gatewayd.core.http import gate, lean, serve as gw_serve
from gatewayd.core.http.lean import LeanHTTPConnection, LeanQuart, LeanRequest, LeanResponse, NoSessions
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

    @app.get("/item/<int:n>")
    async def item(n: int) -> Any:
        return {"n": n, "endpoint": request.endpoint}

    @app.get("/slash/")
    async def slash() -> str:
        return "slash"

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
    # the URL matches remembered: the same path again, another argument, another method, a
    # converter that refuses, a redirect (strict slashes) twice, the 405 and 404 again
    b"GET /item/7 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /item/7 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /item/8 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"HEAD /item/8 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"POST /item/8 HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"GET /item/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /slash?q=1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /slash?q=2 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    b"GET /slash/ HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /outer/inner/echo HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
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
    assert plain[10] == plain[11] and b'"n":7' in plain[10] and b'"n":8' in plain[12]
    assert plain[13].startswith(b"HTTP/1.1 200") and plain[14].startswith(b"HTTP/1.1 405")
    assert plain[15].startswith(b"HTTP/1.1 404")
    assert b"location: http://gw/slash/?q=1" in plain[16] and b"location: http://other/slash/?q=2" in plain[17]


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
    monkeypatch.setattr(gate, "version", lambda name: "0.13.0")
    assert lean._connection_class() is TrioASGIHTTPConnection
    assert "quart-trio 0.13 (tested: 0.12)" in caplog.text


@pytest.mark.parametrize("args,kwargs", [
    (('{"a":1}\n',), {"mimetype": "application/json"}), (("hé",), {}), ((b"\x00x",), {}),
    (("x",), {"mimetype": "text/plain"}), (("x",), {"status": 201}), (("x",), {"headers": {"X-A": "1"}}),
    (("x",), {"content_type": "text/csv"}),
])
async def test_lean_responses_are_quarts(args, kwargs):
    quarts, leans = Response(*args, **kwargs), LeanResponse(*args, **kwargs)
    assert quarts.headers.to_wsgi_list() == leans.headers.to_wsgi_list()
    assert type(quarts.headers) is type(leans.headers)
    assert (quarts.status, quarts.status_code, quarts.timeout) == (leans.status, leans.status_code, leans.timeout)
    assert await quarts.get_data() == await leans.get_data()
    leans.headers["X-B"] = "2"  # a list of its own
    assert "X-B" not in LeanResponse("y").headers


def test_a_lean_response_of_another_default_status_is_quarts():
    class Made(Response):
        default_status = 202

    class LeanMade(LeanResponse):
        default_status = 202

    assert (Made("x").status, Made("x").headers.to_wsgi_list()) == (LeanMade("x").status,
                                                                   LeanMade("x").headers.to_wsgi_list())
    assert LeanMade("x").status_code == 202


def test_the_response_class_is_quarts_under_another_release(monkeypatch):
    assert LeanQuart.response_class is LeanResponse
    monkeypatch.setattr(gate, "version", lambda name: "0.23.0")
    assert lean._response_class() is TrioResponse  # QuartTrio's own


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


def _matched(app: LeanQuart, method: str, path: str, host: str = "gw") -> Any:
    """What the app's request context makes of a request: (endpoint, view_args) or the
    routing exception's class."""
    from werkzeug.datastructures import Headers

    req = app.request_class(method, "http", path, b"", Headers([("Host", host)]), "", "1.1", {},
                            send_push_promise=None)
    ctx = app.request_context(req)
    ctx.match_request()
    if req.routing_exception is not None:
        return type(req.routing_exception).__name__
    return req.url_rule.endpoint, req.view_args


def test_remembered_url_matches_are_werkzeugs_for_each_method_and_path():
    from werkzeug.routing import BaseConverter

    class Upper(BaseConverter):  # a plugin's converter: asked every time
        calls = 0

        def to_python(self, value: str) -> str:
            Upper.calls += 1
            return value.upper()

    app = LeanQuart("routes")
    app.url_map.converters["upper"] = Upper

    @app.get("/device/<id>/commands")
    async def commands(id: str) -> str:
        return id

    @app.post("/device/<id>/status")
    async def status(id: str) -> str:
        return id

    @app.get("/n/<int:n>")
    async def number(n: int) -> str:
        return str(n)

    @app.get("/up/<upper:word>")
    async def up(word: str) -> str:
        return word

    plain = QuartTrio("routes")
    plain.url_map.converters["upper"] = Upper
    for rule in list(app.url_map.iter_rules()):
        if rule.endpoint != "static":
            plain.add_url_rule(rule.rule, rule.endpoint, app.view_functions[rule.endpoint], methods=rule.methods)
    asks = [("GET", "/device/a/commands"), ("GET", "/device/b/commands"), ("POST", "/device/a/status"),
            ("GET", "/device/a/status"), ("HEAD", "/device/a/commands"), ("POST", "/device/a/commands"),
            ("GET", "/n/1"), ("GET", "/n/2"), ("GET", "/n/x"), ("GET", "/nowhere"), ("GET", "/up/abc")]
    theirs = [_matched(plain, m, p) for m, p in asks]  # type: ignore[arg-type]
    for _ in range(3):  # the first time matched, then remembered
        assert [_matched(app, m, p) for m, p in asks] == theirs
    assert theirs[0] == ("commands", {"id": "a"}) and theirs[1] == ("commands", {"id": "b"})
    assert theirs[3] == "MethodNotAllowed" and theirs[5] == "MethodNotAllowed" and theirs[8] == "NotFound"
    assert theirs[6] == ("number", {"n": 1}) and theirs[10] == ("up", {"word": "ABC"})
    # kept: the matches of werkzeug's converters; not: the 404s and 405s, the plugin's converter
    assert len(app.routes) == 6 and Upper.calls == 4
    # each request its own view_args
    req, _ = _bound(app, "GET", "/device/a/commands")
    first = app.routes.get(lean.Routes.key(req))
    assert first is not None
    first[1]["id"] = "changed"
    assert _matched(app, "GET", "/device/a/commands") == ("commands", {"id": "a"})

    @app.get("/late/<id>")  # a rule added: matches forgotten (Quart refuses this once serving)
    async def late(id: str) -> str:
        return id

    assert len(app.routes) == 0 and _matched(app, "GET", "/late/x") == ("late", {"id": "x"})


def _bound(app: LeanQuart, method: str, path: str) -> tuple[Any, Any]:
    from werkzeug.datastructures import Headers

    req = app.request_class(method, "http", path, b"", Headers([("Host", "gw")]), "", "1.1", {},
                            send_push_promise=None)
    return req, app.create_url_adapter(req)


def test_remembered_url_matches_are_bounded_oldest_first(monkeypatch):
    app = LeanQuart("bounded")
    app.routes.size = 3

    @app.get("/d/<id>")
    async def device(id: str) -> str:
        return id

    for i in range(10):
        assert _matched(app, "GET", f"/d/{i}") == ("device", {"id": str(i)})
    assert len(app.routes) == 3 and list(app.routes._matched) == [("GET", f"/d/{i}", "gw") for i in (7, 8, 9)]


def test_no_url_match_is_remembered_where_the_host_chooses_the_rule(monkeypatch):
    app = LeanQuart("hosts")
    app.config["SERVER_NAME"] = "gw"
    assert not app.routes_cached()
    app.config["SERVER_NAME"] = None
    assert app.routes_cached()
    app.url_map.host_matching = True
    assert not app.routes_cached()
    app.url_map.host_matching = False
    monkeypatch.setattr(lean, "_gated", "werkzeug 3.2 (tested: 3.1)")
    assert not app.routes_cached()


async def test_before_unrouted_runs_only_for_requests_no_route_matched():
    app = LeanQuart("unrouted")
    seen: list[str] = []

    @app.before_request
    async def everyone() -> None:
        seen.append(f"before {request.path}")

    @app.before_unrouted
    async def unrouted() -> Any:
        seen.append(f"unrouted {request.path} {type(request.routing_exception).__name__}")
        if request.path.startswith("/mine/"):
            return {"mine": request.path}, 418
        return None

    @app.get("/mine/here")
    async def here() -> str:
        return "here"

    client = app.test_client()
    assert (await client.get("/mine/here")).status_code == 200
    missing = await client.get("/mine/missing")
    assert missing.status_code == 418 and await missing.get_json() == {"mine": "/mine/missing"}
    assert (await client.post("/mine/here")).status_code == 418  # a 405 too
    assert (await client.get("/elsewhere")).status_code == 404  # not mine: Quart's 404
    assert seen == ["before /mine/here", "unrouted /mine/missing NotFound", "unrouted /mine/here MethodNotAllowed",
                    "unrouted /elsewhere NotFound", "before /elsewhere"]


def test_request_headers_are_quarts():
    from quart.asgi import ASGIHTTPConnection

    app = LeanQuart("headers")
    for version, root in (("1.1", ""), ("1.0", ""), ("1.1", "/root")):
        scope = {"type": "http", "http_version": version, "method": "POST", "scheme": "http",
                 "path": f"{root}/a/b", "root_path": root, "query_string": b"x=1", "client": ("10.0.0.2", 5),
                 "headers": [(b"host", b"gw:8080"), (b"x-thing", b"\xe9t\xe9"), (b"x-thing", b"two"),
                             (b"content-type", b"application/json")] if version == "1.1" else []}
        ours = LeanHTTPConnection(app, scope)._create_request_from_scope(None)
        theirs = ASGIHTTPConnection(app, scope)._create_request_from_scope(None)
        assert list(ours.headers.items()) == list(theirs.headers.items())
        assert (ours.path, ours.root_path, ours.method, ours.query_string, ours.http_version) == \
            (theirs.path, theirs.root_path, theirs.method, theirs.query_string, theirs.http_version)


def test_what_came_before_the_handler():
    from gatewayd.core.http.handoff import AppQueue

    class Req:
        def __init__(self) -> None:
            self.body = lean.TrioRequest.body_class(None, None)

    def took(*messages: dict[str, Any]) -> tuple[Any, Any]:
        queue = AppQueue(10)
        for m in messages:
            queue._send.send_nowait(m)
        req = Req()
        return lean._take_what_came(req, queue), lean._left(queue)

    body = {"type": "http.request", "body": b"x", "more_body": False}
    assert took(body) == (True, False)  # all in, the client still there
    assert took(body, {"type": "http.disconnect"}) == (True, True)  # all in, and gone already
    assert took({"type": "http.request", "body": b"x", "more_body": True})[0] is False  # more to come
    assert took({"type": "http.disconnect"})[0] is None  # left before it was handled
    assert lean._take_what_came(Req(), None) is False  # another server's channel: left to quart-trio


def test_lean_headers_answer_as_werkzeugs():
    from werkzeug.datastructures import Headers

    from gatewayd.core.http.lean import LeanHeaders

    items = [("Host", "gw"), ("Content-Length", "42"), ("X-Two", "a"), ("x-two", "b"), ("X-Bad-Int", "x")]
    ours, theirs = LeanHeaders(items), Headers(items)
    for key in ("Host", "host", "HOST", "content-length", "X-Two", "x-two", "Missing", "Transfer-Encoding",
                "X-Bad-Int"):
        assert (key in ours) == (key in theirs), key
        assert ours.get(key) == theirs.get(key), key
        assert ours.get(key, "dflt") == theirs.get(key, "dflt"), key
        assert ours.get(key, -1, type=int) == theirs.get(key, -1, type=int), key
        assert ours.getlist(key) == theirs.getlist(key), key
    assert ours == theirs and theirs == ours and ours == LeanHeaders(items)
    assert ours != Headers(items[:2]) and Headers(items[:2]) != ours
    with pytest.raises(KeyError):
        ours["Missing"]  # werkzeug's own there: a BadRequestKeyError


async def _cut_short(app: QuartTrio, config: Config) -> bytes:
    port = reserved_port()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    stop = trio.Event()
    got = bytearray()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve(app, config, shutdown_trigger=stop.wait,
                                                          task_status=task_status))
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(b"GET /endless HTTP/1.1\r\nHost: gw\r\n\r\n")
            while data := await client.receive_some(65536):  # until the server closes
                got += data
            await client.aclose()
            stop.set()
    return re.sub(rb"\r\ndate: [^\r]+\r\n", b"\r\ndate: -\r\n", bytes(got))


async def test_an_answer_longer_than_the_response_timeout_is_cut_short_as_in_quart_trio():
    gw_serve.lean_framework()

    def endless(cls: type[QuartTrio]) -> QuartTrio:
        app = cls("endless")
        app.config["RESPONSE_TIMEOUT"] = 0.3

        @app.get("/endless")
        async def endless_route() -> Any:
            async def chunks() -> Any:
                yield b"first"
                await trio.sleep_forever()
            return chunks(), 200, {"Content-Type": "text/plain"}

        return app

    plain = await _cut_short(endless(QuartTrio), Config())
    leaner = await _cut_short(endless(LeanQuart), GatewayConfig())
    assert leaner == plain and plain.startswith(b"HTTP/1.1 200") and b"first" in plain


async def test_the_url_adapter_is_bound_only_when_asked_for_and_a_bad_host_still_refused():
    from werkzeug.datastructures import Headers
    from werkzeug.exceptions import BadHost
    from quart import url_for

    app = LeanQuart("adapter")

    @app.get("/d/<id>")
    async def device(id: str) -> Any:
        return {"self": url_for("device", id=id, _external=True)}

    def context(host: str) -> Any:
        req = app.request_class("GET", "http", "/d/1", b"", Headers([("Host", host)]), "", "1.1", {},
                                send_push_promise=None)
        return app.request_context(req)

    first, second = context("gw"), context("gw")
    first.match_request()
    assert first._url_adapter is not lean._UNBOUND  # not remembered yet: bound and matched
    second.match_request()
    assert second._url_adapter is lean._UNBOUND and second.request.view_args == {"id": "1"}  # remembered
    assert second.url_adapter.match(return_rule=True)[1] == {"id": "1"}  # bound when asked for
    with pytest.raises(BadHost):  # another Host is not what was remembered: werkzeug's refusal, as Quart's
        context("a..b").match_request()
    with pytest.raises(BadHost):
        QuartTrio("plain").request_context(context("a..b").request)
    client = app.test_client()
    for _ in range(2):  # url_for binds the adapter it needs, remembered match or not
        answer = await client.get("/d/7", headers={"Host": "gw.example"})
        assert await answer.get_json() == {"self": "http://gw.example/d/7"}
