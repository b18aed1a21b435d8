"""Analytics: period stability from the stored history, shift efficiency, streamed export."""

import csv
import io

import pytest
from kaiabc_testbed import AUTH, KAIABC, V1, register

from gatewayd.testing import gw_client, wait_until
from test_api_sensors import error

FASTER = ["plugins.kaiabc.tick_s=0.05", "plugins.kaiabc.time_acceleration=36000",  # 10 h per wall second
          "plugins.kaiabc.history_every_s=0.05", "plugins.kaiabc.queries_per_minute=100000"]


@pytest.mark.timeout(120)
async def test_period_stability_and_export(gateway_factory):
    async with gateway_factory(plugins=KAIABC, settings=FASTER) as gw, gw_client(gw) as client:
        key = await register(client)
        node = {"X-API-Key": key}
        r = await client.get(f"{V1}/analytics/period-stability", headers=node, params={"node_id": "pico_001"})
        error(r, 422, "INVALID_PARAMETER")

        async def cycles():
            r = await client.get(f"{V1}/analytics/period-stability", headers=node,
                                 params={"node_id": "pico_001", "days": 1})
            return r.json() if r.status_code == 200 and r.json()["statistics"]["cycles"] >= 3 else None

        doc = await wait_until(cycles, timeout=90, what="three simulated cycles of history")
        stats = doc["statistics"]
        assert stats["mean_period_hours"] == pytest.approx(20.71, abs=0.3)  # at the reference temperature
        assert stats["min_period_hours"] <= stats["mean_period_hours"] <= stats["max_period_hours"]
        assert stats["q10_value"] == pytest.approx(1.0, abs=0.1)
        assert doc["quality_assessment"] in ("excellent", "good", "fair", "poor")

        r = await client.get(f"{V1}/analytics/export", headers=node,
                             params={"node_id": "pico_001", "format": "csv", "variables": "C_ST,temperature_kelvin"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        # streamed: sent in chunks as the pages are read, its length not known beforehand
        assert r.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.headers, r.headers
        rows = list(csv.reader(io.StringIO(r.text)))
        assert rows[0] == ["timestamp", "C_ST", "temperature_kelvin"] and len(rows) > 20
        assert all(float(row[2]) == 303.15 for row in rows[1:])
        r = await client.get(f"{V1}/analytics/export", headers=node, params={"node_id": "pico_001"})
        records = r.json()["records"]
        assert len(records) >= len(rows) - 1 and set(records[0]) >= {"timestamp", "simulated_hours", "koa"}
        error(await client.get(f"{V1}/analytics/export", headers=node,
                               params={"node_id": "pico_001", "format": "hdf5"}), 400, "INVALID_PARAMETER")
        error(await client.get(f"{V1}/analytics/export", headers=node,
                               params={"node_id": "pico_001", "variables": "mood"}), 400, "INVALID_PARAMETER")


async def test_entrainment_efficiency_without_shifts(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        await register(client)
        doc = (await client.get(f"{V1}/analytics/entrainment-efficiency", headers=AUTH,
                                params={"node_id": "pico_001"})).json()
        assert doc == {"node_id": "pico_001", "recent_shifts": [], "average_efficiency": None, "recommendations": []}
        error(await client.get(f"{V1}/analytics/entrainment-efficiency", headers=AUTH,
                               params={"node_id": "pico_001", "shift_id": "shift_x"}), 404, "NOT_FOUND")
