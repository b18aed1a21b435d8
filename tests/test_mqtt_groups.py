"""Group handlers (`topics.subscribe_group`): what one read of a device brought, stored
with one ingest call, each message acknowledged after that commit and rejected alone.

The gateway, its mosquitto and the device's bytes are real: several PUBLISH packets
sent in one write reach the edge in one read, so they come to the handler together.
"""

from __future__ import annotations

import json

import peewee
import trio

from gatewayd.core.mqtt.client import RejectedMessage
from gatewayd.core.mqtt.marks import Seen
from gatewayd.core.storage import StorageFull
from gatewayd.plugins.api import InboundMessage, Record, Rejected, hookimpl
from gatewayd.protocol import mqtt_packets as mp
from gatewayd import testing
from gatewayd.testing import gw_mqtt_address, wait_until

from .test_mqtt_edge import RawDevice
from .test_mqtt_marks import written_mark


class Row(peewee.Model):
    device = peewee.CharField()
    text = peewee.TextField()

    class Meta:
        table_name = "grouptest_row"


class GroupPlugin:
    """Stores what devices publish on dev/<id>/data, a group at a time; `bad` is rejected."""

    def __init__(self) -> None:
        self.groups: list[list[bytes]] = []
        self.full_after_ingest = 0  # raise StorageFull after the ingest call, this many times
        self.ingest_calls = 1  # per group: more breaks the contract
        self.release = trio.Event()  # a group holding b"block" waits for it

    @hookimpl
    def gatewayd_storage_models(self, models):
        models.add(Row)

    @hookimpl
    def gatewayd_mqtt_topics(self, topics, ctx):
        self.ctx = ctx
        topics.subscribe_group("dev/+/data", self.on_data, qos=1)
        topics.acl("dev/%u/#", "write")

    async def on_data(self, msgs):
        self.groups.append([m.payload for m in msgs])
        if any(m.payload == b"block" for m in msgs):
            await self.release.wait()
        outcomes, records, rows = [], [], []
        for msg in msgs:
            if msg.payload == b"bad":
                outcomes.append(Rejected("bad is never acceptable"))
                continue
            device = msg.topic.split("/")[1]
            outcomes.append(None)
            records.append(Record(device, "data", {"text": msg.payload.decode()}))
            rows.append((device, msg.payload.decode()))
        for _ in range(self.ingest_calls):
            await self.ctx.ingest.records(records, family_rows=lambda: Row.insert_many(
                rows, fields=[Row.device, Row.text]).execute())
        if self.full_after_ingest:
            self.full_after_ingest -= 1
            raise StorageFull("database or disk is full")
        return outcomes


async def provision(gw, device_id: str) -> tuple[str, str]:
    creds = await testing.provision(gw, "grouptest", device_id)
    return creds.mqtt.username, creds.mqtt.password


async def stored(gw) -> list[str]:
    return await gw.storage.read(lambda: [r.text for r in Row.select().order_by(Row.id)])


async def send_together(dev: RawDevice, payloads: list[bytes], first_id: int = 1) -> None:
    """One write: the edge reads them at once."""
    await dev.stream.send_all(b"".join(mp.encode_publish("dev/d1/data", p, 1, packet_id=first_id + i)
                                       for i, p in enumerate(payloads)))


async def acks(dev: RawDevice, n: int) -> list[int]:
    with trio.fail_after(10):
        return sorted([await dev.expect_ack() for _ in range(n)])


async def test_one_read_is_one_group_with_one_commit_and_a_bad_message_is_rejected_alone(gateway_factory):
    plugin = GroupPlugin()
    async with gateway_factory(plugins=[("grouptest", plugin)], mqtt=True) as gw:
        gw.mqtt.marks.flush_s = 3600.0  # group marks are written with the records, not by the timer
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        await send_together(dev, [b"m-1", b"m-2", b"bad", b"m-4", b"m-5"])
        assert await acks(dev, 5) == [1, 2, 3, 4, 5]
        assert plugin.groups == [[b"m-1", b"m-2", b"bad", b"m-4", b"m-5"]]
        assert await stored(gw) == ["m-1", "m-2", "m-4", "m-5"]
        rejected = await gw.storage.read(lambda: [(r.payload, r.reason) for r in RejectedMessage.select()])
        assert rejected == [(b"bad", "bad is never acceptable")]
        stats = gw.mqtt.delivery.stats
        assert (stats.handled, stats.rejected) == (4, 1)
        assert gw.mqtt.marks.unwritten == 0  # nothing left to write later: every mark is final already
        for pid, payload in enumerate([b"m-1", b"m-2", b"bad", b"m-4", b"m-5"], start=1):
            assert await written_mark(gw, user, pid, "dev/d1/data", payload) == Seen(None)


async def test_a_resend_of_a_message_stored_in_a_group_is_a_duplicate(gateway_factory):
    plugin = GroupPlugin()
    async with gateway_factory(plugins=[("grouptest", plugin)], mqtt=True) as gw:
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        await send_together(dev, [b"m-1", b"m-2", b"m-3"])
        assert await acks(dev, 3) == [1, 2, 3]
        await dev.stream.aclose()  # the PUBACKs were lost: the device sends one again, DUP
        dev = await RawDevice.connect(port, user, password)
        with trio.fail_after(10):
            await dev.publish("dev/d1/data", b"m-2", packet_id=2, dup=True)
            assert await dev.expect_ack() == 2
        assert len(plugin.groups) == 1  # the handler did not run for it
        assert gw.mqtt.delivery.stats.duplicates == 1
        assert await stored(gw) == ["m-1", "m-2", "m-3"]


