"""Review 8: adversarial probes of hx7's remembered path values, the empty query's defaults,
LeanResponse and the direct counter inc, and of the streetlight status encoded once (Encoded
through ingest and the live hub), each against what the code did before (plain convert,
Quart's Response, prometheus_client's own inc, a plain dict)."""

from __future__ import annotations

import threading
import uuid
from typing import Annotated, Literal

import pytest
from msgspec import Meta, Struct
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.datastructures import ImmutableMultiDict

from gatewayd.core.http.lean import LeanQuart, LeanResponse
from gatewayd.core.live.hub import LiveEvent, LiveHub
from gatewayd.core.metrics import Metrics
from gatewayd.core.outbox.ingest import Ingest, Record
from gatewayd.protocol.batch import compact_json_encoder
from gatewayd.protocol.json_text import Encoded, encoded
from gatewayd.protocol.validate import InvalidInput, PathParser, QueryParser, convert

Digits = Annotated[str, Meta(pattern=r"^[1-9][0-9]{0,17}$")]
Word = Annotated[str, Meta(pattern=r"^[a-z0-9]{1,16}$")]


def _outcome(parse, value):
    try:
        return ("ok", parse(value))
    except InvalidInput as e:
        return ("refused", e.location, str(e))


@pytest.mark.parametrize("tp", [Digits, Word, uuid.UUID, Literal["a", "b"], str])
def test_a_remembered_path_value_answers_as_convert_every_time(tp):
    parse = PathParser(tp, size=3)
    values = ["123", "abc", "ABC", "0", "a", "b", "", "12345678-1234-5678-1234-567812345678", "é", "123", "abc"]
    for _ in range(3):  # fill, evict, refill: always what convert says
        for v in values:
            assert _outcome(parse, v) == _outcome(lambda x: convert(x, tp, location="path"), v)
        assert len(parse._passed) <= 3


def test_two_parameters_of_different_patterns_never_share_a_remembered_value():
    digits, word = PathParser(Digits), PathParser(Word)
    assert word("abc") == "abc" and digits("123") == "123"
    with pytest.raises(InvalidInput):
        digits("abc")  # passed for the other parameter: still refused here
    assert word("123") == "123"
    with pytest.raises(InvalidInput):
        word("1" * 17)


class Q(Struct, forbid_unknown_fields=True):
    limit: Annotated[int, Meta(ge=1, le=50)] = 10
    tag: str | None = None


class Req(Struct, forbid_unknown_fields=True):
    since: float


def test_query_repeated_keys_and_empty_queries_answer_as_before():
    parse = QueryParser(Q)
    assert parse(ImmutableMultiDict([("limit", "2"), ("limit", "3")])) == Q(limit=2)  # werkzeug's first
    assert parse(ImmutableMultiDict()) == Q() and parse({}) == Q()
    assert parse(ImmutableMultiDict([("tag", "")])) == Q(tag="")
    for _ in range(2):
        with pytest.raises(InvalidInput, match="since: required"):
            QueryParser(Req)(ImmutableMultiDict())
    with pytest.raises(InvalidInput, match="unknown query parameter"):
        parse(ImmutableMultiDict([("", "")]))


def _apps():
    """The same routes on a LeanQuart and a plain QuartTrio."""
    made = []
    for cls in (LeanQuart, QuartTrio):
        app = cls("probe")

        @app.route("/text", methods=["GET"])
        async def text():
            return "héllo ✓"

        @app.route("/bytes")
        async def raw():
            return b"\x00\xff"

        @app.route("/json")
        async def js():
            return {"a": "é", "b": [1, 2]}

        @app.route("/empty")
        async def empty():
            return "", 204

        @app.route("/same")
        async def same():
            return "", 304

        @app.route("/made")
        async def made_here():
            return "x", 201, {"X-A": "1"}

        @app.route("/stream")
        async def stream():
            async def gen():
                yield b"a"
                yield b"b"
            return gen()

        @app.route("/sync")
        async def sync_stream():
            def gen():
                yield b"a"
                yield b"b"
            return gen()

        @app.route("/none")
        async def none_body():
            return app.response_class(status=204)

        @app.route("/listed")
        async def listed():
            return app.response_class([b"a", b"b"], headers={"X-L": "1"})

        @app.after_request
        async def hook(response):
            if request.path == "/json":
                response.headers["X-Hook"] = "1"
                response.status_code = 202
            if request.path == "/text" and request.args.get("again"):
                response.set_data("changed")
            return response

        made.append(app)
    return made


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ["/text", "/text?again=1", "/bytes", "/json", "/empty", "/same", "/made",
                                  "/stream", "/none", "/listed"])
