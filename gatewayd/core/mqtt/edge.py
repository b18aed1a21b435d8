"""The device-facing MQTT listener: the gateway acknowledges what it stores, itself.

With ``mqtt.broker = "managed"`` devices connect here (``mqtt.listen``), not to
mosquitto, which listens on a private socket. A broker acknowledges a QoS 1 PUBLISH as
soon as it has it in memory; if it then crashes, or the box loses power, before the
gateway stored the message, the device was told "received" about a message that is
gone. So for the PUBLISHes the gateway consumes itself, the acknowledgement comes from
here, after the commit.

Each device connection is relayed to mosquitto packet by packet, in both directions
(:mod:`.session`): authentication, sessions, subscriptions, commands down to devices,
retained messages and last wills stay mosquitto's. The edge reads the packets a device
sends and takes out the PUBLISHes whose topic a plugin subscribed to and that the
device's ACL lets it write (the same patterns mosquitto enforces): those are delivered
here (the shared :class:`~gatewayd.core.mqtt.delivery.DeliveryPool`) and answered here,
PUBACK (QoS 1) or PUBREC (QoS 2) once their verdict is in; mosquitto never sees them.
Everything else goes on to mosquitto unchanged.

Consequences, by design:

- What the gateway consumes is not re-published on the broker: a LAN app subscribed to
  a family's device topics does not see it (the gateway's API and live streams do), and
  it is not retained there. Handlers see it as a broker hands a live message to a
  subscriber: RETAIN cleared.
- A stalled gateway acknowledges nothing; devices back off with their own buffers.
- One device (one account, however many connections it opens) has at most
  ``per_device`` deliveries in flight: a flooding or reconnecting device fills its own
  window, not the site's. A device is not read further while its window is full, while
  it does not read what the gateway sends it, or while mosquitto does not read what is
  relayed to it (backpressure, not memory).
- Client ids belong to accounts: mosquitto runs with ``use_username_as_clientid``, so a
  device cannot take the gateway's session or another device's by its client id; and the
  edge refuses logins as the gateway's own account (it connects to mosquitto directly).
- Connections that have not logged in are few and cheap: at most ``max_pending`` at
  once (``pending_per_address`` per address, per /64 for IPv6; past that the oldest of
  the address that holds the most is closed), a CONNECT of at most 64 KiB, within
  ``connect_timeout``.
- A gateway restart closes every device connection: the gateway is what acknowledges.
  On a graceful stop, deliveries in flight finish and are acknowledged first, and the
  relay ends with a DISCONNECT, so devices' last wills do not fire; after a crash they do.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Sequence

import trio

from ...protocol.topics import TopicRouter, matches
from ..logs import QuietLog
from ..schema import Address
from .broker import AclTemplate
from .delivery import DeliveryPool, GroupHandler

__all__ = ["DeviceEdge", "EdgeStats", "WriteAcl", "socket_of"]

log = logging.getLogger("gatewayd.mqtt.edge")


def socket_of(stream: Any) -> Any:
    """The TCP socket under a device's stream (plain, or TLS on ``tls.mqtt_listen``)."""
    return stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else stream.socket


def peer_group(address: str) -> str:
    """What the limits on connections not logged in count per: the IPv4 address, or the
    /64 of an IPv6 one (one host has a whole /64 to connect from)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


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
    """Counters for /metrics and /health."""

    connections: int = 0  # logged-in device connections open now
    pending: int = 0  # connections that have not logged in (yet)
    accepted: int = 0  # logins mosquitto accepted
    refused: int = 0  # refused: credentials, the gateway's account, no CONNECT in time, over a limit
    broker_unavailable: int = 0  # logins mosquitto could not take: unreachable, or no answer in time
    protocol_errors: int = 0
    intercepted: int = 0  # PUBLISHes delivered here
    relayed: int = 0  # packets relayed from devices to mosquitto
    acked: int = 0
    refused_acks: int = 0  # MQTT 5 acks carrying a refusal reason (rejected messages)
    stale_acks: int = 0  # decided after the device had gone: it sends the message again

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Window:
    """One device's deliveries in flight, across all its connections."""

    __slots__ = ("size", "freed")

    def __init__(self) -> None:
        self.size = 0
        self.freed = trio.Event()

    def release(self, n: int = 1) -> None:
        self.size -= n
        self.freed.set()

    async def wait(self) -> None:
        if self.freed.is_set():
            self.freed = trio.Event()
        await self.freed.wait()


