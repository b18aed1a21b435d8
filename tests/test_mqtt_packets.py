"""The MQTT packet codec (gatewayd.protocol.mqtt_packets) against paho and mosquitto.

Packets paho's client encodes (captured from a real socket it writes to) parse to the
fields it was given; what our encoders write, paho's decoder reads back as built (and
matches paho's own bytes where paho writes the same packet); any stream cut anywhere
splits into the same packets; broken input only ever raises ProtocolError. At the end,
a real mosquitto: its CONNACKs parse, and it takes what we encode.
"""

from __future__ import annotations

import getpass
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gatewayd.core.mqtt.broker import find_mosquitto, hash_password
from gatewayd.protocol import mqtt_packets as mp
from gatewayd.protocol.mqtt_packets import (
    Connack,
    Connect,
    FrameReader,
    ProtocolError,
    Publish,
    Will,
    encode_publish,
    parse_connack,
    parse_connect,
    parse_packet_id,
    parse_publish,
)
from gatewayd.testing import reserved_port

PAHO_PROTOCOL = {3: paho.MQTTv31, 4: paho.MQTTv311, 5: paho.MQTTv5}
# MQTT 5.0 3.2.2.2 lists 0x99 (Payload format invalid: of the will) for CONNACK; paho 2.2 does not.
PAHO_LACKS_CONNACK_CODE = 0x99
LEVELS = st.sampled_from([3, 4, 5])

topic_names = st.text(st.characters(codec="utf-8", exclude_characters="+#\x00"), min_size=1, max_size=40)
strings = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
packet_ids = st.integers(1, 65535)


def read_packet(sock: socket.socket) -> tuple[bytes, int]:
    """One packet from ``sock`` (the test's own reading of the fixed header, to check
    FrameReader against): its bytes and where its body starts."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = sock.recv(n - len(data))
            assert more, "connection closed"
            data += more
        return data

    head = exactly(2)
    length, shift = head[1] & 0x7F, 7
    while head[-1] & 0x80:
        head += exactly(1)
        length |= (head[-1] & 0x7F) << shift
        shift += 7
    return head + exactly(length), len(head)


def framed(raw: bytes) -> tuple[int, int, bytes, int]:
    """``raw`` through a FrameReader: exactly one frame, nothing left over."""
    reader = FrameReader(1 << 20)
    reader.feed(raw)
    frame = reader.next_frame()
    assert frame is not None and reader.next_frame() is None and reader.buffered == 0
    return frame


class PahoWire:
    """A real paho client connected over loopback TCP to a socket of ours, so what it
    sends is exactly what paho encoded. Configure ``client`` before :meth:`connect`."""

    def __init__(self, level: int, client_id: str = "wire", **kwargs) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=PAHO_PROTOCOL[level], **kwargs)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.peer: socket.socket | None = None

    def connect(self, keepalive: int = 60, **kwargs) -> tuple[bytes, int]:
        """paho's CONNECT."""
        self.client.connect("127.0.0.1", self._server.getsockname()[1], keepalive, **kwargs)
        self.peer, _ = self._server.accept()
        self.peer.settimeout(5)
        return self.read()

    def read(self) -> tuple[bytes, int]:
        assert self.peer is not None
        return read_packet(self.peer)

    def sent(self, rc: object) -> tuple[bytes, int]:
        """What paho sent, after one of its _send_* returned ``rc``."""
        assert rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        return self.read()

    def publish(self, mid: int, topic: str, payload: bytes, qos: int, retain: bool, dup: bool,
                properties: Properties | None = None) -> tuple[bytes, int]:
        return self.sent(self.client._send_publish(mid, topic.encode(), payload, qos, retain, dup,
                                                   paho.MQTTMessageInfo(mid), properties))

    def close(self) -> None:
        self.client.disconnect()
        for sock in (self.peer, self._server):
            if sock is not None:
                sock.close()


@pytest.fixture(scope="module")
def wires() -> Iterator[Callable[[int], PahoWire]]:
    """One connected PahoWire per protocol level, shared by the examples of a module."""
    made: dict[int, PahoWire] = {}

    def wire(level: int) -> PahoWire:
        if level not in made:
            made[level] = PahoWire(level)
            made[level].connect()
        return made[level]

    yield wire
    for w in made.values():
        w.close()


