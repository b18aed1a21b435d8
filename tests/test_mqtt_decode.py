"""The client's own PUBLISH decoding (MQTT 3.1.1) against paho's, which it replaces on
the hot path: same fields for every well-formed packet, and nothing accepted that paho
would refuse (anything unusual is handed to paho's decoder)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.client import MQTTMessage, MQTTv311

from gatewayd.core.mqtt.fastpath import decode_311 as _decode_311
from gatewayd.protocol.topics import TopicRouter


def publish_body(topic: bytes, mid: int, payload: bytes, qos: int) -> bytes:
    return struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + payload


def paho_fields(header: int, body: bytes) -> tuple:
    r = _packet.decode_publish(header, body, MQTTv311)
    return (r.topic, r.mid, r.payload, r.qos, r.retain, r.dup)


def ours(msg) -> tuple:
    return (msg._topic, msg.mid, msg.payload, msg.qos, msg.retain, msg.dup)


@settings(max_examples=500)
@given(topic=st.binary(min_size=1, max_size=300), mid=st.integers(1, 65535), payload=st.binary(max_size=600),
       qos=st.sampled_from([0, 1]), retain=st.booleans(), dup=st.booleans(), as_bytearray=st.booleans())
def test_same_fields_as_paho(topic, mid, payload, qos, retain, dup, as_bytearray):
    header = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = publish_body(topic, mid, payload, qos)
    if as_bytearray:  # paho's reader hands over a bytearray
        body = bytearray(body)
    msg = _decode_311(header, body)
    want = paho_fields(header, bytes(body))
    assert ours(msg) == (want[0], want[1] if qos else 0, *want[2:])
    assert type(msg.payload) is bytes and type(msg._topic) is bytes
    # .topic decodes like paho's MQTTMessage.topic, including the error for bad UTF-8
    reference = MQTTMessage(topic=topic)
    try:
        expected = reference.topic
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            msg.topic
    else:
        assert msg.topic == expected


@settings(max_examples=500)
@given(header=st.integers(0x30, 0x3F), body=st.binary(max_size=40))
def test_nothing_paho_refuses_is_accepted(header, body):
    msg = _decode_311(header, body)
    if msg is None:
        return  # paho's decoder judges it
    want = paho_fields(header, body)  # raises if paho would refuse it: then the test fails
    assert (msg._topic, msg.payload, msg.qos, msg.retain, msg.dup) == (want[0], *want[2:])
    if msg.qos:
        assert msg.mid == want[1]


@pytest.mark.parametrize("body", [b"", b"\x00", b"\x00\x00payload", b"\x00\x05abc", b"\x00\x01t\x00"])
def test_short_or_empty_topic_bodies_go_to_paho(body):
    assert _decode_311(0x32, body) is None  # qos 1: the last one lacks a whole packet id


def test_router_remembers_handlers_per_topic_until_subscriptions_change():
    router = TopicRouter()
    a = router.add("site/+/reading", "a", owner="p1")
    assert router.handlers_for("site/x/reading") == ["a"]
    router.add("site/#", "b", owner="p2")
    assert router.handlers_for("site/x/reading") == ["a", "b"]
    router.remove(a)
    assert router.handlers_for("site/x/reading") == ["b"]
    router.remove_owner("p2")
    assert router.handlers_for("site/x/reading") == []
    router.CACHE_SIZE = 2
    router.add("#", "c")
    for t in ("t1", "t2", "t3", "t1"):
        assert router.handlers_for(t) == ["c"]
    assert len(router._cache) <= 2


def test_the_fast_path_is_installed_on_this_paho_and_skipped_when_its_internals_differ(monkeypatch):
    import paho.mqtt.client as paho

    from gatewayd.core.mqtt.client import MQTTClient, MQTTSettings
    from gatewayd.core.mqtt.fastpath import FastPublish

    assert isinstance(MQTTClient(MQTTSettings(protocol="3.1.1"))._client._handle_publish, FastPublish)
    # A paho whose packet state looks different: its own _handle_publish stays.
    original = paho.Client.__init__

    def changed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._in_packet = object()

    monkeypatch.setattr(paho.Client, "__init__", changed)
    assert not isinstance(MQTTClient(MQTTSettings(protocol="3.1.1"))._client._handle_publish, FastPublish)
