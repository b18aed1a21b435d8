"""The gateway's MQTT client: paho-mqtt 2.x driven from trio, no thread, no second loop.

paho is used as a protocol engine over its non-blocking socket: one reader task waits
with ``trio.lowlevel.wait_readable`` and calls ``loop_read``, a writer task waits with
``wait_writable`` when paho has bytes left over, and ``loop_misc`` runs once a second for
keepalive. Only the TCP/TLS connect itself (DNS, handshake: blocking inside paho) runs in
a worker thread, bounded by ``connect_timeout``, while nothing else touches the client.

Delivery contract (the product's first rule, "nothing acknowledged before committed"):

- The client subscribes at QoS 1 with ``manual_ack=True``. An inbound message goes to
  the shared :class:`~gatewayd.core.mqtt.delivery.DeliveryPool` and is PUBACKed once its
  verdict is in: after its handlers' writes were committed, or after it was rejected and
  recorded (:mod:`.delivery` says which is which). Deliveries run concurrently (at
  most the pool's size, also the MQTT 5 Receive Maximum) so the storage layer's group
  commit can batch them; the reader stops reading while the pool is full.
- Only storage that cannot take a write holds a message back: the delivery retries it
  while it keeps its slot. Nothing is left unacknowledged on purpose, so nothing needs
  a reconnect to be redelivered.
- An ack is only ever sent on the connection its message arrived on (:mod:`.acks`).
- The session is persistent (stable client id; clean session off / MQTT 5 session
  expiry), so what is published while the gateway is down waits in the broker.
- Handlers run concurrently, so messages are not handled in arrival order (readings
  carry their own timestamps). Subscriptions are capped at QoS 1: with QoS 2 paho
  answers PUBREC before the handler runs, and the broker then counts it delivered.

With the managed broker, devices do not talk to mosquitto directly: they connect to the
gateway's edge (:mod:`.edge`), which handles the gateway's own topics itself. This
client then carries what mosquitto itself publishes (devices' last wills) and what local
clients publish; with an external broker it carries everything.

The delivery side lives in :mod:`gatewayd.core.mqtt.acks`. Private paho 2.x names
are used where paho's public API costs most of the throughput, each guarded (without
it, paho's own path runs): ``_sock_close`` (close without sending DISCONNECT),
``_packet_queue`` (several PUBACKs in one write), ``_sock_recv`` (replaced by a
buffered read: paho reads every packet in three ``recv`` calls) and
``_handle_publish`` (replaced for QoS 0/1: paho builds a message object with a
``threading.Condition`` per inbound message; 3.1.1 bodies are decoded here, checked
against paho's decoder in tests/test_mqtt_decode.py). Together they took durable
ingest from ~50 % to ~95 % of a bare paho consumer (bench/mqtt_bench.py). An
``MQTTClient`` runs once: make a new one to run again.

Startup (``run``): ``task_status.started()`` after the first CONNACK and SUBACKs, or
after the first attempt failed or ``first_connect_timeout`` passed. A gateway whose
broker is down must still start (HTTP, serial, the buffer); it keeps reconnecting with
exponential backoff and jitter, and ``connected`` / ``stats`` tell /health.
"""

from __future__ import annotations

import logging
import random
import ssl
from dataclasses import asdict, dataclass, field
from typing import Any, Hashable, Literal

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ...protocol.topics import Subscription, TopicRouter, validate_topic
from .acks import BrokerAcks
from .delivery import DeliveryPool, InboundMessage, MessageHandler, Rejected, RejectedMessage
from .fastpath import FastPublish, ReadBuffer

__all__ = [
    "InboundMessage",
    "MQTTClient",
    "MQTTSettings",
    "MQTTStats",
    "MessageHandler",
    "PublishError",
    "PublishTimeout",
    "Rejected",
    "RejectedMessage",
    "TLSSettings",
]

log = logging.getLogger("gatewayd.mqtt")