def properties(packet_type: int, draw: Callable, **values) -> Properties:
    """paho Properties for ``packet_type``: ``values`` set, then some of the optional ones
    each packet type may carry drawn (their values never come back from our parsers)."""
    props = Properties(packet_type)
    for name, value in values.items():
        if value is not None:
            setattr(props, name, value)
    optional = {
        "UserProperty": st.tuples(strings, strings),
        "ContentType": strings,
        "ResponseTopic": topic_names,
        "CorrelationData": st.binary(max_size=10),
        "PayloadFormatIndicator": st.integers(0, 1),
        "MessageExpiryInterval": st.integers(0, 2**32 - 1),
        "SubscriptionIdentifier": st.integers(1, 268_435_455),
        "SessionExpiryInterval": st.integers(0, 2**32 - 1),
        "WillDelayInterval": st.integers(0, 2**32 - 1),
        "RequestProblemInformation": st.integers(0, 1),
        "AuthenticationMethod": strings,
        "AuthenticationData": st.binary(max_size=10),
        "AssignedClientIdentifier": strings,
        "ServerKeepAlive": st.integers(0, 65535),
        "ReasonString": strings,
        "MaximumQoS": st.integers(0, 1),
        "RetainAvailable": st.integers(0, 1),
        "SharedSubscriptionAvailable": st.integers(0, 1),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4)):
        applies = packet_type in props.properties[props.getIdentFromName(name)][1]
        if applies and (not hasattr(props, name) or props.allowsMultiple(name)):
            setattr(props, name, draw(optional[name]))
    return props


# PUBLISH ---------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(level=LEVELS, topic=topic_names, payload=st.binary(max_size=300), qos=st.integers(0, 2),
       retain=st.booleans(), dup=st.booleans(), mid=packet_ids, data=st.data())
def test_paho_publish_parses_to_the_fields_it_was_given(wires, level, topic, payload, qos, retain, dup, mid, data):
    dup = dup and (qos > 0 or level < 5)  # DUP on QoS 0 is refused in MQTT 5 (below)
    alias = props = None
    if level == 5:
        alias = data.draw(st.none() | packet_ids)
        if alias and data.draw(st.booleans()):
            topic = ""  # the alias stands for the topic
        props = properties(PacketTypes.PUBLISH, data.draw, TopicAlias=alias)
    raw, body_start = wires(level).publish(mid, topic, payload, qos, retain, dup, props)
    assert framed(raw) == (mp.PUBLISH, raw[0] & 0x0F, raw, body_start)

    got = parse_publish(raw[0] & 0x0F, raw, body_start, level)
    assert got == Publish(topic, payload, qos, retain, dup, mid if qos else None, alias)
    assert type(got.payload) is bytes
    ref = _packet.decode_publish(raw[0], raw[body_start:], PAHO_PROTOCOL[level])
    assert (ref.topic.decode(), ref.payload, ref.qos, ref.retain, ref.dup) == (topic, payload, qos, retain, dup)


@settings(max_examples=100, deadline=None)
@given(level=LEVELS, topic=topic_names, payload=st.binary(max_size=300), qos=st.integers(0, 2),
       retain=st.booleans(), dup=st.booleans(), mid=packet_ids)
def test_encode_publish_writes_what_paho_writes(wires, level, topic, payload, qos, retain, dup, mid):
    dup = dup and qos > 0
    raw = encode_publish(topic, payload, qos, retain, dup, mid if qos else None, level)
    assert (raw, framed(raw)[3]) == wires(level).publish(mid, topic, payload, qos, retain, dup)
    body_start = framed(raw)[3]
    ref = _packet.decode_publish(raw[0], raw[body_start:], PAHO_PROTOCOL[level])
    assert (ref.topic.decode(), ref.payload, ref.qos, ref.retain, ref.dup) == (topic, payload, qos, retain, dup)
    assert parse_publish(raw[0] & 0x0F, raw, body_start, level) == (
        Publish(topic, payload, qos, retain, dup, mid if qos else None, None))


def test_dup_on_qos_0_is_refused_in_mqtt_5_only():
    raw = b"\x38\x04\x00\x01tp"  # 3.1.1: topic "t", payload "p"
    assert parse_publish(0x8, raw, 2, 4) == Publish("t", b"p", 0, False, True, None, None)
    with pytest.raises(ProtocolError, match="PUBLISH with QoS 0 has DUP set") as e:
        parse_publish(0x8, b"\x38\x05\x00\x01t\x00p", 2, 5)
    assert e.value.reason_code == 0x82
    with pytest.raises(ValueError, match="DUP"):
        encode_publish("t", b"", 0, dup=True)


# Acks, pings, DISCONNECT, CONNACK: ours read by paho, paho's read by ours ------------------

ACKS = [(mp.puback, _packet.decode_puback, "_send_puback"),
        (mp.pubrec, _packet.decode_pubrec, "_send_pubrec"),
        (mp.pubcomp, _packet.decode_pubcomp, "_send_pubcomp")]


@settings(max_examples=100, deadline=None)
@given(ack=st.sampled_from(ACKS), level=LEVELS, mid=packet_ids, data=st.data())
def test_acks_are_read_by_paho_as_built(wires, ack, level, mid, data):
    encode, decode, paho_send = ack
    packet_type = {mp.puback: mp.PUBACK, mp.pubrec: mp.PUBREC, mp.pubcomp: mp.PUBCOMP}[encode]
    reason = data.draw(st.sampled_from(sorted(mp._REASON_CODES[packet_type]))) if level == 5 else 0
    raw = encode(mid, reason, level)
    assert len(raw) == (4 if reason == 0 else 5)
    ref = decode(raw[0], raw[2:], PAHO_PROTOCOL[level])
    assert (ref.mid, ref.reason.value) == (mid, reason)
    assert framed(raw) == (packet_type, 0, raw, 2) and parse_packet_id(raw, 2) == mid
    if reason == 0:
        assert (raw, 2) == wires(level).sent(getattr(wires(level).client, paho_send)(mid))


