"""What kaiabc's gateway tests share: the plugin, the admin token, the spec's bodies."""

from __future__ import annotations

import gatewayd_kaiabc

TOKEN = "kaiabc-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KAIABC = [("kaiabc", gatewayd_kaiabc)]
V1 = "/kaiabc/v1"
PICO_KEY = "kaiabc_node_pico_001"  # the spec's, as flashed in its Pico client
FAST = ["plugins.kaiabc.tick_s=0.05", "plugins.kaiabc.time_acceleration=3600",  # an hour per wall second
        "plugins.kaiabc.queries_per_minute=100000"]  # tests poll


def pico(node_id: str = "pico_001", **more) -> dict:
    return {"node_id": node_id, "name": "Pico Lab Node 1", "hardware_type": "raspberry_pi_pico",
            "runtime": "micropython", "sensor_types": ["temperature", "humidity", "pressure"],
            "location": "Lab Bench 3", **more}


async def register(client, node_id: str = "pico_001", **more) -> str:
    """POST /sensors/nodes as a person; the node's new key."""
    r = await client.post(f"{V1}/sensors/nodes", headers=AUTH, json=pico(node_id, **more))
    assert r.status_code == 201, r.text
    return r.json()["api_key"]
