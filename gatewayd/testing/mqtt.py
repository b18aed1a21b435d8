"""pytest fixtures and helpers for MQTT: a real mosquitto per test, device accounts, devices.

For gatewayd's own tests and for plugin authors (``gatewayd.testing`` re-exports these)::

    async def test_my_topic(mqtt_broker):
        user, password = add_device_account(mqtt_broker, "dev1")
        async with device_client(mqtt_broker, user, password) as dev:
            await dev.publish("paku/dev1/data", b"...")

The broker is a :class:`~gatewayd.core.broker.ManagedBroker` on a free port under
``tmp_path``, started in the test's nursery and stopped with it. Tests fail (loudly) when
mosquitto is not installed.
"""

from __future__ import annotations

import socket
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import paho.mqtt.client as paho
import pytest
import trio
from paho.mqtt.enums import CallbackAPIVersion

from gatewayd.core.mqtt.broker import AclTemplate, BrokerAccount, ManagedBroker, find_mosquitto, hash_password
from gatewayd.core.mqtt.client import MQTTClient, MQTTSettings
from gatewayd.core.mqtt.delivery import Delivery, DeliveryPool, RejectedMessage
from gatewayd.core.mqtt.marks import DeliveryMarks
from gatewayd.core.storage import SchemaSpec, Storage
from gatewayd.protocol.topics import TopicRouter

from .waiting import wait_until

__all__ = [
    "TEST_ACL_TEMPLATES",
    "DeviceClient",
    "add_device_account",
    "device_client",
    "free_port",
    "gateway_client",
    "gateway_mqtt_settings",
    "mqtt_broker",
    "mqtt_storage",
    "start_managed_broker",
]

# Devices may publish anything under their own dev/<username>/ and read their own cmd.
TEST_ACL_TEMPLATES = (AclTemplate("dev/%u/#", "write"), AclTemplate("dev/%u/cmd", "read"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (never assume 1883)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_managed_broker(nursery: trio.Nursery, directory: Path, **kwargs: Any) -> ManagedBroker:
    """Start a ManagedBroker on a free port in ``nursery``; fail if mosquitto is missing."""
    if find_mosquitto(kwargs.get("mosquitto")) is None:
        # Fail, not skip: a suite that silently skips every MQTT test would look green.
        pytest.fail("mosquitto is not installed: apt-get install mosquitto (scripts/test does it as root)")
    kwargs.setdefault("acl_templates", TEST_ACL_TEMPLATES)
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
    pool = DeliveryPool(Delivery(TopicRouter(), storage, marks=DeliveryMarks(storage)), size=256)
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
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, reconnect_on_failure=False
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