@settings(max_examples=30, deadline=None)
@given(level=LEVELS, mid=packet_ids)
def test_paho_pubrel_packet_id(wires, level, mid):
    raw, body_start = wires(level).sent(wires(level).client._send_pubrel(mid))
    assert framed(raw)[:2] == (mp.PUBREL, 0x2) and parse_packet_id(raw, body_start) == mid


def test_pings_are_pahos(wires):
    assert (mp.PINGREQ_PACKET, 2) == wires(4).sent(wires(4).client._send_pingreq())
    assert (mp.PINGRESP_PACKET, 2) == wires(4).sent(wires(4).client._send_pingresp())


@pytest.mark.parametrize("reason", sorted(mp._REASON_CODES[mp.DISCONNECT]))
def test_disconnect_is_read_by_paho_as_built(reason):
    raw = mp.disconnect(reason, 5)
    ref = _packet.decode_disconnect(raw[0], raw[2:], paho.MQTTv5)
    assert (ref.reason.value if ref.reason else 0) == reason
    assert mp.disconnect(0, 4) == mp.disconnect() == b"\xe0\x00"
    assert framed(raw)[:2] == (mp.DISCONNECT, 0)


def paho_reads_connack(raw: bytes, body_start: int, level: int) -> tuple[int, int] | None:
    """(flags, code) as paho's decoder reads them; None for the code paho does not know."""
    if level == 5 and raw[body_start + 1] == PAHO_LACKS_CONNACK_CODE:
        with pytest.raises(MalformedPacket):
            _packet.decode_connack(raw[0], raw[body_start:], paho.MQTTv5)
        return None
    ref = _packet.decode_connack(raw[0], raw[body_start:], PAHO_PROTOCOL[level])
    return ref.flags, ref.rc


@pytest.mark.parametrize("level", [3, 4, 5])
def test_connack_is_read_by_paho_and_by_us_as_built(level):
    codes = sorted(mp._REASON_CODES[mp.CONNACK]) if level == 5 else range(6)
    for code in codes:
        for session_present in (False, True) if code == 0 else (False,):
            raw = mp.connack(code, level, session_present)
            assert paho_reads_connack(raw, 2, level) in ((session_present, code), None)
            assert parse_connack(raw, 2, level) == Connack(session_present, code, None, None, None)


def test_encoders_refuse_what_they_cannot_encode():
    for call in (lambda: mp.puback(0), lambda: mp.pubrec(65536), lambda: mp.puback(1, 0x10, 4),
                 lambda: mp.pubcomp(1, 0x10, 5), lambda: mp.disconnect(0x81, 4), lambda: mp.disconnect(0x05, 5),
                 lambda: mp.connack(6, 4), lambda: mp.connack(0x01, 5), lambda: mp.connack(5, 4, True),
                 lambda: encode_publish("a/+", b"", 0), lambda: encode_publish("", b"", 0),
                 lambda: encode_publish("t", b"", 3), lambda: encode_publish("t", b"", 1),
                 lambda: encode_publish("t", b"", 0, packet_id=1), lambda: encode_publish("t" * 65536, b"", 0)):
        with pytest.raises(ValueError):
            call()


def test_tables_match_pahos():
    """Reason codes per packet and properties (type, packets) as paho has them from the spec."""
    for packet_type, codes in mp._REASON_CODES.items():
        pahos = {code for code, names in ReasonCode.names.items()
                 if any(packet_type in types for types in names.values())}
        assert codes == pahos | ({PAHO_LACKS_CONNACK_CODE} if packet_type == mp.CONNACK else set())
    paho_props = Properties(PacketTypes.PUBLISH)
    types = {"byte": "Byte", "u16": "Two Byte Integer", "u32": "Four Byte Integer", "varint": "Variable Byte Integer",
             "binary": "Binary Data", "utf8": "UTF-8 Encoded String", "pair": "UTF-8 String Pair"}
    assert {ident: (name, types[kind]) for ident, (name, kind) in mp._PROPERTIES.items()} == {
        ident: (paho_props.getNameFromIdent(ident), paho_props.types[kind])
        for ident, (kind, _) in paho_props.properties.items()}
    for allowed, packet_type in ((mp._PUBLISH_PROPERTIES, PacketTypes.PUBLISH),
                                 (mp._WILL_PROPERTIES, PacketTypes.WILLMESSAGE),
                                 (mp._CONNECT_PROPERTIES, PacketTypes.CONNECT),
                                 (mp._CONNACK_PROPERTIES, PacketTypes.CONNACK)):
        assert allowed == {ident for ident, (_, packets) in paho_props.properties.items() if packet_type in packets}


