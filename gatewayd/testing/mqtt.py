"""MQTT in tests: devices logging in to a gateway, what the gateway did with their
messages, and a bare mosquitto for tests of the MQTT layer itself.

A device of a running gateway (``gatewayd.testing`` re-exports all of these)::

    creds = await provision(gw, "hello", "dev1")
    async with device_mqtt(creds) as dev:
        await dev.publish("hello/dev1/reading", b'{"value": 7}')
        await wait_handled(gw, "hello/dev1/reading")

A bare broker (``mqtt_broker``) is a :class:`ManagedBroker` on a free port under
``tmp_path``, started in the test's nursery and stopped with it::

    async def test_my_topic(mqtt_broker):
        user, password = add_device_account(mqtt_broker, "dev1")
        async with device_client(mqtt_broker, user, password) as dev:
            await dev.publish("dev/dev1/data", b"...")

Tests fail (loudly) when mosquitto is not installed.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import paho.mqtt.client as paho
import pytest
import trio
from paho.mqtt.enums import CallbackAPIVersion

from ..core.mqtt.broker import AclTemplate, BrokerAccount, ManagedBroker, find_mosquitto, hash_password
from ..core.mqtt.client import MQTTClient, MQTTSettings
from ..core.mqtt.delivery import Delivery, DeliveryPool, RejectedMessage
from ..core.mqtt.marks import DeliveryMarks
from ..core.storage import SchemaSpec, Storage
from ..protocol.topics import TopicRouter, matches
from .ports import reserved_port
from .waiting import wait_until

if TYPE_CHECKING:
    from ..core.runtime import Gateway

__all__ = [
    "TEST_ACL_TEMPLATES",
    "AclTemplate",
    "Delivered",
    "DeviceClient",
    "MQTTLogin",
    "Rejection",
    "add_device_account",
    "deliveries",
    "device_client",
    "device_mqtt",
    "external_broker_settings",
    "free_port",
    "gateway_client",
    "gateway_mqtt_settings",
    "mqtt_broker",
    "mqtt_storage",
    "rejected_messages",
    "start_managed_broker",
    "wait_handled",
]

# Devices may publish anything under their own dev/<username>/ and read their own cmd.
TEST_ACL_TEMPLATES = (AclTemplate("dev/%u/#", "write"), AclTemplate("dev/%u/cmd", "read"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 for a server of the test (never assume 1883): `reserved_port`,
    so no other test takes it between this call and the server's bind."""
    return reserved_port()


async def start_managed_broker(nursery: trio.Nursery, directory: Path, **kwargs: Any) -> ManagedBroker:
    """Start a ManagedBroker on a free port in ``nursery``; fail if mosquitto is missing.

    ``acl_templates`` may be given as ``(pattern, access)`` pairs.
    """
    if find_mosquitto(kwargs.get("mosquitto")) is None:
        # Fail, not skip: a suite that silently skips every MQTT test would look green.
        pytest.fail("mosquitto is not installed: apt-get install mosquitto (scripts/test does it as root)")
    templates: Iterable[Any] = kwargs.get("acl_templates", TEST_ACL_TEMPLATES)
    kwargs["acl_templates"] = tuple(t if isinstance(t, AclTemplate) else AclTemplate(*t) for t in templates)
    kwargs.setdefault("restart_min", 0.1)
    kwargs.setdefault("restart_max", 0.5)
    broker = ManagedBroker(directory, port=kwargs.pop("port", None) or free_port(), **kwargs)
    await nursery.start(broker.run)
    if broker.state != "running":
        pytest.fail(f"managed mosquitto did not start: {broker.last_error}")
    return broker


@pytest.fixture
async def mqtt_broker(tmp_path: Path, nursery: trio.Nursery) -> ManagedBroker:
    """A real mosquitto for this test, with TEST_ACL_TEMPLATES; stopped after the test."""
    return await start_managed_broker(nursery, tmp_path / "mosquitto")


