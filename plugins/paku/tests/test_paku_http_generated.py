"""Generated requests to every paku route: never a 500, always strict JSON back.

Bodies of any JSON shape with paku's fields in it, then spoiled (NaN, huge numbers,
deep nesting, bytes that are not UTF-8), and query strings of any text; the examples
are derandomized and bounded, so the test is the same in every run.
"""

import json
from urllib.parse import quote

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paku_testbed import AUTH, PAKU

from gatewayd.testing import gw_client, gw_url

FIELDS = ["id", "name", "model", "firmware", "notes", "code"]

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=30) | st.sampled_from(["pk-1", "AAAA-BBBB-CCCC"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                              max_size=4), max_leaves=12)
objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=5)


@st.composite
def bodies(draw) -> bytes:
    text = json.dumps(draw(objects | values))
    spoil = draw(st.sampled_from(["none", "constant", "huge", "deep", "bytes", "cut"]))
    if spoil == "constant":
        text = text.replace("null", draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400"])), 1)
    elif spoil == "huge":
        text = text.replace("null", draw(st.sampled_from(["9" * 30, "-" + "9" * 400, "1" + "0" * 19])), 1)
    elif spoil == "deep":
        depth = draw(st.integers(60, 3000))
        text = text.replace("null", "[" * depth + "]" * depth, 1)
    elif spoil == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    raw = text.encode()
    if spoil == "bytes":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    return raw


def strict(r: httpx.Response) -> None:
    """Not a 500, and (unless it is the firmware image) a body strict parsers accept."""
    assert r.status_code < 500, (r.request.method, r.request.url, r.text[:300])
    if r.headers.get("content-type", "").startswith("application/json"):
        json.loads(r.content, parse_constant=lambda c: pytest.fail(f"{c} in {r.text[:300]}"))


LIMITS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
QUERY = st.dictionaries(st.sampled_from(["limit", "cursor", "since", "until", "model", "current", "channel", "device"]),
                        st.text(max_size=40) | st.sampled_from(["²", "9" * 30, "1e400", "nan", "WzEuMCwgMWUzMF0"]),
                        max_size=4)


def requests_to(url: str) -> None:
    """Run in a worker thread: the gateway serves on the trio thread meanwhile."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:

        @LIMITS
        @given(route=st.sampled_from([("POST", "/paku/devices"), ("PATCH", "/paku/devices/pk-1"),
                                      ("POST", "/paku/claim")]), body=bodies())
        def send(route: tuple[str, str], body: bytes) -> None:
            strict(client.request(*route, content=body))

        @LIMITS
        @given(device=st.text(min_size=1, max_size=40).filter(lambda s: s not in (".", "..")), query=QUERY,
               firmware=st.integers(min_value=0, max_value=10**30))
        def get(device: str, query: dict[str, str], firmware: int) -> None:
            for path in (f"/paku/devices/{quote(device, safe='')}", "/paku/devices/pk-1/telemetry",
                         "/paku/ota/manifest.json", f"/paku/ota/{firmware}/firmware.bin"):
                strict(client.get(path, params=query))

        send()
        get()


@pytest.mark.timeout(600)
async def test_generated_requests_never_answer_500(gateway_factory):
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        await client.post("/paku/devices", headers=AUTH, json={"id": "pk-1"})
        await trio.to_thread.run_sync(requests_to, gw_url(gw, "main"))
