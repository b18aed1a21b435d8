"""paho's hot path, replaced for the gateway's client (see :mod:`gatewayd.core.mqtt.client`).

paho reads each packet in three ``recv`` calls and builds, per inbound PUBLISH, a
message object holding a ``threading.Condition`` that only outbound messages use.
Both cost more than storing the message. These pieces plug into one paho client
through private names that ``MQTTClient`` checks before using (paho's own path runs
otherwise); ``decode_311`` is checked against paho's decoder in
tests/test_mqtt_decode.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

_OK = MQTTErrorCode.MQTT_ERR_SUCCESS


class ReadBuffer:
    """paho's reads served from one large ``recv``.

    paho reads a packet with three ``recv`` calls (type byte, length, body), so one
    syscall per 20-odd bytes, each releasing the GIL, which the storage writer thread
    then takes: most of a small message's cost. This reads what the socket holds at
    once and hands paho its small pieces from memory. ``pending`` tells the reader not
    to wait for the socket while bytes are buffered.
    """

    __slots__ = ("_recv", "_buf", "_pos")

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv  # paho's own _sock_recv: keeps its TLS/error translation
        self._buf = b""
        self._pos = 0

    @property
    def pending(self) -> int:
        return len(self._buf) - self._pos

    def clear(self) -> None:
        self._buf, self._pos = b"", 0  # a new connection: nothing of the old one

    def recv(self, size: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf = self._recv(65536)  # BlockingIOError when empty, b"" at EOF: as paho expects
            self._buf, pos = buf, 0
        end = min(pos + size, len(buf))
        self._pos = end
        return buf[pos:end]


class Publish:
    """An inbound PUBLISH: the fields of paho's MQTTMessage the dispatcher reads.

    paho builds an ``MQTTMessage`` per inbound message, and with it an
    ``MQTTMessageInfo`` holding a ``threading.Condition`` that only outbound messages
    use: a fifth of the reader's time in the durable MQTT bench.
    """

    __slots__ = ("mid", "_topic", "payload", "qos", "retain", "dup", "properties")

    def __init__(self, topic: bytes, payload: bytes, qos: int, mid: int, retain: bool, dup: bool,
                 properties: Any = None) -> None:
        self._topic, self.payload, self.qos, self.mid = topic, payload, qos, mid
        self.retain, self.dup, self.properties = retain, dup, properties

    @property
    def topic(self) -> str:
        return self._topic.decode("utf-8")  # UnicodeDecodeError, as paho's: the dispatcher rejects it


class FastPublish:
    """paho's ``_handle_publish`` for QoS 0 and 1 with manual acks, without its message
    objects (see :class:`Publish`); QoS 2 goes to paho's own (subscriptions are capped
    at QoS 1, so it should never come)."""

    __slots__ = ("_client", "_decode", "_fallback", "_deliver")

    def __init__(self, client: paho.Client, decode: Callable[..., Any], fallback: Callable[[], Any],
                 deliver: Callable[[Any, Any, Any], None]) -> None:
        self._client, self._decode, self._fallback, self._deliver = client, decode, fallback, deliver

    def __call__(self) -> MQTTErrorCode:
        c = self._client
        packet = c._in_packet
        header, body = packet["command"], packet["packet"]
        msg = None
        if c._protocol != paho.MQTTv5:
            msg = decode_311(header, body)
        if msg is None:  # MQTT 5 (properties), or anything odd: paho's decoder, its errors
            d = self._decode(header, body, c._protocol)
            msg = Publish(d.topic, d.payload, d.qos, d.mid, d.retain, d.dup, d.properties)
        if msg.qos > 1:
            return self._fallback()
        self._deliver(c, None, msg)  # not acked here: manual_ack
        return _OK


def decode_311(header: int, body: bytes | bytearray) -> Publish | None:
    """An MQTT 3.1.1 PUBLISH body, or None for anything paho's decoder should judge
    (a short body, an empty topic). Same result as paho's, without its per-message
    ``struct`` formats."""
    size = len(body)
    if size < 2:
        return None
    end = 2 + ((body[0] << 8) | body[1])
    qos = (header & 0x06) >> 1
    start = end + 2 if qos else end
    if end == 2 or start > size:
        return None
    mid = (body[end] << 8) | body[end + 1] if qos else 0
    return Publish(bytes(body[2:end]), bytes(body[start:]), qos, mid, bool(header & 0x01), bool(header & 0x08))
