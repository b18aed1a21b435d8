"""The gateway's MQTT side, assembled: delivery, managed broker, client, edge, accounts.

Start order: plugins declare topics and ACL templates (`gatewayd_mqtt_topics`); the
delivery pool starts (it runs every plugin handler, whoever received the message); the
managed mosquitto starts on a private loopback port with every device account from the
registry; the gateway's own client connects to it and subscribes every plugin filter;
then the device-facing edge (:mod:`.edge`) starts listening on `mqtt.listen`.
With an external broker there is no mosquitto and no edge: the client gets everything.
Device credential changes rewrite mosquitto's password file and reload it (SIGHUP).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from playhouse.migrate import migrate

from ...protocol.topics import TopicRouter
from ..admission import waiting_elsewhere_for
from ..health import ComponentState, Health
from ..logs import get_logger
from ..metrics import Metrics, Sample
from ..storage import SchemaSpec, Storage, StorageError
from .broker import AclTemplate, BrokerAccount, ManagedBroker
from .client import MQTTClient, MQTTSettings, TLSSettings
from .delivery import Delivery, DeliveryPool, MessageHandler, RejectedMessage
from .edge import DeviceEdge, WriteAcl
from .marks import DeliveryMarks

if TYPE_CHECKING:
    from ..config import Config
    from ..devices.services import DeviceServices
    from ..tls import SiteTls

__all__ = ["MQTTService", "PluginMQTT", "MQTTUnavailable", "REJECTED_SCHEMA"]

log = get_logger("gatewayd.mqtt")

#: How long /health reports MQTT "degraded" after a handler raised an unexpected error.
HANDLER_ERROR_HOLD_S = 300.0


class MQTTUnavailable(Exception):
    """MQTT is off (`mqtt.broker = "off"`) or its broker could not be started."""


class PluginMQTT:
    """`ctx.mqtt`: publish as the gateway."""

    def __init__(self, service: MQTTService):
        self._service = service

    @property
    def connected(self) -> bool:
        return self._service.client is not None and self._service.client.connected

    @property
    def device_port(self) -> int | None:
        """The broker port devices connect to (`mqtt.listen`, `tls.mqtt_listen` when MQTT is TLS
        only, or the external port); None when off."""
        m = self._service.config.mqtt
        t = self._service.config.tls
        if m.broker == "managed" and t.mqtt_listen is not None and not t.mqtt_plain:
            return t.mqtt_listen.port
        return {"managed": m.listen.port, "external": m.port}.get(m.broker)

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        """Publish; for QoS 1 returns after the broker's PUBACK. Raises MQTTUnavailable when off."""
        await self._service.publish(topic, payload, qos=qos, retain=retain)


