"""paku end to end: the gateway's managed mosquitto, devices logged in with their own
credentials, the HTTP API, the reference upstream receiver."""

import json

import pytest
import trio
from paku_testbed import (
    AUTH,
    PAKU,
    TOKEN,
    UPSTREAM_SECRET,
    device,
    device_view,
    free_port,
    managed_settings,
    provision,
    received,
    receiver,
    upstream_config,
    wait_for,
)

from gatewayd.core.mqtt.client import RejectedMessage
from gatewayd.testing import gw_client
from gatewayd.testing.mqtt import DeviceClient


@pytest.fixture(autouse=True)
def secrets(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("GATEWAYD_UPSTREAM_SECRET", UPSTREAM_SECRET)


async def rejected(gw) -> list[tuple[str, str]]:
    return await gw.storage.read(lambda: [(r.topic, r.reason) for r in RejectedMessage.select()])


async def test_device_connects_publishes_and_is_queryable(gateway_factory, tmp_path):
    """The spec's acceptance: connect, authenticate, publish; persisted and queryable;
    /health 200; and everything forwarded upstream in its class."""
    port = free_port()
    db = tmp_path / "cloud.sqlite3"
    with trio.fail_after(60):
        async with receiver(db) as url, gateway_factory(plugins=PAKU, settings=managed_settings(port),
                                                        config_text=upstream_config(url)) as gw:
            async with gw_client(gw) as client:
                creds = await provision(client, "pk-1", model="pk-a")
                assert creds["mqtt"]["port"] == port and creds["mqtt"]["host"] == "127.0.0.1"

                # A wrong password is refused by the broker.
                bad = DeviceClient("127.0.0.1", port, "pk-1", "wrong", "intruder")
                assert (await bad.connect()).is_failure
                await trio.to_thread.run_sync(bad.close)

                async with device(creds) as dev:
                    state = {"status": "online", "rssi": -61, "fwVersion": "1.1.0"}
                    await dev.publish("paku/pk-1/state", json.dumps(state), qos=0, retain=True)
                    await dev.publish("paku/pk-1/telemetry", json.dumps({"temp_c": 21.5, "hum": 40}))
                    await dev.publish("paku/pk-1/event/button", json.dumps({"press": "long"}))
                    await dev.publish("paku/pk-1/event/error", json.dumps({"code": 17}))

                    view = await wait_for(lambda: _with_data(client, "pk-1"))
                    assert view["telemetry"]["payload"] == {"temp_c": 21.5, "hum": 40}
                    assert view["state"]["online"] is True and view["state"]["rssi"] == -61
                    assert view["fwVersion"] == "1.1.0" and view["lastSeenAt"] is not None
                    assert view["status"] == "active"  # provisioned until it spoke

                    r = await client.get("/paku/devices/pk-1/telemetry", headers=AUTH)
                    assert [m["payload"]["temp_c"] for m in r.json()["telemetry"]] == [21.5]
                    r = await client.get("/paku/health")
                    assert r.status_code == 200 and r.json()["mqtt"]["connected"] is True
                    assert (await client.get("/health")).status_code == 200

                    records = await wait_for(lambda: len(received(db)) >= 4 and received(db))
                    classes = {(r["kind"], r["data"].get("type")): r["class"] for r in records}
                    assert classes == {("state", None): "state", ("telemetry", None): "history",
                                       ("event", "button"): "history", ("event", "error"): "alert"}
                    r = await client.get("/metrics")
                    assert 'gatewayd_paku_messages_total{kind="telemetry",outcome="stored"} 1' in r.text
                    assert 'gatewayd_paku_messages_total{kind="event",outcome="stored"} 2' in r.text


async def _with_data(client, device_id):
    view = await device_view(client, device_id)
    return view if view["telemetry"] and view["state"] and view["fwVersion"] else None


async def test_command_round_trip(gateway_factory):
    port = free_port()
    with trio.fail_after(60):
        async with gateway_factory(plugins=PAKU, settings=managed_settings(port)) as gw, gw_client(gw) as client:
            creds = await provision(client, "pk-1")
            async with device(creds) as dev:
                assert (await dev.subscribe("paku/pk-1/cmd"))[0].value == 1
                await dev.publish("paku/pk-1/state", b'{"status": "online"}', qos=0, retain=True)
                await wait_for(lambda: _state_seen(client, "pk-1"))

                r = await client.post("/api/gateway/devices/pk-1/commands", headers=AUTH,
                                      json={"payload": {"action": "blink", "times": 3}})
                assert r.status_code == 201, r.text
                command_id = r.json()["command"]["id"]
                await wait_for(lambda: dev.received)
                cmd = json.loads(dev.received[0].payload)
                assert cmd == {"action": "blink", "times": 3, "id": command_id}
                assert await _command_status(client, command_id) == "delivered"

                await dev.publish("paku/pk-1/event/ack", json.dumps({"id": command_id, "ok": True, "result": "done"}))
                await wait_for(lambda: _status_is(client, command_id, "executed"))

                # The other way to answer: a cmdAck field in the state.
                r = await client.post("/api/gateway/devices/pk-1/commands", headers=AUTH,
                                      json={"payload": {"action": "reboot"}})
                second = r.json()["command"]["id"]
                await wait_for(lambda: len(dev.received) == 2)
                ack = {"status": "online", "cmdAck": {"id": second, "ok": False, "result": "busy"}}
                await dev.publish("paku/pk-1/state", json.dumps(ack), qos=1, retain=True)
                await wait_for(lambda: _status_is(client, second, "failed"))
                r = await client.get("/metrics")
                assert 'gatewayd_paku_commands_total{result="published"} 2' in r.text
                assert 'gatewayd_paku_commands_total{result="executed"} 1' in r.text


async def _state_seen(client, device_id):
    return (await device_view(client, device_id))["state"] is not None


async def _command_status(client, command_id):
    r = await client.get("/api/gateway/devices/pk-1/commands", headers=AUTH)
    return {c["id"]: c["status"] for c in r.json()["commands"]}[command_id]


async def _status_is(client, command_id, status):
    return await _command_status(client, command_id) == status


async def test_a_device_cannot_use_another_devices_topics(gateway_factory):
    port = free_port()
    with trio.fail_after(60):
        async with gateway_factory(plugins=PAKU, settings=managed_settings(port)) as gw, gw_client(gw) as client:
            a = await provision(client, "pk-a")
            await provision(client, "pk-b")
            async with device(a) as dev:
                # mosquitto grants the subscription but never delivers what the ACL denies.
                await dev.subscribe("paku/pk-b/cmd")
                await dev.subscribe("paku/pk-a/cmd")
                await gw.contexts["paku"].mqtt.publish("paku/pk-b/cmd", b'{"id": "for-b"}')
                await gw.contexts["paku"].mqtt.publish("paku/pk-a/cmd", b'{"id": "for-a"}')
                await wait_for(lambda: dev.received)
                assert [m.topic for m in dev.received] == ["paku/pk-a/cmd"]

                await dev.publish("paku/pk-b/telemetry", b'{"forged": true}')  # the broker drops it
                await dev.publish("paku/pk-a/telemetry", b'{"mine": true}')
                await wait_for(lambda: _telemetry_of(client, "pk-a"))
            # Messages of one publisher reach the gateway in order: had the forged one got
            # through, it would have been received before pk-a's.
            r = await client.get("/metrics")
            assert 'gatewayd_mqtt_messages_total{outcome="handled"} 1' in r.text
            assert (await device_view(client, "pk-b"))["telemetry"] is None
            assert await rejected(gw) == []


async def _telemetry_of(client, device_id):
    return (await device_view(client, device_id))["telemetry"]


async def test_malformed_json_is_rejected_and_recorded_without_harming_the_next(gateway_factory):
    port = free_port()
    with trio.fail_after(60):
        async with gateway_factory(plugins=PAKU, settings=managed_settings(port)) as gw, gw_client(gw) as client:
            creds = await provision(client, "pk-1")
            async with device(creds) as dev:
                await dev.publish("paku/pk-1/telemetry", b'{"temp_c": 21.5,')
                await dev.publish("paku/pk-1/telemetry", b'{"temp_c": 22.0}')
                await wait_for(lambda: _telemetry_of(client, "pk-1"))
            [(topic, reason)] = await wait_for(lambda: rejected(gw))
            assert topic == "paku/pk-1/telemetry" and reason.startswith("payload: not JSON (Expecting")
            r = await client.get("/paku/devices/pk-1/telemetry", headers=AUTH)
            assert [m["payload"] for m in r.json()["telemetry"]] == [{"temp_c": 22.0}]
            r = await client.get("/metrics")
            assert 'gatewayd_paku_messages_total{kind="telemetry",outcome="rejected"} 1' in r.text

            # A device the registry does not know is rejected too. Only the gateway's own
            # account may write there (devices log in through the edge, which refuses that
            # account), so the message comes in through mosquitto.
            await gw.contexts["paku"].mqtt.publish("paku/ghost/telemetry", b'{"t": 1}')
            await wait_for(lambda: _count(rejected(gw), 2))
            assert (await rejected(gw))[1] == ("paku/ghost/telemetry",
                                               "unknown device 'ghost': not registered in family paku")


async def _count(rows, n):
    return len(await rows) >= n


async def test_messages_sent_while_the_gateway_was_stopped_arrive(gateway_factory, tmp_path, nursery, monkeypatch):
    """A persistent session: the broker keeps what devices publish while the gateway is down.

    The broker here is one the gateway does not manage (`mqtt.broker = "external"`), so it
    stays up while the gateway restarts on the same data_dir.
    """
    from gatewayd.core.mqtt.broker import AclTemplate
    from gatewayd.testing.mqtt import add_device_account, start_managed_broker

    acls = (AclTemplate("paku/%u/telemetry", "write"), AclTemplate("paku/%u/state", "write"),
            AclTemplate("paku/%u/event/#", "write"), AclTemplate("paku/%u/cmd", "read"))
    broker = await start_managed_broker(nursery, tmp_path / "broker", acl_templates=acls)
    user, password = broker.gateway_credentials()
    monkeypatch.setenv("PAKU_TEST_BROKER_PW", password)
    settings = ["mqtt.broker='external'", "mqtt.host='127.0.0.1'", f"mqtt.port={broker.port}",
                f"mqtt.username='{user}'", "mqtt.password_env='PAKU_TEST_BROKER_PW'"]
    with trio.fail_after(60):
        async with gateway_factory(plugins=PAKU, settings=settings) as gw, gw_client(gw) as client:
            creds = await provision(client, "pk-1")
            await wait_for(lambda: gw.mqtt.client is not None and gw.mqtt.client.connected)
        # The gateway is stopped; its session (and subscriptions) stay with the broker.
        add_device_account(broker, "pk-1", creds["mqtt"]["password"])
        creds["mqtt"]["port"] = broker.port
        async with device(creds) as dev:
            for i in range(3):
                await dev.publish("paku/pk-1/telemetry", json.dumps({"seq": i}))
        async with gateway_factory(plugins=PAKU, settings=settings) as gw, gw_client(gw) as client:
            await wait_for(lambda: _telemetry_count(client, 3))
            r = await client.get("/paku/devices/pk-1/telemetry", headers=AUTH)
            assert sorted(m["payload"]["seq"] for m in r.json()["telemetry"]) == [0, 1, 2]


async def _telemetry_count(client, n):
    r = await client.get("/paku/devices/pk-1/telemetry", headers=AUTH)
    return len(r.json()["telemetry"]) >= n
