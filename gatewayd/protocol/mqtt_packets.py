"""MQTT 3.1, 3.1.1 and 5.0 packets, sans-I/O: a byte stream split into packets, the
packets the gateway's device-facing edge reads, and the few it writes itself.

The edge terminates device connections, reads each packet a device sends, answers the
PUBLISHes on the gateway's own topics itself and relays every other packet, unchanged,
to a private mosquitto (and mosquitto's packets back). So this module needs to:

* split a stream into packets (:class:`FrameReader`), each kept whole as the ``raw``
  bytes to relay, with ``raw[body_start:]`` its variable header and payload;
* read CONNECT (protocol level, credentials, will, the MQTT 5 limits), CONNACK (from
  mosquitto: its limits), PUBLISH, and the packet identifier of PUBACK / PUBREC /
  PUBREL / PUBCOMP;
* write PUBACK / PUBREC / PUBCOMP, PINGREQ / PINGRESP, DISCONNECT, a refusing CONNACK,
  and PUBLISH (for tests and for re-injecting a message).

What it deliberately does not do: read SUBSCRIBE, UNSUBSCRIBE, their acks or AUTH (the
edge relays them, and mosquitto, which receives them, checks them); keep any state
(packet ids in flight, topic aliases, the protocol level of a connection: the caller
passes ``protocol_level``, 3, 4 or 5, learnt from CONNECT); decide policy (client
identifier rules, authentication, limits: the caller's and the broker's); return the
MQTT 5 properties it is not asked for (they are checked, and travel on in ``raw``).

Every malformed packet raises :class:`ProtocolError`, never another exception, with a
message saying what was wrong and, in ``reason_code``, the MQTT 5 reason code for the
DISCONNECT (or CONNACK) the caller sends before closing: 0x81 Malformed Packet (cannot
be parsed: lengths, bad UTF-8, unknown or misplaced properties), 0x82 Protocol Error
(parsed, but not allowed), 0x84 Unsupported Protocol Version, 0x94 Topic Alias
invalid, 0x95 Packet too large. After one the stream cannot be trusted: close it.
Encoders raise plain ``ValueError`` for arguments they cannot encode.

Decisions taken on the specifications (OASIS MQTT 3.1.1 and 5.0), checked against
mosquitto 2.0.11 where it matters:

* DUP set on a QoS 0 PUBLISH: both specs forbid the sender to do it ([MQTT-3.3.1-2])
  without naming a receiver error. MQTT 5 defines any data the protocol does not allow
  as a Protocol Error (1.2, 4.13): refused there (0x82). In 3.1 / 3.1.1 (only the
  general "close on a protocol violation", 4.8) it is accepted and reported as sent:
  the flag means nothing on QoS 0, and mosquitto 2.0.11 accepts it in every version,
  so refusing would cut off devices that work against mosquitto today.
* A remaining length (or property length) encoded in more bytes than needed is
  accepted, as mosquitto does: 5.0 asks the sender for the shortest form, and 3.1.1 does
  not; a fifth length byte is refused.
* :class:`FrameReader` refuses packet type 0 (reserved in every version) but does not
  check the fixed-header flags of other packets: MQTT 3.1 clients may set DUP on a
  resent PUBREL, SUBSCRIBE or UNSUBSCRIBE, and only the caller knows the version.
  ``max_size`` bounds the remaining length (so a whole packet is at most
  ``max_size + 5`` bytes: announce ``max_size + 2`` or less as an MQTT 5 Maximum
  Packet Size, which counts the fixed header).
* PUBLISH topic names: valid UTF-8 (Python's strict decoder refuses overlong forms and
  surrogates, 1.5.4), no U+0000 (0x81); no ``+`` or ``#`` (0x82, as mosquitto); not
  empty (0x82), except in MQTT 5 with a Topic Alias, in which case ``topic`` is ``""``
  and resolving the alias is the caller's job. Control characters and non-characters,
  which the specs only advise against, are accepted. Packet identifier 0 with QoS 1 or 2
  is 0x82, Topic Alias 0 is 0x94 (both as mosquitto).
* MQTT 5 properties: an unknown identifier, or one the packet may not carry, is 0x81
  (2.2.2.2); a property given twice that may appear once is 0x82; Receive Maximum or
  Maximum Packet Size 0 is 0x82. The values of properties not returned are left to the
  broker. A Subscription Identifier is accepted in PUBLISH (the direction rule,
  [MQTT-3.3.4-6], is the caller's).
* CONNECT: protocol name and level must be MQIsdp 3, MQTT 4 or MQTT 5, anything else
  (including the 0x80 "bridge" bit on the level) is 0x84, answered with CONNACK return
  code 1 in 3.1 / 3.1.1 (:func:`connack`). Reserved flag set or will QoS 3 is 0x81;
  will QoS or retain without a will, or (before MQTT 5) a password without a user name,
  is 0x82. The will topic follows the PUBLISH topic rules. Bytes after the last field
  are 0x81.
* CONNACK: reserved flag bits are 0x81; a return code above 5 (3.1.1) or a reason code
  CONNACK may not carry (5.0) is 0x82, and so is Session Present on a refusal.
* ``parse_packet_id`` reads PUBACK, PUBREC, PUBREL and PUBCOMP of every version alike:
  two bytes of packet identifier (0 is 0x82); an MQTT 5 reason code and properties after
  them are left alone.
* ``puback``/``pubrec``/``pubcomp``/``disconnect`` with a reason code write the short
  MQTT 5 form without a property length (5.0 3.4.2.2.1: absent means 0), byte for
  byte what mosquitto 2.0.11 sends (tested).
"""

