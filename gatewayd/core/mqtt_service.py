"""The gateway's MQTT side, assembled: managed broker, client, plugin topics, accounts.

Start order: plugins declare topics and ACL templates (`gatewayd_mqtt_topics`), then
the managed mosquitto starts with every device account from the registry, then the
client connects with the gateway's own account and subscribes every plugin's filters.
Device credential changes rewrite mosquitto's password file and reload it (SIGHUP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .broker import AclTemplate, BrokerAccount, ManagedBroker
from .health import ComponentState, Health
from .logs import get_logger
from .metrics import Metrics, Sample
from .mqtt import InboundMessage, MessageHandler, MQTTClient, MQTTSettings, Rejected, RejectedMessage, TLSSettings
from .storage import SchemaSpec, Storage

if TYPE_CHECKING:
    from .config import Config
    from .device_services import DeviceServices

__all__ = ["MQTTService", "TopicRegistry", "PluginMQTT", "MQTTUnavailable", "InboundMessage", "Rejected"]

log = get_logger("gatewayd.mqtt")


class MQTTUnavailable(Exception):
    """MQTT is off (`mqtt.broker = "off"`) or its broker could not be started."""


@dataclass
class _Sub:
    filter: str
    handler: MessageHandler
    qos: int


@dataclass
class TopicRegistry:
    """Collects a plugin's MQTT subscriptions and the ACL templates its devices get."""

    plugin: str
    subscriptions: list[_Sub] = field(default_factory=list)
    acls: list[AclTemplate] = field(default_factory=list)

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Route messages matching `topic_filter` (`+`, `#` wildcards) to `await handler(msg)`.

        The message is acknowledged (PUBACK) when the handler returns; raise
        `Rejected(reason)` for bad input (acked, counted, kept in core_mqtt_rejected);
        any other exception leaves it unacknowledged so the broker delivers it again.
        """
        from .topics import validate_filter

        validate_filter(topic_filter)
        if qos not in (0, 1):
            raise ValueError(f"{topic_filter}: qos must be 0 or 1")
        self.subscriptions.append(_Sub(topic_filter, handler, qos))

    def acl(self, pattern: str, access: str) -> None:
        """A mosquitto ACL pattern for this family's device accounts (`%u` = username)."""
        self.acls.append(AclTemplate(pattern, access))  # type: ignore[arg-type]


class PluginMQTT:
    """`ctx.mqtt`: publish as the gateway."""

    def __init__(self, service: MQTTService):
        self._service = service

    @property
    def connected(self) -> bool:
        return self._service.client is not None and self._service.client.connected

    @property
    def device_port(self) -> int | None:
        """The broker port devices connect to (`mqtt.listen` or the external port); None when off."""
        m = self._service.config.mqtt
        return {"managed": m.listen.port, "external": m.port}.get(m.broker)

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        """Publish; for QoS 1 returns after the broker's PUBACK. Raises MQTTUnavailable when off."""
        client = self._service.client
        if client is None:
            raise MQTTUnavailable(f"MQTT is unavailable ({self._service.reason()})")
        await client.publish(topic, payload, qos=qos, retain=retain)


