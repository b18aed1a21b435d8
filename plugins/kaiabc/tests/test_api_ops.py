"""Bulk operations, diagnostics and configuration routes, against a real gateway."""

import pytest
from kaiabc_testbed import AUTH, KAIABC, V1, register

from gatewayd.testing import gw_client
from test_api_sensors import error


async def test_bulk_readings_and_states(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        key = await register(client)
        await register(client, "elm11_002", hardware_type="elm11", runtime="lua")
        r = await client.post(f"{V1}/bulk/sensor-readings", headers=AUTH, json={"readings": [
            {"node_id": "pico_001", "timestamp": "2025-10-06T12:00:00Z", "temperature_kelvin": 298.65,
             "humidity_percent": 45.2, "pressure_pa": 101325},
            {"node_id": "elm11_002", "timestamp": "2025-10-06T12:00:00Z", "temperature_kelvin": 299.10,
             "light_lux": 850},
            {"node_id": "ghost", "timestamp": "2025-10-06T12:00:00Z", "temperature_kelvin": 299.10}]})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["accepted"] == 2 and doc["rejected"] == 1 and doc["processing_time_ms"] >= 0
        assert doc["results"][0] == {"node_id": "pico_001", "status": "processed", "filtered_temperature": 298.65}
        assert doc["results"][1]["filtered_temperature"] == pytest.approx(299.10)
        assert doc["results"][2] == {"node_id": "ghost", "status": "rejected", "error": "NODE_NOT_FOUND"}
        body = error(await client.post(f"{V1}/bulk/sensor-readings", headers=AUTH, json={"readings": [
            {"node_id": "pico_001", "timestamp": "2025-10-06T12:00:01Z", "temperature_kelvin": 350.0}]}),
            400, "INVALID_PARAMETER")
        assert body["details"]["parameter"] == "readings[0].temperature_kelvin"
        # a node may send its own readings in bulk, not another's
        r = await client.post(f"{V1}/bulk/sensor-readings", headers={"X-API-Key": key}, json={"readings": [
            {"node_id": "pico_001", "timestamp": "2025-10-06T12:00:02Z", "temperature_kelvin": 298.7}]})
        assert r.json()["accepted"] == 1
        r = await client.post(f"{V1}/bulk/sensor-readings", headers={"X-API-Key": key}, json={"readings": [
            {"node_id": "pico_001", "timestamp": "2025-10-06T12:00:03Z", "temperature_kelvin": 298.7},
            {"node_id": "elm11_002", "timestamp": "2025-10-06T12:00:03Z", "temperature_kelvin": 298.7}]})
        error(r, 403, "PERMISSION_DENIED")

        r = await client.post(f"{V1}/bulk/oscillator-states", headers=AUTH,
                              json={"node_ids": ["pico_001", "elm11_002", "pico_003"], "detail_level": "minimal"})
        states = r.json()["states"]
        assert states["pico_003"] == {"error": "node_not_found"}
        assert states["elm11_002"]["error"] == "node_offline"  # registered by a person, never heard from
        assert states["pico_001"]["status"] == "online" and 0 <= states["pico_001"]["circadian_time"] < 24
        assert set(states["pico_001"]) == {"circadian_time", "phase", "koa_metric", "output_pwm", "status"}


async def test_diagnostics(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        await register(client)
        await client.post(f"{V1}/filter/reset", headers=AUTH, json={"node_id": "pico_001", "reason": "recal"})
        doc = (await client.get(f"{V1}/diagnostics/performance", headers=AUTH)).json()
        assert set(doc) == {"server", "oscillator", "database", "network"}
        assert doc["server"]["memory_usage_mb"] > 0 and doc["oscillator"]["active_nodes"] == 1
        assert doc["database"]["query_latency_ms"] > 0 and doc["network"]["requests_per_second"] > 0
        logs = (await client.get(f"{V1}/diagnostics/logs", headers=AUTH, params={"node_id": "pico_001"})).json()
        assert [entry["message"] for entry in logs["logs"]] == ["filter reset", "node registered"]
        assert logs["logs"][0]["details"] == {"reason": "recal"} and logs["pagination"]["has_next"] is False
        page = (await client.get(f"{V1}/diagnostics/logs", headers=AUTH, params={"limit": 1})).json()
        assert page["pagination"]["has_next"] is True
        rest = (await client.get(f"{V1}/diagnostics/logs", headers=AUTH,
                                 params={"limit": 1, "cursor": page["pagination"]["next_cursor"]})).json()
        assert rest["logs"][0]["message"] == "node registered"
        assert (await client.get(f"{V1}/diagnostics/logs", headers=AUTH, params={"level": "warning"})).json()[
            "logs"] == []
        r = await client.post(f"{V1}/diagnostics/health-check", headers=AUTH,
                              json={"components": ["database", "oscillator"], "detailed": True})
        doc = r.json()
        assert doc["overall_status"] == "healthy" and set(doc["checks"]) == {"database", "oscillator"}
        assert doc["checks"]["oscillator"]["stability_check"] == "passed"
        error(await client.post(f"{V1}/diagnostics/health-check", headers=AUTH, json={"components": ["disk"]}),
              400, "INVALID_PARAMETER")
        error(await client.get(f"{V1}/diagnostics/performance"), 401, "AUTHENTICATION_FAILED")


async def test_config_templates_and_validate(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        doc = (await client.get(f"{V1}/config/templates", params={"hardware_type": "elm11", "runtime": "lua"})).json()
        t = doc["templates"]
        assert t["sensor_config"]["kalman_filter"]["process_noise"] == {"temperature": 0.01, "humidity": 0.02,
                                                                         "pressure": 0.05}
        assert t["network_config"]["api_base"].endswith("/kaiabc/v1")
        assert t["oscillator_config"]["pwm_frequency_hz"] == 1000
        r = await client.post(f"{V1}/config/validate", headers=AUTH, json={"node_id": None, "config": {
            "sensor": {"bme280": {"i2c_address": "0x76", "oversampling": {"temperature": 4, "humidity": 4,
                                                                          "pressure": 4}}},
            "network": {"wifi": {"ssid": "MyNetwork", "password": "secret123"}}}})
        doc = r.json()
        assert doc["valid"] is True and doc["errors"] == []
        assert doc["warnings"][0] == {"field": "sensor.bme280.oversampling.temperature",
                                      "message": "High oversampling may increase power consumption",
                                      "suggestion": "Consider reducing to 2 for battery-powered applications"}
        assert doc["optimizations"] == [{"field": "network.wifi", "message": "WiFi credentials validated successfully"}]
        r = await client.post(f"{V1}/config/validate", headers=AUTH, json={"config": {
            "sensor": {"bme280": {"i2c_address": "0x99"}}, "network": {"wifi": {"ssid": "x", "password": "short"}}}})
        doc = r.json()
        assert doc["valid"] is False and {e["field"] for e in doc["errors"]} == {"sensor.bme280.i2c_address",
                                                                                "network.wifi.password"}
        # A node_id that is not registered is the spec's NODE_NOT_FOUND, and the document says so
        # (schemathesis found the 404 undeclared).
        r = await client.post(f"{V1}/config/validate", headers=AUTH, json={"node_id": "nobody", "config": {}})
        assert r.status_code == 404 and r.json()["error"]["code"] == "NODE_NOT_FOUND", r.text
        operation = (await client.get("/kaiabc/openapi.json", headers=AUTH)).json()["paths"]["/kaiabc/v1/config/validate"]["post"]
        assert "404" in operation["responses"]
