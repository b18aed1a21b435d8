"""The MQTT sink: the same encoded batches, published QoS 1 to a cloud broker.

Payload: the batch body byte for byte; headers: MQTT 5 user properties (lower-case
names), topic `gatewayd/<gateway_id>/batch` (docs/upstream-protocol.md, "The MQTT
variant"). Delivered means PUBACK: there is no response body, so no counts, no 409,
no dead letters — a refused or unanswered publish is retried with backoff.

The sink publishes through a callable, `await publish(topic, payload, user_properties)`,
that returns only after the broker's PUBACK and raises on failure. `client_publisher`
builds it from the gateway's `MQTTClient`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ...protocol.batch import EncodedBatch, mqtt_topic, mqtt_user_properties
from ...protocol.retry import Outcome

__all__ = ["MqttSink", "Publish", "client_publisher", "cloud_sink"]

Publish = Callable[[str, bytes, list[tuple[str, str]]], Awaitable[None]]


class MqttSink:
    """Publishes batches QoS 1 and waits for PUBACK."""

    kind = "mqtt"

    def __init__(self, name: str, publish: Publish, *, gateway_id: str, topic: str = "", timeout_s: float = 30.0,
                 client: Any = None):
        self.name = name
        self.client = client  # an MQTTClient the worker runs alongside (None: publish is self-contained)
        self.topic = topic or mqtt_topic(gateway_id)
        self.timeout_s = timeout_s
        self._publish = publish

    async def send(self, batch: EncodedBatch, *, sent: Callable[[], None] = lambda: None) -> Outcome:
        """Publish; `delivered` on PUBACK, `retry` on anything else.

        `sent()` is called at once: the client queues the PUBLISH without waiting.
        """
        sent()
        try:
            with trio.fail_after(self.timeout_s):
                await self._publish(self.topic, batch.body, mqtt_user_properties(batch))
        except trio.TooSlowError:
            return Outcome("retry", 0, reason=f"no PUBACK within {self.timeout_s:g} s")
        except Exception as e:  # PublishError, connection lost, refused (reason code >= 0x80)
            return Outcome("retry", 0, reason=f"{type(e).__name__}: {e}")
        return Outcome("delivered", 0)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the sink's own MQTT connection, if it has one (the worker starts this)."""
        if self.client is None:
            task_status.started()
            return
        await self.client.run(task_status=task_status)

    async def aclose(self) -> None:
        pass

    def describe(self) -> str:
        return f"mqtt topic {self.topic}"


def client_publisher(client: Any) -> Publish:
    """A `Publish` over `gatewayd.core.mqtt.MQTTClient`, headers as MQTT 5 user properties.

    Raises ValueError at set-up for a client on MQTT 3.1.1: a batch without its
    signature headers would be refused by every consumer.
    """
    if getattr(getattr(client, "settings", None), "protocol", "5") != "5":
        raise ValueError("the MQTT sink needs MQTT 5 (its headers are user properties); the client speaks 3.1.1")
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    async def publish(topic: str, payload: bytes, user_properties: list[tuple[str, str]]) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = user_properties
        await client.publish(topic, payload, qos=1, properties=props)

    return publish


def cloud_sink(entry: Any, gateway_id: str) -> MqttSink:
    """An MqttSink with a connection of its own to the cloud broker of one `[[upstream]]`."""
    from urllib.parse import urlsplit

    from ..mqtt.client import MQTTClient, MQTTSettings, TLSSettings
    from ..schema import read_secret

    url = urlsplit(entry.url)
    secure = url.scheme == "mqtts"
    tls = TLSSettings(entry.tls_ca or None, entry.tls_cert or None, entry.tls_key or None) if secure else None
    settings = MQTTSettings(
        host=url.hostname or "127.0.0.1",
        port=url.port or (8883 if secure else 1883),
        client_id=entry.client_id or f"gatewayd-{gateway_id}-{entry.name}",
        username=entry.username or None,
        password=read_secret(entry.password_env),
        tls=tls,
        status_topic=None,
        publish_timeout=entry.timeout_s,
    )
    client = MQTTClient(settings)
    return MqttSink(entry.name, client_publisher(client), gateway_id=gateway_id, topic=entry.topic,
                    timeout_s=entry.timeout_s, client=client)
