"""A reviewer's attacks on the streetlight changes: what a light (or a stranger) may send."""

from __future__ import annotations

import re
import sqlite3
import time

import httpx
from streetlight_testbed import ADMIN, BASE, IMEI, PLUGIN, TOKEN, bearer, configure

from gatewayd.testing import gw_client, gw_url, provision, wait_until


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
        # The configure, the one good alert (the light's own events, such as coming online, may
        # go up too: not what this checks).
        await wait_until(lambda: any(x["kind"] == "alert" for x in upstream_receiver.records()),
                         what="the good alert upstream")
        records = upstream_receiver.records()
        assert [x["kind"] for x in records if x["kind"] in ("configure", "alert")] == ["configure", "alert"], records


async def test_the_migration_gives_an_energy_row_the_arrival_of_its_status_row(gateway_factory, tmp_path):
    # Schema 2 stamped every version-1 energy row with the light's own timestamp: the
    # readings of an offline sync (taken weeks before they arrived yesterday) then looked
    # weeks old, and the next purge deleted their energy rows while it kept their status
    # rows and whatever the cloud does not have yet. Each was written with a status row
    # of the same light and timestamp, which knows when it arrived.
    async with gateway_factory(plugins=PLUGIN):
        pass
    db = tmp_path / "var" / "gatewayd.sqlite3"
    day, now = 86400.0, time.time()
    taken, arrived, other = now - 40 * day, now - 3600, now - day
    with sqlite3.connect(db) as c:  # as version 1 left it: a synced reading and one with no status row
        for table in ("streetlight_status", "streetlight_energy_parameters"):
            c.execute(f'DROP INDEX "{table}_received_at"')
        c.execute('ALTER TABLE "streetlight_energy_parameters" DROP COLUMN "received_at"')
        c.execute("INSERT INTO streetlight_status (device, ts, received_at, via, error_flags)"
                  " VALUES ('x', ?, ?, 'http', '[]')", (taken, arrived))
        c.execute("INSERT INTO streetlight_energy_parameters (device, ts, voltage) VALUES ('x', ?, 230)", (taken,))
        c.execute("INSERT INTO streetlight_energy_parameters (device, ts, voltage) VALUES ('y', ?, 231)", (other,))
        c.execute("UPDATE core_schema SET version = 1 WHERE component = 'streetlight'")
    async with gateway_factory(plugins=PLUGIN):
        pass
    with sqlite3.connect(db) as c:
        energy = c.execute("SELECT device, received_at FROM streetlight_energy_parameters ORDER BY device").fetchall()
    assert energy == [("x", arrived), ("y", other)]


async def test_a_command_of_the_wrong_types_is_refused_not_a_500(gateway_factory):
    # `check` looked a command_type (and a priority) up in a dict: a list or an object there
    # raised TypeError (unhashable), and the device page's form and the admin API answered
    # 500 instead of naming the field.
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        for payload, field in (({"command_type": ["power_control"]}, "command_type"),
                               ({"command_type": "power_control", "action": "on", "priority": {}}, "priority"),
                               ({"command_type": "power_control", "action": ["on"]}, "action")):
            r = await client.post(f"/api/gateway/devices/{IMEI}/commands", json={"payload": payload}, headers=ADMIN)
            assert r.status_code == 400 and field in r.text, r.text
        await client.post("/dashboard/login", data={"token": TOKEN})
        page = await client.get(f"/dashboard/devices/{IMEI}?family=streetlight")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)[1]
        r = await client.post(f"/dashboard/devices/{IMEI}/commands", data={
            "csrf": csrf, "family": "streetlight", "payload": '{"command_type": ["power_control"]}'})
        assert r.status_code == 400 and "Not queued: command_type" in r.text, r.text
        assert await gw.devices.commands.list("streetlight", IMEI) == []


async def test_the_per_address_configure_limit_counts_bodies_the_declaration_refuses(gateway_factory):
    # "Before anything": the limit was counted in the view, which a body its declaration
    # refuses (or that is no JSON) never reaches: a flood of bad configures from one
    # address was answered 400 forever, read and decoded every time, never 429.
    settings = ["plugins.streetlight.configure_per_address_per_minute=3"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        url = f"{BASE}/{IMEI}/configure"
        for body in (b'{"latitude": 500}', b"not json", b'{"status": "dim"}'):
            r = await client.post(url, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, r.text
        # Nor is the count another address's for a header that says so.
        spoofed = {"Content-Type": "application/json", "X-Forwarded-For": "10.9.9.9", "X-Real-IP": "10.9.9.8",
                   "Forwarded": "for=10.9.9.7"}
        r = await client.post(url, content=b'{"latitude": 500}', headers=spoofed)
        assert r.status_code == 429 and r.json()["code"] == "RATE_LIMITED", r.text
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["retry_after_seconds"] >= 1


async def test_the_per_address_configure_limit_holds_on_the_plugins_own_listener(gateway_factory):
    # The firmware's fixed paths: the plugin's blueprint also serves at / on a listener of
    # its own, where its endpoints are `streetlight_root.<view>`.
    settings = ["plugins.streetlight.configure_per_address_per_minute=2", "plugins.streetlight.listen='127.0.0.1:0'"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, \
            httpx.AsyncClient(base_url=gw_url(gw, "streetlight")) as own:
        await provision(gw, "streetlight", IMEI)
        statuses = [(await own.post(f"/device/{IMEI}/configure", json={"latitude": 500})).status_code
                    for _ in range(3)]
        assert statuses == [400, 400, 429]


async def test_a_command_queued_while_the_plugin_did_not_check_it_cannot_jam_the_lights_poll(gateway_factory):
    # The core checks a command by its family's plugin only while that plugin runs (a
    # plugin failed at startup, or disabled, checks nothing): such a command, with a list
    # as its priority, answered every poll of the light 500; one that carried a
    # command_id of its own handed the light an id it could never acknowledge.
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        check, gw.devices.commands.check = gw.devices.commands.check, None  # as while the plugin is not running
        try:
            for payload in ({"command_type": "power_control", "action": "on", "priority": ["high"]},
                            {"command_type": "power_control", "action": "off", "command_id": "not-its-id"}):
                await gw.devices.commands.enqueue("streetlight", IMEI, payload)
        finally:
            gw.devices.commands.check = check
        r = await client.get(f"{BASE}/{IMEI}/commands", headers=auth)
        assert r.status_code == 200, r.text
        handed = r.json()["commands"]
        stored = {c.id for c in await gw.devices.commands.list("streetlight", IMEI)}
        assert len(handed) == 2 and {c["command_id"] for c in handed} == stored
        for c in handed:
            r = await client.post(f"{BASE}/{IMEI}/command-ack", headers=auth,
                                  json={"command_id": c["command_id"], "status": "executed"})
            assert r.status_code == 200, r.text
        assert (await client.get("/", headers=ADMIN)).status_code == 200  # the panel counts them too
