"""The MQTT edge: devices are acknowledged by the gateway after the commit, relayed to
mosquitto for everything else, and one device cannot stop the others.

Everything runs for real: the gateway with its managed mosquitto, devices as plain
paho clients or as raw sockets speaking MQTT bytes (when a test needs a flag paho
does not let it set, such as DUP).
"""

from __future__ import annotations

import json
import struct

import peewee
import pytest
import trio

from gatewayd.core.mqtt.client import RejectedMessage
from gatewayd.core.storage import StorageFull
from gatewayd.plugins.api import Rejected, hookimpl
from gatewayd.protocol import mqtt_packets as mp
from gatewayd import testing
from gatewayd.testing import DeviceClient, MQTTLogin, device_mqtt, gw_client, gw_mqtt_address, wait_until


class Reading(peewee.Model):
    device = peewee.CharField()
    data = peewee.TextField()

    class Meta:
        table_name = "edgetest_reading"


class EdgePlugin:
    """Stores what devices publish on dev/<id>/data; payloads tell it how to misbehave."""

    def __init__(self) -> None:
        self.stored: list[bytes] = []
        self.calls = 0
        self.release = trio.Event()
        self.full_left = 0

    @hookimpl
    def gatewayd_storage_models(self, models):
        models.add(Reading)

    @hookimpl
    def gatewayd_mqtt_topics(self, topics, ctx):
        self.ctx = ctx
        topics.subscribe("dev/+/data", self.on_data, qos=1)
        topics.acl("dev/%u/#", "write")
        topics.acl("dev/%u/cmd", "read")

    async def on_data(self, msg):
        self.calls += 1
        if msg.payload == b"block":
            await self.release.wait()
        if msg.payload == b"recurse":
            raise RecursionError("maximum recursion depth exceeded")
        if msg.payload == b"bad":
            raise Rejected("bad is never acceptable")
        if msg.payload.startswith(b"full") and self.full_left:
            self.full_left -= 1
            raise StorageFull("database or disk is full")
        device = msg.topic.split("/")[1]
        data = {"text": msg.payload.decode(), "sender": msg.sender}
        await self.ctx.ingest.record(device, "data", data, family_rows=lambda: Reading.insert(
            device=device, data=json.dumps(data, separators=(",", ":"))).execute())
        self.stored.append(msg.payload)


@pytest.fixture
def plugin():
    return EdgePlugin()


@pytest.fixture
async def edge(gateway_factory, plugin):
    async with gateway_factory(plugins=[("edgetest", plugin)], mqtt=True) as gw:
        yield gw, gw_mqtt_address(gw)[1]


async def provision(gw, device_id: str) -> tuple[str, str]:
    creds = await testing.provision(gw, "edgetest", device_id)
    return creds.mqtt.username, creds.mqtt.password


def login(port: int, username: str, password: str) -> MQTTLogin:
    return MQTTLogin("127.0.0.1", port, username, password)