class MQTTService:
    """Owns the managed broker and the client for one Gateway."""

    def __init__(self, config: Config, storage: Storage, metrics: Metrics, health: Health, devices: DeviceServices,
                 tls: SiteTls | None = None):
        self.config = config
        self.tls = tls
        self.storage = storage
        self.devices = devices
        self.broker: ManagedBroker | None = None
        self.client: MQTTClient | None = None
        self.edge: DeviceEdge | None = None
        self.router: TopicRouter[MessageHandler] = TopicRouter()
        self.marks = DeliveryMarks(storage)
        self.delivery = Delivery(self.router, storage, marks=self.marks)
        self.pool = DeliveryPool(self.delivery, size=256)
        self._acls: list[AclTemplate] = []
        self._families: set[str] = set()
        self._accounts_lock = trio.Lock()
        health.probe("mqtt", self._client_state)
        if config.mqtt.broker == "managed":
            health.probe("mqtt_broker", self._broker_state)
        self._register_metrics(metrics)

    def facade(self) -> PluginMQTT:
        return PluginMQTT(self)

    def reason(self) -> str:
        if self.config.mqtt.broker == "off":
            return 'mqtt.broker = "off"'
        if self.broker is not None and self.broker.state == "unavailable":
            return self.broker.last_error or "broker unavailable"
        return "not started"

    def add(self, plugin: str, subscriptions: Iterable[tuple[str, MessageHandler, int]],
            acls: Iterable[AclTemplate]) -> None:
        """A plugin's topic filters (filter, handler, qos) and its devices' ACL patterns."""
        acls = list(acls)
        for topic_filter, handler, qos in subscriptions:
            self.router.add(topic_filter, handler, qos=qos, owner=plugin)
        self._acls += acls
        if acls:
            self._families.add(plugin)

    async def start(self, nursery: trio.Nursery) -> None:
        """Start delivery, the broker and client, and the edge; returns once each is ready
        (the client may still be retrying an unreachable external broker)."""
        m = self.config.mqtt
        if m.broker == "off":
            log.info("MQTT is off (mqtt.broker = \"off\")")
            return
        await trio.to_thread.run_sync(self.storage.install, REJECTED_SCHEMA)
        await trio.to_thread.run_sync(self.marks.install)
        await nursery.start(self.marks.run)
        await nursery.start(self.pool.run)
        templates = list(self._acls)
        if m.broker == "managed":
            directory = self.config.data_dir / "mosquitto"
            self.broker = ManagedBroker(
                directory,
                # Private: devices reach it through the edge only.
                host="127.0.0.1",
                port=m.broker_port,
                socket=None if m.broker_port else _socket_path(directory),
                acl_templates=templates,
                accounts=await self._accounts(),
                mosquitto=m.mosquitto,
                max_packet_size=m.max_packet_bytes,
            )
            await nursery.start(self.broker.run)
            if self.broker.state == "unavailable":
                return  # logged by the broker with the install command; HTTP etc. run on
        self.client = MQTTClient(self._settings(), self.pool)
        await nursery.start(self.client.run)
        if self.broker is not None:
            t = self.config.tls
            secure = self.tls is not None and t.mqtt_listen is not None
            self.edge = DeviceEdge(m.listen if t.mqtt_plain else None, self.broker.address, self.pool,
                                   WriteAcl(templates), max_packet=m.max_packet_bytes,
                                   stall_timeout=m.stall_timeout_s,
                                   tls_listen=t.mqtt_listen if secure else None,
                                   ssl_context=self.tls.server_context() if secure and self.tls else None)
            await nursery.start(self.edge.run)  # an OSError here: the runtime names mqtt.listen

    async def stop_accepting(self, grace: float) -> None:
        """Shutdown step: devices first (what is in flight is acknowledged), then the client."""
        if self.edge is not None:
            await self.edge.stop(grace)
        if self.client is not None:
            await self.client.stop(grace)
        try:  # the final marks of what was just acknowledged: a restart knows it is done
            await self.marks.flush()
        except StorageError as exc:
            log.warning("could not write final delivery marks at the stop", error=str(exc))

    def _settings(self) -> MQTTSettings:
        m = self.config.mqtt
        client_id = m.client_id or f"gatewayd-{self.config.gateway.id}"
        status = f"gatewayd/{self.config.gateway.id}/status"
        if m.broker == "managed":
            username, password = self.broker.gateway_credentials()
            # MQTT 3.1.1 on our own broker: paho decodes MQTT 5 properties on every message,
            # about half the inbound rate (bench/mqtt_bench.py); and 3.1.1's silent drop of
            # a publish the ACL refuses can't bite here, the gateway's account may do anything.
            # (mosquitto replaces the client id by the username: use_username_as_clientid.)
            return MQTTSettings(host=self.broker.host, port=self.broker.port or 1883, unix_socket=self.broker.socket,
                                client_id=client_id, username=username,
                                password=password, keepalive=m.keepalive_s, status_topic=status,
                                protocol="3.1.1")
        from ..schema import read_secret

        tls = TLSSettings(ca_file=m.tls_ca or None, cert_file=m.tls_cert or None, key_file=m.tls_key or None) \
            if (m.tls_ca or m.tls_cert) else None
        return MQTTSettings(host=m.host, port=m.port, client_id=client_id, username=m.username or None,
                            password=read_secret(m.password_env), tls=tls, keepalive=m.keepalive_s,
                            status_topic=status)

    async def _accounts(self) -> list[BrokerAccount]:
        accounts: dict[str, BrokerAccount] = {}
        for family in sorted(self._families):
            for username, password_hash in await self.devices.registry.mqtt_accounts(family):
                try:
                    accounts[username] = BrokerAccount(username, password_hash)
                except ValueError as e:  # a device id mosquitto can't take as a username
                    log.warning("device has no MQTT account", family=family, device=username, reason=str(e))
        return list(accounts.values())

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        """Publish as the gateway; for QoS 1 return after PUBACK. MQTTUnavailable when off."""
        if self.client is None:
            raise MQTTUnavailable(f"MQTT is unavailable ({self.reason()})")
        await self.client.publish(topic, payload, qos=qos, retain=retain)

    async def credentials_changed(self, family: str) -> None:
        """The registry's MQTT accounts of `family` changed: the managed broker follows."""
        if self.broker is None or family not in self._families:
            return
        # One at a time: two concurrent changes could otherwise write in the wrong
        # order, the older account list last. Waited for without a place: provisioning
        # handlers call this, and the holder reads the registry under the lock.
        async with waiting_elsewhere_for(self._accounts_lock):
            accounts = await self._accounts()
            await trio.to_thread.run_sync(self.broker.set_accounts, accounts)
        log.info("broker accounts updated", family=family, accounts=len(accounts))

    # -- health and metrics ------------------------------------------------------

    def _client_state(self) -> ComponentState:
        if self.config.mqtt.broker == "off":
            return ComponentState("off")
        if self.client is None:
            return ComponentState("unavailable", self.reason())
        d = self.delivery.stats
        details = {"received": d.handled + d.rejected + d.duplicates + d.unrouted, "rejected": d.rejected,
                   "handler_errors": d.handler_errors}
        if self.edge is not None:
            details["devices_connected"] = self.edge.stats.connections
        if not self.client.connected:
            return ComponentState("disconnected", self.client.stats.last_error, details)
        # A handler that fails is a bug or a hostile payload: the message was rejected and
        # acknowledged, so ingest goes on; an operator should still hear of it for a while.
        if d.last_handler_error_at is not None and trio.current_time() - d.last_handler_error_at < HANDLER_ERROR_HOLD_S:
            return ComponentState("degraded", d.last_handler_error, details)
        return ComponentState("ok", None, details)

    def _broker_state(self) -> ComponentState:
        if self.broker is None:
            return ComponentState("starting")
        state = "ok" if self.broker.state == "running" else self.broker.state
        return ComponentState(state, self.broker.last_error if state != "ok" else None,
                              {"listen": str(self.config.mqtt.listen), "restarts": self.broker.restarts})

    def _register_metrics(self, metrics: Metrics) -> None:
        d = self.delivery.stats
        outcomes = ("handled", "rejected", "duplicates", "unrouted")

        def stats() -> Any:
            return self.client.stats if self.client is not None else None

        def edge() -> Any:
            return self.edge.stats if self.edge is not None else None

        metrics.collector("gatewayd_mqtt_messages_total", "counter", "Inbound MQTT messages by verdict", lambda: [
            Sample("gatewayd_mqtt_messages_total", {"outcome": o}, getattr(d, o)) for o in outcomes])
        metrics.collector("gatewayd_mqtt_handler_errors_total", "counter",
                          "Messages rejected because a handler raised an unexpected exception", lambda: [
                              Sample("gatewayd_mqtt_handler_errors_total", {}, d.handler_errors)])
        metrics.collector("gatewayd_mqtt_statement_errors_total", "counter",
                          "Messages rejected because a handler's own SQL was refused (no such column, a constraint)",
                          lambda: [Sample("gatewayd_mqtt_statement_errors_total", {}, d.statement_errors)])
        metrics.collector("gatewayd_mqtt_storage_waits_total", "counter",
                          "Deliveries that found storage unable to take a write and waited", lambda: [
                              Sample("gatewayd_mqtt_storage_waits_total", {}, d.storage_waits)])
        metrics.collector("gatewayd_mqtt_in_flight", "gauge", "MQTT messages being delivered", lambda: [
            Sample("gatewayd_mqtt_in_flight", {}, self.pool.in_flight)])
        metrics.collector("gatewayd_mqtt_publishes_total", "counter", "MQTT publishes by the gateway", lambda: [
            Sample("gatewayd_mqtt_publishes_total", {"result": "ok"}, stats().publishes),
            Sample("gatewayd_mqtt_publishes_total", {"result": "error"}, stats().publish_errors),
        ] if stats() else [])
        metrics.collector("gatewayd_mqtt_reconnects_total", "counter", "MQTT reconnections", lambda: [
            Sample("gatewayd_mqtt_reconnects_total", {}, stats().reconnects)] if stats() else [])
        metrics.collector("gatewayd_mqtt_connected", "gauge", "1 when connected to the broker", lambda: [
            Sample("gatewayd_mqtt_connected", {}, 1.0 if self.client is not None and self.client.connected else 0.0)])
        metrics.collector("gatewayd_mqtt_broker_restarts_total", "counter", "Managed mosquitto restarts", lambda: [
            Sample("gatewayd_mqtt_broker_restarts_total", {}, self.broker.restarts)] if self.broker else [])
        metrics.collector("gatewayd_mqtt_edge_connections", "gauge", "Logged-in device connections open at the edge",
                          lambda: [Sample("gatewayd_mqtt_edge_connections", {}, edge().connections)] if edge() else [])
        metrics.collector("gatewayd_mqtt_edge_pending_connections", "gauge",
                          "Connections at the edge that have not logged in (yet)",
                          lambda: [Sample("gatewayd_mqtt_edge_pending_connections", {}, edge().pending)]
                          if edge() else [])
        metrics.collector("gatewayd_mqtt_edge_logins_total", "counter", "Device logins at the edge by result", lambda: [
            Sample("gatewayd_mqtt_edge_logins_total", {"result": "accepted"}, edge().accepted),
            Sample("gatewayd_mqtt_edge_logins_total", {"result": "refused"}, edge().refused),
            Sample("gatewayd_mqtt_edge_logins_total", {"result": "broker_unavailable"}, edge().broker_unavailable),
        ] if edge() else [])
        metrics.collector("gatewayd_mqtt_edge_packets_total", "counter",
                          "Device packets: delivered by the gateway, or relayed to mosquitto", lambda: [
                              Sample("gatewayd_mqtt_edge_packets_total", {"path": "delivered"}, edge().intercepted),
                              Sample("gatewayd_mqtt_edge_packets_total", {"path": "relayed"}, edge().relayed),
                          ] if edge() else [])
        metrics.collector("gatewayd_mqtt_edge_protocol_errors_total", "counter",
                          "Device connections closed for a malformed or illegal packet", lambda: [
                              Sample("gatewayd_mqtt_edge_protocol_errors_total", {}, edge().protocol_errors)]
                          if edge() else [])
        metrics.collector("gatewayd_mqtt_edge_acks_total", "counter",
                          "Acknowledgements the edge sent (refused: MQTT 5 refusals), or could not (stale: "
                          "the device had gone, it sends the message again)", lambda: [
                              Sample("gatewayd_mqtt_edge_acks_total", {"result": "sent"}, edge().acked - edge().refused_acks),
                              Sample("gatewayd_mqtt_edge_acks_total", {"result": "refused"}, edge().refused_acks),
                              Sample("gatewayd_mqtt_edge_acks_total", {"result": "stale"}, edge().stale_acks),
                          ] if edge() else [])


def _socket_path(directory: Path) -> str:
    """The private mosquitto's socket: in its (0700) directory, or, when that path is too
    long for a unix socket (107 bytes) or holds a space (mosquitto.conf's ``listener``
    line is read word by word: the path would be cut there), in a fresh 0700 directory
    under the system's temp."""
    path = str(directory.resolve() / "mosquitto.sock")
    if len(os.fsencode(path)) <= 107 and not any(c.isspace() for c in path):
        return path
    return str(Path(tempfile.mkdtemp(prefix="gatewayd-mqtt-")) / "mosquitto.sock")


# Version 2: the sender and the whole payload's size (the payload kept is cut to 4 KiB).
REJECTED_SCHEMA = SchemaSpec("core_mqtt", [RejectedMessage], version=2, migrations={
    2: lambda migrator, db: migrate(
        migrator.add_column("core_mqtt_rejected", "sender", RejectedMessage.sender),
        migrator.add_column("core_mqtt_rejected", "size", RejectedMessage.size),
    ),
})
