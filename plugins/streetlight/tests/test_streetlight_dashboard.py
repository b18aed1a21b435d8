"""The plugin's panel on the dashboard's overview, drawn by the real app."""

from __future__ import annotations

import re
import time

from streetlight_testbed import ADMIN, BASE, PLUGIN, bearer, command, configure, status_report

from gatewayd.testing import gw_client, provision

LIGHTS = [f"IMEI:35123456789012{i}" for i in range(4)]


def noon_today() -> float:
    t = time.localtime()
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 12, 0, 0, 0, 0, -1))


def panel_of(page: str) -> str:
    found = re.search(r'<section class="panel" data-plugin="streetlight">(.*?)</section>', page, re.S)
    assert found, "no streetlight panel on the overview"
    return found.group(1)


def figure(panel: str, attribute: str, value: str) -> str:
    found = re.search(rf'{attribute}="{value}">([^<]*)<', panel)
    assert found, f"{attribute}={value} not in the panel"
    return found.group(1)


async def test_the_panel_shows_colours_power_offline_lights_commands_and_energy_today(gateway_factory):
    now = [noon_today()]
    async with gateway_factory(plugins=PLUGIN, clock=lambda: now[0]) as gw, gw_client(gw) as client:
        tokens = {}
        for device in LIGHTS:
            await provision(gw, "streetlight", device)
        for device in LIGHTS[:3]:
            tokens[device] = bearer((await configure(client, device))["device_token"])

        async def report(device: str, kwh: float, **status: object) -> None:
            doc = status_report(device, **status)
            doc["timestamp"] = now[0]
            doc["energy"]["cumulative_kwh"] = kwh
            r = await client.post(f"{BASE}/{device}/status", json=doc, headers=tokens[device])
            assert r.status_code == 200, r.text

        await report(LIGHTS[2], 40.0)  # then silent: offline five minutes later
        now[0] += 300
        await report(LIGHTS[0], 100.0)
        await report(LIGHTS[0], 101.5)  # 1.5 kWh today
        await report(LIGHTS[1], 7.0, power_state="off", battery_percentage=5)  # red: battery critical
        await command(client, LIGHTS[0], {"command_type": "power_control", "action": "off"})  # high priority
        await command(client, LIGHTS[1], {"command_type": "brightness_control", "brightness_level": 40})
        await command(client, LIGHTS[1], {"command_type": "schedule_update", "schedule": {"enabled": False}})
        r = await client.get(f"{BASE}/{LIGHTS[1]}/commands", params={"limit": 1}, headers=tokens[LIGHTS[1]])
        assert len(r.json()["commands"]) == 1  # handed out, not acknowledged

        page = await client.get("/", headers=ADMIN)
        assert page.status_code == 200
        panel = panel_of(page.text)
        assert "Street lights" in page.text
        colours = {c: int(figure(panel, "data-colour", c)) for c in ("green", "yellow", "red", "gray")}
        assert colours == {"green": 1, "yellow": 1, "red": 1, "gray": 1}
        power = {p: int(figure(panel, "data-power", p)) for p in ("on", "off", "error", "unknown")}
        assert power == {"on": 2, "off": 1, "error": 0, "unknown": 1}  # the quiet one was on
        assert figure(panel, "data-commands", "pending") == "2" and figure(panel, "data-commands", "delivered") == "1"
        assert "(1 of high priority)" in panel
        assert re.search(r'data-energy-kwh="1\.500">1\.5 kWh</b>\s*over 3 metered lights', panel), panel
        offline = re.findall(r'<tr data-light="([^"]+)">', panel)
        assert offline == [LIGHTS[2]]
        assert f'href="/dashboard/devices/IMEI%3A{LIGHTS[2][5:]}?family=streetlight"' in panel
        assert "5 min ago" in panel
        # The same colour on the devices table, and the link leads to the light's page.
        row = re.search(rf'<tr data-device="{LIGHTS[1]}"[^>]*data-health="(\w+)"', page.text)
        assert row and row.group(1) == "red"
        light_page = await client.get(f"/dashboard/devices/IMEI%3A{LIGHTS[2][5:]}?family=streetlight", headers=ADMIN)
        assert light_page.status_code == 200 and LIGHTS[2] in light_page.text


async def test_lights_waiting_for_approval_are_counted_on_the_panel(gateway_factory):
    settings = ["plugins.streetlight.enrollment=true"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        r = await client.post(f"{BASE}/{LIGHTS[0]}/configure", json={"latitude": 28.6, "longitude": 77.2})
        assert r.status_code == 403 and r.json()["code"] == "PENDING_APPROVAL"
        panel = panel_of((await client.get("/", headers=ADMIN)).text)
        assert "Waiting for approval: <b>1</b>" in panel and "gatewayd devices enable --family streetlight ID" in panel
        assert "Every light that reported is online." in panel
        assert figure(panel, "data-colour", "gray") == "0"  # a light waiting is not drawn as a light yet
