"""The site dashboard over real HTTP: log-in and sessions, the plugin hooks it draws from,
escaping, the live endpoint's session cookie. (In a real browser: test_dashboard_browser.py.)"""

from __future__ import annotations

import json
import logging
import re
from contextlib import asynccontextmanager
from functools import partial
from html import unescape

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from markupsafe import Markup
from quart import Blueprint, redirect, request
from quart_trio import QuartTrio
from trio_websocket import ConnectionClosed, open_websocket_url

from gatewayd.core.dashboard.chart import series_of, svg_chart
from gatewayd.core.dashboard.sessions import DashboardSessions
from gatewayd.core.http.app import AdminGuard
from gatewayd.core.outbox.ingest import Ingest
from gatewayd.plugins.api import hookimpl
from gatewayd.testing import gw_client, gw_url, provision, wait_until
from tests import plugin_everything

TOKEN = "dashboard-admin-token-0b8e"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PART = {"X-Dashboard-Part": "1"}


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


async def log_in(client: httpx.AsyncClient, token: str = TOKEN, **extra: str) -> httpx.Response:
    return await client.post("/dashboard/login", data={"token": token, **extra})


def rows(html: str) -> dict[str, dict[str, str]]:
    """The overview's device rows: id -> {presence, health, text}."""
    out = {}
    for m in re.finditer(r'<tr data-device="([^"]*)" data-presence="([^"]*)" data-health="([^"]*)">(.*?)</tr>',
                         html, re.S):
        out[unescape(m[1])] = {"presence": m[2], "health": m[3], "text": " ".join(unescape(
            re.sub(r"<[^>]+>", " ", m[4])).split())}
    return out


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html)[1]


# -- log-in, sessions, log-out --------------------------------------------------------------


