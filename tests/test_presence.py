"""Presence: coalesced last-seen writes, online/offline transitions per family threshold."""

import trio

from gatewayd.core.devices.presence import Presence
from gatewayd.testing import gw_client, wait_until
from tests.device_services_setup import open_services


async def start(s, nursery, **kw):
    events = []

    async def emit(family, device_id, type, data):
        events.append((family, device_id, type))

    presence = Presence(s.registry, emit=emit, **kw)
    await nursery.start(presence.run)
    return presence, events


async def test_online_then_offline_after_the_family_threshold(tmp_path, autojump_clock):
    async with open_services(tmp_path) as s, trio.open_nursery() as nursery:
        presence, events = await start(s, nursery, offline_after_s=600, flush_s=5)
        presence.offline_after("streetlight", 120)
        presence.touch("streetlight", "SL001")
        presence.touch("kaiabc", "pico_001")
        await trio.sleep(1)
        assert events == [("streetlight", "SL001", "device_online"), ("kaiabc", "pico_001", "device_online")]
        for _ in range(10):  # status every 30 s keeps it online
            await trio.sleep(30)
            presence.touch("streetlight", "SL001")
        assert presence.is_online("streetlight", "SL001")
        await trio.sleep(130)
        assert ("streetlight", "SL001", "device_offline") in events
        assert ("kaiabc", "pico_001", "device_offline") not in events  # 600 s for the default
        await trio.sleep(200)
        assert ("kaiabc", "pico_001", "device_offline") in events
        presence.touch("streetlight", "SL001")
        await trio.sleep(1)
        assert events[-1] == ("streetlight", "SL001", "device_online")
        nursery.cancel_scope.cancel()


async def test_a_device_that_says_it_leaves_is_offline_at_once(tmp_path, autojump_clock):
    async with open_services(tmp_path) as s, trio.open_nursery() as nursery:
        presence, events = await start(s, nursery, offline_after_s=600, flush_s=5)
        presence.touch("paku", "pk-1")
        await trio.sleep(1)
        assert presence.leave("paku", "pk-1", reason="last will") is True
        await trio.sleep(0.1)
        assert not presence.is_online("paku", "pk-1")
        assert events[-1] == ("paku", "pk-1", "device_offline")
        assert presence.leave("paku", "pk-1") is False  # gone already: no second event
        await trio.sleep(700)  # and the sweep does not report it again
        assert [e for e in events if e[2] == "device_offline"] == [("paku", "pk-1", "device_offline")]
        presence.touch("paku", "pk-1")
        await trio.sleep(1)
        assert events[-1] == ("paku", "pk-1", "device_online")
        nursery.cancel_scope.cancel()


async def test_last_seen_is_flushed_in_one_write(tmp_path):
    async with open_services(tmp_path) as s:
        for i in range(20):
            await s.registry.provision("thingsnxt", f"esp{i}")
        presence = Presence(s.registry)
        for _ in range(50):
            for i in range(20):
                presence.touch("thingsnxt", f"esp{i}")
        jobs_before = s.storage.stats["jobs"]
        assert await presence.flush() == 20
        assert s.storage.stats["jobs"] - jobs_before == 1  # 1000 touches, one write job
        devices = await s.registry.list("thingsnxt")
        assert all(d.last_seen is not None and d.first_seen is not None for d in devices)
        assert await presence.flush() == 0  # nothing new: no write at all
        assert s.storage.stats["jobs"] - jobs_before == 1


async def test_a_flush_moves_last_seen_and_keeps_first_seen(tmp_path):
    """record_seen's prepared statements: last_seen follows each flush, first_seen is the
    first one's, a device of the same id in another family is left alone."""
    async with open_services(tmp_path) as s:
        await s.registry.provision("paku", "p1")
        await s.registry.provision("thingsnxt", "p1")
        await s.registry.record_seen({("paku", "p1"): 1_700_000_000.0})
        await s.registry.record_seen({("paku", "p1"): 1_700_000_060.0, ("paku", "unknown"): 1_700_000_060.0})
        paku, other = await s.registry.get("paku", "p1"), await s.registry.get("thingsnxt", "p1")
        assert (paku.first_seen, paku.last_seen) == (1_700_000_000.0, 1_700_000_060.0)
        assert (other.first_seen, other.last_seen) == (None, None)


async def test_the_service_flushes_by_itself(tmp_path):
    async with open_services(tmp_path) as s, trio.open_nursery() as nursery:
        await s.registry.provision("paku", "p1")
        presence = Presence(s.registry, flush_s=0.05)
        await nursery.start(presence.run)
        presence.touch("paku", "p1")

        async def seen():
            return (await s.registry.get("paku", "p1")).last_seen is not None

        await wait_until(seen)
        nursery.cancel_scope.cancel()


async def test_a_failing_consumer_does_not_stop_presence(tmp_path, autojump_clock):
    async with open_services(tmp_path) as s, trio.open_nursery() as nursery:
        seen = []

        async def emit(family, device_id, type, data):
            seen.append(device_id)
            raise RuntimeError("events engine broke")

        presence = Presence(s.registry, emit=emit, flush_s=5)
        await nursery.start(presence.run)
        presence.touch("paku", "a")
        presence.touch("paku", "b")
        await trio.sleep(1)
        assert seen == ["a", "b"]
        nursery.cancel_scope.cancel()


async def test_gateway_presence_is_fed_by_auth(gateway_factory):
    # Real time here (the gateway's HTTP and storage threads don't mix with autojump).
    from tests import plugin_devices

    with trio.fail_after(20):
        async with gateway_factory(plugins=[("meter", plugin_devices)],
                                   settings=["devices.presence_flush_s=0.05"]) as gw:
            _, creds = await gw.devices.registry.provision("meter", "m1")
            events = []

            async def emit(family, device_id, type, data):
                events.append((family, device_id, type))

            gw.devices.presence.emit = emit
            gw.devices.presence.offline_after("meter", 0.2)
            async with gw_client(gw) as client:
                assert (await client.post("/meter/ingest", headers={"X-API-Key": creds.key})).status_code == 200
            await wait_until(lambda: len(events) >= 2)
            assert events == [("meter", "m1", "device_online"), ("meter", "m1", "device_offline")]

            async def seen():
                return (await gw.devices.registry.get("meter", "m1")).last_seen is not None

            await wait_until(seen)
