"""Review 8: a streetlight status encoded once (6084d00) is stored in the outbox and sent
live as the plain dict was: a string field with DEL and non-ASCII (error_flags) through
the real gateway, what reaches upstream and its live event on the wire."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gatewayd_streetlight
import pytest

from gatewayd.testing import gw_client, provision, sse_data_lines, wait_until

sys.path.insert(0, str(Path(gatewayd_streetlight.__file__).parents[1] / "tests"))
from streetlight_testbed import BASE, IMEI, REGISTRATION  # noqa: E402  (the plugin's own tests' light)

TOKEN = "review8-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FLAGS = ["a\x7fb", "lampe défectueuse", "\u2028x"]


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


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
            lines = await sse_data_lines(stream, lambda got: any(b"error_flags" in x for x in got))
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