async def test_the_token_is_exchanged_for_a_session_cookie_and_log_out_ends_it(gateway_factory):
    async with gateway_factory() as gw, gw_client(gw) as client:
        first = await client.get("/")
        assert first.status_code == 303 and first.headers["location"] == "/dashboard/login?next=%2F"
        form = await client.get(first.headers["location"])
        assert form.status_code == 200 and 'name="token"' in form.text and 'type="password"' in form.text

        wrong = await log_in(client, "a-wrong-token-of-mine")
        assert wrong.status_code == 401 and "wrong token" in wrong.text
        assert "a-wrong-token-of-mine" not in wrong.text and "set-cookie" not in wrong.headers
        foreign = await client.post("/dashboard/login", data={"token": TOKEN},
                                    headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403 and "set-cookie" not in foreign.headers

        ok = await log_in(client, next="/dashboard/devices/x?family=y")
        assert ok.status_code == 303 and ok.headers["location"] == "/dashboard/devices/x?family=y"
        cookie = ok.headers["set-cookie"]
        assert cookie.startswith("gatewayd_session=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "Path=/" in cookie and "Secure" not in cookie  # plain HTTP here; Secure over TLS
        assert len(gw.sessions) == 1

        page = await client.get("/")
        assert page.status_code == 200 and "Log out" in page.text
        assert TOKEN not in page.text and TOKEN not in str(page.url)
        assert page.headers["cache-control"] == "no-store"
        again = await client.get("/dashboard/login?next=/")
        assert again.status_code == 303 and again.headers["location"] == "/"

        # Log-out needs the page's CSRF token, from the page's own origin.
        forged = await client.post("/dashboard/logout")
        assert forged.status_code == 403 and len(gw.sessions) == 1
        csrf = csrf_of(page.text)
        foreign = await client.post("/dashboard/logout", data={"csrf": csrf}, headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403 and len(gw.sessions) == 1
        value = client.cookies["gatewayd_session"]
        out = await client.post("/dashboard/logout", data={"csrf": csrf}, headers={"Origin": gw_url(gw)})
        assert out.status_code == 303 and out.headers["location"] == "/dashboard/login?logged_out"
        assert out.headers["set-cookie"].startswith("gatewayd_session=;") and "Max-Age=0" in out.headers["set-cookie"]
        assert len(gw.sessions) == 0
        async with httpx.AsyncClient(base_url=gw_url(gw), cookies={"gatewayd_session": value}) as old:
            assert (await old.get("/")).status_code == 303  # the session is gone on the gateway


async def test_log_in_goes_back_only_to_a_page_of_the_gateway(gateway_factory):
    async with gateway_factory() as gw, gw_client(gw) as client:
        for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)",
                       "/ok\r\nSet-Cookie: x=1"):
            client.cookies.clear()
            r = await log_in(client, next=target)
            assert r.status_code == 303 and r.headers["location"] == "/", target
        form = await client.get("/dashboard/login", params={"next": '"><script>alert(1)</script>'})
        assert "<script>alert" not in form.text


async def test_the_admin_token_must_be_set(gateway_factory, monkeypatch):
    monkeypatch.delenv("GATEWAYD_ADMIN_TOKEN")
    async with gateway_factory() as gw, gw_client(gw) as client:
        r = await log_in(client, "anything")
        assert r.status_code == 503 and "GATEWAYD_ADMIN_TOKEN" in r.text and "set-cookie" not in r.headers


def test_sessions_end_when_idle_too_old_or_the_token_changes(monkeypatch):
    now = [1000.0]
    sessions = DashboardSessions(AdminGuard("GATEWAYD_ADMIN_TOKEN"), ttl_s=100, idle_s=30, max_sessions=3,
                                 clock=lambda: now[0])
    value, session = sessions.login(TOKEN)
    assert sessions.find(value) is session and sessions.login("nope") == "wrong token"
    now[0] += 29
    assert sessions.find(value) is session  # used: idle time starts again
    now[0] += 29
    assert sessions.find(value) is session
    now[0] += 31
    assert sessions.find(value) is None  # idle for longer than idle_s

    value, _ = sessions.login(TOKEN)
    for _ in range(5):
        now[0] += 25
        found = sessions.find(value)
    assert found is None  # 125 s after log-in: past ttl_s however busy

    value, _ = sessions.login(TOKEN)
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", "rotated-token")
    assert sessions.find(value) is None  # a new admin token ends every session

    values = [sessions.login("rotated-token")[0] for _ in range(4)]
    assert len(sessions) == 3 and sessions.find(values[0]) is None and sessions.find(values[3]) is not None
    assert sessions.find("x" * 500) is None and sessions.find("") is None


async def test_scripts_read_the_pages_with_the_admin_token(gateway_factory):
    async with gateway_factory() as gw, gw_client(gw) as client:
        page = await client.get("/", headers=ADMIN)
        assert page.status_code == 200 and "Devices" in page.text and "Log out" not in page.text
        assert (await client.get("/", headers={"Authorization": "Bearer nope"})).status_code == 303
        part = await client.get("/", headers={**ADMIN, **PART})
        assert part.status_code == 200 and "<html" not in part.text and 'id="attention"' in part.text
        ended = await client.get("/", headers=PART)
        assert ended.status_code == 401 and "session has ended" in ended.text
        css = await client.get(re.search(r'href="(/dashboard/static/dashboard.css\?v=\w+)"', page.text)[1])
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert (await client.get("/dashboard/static/dashboard.css", headers={"If-None-Match": css.headers["etag"]})
                ).status_code == 304
        assert (await client.get("/dashboard/static/..%2Fhttp.py")).status_code == 404


# -- what the pages show, from the plugins' hooks --------------------------------------------


class Lamps:
    """A family whose plugin judges its devices' health (streetlight-style rules)."""

    @hookimpl
    async def gatewayd_device_health(self, ctx, device):
        return {"ok": "green", "warn": ("yellow", "battery 18 %"), "odd": "blue"}.get(device.id) \
            or (1 / 0 if device.id == "boom" else None)


async def test_hook_device_health(gateway_factory, caplog):
    async with gateway_factory(plugins=[("lamps", Lamps())]) as gw, gw_client(gw) as client:
        for device in ("ok", "warn", "quiet", "odd", "boom"):
            await provision(gw, "lamps", device)
        await provision(gw, "nolamps", "other")  # a family without a plugin: gray too
        with caplog.at_level(logging.ERROR, "gatewayd.dashboard"):
            for _ in range(2):
                found = rows((await client.get("/", headers=ADMIN)).text)
        assert {d: r["health"] for d, r in found.items()} == {
            "ok": "green", "warn": "yellow", "quiet": "gray", "odd": "gray", "boom": "gray", "other": "gray"}
        assert "battery 18 %" in found["warn"]["text"]
        # A plugin's mistake is logged once, not at every redraw.
        assert caplog.text.count("gatewayd_device_health raised") == 1
        assert caplog.text.count("answered something else") == 1
        page = await client.get("/dashboard/devices/warn", headers=ADMIN)
        assert "health yellow: battery 18 %" in " ".join(unescape(re.sub(r"<[^>]+>", " ", page.text)).split())


class Gauges:
    @hookimpl
    def gatewayd_device_telemetry(self, ctx, device, limit):
        if device.id == "broken":
            raise RuntimeError("the gauge table is gone")
        readings = [(1767225600.0 + i * 60, {"temp_c": 20.0 + i, "state": "on", "ok": True, "bad": float("nan"),
                                             "huge": 10**400, "rssi": -60 - i}) for i in range(5)]
        return list(reversed(readings))[:limit]  # newest first: the core sorts them


async def test_hook_device_telemetry(gateway_factory):
    async with gateway_factory(plugins=[("gauges", Gauges())]) as gw, gw_client(gw) as client:
        await provision(gw, "gauges", "g-1")
        await provision(gw, "gauges", "broken")
        found = rows((await client.get("/", headers=ADMIN)).text)
        assert "temp_c 24 · rssi -64" in found["g-1"]["text"]  # the newest reading, numbers only
        assert "none yet" in found["broken"]["text"]
        page = (await client.get("/dashboard/devices/g-1", headers=ADMIN)).text
        charts = re.findall(r'<svg class="chart"[^>]*data-series="([^"]+)"', page)
        assert charts == ["temp_c", "rssi"]
        temp = page[page.index('data-series="temp_c"'):page.index("</svg>", page.index('data-series="temp_c"'))]
        assert temp.count('<circle class="dot"') == 5 and "<polyline" in temp
        assert "5 readings" in page
        broken = await client.get("/dashboard/devices/broken", headers=ADMIN)
        assert broken.status_code == 200 and "No telemetry to chart" in broken.text


class Panels:
    @hookimpl
    def gatewayd_dashboard_panels(self, ctx):
        async def html():
            return Markup("<p class='mine'>{} lamps lit</p>").format("<b>12</b>")

        async def text():
            return "<script>alert('panel')</script>"

        async def broken():
            raise ValueError("<img src=x onerror=alert(1)>")

        return [("Lamps <i>lit</i>", html), ("Plain", text), ("Broken", broken), "not a panel"]


async def test_hook_dashboard_panels(gateway_factory, caplog):
    async with gateway_factory(plugins=[("panels", Panels())]) as gw, gw_client(gw) as client:
        with caplog.at_level(logging.ERROR, "gatewayd.dashboard"):
            page = (await client.get("/", headers=ADMIN)).text
        assert "<p class='mine'>&lt;b&gt;12&lt;/b&gt; lamps lit</p>" in page  # Markup kept, its argument escaped
        assert "Lamps &lt;i&gt;lit&lt;/i&gt;" in page  # titles are text
        assert "&lt;script&gt;alert(&#39;panel&#39;)&lt;/script&gt;" in page and "<script>alert" not in page
        assert "This panel failed: ValueError: &lt;img src=x onerror=alert(1)&gt;" in page
        assert "<img src=x" not in page
        assert "not a panel" not in page and "answered an item that is not (title, async render)" in caplog.text


class Failing:
    @hookimpl
    def gatewayd_startup(self, ctx):
        raise RuntimeError("no lamps today")

    @hookimpl
    def gatewayd_dashboard_panels(self, ctx):
        async def render():
            return "should not be drawn"

        return [("Failing panel", render)]


async def test_a_failed_plugin_is_shown_failed_and_draws_no_panel(gateway_factory):
    async with gateway_factory(plugins=[("failing", Failing())]) as gw, gw_client(gw) as client:
        page = (await client.get("/", headers=ADMIN)).text
        assert "Failing panel" not in page and "Gateway degraded" in page
        assert "plugin failing failed: startup: no lamps today" in unescape(page)


# -- escaping: nothing a device or plugin says becomes markup ----------------------------------

EVIL = "<script>alert(1)</script>"
EVIL_ATTR = '"><img src=x onerror=alert(2)>'


class Evil:
    @hookimpl
    def gatewayd_device_health(self, ctx, device):
        return ("red", EVIL_ATTR)

    @hookimpl
    def gatewayd_device_telemetry(self, ctx, device, limit):
        return [(1767225600.0, {EVIL: 1.0, EVIL_ATTR: 2.0})]


async def test_no_markup_from_a_device_or_a_plugin_gets_through(gateway_factory):
    async with gateway_factory(plugins=[("evil", Evil())]) as gw, gw_client(gw) as client:
        await provision(gw, "evil", "e-1", name=EVIL, model=EVIL_ATTR, firmware="<b>1</b>",
                        metadata={EVIL: EVIL_ATTR, "nested": {"x": "</td><script>alert(3)</script>"}})
        await gw.events.emit("evil", "e-1", "tamper", {"note": EVIL_ATTR}, severity="critical")
        pages = [await client.get(url, headers={**ADMIN, **extra})
                 for url in ("/", "/dashboard/devices/e-1") for extra in ({}, PART)]
        for page in pages:
            assert page.status_code == 200
            for raw in (EVIL, "<img src=x", "<script>alert(3)", "<b>1</b>"):
                assert raw not in page.text, (page.url, raw)
            csp = page.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        device_page = pages[2].text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in device_page  # shown as text, not dropped
        assert "&lt;/td&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in device_page


def test_charts_draw_each_series_and_escape_their_names():
    readings = [(100.0, {"a": 1.0}), (160.0, {"a": 3.0, "<b>": 2.0})]
    assert series_of(readings) == {"a": [(100.0, 1.0), (160.0, 3.0)], "<b>": [(160.0, 2.0)]}
    one = svg_chart("<b>", [(160.0, 2.0)], now=200.0)
    assert "<b>" not in one and "&lt;b&gt;" in one
    assert one.count('<circle class="dot"') == 1 and "<polyline" not in one  # a first reading shows
    line = svg_chart("a", series_of(readings)["a"], now=200.0)
    assert "<polyline" in line and "1 min 40 s ago" in line and "40 s ago" in line


# -- finding a device -------------------------------------------------------------------------


async def test_a_device_page_asks_which_family_when_an_id_is_in_two(gateway_factory):
    async with gateway_factory() as gw, gw_client(gw) as client:
        await provision(gw, "alpha", "dup", name="the alpha one")
        await provision(gw, "beta", "dup", name="the beta one")
        which = await client.get("/dashboard/devices/dup", headers=ADMIN)
        assert which.status_code == 409 and "/dashboard/devices/dup?family=alpha" in which.text
        beta = await client.get("/dashboard/devices/dup", params={"family": "beta"}, headers=ADMIN)
        assert beta.status_code == 200 and "the beta one" in beta.text
        missing = await client.get("/dashboard/devices/ghost", headers=ADMIN)
        assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]


