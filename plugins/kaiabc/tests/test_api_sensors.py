"""Health, node registration, readings and the live oscillator, against a real gateway."""

import pytest
from kaiabc_testbed import AUTH, FAST, KAIABC, PICO_KEY, V1, pico, register

from gatewayd.testing import gw_client, provision, wait_until


def error(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code and body["message"] and body["request_id"].startswith("req_")
    assert body["timestamp"].endswith("Z")
    return body


async def test_health_counts_nodes(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        r = await client.get(f"{V1}/health")
        assert r.status_code == 200 and r.headers["X-API-Version"] == "1.0.0"
        doc = r.json()
        assert doc["status"] == "healthy" and doc["components"]["ode_solver"] == "operational"
        assert doc["components"]["sensor_nodes"] == {"connected": 0, "total": 0}
        key = await register(client)
        r = await client.post(f"{V1}/sensors/temperature", headers={"X-API-Key": key},
                              json={"node_id": "pico_001", "temperature_kelvin": 298.65})
        assert r.status_code == 200, r.text
        doc = (await client.get(f"{V1}/health")).json()
        assert doc["components"]["sensor_nodes"] == {"connected": 1, "total": 1}


async def test_register_by_a_person_then_409_and_listed(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        error(await client.post(f"{V1}/sensors/nodes", json=pico()), 401, "AUTHENTICATION_FAILED")
        r = await client.post(f"{V1}/sensors/nodes", headers=AUTH, json=pico(calibration={"temperature_offset": 0.5}))
        assert r.status_code == 201, r.text
        doc = r.json()
        assert doc["success"] is True and doc["node_id"] == "pico_001"
        assert doc["hardware_type"] == "raspberry_pi_pico" and doc["mqtt_topic"] == "kaiabc/sensors/pico_001"
        assert doc["api_key"].startswith("kaiabc_node_")
        error(await client.post(f"{V1}/sensors/nodes", headers=AUTH, json=pico()), 409, "CONFLICT")
        await register(client, "elm11_002", hardware_type="elm11", runtime="lua")
        error(await client.get(f"{V1}/sensors/nodes"), 401, "AUTHENTICATION_FAILED")
        r = await client.get(f"{V1}/sensors/nodes", headers=AUTH, params={"limit": 1})
        page = r.json()
        assert [n["node_id"] for n in page["nodes"]] == ["elm11_002"] and page["pagination"]["has_next"]
        assert page["nodes"][0]["status"] == "offline" and page["nodes"][0]["runtime"] == "lua"
        r = await client.get(f"{V1}/sensors/nodes", headers=AUTH,
                             params={"limit": 1, "cursor": page["pagination"]["next_cursor"]})
        assert [n["node_id"] for n in r.json()["nodes"]] == ["pico_001"]
        pagination = r.json()["pagination"]
        assert pagination.pop("prev_cursor") is not None  # back to the first page (tests/test_paging.py)
        assert pagination == {"has_next": False, "has_prev": True, "next_cursor": None, "total_count": 2, "limit": 1}


async def test_a_node_registers_itself_with_its_flashed_key(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        await provision(gw, "kaiabc", "pico_001", key=PICO_KEY)  # gatewayd devices add --key-env
        r = await client.post(f"{V1}/sensors/nodes", headers={"X-API-Key": "kaiabc_node_wrong_key_00"}, json=pico())
        error(r, 401, "AUTHENTICATION_FAILED")
        r = await client.post(f"{V1}/sensors/nodes", headers={"X-API-Key": PICO_KEY}, json=pico())
        assert r.status_code == 201 and r.json()["api_key"] == PICO_KEY
        r = await client.post(f"{V1}/sensors/nodes", headers={"X-API-Key": PICO_KEY}, json=pico())
        error(r, 409, "CONFLICT")
        # the key is scoped to its node
        other = await register(client, "pico_002")
        r = await client.post(f"{V1}/sensors/temperature", headers={"X-API-Key": other},
                              json={"node_id": "pico_001", "temperature_kelvin": 298.65})
        assert r.status_code in (401, 403) and r.json()["error"]["code"] in ("AUTHENTICATION_FAILED",
                                                                               "PERMISSION_DENIED")


async def test_readings_are_filtered_and_drive_the_oscillator(gateway_factory):
    async with gateway_factory(plugins=KAIABC, settings=FAST) as gw, gw_client(gw) as client:
        key = await register(client)
        node = {"X-API-Key": key}
        r = await client.post(f"{V1}/sensors/temperature", headers=node, json={
            "node_id": "pico_001", "timestamp": "2025-10-06T12:00:00.123Z", "temperature_kelvin": 298.65,
            "raw_value": 25.5, "sensor_type": "BME280", "quality": "good"})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["accepted"] is True and doc["filtered_value"] == pytest.approx(298.65)
        assert doc["kalman_variance"] > 0 and doc["message"] == "Sensor data processed"
        r = await client.post(f"{V1}/sensors/batch", headers=node, json={"node_id": "pico_001", "readings": [
            {"timestamp": "2025-10-06T12:00:01.000Z", "temperature_kelvin": 298.66, "humidity_percent": 45.2,
             "pressure_pa": 101325},
            {"timestamp": "2025-10-06T12:00:02.000Z", "temperature_kelvin": 298.70, "humidity_percent": 45.3,
             "pressure_pa": 101326}]})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["accepted"] == 2 and doc["rejected"] == 0
        assert 298.65 < doc["latest_filtered"]["temperature_kelvin"] < 298.70
        assert doc["latest_filtered"]["humidity_percent"] == pytest.approx(45.25, abs=0.05)
        # the same batch again: nothing newer, nothing stored
        r = await client.post(f"{V1}/sensors/batch", headers=node, json={"node_id": "pico_001", "readings": [
            {"timestamp": "2025-10-06T12:00:02.000Z", "temperature_kelvin": 298.70}]})
        assert r.json()["accepted"] == 0 and r.json()["rejected"] == 1

        first = (await client.get(f"{V1}/oscillator/state", headers=node, params={"node_id": "pico_001"})).json()
        assert set(first) >= {"timestamp", "circadian_time", "phase", "period_hours", "state_variables",
                              "koa_metric", "output_pwm", "entrainment_active", "temperature_kelvin"}
        assert set(first["state_variables"]) == {"C_U", "C_S", "C_T", "C_ST", "A_free", "CABC_complex"}
        assert 0 <= first["output_pwm"] <= 255 and first["entrainment_active"] is True
        assert first["temperature_kelvin"] == pytest.approx(298.68, abs=0.03)
        assert first["period_hours"] == pytest.approx(20.71, abs=0.01)

        async def moved():
            doc = (await client.get(f"{V1}/oscillator/state", headers=node,
                                    params={"node_id": "pico_001", "detail_level": "full"})).json()
            return doc if doc["simulated_hours"] > 2 else None

        later = await wait_until(moved, what="the oscillator advanced two simulated hours")
        assert later["circadian_time"] != first["circadian_time"]
        minimal = (await client.get(f"{V1}/oscillator/state", headers=node,
                                    params={"node_id": "pico_001", "detail_level": "minimal"})).json()
        assert "state_variables" not in minimal and 0 <= minimal["output_pwm"] <= 255


@pytest.mark.parametrize("reading, parameter", [
    ({"temperature_kelvin": 400.0}, "temperature_kelvin"),
    ({"temperature_kelvin": 200.0}, "temperature_kelvin"),
    ({"temperature_kelvin": "hot"}, "temperature_kelvin"),
    ({"temperature_kelvin": 300.0, "timestamp": "yesterday"}, "timestamp"),
    ({"temperature_kelvin": 300.0, "colour": "red"}, "colour"),
])
async def test_bad_readings_are_400_invalid_parameter_and_store_nothing(gateway_factory, reading, parameter):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        key = await register(client)
        r = await client.post(f"{V1}/sensors/temperature", headers={"X-API-Key": key},
                              json={"node_id": "pico_001", **reading})
        body = error(r, 400, "INVALID_PARAMETER")
        assert parameter in body["details"]["parameter"]
        assert (body["path"], body["method"]) == (f"{V1}/sensors/temperature", "POST")
        if reading["temperature_kelvin"] in (400.0, 200.0):
            assert body["details"] == {"parameter": "temperature_kelvin", "provided": reading["temperature_kelvin"],
                                       "valid_range": [273.15, 323.15]}
        r = await client.post(f"{V1}/sensors/batch", headers={"X-API-Key": key},
                              json={"node_id": "pico_001", "readings": [
                                  {"timestamp": "2025-10-06T12:00:00Z", "temperature_kelvin": 300.0},
                                  {"timestamp": "2025-10-06T12:00:01Z", **reading}]})
        assert parameter in error(r, 400, "INVALID_PARAMETER")["details"]["parameter"]
        state = (await client.get(f"{V1}/oscillator/state", headers={"X-API-Key": key},
                                  params={"node_id": "pico_001", "detail_level": "full"})).json()
        assert state["filter"]["measurement_count"] == 0  # nothing of either was kept


async def test_nan_and_malformed_json_are_invalid_parameter(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        key = await register(client)
        for raw in (b'{"node_id": "pico_001", "temperature_kelvin": NaN}', b'{"node_id": "pico_001", ',
                    b'{"node_id": "pico_001", "temperature_kelvin": Infinity}'):
            r = await client.post(f"{V1}/sensors/temperature", content=raw,
                                  headers={"X-API-Key": key, "Content-Type": "application/json"})
            error(r, 400, "INVALID_PARAMETER")


async def test_unknown_node_and_unknown_query_parameter(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        error(await client.get(f"{V1}/oscillator/state", headers=AUTH, params={"node_id": "nobody"}),
              404, "NODE_NOT_FOUND")
        error(await client.get(f"{V1}/oscillator/state", headers=AUTH, params={"node": "x"}),
              400, "INVALID_PARAMETER")


async def test_oscillators_resume_after_a_restart(gateway_factory, tmp_path):
    settings = FAST + [f"gateway.data_dir='{tmp_path}/data'", "plugins.kaiabc.persist_every_s=0.1"]
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        key = await register(client)
        await client.post(f"{V1}/sensors/temperature", headers={"X-API-Key": key},
                          json={"node_id": "pico_001", "temperature_kelvin": 305.0})

        async def advanced():
            doc = (await client.get(f"{V1}/oscillator/state", headers={"X-API-Key": key},
                                    params={"node_id": "pico_001", "detail_level": "full"})).json()
            return doc if doc["simulated_hours"] > 3 else None

        before = await wait_until(advanced, what="three simulated hours")
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        after = (await client.get(f"{V1}/oscillator/state", headers={"X-API-Key": key},
                                  params={"node_id": "pico_001", "detail_level": "full"})).json()
        assert after["simulated_hours"] >= before["simulated_hours"]  # resumed, not reset to CT 0
        assert after["temperature_kelvin"] == pytest.approx(305.0)
        assert after["filter"]["measurement_count"] == 1


async def test_the_filter_resumes_its_estimate_and_covariance_after_a_restart(gateway_factory, tmp_path):
    settings = FAST + [f"gateway.data_dir='{tmp_path}/data'"]
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        key = await register(client)
        readings = [{"timestamp": f"2026-01-01T00:00:{m:02d}Z", "temperature_kelvin": 300.0 + 0.3 * (m % 3),
                     "humidity_percent": 40.0 + m % 2} for m in range(30)]
        r = await client.post(f"{V1}/sensors/batch", headers={"X-API-Key": key},
                              json={"node_id": "pico_001", "readings": readings})
        assert r.status_code == 200 and r.json()["accepted"] == 30, r.text
        before = (await client.get(f"{V1}/filter/state", headers=AUTH, params={"node_id": "pico_001"})).json()
    # a fresh filter would start at the measurement noise (0.05): 30 readings brought it well below
    assert before["covariance_matrix"][0][0] < 0.03
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        after = (await client.get(f"{V1}/filter/state", headers=AUTH, params={"node_id": "pico_001"})).json()
    for key_ in ("state_estimate", "covariance_matrix", "innovation", "measurement_count"):
        assert after[key_] == before[key_], key_


async def test_rate_limit_is_the_specs_429_with_headers(gateway_factory):
    settings = ["plugins.kaiabc.queries_per_minute=3"]
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        key = await register(client)
        for _ in range(3):
            r = await client.get(f"{V1}/oscillator/state", headers={"X-API-Key": key}, params={"node_id": "pico_001"})
            assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "3"
        assert r.headers["X-RateLimit-Remaining"] == "0" and int(r.headers["X-RateLimit-Reset"]) > 0
        r = await client.get(f"{V1}/oscillator/state", headers={"X-API-Key": key}, params={"node_id": "pico_001"})
        body = error(r, 429, "RATE_LIMIT_EXCEEDED")
        assert body["message"] == "Rate limit of 3 requests per minute exceeded" and body["retry_after_seconds"] > 0
        # ingestion is a class of its own
        r = await client.post(f"{V1}/sensors/temperature", headers={"X-API-Key": key},
                              json={"node_id": "pico_001", "temperature_kelvin": 300.0})
        assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "100"


async def test_node_ids_that_share_a_stream_name_are_refused(gateway_factory):
    """Live streams write '.' in a node id as '_': `pico.1` and `pico_1` would be one stream."""
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        await register(client, "pico.1")
        r = await client.post(f"{V1}/sensors/nodes", headers=AUTH, json=pico("pico_1"))
        body = error(r, 409, "CONFLICT")
        assert body["details"] == {"parameter": "node_id", "provided": "pico_1", "conflicts_with": "pico.1"}
        assert "'pico_1'" in body["message"] and "pico.1" in body["message"]
        r = await client.get(f"{V1}/sensors/nodes", headers=AUTH)
        assert [n["node_id"] for n in r.json()["nodes"]] == ["pico.1"]
        await register(client, "pico-1")  # '-' is no '.': a stream of its own


async def test_readings_past_their_retention_are_pruned_in_parts(gateway_factory):
    """`readings_retention_days` (here 1): older readings go, part by part (3 rows a
    statement here), the newer stay."""
    settings = ["plugins.kaiabc.readings_retention_days=1"]
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        await register(client, "pico_001")
        ctx = gw.contexts["kaiabc"]
        store, now = ctx.state.store, ctx.now()
        ages_days = [3, 2.5, 2, 1.5, 1.01, 0.99, 0.5, 0.0, 2, 0.1, 1.2]  # stored in this order (id order)
        await ctx.storage.write(store.add_readings, [
            {"node_id": "pico_001", "ts": now - 86400 * age, "received_at": now - 86400 * age,
             "temperature_k": 298.0 + i} for i, age in enumerate(ages_days)])

        def kept() -> list[float]:
            return [r.temperature_k - 298.0 for r in store.reading.select().order_by(store.reading.id)]

        assert await ctx.state.prune_readings(part=3) == 5
        # 8 (2 days) and 10 (1.2 days) were stored after newer readings (a clock set back):
        # they wait for the rows before them, as the part reads only the oldest ids.
        assert await ctx.storage.read(kept) == [5, 6, 7, 8, 9, 10]
        assert await ctx.state.prune_readings(part=3) == 0
        reading = store.reading
        await ctx.storage.write(lambda: reading.update(received_at=now - 2 * 86400)
                                .where(reading.temperature_k.in_([303.0, 304.0, 305.0])).execute())
        assert await ctx.state.prune_readings(part=3) == 5
        assert await ctx.storage.read(kept) == [9]
        assert await ctx.storage.write(store.prune_readings, now + 86400, 3) == 1


async def test_no_limit_cycle_is_computed_until_a_node_is_registered(gateway_factory):
    # The limit cycle needs scipy.integrate (~35 MB of RSS): a site with no kaiabc node yet
    # does not pay for it (issue 21, the small profile). The first registration computes it,
    # and the node starts on it (CT 0), as before.
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        fleet = gw.contexts["kaiabc"].state.fleet
        assert (await client.get(f"{V1}/health")).json()["components"]["ode_solver"] == "operational"
        assert fleet.cycles == {} and fleet.cycle is None
        await register(client)
        assert fleet.cycle is not None
        i = fleet.index["pico_001"]
        assert list(fleet.y[:, i]) == list(fleet.cycle.state_at(0.0))