async def test_a_lean_answer_is_quarts_through_the_app(method, path):
    lean, plain = _apps()
    assert lean.response_class is LeanResponse
    got = []
    for app in (lean, plain):
        r = await app.test_client().open(path, method=method)
        got.append((r.status_code, r.headers.to_wsgi_list(), await r.get_data()))
    assert got[0] == got[1]


async def test_a_lean_app_streams_a_sync_generator_and_a_file_as_quart_trio_does(tmp_path):
    from quart import send_file
    (tmp_path / "f.bin").write_bytes(b"0123456789")
    for app in _apps():
        @app.route("/file")
        async def file():
            return await send_file(tmp_path / "f.bin")

        client = app.test_client()
        r = await client.get("/sync")
        assert (r.status_code, await r.get_data()) == (200, b"ab")
        r = await client.get("/file")
        assert (r.status_code, await r.get_data()) == (200, b"0123456789")


def test_counts_bumped_from_many_threads_are_all_counted():
    m = Metrics()
    c = m.counter("gatewayd_probe_total", "P", ("via",))
    start = threading.Barrier(4)

    def bump(via):
        start.wait()
        for _ in range(5000):
            c.inc(via=via)
            c.inc(0.5, via="shared")

    threads = [threading.Thread(target=bump, args=(f"t{i % 2}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (c.value(via="t0"), c.value(via="t1"), c.value(via="shared")) == (10000, 10000, 10000)
    page = m.render()
    assert 'gatewayd_probe_total{via="shared"} 10000.0' in page
    assert 'gatewayd_probe_total{via="t0"} 10000.0' in page


@pytest.mark.parametrize("flags", [["é"], ["a\x7fb"], ["\u2028", "\x00"], ["x" * 3, "\ud800"], ["plain"]])
def test_a_status_encoded_once_is_stored_and_sent_as_a_plain_dict(flags):
    doc = {"timestamp": "2026-12-03T00:00:00Z", "status": {"power_state": "on", "error_flags": flags,
                                                            "temperature_celsius": 25.5}}
    data = encoded(doc)
    assert data.text == compact_json_encoder()(doc)  # the outbox row's text
    hub = LiveHub()
    event = hub.publish("streetlight.status.l-1", data)
    plain = LiveEvent(event.id, event.stream, event.ts, doc)
    assert event.json() == plain.json()
    assert type(data) is Encoded and event.data == doc
    ingest = Ingest(None, "streetlight", lambda: 1_800_000_000.0)  # type: ignore[arg-type]
    plain_rows = ingest._rows([Record("l-1", "status", doc, 1_700_000_000.0, "state")], 1_800_000_000.0)
    assert ingest._rows([Record("l-1", "status", data, 1_700_000_000.0, "state")], 1_800_000_000.0) == plain_rows
    assert ingest._row("l-1", "status", data, 1_700_000_000.0, "state", now=1_800_000_000.0) == plain_rows[0]


def test_long_path_values_that_pass_are_not_all_kept():
    parse = PathParser(str)
    for i in range(300):
        value = f"{i:05d}" + "x" * 16_000  # a URL hypercorn takes (h11's 16 KiB head)
        assert parse(value) == value  # still answered as convert answers it
    assert sum(map(len, parse._passed)) <= 1_000_000


def test_a_lean_response_of_an_empty_mimetype_is_quart_trios():
    from quart_trio.wrappers import TrioResponse
    assert LeanResponse("x", mimetype="").headers.to_wsgi_list() == \
        TrioResponse("x", mimetype="").headers.to_wsgi_list()
