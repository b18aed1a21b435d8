"""PUBACKs from the gateway's own client to the broker, for :class:`gatewayd.core.mqtt.MQTTClient`.

Messages go to the shared :class:`~gatewayd.core.mqtt.delivery.DeliveryPool`; every
verdict it returns is acknowledged (see :mod:`.delivery`). Two rules live here:

- A PUBACK only goes out on the connection its message came on: packet ids are reused
  per connection, so a late ack on a newer connection could acknowledge a different
  message. Each connection gets its own :class:`BrokerAcks`; a reply for an old one is
  dropped (the broker sends the message again on the new connection, and its mark
  tells the delivery that it was stored).
- Acks due at the same moment go out in one write: handlers woken by one group commit
  all finish in the same scheduler pass, and the sender runs in the next one.
"""

from __future__ import annotations

import struct

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import MessageType

from .delivery import Verdict

__all__ = ["BrokerAcks"]

_PUBACK = struct.Struct("!BBH")  # fixed header 0x40, remaining length 2, packet id


class BrokerAcks:
    """The PUBACKs earned on one connection of the gateway's client."""

    def __init__(self, client: paho.Client, stats: object) -> None:
        self._client = client
        self._stats = stats
        self._mids: list[int] = []
        self._due = trio.Event()
        self.alive = True

    def reply(self, packet_id: int | None, verdict: Verdict) -> None:
        """The pool's answer for a message that arrived on this connection."""
        if packet_id is None:
            return  # QoS 0: nothing to acknowledge
        if not self.alive:
            self._stats.stale_acks += 1  # type: ignore[attr-defined]
            return
        self._mids.append(packet_id)
        self._due.set()

    async def due(self) -> None:
        """Wait until PUBACKs are due."""
        await self._due.wait()
        self._due = trio.Event()

    def send(self) -> None:
        """Queue every due PUBACK on paho's connection (the writer sends them)."""
        mids, self._mids = self._mids, []
        if not mids or not self.alive:
            return
        queue = getattr(self._client, "_packet_queue", None)
        if queue is not None:
            # paho's own PUBACK is exactly this packet; ack() would queue them one by one.
            queue(MessageType.PUBACK, b"".join(_PUBACK.pack(0x40, 2, mid) for mid in mids), 0, 1)
        else:  # a paho without that private queue: one ack() each
            for mid in mids:
                self._client.ack(mid, 1)
        self._stats.acked += len(mids)  # type: ignore[attr-defined]

    def close(self) -> None:
        """The connection is gone: whatever was not sent comes back from the broker."""
        self.alive = False
        self._stats.stale_acks += len(self._mids)  # type: ignore[attr-defined]
        self._mids.clear()
