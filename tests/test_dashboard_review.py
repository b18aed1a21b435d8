"""A reviewer's attacks on the dashboard's new forms: what a device or a stranger could plant."""

from __future__ import annotations

import re

import httpx
import pytest

from gatewayd.testing import gw_client, gw_url, provision
from tests import plugin_everything

TOKEN = "dashboard-review-token-5c1a"
EVIL = "<script>alert(1)</script>"


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html)[1]


async def test_the_command_form_escapes_and_takes_no_other_sessions_token(gateway_factory):
    everything = ("everything", plugin_everything)
    async with gateway_factory(plugins=[everything]) as gw, gw_client(gw) as client, \
            httpx.AsyncClient(base_url=gw_url(gw)) as other:
        await provision(gw, "everything", "e1", name=EVIL, metadata={"note": EVIL})
        for c in (client, other):
            assert (await c.post("/dashboard/login", data={"token": TOKEN})).status_code == 303
        url, post = "/dashboard/devices/e1?family=everything", "/dashboard/devices/e1/commands"
        mine, theirs = csrf_of((await client.get(url)).text), csrf_of((await other.get(url)).text)
        assert mine != theirs
        form = {"family": "everything", "payload": '{"note": "</textarea><script>alert(1)</script>"}'}
        # Another session's token, no Origin, a GET: nothing queued.
        assert (await client.post(post, data={**form, "csrf": theirs})).status_code == 403
        assert (await client.get(post)).status_code in (404, 405)
        assert await gw.devices.commands.list("everything", "e1") == []
        queued = await client.post(post, data={**form, "csrf": mine})
        assert queued.status_code == 303
        page = (await client.get(queued.headers["location"])).text
        refused = (await client.post(post, data={**form, "csrf": mine, "payload": '{"level": "' + EVIL + '"}'})).text
        shown = (await client.get(url + "&queued=" + EVIL)).text
        for html in (page, refused, shown):
            assert EVIL not in html and "<script>alert" not in html
