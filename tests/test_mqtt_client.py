"""MQTTClient against a real mosquitto: persistent sessions, acks after delivery, publish."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable

import pytest
import trio

from gatewayd.core.mqtt.broker import AclTemplate, BrokerAccount, ManagedBroker, hash_password
from gatewayd.core.mqtt.client import (
    InboundMessage,
    MQTTClient,
    PublishError,
    PublishTimeout,
    Rejected,
    RejectedMessage,
)
from gatewayd.core.storage import Storage, StorageUnavailable
from gatewayd.testing import (
    add_device_account,
    device_client,
    reserved_port,
    gateway_client,
    start_managed_broker,
    wait_until,
)

PROTOCOLS = ["3.1.1", "5"]


class Collector:
    """A handler that keeps what it got; ``fail`` decides per message whether it raises."""

    def __init__(self, fail: Callable[[InboundMessage], BaseException | None] = lambda m: None) -> None:
        self.got: list[InboundMessage] = []
        self.fail = fail

    async def __call__(self, msg: InboundMessage) -> None:
        self.got.append(msg)
        exc = self.fail(msg)
        if exc is not None:
            raise exc

    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.got]


async def run_client(nursery: trio.Nursery, broker: ManagedBroker, handler: Any, mqtt_storage: Storage,
                     **settings: Any) -> MQTTClient:
    client = await gateway_client(nursery, mqtt_storage, broker, **settings)
    client.subscribe("dev/+/data", handler, owner="test")
    await nursery.start(client.run)
    await wait_until(lambda: client.ready)
    return client


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_messages_published_while_gateway_is_stopped_arrive_after_start(
    mqtt_broker: ManagedBroker, nursery: trio.Nursery, mqtt_storage: Storage, protocol: str
) -> None:
    with trio.fail_after(15):
        user, password = add_device_account(mqtt_broker, "dev1")
        first = Collector()
        client = await run_client(nursery, mqtt_broker, first, mqtt_storage, protocol=protocol)  # creates the session
        await client.stop()
        async with device_client(mqtt_broker, user, password) as dev:
            for i in range(50):
                await dev.publish("dev/dev1/data", b"%d" % i)
        second = Collector()
        await run_client(nursery, mqtt_broker, second, mqtt_storage, protocol=protocol)
        await wait_until(lambda: len(second.got) == 50)
        assert first.got == []
        assert sorted(second.payloads()) == sorted(b"%d" % i for i in range(50))


async def test_broker_killed_and_restarted_client_reconnects_and_resubscribes(
    mqtt_broker: ManagedBroker, nursery: trio.Nursery, mqtt_storage: Storage
) -> None:
    with trio.fail_after(20):
        user, password = add_device_account(mqtt_broker, "dev1")
        handler = Collector()
        client = await run_client(nursery, mqtt_broker, handler, mqtt_storage)
        async with device_client(mqtt_broker, user, password) as dev:
            for i in range(20):
                await dev.publish("dev/dev1/data", b"before-%d" % i)
        await wait_until(lambda: len(handler.got) == 20)
        os.kill(mqtt_broker.pid or 0, signal.SIGKILL)  # no clean shutdown, no last save
        await wait_until(lambda: client.stats.reconnects >= 1 and client.ready)
        async with device_client(mqtt_broker, user, password, client_id="dev1-again") as dev:
            for i in range(20):
                await dev.publish("dev/dev1/data", b"after-%d" % i)
        await wait_until(lambda: len(handler.got) >= 40)
        assert mqtt_broker.restarts == 1
        assert {b"before-%d" % i for i in range(20)} | {b"after-%d" % i for i in range(20)} == set(handler.payloads())


async def test_broker_stopped_and_restarted_keeps_queued_messages(
    tmp_path: Path, nursery: trio.Nursery, mqtt_storage: Storage
) -> None:
    """A clean broker stop saves the gateway's session; what devices send while the
    gateway is away still arrives, even across a credential reload (deferred until the
    gateway's restored session has reconnected: see gatewayd.core.mqtt.broker)."""
    with trio.fail_after(20):
        port = reserved_port()
        scope = trio.CancelScope()
        dev1 = BrokerAccount("dev1", hash_password("pw1"))

        async def first_broker(task_status: trio.TaskStatus[ManagedBroker] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                async with trio.open_nursery() as inner:
                    task_status.started(await start_managed_broker(inner, tmp_path / "m", port=port, accounts=[dev1]))

        broker = await nursery.start(first_broker)
        handler = Collector()
        client = await run_client(nursery, broker, handler, mqtt_storage)
        await client.stop()
        scope.cancel()  # SIGTERM: mosquitto saves its persistence file
        await wait_until(lambda: broker.state == "stopped")
        broker = await start_managed_broker(nursery, tmp_path / "m", port=port, accounts=[dev1])
        async with device_client(broker, "dev1", "pw1") as dev:
            await dev.publish("dev/dev1/data", b"queued-1")
            user2, password2 = add_device_account(broker, "dev2")  # must not break the session
            assert broker.reload_pending
            await dev.publish("dev/dev1/data", b"queued-2")
        await run_client(nursery, broker, handler, mqtt_storage)
        await wait_until(lambda: len(handler.got) == 2)
        await wait_until(lambda: not broker.reload_pending)  # applied once the gateway is back
        async with device_client(broker, user2, password2) as dev:
            await dev.publish("dev/dev2/data", b"new device")
        await wait_until(lambda: len(handler.got) == 3)
        # handlers run concurrently, so arrival order is not handling order
        assert sorted(handler.payloads()) == [b"new device", b"queued-1", b"queued-2"]


async def test_rejected_message_is_acked_once_and_recorded(
    mqtt_broker: ManagedBroker, nursery: trio.Nursery, mqtt_storage: Storage
) -> None:
    def poison(msg: InboundMessage) -> BaseException | None:
        return Rejected("payload is not JSON") if msg.payload == b"poison" else None

    with trio.fail_after(15):
        user, password = add_device_account(mqtt_broker, "dev1")
        handler = Collector(poison)
        client = await run_client(nursery, mqtt_broker, handler, mqtt_storage)
        async with device_client(mqtt_broker, user, password) as dev:
            await dev.publish("dev/dev1/data", b"poison")
            await dev.publish("dev/dev1/data", b"good")
            await wait_until(lambda: client.stats.acked == 2)
            await client.stop()
            # a new session connection: an unacked poison message would come back first
            handler2 = Collector(poison)
            client2 = await run_client(nursery, mqtt_broker, handler2, mqtt_storage)
            await dev.publish("dev/dev1/data", b"marker")
            await wait_until(lambda: handler2.got)
        assert handler2.payloads() == [b"marker"]
        stats = client.pool.delivery.stats
        assert stats.rejected == 1 and stats.handler_errors == 0
        rows = await mqtt_storage.read(lambda: list(RejectedMessage.select()))
        assert [(r.topic, bytes(r.payload), r.reason) for r in rows] == [
            ("dev/dev1/data", b"poison", "payload is not JSON")
        ]
        assert client2.stats.reconnects == 0


async def test_a_handler_that_crashes_gets_its_message_rejected_not_redelivered(
    mqtt_broker: ManagedBroker, nursery: trio.Nursery, mqtt_storage: Storage
) -> None:
    """A RecursionError on a hostile payload (issue 14: it wedged ingest in a reconnect loop)."""

    def crash(msg: InboundMessage) -> BaseException | None:
        return RecursionError("maximum recursion depth exceeded") if msg.payload == b"[[[[" else None

    with trio.fail_after(15):
        user, password = add_device_account(mqtt_broker, "dev1")
        handler = Collector(crash)
        client = await run_client(nursery, mqtt_broker, handler, mqtt_storage)
        async with device_client(mqtt_broker, user, password) as dev:
            await dev.publish("dev/dev1/data", b"[[[[")
            await dev.publish("dev/dev1/data", b"next")
        await wait_until(lambda: client.stats.acked == 2)
        assert handler.payloads() == [b"[[[[", b"next"]  # ran once: never came back
        assert client.pool.delivery.stats.handler_errors == 1
        assert client.stats.reconnects == 0
        rows = await mqtt_storage.read(lambda: [r.reason for r in RejectedMessage.select()])
        assert rows == ["handler error (test): RecursionError: maximum recursion depth exceeded"]


async def test_storage_that_cannot_write_holds_the_message_until_it_can(
    mqtt_broker: ManagedBroker, nursery: trio.Nursery, mqtt_storage: Storage
) -> None:
    failures = iter([StorageUnavailable("storage is not open")] * 2)

    with trio.fail_after(15):
        user, password = add_device_account(mqtt_broker, "dev1")
        handler = Collector(lambda m: next(failures, None))
        client = await run_client(nursery, mqtt_broker, handler, mqtt_storage)
        async with device_client(mqtt_broker, user, password) as dev:
            await dev.publish("dev/dev1/data", b"reading")
        await wait_until(lambda: client.stats.acked == 1)
        assert handler.payloads() == [b"reading"] * 3  # tried until storage took it
        assert client.pool.delivery.stats.storage_waits == 2


async def test_unwritable_storage_leaves_the_message_for_the_next_run(
    mqtt_broker: ManagedBroker, nursery: trio.Nursery, mqtt_storage: Storage
) -> None:
    with trio.fail_after(15):
        user, password = add_device_account(mqtt_broker, "dev1")
        failing = Collector(lambda m: StorageUnavailable("storage is not open"))
        client = await run_client(nursery, mqtt_broker, failing, mqtt_storage)
        async with device_client(mqtt_broker, user, password) as dev:
            await dev.publish("dev/dev1/data", b"reading")
        await wait_until(lambda: failing.got)
        await client.stop(grace=0.2)
        assert client.stats.acked == 0
        working = Collector()
        client2 = await run_client(nursery, mqtt_broker, working, mqtt_storage)
        await wait_until(lambda: client2.stats.acked == 1)
        assert working.payloads() == [b"reading"] and working.got[0].dup


async def test_handlers_run_concurrently(mqtt_broker: ManagedBroker, nursery: trio.Nursery, mqtt_storage: Storage) -> None:
    """Group commit needs many messages in flight at once: 20 handlers must block together."""
    gate = trio.Event()
    inside = 0

    async def handler(msg: InboundMessage) -> None:
        nonlocal inside
        inside += 1
        if inside >= 20:
            gate.set()
        await gate.wait()

    with trio.fail_after(15):
        user, password = add_device_account(mqtt_broker, "dev1")
        client = await run_client(nursery, mqtt_broker, handler, mqtt_storage)
        async with device_client(mqtt_broker, user, password) as dev:
            for i in range(20):
                await dev.publish("dev/dev1/data", b"%d" % i)
        await wait_until(lambda: client.stats.acked == 20)


async def test_publish_returns_after_puback_and_raises_when_refused(
    mqtt_broker: ManagedBroker, nursery: trio.Nursery, mqtt_storage: Storage
) -> None:
    with trio.fail_after(15):
        user, password = add_device_account(mqtt_broker, "dev1")
        async with device_client(mqtt_broker, user, password) as dev:
            await dev.subscribe("dev/dev1/cmd")
            client = await gateway_client(nursery, mqtt_storage, mqtt_broker)
            await nursery.start(client.run)
            await client.publish("dev/dev1/cmd", b"reboot")
            assert client.stats.publishes == 1
            await wait_until(lambda: dev.received)
            assert dev.received[0].payload == b"reboot"
        # a device account may not publish on dev2's topic: the MQTT 5 PUBACK says so
        # (MQTT 3.1.1 has no way to say it: mosquitto acknowledges and drops)
        restricted = await gateway_client(
            nursery, mqtt_storage, mqtt_broker, client_id="as-dev1", username=user, password=password, status_topic=None
        )
        await nursery.start(restricted.run)
        with pytest.raises(PublishError, match="Not authorized"):
            await restricted.publish("dev/dev2/data", b"x")


async def test_first_attempt_is_bounded_when_broker_is_down(
    tmp_path: Path, nursery: trio.Nursery, mqtt_storage: Storage
) -> None:
    with trio.fail_after(15):
        port = reserved_port()
        got = Collector()
        settings = dict(host="127.0.0.1", port=port, client_id="gw", reconnect_min=0.05, reconnect_max=0.2)
        probe = ManagedBroker(tmp_path / "m", port=port)
        client = await gateway_client(nursery, mqtt_storage, probe, **settings)
        client.subscribe("dev/+/data", got)
        await nursery.start(client.run)  # returns although nothing listens
        assert not client.connected and "failed" in (client.stats.last_error or "")
        with pytest.raises(PublishTimeout):
            await client.publish("gatewayd/x", b"x", timeout=0.2)
        broker = await start_managed_broker(nursery, tmp_path / "m", port=port)
        await wait_until(lambda: client.ready)
        user, password = add_device_account(broker, "dev1")
        async with device_client(broker, user, password) as dev:
            await dev.publish("dev/dev1/data", b"late")
        await wait_until(lambda: got.got)


async def test_status_topic_online_then_offline(tmp_path: Path, nursery: trio.Nursery, mqtt_storage: Storage) -> None:
    # The watcher needs an account of its own: a second login as the gateway would take
    # over the gateway's session (mosquitto binds client ids to usernames).
    broker = await start_managed_broker(nursery, tmp_path / "m", acl_templates=[AclTemplate("gatewayd/#", "read")])
    with trio.fail_after(15):
        user, password = add_device_account(broker, "watcher")
        client = await gateway_client(nursery, mqtt_storage, broker, status_topic="gatewayd/status")
        await nursery.start(client.run)
        await client.publish("gatewayd/ping", b"", qos=1)  # after our status publish
        async with device_client(broker, user, password) as watcher:
            await watcher.subscribe("gatewayd/status")
            await wait_until(lambda: watcher.received)
            assert watcher.received[0].payload == b"online" and watcher.received[0].retain
            await client.stop()
            await wait_until(lambda: len(watcher.received) == 2)
            assert watcher.received[1].payload == b"offline"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_burst_of_mixed_sizes_arrives_intact(
    mqtt_broker: ManagedBroker, nursery: trio.Nursery, mqtt_storage: Storage, protocol: str
) -> None:
    """The client reads the socket in large chunks and parses packets out of them: packets
    that straddle a chunk, and payloads larger than a chunk, must come out whole."""
    sizes = [0, 1, 127, 128, 16383, 16384, 65535, 65536, 65537, 200_000] + [20] * 300 + [70_000, 3]
    payloads = [bytes([i % 251]) * n + b"#%d" % i for i, n in enumerate(sizes)]
    got = Collector()
    with trio.fail_after(30):
        user, password = add_device_account(mqtt_broker, "dev1")
        client = await run_client(nursery, mqtt_broker, got, mqtt_storage, protocol=protocol)
        async with device_client(mqtt_broker, user, password) as dev:
            for p in payloads:
                await dev.publish("dev/dev1/data", p)
        await wait_until(lambda: client.stats.acked == len(payloads))
    assert sorted(got.payloads()) == sorted(payloads)
    assert client.pool.delivery.stats.handler_errors == 0