@dataclass(frozen=True)
class TLSSettings:
    """TLS to the broker. No ``ca_file``: the system's CAs. ``insecure``: no verification."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class MQTTSettings:
    """Everything the client needs; the runtime builds it from ``[mqtt]``."""

    host: str = "127.0.0.1"
    port: int = 1883
    unix_socket: str | None = None  # connect to this socket path instead of host:port
    client_id: str = "gatewayd"  # must be stable: it names the persistent session
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TLSSettings | None = None
    keepalive: int = 30
    clean_start: bool = False  # False: keep the session (and what queued in it)
    session_expiry: int = 7 * 24 * 3600  # MQTT 5 only; 3.1.1 sessions never expire
    # MQTT 5 by default for its PUBACK reason codes: with 3.1.1 a broker that refuses a
    # publish (ACL) acknowledges and drops it, and the caller believes it delivered.
    # For the gateway's own client on the managed broker (full access), "3.1.1" is the
    # fast choice: paho 2.x decodes MQTT 5 properties on every inbound PUBLISH, which
    # costs about half the ingest throughput here (bench/mqtt_bench.py --protocol).
    protocol: Literal["3.1.1", "5"] = "5"
    status_topic: str | None = "gatewayd/status"  # retained online/offline, last will
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    connect_timeout: float = 5.0
    first_connect_timeout: float = 5.0
    publish_timeout: float = 10.0
    max_in_flight: int = 256  # MQTT 5 Receive Maximum (the delivery pool's size)
    # (with 3.1.1 the broker's own limit applies: ManagedBroker sets mosquitto's to 256)

    @property
    def where(self) -> str:
        """The broker's address, for logs."""
        return self.unix_socket or f"{self.host}:{self.port}"


class PublishError(Exception):
    """A publish that did not complete: refused, or the connection was lost first."""


class PublishTimeout(PublishError):
    """No connection, or no PUBACK, within the publish timeout."""


@dataclass
class MQTTStats:
    """Counters for /metrics; ``last_error`` for /health."""

    received: int = 0
    acked: int = 0
    deferred: int = 0  # arrived while stopping: left unacknowledged for the next run
    stale_acks: int = 0  # decided after its connection was gone: the broker sends it again
    publishes: int = 0
    publish_errors: int = 0
    reconnects: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _PubWaiter:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None


_OK = MQTTErrorCode.MQTT_ERR_SUCCESS


class _NoPool:
    full = False


_NO_POOL = _NoPool()


