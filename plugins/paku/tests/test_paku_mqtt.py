"""paku end to end: the gateway's managed mosquitto, devices logged in with their own
credentials, the HTTP API, the reference upstream receiver."""

import json

import trio
from paku_testbed import AUTH, PAKU, device_view, provision_over_http

from gatewayd.testing import (
    DeviceClient,
    MQTTLogin,
    deliveries,
    device_mqtt,
    gw_client,
    gw_mqtt_address,
    provision,
    rejected_messages,
    wait_handled,
    wait_until,
)


async def test_device_connects_publishes_and_is_queryable(gateway_factory, upstream_receiver):
    """The spec's acceptance: connect, authenticate, publish; persisted and queryable;
    /health 200; and everything forwarded upstream in its class."""
    async with gateway_factory(plugins=PAKU, mqtt=True, upstream=upstream_receiver) as gw, gw_client(gw) as client:
        creds = await provision_over_http(client, "pk-1", model="pk-a")
        host, port = gw_mqtt_address(gw)
        assert creds["mqtt"]["port"] == port and creds["mqtt"]["host"] == "127.0.0.1"

        # A wrong password is refused by the broker.
        bad = DeviceClient(host, port, "pk-1", "wrong", "intruder")
        assert (await bad.connect()).is_failure
        await trio.to_thread.run_sync(bad.close)

        async with device_mqtt(MQTTLogin(**creds["mqtt"])) as dev:
            state = {"status": "online", "rssi": -61, "fwVersion": "1.1.0"}
            await dev.publish("paku/pk-1/state", json.dumps(state), qos=0, retain=True)
            await dev.publish("paku/pk-1/telemetry", json.dumps({"temp_c": 21.5, "hum": 40}))
            await dev.publish("paku/pk-1/event/button", json.dumps({"press": "long"}))
            await dev.publish("paku/pk-1/event/error", json.dumps({"code": 17}))
            await wait_handled(gw, "paku/pk-1/#", n=4)

            view = await device_view(client, "pk-1")
            assert view["telemetry"]["payload"] == {"temp_c": 21.5, "hum": 40}
            assert view["state"]["online"] is True and view["state"]["rssi"] == -61
            assert view["fwVersion"] == "1.1.0" and view["lastSeenAt"] is not None
            assert view["status"] == "active"  # provisioned until it spoke

            r = await client.get("/paku/devices/pk-1/telemetry", headers=AUTH)
            assert [m["payload"]["temp_c"] for m in r.json()["telemetry"]] == [21.5]
            r = await client.get("/paku/health")
            assert r.status_code == 200 and r.json()["mqtt"]["connected"] is True
            assert (await client.get("/health")).status_code == 200

            records = await upstream_receiver.wait_for(4)
            classes = {(r["kind"], r["data"].get("type")): r["class"] for r in records}
            assert classes == {("state", None): "state", ("telemetry", None): "history",
                               ("event", "button"): "history", ("event", "error"): "alert"}
            r = await client.get("/metrics")
            assert 'gatewayd_paku_messages_total{kind="telemetry",outcome="stored"} 1' in r.text
            assert 'gatewayd_paku_messages_total{kind="event",outcome="stored"} 2' in r.text


async def test_command_round_trip(gateway_factory):
    async with gateway_factory(plugins=PAKU, mqtt=True) as gw, gw_client(gw) as client:
        async with device_mqtt(await provision(gw, "paku", "pk-1")) as dev:
            assert (await dev.subscribe("paku/pk-1/cmd"))[0].value == 1
            await dev.publish("paku/pk-1/state", b'{"status": "online"}', qos=0, retain=True)
            await wait_handled(gw, "paku/pk-1/state")

            r = await client.post("/api/gateway/devices/pk-1/commands", headers=AUTH,
                                  json={"payload": {"action": "blink", "times": 3}})
            assert r.status_code == 201, r.text
            command_id = r.json()["command"]["id"]
            await wait_until(lambda: dev.received)
            cmd = json.loads(dev.received[0].payload)
            assert cmd == {"action": "blink", "times": 3, "id": command_id}
            assert await _command_status(client, command_id) == "delivered"

            await dev.publish("paku/pk-1/event/ack", json.dumps({"id": command_id, "ok": True, "result": "done"}))
            await wait_handled(gw, "paku/pk-1/event/ack")
            assert await _command_status(client, command_id) == "executed"

            # The other way to answer: a cmdAck field in the state.
            r = await client.post("/api/gateway/devices/pk-1/commands", headers=AUTH,
                                  json={"payload": {"action": "reboot"}})
            second = r.json()["command"]["id"]
            await wait_until(lambda: len(dev.received) == 2)
            ack = {"status": "online", "cmdAck": {"id": second, "ok": False, "result": "busy"}}
            await dev.publish("paku/pk-1/state", json.dumps(ack), qos=1, retain=True)
            await wait_handled(gw, "paku/pk-1/state", n=2)
            assert await _command_status(client, second) == "failed"
            r = await client.get("/metrics")
            assert 'gatewayd_paku_commands_total{result="published"} 2' in r.text
            assert 'gatewayd_paku_commands_total{result="executed"} 1' in r.text