class MQTTService:
    """Owns the managed broker and the client for one Gateway."""

    def __init__(self, config: Config, storage: Storage, metrics: Metrics, health: Health, devices: DeviceServices):
        self.config = config
        self.storage = storage
        self.devices = devices
        self.broker: ManagedBroker | None = None
        self.client: MQTTClient | None = None
        self.registries: list[TopicRegistry] = []
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

    def add(self, registry: TopicRegistry) -> None:
        self.registries.append(registry)
        if registry.acls:
            self._families.add(registry.plugin)

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the broker (managed) and the client; returns once both are ready or retrying."""
        mode = self.config.mqtt.broker
        if mode == "off":
            log.info("MQTT is off (mqtt.broker = \"off\")")
            return
        await trio.to_thread.run_sync(self.storage.install, SchemaSpec("core_mqtt", [RejectedMessage]))
        if mode == "managed":
            listen = self.config.mqtt.listen
            self.broker = ManagedBroker(
                self.config.data_dir / "mosquitto",
                host=listen.host,
                port=listen.port,
                acl_templates=[t for r in self.registries for t in r.acls],
                accounts=await self._accounts(),
                mosquitto=self.config.mqtt.mosquitto,
            )
            await nursery.start(self.broker.run)
            if self.broker.state == "unavailable":
                return  # logged by the broker with the install command; HTTP etc. run on
            self.devices.registry.on_credentials_changed = self._credentials_changed
        self.client = MQTTClient(self._settings(), record_rejected=self._record_rejected)
        for registry in self.registries:
            for sub in registry.subscriptions:
                self.client.subscribe(sub.filter, sub.handler, qos=sub.qos, owner=registry.plugin)
        self.devices.commands.publish = lambda topic, payload: self.client.publish(topic, payload, qos=1)
        await nursery.start(self.client.run)

    async def stop_accepting(self, grace: float) -> None:
        """Shutdown step: stop taking messages and let running handlers finish."""
        if self.client is not None:
            await self.client.stop(grace)

    def _settings(self) -> MQTTSettings:
        m = self.config.mqtt
        client_id = m.client_id or f"gatewayd-{self.config.gateway.id}"
        status = f"gatewayd/{self.config.gateway.id}/status"
        if m.broker == "managed":
            username, password = self.broker.gateway_credentials()
            host = "127.0.0.1" if m.listen.host in ("0.0.0.0", "::", "") else m.listen.host
            # MQTT 3.1.1 on our own broker: paho decodes MQTT 5 properties on every message,
            # about half the inbound rate (bench/mqtt_bench.py); and 3.1.1's silent drop of
            # a publish the ACL refuses can't bite here, the gateway's account may do anything.
            return MQTTSettings(host=host, port=m.listen.port, client_id=client_id, username=username,
                                password=password, keepalive=m.keepalive_s, status_topic=status,
                                protocol="3.1.1")
        from .config import read_secret

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

    async def _credentials_changed(self, family: str) -> None:
        if self.broker is None or family not in self._families:
            return
        # One at a time: two concurrent changes could otherwise write in the wrong
        # order, the older account list last.
        async with self._accounts_lock:
            accounts = await self._accounts()
            await trio.to_thread.run_sync(self.broker.set_accounts, accounts)
        log.info("broker accounts updated", family=family, accounts=len(accounts))

    async def _record_rejected(self, topic: str, payload: bytes, reason: str) -> None:
        await self.storage.write(lambda: RejectedMessage.create(topic=topic, payload=payload, reason=reason))

    # -- health and metrics ------------------------------------------------------

    def _client_state(self) -> ComponentState:
        if self.config.mqtt.broker == "off":
            return ComponentState("off")
        if self.client is None:
            return ComponentState("unavailable", self.reason())
        stats = self.client.stats
        if self.client.connected:
            return ComponentState("ok", None, {"received": stats.received, "rejected": stats.rejected})
        return ComponentState("disconnected", stats.last_error)

    def _broker_state(self) -> ComponentState:
        if self.broker is None:
            return ComponentState("starting")
        state = "ok" if self.broker.state == "running" else self.broker.state
        return ComponentState(state, self.broker.last_error if state != "ok" else None,
                              {"listen": str(self.config.mqtt.listen), "restarts": self.broker.restarts})

    def _register_metrics(self, metrics: Metrics) -> None:
        outcomes = ("received", "acked", "rejected", "handler_errors", "unrouted")

        def stats() -> Any:
            return self.client.stats if self.client is not None else None

        metrics.collector("gatewayd_mqtt_messages_total", "counter", "Inbound MQTT messages by outcome", lambda: [
            Sample("gatewayd_mqtt_messages_total", {"outcome": o}, getattr(stats(), o)) for o in outcomes
        ] if stats() else [])
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
