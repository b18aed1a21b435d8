"""Review 8: a streetlight status encoded once (6084d00) is stored in the outbox and sent
live as the plain dict was: a string field with DEL and non-ASCII (error_flags) through
the real gateway, what reaches upstream and its live event on the wire."""

from __future__ import annotations

import json

import gatewayd_streetlight
import pytest
import trio

from gatewayd.testing import gw_client, provision, wait_until

TOKEN = "review8-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
IMEI = "IMEI:351234567890123"
BASE = "/streetlight/device"
REGISTRATION = {
    "device_id": IMEI, "device_type": "street_light_controller", "name": "Light SL001", "city": "Delhi",
    "latitude": 28.6139, "longitude": 77.2090, "address": "Main Road, Delhi", "status": "off",
    "battery_backup_hours": 12, "gsm_imei": "351234567890123", "gsm_signal_strength": 85,
    "communication_type": "GSM", "firmware_version": "v2.1.0", "timestamp": "2025-12-17T10:30:00Z",
}
FLAGS = ["a\x7fb", "lampe défectueuse", "\u2028x"]


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


async def _data_lines(stream, want) -> list[bytes]:
    lines: list[bytes] = []
    buffer = b""
    with trio.fail_after(30):
        async for chunk in stream.aiter_raw():
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                if line.startswith(b"data: "):
                    lines.append(line)
                    if want(lines):
                        return lines
    return lines


async def test_a_status_with_del_and_non_ascii_flags_is_stored_and_sent_as_the_plain_dict(gateway_factory,
                                                                                          upstream_receiver):
    async with gateway_factory(plugins=[("streetlight", gatewayd_streetlight)], upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        r = await client.post(f"{BASE}/{IMEI}/configure", json=REGISTRATION)
        assert r.status_code == 200, r.text
        auth = {"Authorization": f"Bearer {r.json()['device_token']}"}
        report = {"device_id": IMEI, "light_id": "SL001", "timestamp": "2025-12-17T10:30:35Z",
                  "status": {"power_state": "on", "brightness": 85, "error_flags": FLAGS}}
        async with client.stream("GET", "/api/gateway/live/events", params={"streams": "streetlight.status.#"},
                                 headers=ADMIN) as stream:
            assert stream.status_code == 200
            await wait_until(lambda: gw.live.subscribers == 1)
            r = await client.post(f"{BASE}/{IMEI}/status", json=report, headers=auth)
            assert r.status_code == 200, r.text
            lines = await _data_lines(stream, lambda got: any(b"error_flags" in x for x in got))
        [line] = [x for x in lines if b"error_flags" in x]
        events = json.loads(line[len(b"data: "):])
        [event] = events if isinstance(events, list) else [events]
        sent = event["data"]
        assert sent["status"]["error_flags"] == FLAGS
        assert line.isascii() and b"\\u007f" in line and b"\\u00e9" in line  # the hub's own (ASCII) encoding
        records = await upstream_receiver.wait_for(2)
        [stored] = [x for x in records if x["kind"] == "status"]
        assert stored["data"] == sent  # what reached upstream
        # (the outbox row's text is the plain dict's by construction: one encoder, test_review8_probes)