class DeviceEdge:
    """Accepts device connections on ``listen`` and relays them to mosquitto at ``broker``
    (``(host, port)``, or the path of its private socket)."""

    def __init__(
        self,
        listen: Address | None,
        broker: tuple[str, int] | str,
        pool: DeliveryPool,
        acl: WriteAcl,
        *,
        max_packet: int = 1 << 20,
        per_device: int = 32,
        connect_timeout: float = 5.0,
        stall_timeout: float = 60.0,
        max_pending: int = 256,
        pending_per_address: int = 32,
        logger: logging.Logger | None = None,
        tls_listen: Address | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.listen = listen
        self.tls_listen = tls_listen
        self.ssl_context = ssl_context
        self.broker = broker
        self.pool = pool
        self.router: TopicRouter[Any] = pool.delivery.router
        self.acl = acl
        self.max_packet = max_packet
        self.per_device = per_device
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout  # a device that reads nothing for this long is closed
        self.max_pending = max_pending
        self.pending_per_address = pending_per_address
        self.log = logger or log
        self.quiet = QuietLog(self.log)
        self.stats = EdgeStats()
        self.sessions: set[Any] = set()
        self._windows: dict[str, Window] = {}
        # Connections not logged in yet, oldest first (dicts as ordered sets).
        self._pending: dict[Any, None] = {}
        self._pending_by_address: dict[str, dict[Any, None]] = {}
        self._accepting: trio.CancelScope | None = None
        self._stopping = False
        self._closed = trio.Event()

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until :meth:`stop` (or cancelled); ``started`` with the bound addresses."""
        listeners: list[trio.abc.Listener[Any]] = []
        bound: list[str] = []
        if self.listen is not None:
            plain = await trio.open_tcp_listeners(self.listen.port, host=self.listen.host or None)
            listeners += plain
            bound += [f"{s.socket.getsockname()[0]}:{s.socket.getsockname()[1]}" for s in plain]
        if self.tls_listen is not None:
            assert self.ssl_context is not None, "a TLS listener needs an SSLContext"
            secure = await trio.open_tcp_listeners(self.tls_listen.port, host=self.tls_listen.host or None)
            # The handshake happens on the session's first read, within its CONNECT deadline.
            listeners += [trio.SSLListener(s, self.ssl_context, https_compatible=False) for s in secure]
            bound += [f"tls://{s.socket.getsockname()[0]}:{s.socket.getsockname()[1]}" for s in secure]
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accepting:
                self._accepting = accepting.cancel_scope
                # Sessions live in the outer nursery: they outlast the listeners on a stop.
                await accepting.start(partial(trio.serve_listeners, self._handle, listeners, handler_nursery=sessions))
                self.log.info("MQTT edge listening on %s (broker %s)", " ".join(bound), self.broker)
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

    async def _handle(self, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> None:
        from .session import Session  # the relay of one connection (imports this module)

        try:
            address = peer_group(str(socket_of(stream).getpeername()[0]))
        except OSError:
            address = "?"
        if self._stopping:
            await stream.aclose()
            return
        session = Session(self, stream, address)
        self.sessions.add(session)
        try:
            await session.run()
        except Exception:  # noqa: BLE001 - one session's fault must never end the edge
            self.quiet("session-crash", logging.ERROR, "MQTT edge: a session of %s failed", session.peer,
                       exc_info=True)
        finally:
            self.sessions.discard(session)

    # -- what sessions share -------------------------------------------------------------

    def enter_pending(self, session: Any) -> None:
        """A connection that has not logged in yet. Over ``pending_per_address`` from its
        address, the oldest of that address goes; over ``max_pending`` in all, the oldest
        of the address that holds the most (the newcomer's own when it ties): a device
        sends its CONNECT at once, so what has waited longest is most likely a socket held
        open to lock devices out (refusing the newest instead would lock them out), and
        sockets held from many addresses must not close a device's login in progress
        from an address of its own."""
        same = self._pending_by_address.setdefault(session.address, {})
        oldest = None
        if len(same) >= self.pending_per_address:
            oldest = next(iter(same))
        elif len(self._pending) >= self.max_pending:
            crowded = max(self._pending_by_address.values(), key=len)
            oldest = next(iter(same if same and len(same) + 1 >= len(crowded) else crowded))
        if oldest is not None:
            self.leave_pending(oldest)
            oldest.evict()
            self.stats.refused += 1
            self.quiet("pending", logging.WARNING, "MQTT edge: too many connections not logged in (%d, %d from "
                       "%s): closing the oldest", len(self._pending) + 1, len(same) + 1, session.address)
        self._pending[session] = None
        same[session] = None
        self.stats.pending = len(self._pending)

    def leave_pending(self, session: Any) -> None:
        if self._pending.pop(session, False) is False:
            return  # evicted already
        same = self._pending_by_address[session.address]
        del same[session]
        if not same:
            del self._pending_by_address[session.address]
        self.stats.pending = len(self._pending)

    def window(self, username: str) -> Window:
        """The device's window (one per account, shared by its connections)."""
        window = self._windows.get(username)
        if window is None:
            window = self._windows[username] = Window()
        return window

    def forget_window(self, username: str) -> None:
        """A connection of the device ended, or one of its deliveries did after that: its
        window goes once no connection of its is open and nothing of its is in flight."""
        window = self._windows.get(username)
        if window is not None and window.size == 0 and not any(
                s.username == username and s.alive for s in self.sessions):
            del self._windows[username]

    def intercepts(self, username: str, topic: str) -> bool:
        return self.route(username, topic) is not False

    def route(self, username: str, topic: str) -> bool | GroupHandler:
        """False: relay it to mosquitto; True: deliver it here; a GroupHandler: deliver it
        here with the other messages of the same read for that handler (it is the
        topic's only handler)."""
        # The ACL first: it is cheap, and the router remembers the topics it was asked about.
        if not self.acl.may_write(username, topic):
            return False
        handlers = self.router.handlers_for(topic)
        if len(handlers) == 1 and isinstance(handlers[0], GroupHandler):
            return handlers[0]
        return bool(handlers)
