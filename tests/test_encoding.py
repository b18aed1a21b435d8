"""Compressed request bodies: inflated within a bound, refused precisely (protocol/encoding.py,
and `read_json_object(max_inflated=...)` through the real HTTP app)."""

import gzip
import json

import pytest
import zstandard

from gatewayd.protocol.encoding import EncodingError, inflate
from gatewayd.testing import gw_client
from tests import plugin_everything

DOC = json.dumps({"device_token": "t", "data": {"v0": 1}}).encode()


def refused(status, code, body, encoding, limit=1024):
    with pytest.raises(EncodingError) as e:
        inflate(body, encoding, limit)
    assert (e.value.status, e.value.code) == (status, code), e.value.message
    return e.value.message


@pytest.mark.parametrize("encoding, pack", [("gzip", gzip.compress), ("zstd", zstandard.compress),
                                            ("identity", bytes), ("", bytes), (" GZip ", gzip.compress)])
def test_each_encoding_inflates(encoding, pack):
    assert inflate(pack(DOC), encoding, len(DOC)) == DOC


def test_concatenated_members_are_one_stream():
    assert inflate(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 4) == b"abcd"
    assert inflate(zstandard.compress(b"ab") + zstandard.compress(b"cd"), "zstd", 4) == b"abcd"


def test_a_bomb_stops_at_the_limit():
    bomb = gzip.compress(b"\0" * 50_000_000)  # 48 KiB that would be 50 MB
    assert refused(413, "too_large", bomb, "gzip", 1_000_000) == "body decompresses to more than 1000000 bytes"
    refused(413, "too_large", zstandard.compress(b"\0" * 5_000_000), "zstd", 1_000_000)
    refused(413, "too_large", DOC, "identity", len(DOC) - 1)


def test_corrupt_truncated_and_unknown_bodies_are_refused():
    assert refused(400, "corrupt_body", gzip.compress(DOC)[:-5], "gzip") == "truncated gzip body"
    assert refused(400, "corrupt_body", b"", "gzip") == "truncated gzip body (empty)"
    assert refused(400, "corrupt_body", DOC, "gzip").startswith("corrupt gzip body: ")
    assert refused(400, "corrupt_body", zstandard.compress(DOC)[:-3], "zstd") == "truncated zstd body"
    assert refused(415, "unsupported_encoding", DOC, "br") == \
        "unsupported Content-Encoding 'br' (expected identity, gzip, zstd)"


async def test_a_route_reads_a_compressed_body(gateway_factory):
    async with gateway_factory(plugins=[("everything", plugin_everything)]) as gw, gw_client(gw) as client:
        async def post(body, encoding):
            return await client.post("/everything/inflated", content=body, headers={"Content-Encoding": encoding})

        r = await post(gzip.compress(DOC), "gzip")
        assert r.status_code == 200 and r.json() == {"keys": ["data", "device_token"]}
        assert (await post(zstandard.compress(DOC), "zstd")).json() == {"keys": ["data", "device_token"]}
        assert (await client.post("/everything/inflated", content=DOC)).json() == {"keys": ["data", "device_token"]}
        for body, encoding, status, code in ((gzip.compress(DOC)[:-4], "gzip", 400, "corrupt_body"),
                                             (gzip.compress(b" " * 5000), "gzip", 413, "too_large"),
                                             (DOC, "br", 415, "unsupported_encoding")):
            r = await post(body, encoding)
            assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        r = await post(gzip.compress(b"[1]"), "gzip")  # inflated, then parsed as strictly as ever
        assert r.status_code == 400 and r.json()["error"]["message"] == "body: expected a JSON object, got an array"