# -- the live endpoint takes the session -------------------------------------------------------


class Levels:
    """A panel with a form that posts to the plugin's own route (ctx.http.dashboard_token/_form)."""

    def __init__(self):
        self.levels: list[dict[str, str]] = []

    @hookimpl
    def gatewayd_dashboard_panels(self, ctx):
        async def render():
            token = ctx.http.dashboard_token()
            if token is None:
                return "log in to set the level"
            return Markup('<form class="level" method="post" action="{}"><input type="hidden" name="csrf" '
                          'value="{}"><input name="level"><button>Set</button></form>').format(
                              f"{ctx.mount}/level", token)

        return [("Level", render)]

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint(ctx.name, __name__)

        @bp.post("/level")
        async def level():
            form = await ctx.http.dashboard_form()
            if form is None:
                return {"refused": True}, 403
            self.levels.append(form)
            return redirect("/", 303)

        return bp


async def test_a_panels_form_is_obeyed_only_from_a_dashboard_page(gateway_factory):
    levels = Levels()
    async with gateway_factory(plugins=[("levels", levels)]) as gw, gw_client(gw) as client:
        origin = {"Origin": gw_url(gw)}
        # A script with the admin token has no session: no form token, no form drawn.
        assert "log in to set the level" in (await client.get("/", headers=ADMIN)).text
        await log_in(client)
        part = (await client.get("/", headers=PART)).text  # the redrawn part carries the form too
        token = re.search(r'class="level".*?name="csrf" value="([^"]+)"', part, re.S)[1]
        assert token == csrf_of((await client.get("/")).text)  # the session's, as the log-out form's
        refused = [
            await client.post("/levels/level", data={"level": "1", "csrf": "wrong"}, headers=origin),
            await client.post("/levels/level", data={"level": "2"}, headers=origin),
            await client.post("/levels/level", data={"level": "3", "csrf": token}, headers={"Origin": "http://evil.example"}),
            await client.post("/levels/level", content=b"\xff\x00", headers={**origin, "Content-Type": "text/plain"}),
        ]
        async with httpx.AsyncClient(base_url=gw_url(gw)) as stranger:  # no cookie
            refused.append(await stranger.post("/levels/level", data={"level": "4", "csrf": token}, headers=origin))
        assert [r.status_code for r in refused] == [403] * 5
        r = await client.post("/levels/level", data={"level": "5", "csrf": token}, headers=origin)
        assert r.status_code == 303 and levels.levels == [{"level": "5"}]  # the token is not among the fields
        await client.post("/dashboard/logout", data={"csrf": token}, headers=origin)
        r = await client.post("/levels/level", data={"level": "6", "csrf": token}, headers=origin)
        assert r.status_code == 403 and levels.levels == [{"level": "5"}]  # a stale page after log-out


