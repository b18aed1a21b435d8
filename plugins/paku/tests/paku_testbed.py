"""What paku's tests share: the plugin, the admin token, and paku's own device API
(everything else comes from gatewayd.testing)."""

from __future__ import annotations

import json

import gatewayd_paku

TOKEN = "paku-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAKU = [("paku", gatewayd_paku)]


async def provision_over_http(client, device_id: str, **fields) -> dict:
    """POST /paku/devices: the device, its MQTT login and topics (paku's answer)."""
    r = await client.post("/paku/devices", headers=AUTH, json={"id": device_id, **fields})
    assert r.status_code == 201, r.text
    return r.json()


async def device_view(client, device_id: str) -> dict:
    r = await client.get(f"/paku/devices/{device_id}", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


async def stored_rows(gw) -> dict:
    """paku's telemetry and event rows, oldest first (payloads decoded)."""
    from gatewayd_paku.models import Event, Measurement

    def query() -> dict:
        return {"telemetry": [json.loads(m.payload) for m in Measurement.select().order_by(Measurement.id)],
                "events": [(e.type, json.loads(e.payload)) for e in Event.select().order_by(Event.id)]}

    return await gw.contexts["paku"].storage.read(query)
