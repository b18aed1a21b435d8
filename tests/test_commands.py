"""The command queue: life cycle, priority, expiry, MQTT push, and a restart in between."""

import json

import pytest
import trio

from gatewayd.core.devices.commands import CommandQueue
from gatewayd.testing import gw_client, wait_until
from tests import plugin_devices
from tests.device_services_setup import FakeClock, open_services


async def test_life_cycle_poll_then_ack(tmp_path):
    async with open_services(tmp_path) as s:
        q = s.commands
        c = await q.enqueue("streetlight", "SL001", {"command_type": "power_control", "action": "on"})
        assert c.status == "pending"
        [got] = await q.next_for("streetlight", "SL001")
        assert (got.id, got.status, got.attempts) == (c.id, "delivered", 1)
        assert await q.next_for("streetlight", "SL001") == []  # handed out once
        done = await q.ack(c.id, True, {"brightness": 100})
        assert (done.status, done.result) == ("executed", {"brightness": 100})
        again = await q.ack(c.id, False, "late duplicate")
        assert (again.status, again.result) == ("executed", {"brightness": 100})  # a repeated ack changes nothing


async def test_failed_ack_and_foreign_ack(tmp_path):
    async with open_services(tmp_path) as s:
        c = await s.commands.enqueue("paku", "p1", {"relay": 1})
        assert await s.commands.ack(c.id, True, device_id="p2") is None
        assert await s.commands.ack(c.id, True, family="kaiabc") is None
        assert await s.commands.ack("no-such-id", True) is None
        assert (await s.commands.ack(c.id, False, {"error": "relay stuck"}, device_id="p1")).status == "failed"


async def test_priority_then_age(tmp_path):
    async with open_services(tmp_path) as s:
        q = s.commands
        low = await q.enqueue("paku", "p1", "low")
        high = await q.enqueue("paku", "p1", "high", priority=5)
        low2 = await q.enqueue("paku", "p1", "low2")
        await q.enqueue("paku", "p2", "other device")
        got = await q.next_for("paku", "p1", limit=10)
        assert [c.id for c in got] == [high.id, low.id, low2.id]


async def test_expiry(tmp_path):
    clock = FakeClock()
    async with open_services(tmp_path, clock=clock) as s:
        q = s.commands
        short = await q.enqueue("paku", "p1", "short", ttl_s=30)
        long = await q.enqueue("paku", "p1", "long", ttl_s=3600)
        delivered = await q.enqueue("paku", "p2", "x", ttl_s=30)
        await q.next_for("paku", "p2")
        clock.advance(31)
        # Not handed out even before the sweep ran...
        assert [c.id for c in await q.next_for("paku", "p1", limit=10)] == [long.id]
        assert await q.expire() == 2
        assert (await q.get(short.id)).status == "expired"
        assert (await q.get(delivered.id)).status == "expired"
        assert (await q.ack(delivered.id, True)).status == "expired"  # an ack after expiry changes nothing
        with pytest.raises(ValueError):
            await q.enqueue("paku", "p1", "x", ttl_s=0)
        with pytest.raises(ValueError, match="JSON"):
            await q.enqueue("paku", "p1", {1, 2})


async def test_redelivery_of_unacknowledged(tmp_path):
    clock = FakeClock()
    async with open_services(tmp_path, clock=clock) as s:
        c = await s.commands.enqueue("streetlight", "SL001", {"action": "off"})
        await s.commands.next_for("streetlight", "SL001")
        assert await s.commands.next_for("streetlight", "SL001", redeliver_after_s=60) == []
        clock.advance(61)
        [again] = await s.commands.next_for("streetlight", "SL001", redeliver_after_s=60)
        assert (again.id, again.attempts) == (c.id, 2)