from __future__ import annotations

from typing import NamedTuple

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15

_NAMES = ("reserved type 0", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
          "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT", "AUTH")

MALFORMED, PROTOCOL_ERROR, UNSUPPORTED_VERSION, TOPIC_ALIAS_INVALID, TOO_LARGE = 0x81, 0x82, 0x84, 0x94, 0x95


class ProtocolError(ValueError):
    """Malformed packet. ``.reason_code``: the MQTT 5 reason code to send (0x81 malformed,
    0x82 protocol error, 0x95 packet too large...)."""

    def __init__(self, message: str, reason_code: int = MALFORMED) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class FrameReader:
    """Splits a byte stream into packets. ``feed(data)`` appends; ``next_frame()`` returns
    the next complete packet as ``(packet_type, flags, raw, body_start)`` or None when
    more bytes are needed. ``raw`` is the whole packet (fixed header included) so it can
    be relayed unchanged; ``raw[body_start:]`` is the variable header + payload.

    Raises :class:`ProtocolError` (0x95) as soon as an announced remaining length exceeds
    ``max_size``, before buffering its body; (0x81) for a remaining length longer than 4
    bytes or packet type 0. After an error the reader is of no further use.

    Fed bytes are kept as they are until a packet can be complete: a large packet
    arriving in many small reads is joined once, not once per read.
    """

    __slots__ = ("_max_size", "_buf", "_pos", "_chunks", "_chunked", "_need")

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._buf = b""  # packets are sliced out of it from _pos on
        self._pos = 0
        self._chunks: list[bytes] = []  # fed after _buf, not joined yet
        self._chunked = 0  # their total size
        self._need = 0  # size of the incomplete packet at _pos, once its header is known

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos + self._chunked

    @property
    def max_size(self) -> int:
        """The largest remaining length accepted; it may change between packets (a
        server reads a CONNECT under a small limit, the rest under the negotiated one)."""
        return self._max_size

    @max_size.setter
    def max_size(self, value: int) -> None:
        self._max_size = value

    def feed(self, data: bytes) -> None:
        if self._pos == len(self._buf) and not self._chunked:
            self._buf, self._pos = bytes(data), 0  # no copy for bytes
        elif data:
            self._chunks.append(bytes(data))
            self._chunked += len(data)

    def next_frame(self) -> tuple[int, int, bytes, int] | None:
        buf, pos = self._buf, self._pos
        if self._chunked:
            if self._need and len(buf) - pos + self._chunked < self._need:
                return None
            self._chunks.insert(0, memoryview(buf)[pos:])
            buf = self._buf = b"".join(self._chunks)
            pos = self._pos = self._need = self._chunked = 0
            self._chunks.clear()
        end = len(buf)
        if pos == end:
            return None
        first = buf[pos]
        if first < 0x10:
            raise ProtocolError(f"packet type 0 is reserved (first byte 0x{first:02x})")
        if pos + 1 == end:
            return None
        length = buf[pos + 1]
        start = pos + 2
        if length > 0x7F:
            if start < end and buf[start] < 0x80:  # two length bytes (up to 16383), inline
                length = length & 0x7F | buf[start] << 7
                start += 1
            else:
                length, start = _varint(buf, pos + 1, end, "remaining length")
                if not start:
                    return None
        if length > self._max_size:
            raise ProtocolError(f"remaining length of {length} bytes exceeds the limit of {self._max_size}", TOO_LARGE)
        stop = start + length
        if stop > end:
            self._need = stop - pos
            return None
        self._pos = stop
        return first >> 4, first & 0x0F, buf[pos:stop], start - pos


