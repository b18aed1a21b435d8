"""What the streetlight tests share: the plugin, a light's requests, the admin's commands."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
from typing import Any

import gatewayd_streetlight

PLUGIN = [("streetlight", gatewayd_streetlight)]
TOKEN = "streetlight-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
IMEI = "IMEI:351234567890123"
BASE = "/streetlight/device"

REGISTRATION = {
    "device_id": IMEI, "device_type": "street_light_controller", "name": "Light SL001", "city": "Delhi",
    "latitude": 28.6139, "longitude": 77.2090, "address": "Main Road, Delhi", "status": "off",
    "battery_backup_hours": 12, "gsm_imei": "351234567890123", "gsm_signal_strength": 85,
    "communication_type": "GSM", "firmware_version": "v2.1.0", "timestamp": "2025-12-17T10:30:00Z",
}


def status_report(device_id: str = IMEI, light_id: str = "SL001", **status: Any) -> dict[str, Any]:
    """Section 2's example report, with `status` fields replaced."""
    return {
        "device_id": device_id, "light_id": light_id, "timestamp": "2025-12-17T10:30:35Z",
        "status": {"power_state": "on", "brightness": 85, "temperature_celsius": 42.5, "battery_percentage": 95,
                   "gsm_signal_strength": 82, "uptime_seconds": 864000, "error_flags": [], **status},
        "energy": {"voltage": 230.5, "current": 0.26, "power_watts": 60, "frequency": 50, "cumulative_kwh": 1245.67},
    }


def sign(secret: str, body: bytes) -> dict[str, str]:
    return {"X-Device-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def configure(client: Any, device_id: str = IMEI, **fields: Any) -> dict[str, Any]:
    """Configure a light; its answer (asserted 200)."""
    r = await client.post(f"{BASE}/{device_id}/configure", json={**REGISTRATION, "device_id": device_id, **fields})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def command(client: Any, device_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Queue a command the operator's way (the admin API); the stored command."""
    r = await client.post(f"/api/gateway/devices/{device_id}/commands", json={"payload": payload}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return dict(r.json()["command"])


def gz(doc: Any) -> bytes:
    return gzip.compress(json.dumps(doc).encode())