# CONNECT and CONNACK ---------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(level=LEVELS, client_id=strings, clean=st.booleans(), keepalive=st.integers(0, 65535),
       username=st.none() | strings, password=st.none() | st.binary(max_size=20),
       will=st.none() | st.builds(Will, topic_names, st.binary(max_size=50), st.integers(0, 2), st.booleans()),
       data=st.data())
def test_paho_connect_parses_to_the_fields_it_was_given(level, client_id, clean, keepalive, username, password,
                                                        will, data):
    clean = clean or not client_id  # paho refuses an empty client id without a clean session
    wire = PahoWire(level, client_id, **({} if level == 5 else {"clean_session": clean}))
    receive_maximum = maximum_packet_size = None
    connect_kwargs = {}
    if level == 5:
        receive_maximum = data.draw(st.none() | st.integers(1, 65535))
        maximum_packet_size = data.draw(st.none() | st.integers(1, 268_435_455))
        connect_kwargs = {"clean_start": clean, "properties": properties(
            PacketTypes.CONNECT, data.draw, ReceiveMaximum=receive_maximum, MaximumPacketSize=maximum_packet_size,
            TopicAliasMaximum=data.draw(st.none() | st.integers(0, 65535)))}
    if username is not None:
        wire.client.username_pw_set(username, password)
    else:
        password = None  # paho sends a password only with a user name
    if will:
        will_props = properties(PacketTypes.WILLMESSAGE, data.draw) if level == 5 else None
        wire.client.will_set(will.topic, will.payload, will.qos, will.retain, will_props)
    try:
        raw, body_start = wire.connect(keepalive, **connect_kwargs)
        assert framed(raw)[:2] == (mp.CONNECT, 0)
        assert parse_connect(raw, body_start) == Connect(
            level, clean, keepalive, wire.client._client_id.decode(), username, password, will,
            receive_maximum, maximum_packet_size)
    finally:
        wire.close()


@settings(max_examples=80, deadline=None)
@given(level=LEVELS, session_present=st.booleans(), data=st.data())
def test_connack_with_paho_properties(level, session_present, data):
    if level == 5:
        code = data.draw(st.sampled_from(sorted(mp._REASON_CODES[mp.CONNACK])))
        limits = [data.draw(st.none() | st.integers(1, 65535)), data.draw(st.none() | st.integers(0, 65535)),
                  data.draw(st.none() | st.integers(1, 268_435_455))]
        props = properties(PacketTypes.CONNACK, data.draw, ReceiveMaximum=limits[0], TopicAliasMaximum=limits[1],
                           MaximumPacketSize=limits[2]).pack()
    else:
        code, limits, props = data.draw(st.integers(0, 5)), [None, None, None], b""
    session_present = session_present and code == 0
    body = bytes((session_present, code)) + props
    raw = bytes(paho.Client(CallbackAPIVersion.VERSION2)._pack_remaining_length(bytearray(b"\x20"), len(body))) + body
    _, _, _, body_start = framed(raw)
    assert parse_connack(raw, body_start, level) == Connack(session_present, code, *limits)
    assert paho_reads_connack(raw, body_start, level) in ((session_present, code), None)


# FrameReader ----------------------------------------------------------------------------

@st.composite
def streams(draw) -> tuple[list[tuple[bytes, int]], list[int]]:
    """Packets of any type, with where their bodies start (lengths encoded by paho: 1 to 3
    length bytes), and cut points."""
    pack_length = paho.Client(CallbackAPIVersion.VERSION2)._pack_remaining_length
    packets = []
    for first, body in draw(st.lists(st.tuples(st.integers(0x10, 0xFF), st.binary(max_size=200)
                                               | st.integers(100, 20_000).map(lambda n: b"x" * n)), max_size=8)):
        packet = bytes(pack_length(bytearray((first,)), len(body))) + body
        packets.append((packet, len(packet) - len(body)))
    total = sum(len(packet) for packet, _ in packets)
    return packets, draw(st.lists(st.integers(0, total), max_size=12))


@settings(max_examples=300, deadline=None)
@given(stream=streams())
def test_frame_reader_splits_a_stream_cut_anywhere_into_its_packets(stream):
    packets, cuts = stream
    data = b"".join(packet for packet, _ in packets)
    edges = [0, *sorted(cuts), len(data)]
    reader = FrameReader(20_000)
    frames = []
    for a, b in zip(edges, edges[1:]):
        reader.feed(data[a:b])
        while (frame := reader.next_frame()) is not None:
            frames.append(frame)
        assert reader.buffered == b - sum(len(raw) for _, _, raw, _ in frames)
    assert [(raw, body_start) for _, _, raw, body_start in frames] == packets
    assert all((packet_type, flags) == (raw[0] >> 4, raw[0] & 0x0F) for packet_type, flags, raw, _ in frames)