class Will(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Connect(NamedTuple):
    protocol_level: int  # 3 (3.1), 4 (3.1.1), 5
    clean_start: bool
    keepalive: int
    client_id: str
    username: str | None
    password: bytes | None
    will: Will | None
    receive_maximum: int | None  # MQTT 5 CONNECT property, else None
    maximum_packet_size: int | None


class Connack(NamedTuple):
    session_present: bool
    reason_code: int  # 3.1.1 return code or MQTT 5 reason code; 0 = accepted
    receive_maximum: int | None
    topic_alias_maximum: int | None
    maximum_packet_size: int | None


class Publish(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None  # None for QoS 0
    topic_alias: int | None  # MQTT 5 property, else None


_PROTOCOLS = {(b"MQIsdp", 3), (b"MQTT", 4), (b"MQTT", 5)}


def parse_connect(raw: bytes, body_start: int) -> Connect:
    end = len(raw)
    name, i = _binary(raw, body_start, end, "CONNECT protocol name")
    if i + 4 > end:
        raise _cut("CONNECT protocol level, flags and keep alive", 4, end - i)
    level, flags, keepalive = raw[i], raw[i + 1], raw[i + 2] << 8 | raw[i + 3]
    i += 4
    if (name, level) not in _PROTOCOLS:
        raise ProtocolError(f"CONNECT protocol {name!r} level {level} is not supported "
                            "(MQIsdp 3, MQTT 4 and MQTT 5 are)", UNSUPPORTED_VERSION)
    if flags & 0x01:
        raise ProtocolError("CONNECT reserved flag is set")
    will_qos = flags >> 3 & 3
    if will_qos == 3:
        raise ProtocolError("CONNECT will QoS is 3")
    if not flags & 0x04 and flags & 0x38:
        raise ProtocolError("CONNECT sets will QoS or will retain without a will", PROTOCOL_ERROR)
    if level < 5 and flags & 0xC0 == 0x40:
        raise ProtocolError("CONNECT has a password but no user name", PROTOCOL_ERROR)
    receive_maximum = maximum_packet_size = None
    if level == 5:
        props, i = _properties(raw, i, end, _CONNECT_PROPERTIES, "CONNECT")
        receive_maximum, maximum_packet_size = _positive(props, 0x21, "CONNECT"), _positive(props, 0x27, "CONNECT")
    client_id, i = _utf8(raw, i, end, "CONNECT client identifier")
    will = username = password = None
    if flags & 0x04:
        if level == 5:
            i = _properties(raw, i, end, _WILL_PROPERTIES, "CONNECT will")[1]
        topic, i = _utf8(raw, i, end, "CONNECT will topic")
        problem = _topic_problem(topic)
        if problem:
            raise ProtocolError(f"CONNECT will topic {problem}", PROTOCOL_ERROR)
        payload, i = _binary(raw, i, end, "CONNECT will payload")
        will = Will(topic, payload, will_qos, bool(flags & 0x20))
    if flags & 0x80:
        username, i = _utf8(raw, i, end, "CONNECT user name")
    if flags & 0x40:
        password, i = _binary(raw, i, end, "CONNECT password")
    if i != end:
        raise ProtocolError(f"CONNECT has {end - i} bytes after its last field")
    return Connect(level, bool(flags & 0x02), keepalive, client_id, username, password, will,
                   receive_maximum, maximum_packet_size)


def parse_connack(raw: bytes, body_start: int, protocol_level: int) -> Connack:
    end = len(raw)
    i = body_start + 2
    if i > end:
        raise _cut("CONNACK flags and reason code", 2, end - body_start)
    flags, code = raw[i - 2], raw[i - 1]
    if flags & 0xFE:
        raise ProtocolError(f"CONNACK reserved flags are set (0x{flags:02x})")
    receive_maximum = topic_alias_maximum = maximum_packet_size = None
    if protocol_level == 5:
        if code not in _REASON_CODES[CONNACK]:
            raise ProtocolError(f"CONNACK reason code 0x{code:02x} is not one CONNACK may carry", PROTOCOL_ERROR)
        props, i = _properties(raw, i, end, _CONNACK_PROPERTIES, "CONNACK")
        receive_maximum, maximum_packet_size = _positive(props, 0x21, "CONNACK"), _positive(props, 0x27, "CONNACK")
        topic_alias_maximum = props.get(0x22)
    elif code > 5:
        raise ProtocolError(f"CONNACK return code {code} is reserved (0 to 5 are defined)", PROTOCOL_ERROR)
    if i != end:
        raise ProtocolError(f"CONNACK has {end - i} bytes after its last field")
    if flags and code:
        raise ProtocolError(f"CONNACK refuses the connection (code 0x{code:02x}) with Session Present set",
                            PROTOCOL_ERROR)
    return Connack(bool(flags), code, receive_maximum, topic_alias_maximum, maximum_packet_size)


_new = tuple.__new__  # NamedTuple construction without the Python-level __new__


def parse_publish(flags: int, raw: bytes, body_start: int, protocol_level: int) -> Publish:
    """A PUBLISH (``flags``: the fixed header's low 4 bits). ProtocolError for: QoS 3,
    packet id 0 with QoS > 0, a topic that is not valid UTF-8 or contains U+0000, ``+``
    or ``#``, an empty topic without a topic alias, DUP set on QoS 0 in MQTT 5 (see the
    module docstring), lengths or properties running past the end of the packet."""
    qos = flags >> 1 & 3
    end = len(raw)
    i = body_start + 2
    if i > end:
        raise _cut("PUBLISH topic length", 2, end - body_start)
    j = i + (raw[i - 2] << 8 | raw[i - 1])
    if j > end:
        raise _cut("PUBLISH topic", j - i, end - i)
    try:
        topic = raw[i:j].decode()
    except UnicodeDecodeError as e:
        raise ProtocolError(f"PUBLISH topic is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if qos:
        if qos == 3:
            raise ProtocolError("PUBLISH has QoS 3")
        if j + 2 > end:
            raise _cut("PUBLISH packet identifier", 2, end - j)
        packet_id = raw[j] << 8 | raw[j + 1]
        if not packet_id:
            raise ProtocolError(f"PUBLISH with QoS {qos} has packet identifier 0", PROTOCOL_ERROR)
        j += 2
    elif flags & 0x08 and protocol_level == 5:
        raise ProtocolError("PUBLISH with QoS 0 has DUP set", PROTOCOL_ERROR)
    else:
        packet_id = None
    alias = None
    if protocol_level == 5:
        if j < end and raw[j] == 0:  # no properties: the common case
            j += 1
        else:
            props, j = _properties(raw, j, end, _PUBLISH_PROPERTIES, "PUBLISH")
            alias = props.get(0x23)
            if alias == 0:
                raise ProtocolError("PUBLISH has Topic Alias 0", TOPIC_ALIAS_INVALID)
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        if topic or alias is None:
            raise ProtocolError(f"PUBLISH topic {_topic_problem(topic)}",
                                MALFORMED if "\x00" in topic else PROTOCOL_ERROR)
    return _new(Publish, (topic, raw[j:], qos, bool(flags & 0x01), bool(flags & 0x08), packet_id, alias))


def parse_packet_id(raw: bytes, body_start: int) -> int:
    """The packet identifier of a PUBACK, PUBREC, PUBREL or PUBCOMP (an MQTT 5 reason code
    and properties after it are ignored)."""
    if len(raw) - body_start < 2:
        raise _cut(f"{_name(raw)} packet identifier", 2, len(raw) - body_start)
    packet_id = raw[body_start] << 8 | raw[body_start + 1]
    if not packet_id:
        raise ProtocolError(f"{_name(raw)} has packet identifier 0", PROTOCOL_ERROR)
    return packet_id


def puback(packet_id: int, reason_code: int = 0, protocol_level: int = 4) -> bytes:
    return _ack(0x40, packet_id, reason_code, protocol_level)


def pubrec(packet_id: int, reason_code: int = 0, protocol_level: int = 4) -> bytes:
    return _ack(0x50, packet_id, reason_code, protocol_level)


def pubcomp(packet_id: int, reason_code: int = 0, protocol_level: int = 4) -> bytes:
    return _ack(0x70, packet_id, reason_code, protocol_level)


PINGREQ_PACKET = b"\xc0\x00"
PINGRESP_PACKET = b"\xd0\x00"


def disconnect(reason_code: int = 0, protocol_level: int = 4) -> bytes:
    if not reason_code:
        return b"\xe0\x00"
    _check_reason_code(DISCONNECT, reason_code, protocol_level)
    return bytes((0xE0, 1, reason_code))


def connack(reason_code: int, protocol_level: int, session_present: bool = False) -> bytes:
    """A CONNACK, to refuse a connection ourselves: 3.1 / 3.1.1 return codes 1 to 5, MQTT 5
    reason codes (0 accepts)."""
    if session_present and reason_code:
        raise ValueError("a CONNACK refusing the connection cannot have Session Present set")
    if protocol_level < 5:
        if not 0 <= reason_code <= 5:
            raise ValueError(f"CONNACK return code {reason_code} is not one of 0 to 5")
        return bytes((0x20, 2, session_present, reason_code))
    _check_reason_code(CONNACK, reason_code, protocol_level)
    return bytes((0x20, 3, session_present, reason_code, 0))


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool = False, dup: bool = False,
                   packet_id: int | None = None, protocol_level: int = 4) -> bytes:
    """A PUBLISH; in MQTT 5 with no properties."""
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS {qos} is not 0, 1 or 2")
    if dup and not qos:
        raise ValueError("DUP cannot be set on a QoS 0 PUBLISH")
    problem = _topic_problem(topic)
    if problem:
        raise ValueError(f"PUBLISH topic {problem}")
    name = topic.encode()
    if len(name) > 0xFFFF:
        raise ValueError(f"PUBLISH topic of {len(name)} bytes is longer than 65535")
    parts = [len(name).to_bytes(2, "big"), name]
    if qos:
        if packet_id is None or not 0 < packet_id <= 0xFFFF:
            raise ValueError(f"QoS {qos} needs a packet identifier from 1 to 65535, not {packet_id}")
        parts.append(packet_id.to_bytes(2, "big"))
    elif packet_id is not None:
        raise ValueError("a QoS 0 PUBLISH has no packet identifier")
    if protocol_level == 5:
        parts.append(b"\x00")
    parts.append(payload)
    body = b"".join(parts)
    return bytes((0x30 | dup << 3 | qos << 1 | retain,)) + _encode_length(len(body)) + body


def _ack(first: int, packet_id: int, reason_code: int, protocol_level: int) -> bytes:
    if not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier {packet_id} is not from 1 to 65535")
    if not reason_code:
        return bytes((first, 2, packet_id >> 8, packet_id & 0xFF))
    _check_reason_code(first >> 4, reason_code, protocol_level)
    return bytes((first, 3, packet_id >> 8, packet_id & 0xFF, reason_code))


def _check_reason_code(packet_type: int, reason_code: int, protocol_level: int) -> None:
    if protocol_level < 5:
        raise ValueError(f"a {_NAMES[packet_type]} before MQTT 5 has no reason code (got 0x{reason_code:02x})")
    if reason_code not in _REASON_CODES[packet_type]:
        raise ValueError(f"0x{reason_code:02x} is not a reason code for {_NAMES[packet_type]}")


def _encode_length(n: int) -> bytes:
    if n > 268_435_455:
        raise ValueError(f"remaining length {n} is more than MQTT can carry (268435455)")
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _name(raw: bytes) -> str:
    return _NAMES[raw[0] >> 4] if raw else "packet"


def _cut(what: str, need: int, left: int) -> ProtocolError:
    return ProtocolError(f"{what} needs {need} bytes, {max(left, 0)} left")


def _topic_problem(topic: str) -> str:
    """What is wrong with a topic name ('' if nothing)."""
    if not topic:
        return "is empty"
    if "\x00" in topic:
        return "contains U+0000"
    for char in "+#":
        if char in topic:
            return f"contains {char!r}"
    return ""


def _binary(raw: bytes, i: int, end: int, what: str) -> tuple[bytes, int]:
    """Binary Data (or a string's bytes) at ``raw[i]``: two bytes of length, then the
    data; and the index after it."""
    if i + 2 > end:
        raise _cut(f"{what} length", 2, end - i)
    j = i + 2 + (raw[i] << 8 | raw[i + 1])
    if j > end:
        raise _cut(what, j - i - 2, end - i - 2)
    return raw[i + 2:j], j


def _utf8(raw: bytes, i: int, end: int, what: str) -> tuple[str, int]:
    data, j = _binary(raw, i, end, what)
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if "\x00" in text:
        raise ProtocolError(f"{what} contains U+0000")
    return text, j


def _varint(raw: bytes, i: int, end: int, what: str) -> tuple[int, int]:
    """A Variable Byte Integer at ``raw[i]``: its value and the index after it, or (0, 0)
    if ``end`` comes first."""
    value = shift = 0
    for i in range(i, min(i + 4, end)):
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    if shift == 28:
        raise ProtocolError(f"{what} is longer than 4 bytes")
    return 0, 0


def _whole_varint(raw: bytes, i: int, end: int, what: str) -> tuple[int, int]:
    value, j = _varint(raw, i, end, what)
    if not j:
        raise ProtocolError(f"{what} is cut short by the end of the packet")
    return value, j


# MQTT 5 properties (5.0 section 2.2.2.2): identifier -> (name, type).
_PROPERTIES = {
    0x01: ("Payload Format Indicator", "byte"),
    0x02: ("Message Expiry Interval", "u32"),
    0x03: ("Content Type", "utf8"),
    0x08: ("Response Topic", "utf8"),
    0x09: ("Correlation Data", "binary"),
    0x0B: ("Subscription Identifier", "varint"),
    0x11: ("Session Expiry Interval", "u32"),
    0x12: ("Assigned Client Identifier", "utf8"),
    0x13: ("Server Keep Alive", "u16"),
    0x15: ("Authentication Method", "utf8"),
    0x16: ("Authentication Data", "binary"),
    0x17: ("Request Problem Information", "byte"),
    0x18: ("Will Delay Interval", "u32"),
    0x19: ("Request Response Information", "byte"),
    0x1A: ("Response Information", "utf8"),
    0x1C: ("Server Reference", "utf8"),
    0x1F: ("Reason String", "utf8"),
    0x21: ("Receive Maximum", "u16"),
    0x22: ("Topic Alias Maximum", "u16"),
    0x23: ("Topic Alias", "u16"),
    0x24: ("Maximum QoS", "byte"),
    0x25: ("Retain Available", "byte"),
    0x26: ("User Property", "pair"),
    0x27: ("Maximum Packet Size", "u32"),
    0x28: ("Wildcard Subscription Available", "byte"),
    0x29: ("Subscription Identifier Available", "byte"),
    0x2A: ("Shared Subscription Available", "byte"),
}
_WIDTHS = {"byte": 1, "u16": 2, "u32": 4}
_REPEATABLE = {0x0B, 0x26}  # may appear more than once
_PUBLISH_PROPERTIES = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26})
_WILL_PROPERTIES = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26})
_CONNECT_PROPERTIES = frozenset({0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27})
_CONNACK_PROPERTIES = frozenset({0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26,
                                 0x27, 0x28, 0x29, 0x2A})