async def test_a_resend_while_its_group_is_delivered_waits_for_its_verdict(gateway_factory):
    plugin = GroupPlugin()
    async with gateway_factory(plugins=[("grouptest", plugin)], mqtt=True) as gw:
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        await send_together(dev, [b"m-1", b"block"])
        await wait_until(lambda: plugin.groups)
        await dev.stream.aclose()  # it reconnects and sends m-1 again while the group waits
        dev = await RawDevice.connect(port, user, password)
        await dev.publish("dev/d1/data", b"m-1", packet_id=1, dup=True)
        await wait_until(lambda: gw.mqtt.pool.in_flight == 2)  # the group, and the resend waiting for it
        plugin.release.set()
        with trio.fail_after(10):
            assert await dev.expect_ack() == 1
        assert gw.mqtt.delivery.stats.duplicates == 1
        assert len(plugin.groups) == 1
        assert await stored(gw) == ["m-1", "block"]


async def test_storage_failing_after_the_ingest_call_reruns_the_group_and_stores_it_once(gateway_factory):
    plugin = GroupPlugin()
    plugin.full_after_ingest = 1
    async with gateway_factory(plugins=[("grouptest", plugin)], mqtt=True) as gw:
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        await send_together(dev, [b"m-1", b"m-2"])
        assert await acks(dev, 2) == [1, 2]
        assert len(plugin.groups) == 2  # run again after the storage wait
        assert gw.mqtt.delivery.stats.storage_waits == 1
        assert await stored(gw) == ["m-1", "m-2"]  # the second run's call answered, not stored


async def test_a_second_ingest_call_in_a_group_is_a_handler_error(gateway_factory):
    plugin = GroupPlugin()
    plugin.ingest_calls = 2
    async with gateway_factory(plugins=[("grouptest", plugin)], mqtt=True) as gw:
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        await send_together(dev, [b"m-1", b"m-2"])
        assert await acks(dev, 2) == [1, 2]
        reasons = await gw.storage.read(lambda: [r.reason for r in RejectedMessage.select()])
        assert len(reasons) == 2 and all("one ctx.ingest call per group" in r for r in reasons), reasons
        assert gw.mqtt.delivery.stats.handler_errors == 1


async def test_a_group_handler_called_with_one_message_gets_a_group_of_one(gateway_factory):
    """A message that comes alone (through a broker, a resend, QoS 2) goes through the
    same handler: the registered handler takes one message and raises its rejection."""
    plugin = GroupPlugin()
    async with gateway_factory(plugins=[("grouptest", plugin)], mqtt=True) as gw:
        handler = gw.mqtt.router.handlers_for("dev/d1/data")[0]
        await handler(InboundMessage("dev/d1/data", b"alone", 1, False, False))
        try:
            await handler(InboundMessage("dev/d1/data", b"bad", 1, False, False))
        except Rejected as e:
            assert e.reason == "bad is never acceptable"
        else:
            raise AssertionError("not rejected")
        assert plugin.groups == [[b"alone"], [b"bad"]]
        assert await stored(gw) == ["alone"]


def test_the_registry_checks_a_group_handlers_qos():
    from gatewayd.plugins.api import TopicRegistry

    topics = TopicRegistry("x")

    async def handler(msgs):
        return [None for _ in msgs]

    try:
        topics.subscribe_group("x/+/data", handler, qos=2)
    except ValueError as e:
        assert "qos must be 0 or 1" in str(e)
    else:
        raise AssertionError("qos 2 taken")
    topics.subscribe_group("x/+/data", handler)
    assert json.dumps([s.filter for s in topics.subscriptions]) == '["x/+/data"]'


async def test_an_mqtt5_group_acknowledges_each_message_and_refuses_only_the_bad_one(gateway_factory):
    """A group's PUBACKs are built together (one write): under MQTT 5 each carries its
    own reason code, 0x99 (payload format invalid) for the rejected message alone."""
    from .test_mqtt_edge_review import connect_v5

    plugin = GroupPlugin()
    async with gateway_factory(plugins=[("grouptest", plugin)], mqtt=True) as gw:
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        await RawDevice.connect(port, user, password)  # the account is loaded
        dev, _ = await connect_v5(port, user, password)
        await dev.stream.send_all(b"".join(mp.encode_publish("dev/d1/data", p, 1, packet_id=i, protocol_level=5)
                                           for i, p in enumerate([b"m-1", b"bad", b"m-3"], start=1)))
        codes = {}
        with trio.fail_after(10):
            while len(codes) < 3:
                kind, _, raw, start = await dev.read()
                assert kind == mp.PUBACK
                pid = mp.parse_packet_id(raw, start)
                codes[pid] = raw[start + 2] if len(raw) > start + 2 else 0
        assert codes == {1: 0, 2: 0x99, 3: 0}
        assert plugin.groups == [[b"m-1", b"bad", b"m-3"]]
        assert await stored(gw) == ["m-1", "m-3"]
        stats = gw.mqtt.edge.stats
        assert (stats.acked, stats.refused_acks) == (3, 1)