def test_frame_reader_refuses_an_oversize_packet_from_its_header_alone():
    reader = FrameReader(262_144)
    reader.feed(b"\x30\xe0\xa7\x12")  # remaining length 300000, no body yet
    with pytest.raises(ProtocolError, match="^remaining length of 300000 bytes exceeds the limit of 262144$") as e:
        reader.next_frame()
    assert e.value.reason_code == 0x95
    reader = FrameReader(10)
    reader.feed(b"\xc0\x0b")
    with pytest.raises(ProtocolError, match="remaining length of 11 bytes exceeds the limit of 10"):
        reader.next_frame()


@pytest.mark.parametrize(("chunks", "message"), [
    ([b"\x30\x80\x80\x80\x80"], "remaining length is longer than 4 bytes"),  # no need to wait for a fifth byte
    ([b"\x30\xff", b"\xff", b"\xff\xff\x7f"], "remaining length is longer than 4 bytes"),
    ([b"\x00"], r"packet type 0 is reserved \(first byte 0x00\)"),
    ([b"\xd0\x00\x0f\x00"], r"packet type 0 is reserved \(first byte 0x0f\)"),
])
def test_frame_reader_refuses_malformed_headers(chunks, message):
    reader = FrameReader(1000)
    with pytest.raises(ProtocolError, match=message) as e:
        for chunk in chunks:
            reader.feed(chunk)
            while reader.next_frame() is not None:
                pass
    assert e.value.reason_code == 0x81


def test_frame_reader_waits_for_a_whole_header_and_body():
    reader = FrameReader(1 << 20)
    big = encode_publish("t", b"x" * 200_000, 0)
    for i in range(0, len(big), 1000):
        reader.feed(big[i:i + 1000])
        assert reader.buffered == min(i + 1000, len(big))
        if i + 1000 < len(big):
            assert reader.next_frame() is None
    assert reader.next_frame() == (mp.PUBLISH, 0, big, 4)
    assert reader.next_frame() is None and reader.buffered == 0


# Malformed packets: what is wrong, said precisely, with the right reason code ----------------

def publish_v5(props: bytes, topic: bytes = b"t") -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + props + b"payload"
    return bytes((0x30, len(body))) + body


@pytest.mark.parametrize(("flags", "raw", "level", "message", "reason"), [
    (0, b"\x30\x01\x00", 4, "PUBLISH topic length needs 2 bytes, 1 left", 0x81),
    (0, b"\x30\x04\x00\x05ab", 4, "PUBLISH topic needs 5 bytes, 2 left", 0x81),
    (0, b"\x30\x04\x00\x02\xc3\x28", 4, r"PUBLISH topic is not valid UTF-8 \(invalid continuation byte at byte 0\)",
     0x81),
    (0, b"\x30\x04\x00\x02\xc0\xaf", 4, "PUBLISH topic is not valid UTF-8", 0x81),  # overlong "/"
    (0, b"\x30\x05\x00\x03\xed\xa0\x80", 4, "PUBLISH topic is not valid UTF-8", 0x81),  # a surrogate
    (0, b"\x30\x05\x00\x03a\x00b", 4, "PUBLISH topic contains U\\+0000", 0x81),
    (0, b"\x30\x05\x00\x03a/+", 4, "PUBLISH topic contains '\\+'", 0x82),
    (0, b"\x30\x06\x00\x01#\x00xy", 5, "PUBLISH topic contains '#'", 0x82),
    (6, b"\x36\x05\x00\x01t\x00\x01", 4, "PUBLISH has QoS 3", 0x81),
    (2, b"\x32\x04\x00\x01t\x00", 4, "PUBLISH packet identifier needs 2 bytes, 1 left", 0x81),
    (4, b"\x34\x05\x00\x01t\x00\x00", 4, "PUBLISH with QoS 2 has packet identifier 0", 0x82),
    (0, b"\x30\x03\x00\x00p", 4, "PUBLISH topic is empty", 0x82),
    (0, b"\x30\x04\x00\x00\x00p", 5, "PUBLISH topic is empty", 0x82),  # no Topic Alias to stand for it
    (0, b"\x30\x03\x00\x01t", 5, "PUBLISH property length is cut short by the end of the packet", 0x81),
    (0, publish_v5(b"\x80\x80\x80\x80\x01"), 5, "PUBLISH property length is longer than 4 bytes", 0x81),
    (0, publish_v5(b"\x7f\x23"), 5, "PUBLISH property list needs 127 bytes, 8 left", 0x81),
    (0, publish_v5(b"\x02\x23\x00"), 5, "PUBLISH Topic Alias needs 2 bytes, 1 left", 0x81),
    (0, publish_v5(b"\x03\x23\x00\x00"), 5, "PUBLISH has Topic Alias 0", 0x94),
    (0, publish_v5(b"\x06\x23\x00\x01\x23\x00\x02"), 5, "PUBLISH carries Topic Alias twice", 0x82),
    (0, publish_v5(b"\x03\x21\x00\x01"), 5, r"PUBLISH may not carry property 0x21 \(Receive Maximum\)", 0x81),
    (0, publish_v5(b"\x02\x7f\x00"), 5, r"PUBLISH may not carry property 0x7f \(no such property\)", 0x81),
    (0, publish_v5(b"\x07\x26\x00\x01k\x00\x01\xff"), 5, "PUBLISH User Property value is not valid UTF-8", 0x81),
    (0, publish_v5(b"\x04\x03\x00\x01\x00"), 5, "PUBLISH Content Type contains U\\+0000", 0x81),
    (0, publish_v5(b"\x02\x0b\x80"), 5, "PUBLISH Subscription Identifier is cut short", 0x81),
])
def test_malformed_publish(flags, raw, level, message, reason):
    with pytest.raises(ProtocolError, match=message) as e:
        parse_publish(flags, raw, 2, level)
    assert e.value.reason_code == reason


