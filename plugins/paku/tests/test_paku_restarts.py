"""paku across restarts of the gateway and of its broker: what devices sent while the
gateway was away arrives, and what a broker keeps (retained copies) is not stored again."""

import json
import os
import signal

from paku_testbed import AUTH, PAKU, stored_rows

from gatewayd.testing import (
    add_device_account,
    device_mqtt,
    external_broker_settings,
    gw_client,
    provision,
    rejected_messages,
    start_managed_broker,
    wait_handled,
    wait_until,
)

ACLS = [("paku/%u/telemetry", "write"), ("paku/%u/state", "write"), ("paku/%u/event/#", "write"),
        ("paku/%u/cmd", "read")]


async def test_messages_sent_while_the_gateway_was_stopped_arrive(gateway_factory, tmp_path, nursery, monkeypatch):
    """A persistent session: the broker keeps what devices publish while the gateway is down.

    The broker here is one the gateway does not manage (`mqtt.broker = "external"`), so it
    stays up while the gateway restarts on the same data_dir.
    """
    broker = await start_managed_broker(nursery, tmp_path / "broker", acl_templates=ACLS)
    settings = external_broker_settings(broker, monkeypatch)
    async with gateway_factory(plugins=PAKU, settings=settings) as gw:
        creds = await provision(gw, "paku", "pk-1")
        await wait_until(lambda: gw.contexts["paku"].mqtt.connected)
    # The gateway is stopped; its session (and subscriptions) stay with the broker.
    add_device_account(broker, creds.mqtt.username, creds.mqtt.password)
    async with device_mqtt(creds) as dev:
        for i in range(3):
            await dev.publish("paku/pk-1/telemetry", json.dumps({"seq": i}))
    async with gateway_factory(plugins=PAKU, settings=settings) as gw, gw_client(gw) as client:
        await wait_handled(gw, "paku/pk-1/telemetry", n=3)
        r = await client.get("/paku/devices/pk-1/telemetry", headers=AUTH)
        assert sorted(m["payload"]["seq"] for m in r.json()["telemetry"]) == [0, 1, 2]


async def test_retained_telemetry_and_events_are_stored_once_through_an_external_broker(
        gateway_factory, tmp_path, nursery, monkeypatch):
    """The spec: telemetry and events are not retained. A device that retains them anyway
    leaves a copy on the broker, which hands it to the gateway again on every (re)subscribe:
    after a gateway restart and a broker restart, the copies are refused, not stored."""
    broker = await start_managed_broker(nursery, tmp_path / "broker", acl_templates=ACLS, restart_min=0.05)
    settings = external_broker_settings(broker, monkeypatch)
    async with gateway_factory(plugins=PAKU, settings=settings) as gw:
        creds = await provision(gw, "paku", "pk-1")
        add_device_account(broker, creds.mqtt.username, creds.mqtt.password)
        await wait_until(lambda: gw.contexts["paku"].mqtt.connected)
        async with device_mqtt(creds) as dev:
            await dev.publish("paku/pk-1/telemetry", b'{"seq": 1}', retain=True)
            await dev.publish("paku/pk-1/event/button", b'{"press": 1}', retain=True)
        await wait_handled(gw, "paku/pk-1/#", n=2)

    async with gateway_factory(plugins=PAKU, settings=settings) as gw, gw_client(gw) as client:
        await wait_handled(gw, "paku/pk-1/#", n=2, verdict=None)  # the gateway restarted
        os.kill(broker.pid, signal.SIGTERM)  # mosquitto saves its retained messages and exits
        await wait_until(lambda: broker.restarts == 1 and broker.state == "running")
        await wait_handled(gw, "paku/pk-1/#", n=4, verdict=None)  # the broker restarted

        assert await stored_rows(gw) == {"telemetry": [{"seq": 1}], "events": [("button", {"press": 1})]}
        replays = [(topic, reason) for topic, reason, *_ in await rejected_messages(gw)]
        why = "must not be retained (the broker kept it and sent it again; the original was handled when it was published)"
        assert sorted(replays) == [("paku/pk-1/event/button", f"a retained copy: paku events {why}")] * 2 + [
            ("paku/pk-1/telemetry", f"a retained copy: paku telemetry {why}")] * 2
        r = await client.get("/metrics")
        assert 'gatewayd_paku_messages_total{kind="telemetry",outcome="rejected"} 2' in r.text
        assert 'gatewayd_paku_messages_total{kind="event",outcome="rejected"} 2' in r.text


async def test_a_retained_publish_through_the_edge_is_stored_once(gateway_factory):
    """Through the gateway's edge a device's publish is the gateway's, retained or not:
    stored once, and mosquitto never keeps a copy to hand out after a restart."""
    async with gateway_factory(plugins=PAKU, mqtt=True) as gw:
        creds = await provision(gw, "paku", "pk-1")
        async with device_mqtt(creds) as dev:
            await dev.publish("paku/pk-1/telemetry", b'{"seq": 1}', retain=True)
            await dev.publish("paku/pk-1/event/button", b'{"press": 1}', retain=True)
        await wait_handled(gw, "paku/pk-1/#", n=2)

    async with gateway_factory(plugins=PAKU, mqtt=True) as gw:
        os.kill(gw.mqtt.broker.pid, signal.SIGTERM)
        await wait_until(lambda: gw.mqtt.broker.restarts == 1 and gw.contexts["paku"].mqtt.connected)
        # A marker through mosquitto, after whatever it had for the gateway's subscriptions.
        await gw.contexts["paku"].mqtt.publish("paku/pk-1/telemetry", b'{"seq": 2}')
        await wait_handled(gw, "paku/pk-1/telemetry")
        assert await stored_rows(gw) == {"telemetry": [{"seq": 1}, {"seq": 2}], "events": [("button", {"press": 1})]}
        assert await rejected_messages(gw) == []


async def test_the_same_state_published_again_is_news(gateway_factory):
    """Only a broker's retained copy is a repeat: a device publishing its (retained) state
    again through the edge is speaking now, however alike the payloads."""
    async with gateway_factory(plugins=PAKU, mqtt=True) as gw, gw_client(gw) as client:
        async with device_mqtt(await provision(gw, "paku", "pk-1")) as dev:
            for _ in range(2):
                await dev.publish("paku/pk-1/state", b'{"status": "online"}', retain=True)
            await wait_handled(gw, "paku/pk-1/state", n=2, verdict=None)
        r = await client.get("/metrics")
        assert 'gatewayd_paku_messages_total{kind="state",outcome="stored"} 2' in r.text
