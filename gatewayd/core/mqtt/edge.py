"""The device-facing MQTT listener: the gateway acknowledges what it stores, itself.

With ``mqtt.broker = "managed"`` devices connect here (``mqtt.listen``), not to
mosquitto, which listens on a private loopback port. A broker acknowledges a QoS 1
PUBLISH as soon as it has it in memory; if it then crashes, or the box loses power,
before the gateway stored the message, the device was told "received" about a message
that is gone. So for the PUBLISHes the gateway consumes itself, the acknowledgement
comes from here, after the commit.

Each device connection is relayed to mosquitto packet by packet, in both directions:
authentication, sessions, subscriptions, commands down to devices, retained messages
and last wills stay mosquitto's. The edge reads the packets a device sends and takes
out the PUBLISHes whose topic a plugin subscribed to and that the device's ACL lets it
write (the same patterns mosquitto enforces): those are delivered here (the shared
:class:`~gatewayd.core.mqtt.delivery.DeliveryPool`) and answered here, PUBACK (QoS 1)
or PUBREC (QoS 2) once their verdict is in; mosquitto never sees them. Everything else
goes on to mosquitto unchanged.

Consequences, by design:

- What the gateway consumes is not re-published on the broker: a LAN app subscribed to
  a family's device topics does not see it (the gateway's API and live streams do).
- A stalled gateway acknowledges nothing; devices back off with their own buffers.
- One device's connection is limited to ``per_connection`` deliveries in flight: a
  flooding device fills its own window, not the site's.
- Client ids belong to accounts: mosquitto runs with ``use_username_as_clientid``, so a
  device cannot take the gateway's session or another device's; and the edge refuses
  logins as the gateway's own account (it connects to mosquitto directly).
- While the gateway sees a device's packets, mosquitto sees only what is relayed, so the
  edge sends a PINGREQ on the device's behalf when it has kept everything for half the
  keepalive (and drops the matching PINGRESP), else mosquitto would time a busy device out.
- A gateway restart closes every device connection: the gateway is what acknowledges.
  On a graceful stop, deliveries in flight finish and are acknowledged first, and the
  relay ends with a DISCONNECT, so devices' last wills do not fire; after a crash they do.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Awaitable, Callable, Sequence

import trio

from ...protocol import mqtt_packets as mp
from ...protocol.topics import TopicRouter, matches
from ..schema import Address
from .broker import GATEWAY_USERNAME, AclTemplate
from .delivery import DUPLICATE, HANDLED, UNROUTED, DeliveryPool, InboundMessage, Verdict

__all__ = ["DeviceEdge", "EdgeStats", "WriteAcl"]

log = logging.getLogger("gatewayd.mqtt.edge")

_ACCEPTED = frozenset({HANDLED, DUPLICATE, UNROUTED})
# MQTT 5 reason codes for a PUBACK/PUBREC that refuses (3.1.1 has none: a plain ack).
_PAYLOAD_FORMAT_INVALID = 0x99
_READ_SIZE = 65536


class WriteAcl:
    """May this device publish on this topic? The ``write``/``readwrite`` ACL patterns the
    plugins declared, with ``%u`` and ``%c`` the device's username (its client id, since
    mosquitto binds one to the other); a ``deny`` pattern that matches wins."""

    def __init__(self, templates: Sequence[AclTemplate]) -> None:
        self._allow = [t.pattern for t in templates if t.access in ("write", "readwrite")]
        self._deny = [t.pattern for t in templates if t.access == "deny"]

    def may_write(self, username: str, topic: str) -> bool:
        if any(c in username for c in "+#/"):
            return False  # mosquitto refuses to substitute these
        sub = self._substitute
        if any(matches(sub(p, username), topic) for p in self._deny):
            return False
        return any(matches(sub(p, username), topic) for p in self._allow)

    @staticmethod
    def _substitute(pattern: str, username: str) -> str:
        return pattern.replace("%u", username).replace("%c", username)


@dataclass
class EdgeStats:
    """Counters for /metrics."""

    connections: int = 0  # open now
    accepted: int = 0  # connections whose CONNECT mosquitto accepted
    refused: int = 0  # refused by mosquitto (credentials) or by us (no CONNECT, broker down)
    protocol_errors: int = 0
    intercepted: int = 0  # PUBLISHes delivered here
    relayed: int = 0  # packets relayed from devices to mosquitto
    acked: int = 0
    refused_acks: int = 0  # MQTT 5 acks carrying a refusal reason (rejected messages)
    stale_acks: int = 0  # decided after the device had gone: it sends the message again

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DeviceEdge:
    """Accepts device connections on ``listen`` and relays them to mosquitto at ``broker``."""

    def __init__(
        self,
        listen: Address,
        broker: tuple[str, int],
        pool: DeliveryPool,
        acl: WriteAcl,
        *,
        max_packet: int = 1 << 20,
        per_connection: int = 32,
        connect_timeout: float = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.listen = listen
        self.broker = broker
        self.pool = pool
        self.router: TopicRouter[Any] = pool.delivery.router
        self.acl = acl
        self.max_packet = max_packet
        self.per_connection = per_connection
        self.connect_timeout = connect_timeout
        self.log = logger or log
        self.stats = EdgeStats()
        self.sessions: set[_Session] = set()
        self._accepting: trio.CancelScope | None = None
        self._stopping = False
        self._closed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until :meth:`stop` (or cancelled); ``started`` with the bound addresses."""
        host = self.listen.host or None
        listeners = await trio.open_tcp_listeners(self.listen.port, host=host)
        bound = [f"{s.socket.getsockname()[0]}:{s.socket.getsockname()[1]}" for s in listeners]
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accepting:
                self._accepting = accepting.cancel_scope
                # Sessions live in the outer nursery: they outlast the listeners on a stop.
                await accepting.start(partial(trio.serve_listeners, self._handle, listeners, handler_nursery=sessions))
                self.log.info("MQTT edge listening on %s (broker %s:%d)", " ".join(bound), *self.broker)
                task_status.started(bound)
            await self._closed.wait()  # stop() cancelled the listeners; it says when sessions are done
            sessions.cancel_scope.cancel()

    async def stop(self, grace: float) -> None:
        """Stop accepting; let deliveries in flight finish and be acknowledged (up to
        ``grace``), then close every connection with a DISCONNECT to mosquitto."""
        self._stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
        with trio.move_on_after(grace):
            async with trio.open_nursery() as nursery:
                for session in list(self.sessions):
                    nursery.start_soon(session.finish)
        self._closed.set()

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._stopping:
            await stream.aclose()
            return
        session = _Session(self, stream)
        self.sessions.add(session)
        self.stats.connections += 1
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.stats.connections -= 1

    def intercepts(self, username: str, topic: str) -> bool:
        return bool(self.router.handlers_for(topic)) and self.acl.may_write(username, topic)


