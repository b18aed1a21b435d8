"""Readings over MQTT (the spec's optional path, per-node ACL) and JSON lines on a UART
(a pty pair standing in for a Pico), into the same pipeline."""

import json
import os

import trio
from kaiabc_testbed import AUTH, KAIABC, PICO_KEY, V1, pico

from gatewayd.testing import device_mqtt, gw_client, provision, rejected_messages, wait_handled


async def filter_count(client, node="pico_001"):
    r = await client.get(f"{V1}/filter/state", headers=AUTH, params={"node_id": node})
    return r.json()["measurement_count"]


async def test_mqtt_readings_with_the_nodes_own_acl(gateway_factory):
    async with gateway_factory(plugins=KAIABC, mqtt=True) as gw, gw_client(gw) as client:
        creds = await provision(gw, "kaiabc", "pico_001", key=PICO_KEY)
        other = await provision(gw, "kaiabc", "pico_002", key="kaiabc_node_pico_002x")
        for node, key in (("pico_001", PICO_KEY), ("pico_002", "kaiabc_node_pico_002x")):
            r = await client.post(f"{V1}/sensors/nodes", headers={"X-API-Key": key}, json=pico(node))
            assert r.status_code == 201, r.text
        async with device_mqtt(creds) as dev:
            await dev.publish("kaiabc/sensors/pico_001", json.dumps({"node_id": "pico_001", "readings": [
                {"timestamp": "2025-10-06T12:00:00Z", "temperature_kelvin": 298.65, "humidity_percent": 45.2}]}))
            await wait_handled(gw, "kaiabc/sensors/pico_001")
            assert await filter_count(client) == 1
            await dev.publish("kaiabc/sensors/pico_001", json.dumps({"node_id": "pico_001",
                                                                     "temperature_kelvin": 400.0}))
            await wait_handled(gw, "kaiabc/sensors/pico_001", verdict="rejected")
            # another node's topic: the broker's ACL drops it before the gateway sees it
            await dev.publish("kaiabc/sensors/pico_002", json.dumps({"node_id": "pico_002",
                                                                     "temperature_kelvin": 300.0}))
        async with device_mqtt(other) as dev:
            await dev.publish("kaiabc/sensors/pico_002", json.dumps({"node_id": "pico_002",
                                                                     "temperature_kelvin": 300.0}))
            await wait_handled(gw, "kaiabc/sensors/pico_002")
        assert await filter_count(client, "pico_002") == 1  # its own only, not pico_001's attempt
        reasons = [m.reason for m in await rejected_messages(gw)]
        assert any("temperature_kelvin" in r and "range" in r for r in reasons)


async def test_a_pico_on_a_uart(gateway_factory):
    master, slave = os.openpty()
    try:
        settings = [f"plugins.kaiabc.serial.port='{os.ttyname(slave)}'"]
        async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
            r = await client.post(f"{V1}/sensors/nodes", headers=AUTH, json=pico())
            assert r.status_code == 201
            os.set_blocking(master, False)

            async def answer():
                data = b""
                with trio.fail_after(10):
                    while not data.endswith(b"\n"):
                        try:
                            data += os.read(master, 4096)
                        except BlockingIOError:
                            await trio.sleep(0.02)
                return json.loads(data)

            async def sent(line: bytes):
                os.write(master, line)
                return await answer()

            # (bytes written before the link opens wait in the pty, as on a real UART's buffer)
            doc = await sent(b'{"node_id": "pico_001", "temperature_kelvin": 299.5}\n')
            assert doc["node_id"] == "pico_001" and doc["accepted"] == 1 and 0 <= doc["output_pwm"] <= 255
            doc = await sent(b'{"node_id": "pico_001", "temperature_kelvin": NaN}\n')
            assert doc["error"]["code"] == "INVALID_PARAMETER"
            doc = await sent(b'{"node_id": "ghost", "temperature_kelvin": 299.5}\n')
            assert "not registered" in doc["error"]["message"]
            assert await filter_count(client) == 1
    finally:
        os.close(master)
        os.close(slave)
