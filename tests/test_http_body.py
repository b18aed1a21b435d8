"""Request bodies over a real socket (core/http/body.py): a body already in is read without
a wait, one still coming is waited for, one too large is refused, and the connection
serves its next request either way."""

import datetime
import json
import math
import uuid

import pytest
import trio
from flask.json.provider import DefaultJSONProvider
from quart_trio import QuartTrio

from gatewayd.core.http.body import StrictJSONProvider
from gatewayd.testing import gw_url
from tests import plugin_everything

DOC = json.dumps({"device_token": "t", "data": {"v0": 1}}).encode()
KEYS = b'{"keys":["data","device_token"]}'


async def _connect(gw):
    host, port = gw_url(gw).split("//")[1].rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def _answers(stream, n):
    """The next `n` whole answers (Content-Length framed) on the connection."""
    received, out = b"", []
    while len(out) < n:
        head, sep, rest = received.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None) if sep else None
        if length is not None and len(rest) >= length:
            out.append((head.split(b"\r\n")[0], rest[:length]))
            received = rest[length:]
            continue
        data = await stream.receive_some()
        assert data, f"connection closed after {len(out)} answers: {received[:200]!r}"
        received += data
    return out


def _post(body, *, length=None):
    return (b"POST /everything/inflated HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n"
            % (len(body) if length is None else length)) + body


async def test_a_body_read_at_once_or_as_it_comes_is_the_same_and_the_connection_goes_on(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=[("everything", plugin_everything)]) as gw:
            stream = await _connect(gw)
            await stream.send_all(_post(DOC))  # in one write: all in before the route reads it
            await stream.send_all(_post(DOC)[:-10])  # the rest later: the route waits for it
            await trio.sleep(0.2)
            await stream.send_all(DOC[-10:] + b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            answers = await _answers(stream, 3)
            assert [a[1].strip() for a in answers[:2]] == [KEYS, KEYS], answers
            assert [a[0].split()[1] for a in answers] == [b"200", b"200", b"200"], answers


async def test_a_body_over_the_limit_is_refused_whether_announced_or_sent(gateway_factory):
    with trio.fail_after(30):
        settings = ["http.max_body_bytes=1024"]
        async with gateway_factory(plugins=[("everything", plugin_everything)], settings=settings) as gw:
            stream = await _connect(gw)
            await stream.send_all(_post(b"", length=5000))  # announced: refused before it comes
            [(status, body)] = await _answers(stream, 1)
            assert status.split()[1] == b"413" and json.loads(body)["error"]["code"] == "payload_too_large", body
            stream = await _connect(gw)
            chunked = (b"POST /everything/inflated HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"800\r\n" + b" " * 0x800 + b"\r\n0\r\n\r\n")  # not announced: refused once it is over
            await stream.send_all(chunked)
            [(status, body)] = await _answers(stream, 1)
            assert status.split()[1] == b"413", body


async def test_json_answers_are_the_bytes_flask_makes_and_stay_strict():
    """StrictJSONProvider.response keeps its encoder (flask makes one per call): the bytes
    are flask's own (sorted keys, ASCII escapes, compact, a newline); NaN is still refused."""
    app = QuartTrio("t")
    app.json = StrictJSONProvider(app)
    flask = DefaultJSONProvider(app)
    docs = [{"b": 1, "a": [1.5, -0.0, 1e16, 2**62, None, True]}, {"é": "ü\u2028\U0001f600", "x": {"z": {}, "y": []}},
            [], "text", 3, {"when": datetime.datetime(2026, 2, 12, 16, 0), "id": uuid.UUID(int=7)}]
    async with app.app_context():
        for doc in docs:
            ours, theirs = app.json.response(doc), flask.response(doc)
            assert await ours.get_data() == await theirs.get_data() and ours.mimetype == theirs.mimetype
        with pytest.raises(ValueError):
            app.json.response({"x": math.nan})
        loop: dict = {}
        loop["self"] = loop
        with pytest.raises(ValueError):
            app.json.response(loop)
        assert await app.json.response({"after": "an error"}).get_data() == b'{"after":"an error"}\n'