def test_an_empty_topic_is_fine_with_a_topic_alias_in_mqtt_5():
    assert parse_publish(0, publish_v5(b"\x03\x23\x00\x07", b""), 2, 5) == (
        Publish("", b"payload", 0, False, False, None, 7))


def connect_packet(name: bytes = b"MQTT", level: int = 4, flags: int = 0x02, rest: bytes = b"\x00\x01c") -> bytes:
    body = len(name).to_bytes(2, "big") + name + bytes((level, flags, 0, 60)) + rest
    return bytes((0x10, len(body))) + body


@pytest.mark.parametrize(("raw", "message", "reason"), [
    (connect_packet(level=3), r"CONNECT protocol b'MQTT' level 3 is not supported", 0x84),
    (connect_packet(b"MQIsdp", 4), r"CONNECT protocol b'MQIsdp' level 4 is not supported", 0x84),
    (connect_packet(level=0x84), "level 132 is not supported", 0x84),  # the bridge bit
    (connect_packet(b"HTTP"), "CONNECT protocol b'HTTP' level 4 is not supported", 0x84),
    (b"\x10\x05\x00\x04MQT", "CONNECT protocol name needs 4 bytes, 3 left", 0x81),
    (b"\x10\x08\x00\x04MQTT\x04\x02", "CONNECT protocol level, flags and keep alive needs 4 bytes, 2 left", 0x81),
    (connect_packet(flags=0x03), "CONNECT reserved flag is set", 0x81),
    (connect_packet(flags=0x1E), "CONNECT will QoS is 3", 0x81),
    (connect_packet(flags=0x22), "CONNECT sets will QoS or will retain without a will", 0x82),
    (connect_packet(flags=0x42, rest=b"\x00\x01c\x00\x01p"), "CONNECT has a password but no user name", 0x82),
    (connect_packet(rest=b"\x00\x01cX"), "CONNECT has 1 bytes after its last field", 0x81),
    (connect_packet(rest=b"\x00\x02c"), "CONNECT client identifier needs 2 bytes, 1 left", 0x81),
    (connect_packet(rest=b"\x00\x01\xff"), "CONNECT client identifier is not valid UTF-8", 0x81),
    (connect_packet(flags=0x06, rest=b"\x00\x01c\x00\x03a/#\x00\x00"), "CONNECT will topic contains '#'", 0x82),
    (connect_packet(flags=0x06, rest=b"\x00\x01c\x00\x00\x00\x00"), "CONNECT will topic is empty", 0x82),
    (connect_packet(flags=0x06, rest=b"\x00\x01c\x00\x01t\x00\x05ab"), "CONNECT will payload needs 5 bytes, 2 left",
     0x81),
    (connect_packet(flags=0x82, rest=b"\x00\x01c\x00\x01"), "CONNECT user name needs 1 bytes, 0 left", 0x81),
    (connect_packet(level=5, rest=b"\x03\x21\x00\x00\x00\x01c"), "CONNECT Receive Maximum is 0", 0x82),
    (connect_packet(level=5, rest=b"\x05\x27\x00\x00\x00\x00\x00\x01c"), "CONNECT Maximum Packet Size is 0", 0x82),
    (connect_packet(level=5, rest=b"\x03\x23\x00\x01\x00\x01c"), r"CONNECT may not carry property 0x23 \(Topic Alias\)",
     0x81),
    (connect_packet(level=5, flags=0x06, rest=b"\x00\x00\x01c\x03\x21\x00\x01\x00\x01t\x00\x00"),
     r"CONNECT will may not carry property 0x21 \(Receive Maximum\)", 0x81),
])
def test_malformed_connect(raw, message, reason):
    with pytest.raises(ProtocolError, match=message) as e:
        parse_connect(raw, 2)
    assert e.value.reason_code == reason


def test_connect_edge_cases_that_are_fine():
    # MQTT 5 allows a password without a user name; an empty client id is the broker's call.
    assert parse_connect(connect_packet(level=5, flags=0x42, rest=b"\x00\x00\x00\x00\x02pw"), 2) == Connect(
        5, True, 60, "", None, b"pw", None, None, None)
    assert parse_connect(connect_packet(b"MQIsdp", 3), 2).protocol_level == 3