async def _command_status(client, command_id):
    r = await client.get("/api/gateway/devices/pk-1/commands", headers=AUTH)
    return {c["id"]: c["status"] for c in r.json()["commands"]}[command_id]


async def test_a_device_cannot_use_another_devices_topics(gateway_factory):
    async with gateway_factory(plugins=PAKU, mqtt=True) as gw, gw_client(gw) as client:
        a = await provision(gw, "paku", "pk-a")
        await provision(gw, "paku", "pk-b")
        async with device_mqtt(a) as dev:
            # mosquitto grants the subscription but never delivers what the ACL denies.
            await dev.subscribe("paku/pk-b/cmd")
            await dev.subscribe("paku/pk-a/cmd")
            await gw.contexts["paku"].mqtt.publish("paku/pk-b/cmd", b'{"id": "for-b"}')
            await gw.contexts["paku"].mqtt.publish("paku/pk-a/cmd", b'{"id": "for-a"}')
            await wait_until(lambda: dev.received)
            assert [m.topic for m in dev.received] == ["paku/pk-a/cmd"]

            await dev.publish("paku/pk-b/telemetry", b'{"forged": true}')  # the broker drops it
            await dev.publish("paku/pk-a/telemetry", b'{"mine": true}')
            await wait_handled(gw, "paku/pk-a/telemetry")
        # Messages of one publisher reach the gateway in order: had the forged one got
        # through, it would have been received before pk-a's.
        assert deliveries(gw, "paku/pk-b/#") == []
        r = await client.get("/metrics")
        assert 'gatewayd_mqtt_messages_total{outcome="handled"} 1' in r.text
        assert (await device_view(client, "pk-b"))["telemetry"] is None
        assert await rejected_messages(gw) == []


async def test_malformed_json_is_rejected_and_recorded_without_harming_the_next(gateway_factory):
    async with gateway_factory(plugins=PAKU, mqtt=True) as gw, gw_client(gw) as client:
        async with device_mqtt(await provision(gw, "paku", "pk-1")) as dev:
            await dev.publish("paku/pk-1/telemetry", b'{"temp_c": 21.5,')
            await dev.publish("paku/pk-1/telemetry", b'{"temp_c": 22.0}')
            await wait_handled(gw, "paku/pk-1/telemetry")
        [(topic, reason, *_)] = await rejected_messages(gw)
        assert topic == "paku/pk-1/telemetry" and reason.startswith("payload: not JSON (Expecting")
        r = await client.get("/paku/devices/pk-1/telemetry", headers=AUTH)
        assert [m["payload"] for m in r.json()["telemetry"]] == [{"temp_c": 22.0}]
        r = await client.get("/metrics")
        assert 'gatewayd_paku_messages_total{kind="telemetry",outcome="rejected"} 1' in r.text

        # A device the registry does not know is rejected too. Only the gateway's own
        # account may write there (devices log in through the edge, which refuses that
        # account), so the message comes in through mosquitto.
        await gw.contexts["paku"].mqtt.publish("paku/ghost/telemetry", b'{"t": 1}')
        await wait_handled(gw, "paku/ghost/telemetry", verdict="rejected")
        assert (await rejected_messages(gw))[1][:2] == ("paku/ghost/telemetry",
                                                        "unknown device 'ghost': not registered in family paku")