async def test_the_live_endpoint_takes_the_dashboard_session(gateway_factory):
    async with gateway_factory() as gw, gw_client(gw) as client:
        await log_in(client)
        cookie = f"gatewayd_session={client.cookies['gatewayd_session']}"
        url = gw_url(gw).replace("http://", "ws://") + "/api/gateway/live?streams=demo.%23"
        host = gw_url(gw).removeprefix("http://")

        async def refused(headers: list[tuple[str, str]]) -> int:
            async with open_websocket_url(url, extra_headers=headers) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
            return closed.value.reason.code

        async with open_websocket_url(url, extra_headers=[("Cookie", cookie), ("Origin", f"http://{host}")]) as ws:
            await wait_until(lambda: gw.live.subscribers == 1, what="the WebSocket subscribed")
            gw.live.publish("demo.telemetry.d-1", {"v": 1})
            [event] = json.loads(await ws.get_message())
            assert event["stream"] == "demo.telemetry.d-1" and event["data"] == {"v": 1}
        assert await refused([("Cookie", cookie), ("Origin", "http://evil.example")]) == 4401
        assert await refused([]) == 4401
        async with client.stream("GET", "/api/gateway/live/events", params={"streams": "demo.#"}) as stream:
            assert stream.status_code == 200
        page = await client.get("/")
        await client.post("/dashboard/logout", data={"csrf": csrf_of(page.text)})
        assert await refused([("Cookie", cookie)]) == 4401


