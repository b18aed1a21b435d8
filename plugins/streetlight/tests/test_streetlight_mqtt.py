"""The MQTT alternative (section 4) against a real gateway and its managed mosquitto."""

from __future__ import annotations

import json
import time

from streetlight_testbed import ADMIN, BASE, IMEI, PLUGIN, bearer, command, configure

from gatewayd.testing import MQTTLogin, device_mqtt, gw_client, provision, rejected_messages, wait_handled, wait_until


async def test_configure_hands_out_the_mqtt_login_and_commands_are_pushed(gateway_factory, upstream_receiver):
    async with gateway_factory(plugins=PLUGIN, mqtt=True, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        answer = await configure(client)
        assert answer["mqtt_enabled"] is True and answer["mqtt_username"] == "SL001"
        assert answer["topics"] == {"subscribe": "devices/SL001/commands", "publish": "devices/SL001/status"}
        login = MQTTLogin(answer["mqtt_broker"], answer["mqtt_port"], answer["mqtt_username"], answer["mqtt_password"])
        async with device_mqtt(login) as light:
            await light.subscribe("devices/SL001/commands")
            await light.publish("devices/SL001/status", json.dumps(
                {"light_id": "SL001", "status": "on", "brightness": 85, "battery": 95,
                 "timestamp": "2025-12-17T10:30:46Z"}))
            await wait_handled(gw, "devices/+/status")
            started = time.monotonic()
            queued = await command(client, IMEI, {"command_type": "power_control", "action": "off"})
            await wait_until(lambda: light.received, what="the pushed command")
            pushed_after = time.monotonic() - started
            doc = json.loads(light.received[0].payload)
            assert doc["command_id"] == queued["id"] and doc["command_type"] == "power_control"
            assert doc["action"] == "off" and doc["priority"] == "high" and doc["timestamp"] == doc["requested_at"]
            assert pushed_after < 2.0  # ~100 ms here; generous for a loaded CI machine
            # a light that polls (its MQTT link lost) gets the same command, not yet acknowledged
            auth = bearer(answer["device_token"])
            polled = (await client.get(f"{BASE}/{IMEI}/commands", headers=auth)).json()["commands"]
            assert polled == [{k: v for k, v in doc.items() if k != "timestamp"}]
            # ... once: it is not pushed to a light that polls, nor handed out again before command_redeliver_s
            assert (await client.get(f"{BASE}/{IMEI}/commands", headers=auth)).json()["commands"] == []
            r = await client.post(f"{BASE}/{IMEI}/command-ack", headers=auth,
                                  json={"command_id": doc["command_id"], "status": "executed"})
            assert r.json()["command_status"] == "executed"
            # another light's topics are out of reach (the ACL): its status is never handled
            await light.publish("devices/SL999/status", json.dumps({"status": "on"}))
            await light.publish("devices/SL001/status", b"{not json")
            await wait_handled(gw, "devices/SL001/status", verdict="rejected")
            assert not [m for m in await rejected_messages(gw) if m.topic == "devices/SL999/status"]
        records = await upstream_receiver.wait_for(3)
        mqtt_status = [r for r in records if r["kind"] == "status"]
        assert mqtt_status and mqtt_status[0]["data"]["status"] == {"power_state": "on", "brightness": 85,
                                                                    "battery_percentage": 95, "error_flags": []}


async def test_a_light_in_http_fallback_gets_the_command_by_poll(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, mqtt=True) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        answer = await configure(client)
        queued = await command(client, IMEI, {"command_type": "brightness_control", "brightness_level": 40})
        r = await client.get(f"{BASE}/{IMEI}/commands", headers=bearer(answer["device_token"]))
        assert [c["command_id"] for c in r.json()["commands"]] == [queued["id"]]
        stored = (await client.get(f"/api/gateway/devices/{IMEI}/commands", headers=ADMIN)).json()["commands"]
        assert stored[0]["status"] == "delivered"