@pytest.mark.parametrize(("raw", "level", "message", "reason"), [
    (b"\x20\x01\x00", 4, "CONNACK flags and reason code needs 2 bytes, 1 left", 0x81),
    (b"\x20\x02\x02\x00", 4, r"CONNACK reserved flags are set \(0x02\)", 0x81),
    (b"\x20\x02\x00\x06", 4, r"CONNACK return code 6 is reserved \(0 to 5 are defined\)", 0x82),
    (b"\x20\x02\x01\x05", 4, r"CONNACK refuses the connection \(code 0x05\) with Session Present set", 0x82),
    (b"\x20\x03\x00\x00\x00", 4, "CONNACK has 1 bytes after its last field", 0x81),
    (b"\x20\x03\x00\x01\x00", 5, "CONNACK reason code 0x01 is not one CONNACK may carry", 0x82),
    (b"\x20\x02\x00\x00", 5, "CONNACK property length is cut short", 0x81),
    (b"\x20\x06\x00\x00\x03\x21\x00\x00", 5, "CONNACK Receive Maximum is 0", 0x82),
    (b"\x20\x06\x00\x00\x03\x23\x00\x01", 5, r"CONNACK may not carry property 0x23 \(Topic Alias\)", 0x81),
    (b"\x20\x09\x00\x00\x06\x22\x00\x01\x22\x00\x02", 5, "CONNACK carries Topic Alias Maximum twice", 0x82),
])
def test_malformed_connack(raw, level, message, reason):
    with pytest.raises(ProtocolError, match=message) as e:
        parse_connack(raw, 2, level)
    assert e.value.reason_code == reason


@pytest.mark.parametrize(("raw", "message", "reason"), [
    (b"\x40\x01\x00", "PUBACK packet identifier needs 2 bytes, 1 left", 0x81),
    (b"\x62\x02\x00\x00", "PUBREL has packet identifier 0", 0x82),
])
def test_malformed_packet_id(raw, message, reason):
    with pytest.raises(ProtocolError, match=message) as e:
        parse_packet_id(raw, 2)
    assert e.value.reason_code == reason


# Nothing but ProtocolError, whatever the bytes -------------------------------------------

def parse_all(raw: bytes, body_start: int, flags: int) -> None:
    """Every parser on ``raw``; each may succeed or raise ProtocolError, nothing else."""
    for level in (3, 4, 5):
        for parse in (lambda: parse_publish(flags, raw, body_start, level), lambda: parse_connect(raw, body_start),
                      lambda: parse_connack(raw, body_start, level), lambda: parse_packet_id(raw, body_start)):
            try:
                parse()
            except ProtocolError:
                pass


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=60), data=st.data())
def test_random_bytes_raise_only_protocol_error(raw, data):
    parse_all(raw, data.draw(st.integers(0, len(raw) + 1)), data.draw(st.integers(0, 15)))
    reader = FrameReader(data.draw(st.integers(0, 100)))
    try:
        for cut in data.draw(st.lists(st.integers(0, len(raw)), max_size=4)):
            reader.feed(raw[:cut])
            while reader.next_frame() is not None:
                pass
    except ProtocolError:
        pass


@pytest.fixture(scope="module")
def valid_packets(wires) -> list[bytes]:
    """Packets exercising every field: CONNECTs with wills and properties, PUBLISHes with
    properties, a CONNACK with properties."""
    packets = []
    for level in (3, 4, 5):
        wire = PahoWire(level, "seed")
        wire.client.username_pw_set("user", b"pass")
        will_props = Properties(PacketTypes.WILLMESSAGE)
        will_props.UserProperty = ("k", "v")
        wire.client.will_set("will/t", b"gone", 1, True, will_props if level == 5 else None)
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum, props.MaximumPacketSize, props.UserProperty = 10, 1000, ("a", "b")
        packets.append(wire.connect(30, **({"properties": props} if level == 5 else {}))[0])
        wire.close()
        props = Properties(PacketTypes.PUBLISH)
        if level == 5:
            props.TopicAlias, props.CorrelationData, props.SubscriptionIdentifier = 3, b"c", 300
        packets.append(wires(level).publish(9, "a/b", b"data", 1, False, True, props if level == 5 else None)[0])
    props = Properties(PacketTypes.CONNACK)
    props.ReceiveMaximum, props.TopicAliasMaximum, props.ReasonString = 5, 6, "r"
    body = b"\x00\x00" + props.pack()
    packets.append(bytes((0x20, len(body))) + body)
    return packets


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_damaged_packets_raise_only_protocol_error(valid_packets, data):
    raw = bytearray(data.draw(st.sampled_from(valid_packets)))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        change = data.draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        if change == "set":
            raw[at] = data.draw(st.integers(0, 255))
        elif change == "insert":
            raw.insert(at, data.draw(st.integers(0, 255)))
        elif change == "delete":
            del raw[at]
        else:
            del raw[at:]
        if not raw:
            return
    parse_all(bytes(raw), 2, raw[0] & 0x0F)