# -- the outbox and upstream, as the far ends answer -------------------------------------------


@asynccontextmanager
async def refusing_far_end(status: int, message: str):
    """A cloud endpoint that answers every batch `status` (a real server on a free port)."""
    app = QuartTrio("refusing")

    @app.post("/v1/batch")
    async def batch():
        await request.get_data()
        return {"error": {"status": status, "code": "refused", "message": message}}, status

    config = HypercornConfig()
    config.bind, config.accesslog = ["127.0.0.1:0"], None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        yield url
        stop.set()


async def test_the_outbox_shows_a_paused_sink_and_dead_letters(gateway_factory, upstream_receiver, monkeypatch):
    monkeypatch.setenv(upstream_receiver.secret_env, "not-the-receivers-secret")  # the receiver answers 401
    monkeypatch.setenv("STRICT_SECRET", "s3cret")
    async with refusing_far_end(422, "schema v0 is not accepted here") as strict:
        config = upstream_receiver.config_text() + f'[[upstream]]\nname = "strict"\nurl = "{strict}"\n' \
                                                   'secret_env = "STRICT_SECRET"\nlinger_s = 0.05\n'
        async with gateway_factory(config_text=config) as gw, gw_client(gw) as client:
            await Ingest(gw.outbox, "demo", gw.clock).record("d-1", "telemetry", {"v": 1})
            await wait_until(lambda: gw.upstream.workers["cloud"].paused, what="the cloud sink paused (401)")
            await wait_until(lambda: gw.upstream.workers["strict"].stats.records.get("dead_lettered"),
                             what="the strict sink's batch dead-lettered (422)")
            page = (await client.get("/", headers=ADMIN)).text
    sinks = {m[1]: " ".join(unescape(re.sub(r"<[^>]+>", " ", m[2])).split())
             for m in re.finditer(r'<tr data-sink="([^"]+)">(.*?)</tr>', page, re.S)}
    assert sinks["cloud"].startswith("cloud") and "paused" in sinks["cloud"] and "401" in sinks["cloud"]
    assert "records are kept" in sinks["cloud"] and " 1 " in sinks["cloud"]  # its backlog: the record waits
    assert "schema v0 is not accepted here" in sinks["strict"] and "1 batches" in sinks["strict"]
    assert "1 records in 1 dead-lettered batches" in unescape(page)  # and it needs attention


