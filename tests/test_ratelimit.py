"""Token buckets: limits, refill, headers, 429 with Retry-After, bounded memory."""

import pytest
import trio

from gatewayd.core.devices.ratelimit import FamilyRateLimits, RateLimiter
from gatewayd.testing import gw_client
from tests import plugin_devices
from tests.device_services_setup import FakeClock


def limiter(**kw):
    clock = FakeClock(0.0)
    return RateLimiter(clock=clock, wall_clock=lambda: 1_700_000_000.0 + clock.now, **kw), clock


def test_limit_then_refuse_then_refill():
    rl, clock = limiter()
    rl.define("ingest", 100, 60)
    decisions = [rl.check("pico_001", "ingest") for _ in range(100)]
    assert all(d.allowed for d in decisions) and decisions[-1].remaining == 0
    refused = rl.check("pico_001", "ingest")
    assert not refused.allowed and refused.retry_after_s == pytest.approx(0.6)
    clock.advance(0.6)
    assert rl.check("pico_001", "ingest").allowed
    assert not rl.check("pico_001", "ingest").allowed
    clock.advance(60)
    assert rl.check("pico_001", "ingest").remaining == 99


def test_keys_and_classes_are_separate():
    rl, _ = limiter()
    rl.define("query", 2, 60)
    rl.define("config", 1, 60)
    assert rl.check("a", "config").allowed and not rl.check("a", "config").allowed
    assert rl.check("a", "query").allowed and rl.check("b", "config").allowed
    with pytest.raises(KeyError, match="nope"):
        rl.check("a", "nope")


def test_headers():
    rl, clock = limiter()
    rl.define("query", 60, 60)
    d = rl.check("a", "query")
    h = rl.headers(d)
    assert h == {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "59", "X-RateLimit-Reset": "1700000001"}
    assert rl.headers(d, reset="delta")["X-RateLimit-Reset"] == "1"
    for _ in range(59):
        rl.check("a", "query")
    h = rl.headers(rl.check("a", "query"))
    assert h["X-RateLimit-Remaining"] == "0" and h["Retry-After"] == "1"


def test_memory_is_bounded_and_idle_buckets_go():
    rl, clock = limiter(max_buckets=100)
    rl.define("c", 10, 10)
    for i in range(1000):
        rl.check(f"client-{i}", "c")
    assert len(rl) <= 100
    clock.advance(100)  # every bucket refilled: idle ones are dropped on the next check
    rl.check("fresh", "c")
    assert len(rl) == 1


def test_bad_class():
    with pytest.raises(ValueError):
        RateLimiter().define("x", 0, 60)


def test_family_scoping():
    rl, _ = limiter()
    kai, tnx = FamilyRateLimits(rl, "kaiabc"), FamilyRateLimits(rl, "thingsnxt")
    kai.define("ingest", 1, 60)
    tnx.define("ingest", 100, 60)
    assert kai.check("n1", "ingest").allowed and not kai.check("n1", "ingest").allowed
    assert tnx.check("n1", "ingest").allowed


async def test_trio_clock_by_default(autojump_clock):
    rl = RateLimiter()
    rl.define("c", 1, 10)
    assert rl.check("k", "c").allowed and not rl.check("k", "c").allowed
    await trio.sleep(10)
    assert rl.check("k", "c").allowed


async def test_http_429_and_headers(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=[("meter", plugin_devices)]) as gw:  # meter: 5 per 60 s
            _, creds = await gw.devices.registry.provision("meter", "m1")
            async with gw_client(gw) as client:
                answers = [await client.post("/meter/ingest", headers={"X-API-Key": creds.key}) for _ in range(6)]
            assert [r.status_code for r in answers] == [200] * 5 + [429]
            assert answers[0].headers["X-RateLimit-Limit"] == "5"
            assert answers[0].headers["X-RateLimit-Remaining"] == "4"
            assert int(answers[-1].headers["Retry-After"]) >= 1
