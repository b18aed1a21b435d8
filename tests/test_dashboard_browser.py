"""The site dashboard in a real browser: Debian's chromium, driven by Selenium through
Debian's chromium-driver (scripts/bootstrap --test installs both; no browser download).

One technician's visit: log in with the admin token, watch a freshly provisioned meter
come online with its first reading when it first publishes over MQTT, open its page
and see its chart (and the next reading arrive live), log out. The browser runs in a
worker thread (Selenium blocks) while the gateway serves in the test's trio run.

Screenshots of each page go to `<tmp>/screenshots` and are copied to `var/screenshots/`
(or `$GATEWAYD_SCREENSHOTS`), so a person can look at what the technician sees.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import peewee
import pytest
import trio
from markupsafe import Markup

import gatewayd_streetlight
from gatewayd.plugins.api import PluginContext, Rejected, hookimpl
from gatewayd.testing import device_mqtt, gw_url, provision, wait_handled, wait_until

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "browser-test-admin-token-7f3a"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
WIDTH = 1280


# -- a small family plugin: meters that publish readings over MQTT -------------------------


class MeterReading(peewee.Model):
    device = peewee.CharField(index=True)
    ts = peewee.FloatField()
    data = peewee.TextField()

    class Meta:
        table_name = "meter_reading"


class Meter:
    @hookimpl
    def gatewayd_storage_models(self, models):
        models.add(MeterReading)

    @hookimpl
    def gatewayd_mqtt_topics(self, topics, ctx: PluginContext[Any, Any]):
        async def on_telemetry(msg):
            device_id = msg.topic.split("/")[1]
            device = await ctx.devices.get(device_id)
            if device is None:
                raise Rejected(f"no meter {device_id!r}")
            try:
                data = json.loads(msg.payload)
            except ValueError as e:
                raise Rejected(f"not JSON: {e}") from None
            now = ctx.now()
            await ctx.ingest.record(device_id, "telemetry", data, ts=now, family_rows=lambda: MeterReading.insert(
                device=device_id, ts=now, data=msg.payload.decode()).execute())
            ctx.devices.touch(device_id)
            await ctx.devices.activate(device)
            if data.get("temp_c", 0) > 25:
                await ctx.events.emit(device_id, "too_warm", {"temp_c": data["temp_c"]}, severity="warning")
            ctx.live.publish("telemetry", device_id, data)  # after the commit

        topics.subscribe("meter/+/telemetry", on_telemetry)
        topics.acl("meter/%u/telemetry", "write")

    @hookimpl
    async def gatewayd_device_telemetry(self, ctx, device, limit):
        rows = await ctx.storage.read(lambda: list(
            MeterReading.select().where(MeterReading.device == device.id).order_by(MeterReading.id.desc())
            .limit(limit)))
        return [(r.ts, json.loads(r.data)) for r in rows]

    @hookimpl
    async def gatewayd_device_health(self, ctx, device):
        if not ctx.devices.is_online(device.id):
            return None  # never heard from, or gone quiet: the core's gray
        [last] = await self.gatewayd_device_telemetry(ctx, device, 1) or [None]
        if last and last[1].get("temp_c", 0) > 25:
            return ("yellow", f"warm: {last[1]['temp_c']} °C")
        return ("green", "reporting")

    @hookimpl
    def gatewayd_dashboard_panels(self, ctx):
        async def summary():
            count = await ctx.storage.read(lambda: MeterReading.select().count())
            return Markup("<p>{} readings stored by the meter plugin.</p>").format(count)

        return [("Meter readings", summary)]


# -- the browser -----------------------------------------------------------------------------


@dataclass
class Browser:
    """A chromium session; every call goes through a worker thread (Selenium blocks)."""

    driver: Any
    shots: Path

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args)

    async def open(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        """Run `script` in the page and return what it returns: one atomic read, so a
        fragment redrawn meanwhile cannot leave a stale element behind."""
        return await self.run(self.driver.execute_script, script, *args)

    async def until(self, script: str, *args: Any, what: str) -> Any:
        return await wait_until(lambda: self.js(script, *args), step=0.1, what=what)

    async def screenshot(self, name: str) -> Path:
        """The whole page (the window grown to its height), as `<shots>/<name>.png`."""
        def take() -> Path:
            page = self.driver.execute_script("return document.documentElement.scrollHeight")
            for _ in range(2):  # the window's frame takes some of its height: grow it by that once
                inner = self.driver.execute_script("return window.innerHeight")
                outer = self.driver.get_window_size()["height"]
                self.driver.set_window_size(WIDTH, min(max(page, 600), 6000) + outer - inner)
            path = self.shots / f"{name}.png"
            self.driver.save_screenshot(str(path))
            self.driver.set_window_size(WIDTH, 900)
            return path

        return await self.run(take)


def start_chromium(profile: Path) -> Any:
    # Fail, not skip: a suite that skips its browser test looks green with the dashboard broken.
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: apt-get install {package} (scripts/bootstrap --test does it as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},900"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
async def browser(tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    driver = await trio.to_thread.run_sync(start_chromium, tmp_path / "chromium-profile")
    try:
        yield Browser(driver, shots)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(driver.quit)
        keep = Path(os.environ.get("GATEWAYD_SCREENSHOTS") or ROOT / "var" / "screenshots")
        keep.mkdir(parents=True, exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy(shot, keep / shot.name)
        print(f"\ndashboard screenshots: {keep}")


# -- the visit -----------------------------------------------------------------------------

ROW = """const row = document.querySelector(`tr[data-device="${arguments[0]}"]`);
         return row && {presence: row.dataset.presence, health: row.dataset.health,
                        reading: row.querySelector(".reading").textContent.trim()};"""
TAIL = """return Array.from(document.querySelectorAll("#tail li[data-stream]"), li => li.textContent);"""
DOTS = """const svg = document.querySelector(`svg.chart[data-series="${arguments[0]}"]`);
          return svg && svg.querySelectorAll("circle.dot").length === arguments[1];"""
LIVE = "return document.querySelector('#live-state').dataset.state === 'open'"
STREETLIGHT_PANEL = """const panel = document.querySelector('section.panel[data-plugin="streetlight"]');
                       const gray = panel && panel.querySelector('[data-colour="gray"]');
                       return gray && gray.textContent === '1' && panel.textContent.replace(/\\s+/g, ' ');"""
WARM_RULE = """
[[rules]]
name = "meter-too-warm"
family = "meter"
type = "too_warm"
actions = [{ kind = "log" }]
"""


@pytest.mark.timeout(120)
async def test_a_technician_watches_a_meter_come_online(gateway_factory, upstream_receiver, browser, monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)
    async with gateway_factory(plugins=[("meter", Meter()), ("streetlight", gatewayd_streetlight)], mqtt=True,
                               upstream=upstream_receiver, config_text=WARM_RULE) as gw:
        base = gw_url(gw)
        await provision(gw, "meter", "m-2", name="Spare meter (never installed)")
        await provision(gw, "streetlight", "IMEI:351234567890123", name="Main Road light")  # never configured

        # Log in: the overview sends the browser to the log-in form, which sends it back.
        await browser.open(base + "/")
        await browser.until("return location.pathname === '/dashboard/login' && document.querySelector('#token')",
                            what="the log-in form")
        await browser.screenshot("1-login")
        await browser.js("document.querySelector('#token').value = arguments[0];"
                         "document.querySelector('#login').submit();", TOKEN)
        await browser.until("return location.pathname === '/' && document.querySelector('#overview')",
                            what="the overview after log-in")
        cookie = await browser.run(browser.driver.get_cookie, "gatewayd_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
        page = await browser.run(lambda: browser.driver.page_source)
        assert TOKEN not in page and TOKEN not in await browser.js("return location.href")
        await browser.until(LIVE, what="the overview's live connection")

        # A meter installed now appears, online with its first reading, when it first publishes.
        creds = await provision(gw, "meter", "m-1", name="Boiler room meter", model="MX-3", firmware="1.4.2")
        async with device_mqtt(creds) as meter:
            await meter.publish("meter/m-1/telemetry", b'{"temp_c": 21.5, "rssi": -61}')
            row = await wait_until(lambda: _online_with(browser, "m-1", "temp_c 21.5"), step=0.1,
                                   what="m-1 online with its first reading")
            assert row["health"] == "green" and "rssi -61" in row["reading"]
            tail = await browser.until(TAIL, what="the reading in the live activity")
            assert any("meter.telemetry.m-1" in line and '"temp_c":21.5' in line for line in tail)
            for payload in (b'{"temp_c": 22.0, "rssi": -60}', b'{"temp_c": 26.5, "rssi": -58}'):
                await meter.publish("meter/m-1/telemetry", payload)
            await wait_handled(gw, "meter/+/telemetry", n=3)
            await upstream_receiver.wait_for(3)
            await wait_until(lambda: _online_with(browser, "m-1", "temp_c 26.5"), step=0.1,
                             what="m-1's newest reading in the table")
            await browser.until("return document.querySelector('#events').textContent.includes('too_warm')"
                                " && document.querySelector('#alerts').textContent.includes('meter-too-warm')",
                                what="the too_warm event and its alert on the overview, redrawn")
            await browser.until("return document.querySelector('tr[data-device=\"m-1\"]').dataset.health === 'yellow'",
                                what="m-1 yellow (warm)")
            # A family's own panel (streetlight's), drawn under the page's CSP and redrawn with it.
            panel = await browser.until(STREETLIGHT_PANEL, what="the streetlight panel, one light gray")
            assert "Lights: 1" in panel and "0 on, 0 off, 0 in error, 1 not reported yet" in panel
            await browser.screenshot("2-overview")

            # Its page: the facts, a chart of its readings, and the next reading live.
            await browser.js("document.querySelector('tr[data-device=\"m-1\"] a').click()")
            await browser.until("return location.pathname === '/dashboard/devices/m-1'", what="m-1's page")
            await browser.until(DOTS, "temp_c", 3, what="the temp_c chart with 3 readings")
            assert await browser.js(DOTS, "rssi", 3)
            await browser.until(LIVE, what="the device page's live connection")
            await meter.publish("meter/m-1/telemetry", b'{"temp_c": 23.25, "rssi": -59}')
            await browser.until(DOTS, "temp_c", 4, what="the chart redrawn with the fourth reading")
            tail = await browser.until(TAIL, what="the live tail of the device page")
            assert any('"temp_c":23.25' in line for line in tail)
            await browser.screenshot("3-device")

        # Log out: back at the log-in form, and the session is gone on the gateway too.
        await browser.js("document.querySelector('#logout').click()")
        await browser.until("return document.querySelector('#logged-out')", what="the logged-out form")
        await browser.screenshot("4-logged-out")
        assert len(gw.sessions) == 0
        async with httpx.AsyncClient(base_url=base, cookies={"gatewayd_session": cookie["value"]}) as client:
            stale = await client.get("/")
            assert stale.status_code == 303 and stale.headers["location"].startswith("/dashboard/login")


async def _online_with(browser: Browser, device: str, reading: str) -> dict[str, str] | None:
    row = await browser.js(ROW, device)
    return row if row and row["presence"] == "online" and reading in row["reading"] else None


PIN_FIELD = "return document.querySelector(`tr[data-pins='esp-1'] input[name='${arguments[0]}']`).value"


@pytest.mark.timeout(120)
async def test_a_technician_sets_a_pin_from_a_plugins_panel(gateway_factory, browser, monkeypatch):
    """A plugin's panel with a form (thingsnxt's virtual pins): typed into while the page
    redraws itself, sent with the session's form token, obeyed, shown."""
    import gatewayd_thingsnxt
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)
    async with gateway_factory(plugins=[("thingsnxt", gatewayd_thingsnxt)],
                               settings=["plugins.thingsnxt.rate_limit=0"]) as gw:
        base = gw_url(gw)
        esp = await provision(gw, "thingsnxt", "esp-1")
        async with httpx.AsyncClient(base_url=base) as device:
            async def telemetry(data: dict[str, Any]) -> dict[str, Any]:
                r = await device.post("/thingsnxt/devices/esp-1/telemetry", json={"device_token": esp.key, "data": data})
                assert r.status_code == 200, r.text
                return r.json()

            await telemetry({"v0": 0, "temperature": 20})
            await browser.open(base + "/dashboard/login")
            await browser.js("document.querySelector('#token').value = arguments[0];"
                             "document.querySelector('#login').submit();", TOKEN)
            await browser.until("return document.querySelector(\"tr[data-pins='esp-1'] form.set-pin\")",
                                 what="the pins panel with its form")
            await browser.until(LIVE, what="the overview's live connection")

            def type_in(name: str, text: str) -> None:
                browser.driver.find_element(By.CSS_SELECTOR, f"tr[data-pins='esp-1'] input[name='{name}']").send_keys(text)

            await browser.run(type_in, "key", "v0")
            await browser.run(type_in, "value", "1")
            # The device reports meanwhile: the page would redraw itself, but not under the field in use.
            await telemetry({"v0": 0, "temperature": 21})
            await browser.until("return document.querySelector('#tail').textContent.includes('\"temperature\":21')",
                                what="the reading in the live activity")
            await trio.sleep(2.5)  # past the redraw it asked for (at most one a second)
            assert (await browser.js(PIN_FIELD, "key"), await browser.js(PIN_FIELD, "value")) == ("v0", "1")
            await browser.run(lambda: browser.driver.find_element(
                By.CSS_SELECTOR, "tr[data-pins='esp-1'] form.set-pin button").click())
            outcome = await browser.until("const p = document.querySelector('.pins-outcome');"
                                          "return p && location.hash === '#thingsnxt-pins' && p.dataset.outcome",
                                          what="the panel saying what the form did")
            assert outcome == "ok"
            row = await browser.js("return document.querySelector(\"tr[data-pins='esp-1']\").textContent")
            assert "v0 1" in " ".join(row.split()) and "(pending)" in row
            await browser.screenshot("5-pins")
            # The device gets the pin in its next answer.
            assert (await telemetry({"temperature": 22}))["data"]["v0"] == 1