def external_broker_settings(broker: ManagedBroker, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``--set`` overrides that make a gateway use ``broker`` as an external broker
    (``mqtt.broker = "external"``: the broker outlives the gateway), logged in with the
    broker's gateway account (its password put in the environment with ``monkeypatch``)."""
    user, password = broker.gateway_credentials()
    env = f"GATEWAYD_TEST_BROKER_PASSWORD_{broker.port}"
    monkeypatch.setenv(env, password)
    return ["mqtt.broker='external'", f"mqtt.host='{broker.host}'", f"mqtt.port={broker.port}",
            f"mqtt.username='{user}'", f"mqtt.password_env='{env}'"]


def gateway_mqtt_settings(broker: ManagedBroker, **overrides: Any) -> MQTTSettings:
    """MQTTSettings for the gateway's own account on ``broker`` (fast reconnects for tests)."""
    user, password = broker.gateway_credentials()
    values: dict[str, Any] = dict(
        host=broker.host,
        port=broker.port,
        client_id="gatewayd-test",
        username=user,
        password=password,
        reconnect_min=0.05,
        reconnect_max=0.5,
    )
    values.update(overrides)
    return MQTTSettings(**values)


@pytest.fixture
async def mqtt_storage(tmp_path: Path, nursery: trio.Nursery) -> Storage:
    """A real gateway database with the MQTT delivery tables (rejected messages, marks)."""
    storage = Storage(tmp_path / "gatewayd.sqlite3")
    await nursery.start(storage.run)
    await trio.to_thread.run_sync(storage.install, SchemaSpec("core_mqtt", [RejectedMessage], version=2))
    await trio.to_thread.run_sync(DeliveryMarks(storage).install)
    return storage


async def gateway_client(nursery: trio.Nursery, storage: Storage, broker: ManagedBroker, **overrides: Any) -> MQTTClient:
    """The gateway's own client for ``broker`` with a delivery pool of its own, as the
    gateway builds them (the pool runs in ``nursery``; start the client yourself)."""
    marks = DeliveryMarks(storage)
    await nursery.start(marks.run)
    pool = DeliveryPool(Delivery(TopicRouter(), storage, marks=marks), size=256)
    await nursery.start(pool.run)
    return MQTTClient(gateway_mqtt_settings(broker, **overrides), pool)


def add_device_account(broker: ManagedBroker, username: str, password: str | None = None) -> tuple[str, str]:
    """Give ``broker`` a device account (reloads a running mosquitto); returns (user, password)."""
    password = password or f"pw-{username}-{free_port()}"
    broker.add_account(BrokerAccount(username, hash_password(password)))
    return username, password


class DeviceClient:
    """A plain paho client in its own thread, as a device would be: independent of MQTTClient."""

    def __init__(self, host: str, port: int, username: str | None, password: str | None, client_id: str) -> None:
        # A host that is a path is a unix socket (the managed mosquitto's, `broker.address`).
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, reconnect_on_failure=False,
            transport="unix" if host.startswith("/") else "tcp",
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.host, self.port = host, port
        self.received: list[paho.MQTTMessage] = []
        self.connack: Any = None
        self._connected = threading.Event()
        self._subacks: dict[int, Any] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.received.append(m)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subacks.__setitem__(mid, rcs)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = reason
        self._connected.set()

    async def connect(self, timeout: float = 5) -> Any:
        """Connect and wait for CONNACK; returns its reason code (may be a refusal)."""
        await trio.to_thread.run_sync(self.client.connect, self.host, self.port, 30)
        self.client.loop_start()
        await trio.to_thread.run_sync(self._connected.wait, timeout)
        return self.connack

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait for the broker's PUBACK (QoS 1)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        await trio.to_thread.run_sync(info.wait_for_publish, 5)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> Any:
        """Subscribe and wait for SUBACK; returns its reason codes."""
        _, mid = self.client.subscribe(topic_filter, qos)
        await wait_until(lambda: mid in self._subacks, timeout=5, step=0.01, what=f"SUBACK for {topic_filter!r}")
        return self._subacks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@asynccontextmanager
async def device_client(
    broker: ManagedBroker, username: str | None, password: str | None, client_id: str | None = None
) -> AsyncIterator[DeviceClient]:
    """A connected :class:`DeviceClient`; raises if the broker refuses the login."""
    dev = DeviceClient(broker.host, broker.port, username, password, client_id or f"dev-{username}")
    try:
        reason = await dev.connect()
        if reason is None or reason.is_failure:
            raise ConnectionRefusedError(f"broker refused {username!r}: {reason}")
        yield dev
    finally:
        await trio.to_thread.run_sync(dev.close)


# -- devices of a running gateway ----------------------------------------------------


class MQTTLogin(NamedTuple):
    """Where and as whom a device logs in."""

    host: str
    port: int
    username: str
    password: str


class _Refusal(str):
    """A refused login, for wait_until's message: falsy, and says why."""

    def __bool__(self) -> bool:
        return False


@asynccontextmanager
async def device_mqtt(login: Any, *, client_id: str | None = None, timeout: float = 20.0) -> AsyncIterator[DeviceClient]:
    """A device's connected :class:`DeviceClient`, logged in with ``login`` (an
    :class:`MQTTLogin`, or credentials from :func:`~gatewayd.testing.provision`).

    A new account reaches mosquitto by a reload that runs just after provisioning;
    until then the login is refused, so refusals are retried for up to ``timeout`` s.
    """
    login = getattr(login, "mqtt", login)
    if login is None:
        pytest.fail("these credentials have no MQTT login: start the gateway with mqtt=True")

    async def attempt() -> DeviceClient | _Refusal:
        dev = DeviceClient(login.host, login.port, login.username, login.password, client_id or login.username)
        try:
            reason = await dev.connect()
        except BaseException:
            await trio.to_thread.run_sync(dev.close)
            raise
        if reason is not None and not reason.is_failure:
            return dev
        await trio.to_thread.run_sync(dev.close)
        return _Refusal(f"refused: {reason}")

    dev = await wait_until(attempt, timeout=timeout, step=0.1,
                           what=f"the broker at {login.host}:{login.port} accepts {login.username!r}")
    try:
        yield dev
    finally:
        await trio.to_thread.run_sync(dev.close)


# -- what the gateway did with inbound messages --------------------------------------


class Delivered(NamedTuple):
    """One inbound message the gateway delivered, and its verdict: "handled",
    "rejected", "duplicate" or "unrouted" (every one of them was acknowledged)."""

    topic: str
    payload: bytes
    sender: str | None  # the device's username when it came through the edge
    verdict: str


_DELIVERED: weakref.WeakKeyDictionary[Any, list[Delivered]] = weakref.WeakKeyDictionary()


def record_deliveries(gateway: Gateway) -> None:
    """Keep every verdict of ``gateway``'s deliveries (call before it runs)."""
    log = _DELIVERED.setdefault(gateway, [])
    gateway.mqtt.delivery.watch(lambda msg, verdict: log.append(Delivered(msg.topic, msg.payload, msg.sender, verdict)))


def deliveries(gateway: Gateway, topic_filter: str | None = None, verdict: str | None = None) -> list[Delivered]:
    """The messages ``gateway`` delivered so far, in order (on topics ``topic_filter``
    matches, + and # allowed; with ``verdict``)."""
    return [d for d in _DELIVERED.get(gateway, ())
            if (topic_filter is None or matches(topic_filter, d.topic)) and (verdict is None or d.verdict == verdict)]


async def wait_handled(gateway: Gateway, topic_filter: str | None = None, *, n: int = 1, verdict: str | None = "handled",
                       timeout: float = 20.0) -> list[Delivered]:
    """Wait until ``gateway`` delivered ``n`` messages on ``topic_filter`` (None: any
    topic) with ``verdict`` ("handled" by default; None: any); return them all.

    Delivered means the handlers returned and what they wrote was committed (for a
    rejected message, its ``rejected_messages`` row too).
    """
    where = f" on {topic_filter!r}" if topic_filter else ""
    return await wait_until(lambda: len(got := deliveries(gateway, topic_filter, verdict)) >= n and got,
                            timeout=timeout, what=f"{n} message(s){where} delivered ({verdict or 'any verdict'})")


class Rejection(NamedTuple):
    topic: str
    reason: str
    sender: str | None
    payload: bytes  # the first 4 KiB


async def rejected_messages(gateway: Gateway) -> list[Rejection]:
    """The messages ``gateway`` rejected and recorded (``core_mqtt_rejected``), oldest first."""
    return await gateway.storage.read(lambda: [
        Rejection(r.topic, r.reason, r.sender, bytes(r.payload))
        for r in RejectedMessage.select().order_by(RejectedMessage.id)
    ])
