"""Generated requests to every core admin route: never a 500, always strict JSON back.

Hypothesis draws bodies (JSON of any shape, with the admin fields in it, then spoiled:
NaN, huge numbers, deep nesting, bytes that are not UTF-8), ids and query strings;
a real gateway answers them. The examples are derandomized and bounded, so the test
is the same in every run.
"""

import json
import types
from urllib.parse import quote

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.testing import gw_client, gw_url

TOKEN = "admin-secret-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEVICES = "/api/gateway/devices"
FIELDS = ["family", "id", "name", "model", "firmware", "metadata", "key", "signing_secret", "device_id", "ttl_s",
          "grace_s", "payload", "priority"]

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**30), max_value=10**30)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30) | st.sampled_from(["meter", "m1"]))
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
    """Not a 500, and a body strict parsers accept."""
    assert r.status_code < 500, (r.request.method, r.request.url, r.text[:300])
    json.loads(r.content, parse_constant=lambda c: pytest.fail(f"{c} in {r.text[:300]}"))


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


LIMITS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def requests_to(url: str) -> None:
    """Run in a worker thread: the gateway serves on the trio thread meanwhile."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:

        @LIMITS
        @given(path=st.sampled_from([DEVICES, f"{DEVICES}/claim-codes", f"{DEVICES}/m1/rotate",
                                     f"{DEVICES}/m1/commands", f"{DEVICES}/m1/disable"]), body=bodies())
        def post(path: str, body: bytes) -> None:
            strict(client.post(path, content=body))

        @LIMITS
        @given(device=st.text(min_size=1, max_size=40).filter(lambda s: s not in (".", "..")),
               query=st.dictionaries(st.sampled_from(["family", "status", "limit", "cursor", "since", "until", "state",
                                                      "type", "severity"]), st.text(max_size=40), max_size=4))
        def get(device: str, query: dict[str, str]) -> None:
            for path in (DEVICES, f"{DEVICES}/{quote(device, safe='')}",
                         "/api/gateway/events", "/api/gateway/alerts"):
                strict(client.get(path, params=query))

        post()
        get()


@pytest.mark.timeout(600)
async def test_generated_requests_never_answer_500(gateway_factory):
    async with gateway_factory(plugins=[("meter", types.ModuleType("meter"))]) as gw, gw_client(gw):
        await gw.devices.registry.provision("meter", "m1")
        await trio.to_thread.run_sync(requests_to, gw_url(gw, "main"))
