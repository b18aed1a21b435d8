"""A reviewer's attacks on the Virtual pins panel: markup from a device or an operator, escaped."""

import re

import httpx
import pytest
from test_thingsnxt import ADMIN, PLUGIN, TOKEN, UNLIMITED, v2

from gatewayd.testing import gw_client, gw_url, provision

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


async def test_markup_in_a_pin_or_an_outcome_is_shown_as_text(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=UNLIMITED) as gw, gw_client(gw) as client:
        esp = await provision(gw, "thingsnxt", "esp-1")
        assert (await v2(client, esp, {"v0": EVIL})).status_code == 200
        assert (await client.post("/dashboard/login", data={"token": TOKEN})).status_code == 303
        page = (await client.get("/")).text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)[1]
        for device, key in (("esp-1", "v1"), (EVIL, "v0"), ("esp-1", EVIL)):
            r = await client.post("/thingsnxt/dashboard/pins", headers={"Origin": gw_url(gw)},
                                  data={"csrf": csrf, "device": device, "key": key, "value": EVIL})
            assert r.status_code == 303
            page = (await client.get("/")).text
            assert EVIL not in page and "<img" not in page
        assert (await client.get("/thingsnxt/devices/esp-1/state", headers=ADMIN)).json()["pending"] == {"v1": EVIL}


async def test_the_rate_limit_holds_on_the_plugins_own_listener(gateway_factory):
    # The limited views were named by the blueprint's endpoints (`thingsnxt.v2`); on the
    # plugin's own listener the same blueprint is registered as `thingsnxt_root`, and no
    # request there was ever counted.
    settings = ["plugins.thingsnxt.rate_limit=5", "plugins.thingsnxt.listen='127.0.0.1:0'"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, \
            httpx.AsyncClient(base_url=gw_url(gw, "thingsnxt")) as own:
        esp = await provision(gw, "thingsnxt", "esp-1")
        statuses = [(await own.post("/devices/esp-1/telemetry", json={"device_token": esp.key, "data": {"t": i}}))
                    .status_code for i in range(7)]
        assert statuses == [200] * 5 + [429] * 2
        assert (await own.get("/health")).status_code == 200