# A real mosquitto ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory) -> Iterator[int]:
    """A mosquitto of our own (its limits set, so its CONNACK has properties to read) with
    one account, dev / secret; yields its port."""
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("mosquitto is not installed: apt-get install mosquitto")
    directory: Path = tmp_path_factory.mktemp("mosquitto")
    (directory / "passwd").write_text(f"dev:{hash_password('secret')}\n")
    port = reserved_port()
    (directory / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {directory / 'passwd'}\n"
        "persistence false\nmax_inflight_messages 7\nmax_topic_alias 5\nmax_packet_size 100000\n"
        f"user {getpass.getuser()}\n")  # as root it would become 'mosquitto', who cannot read passwd
    proc = subprocess.Popen([binary, "-c", str(directory / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            assert proc.poll() is None, "mosquitto exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail(f"mosquitto is not listening on port {port} after 10 s")
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


class Device:
    """A raw TCP connection to mosquitto whose packets are split by a FrameReader."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.reader = FrameReader(1 << 20)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self) -> tuple[int, int, bytes, int]:
        while (frame := self.reader.next_frame()) is None:
            data = self.sock.recv(65536)
            assert data, "mosquitto closed the connection"
            self.reader.feed(data)
        return frame

    def close(self) -> None:
        self.sock.close()


def paho_connect(level: int, password: str, client_id: str = "dev-1") -> bytes:
    wire = PahoWire(level, client_id)
    wire.client.username_pw_set("dev", password)
    try:
        return wire.connect(30)[0]
    finally:
        wire.close()


@pytest.mark.parametrize("level", [3, 4, 5])
@pytest.mark.parametrize("password", ["secret", "wrong"])
def test_mosquittos_connack_for_a_paho_connect(mosquitto, level, password):
    dev = Device(mosquitto)
    try:
        dev.send(paho_connect(level, password))
        packet_type, flags, raw, body_start = dev.frame()
        assert (packet_type, flags) == (mp.CONNACK, 0)
        accepted = password == "secret"
        if level == 5:
            want = Connack(False, 0, 7, 5, 100_000) if accepted else Connack(False, 0x87, None, None, None)
        else:
            want = Connack(False, 0 if accepted else 5, None, None, None)
        assert parse_connack(raw, body_start, level) == want
    finally:
        dev.close()


@pytest.mark.parametrize("level", [4, 5])
def test_mosquitto_takes_what_we_encode(mosquitto, level):
    """QoS 1 and 2 PUBLISHes we encode, our acks (with reason codes in MQTT 5) for what
    it delivers back: mosquitto acks them all and still answers a PINGREQ."""
    wire = PahoWire(level, "dev-2")
    dev = Device(mosquitto)
    try:
        wire.client.username_pw_set("dev", "secret")
        dev.send(wire.connect(30)[0])
        assert parse_connack(*dev.frame()[2:], level).reason_code == 0
        # No subscriber yet: MQTT 5 says so in the PUBACK, in the short form we write too.
        dev.send(encode_publish("nobody/listens", b"0", 1, packet_id=9, protocol_level=level))
        assert dev.frame()[2] == mp.puback(9, 0x10 if level == 5 else 0, level)
        wire.client.subscribe(f"dev/{level}/#", 2)  # its own: the retained message stays
        dev.send(wire.read()[0])
        assert dev.frame()[0] == mp.SUBACK

        dev.send(encode_publish(f"dev/{level}/one", b"1", 1, packet_id=10, protocol_level=level))
        dev.send(encode_publish(f"dev/{level}/two", b"2" * 1000, 2, retain=True, packet_id=11, protocol_level=level))
        delivered, acked, completed = [], set(), 0
        while len(delivered) < 2 or len(acked) < 2 or not completed:
            packet_type, flags, raw, body_start = dev.frame()
            if packet_type == mp.PUBLISH:
                msg = parse_publish(flags, raw, body_start, level)
                delivered.append(msg[:3])
                if msg.qos == 1:
                    dev.send(mp.puback(msg.packet_id, 0x83 if level == 5 else 0, level))
                else:
                    dev.send(mp.pubrec(msg.packet_id, 0, level))
            elif packet_type == mp.PUBREC:
                dev.send(b"\x62\x02" + parse_packet_id(raw, body_start).to_bytes(2, "big"))  # PUBREL
            elif packet_type == mp.PUBREL:
                dev.send(mp.pubcomp(parse_packet_id(raw, body_start), 0, level))
                completed += 1
            else:
                assert packet_type in (mp.PUBACK, mp.PUBCOMP)
                acked.add(parse_packet_id(raw, body_start))
        dev.send(mp.PINGREQ_PACKET)
        assert dev.frame()[2] == mp.PINGRESP_PACKET  # nothing else: every flow completed
        assert sorted(delivered) == [(f"dev/{level}/one", b"1", 1), (f"dev/{level}/two", b"2" * 1000, 2)]
        assert acked == {10, 11}
        dev.send(mp.disconnect(0x04 if level == 5 else 0, level))
        assert dev.sock.recv(1) == b""  # mosquitto closes after our DISCONNECT
    finally:
        dev.close()
        wire.close()