# The MQTT 5 reason codes each packet we write or check may carry (5.0 sections 3.x).
_REASON_CODES = {
    CONNACK: frozenset({0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
                        0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}),
    PUBACK: frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99}),
    PUBREC: frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99}),
    PUBCOMP: frozenset({0x00, 0x92}),
    DISCONNECT: frozenset({0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8C, 0x8D, 0x8E, 0x8F, 0x90,
                           0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0,
                           0xA1, 0xA2}),
}


def _properties(raw: bytes, i: int, end: int, allowed: frozenset[int], packet: str) -> tuple[dict[int, object], int]:
    """The MQTT 5 properties at ``raw[i]`` (their length first) as {identifier: value}
    (the last value of a repeatable one), and the index after them."""
    length, i = _whole_varint(raw, i, end, f"{packet} property length")
    stop = i + length
    if stop > end:
        raise _cut(f"{packet} property list", length, end - i)
    values: dict[int, object] = {}
    while i < stop:
        ident = raw[i]
        if ident not in allowed:
            known = _PROPERTIES.get(ident)
            raise ProtocolError(f"{packet} may not carry property 0x{ident:02x}"
                                + (f" ({known[0]})" if known else " (no such property)"))
        name, kind = _PROPERTIES[ident]
        what = f"{packet} {name}"
        i += 1
        if kind in _WIDTHS:
            width = _WIDTHS[kind]
            if i + width > stop:
                raise _cut(what, width, stop - i)
            value: object = int.from_bytes(raw[i:i + width], "big")
            i += width
        elif kind == "varint":
            value, i = _whole_varint(raw, i, stop, what)
        elif kind == "binary":
            value, i = _binary(raw, i, stop, what)
        else:
            value, i = _utf8(raw, i, stop, what)
            if kind == "pair":
                second, i = _utf8(raw, i, stop, f"{what} value")
                value = (value, second)
        if ident in values and ident not in _REPEATABLE:
            raise ProtocolError(f"{packet} carries {name} twice", PROTOCOL_ERROR)
        values[ident] = value
    return values, stop


def _positive(props: dict[int, object], ident: int, packet: str) -> int | None:
    """A property that may not be 0 (Receive Maximum, Maximum Packet Size), or None."""
    value = props.get(ident)
    if value == 0:
        raise ProtocolError(f"{packet} {_PROPERTIES[ident][0]} is 0", PROTOCOL_ERROR)
    return value  # type: ignore[return-value]
