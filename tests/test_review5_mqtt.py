"""Review of the MQTT group path's hot-path changes: a group's PUBACKs built in one reply
call (commit dc4f9bc) and a mark's digest in one BLAKE2b call (commit 1d15273).

Real gateway, real mosquitto, a device's real bytes (several PUBLISH packets in one write
are one group)."""

from __future__ import annotations

import hashlib

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.core.mqtt.marks import digest
from gatewayd.protocol import mqtt_packets as mp
from gatewayd.testing import gw_mqtt_address, wait_until

from .test_mqtt_edge import RawDevice
from .test_mqtt_edge_review import connect_v5
from .test_mqtt_groups import GroupPlugin, provision, send_together, stored


def _old_digest(topic: str, payload: bytes) -> bytes:
    """The digest as marks.py computed it before 1d15273 (marks in databases hold these)."""
    h = hashlib.blake2b(topic.encode("utf-8", "surrogatepass"), digest_size=16)
    h.update(b"\0")
    h.update(payload)
    return h.digest()


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40), st.binary(max_size=300))
def test_a_marks_digest_is_the_one_older_releases_wrote(topic, payload):
    assert digest(topic, payload) == _old_digest(topic, payload)
    assert digest(topic, bytearray(payload)) == _old_digest(topic, payload)
    assert digest(topic, memoryview(payload)) == _old_digest(topic, payload)


def test_a_marks_digest_edges():
    for topic, payload in [("", b""), ("a\0b", b"\0"), ("\ud800/x", b"%s%s"), ("é/日本", b"\xff" * 70000)]:
        assert digest(topic, payload) == _old_digest(topic, payload)


async def _read_acks(dev: RawDevice, n: int) -> dict[int, int]:
    """packet id -> reason code of the next `n` PUBACKs (0 when the packet carries none)."""
    codes: dict[int, int] = {}
    with trio.fail_after(10):
        while len(codes) < n:
            kind, _, raw, start = await dev.read()
            assert kind == mp.PUBACK
            codes[mp.parse_packet_id(raw, start)] = raw[start + 2] if len(raw) > start + 2 else 0
    return codes


async def test_an_mqtt5_group_of_qos_0_and_1_with_bad_ones_in_the_middle(gateway_factory):
    """Acknowledged: the QoS 1 messages alone, each with its own code; the QoS 0 ones take a
    window slot and give it back too (the connection goes on taking messages)."""
    plugin = GroupPlugin()
    async with gateway_factory(plugins=[("grouptest", plugin)], mqtt=True) as gw:
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        await RawDevice.connect(port, user, password)  # the account is loaded
        dev, _ = await connect_v5(port, user, password)
        sent = [(b"m-1", 1, 1), (b"m-2", 0, None), (b"bad", 1, 3), (b"bad", 0, None), (b"m-5", 1, 5)]
        await dev.stream.send_all(b"".join(mp.encode_publish("dev/d1/data", p, q, packet_id=pid, protocol_level=5)
                                           for p, q, pid in sent))
        assert await _read_acks(dev, 3) == {1: 0, 3: 0x99, 5: 0}
        assert plugin.groups == [[b"m-1", b"m-2", b"bad", b"bad", b"m-5"]]
        assert await stored(gw) == ["m-1", "m-2", "m-5"]
        await wait_until(lambda: gw.mqtt.pool.in_flight == 0)
        assert gw.mqtt.edge.window(user).size == 0  # every slot given back, QoS 0 ones too
        stats = gw.mqtt.edge.stats
        assert (stats.acked, stats.refused_acks) == (3, 1)
        await dev.stream.send_all(mp.encode_publish("dev/d1/data", b"m-6", 1, packet_id=6, protocol_level=5))
        assert await _read_acks(dev, 1) == {6: 0}


async def test_a_device_gone_mid_group_then_the_gateway_restarted_a_resend_is_a_duplicate(gateway_factory):
    """The group commits after its device left: no PUBACK goes anywhere (stale), the window is
    given back; after a restart of the gateway the device's resends are recognised by their
    marks (the same digest), and one with other content under a used id is delivered anew."""
    plugin = GroupPlugin()
    async with gateway_factory(plugins=[("grouptest", plugin)], mqtt=True) as gw:
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        await send_together(dev, [b"m-1", b"block", b"m-3"])
        await wait_until(lambda: plugin.groups)
        await dev.stream.aclose()
        await wait_until(lambda: not gw.mqtt.edge.sessions)  # the edge saw it go, the group still running
        assert gw.mqtt.pool.in_flight == 1
        plugin.release.set()
        await wait_until(lambda: gw.mqtt.edge.stats.stale_acks == 3)
        assert gw.mqtt.edge.stats.acked == 0
        assert user not in gw.mqtt.edge._windows  # given back whole, then forgotten with its connection
        assert await stored(gw) == ["m-1", "block", "m-3"]
    again = GroupPlugin()
    async with gateway_factory(plugins=[("grouptest", again)], mqtt=True) as gw:
        port = gw_mqtt_address(gw)[1]
        dev = await RawDevice.connect(port, user, password)
        for pid, payload in [(1, b"m-1"), (2, b"block"), (3, b"m-3")]:
            await dev.publish("dev/d1/data", payload, packet_id=pid, dup=True)
            with trio.fail_after(10):
                assert await dev.expect_ack() == pid
        assert gw.mqtt.delivery.stats.duplicates == 3 and again.groups == []
        await dev.publish("dev/d1/data", b"m-1 changed", packet_id=1)  # the id used again, other content
        with trio.fail_after(10):
            assert await dev.expect_ack() == 1
        assert await stored(gw) == ["m-1", "block", "m-3", "m-1 changed"]