class RawDevice:
    """A device speaking MQTT 3.1.1 bytes over a socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = mp.FrameReader(1 << 20)

    @classmethod
    async def connect(cls, port: int, username: str, password: str, *, keepalive: int = 30,
                      client_id: str | None = None) -> "RawDevice":
        """Log in; the account reaches mosquitto by a reload, so a refusal is retried."""

        async def attempt() -> RawDevice | None:
            dev = cls(await trio.open_tcp_stream("127.0.0.1", port))
            await dev.stream.send_all(connect_packet(client_id or username, username, password, keepalive))
            kind, _, raw, start = await dev.read()
            assert kind == mp.CONNACK
            if mp.parse_connack(raw, start, 4).reason_code == 0:
                return dev
            await dev.stream.aclose()
            return None

        return await wait_until(attempt, step=0.1, what=f"the edge accepts {username!r}")

    async def read(self) -> tuple[int, int, bytes, int]:
        while (frame := self.reader.next_frame()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("closed")
            self.reader.feed(data)
        return frame

    async def publish(self, topic: str, payload: bytes, packet_id: int, *, qos: int = 1, dup: bool = False) -> None:
        await self.stream.send_all(mp.encode_publish(topic, payload, qos, dup=dup, packet_id=packet_id))

    async def expect_ack(self, kind: int = mp.PUBACK) -> int:
        got, _, raw, start = await self.read()
        assert got == kind, f"expected packet type {kind}, got {got}"
        return mp.parse_packet_id(raw, start)


def connect_packet(client_id: str, username: str, password: str, keepalive: int = 30) -> bytes:
    def s(text: str) -> bytes:
        b = text.encode()
        return struct.pack("!H", len(b)) + b

    body = s("MQTT") + bytes([4, 0xC0]) + struct.pack("!H", keepalive) + s(client_id) + s(username) + s(password)
    return bytes([0x10, len(body)]) + body


async def stored_records(gw) -> list[str]:
    return await gw.storage.read(lambda: [r.data for r in Reading.select().order_by(Reading.id)])


# -- the acknowledgement follows the commit ---------------------------------------------


async def test_a_device_is_acknowledged_only_after_the_gateway_committed(edge, plugin):
    gw, port = edge
    user, password = await provision(gw, "d1")
    dev = await RawDevice.connect(port, user, password)
    await dev.publish("dev/d1/data", b"block", packet_id=1)
    await wait_until(lambda: plugin.calls >= 1)
    with trio.move_on_after(0.5) as waited:
        await dev.read()
    assert waited.cancelled_caught, "acknowledged before the handler returned"
    plugin.release.set()
    with trio.fail_after(5):
        assert await dev.expect_ack() == 1
    assert plugin.stored == [b"block"]
    assert any('"block"' in r for r in await stored_records(gw))


async def test_the_handler_sees_who_sent_it_and_mosquitto_never_does(edge, plugin, nursery):
    gw, port = edge
    user, password = await provision(gw, "d1")
    # A second subscriber on mosquitto itself (the gateway's own account) sees nothing
    # of what the gateway consumed: it never reached the broker.
    spy = DeviceClient(gw.mqtt.broker.socket, 1883, *gw.mqtt.broker.gateway_credentials(), "spy")
    assert not (await spy.connect()).is_failure
    try:
        await spy.subscribe("dev/#")
        async with device_mqtt(login(port, user, password)) as dev:
            await dev.publish("dev/d1/data", b"hello")
        assert plugin.stored == [b"hello"]
        assert '"sender":"d1"' in (await stored_records(gw))[-1]
        await trio.sleep(0.3)
        assert spy.received == []
    finally:
        await trio.to_thread.run_sync(spy.close)


# -- one device must not stop the site ------------------------------------------------


async def test_a_handler_crash_rejects_that_message_and_the_next_one_is_stored(edge, plugin):
    gw, port = edge
    user, password = await provision(gw, "d1")
    dev = await RawDevice.connect(port, user, password)
    with trio.fail_after(5):
        await dev.publish("dev/d1/data", b"recurse", packet_id=1)
        assert await dev.expect_ack() == 1  # acknowledged: it must never come back
        await dev.publish("dev/d1/data", b"bad", packet_id=2)
        assert await dev.expect_ack() == 2
        await dev.publish("dev/d1/data", b"fine", packet_id=3)
        assert await dev.expect_ack() == 3
    assert plugin.stored == [b"fine"]
    rejected = await gw.storage.read(lambda: [(r.reason, r.sender) for r in RejectedMessage.select()])
    assert rejected == [("handler error (edgetest): RecursionError: maximum recursion depth exceeded", "d1"),
                        ("bad is never acceptable", "d1")]
    assert gw.mqtt.client.stats.reconnects == 0
    async with gw_client(gw) as client:
        mqtt = (await client.get("/health")).json()["components"]["mqtt"]
        metrics = (await client.get("/metrics")).text
    assert mqtt["state"] == "degraded" and "RecursionError" in mqtt["reason"]
    assert "gatewayd_mqtt_handler_errors_total 1" in metrics


async def test_storage_that_cannot_write_holds_the_ack_until_it_can(edge, plugin):
    gw, port = edge
    user, password = await provision(gw, "d1")
    plugin.full_left = 2
    dev = await RawDevice.connect(port, user, password)
    with trio.fail_after(10):
        await dev.publish("dev/d1/data", b"full", packet_id=9)
        assert await dev.expect_ack() == 9
    assert plugin.calls == 3 and plugin.stored == [b"full"]  # tried until storage took it
    assert gw.mqtt.delivery.stats.storage_waits == 2
    assert await gw.storage.read(lambda: RejectedMessage.select().count()) == 0


async def test_a_flooding_device_fills_its_own_window_not_the_sites(edge, plugin):
    gw, port = edge
    flood_user, flood_pw = await provision(gw, "flood")
    user, password = await provision(gw, "calm")
    flood = await RawDevice.connect(port, flood_user, flood_pw)
    for pid in range(1, 200):  # every one blocks in its handler until released
        await flood.publish("dev/flood/data", b"block", packet_id=pid)
    calm = await RawDevice.connect(port, user, password)
    with trio.fail_after(5):
        await calm.publish("dev/calm/data", b"still here", packet_id=1)
        assert await calm.expect_ack() == 1
    assert plugin.stored == [b"still here"]
    edge_session = next(s for s in gw.mqtt.edge.sessions if s.username == "flood")
    assert len(edge_session.in_flight) == gw.mqtt.edge.per_device  # the rest waits unread
    plugin.release.set()
    with trio.fail_after(10):
        acked = {await flood.expect_ack() for _ in range(199)}
    assert acked == set(range(1, 200))


async def test_an_oversized_packet_closes_only_its_connection(gateway_factory, plugin):
    settings = ["mqtt.max_packet_bytes=4096"]
    async with gateway_factory(plugins=[("edgetest", plugin)], mqtt=True, settings=settings) as gw:
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        await dev.publish("dev/d1/data", b"x" * 5000, packet_id=1)
        with trio.fail_after(5), pytest.raises(EOFError):
            await dev.read()
        assert gw.mqtt.edge.stats.protocol_errors == 1
        again = await RawDevice.connect(port, user, password)
        with trio.fail_after(5):
            await again.publish("dev/d1/data", b"small", packet_id=1)
            assert await again.expect_ack() == 1


# -- redelivery and identity -----------------------------------------------------------


async def test_a_redelivery_of_a_committed_message_is_acknowledged_not_stored_again(edge, plugin):
    gw, port = edge
    user, password = await provision(gw, "d1")
    dev = await RawDevice.connect(port, user, password)
    with trio.fail_after(5):
        await dev.publish("dev/d1/data", b"once", packet_id=7)
        assert await dev.expect_ack() == 7
    await dev.stream.aclose()
    # As after a crash between COMMIT and PUBACK: the device sends it again, DUP set.
    dev = await RawDevice.connect(port, user, password)
    with trio.fail_after(5):
        await dev.publish("dev/d1/data", b"once", packet_id=7, dup=True)
        assert await dev.expect_ack() == 7
        # Same packet id, other content: a different message, stored.
        await dev.publish("dev/d1/data", b"twice", packet_id=7, dup=True)
        assert await dev.expect_ack() == 7
    assert plugin.stored == [b"once", b"twice"]
    assert gw.mqtt.delivery.stats.duplicates == 1
    assert len(await stored_records(gw)) == 2


async def test_qos2_is_answered_by_the_gateway_and_stored_once(edge, plugin):
    gw, port = edge
    user, password = await provision(gw, "d1")
    dev = await RawDevice.connect(port, user, password)
    with trio.fail_after(5):
        await dev.publish("dev/d1/data", b"exactly", packet_id=3, qos=2)
        assert await dev.expect_ack(mp.PUBREC) == 3
        await dev.publish("dev/d1/data", b"exactly", packet_id=3, qos=2, dup=True)  # PUBREC was lost
        assert await dev.expect_ack(mp.PUBREC) == 3
        await dev.stream.send_all(b"\x62\x02\x00\x03")  # PUBREL
        assert await dev.expect_ack(mp.PUBCOMP) == 3
    assert plugin.stored == [b"exactly"]


async def test_a_device_cannot_take_the_gateways_session_or_another_devices(edge, plugin):
    gw, port = edge
    user, password = await provision(gw, "d1")
    other_user, other_pw = await provision(gw, "d2")
    victim = await RawDevice.connect(port, other_user, other_pw)
    reconnects = gw.mqtt.client.stats.reconnects
    # Both ids an attacker would try: the gateway's client id and another device's.
    for stolen in (gw.mqtt.client.settings.client_id, "gatewayd", "d2"):
        dev = await RawDevice.connect(port, user, password, client_id=stolen)
        await dev.stream.aclose()
    with trio.fail_after(5):
        await victim.publish("dev/d2/data", b"mine", packet_id=1)
        assert await victim.expect_ack() == 1
    await trio.sleep(0.3)
    assert gw.mqtt.client.connected and gw.mqtt.client.stats.reconnects == reconnects


async def test_nobody_logs_in_as_the_gateway_through_the_edge(edge):
    gw, port = edge
    user, password = gw.mqtt.broker.gateway_credentials()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(connect_packet("anything", user, password))
    dev = RawDevice(stream)
    with trio.fail_after(5):
        kind, _, raw, start = await dev.read()
    assert kind == mp.CONNACK and mp.parse_connack(raw, start, 4).reason_code == 5  # not authorised
    assert gw.mqtt.client.connected and gw.mqtt.client.stats.reconnects == 0


async def test_a_device_may_not_write_another_devices_topic_through_the_edge(edge, plugin):
    gw, port = edge
    user, password = await provision(gw, "d1")
    await provision(gw, "d2")
    dev = await RawDevice.connect(port, user, password)
    with trio.fail_after(5):
        await dev.publish("dev/d2/data", b"forged", packet_id=1)
        assert await dev.expect_ack() == 1  # mosquitto's answer (3.1.1 acks a refused publish)
        await dev.publish("dev/d1/data", b"own", packet_id=2)
        assert await dev.expect_ack() == 2
    assert plugin.stored == [b"own"]


# -- what mosquitto keeps doing ---------------------------------------------------------


async def test_commands_reach_devices_through_the_relay(edge, plugin):
    gw, port = edge
    user, password = await provision(gw, "d1")
    async with device_mqtt(login(port, user, password)) as dev:
        await dev.subscribe("dev/d1/cmd")
        await gw.contexts["edgetest"].mqtt.publish("dev/d1/cmd", b'{"do":"blink"}')
        await wait_until(lambda: dev.received)
        assert dev.received[0].payload == b'{"do":"blink"}'


async def test_a_busy_device_is_kept_alive_and_a_dead_one_gets_its_will(edge, plugin):
    gw, port = edge
    user, password = await provision(gw, "d1")
    dev = await RawDevice.connect(port, user, password, keepalive=1)
    # Only intercepted PUBLISHes for 3 keepalives: mosquitto sees the edge's pings.
    with trio.fail_after(10):
        for pid in range(1, 16):
            await dev.publish("dev/d1/data", f"n{pid}".encode(), packet_id=pid)
            assert await dev.expect_ack() == pid
            await trio.sleep(0.2)
    assert len(plugin.stored) == 15
    session = next(iter(gw.mqtt.edge.sessions))
    assert session._pings >= 0 and gw.mqtt.edge.stats.connections == 1


async def test_graceful_stop_acknowledges_what_is_in_flight(gateway_factory, plugin):
    async with trio.open_nursery() as nursery:
        async with gateway_factory(plugins=[("edgetest", plugin)], mqtt=True, settings=["gateway.shutdown_grace_s=3"]) as gw:
            port = gw_mqtt_address(gw)[1]
            user, password = await provision(gw, "d1")
            dev = await RawDevice.connect(port, user, password)
            await dev.publish("dev/d1/data", b"block", packet_id=5)
            await wait_until(lambda: plugin.calls >= 1)
            nursery.start_soon(_release_later, plugin)
            gw.request_shutdown()
            with trio.fail_after(5):
                assert await dev.expect_ack() == 5
                with pytest.raises(EOFError):
                    await dev.read()
    assert plugin.stored == [b"block"]


async def _release_later(plugin: EdgePlugin) -> None:
    await trio.sleep(0.3)
    plugin.release.set()