class MQTTClient:
    """The gateway's one MQTT connection: subscribe through the router, publish with PUBACK.

    Messages are delivered by ``pool`` (run by whoever made it), whose router holds the
    handlers: plugins add theirs before ``run``; :meth:`subscribe` also works while
    connected. A client without a pool only publishes (the upstream MQTT sink).
    """

    def __init__(self, settings: MQTTSettings, pool: DeliveryPool | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.settings = settings
        self.log = logger or log
        self.pool = pool
        self.router: TopicRouter[MessageHandler] = pool.delivery.router if pool is not None else TopicRouter()
        self.stats = MQTTStats()
        self.connected = False
        self._client = self._make_client()
        self._acks = BrokerAcks(self._client, self.stats)
        self._acks.close()  # none before the first connection
        self._paused = False  # stopping: new arrivals stay unacknowledged
        self._run_scope: trio.CancelScope | None = None
        self._want_write = trio.Event()
        self._connected_event = trio.Event()
        self._ready = trio.Event()
        self._first_attempt = trio.Event()
        self._stopped = trio.Event()
        self._leaving = False
        self._ever_connected = False
        self._suback_pending: dict[int, list[str]] = {}
        self._pub_waiters: dict[int, _PubWaiter] = {}
        self._packets = 0  # packets paho handed to our callbacks: progress of loop_read
        self._rbuf: ReadBuffer | None = None
        if callable(getattr(self._client, "_sock_recv", None)):  # else: paho reads unbuffered
            self._rbuf = ReadBuffer(self._client._sock_recv)
            self._client._sock_recv = self._rbuf.recv  # type: ignore[method-assign]
        decode = getattr(getattr(paho, "_packet", None), "decode_publish", None)
        in_packet = getattr(self._client, "_in_packet", None)
        if (decode is not None and callable(getattr(self._client, "_handle_publish", None))
                and isinstance(in_packet, dict) and {"command", "packet"} <= in_packet.keys()
                and isinstance(getattr(self._client, "_protocol", None), int)):
            self._client._handle_publish = FastPublish(  # type: ignore[method-assign]
                self._client, decode, self._client._handle_publish, self._on_message)

    @property
    def ready(self) -> bool:
        """Connected and every subscription acknowledged by the broker (SUBACK)."""
        return self.connected and self._ready.is_set()

    @property
    def in_flight(self) -> int:
        """Inbound messages being delivered (by this client and the edge: the pool is shared)."""
        return self.pool.in_flight if self.pool is not None else 0

    # --- setup ----------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        s = self.settings
        v5 = s.protocol == "5"
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            clean_session=None if v5 else s.clean_start,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            reconnect_on_failure=False,  # else paho may reconnect, blocking, inside a read
            manual_ack=True,
            transport="unix" if s.unix_socket else "tcp",
        )
        if s.username:
            c.username_pw_set(s.username, s.password)
        if s.tls is not None:
            ctx = ssl.create_default_context(cafile=s.tls.ca_file)
            if s.tls.cert_file:
                ctx.load_cert_chain(s.tls.cert_file, s.tls.key_file)
            if s.tls.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            c.tls_set_context(ctx)
            c.tls_insecure_set(s.tls.insecure)
        c.connect_timeout = s.connect_timeout
        c.max_inflight_messages_set(100)
        if s.status_topic:
            validate_topic(s.status_topic)
            c.will_set(s.status_topic, "offline", qos=1, retain=True)
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry
            props.ReceiveMaximum = s.max_in_flight
        # (paho takes a unix socket's path for the host, and wants a port all the same)
        c.connect_async(s.unix_socket or s.host, s.port, s.keepalive, clean_start=s.clean_start, properties=props)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_socket_close = self._on_socket_close
        return c

    # --- public API -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, subscribe, dispatch and reconnect until cancelled or :meth:`stop`."""
        try:
            async with trio.open_nursery() as nursery:
                self._run_scope = nursery.cancel_scope
                nursery.start_soon(self._connection_loop)
                with trio.move_on_after(self.settings.first_connect_timeout):
                    await self._first_attempt.wait()
                if not self.connected:
                    self.log.warning(
                        "MQTT broker %s not reachable yet (%s); starting anyway and retrying",
                        self.settings.where, self.stats.last_error,
                    )
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(2):
                    await self._goodbye()
                self._drop_socket()
                self._connection_ended("client stopped")
                self._stopped.set()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking messages, let running deliveries finish (up to ``grace``), disconnect."""
        self._paused = True
        if self.pool is not None:
            with trio.move_on_after(grace):
                await self.pool.drain()
        if self._run_scope is not None:
            self._run_scope.cancel()
            await self._stopped.wait()

    def subscribe(
        self, topic_filter: str, handler: MessageHandler, *, qos: int = 1, owner: Hashable = None
    ) -> Subscription[MessageHandler]:
        """Route ``topic_filter`` to ``handler``; subscribes now if connected, else at connect."""
        sub = self.router.add(topic_filter, handler, qos=qos, owner=owner)
        if self.connected:
            self._send_subscribe({topic_filter: self.router.filters()[topic_filter]})
        return sub

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        *,
        timeout: float | None = None,
        properties: Properties | None = None,
    ) -> None:
        """Publish; with QoS 1, return only once the broker's PUBACK arrived.

        Waits for a connection first. Raises :class:`PublishTimeout` if there is no
        connection or no PUBACK within ``timeout`` (default ``publish_timeout``), and
        :class:`PublishError` if the broker refuses it or the connection drops first
        (paho may still resend it on the next connection: QoS 1 is at-least-once).
        ``properties``: MQTT 5 PUBLISH properties (user properties: the upstream MQTT
        sink's headers); ValueError on a 3.1.1 connection, which would drop them.
        """
        validate_topic(topic)
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if properties is not None and self.settings.protocol != "5":
            raise ValueError("MQTT 5 properties on an MQTT 3.1.1 connection would be dropped; set protocol 5")
        limit = self.settings.publish_timeout if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                while not self.connected:
                    await self._connected_event.wait()
                info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
                self._kick_writer()
                if info.rc != _OK:
                    raise PublishError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
                if qos == 1:
                    waiter = _PubWaiter()
                    self._pub_waiters[info.mid] = waiter
                    try:
                        await waiter.done.wait()
                    finally:
                        self._pub_waiters.pop(info.mid, None)
                    if waiter.error:
                        raise PublishError(f"publish to {topic!r}: {waiter.error}")
        except trio.TooSlowError:
            self.stats.publish_errors += 1
            raise PublishTimeout(f"publish to {topic!r}: no PUBACK within {limit:g} s") from None
        except PublishError:
            self.stats.publish_errors += 1
            raise
        self.stats.publishes += 1

    # --- connection lifecycle -------------------------------------------------------------

    async def _connection_loop(self) -> None:
        delay = self.settings.reconnect_min
        while True:
            outcome = await self._connect_and_serve()
            self._first_attempt.set()
            if outcome == "lost":
                delay = self.settings.reconnect_min
            pause = delay * random.uniform(0.75, 1.25)
            self.log.info("MQTT reconnecting in %.1f s", pause)
            await trio.sleep(pause)
            delay = min(delay * 2, self.settings.reconnect_max)

    async def _connect_and_serve(self) -> str:
        s = self.settings
        self._ready = trio.Event()
        try:
            # paho's connect (getaddrinfo, TCP, TLS handshake) blocks; nothing else uses
            # the client meanwhile: publish waits for `connected`, acks check generation.
            with trio.fail_after(s.connect_timeout + 1):
                await trio.to_thread.run_sync(self._client.reconnect, abandon_on_cancel=True)
        except trio.TooSlowError:
            self._note_error(f"connect to {s.where} timed out")
            return "failed"
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS
            self._note_error(f"connect to {s.where} failed: {exc}")
            return "failed"
        sock = self._client.socket()
        if sock is None:
            self._note_error("connect failed: no socket")
            return "failed"
        if self._rbuf is not None:
            self._rbuf.clear()
        self._acks = BrokerAcks(self._client, self.stats)  # acks of this connection only
        outcome = ["failed"]
        async with trio.open_nursery() as conn:
            conn.start_soon(self._reader, sock, conn.cancel_scope)
            conn.start_soon(self._writer, sock, conn.cancel_scope)
            conn.start_soon(self._keepalive, sock, conn.cancel_scope)
            conn.start_soon(self._watch_ready, conn.cancel_scope, outcome)
            conn.start_soon(self._ack_sender, self._acks)
        self._drop_socket()
        self._connection_ended("connection closed")
        return outcome[0]

    async def _reader(self, sock: Any, scope: trio.CancelScope) -> None:
        tls = isinstance(sock, ssl.SSLSocket)
        rbuf = self._rbuf
        pool = self.pool or _NO_POOL
        try:
            while True:
                while pool.full:
                    await pool.wait_slot()  # backpressure: stop reading, let deliveries catch up
                # Bytes already read (ours, or TLS's decrypted ones) would not wake us.
                if rbuf is not None and rbuf.pending:
                    await trio.lowlevel.checkpoint()
                elif not (tls and sock.pending()):
                    await trio.lowlevel.wait_readable(sock)
                # loop_read handles one packet; a trip through the scheduler per packet
                # would cap throughput, so drain what is there while packets keep coming.
                for _ in range(64):
                    before = self._packets
                    rc = self._client.loop_read()
                    if rc != _OK or self._packets == before or pool.full:
                        break
                self._kick_writer()
                if rc != _OK or self._client.socket() is not sock:
                    if rc not in (_OK, MQTTErrorCode.MQTT_ERR_CONN_LOST, MQTTErrorCode.MQTT_ERR_CONN_REFUSED):
                        self._note_error(f"connection ended: {paho.error_string(rc)}")
                    break
        except (trio.ClosedResourceError, OSError, ValueError):
            pass  # paho closed the socket (keepalive timeout, write error)
        scope.cancel()

    async def _writer(self, sock: Any, scope: trio.CancelScope) -> None:
        try:
            while True:
                if not self._client.want_write():
                    await self._want_write.wait()
                    self._want_write = trio.Event()
                while self._client.want_write():
                    await trio.lowlevel.wait_writable(sock)
                    if self._client.loop_write() != _OK or self._client.socket() is not sock:
                        scope.cancel()
                        return
        except (trio.ClosedResourceError, OSError, ValueError):
            scope.cancel()

    async def _keepalive(self, sock: Any, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(1)
            rc = self._client.loop_misc()
            self._kick_writer()
            if rc != _OK or self._client.socket() is not sock:
                self._note_error("keepalive: no answer from the broker")
                scope.cancel()
                return

    async def _watch_ready(self, scope: trio.CancelScope, outcome: list[str]) -> None:
        with trio.move_on_after(self.settings.connect_timeout):
            await self._ready.wait()
            outcome[0] = "lost"
            self._first_attempt.set()
            return
        self._note_error(f"no CONNACK/SUBACK within {self.settings.connect_timeout:g} s")
        scope.cancel()

    async def _goodbye(self) -> None:
        # A clean DISCONNECT suppresses the last will, so say "offline" ourselves.
        sock = self._client.socket()
        if not self.connected or sock is None:
            return
        self._acks.send()
        if self.settings.status_topic:
            self._client.publish(self.settings.status_topic, "offline", qos=1, retain=True)
        self._leaving = True
        self._client.disconnect()
        while self._client.want_write() and self._client.socket() is sock:
            await trio.lowlevel.wait_writable(sock)
            self._client.loop_write()

    def _drop_socket(self) -> None:
        # paho has no public "close without DISCONNECT"; _sock_close also runs our
        # on_socket_close, which tells trio before the fd goes away.
        sock = self._client.socket()
        if sock is None:
            return
        close = getattr(self._client, "_sock_close", None)
        if close is not None:
            close()
        else:  # a paho without it: close it ourselves; paho sees the error on next use
            self._on_socket_close(self._client, None, sock)
            sock.close()

    def _connection_ended(self, why: str) -> None:
        if self.connected:
            # Our own DISCONNECT (shutdown) is news, not a problem.
            level = logging.INFO if self._leaving else logging.WARNING
            self.log.log(level, "MQTT disconnected from %s: %s", self.settings.where, why)
        self._leaving = False
        self.connected = False
        if self._connected_event.is_set():
            self._connected_event = trio.Event()
        for waiter in self._pub_waiters.values():
            waiter.error = f"connection lost before PUBACK ({why})"
            waiter.done.set()
        self._pub_waiters.clear()
        self._suback_pending.clear()
        self._acks.close()

    # --- paho callbacks (all on the trio thread, inside loop_read/loop_write) -------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._note_error(f"broker refused the connection: {reason}")
            return
        if self._ever_connected:
            self.stats.reconnects += 1
        self._ever_connected = True
        self.connected = True
        self._connected_event.set()
        self.log.info(
            "MQTT connected to %s as %r (session present: %s)",
            self.settings.where, self.settings.client_id, flags.session_present,
        )
        if self.settings.status_topic:
            client.publish(self.settings.status_topic, "online", qos=1, retain=True)
        # Always resubscribe: the broker may have lost the session (crash, expiry).
        filters = self.router.filters()
        if filters:
            self._send_subscribe(filters)
        else:
            self._ready.set()

    def _send_subscribe(self, filters: dict[str, int]) -> None:
        # QoS 2 is capped to 1: with QoS 2 paho answers PUBREC before the handler runs,
        # and the broker then considers the message delivered, commit or not.
        rc, mid = self._client.subscribe([(f, min(q, 1)) for f, q in filters.items()])
        if rc == _OK and mid is not None:
            self._suback_pending[mid] = list(filters)
        self._kick_writer()

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list[Any], props: Any) -> None:
        self._packets += 1
        filters = self._suback_pending.pop(mid, [])
        for f, reason in zip(filters, reasons):
            if reason.is_failure:
                self._note_error(f"broker refused subscription {f!r}: {reason}")
        if not self._suback_pending:
            self._ready.set()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._packets += 1
        waiter = self._pub_waiters.get(mid)
        if waiter is not None:
            if reason.is_failure:
                waiter.error = f"broker refused it: {reason}"
            waiter.done.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connection_ended(str(reason))

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        try:
            trio.lowlevel.notify_closing(sock)  # wake our waiters before the fd is reused
        except RuntimeError:
            pass  # called from the connect thread: nobody is waiting on that socket

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._packets += 1
        self.stats.received += 1
        if self.pool is None:  # a publishing client subscribed nothing: nothing to deliver
            self._acks.reply(msg.mid if msg.qos else None, "unrouted")
            return
        if self._paused or not self.pool.running:
            self.stats.deferred += 1  # not acked: the broker gives it back to the next run
            return
        packet_id = msg.mid if msg.qos else None
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # mosquitto checks UTF-8; another broker may not
            topic = msg._topic.decode("utf-8", "replace")
        message = InboundMessage(topic, msg.payload, msg.qos, bool(msg.retain), bool(msg.dup))
        self.pool.submit(message, "broker", packet_id, self._acks.reply)

    async def _ack_sender(self, acks: BrokerAcks) -> None:
        while True:
            await acks.due()
            acks.send()
            self._kick_writer()

    # --- small helpers --------------------------------------------------------------------

    def _kick_writer(self) -> None:
        if self._client.want_write():
            self._want_write.set()

    def _note_error(self, text: str, *, log_it: bool = True) -> None:
        self.stats.last_error = text
        if log_it:
            self.log.warning("MQTT: %s", text)
