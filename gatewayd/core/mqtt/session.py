"""One device connection at the edge (:mod:`.edge`), and its relay to mosquitto.

Four tasks per connection, each the only one that does its part, so no two ever write
to one socket: reading the device (relaying, or delivering the gateway's PUBLISHes),
writing to the device (mosquitto's packets and the gateway's acks, from one queue),
reading mosquitto, writing to mosquitto (the relayed packets and the pings sent for the
device, from one queue). The device is not read further while its window is full, while
it does not read what is queued for it, or while mosquitto does not read what is queued
for mosquitto: a slow or hostile peer costs a bounded amount of memory. The session
still ends when mosquitto ends its side, and when the device reads nothing of what waits
for it for ``edge.stall_timeout``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from ...protocol import mqtt_packets as mp
from .broker import GATEWAY_USERNAME
from .delivery import DUPLICATE, HANDLED, UNROUTED, GroupHandler, InboundMessage, Verdict
from .edge import socket_of

if TYPE_CHECKING:
    from .edge import DeviceEdge, Window

__all__ = ["Session"]

_ACCEPTED = frozenset({HANDLED, DUPLICATE, UNROUTED})
_PAYLOAD_FORMAT_INVALID = 0x99  # MQTT 5: a PUBACK/PUBREC that refuses (3.1.1 has none: a plain ack)
_TOPIC_ALIAS_INVALID = 0x94
_SERVER_SHUTTING_DOWN = 0x8B
_READ_SIZE = 65536
_CONNECT_MAX = 65536  # a CONNECT is small: no more is buffered for a client not logged in
_QUEUE_MAX = 256 * 1024  # bytes waiting for a peer before the device is not read further
_new = tuple.__new__  # a NamedTuple per message without its Python-level __new__
_ALIASES_MAX = 64  # topic aliases kept per connection
_ROUTES_MAX = 256  # topics remembered per connection (intercepted or not)
_TOPIC_CACHED_MAX = 256  # longer topic names are decided each time, not remembered


class _Outbox:
    """Packets waiting to be written to one peer, and how many bytes they hold."""

    def __init__(self) -> None:
        self.packets: deque[bytes] = deque()
        self.size = 0
        self.ready = trio.Event()
        self.drained = trio.Event()  # set when nothing is queued or being written
        self._writing = False

    def put(self, packet: bytes) -> None:
        self.packets.append(packet)
        self.size += len(packet)
        self.ready.set()

    def take(self) -> bytes:
        out = b"".join(self.packets)
        self.packets.clear()
        self.size = 0
        return out

    async def write_to(self, stream: trio.abc.SendStream, stall: float | None = None) -> None:
        """Forever: write what is queued (one writer per stream). With ``stall``: raise
        TooSlowError when a write made no progress for that long (a peer that reads nothing)."""
        while True:
            while not self.packets:
                self.drained.set()
                self.ready = trio.Event()
                await self.ready.wait()
            # Cancelled (the session ends) before taking, the packets stay queued for
            # the session's last words (_close); send_all would drop them unsent.
            await trio.lowlevel.checkpoint_if_cancelled()
            self._writing = True
            try:
                data = self.take()
                if stall is None:
                    await stream.send_all(data)
                else:
                    view = memoryview(data)
                    for at in range(0, len(data), _READ_SIZE):
                        with trio.fail_after(stall):
                            await stream.send_all(view[at:at + _READ_SIZE])
            finally:
                self._writing = False

    async def wait_drained(self) -> None:
        """Until nothing is queued or being written."""
        while self.packets or self._writing:
            if self.drained.is_set():
                self.drained = trio.Event()  # only a waiter re-arms it: the writer only sets it
            await self.drained.wait()


class Session:
    """One device connection and its relay to mosquitto."""

    def __init__(self, edge: DeviceEdge, device: trio.SocketStream | trio.SSLStream[trio.SocketStream],
                 address: str) -> None:
        self.edge = edge
        self.device = device
        self.address = address
        try:
            self.peer = "%s:%s" % socket_of(device).getpeername()[:2]
        except OSError:
            self.peer = address
        self.upstream: trio.abc.Stream | None = None
        self.username = ""
        self.level = 4
        self.keepalive = 0
        self.window: Window | None = None
        self.in_flight: set[int] = set()  # packet ids being delivered on this connection
        self.awaiting_pubrel: set[int] = set()  # QoS 2 ids answered with PUBREC
        self._to_device = _Outbox()
        self._to_broker = _Outbox()
        self._aliases: dict[int, str] = {}  # MQTT 5 topic aliases the device set up
        self._routes: dict[str, bool | GroupHandler] = {}
        # This read's messages for group handlers, not submitted yet: handler -> (messages, packet ids).
        self._groups: dict[GroupHandler, tuple[list[InboundMessage], list[int | None]]] = {}
        self._kept_since_upstream = False  # device packets handled here since the last relay
        self._pings = 0  # PINGREQs sent for the device; their PINGRESPs are ours
        self._reading = trio.CancelScope()
        self._pending_scope = trio.CancelScope()  # until logged in: cancelled to make room
        self._scope: trio.CancelScope | None = None
        self._clean = False  # end with a DISCONNECT to mosquitto (no last will)
        self._disconnected = False  # the device's own DISCONNECT was relayed
        self._finished = trio.Event()
        self.alive = True

    # -- the connection's life --------------------------------------------------------

    async def run(self) -> None:
        edge = self.edge
        edge.enter_pending(self)
        try:
            reader = mp.FrameReader(_CONNECT_MAX)
            accepted = False
            with self._pending_scope:
                accepted = await self._open(reader)
            edge.leave_pending(self)
            if self._pending_scope.cancelled_caught or not accepted:
                return
            edge.stats.connections += 1
            try:
                reader.max_size = edge.max_packet
                self._device_reader = reader
                async with trio.open_nursery() as nursery:
                    self._scope = nursery.cancel_scope
                    for task in (self._from_device, self._from_broker, self._write_device, self._write_broker,
                                 self._keep_upstream_alive):
                        nursery.start_soon(self._guarded, task)
            finally:
                edge.stats.connections -= 1
        except mp.ProtocolError as exc:  # in CONNECT, or in mosquitto's CONNACK
            self._protocol_error(exc)
        except trio.TooSlowError:
            edge.stats.refused += 1
            edge.quiet("connect-timeout", logging.INFO, "MQTT edge: %s sent no CONNECT within %.0f s",
                       self.peer, edge.connect_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # either side went away
        finally:
            edge.leave_pending(self)
            self.alive = False
            with trio.CancelScope(shield=True):
                await self._close()
            if self.username:
                edge.forget_window(self.username)
            self._finished.set()

    async def _open(self, reader: mp.FrameReader) -> bool:
        """Read CONNECT, relay it, relay mosquitto's CONNACK; True when accepted."""
        edge = self.edge
        with trio.fail_after(edge.connect_timeout):
            kind, _, raw, start = await _read_frame(self.device, reader)
            if kind != mp.CONNECT:
                raise mp.ProtocolError(f"the first packet must be CONNECT, got type {kind}")
            connect = mp.parse_connect(raw, start)
            self.level = connect.protocol_level
            if connect.username == GATEWAY_USERNAME:
                # The gateway's own account is for the gateway, on the box: a login as it
                # from the LAN would take over its session.
                edge.stats.refused += 1
                edge.quiet("gateway-login", logging.WARNING,
                           "MQTT edge: refused a login as the gateway's own account from %s", self.peer)
                await _send_quietly(self.device, mp.connack(0x87 if self.level == 5 else 5, self.level))
                return False
        # mosquitto's answer is timed on its own: a stalled broker is not a device's fault.
        with trio.move_on_after(edge.connect_timeout) as waiting:
            try:
                self.upstream = await _connect(edge.broker)
            except OSError as exc:
                edge.stats.broker_unavailable += 1
                edge.quiet("broker-down", logging.WARNING, "MQTT edge: the broker is unreachable: %s", exc)
                await _send_quietly(self.device, mp.connack(0x88 if self.level == 5 else 3, self.level))
                return False
            await self.upstream.send_all(raw)
            self._broker_reader = mp.FrameReader(1 << 28)
            kind, _, ack, start = await _read_frame(self.upstream, self._broker_reader)
        if waiting.cancelled_caught:
            edge.stats.broker_unavailable += 1
            edge.quiet("broker-slow", logging.WARNING, "MQTT edge: the broker did not answer a login (of %s from %s) "
                       "within %.0f s", connect.username, self.peer, edge.connect_timeout)
            await _send_quietly(self.device, mp.connack(0x88 if self.level == 5 else 3, self.level))
            return False
        if kind != mp.CONNACK:
            raise mp.ProtocolError(f"the broker answered CONNECT with packet type {kind}")
        connack = mp.parse_connack(ack, start, self.level)
        await self.device.send_all(ack)
        if connack.reason_code != 0:
            edge.stats.refused += 1
            return False
        edge.stats.accepted += 1
        self.username = connect.username or ""
        self.keepalive = connect.keepalive
        self.window = edge.window(self.username)
        return True

    def evict(self) -> None:
        """Close a connection that has not logged in (the edge makes room)."""
        self._pending_scope.cancel()

    async def finish(self) -> None:
        """Graceful stop: read no more, let deliveries in flight be acknowledged, close."""
        self._reading.cancel()
        while self.in_flight and self.window is not None:
            await self.window.wait()
        with trio.move_on_after(1):
            await self._to_device.wait_drained()
        self._clean = True  # a DISCONNECT to mosquitto: the device's will does not fire
        if self._scope is not None:
            self._scope.cancel()
        await self._finished.wait()

    async def _close(self) -> None:
        # The writers are gone (the nursery ended): whatever is still queued for the
        # device (acks, our DISCONNECT) goes out now, briefly, and only from here.
        if self.edge.stopping and self.level == 5 and self.username:
            self._to_device.put(mp.disconnect(_SERVER_SHUTTING_DOWN, 5))
        if self._to_device.packets:
            await _send_quietly(self.device, self._to_device.take())
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if self._clean and not self._disconnected:
                self._to_broker.put(mp.disconnect(0, self.level))
            if self._to_broker.packets:
                await _send_quietly(upstream, self._to_broker.take())
            await upstream.aclose()
        await self.device.aclose()

    async def _guarded(self, task: Callable[[], Awaitable[None]]) -> None:
        # Whichever side ends or fails, the whole session ends (and the other side with it).
        assert self._scope is not None
        try:
            await task()
        except mp.ProtocolError as exc:
            self._protocol_error(exc)
            if self.level == 5:
                self._to_device.put(mp.disconnect(exc.reason_code, 5))  # sent by _close
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        self._scope.cancel()

    def _protocol_error(self, exc: mp.ProtocolError) -> None:
        self.edge.stats.protocol_errors += 1
        self.edge.quiet("protocol", logging.INFO, "MQTT edge: closing %s (%s): %s", self.peer,
                        self.username or "before CONNECT", exc)

    # -- device -> broker ------------------------------------------------------------

    async def _from_device(self) -> None:
        with self._reading:
            await self._relay_device()
        if self._reading.cancelled_caught:
            await trio.sleep_forever()  # finish() winds the session down

    def _held(self) -> Awaitable[None] | None:
        """What to wait for before reading the device again, or None."""
        edge, window = self.edge, self.window
        assert window is not None
        if window.size >= edge.per_device:
            return window.wait()
        if edge.pool.full:
            return edge.pool.wait_slot()
        if self._to_device.size > _QUEUE_MAX:
            return self._to_device.wait_drained()  # the device does not read what it is sent
        if self._to_broker.size > _QUEUE_MAX:
            return self._to_broker.wait_drained()  # mosquitto does not read what is relayed
        return None

    async def _relay_device(self) -> None:
        reader = self._device_reader
        while True:
            try:
                held = self._read_frames(reader)
            finally:
                self._submit_groups()  # what this read brought for group handlers goes together
            if held is False:
                await self._to_broker.wait_drained()
                return  # DISCONNECT relayed: mosquitto closes its side
            if held is not None:
                await held
                continue  # frames may be waiting in the buffer already
            data = await self.device.receive_some(_READ_SIZE)
            if not data:
                return  # closed without DISCONNECT: closing upstream the same way fires its will
            reader.feed(data)

    def _read_frames(self, reader: mp.FrameReader) -> Awaitable[None] | None | bool:
        """Handle the frames buffered; what to wait for before reading again (None:
        nothing), or False after the device's DISCONNECT."""
        while (held := self._held()) is None and (frame := reader.next_frame()) is not None:
            kind, flags, raw, start = frame
            if kind == mp.PUBLISH:
                if not self._publish(flags, raw, start):
                    self._relay(raw)
            elif kind == mp.PUBREL and (pid := mp.parse_packet_id(raw, start)) in self.awaiting_pubrel:
                self.awaiting_pubrel.discard(pid)
                self._to_device.put(mp.pubcomp(pid, 0, self.level))
                self._kept_since_upstream = True
            else:
                if kind == mp.DISCONNECT:
                    self._clean = self._disconnected = True
                self._relay(raw)
                if self._disconnected:
                    return False
        return held

    def _submit_groups(self) -> None:
        groups, self._groups = self._groups, {}
        for handler, (messages, pids) in groups.items():
            self.edge.pool.submit_group(handler, messages, "edge:" + self.username, pids, self._reply_group)

    def _relay(self, raw: bytes) -> None:
        self.edge.stats.relayed += 1
        self._kept_since_upstream = False
        self._to_broker.put(raw)

    def _publish(self, flags: int, raw: bytes, start: int) -> bool:
        """Handle a device PUBLISH here if it is the gateway's; False to relay it."""
        msg = mp.parse_publish(flags, raw, start, self.level)
        topic = msg.topic
        if msg.topic_alias is not None:
            # The device set up (or reuses) an alias: resolve it, so what is the
            # gateway's is taken out however it is named. Aliases the gateway keeps are
            # never seen by mosquitto; that is consistent because whether a topic is
            # the gateway's depends on the topic alone.
            if msg.topic_alias > _ALIASES_MAX:
                # More than any broker offers (mosquitto: 10): the device's error, and
                # memory it must not make the gateway keep.
                raise mp.ProtocolError(f"topic alias {msg.topic_alias} is over {_ALIASES_MAX}", _TOPIC_ALIAS_INVALID)
            if topic:
                self._aliases[msg.topic_alias] = topic
            elif (known := self._aliases.get(msg.topic_alias)) is not None:
                topic = known
            else:  # every PUBLISH passes here, so an alias never set up is the device's error
                raise mp.ProtocolError(f"topic alias {msg.topic_alias} was never set up", _TOPIC_ALIAS_INVALID)
        routed = self._routes.get(topic)
        if routed is None:
            routed = self.edge.route(self.username, topic)
            if len(topic) <= _TOPIC_CACHED_MAX and len(self._routes) < _ROUTES_MAX:
                self._routes[topic] = routed
        if not routed:
            return False
        self._kept_since_upstream = True
        pid = msg.packet_id
        if pid is not None:
            if msg.qos == 2 and pid in self.awaiting_pubrel:
                self._to_device.put(mp.pubrec(pid, 0, self.level))  # a resend of one we have
                return True
            if pid in self.in_flight:
                return True  # a resend of one being delivered: its ack is on the way
            self.in_flight.add(pid)
        assert self.window is not None
        self.window.size += 1
        self.edge.stats.intercepted += 1
        # As a broker hands a live message to a subscriber: RETAIN cleared (it is the
        # message, not a stored copy; and the gateway does not retain it).
        message = _new(InboundMessage, (topic, msg.payload, msg.qos, False, msg.dup, self.username))
        if routed is not True and msg.qos < 2 and not msg.dup:
            group = self._groups.get(routed)
            if group is None:
                group = self._groups[routed] = ([], [])
            group[0].append(message)
            group[1].append(pid)
            return True
        reply = self._reply_qos2 if msg.qos == 2 else self._reply
        self.edge.pool.submit(message, "edge:" + self.username, pid, reply)
        return True

    def _reply(self, pid: int | None, verdict: Verdict) -> None:
        if pid is not None:
            self.in_flight.discard(pid)
            self._ack(mp.puback, pid, verdict)
        self._release()

    def _reply_group(self, pids: list[int | None], verdicts: list[Verdict]) -> None:
        """`_reply` for each message of a group (QoS 0 or 1), the PUBACKs queued as one write."""
        stats = self.edge.stats
        acks = []
        refusing = self.level == 5
        for pid, verdict in zip(pids, verdicts):
            if pid is None:
                continue
            self.in_flight.discard(pid)
            if not self.alive:
                stats.stale_acks += 1
                continue
            reason = 0
            if refusing and verdict not in _ACCEPTED:
                reason = _PAYLOAD_FORMAT_INVALID
                stats.refused_acks += 1
            acks.append(mp.puback(pid, reason, self.level))
        if acks:
            self._to_device.put(b"".join(acks))
            stats.acked += len(acks)
        self._release(len(pids))

    def _reply_qos2(self, pid: int | None, verdict: Verdict) -> None:
        assert pid is not None
        self.in_flight.discard(pid)
        # A refusing PUBREC (MQTT 5) ends the exchange; any other waits for PUBREL.
        if self._ack(mp.pubrec, pid, verdict) and (verdict in _ACCEPTED or self.level != 5):
            self.awaiting_pubrel.add(pid)
        self._release()

    def _release(self, n: int = 1) -> None:
        assert self.window is not None
        self.window.release(n)
        if not self.alive:  # the connection ended while this was delivered
            self.edge.forget_window(self.username)

    def _ack(self, build: Any, pid: int, verdict: Verdict) -> bool:
        stats = self.edge.stats
        if not self.alive:
            stats.stale_acks += 1
            return False
        reason = 0
        if verdict not in _ACCEPTED and self.level == 5:
            reason = _PAYLOAD_FORMAT_INVALID
            stats.refused_acks += 1
        self._to_device.put(build(pid, reason, self.level))
        stats.acked += 1
        return True

    # -- broker -> device ------------------------------------------------------------

    async def _from_broker(self) -> None:
        reader = self._broker_reader
        assert self.upstream is not None and self._scope is not None
        while True:
            while (frame := reader.next_frame()) is not None:
                kind, _, raw, _ = frame
                if kind == mp.PINGRESP and self._pings:
                    self._pings -= 1  # the answer to a ping we sent for the device
                    continue
                self._to_device.put(raw)
            if self._to_device.size > _QUEUE_MAX:
                # Not passed on while the device does not read: mosquitto holds it (and
                # applies its own limits), not the gateway's memory.
                if not await self._device_drained_or_broker_gone(reader):
                    self._scope.cancel()  # mosquitto ended the session while the device did not read
                    return
                continue  # what came meanwhile first
            data = await self.upstream.receive_some(_READ_SIZE)
            if not data:
                self._scope.cancel()  # taken over, or mosquitto went down: the device reconnects
                return
            reader.feed(data)

    async def _device_drained_or_broker_gone(self, reader: mp.FrameReader) -> bool:
        """Wait until the device read what waits for it (True), still watching mosquitto's
        end of the session (False): a session mosquitto closed (taken over by a new login
        of the device, timed out) must end here too, or a device that stops reading and
        logs in again, over and over, would pile up sessions here. What mosquitto sends
        meanwhile is kept, unparsed, up to _QUEUE_MAX; past that it is not read either."""
        assert self.upstream is not None
        upstream = self.upstream
        gone = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal gone
                held = 0
                while held <= _QUEUE_MAX:
                    data = await upstream.receive_some(_READ_SIZE)
                    if not data:
                        gone = True
                        nursery.cancel_scope.cancel()
                        return
                    reader.feed(data)
                    held += len(data)

            nursery.start_soon(watch)
            await self._to_device.wait_drained()
            nursery.cancel_scope.cancel()
        return not gone

    async def _write_device(self) -> None:
        try:
            await self._to_device.write_to(self.device, self.edge.stall_timeout)
        except trio.TooSlowError:
            # The device read nothing of what waits for it for a minute (the kernel's
            # buffers are full too): it is gone or hostile, and TCP never gives up on a
            # peer that answers its window probes. The session ends.
            self.edge.quiet("stalled", logging.INFO, "MQTT edge: closing %s (%s): it read nothing for %.0f s",
                            self.peer, self.username, self.edge.stall_timeout)

    async def _write_broker(self) -> None:
        assert self.upstream is not None
        await self._to_broker.write_to(self.upstream)

    async def _keep_upstream_alive(self) -> None:
        # mosquitto closes a session that sent nothing for 1.5 keepalives. A device whose
        # every packet was kept here still talks: ping on its behalf. A silent device
        # gets no pings, and mosquitto times it out as it should.
        if not self.keepalive:
            await trio.sleep_forever()
        while True:
            await trio.sleep(self.keepalive / 2)
            if self._kept_since_upstream:
                self._kept_since_upstream = False
                self._pings += 1
                self._to_broker.put(mp.PINGREQ_PACKET)


async def _connect(broker: tuple[str, int] | str) -> trio.abc.Stream:
    if isinstance(broker, str):
        return await trio.open_unix_socket(broker)
    return await trio.open_tcp_stream(*broker)


async def _read_frame(stream: trio.abc.ReceiveStream, reader: mp.FrameReader) -> tuple[int, int, bytes, int]:
    while (frame := reader.next_frame()) is None:
        data = await stream.receive_some(_READ_SIZE)
        if not data:
            raise trio.BrokenResourceError("closed before a whole packet")
        reader.feed(data)
    return frame


async def _send_quietly(stream: trio.abc.SendStream, packet: bytes) -> None:
    with trio.move_on_after(1):
        try:
            await stream.send_all(packet)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            pass