class _Session:
    """One device connection and its relay to mosquitto."""

    def __init__(self, edge: DeviceEdge, device: trio.SocketStream) -> None:
        self.edge = edge
        self.device = device
        self.upstream: trio.SocketStream | None = None
        try:
            host, port = device.socket.getpeername()[:2]
            self.peer = f"{host}:{port}"
        except OSError:
            self.peer = "?"
        self.username = ""
        self.level = 4
        self.keepalive = 0
        self.in_flight: set[int] = set()  # packet ids being delivered
        self.awaiting_pubrel: set[int] = set()  # QoS 2 ids we answered PUBREC for
        self.qos0_in_flight = 0
        self._slot = trio.Event()
        self._out: list[bytes] = []
        self._out_ready = trio.Event()
        self._routes: dict[str, bool] = {}
        self._kept_since_upstream = False  # swallowed device packets since the last relay
        self._pings = 0  # PINGREQs we sent for the device; their PINGRESPs are ours
        self._send_lock = trio.Lock()  # one writer at a time on the device's socket
        self._reading = trio.CancelScope()
        self._scope: trio.CancelScope | None = None
        self._clean = False  # end with a DISCONNECT to mosquitto (no last will)
        self._disconnected = False  # the device's own DISCONNECT was relayed
        self._finished = trio.Event()
        self.alive = True

    # -- the connection's life --------------------------------------------------------

    async def run(self) -> None:
        try:
            if not await self._open():
                return
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                for task in (self._from_device, self._from_broker, self._to_device, self._keep_upstream_alive):
                    nursery.start_soon(self._guarded, task)
        except mp.ProtocolError as exc:  # in CONNECT
            self._protocol_error(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass  # either side went away, or a connect that never finished
        finally:
            self.alive = False
            with trio.CancelScope(shield=True):
                await self._close()
            self._finished.set()

    async def _open(self) -> bool:
        """Read CONNECT, relay it, relay mosquitto's CONNACK; True when accepted."""
        edge = self.edge
        reader = mp.FrameReader(edge.max_packet)
        with trio.fail_after(edge.connect_timeout):
            kind, _, raw, start = await self._read_frame(self.device, reader)
            if kind != mp.CONNECT:
                raise mp.ProtocolError(f"the first packet must be CONNECT, got type {kind}")
            connect = mp.parse_connect(raw, start)
            self.level = connect.protocol_level
            if connect.username == GATEWAY_USERNAME:
                # The gateway's own account is for the gateway, on the box: a login as it
                # from the LAN would take over its session.
                edge.stats.refused += 1
                edge.log.warning("MQTT edge: refused a login as the gateway's own account from %s", self.peer)
                await self._send_quietly(self.device, mp.connack(0x87 if self.level == 5 else 5, self.level))
                return False
            try:
                self.upstream = await trio.open_tcp_stream(*edge.broker)
            except OSError as exc:
                edge.stats.refused += 1
                edge.log.warning("MQTT edge: broker unreachable for %s: %s", self.peer, exc)
                await self._send_quietly(self.device, mp.connack(0x88 if self.level == 5 else 3, self.level))
                return False
            await self.upstream.send_all(raw)
            broker_reader = mp.FrameReader(1 << 28)
            kind, _, ack, start = await self._read_frame(self.upstream, broker_reader)
        if kind != mp.CONNACK:
            raise mp.ProtocolError(f"the broker answered CONNECT with packet type {kind}")
        await self.device.send_all(ack)
        if mp.parse_connack(ack, start, self.level).reason_code != 0:
            edge.stats.refused += 1
            return False
        edge.stats.accepted += 1
        self.username = connect.username or ""
        self.keepalive = connect.keepalive
        self._device_reader, self._broker_reader = reader, broker_reader
        return True

    async def _guarded(self, task: Callable[[], Awaitable[None]]) -> None:
        # Whichever side ends or fails, the whole session ends (and the other side with it).
        assert self._scope is not None
        try:
            await task()
        except mp.ProtocolError as exc:
            self._protocol_error(exc)
            if self.level == 5:
                await self._send_quietly(self.device, mp.disconnect(exc.reason_code, 5))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        self._scope.cancel()

    def _protocol_error(self, exc: mp.ProtocolError) -> None:
        self.edge.stats.protocol_errors += 1
        self.edge.log.info("MQTT edge: closing %s (%s): %s", self.peer, self.username or "before CONNECT", exc)

    async def finish(self) -> None:
        """Graceful stop: read no more, let deliveries in flight be acknowledged, close."""
        self._reading.cancel()
        while self.in_flight or self.qos0_in_flight:
            await self._wait_slot()
        with trio.move_on_after(1):
            await self._flush()
        self._clean = True  # a DISCONNECT to mosquitto: the device's will does not fire
        if self._scope is not None:
            self._scope.cancel()
        await self._finished.wait()

    async def _close(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if self._clean and not self._disconnected:
                await self._send_quietly(upstream, mp.disconnect(0, self.level))
            await upstream.aclose()
        if self.edge._stopping and self.level == 5 and self.username:
            await self._send_quietly(self.device, mp.disconnect(0x8B, 5))  # server shutting down
        await self.device.aclose()

    # -- device -> broker ------------------------------------------------------------

    async def _from_device(self) -> None:
        with self._reading:
            await self._relay_device()
        if self._reading.cancelled_caught:
            await trio.sleep_forever()  # finish() winds the session down

    async def _relay_device(self) -> None:
        reader = self._device_reader
        edge = self.edge
        pool = edge.pool
        limit = edge.per_connection
        while True:
            relay: list[bytes] = []
            # A device with a full window is not read further (backpressure on its
            # socket) until one of its deliveries is decided.
            while (len(self.in_flight) + self.qos0_in_flight < limit and not pool.full
                   and (frame := reader.next_frame()) is not None):
                kind, flags, raw, start = frame
                if kind == mp.PUBLISH:
                    if not self._publish(flags, raw, start):
                        relay.append(raw)
                elif kind == mp.PUBREL and (pid := mp.parse_packet_id(raw, start)) in self.awaiting_pubrel:
                    self.awaiting_pubrel.discard(pid)
                    self._send(mp.pubcomp(pid, 0, self.level))
                    self._kept_since_upstream = True
                else:
                    if kind == mp.DISCONNECT:
                        self._clean = self._disconnected = True
                    relay.append(raw)
            if relay:
                edge.stats.relayed += len(relay)
                self._kept_since_upstream = False
                assert self.upstream is not None
                await self.upstream.send_all(relay[0] if len(relay) == 1 else b"".join(relay))
                if self._disconnected:
                    return  # DISCONNECT relayed: mosquitto closes its side
            if len(self.in_flight) + self.qos0_in_flight >= limit or pool.full:
                await (pool.wait_slot() if pool.full else self._wait_slot())
                continue  # frames may be waiting in the buffer already
            data = await self.device.receive_some(_READ_SIZE)
            if not data:
                return  # closed without DISCONNECT: closing upstream the same way fires its will
            reader.feed(data)

    def _publish(self, flags: int, raw: bytes, start: int) -> bool:
        """Handle a device PUBLISH here if it is the gateway's; False to relay it."""
        msg = mp.parse_publish(flags, raw, start, self.level)
        if msg.topic_alias is not None or not msg.topic:
            return False  # aliases are off (max_topic_alias 0): mosquitto says so
        routed = self._routes.get(msg.topic)
        if routed is None:
            routed = self.edge.intercepts(self.username, msg.topic)
            if len(self._routes) < 1024:
                self._routes[msg.topic] = routed
        if not routed:
            return False
        self._kept_since_upstream = True
        pid = msg.packet_id
        if pid is not None:
            if msg.qos == 2 and pid in self.awaiting_pubrel:
                self._send(mp.pubrec(pid, 0, self.level))  # a resend of one we have
                return True
            if pid in self.in_flight:
                return True  # a resend of one being delivered: its ack is on the way
            self.in_flight.add(pid)
        else:
            self.qos0_in_flight += 1
        self.edge.stats.intercepted += 1
        message = InboundMessage(msg.topic, msg.payload, msg.qos, msg.retain, msg.dup, self.username)
        reply = self._reply_qos2 if msg.qos == 2 else self._reply
        self.edge.pool.submit(message, "edge:" + self.username, pid, reply)
        return True

    def _reply(self, pid: int | None, verdict: Verdict) -> None:
        if pid is None:
            self.qos0_in_flight -= 1
        else:
            self.in_flight.discard(pid)
            self._ack(mp.puback, pid, verdict)
        self._slot.set()

    def _reply_qos2(self, pid: int | None, verdict: Verdict) -> None:
        assert pid is not None
        self.in_flight.discard(pid)
        # A refusing PUBREC (MQTT 5) ends the exchange; any other waits for PUBREL.
        if self._ack(mp.pubrec, pid, verdict) and (verdict in _ACCEPTED or self.level != 5):
            self.awaiting_pubrel.add(pid)
        self._slot.set()

    def _ack(self, build: Any, pid: int, verdict: Verdict) -> bool:
        stats = self.edge.stats
        if not self.alive:
            stats.stale_acks += 1
            return False
        reason = 0
        if verdict not in _ACCEPTED and self.level == 5:
            reason = _PAYLOAD_FORMAT_INVALID
            stats.refused_acks += 1
        self._send(build(pid, reason, self.level))
        stats.acked += 1
        return True

    # -- broker -> device ------------------------------------------------------------

    async def _from_broker(self) -> None:
        reader = self._broker_reader
        assert self.upstream is not None
        while True:
            data = await self.upstream.receive_some(_READ_SIZE)
            if not data:
                self.edge.log.debug("MQTT edge: the broker closed %s's session", self.username)
                assert self._scope is not None
                self._scope.cancel()  # taken over, or mosquitto went down: the device reconnects
                return
            reader.feed(data)
            while (frame := reader.next_frame()) is not None:
                kind, _, raw, _ = frame
                if kind == mp.PINGRESP and self._pings:
                    self._pings -= 1  # the answer to a ping we sent for the device
                    continue
                self._out.append(raw)
            # Sent from here, so a device that does not read holds mosquitto back, not our memory.
            await self._flush()

    async def _to_device(self) -> None:
        while True:
            await self._out_ready.wait()
            self._out_ready = trio.Event()
            await self._flush()

    async def _keep_upstream_alive(self) -> None:
        # mosquitto closes a session that sent nothing for 1.5 keepalives. A device whose
        # every packet was kept here still talks: ping on its behalf. A silent device
        # gets no pings, and mosquitto times it out as it should.
        if not self.keepalive:
            await trio.sleep_forever()
        period = self.keepalive / 2
        while True:
            await trio.sleep(period)
            if self._kept_since_upstream and self.upstream is not None:
                self._kept_since_upstream = False
                self._pings += 1
                await self.upstream.send_all(mp.PINGREQ_PACKET)

    # -- small helpers ----------------------------------------------------------------

    def _send(self, packet: bytes) -> None:
        self._out.append(packet)
        self._out_ready.set()

    async def _flush(self) -> None:
        async with self._send_lock:
            while self._out:
                out, self._out = self._out, []
                await self.device.send_all(out[0] if len(out) == 1 else b"".join(out))

    async def _wait_slot(self) -> None:
        if self._slot.is_set():
            self._slot = trio.Event()
        await self._slot.wait()

    @staticmethod
    async def _read_frame(stream: trio.SocketStream, reader: mp.FrameReader) -> tuple[int, int, bytes, int]:
        while (frame := reader.next_frame()) is None:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                raise trio.BrokenResourceError("closed before a whole packet")
            reader.feed(data)
        return frame

    @staticmethod
    async def _send_quietly(stream: trio.SocketStream, packet: bytes) -> None:
        with trio.move_on_after(1):
            try:
                await stream.send_all(packet)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