async def test_push_over_mqtt_publisher(tmp_path):
    published = []

    async def publish(topic, payload):
        published.append((topic, json.loads(payload)))

    async with open_services(tmp_path) as s:
        q = s.commands
        with pytest.raises(RuntimeError, match="publisher"):
            await q.push("paku", "p1", "paku/p1/cmd")
        q.publish = publish
        a = await q.enqueue("paku", "p1", {"relay": "on"})
        b = await q.enqueue("paku", "p1", {"relay": "off"}, priority=1)
        assert await q.push("paku", "p1", "paku/p1/cmd") == 2
        assert published == [("paku/p1/cmd", {"command_id": b.id, "relay": "off"}),
                             ("paku/p1/cmd", {"command_id": a.id, "relay": "on"})]
        assert {c.status for c in await q.list("paku", "p1")} == {"delivered"}
        assert await q.push("paku", "p1", "paku/p1/cmd") == 0
        c = await q.enqueue("paku", "p1", {"relay": "on"})
        await q.ack(a.id, True)
        open_ = await q.list("paku", "p1", status=("pending", "delivered"))  # one read: not acknowledged yet
        assert [(x.id, x.status) for x in open_] == [(c.id, "pending"), (b.id, "delivered")]
        assert [x.id for x in await q.list("paku", "p1", status="executed")] == [a.id]


async def test_a_listener_pushes_on_enqueue_and_may_fail(tmp_path):
    async with open_services(tmp_path) as s:
        seen = []
        s.commands.listeners["paku"] = seen.append
        c = await s.commands.enqueue("paku", "p1", {"relay": "on"})
        assert [x.id for x in seen] == [c.id]

        def broken(command):
            raise RuntimeError("broker down")

        s.commands.listeners["paku"] = broken
        c2 = await s.commands.enqueue("paku", "p1", {"relay": "off"})  # stored regardless
        assert (await s.commands.get(c2.id)).status == "pending"


async def test_sweep_service(tmp_path):
    # Real time: the sweep writes through the storage thread, which autojump can't see.
    clock = FakeClock()
    async with open_services(tmp_path, clock=clock) as s, trio.open_nursery() as nursery:
        q = CommandQueue(s.storage, clock=clock, sweep_s=0.05)
        await nursery.start(q.run)
        c = await q.enqueue("paku", "p1", "x", ttl_s=10)
        clock.advance(11)

        async def expired():
            return (await q.get(c.id)).status == "expired"

        await wait_until(expired)
        nursery.cancel_scope.cancel()


async def test_commands_survive_a_gateway_restart(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=[("meter", plugin_devices)]) as gw:
            await gw.devices.registry.provision("meter", "m1", key="m1-token-for-tests")
            first = await gw.devices.commands.enqueue("meter", "m1", {"action": "on"}, priority=1)
            second = await gw.devices.commands.enqueue("meter", "m1", {"action": "off"})
            async with gw_client(gw) as client:
                r = await client.get("/meter/commands", params={"device_token": "m1-token-for-tests"})
                assert [c["id"] for c in r.json()["commands"]] == [first.id, second.id]
        # The second gateway on the same data_dir: deliveries and queue are as they were.
        async with gateway_factory(plugins=[("meter", plugin_devices)]) as gw:
            third = await gw.devices.commands.enqueue("meter", "m1", {"action": "dim"})
            async with gw_client(gw) as client:
                r = await client.get("/meter/commands", params={"device_token": "m1-token-for-tests"})
                assert [c["id"] for c in r.json()["commands"]] == [third.id]
                r = await client.post(f"/meter/commands/{first.id}/ack",
                                      json={"device_token": "m1-token-for-tests", "ok": True, "result": {"on": True}})
                assert r.json() == {"ok": True, "status": "executed"}
                r = await client.post("/meter/commands/nope/ack", json={"device_token": "m1-token-for-tests", "ok": True})
                assert r.status_code == 404
            statuses = {c.id: c.status for c in await gw.devices.commands.list("meter", "m1")}
            assert statuses == {first.id: "executed", second.id: "delivered", third.id: "delivered"}


