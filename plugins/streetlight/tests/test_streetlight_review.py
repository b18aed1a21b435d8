"""A reviewer's attacks on the streetlight changes: what a light (or a stranger) may send."""

from __future__ import annotations

from streetlight_testbed import BASE, IMEI, PLUGIN, bearer, configure

from gatewayd.testing import gw_client, provision


async def test_a_trailing_newline_is_refused_where_the_old_parser_refused_it(gateway_factory, upstream_receiver):
    # The declarations' patterns end in `$`, which in Python's `re` (msgspec's) also
    # matches before a final newline: "battery_low\n" passed the declaration, the alert
    # was committed upstream, and only then did the core's event check refuse its type
    # (500): the light retries, and every retry is one more alert record upstream.
    async with gateway_factory(plugins=PLUGIN, upstream=upstream_receiver) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        r = await client.post(f"{BASE}/{IMEI}/configure", json={"device_id": IMEI, "gsm_imei": "351234567890123\n"})
        assert r.status_code == 400 and "gsm_imei" in r.json()["message"], r.text
        auth = bearer((await configure(client))["device_token"])
        r = await client.post(f"{BASE}/{IMEI}/alert", headers=auth,
                              json={"alert_type": "battery_low\n", "message": "battery 8%"})
        assert r.status_code == 400 and r.json()["code"] == "INVALID_PAYLOAD", r.text
        assert "alert_type" in r.json()["message"]
        r = await client.post(f"{BASE}/{IMEI}/alert", headers=auth, json={"alert_type": "battery_low"})
        assert r.status_code == 200, r.text
        records = await upstream_receiver.wait_for(2)  # the configure, the one good alert
        assert [x["kind"] for x in records] == ["configure", "alert"], records
