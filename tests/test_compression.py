"""Compressed bodies: `decompress` (pure) and `read_body` (a real app's request)."""

import gzip
import json
import zlib

import pytest
import zstandard
from quart import Blueprint

from gatewayd.plugins.api import DecodeError, PluginContext, hookimpl, parse_json, read_body
from gatewayd.protocol.compression import decompress
from gatewayd.testing import gw_client

DOC = json.dumps({"readings": [{"i": i, "v": i * 1.5} for i in range(500)]}).encode()


@pytest.mark.parametrize("encoding, body", [
    ("gzip", gzip.compress(DOC)),
    ("zstd", zstandard.ZstdCompressor().compress(DOC)),
    ("identity", DOC),
    ("gzip", gzip.compress(DOC[:100]) + gzip.compress(DOC[100:])),  # two members: one stream
])
def test_a_body_is_decoded(encoding, body):
    assert decompress(body, encoding, len(DOC)) == DOC


@pytest.mark.parametrize("encoding, body, status, message", [
    ("gzip", gzip.compress(DOC)[:-20], 400, "truncated gzip body"),
    ("zstd", zstandard.ZstdCompressor().compress(DOC)[:-20], 400, "truncated zstd body"),
    ("gzip", b"not gzip at all", 400, "corrupt gzip body"),
    ("gzip", b"", 400, "truncated gzip body (empty)"),
    ("gzip", gzip.compress(DOC), 413, f"body decompresses to more than {len(DOC) - 1} bytes"),
    ("zstd", zstandard.ZstdCompressor().compress(DOC), 413, f"body decompresses to more than {len(DOC) - 1} bytes"),
    ("identity", DOC, 413, "more than"),
    ("br", DOC, 415, "unsupported Content-Encoding 'br'"),
])
def test_a_bad_body_is_refused_with_its_status_and_reason(encoding, body, status, message):
    with pytest.raises(DecodeError) as e:
        decompress(body, encoding, len(DOC) - 1)
    assert e.value.status == status and message in e.value.message


def test_a_bomb_stops_at_the_limit():
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # 64 MiB of zeros: 64 KiB on the wire
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError) as e:
        decompress(bomb, "gzip", 1024 * 1024)
    assert e.value.status == 413
    deflater = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    unfinished = deflater.compress(DOC) + deflater.flush(zlib.Z_SYNC_FLUSH)  # every byte, no trailer
    with pytest.raises(DecodeError, match="truncated gzip body"):
        decompress(unfinished, "gzip", len(DOC))


class Echo:
    """A plugin whose one route answers what `read_body` decoded."""

    @staticmethod
    @hookimpl
    def gatewayd_http_routes(ctx: PluginContext[None, None]) -> Blueprint:
        bp = Blueprint("echo", __name__)

        @bp.post("/body")
        async def body():  # type: ignore[no-untyped-def]
            try:
                raw = await read_body(max_bytes=len(DOC))
            except DecodeError as e:
                return {"status": e.status, "message": e.message}, e.status
            return {"doc": parse_json(raw)}

        return bp


async def test_read_body_decodes_what_the_request_says(gateway_factory):
    async with gateway_factory(plugins=[("echo", Echo)]) as gw, gw_client(gw) as client:
        for headers, body in (({}, DOC), ({"Content-Encoding": "gzip"}, gzip.compress(DOC)),
                              ({"Content-Encoding": "GZip"}, gzip.compress(DOC)),
                              ({"Content-Encoding": "x-gzip"}, gzip.compress(DOC)),
                              ({"Content-Encoding": "zstd"}, zstandard.ZstdCompressor().compress(DOC))):
            r = await client.post("/echo/body", content=body, headers=headers)
            assert r.status_code == 200 and r.json()["doc"] == json.loads(DOC), (headers, r.text)
        for headers, body, status in (({"Content-Encoding": "gzip"}, gzip.compress(DOC)[:-8], 400),
                                      ({"Content-Encoding": "gzip"}, gzip.compress(DOC + b" "), 413),
                                      ({"Content-Encoding": "deflate"}, zlib.compress(DOC), 415)):
            r = await client.post("/echo/body", content=body, headers=headers)
            assert r.status_code == status, r.text