async def test_bad_arguments_are_value_errors_naming_them(tmp_path):
    """Before: NaN payloads stored and later sent as `{"v":NaN}`, an infinite ttl_s stored
    as `expires_at: Infinity`, a priority of 10**30 an SQLite OverflowError."""
    async with open_services(tmp_path) as s:
        q = s.commands
        cases = [
            (("p1", {"v": float("nan")}), {}, "payload: not storable as strict JSON"),
            (("p1", [float("inf")]), {}, "payload: not storable as strict JSON"),
            (("p1", "x" * 70_000), {}, "payload: 70002 characters of JSON, more than 65536"),
            (("p1", {}), {"ttl_s": float("inf")}, "ttl_s: expected a number of seconds > 0"),
            (("p1", {}), {"ttl_s": float("nan")}, "ttl_s: expected a number of seconds > 0"),
            (("p1", {}), {"ttl_s": 1e300}, "ttl_s: expected a number of seconds > 0"),
            (("p1", {}), {"priority": 10**30}, "priority: expected an integer"),
            (("p1", {}), {"priority": -(10**30)}, "priority: expected an integer"),
            (("p1", {}), {"priority": 1.5}, "priority: expected an integer"),
        ]
        for args, kwargs, message in cases:
            with pytest.raises(ValueError) as e:
                await q.enqueue("paku", *args, **kwargs)
            assert str(e.value).startswith(message), str(e.value)
        assert await q.list() == []
        c = await q.enqueue("paku", "p1", {"v": 1}, priority=2**63 - 1)
        with pytest.raises(ValueError, match="result: not storable"):
            await q.ack(c.id, True, {"v": float("nan")})
        assert (await q.get(c.id)).status == "pending"


async def test_open_commands_from_memory_follow_every_change_and_a_restart(tmp_path, monkeypatch):
    clock = FakeClock()
    async with open_services(tmp_path, clock=clock) as s:
        q = s.commands
        await q.load()
        reads = []
        real_read = s.storage.read

        async def counted(fn, *args):
            reads.append(fn)
            return await real_read(fn, *args)

        monkeypatch.setattr(s.storage, "read", counted)
        assert await q.open_for("paku", "p1") == []
        a = await q.enqueue("paku", "p1", "a", ttl_s=30)
        b = await q.enqueue("paku", "p1", "b", ttl_s=3600)
        await q.enqueue("paku", "p2", "other device", ttl_s=3600)
        assert [(c.id, c.status) for c in await q.open_for("paku", "p1")] == [(a.id, "pending"), (b.id, "pending")]
        [taken] = await q.next_for("paku", "p1")
        assert [(c.id, c.status) for c in await q.open_for("paku", "p1")] == [(a.id, "delivered"), (b.id, "pending")]
        await q.ack(taken.id, True)
        assert [c.id for c in await q.open_for("paku", "p1")] == [b.id]
        assert reads == []  # polls of the open commands read nothing: memory follows the writes
        clock.advance(3601)
        assert await q.expire() == 2
        assert await q.open_for("paku", "p1") == [] and await q.open_for("paku", "p2") == []
        c = await q.enqueue("paku", "p1", "c")
        monkeypatch.setattr(s.storage, "read", real_read)
        # A restart: a new queue on the same database loads what is open.
        restarted = CommandQueue(s.storage, clock=clock)
        assert [x.id for x in await restarted.open_for("paku", "p1")] == [c.id]  # before load: from the database
        await restarted.load()
        assert [(x.id, x.status) for x in await restarted.open_for("paku", "p1")] == [(c.id, "pending")]


async def test_commands_another_process_queued_are_read_in_and_told(tmp_path):
    async with open_services(tmp_path) as s:
        daemon, cli = s.commands, CommandQueue(s.storage)  # the CLI's queue: the same table, not this memory
        await daemon.load()
        told = []
        daemon.listeners["paku"] = told.append
        mine = await daemon.enqueue("paku", "p1", "mine")
        theirs = await cli.enqueue("paku", "p1", "theirs")
        assert [c.id for c in await daemon.open_for("paku", "p1")] == [mine.id]
        assert await daemon.refresh() == 1
        assert [c.id for c in await daemon.open_for("paku", "p1")] == [mine.id, theirs.id]
        assert [c.id for c in told] == [mine.id, theirs.id]  # each once: a push for the CLI's too
        assert await daemon.refresh() == 0
        # Acknowledged before the daemon looked: nothing to read in.
        gone = await cli.enqueue("paku", "p1", "gone")
        await cli.ack(gone.id, True)
        assert await daemon.refresh() == 0 and gone.id not in [c.id for c in await daemon.open_for("paku", "p1")]