# -- commands from the device page ----------------------------------------------------------


async def test_an_operator_queues_a_command_from_the_device_page(gateway_factory):
    everything = ("everything", plugin_everything)
    async with gateway_factory(plugins=[everything]) as gw, gw_client(gw) as client:
        await provision(gw, "everything", "e1")
        url = "/dashboard/devices/e1?family=everything"
        assert 'id="send-command"' not in (await client.get(url, headers=ADMIN)).text  # a script: no form
        await log_in(client)
        page = await client.get(url)
        assert 'id="send-command"' in page.text and "No command for this device." in page.text
        csrf, post = csrf_of(page.text), "/dashboard/devices/e1/commands"
        form = {"csrf": csrf, "family": "everything", "payload": '{"level": 3}'}
        # Only from the page itself: its form token and its origin.
        assert (await client.post(post, data={**form, "csrf": "forged"})).status_code == 403
        assert (await client.post(post, data=form, headers={"Origin": "http://evil.example"})).status_code == 403
        assert await gw.devices.commands.list("everything", "e1") == []
        queued = await client.post(post, data=form, headers={"Origin": gw_url(gw)})
        assert queued.status_code == 303
        [command] = await gw.devices.commands.list("everything", "e1")
        assert command.payload == {"level": 3, "checked": True}  # through the family's check
        assert queued.headers["location"] == f"/dashboard/devices/e1?family=everything&queued={command.id}"
        shown = await client.get(queued.headers["location"])
        assert f"Command {command.id} queued" in shown.text
        assert re.search(rf'<tr data-command="{command.id}" data-state="pending">', shown.text)
        # Refusals are shown on the page with what was typed, nothing queued.
        for text, problem in (('{"level": 11}', "level: expected an integer 0-10, got 11"),
                              ('{"level": ', "JSON")):
            refused = await client.post(post, data={**form, "payload": text})
            assert refused.status_code == 400 and "Not queued: " in refused.text and problem in refused.text
            assert f">{text}</textarea>".replace('"', "&#34;") in refused.text
        assert len(await gw.devices.commands.list("everything", "e1")) == 1
        missing = await client.post("/dashboard/devices/e9/commands", data=form)
        assert missing.status_code == 404
        async with httpx.AsyncClient(base_url=gw_url(gw)) as stranger:  # no session: to the log-in form
            assert (await stranger.post(post, data=form)).status_code == 303
