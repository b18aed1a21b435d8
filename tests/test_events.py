"""Events through a real gateway: emit, the admin API (filters, cursor), plugin rules, CLI."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import trio

from gatewayd.core.alerts.events import EventError, EventQuery, parse_time
from gatewayd.core.alerts.notify import list_notifications
from gatewayd.plugins.api import hookimpl
from gatewayd.testing import gw_client, wait_until
from tests import plugin_everything

EVERYTHING = ("everything", plugin_everything)
TOKEN = "events-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
T0 = parse_time("2026-03-02T12:00:00Z")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


async def fill(gw):
    """20 events: 2 families, 4 devices, 3 types, a minute apart."""
    for i in range(20):
        await gw.events.emit(
            "edgesentinel" if i % 2 else "streetlight", f"dev-{i % 4}", ["status", "tamper_detected", "sd_error"][i % 3],
            {"i": i}, severity=["info", "warning", "critical"][i % 3], ts=T0 + 60 * i)


async def test_emit_stores_and_the_api_filters(gateway_factory):
    async with gateway_factory() as gw:
        await fill(gw)
        async with gw_client(gw, headers=ADMIN) as client:
            async def ids(**params):
                r = await client.get("/api/gateway/events", params={"limit": 100, **params})
                assert r.status_code == 200, r.text
                return [e["data"]["i"] for e in r.json()["events"]]

            assert await ids() == list(range(19, -1, -1))  # newest first
            assert await ids(family="edgesentinel", device="dev-1") == [17, 13, 9, 5, 1]
            assert await ids(type="sd_error,tamper_detected", severity="critical") == [17, 14, 11, 8, 5, 2]
            assert await ids(since="2026-03-02T12:10:00Z", until="2026-03-02T12:13:00Z") == [12, 11, 10]
            assert await ids(since=str(T0 + 60 * 18)) == [19, 18]
            event = (await client.get("/api/gateway/events", params={"limit": 1})).json()["events"][0]
            assert event == {"id": 20, "ts": T0 + 60 * 19, "time": "2026-03-02T12:19:00.000Z",
                             "family": "edgesentinel", "device_id": "dev-3", "type": "tamper_detected",
                             "severity": "warning", "data": {"i": 19}, "duration_s": None, "resolved": None}


async def test_cursor_pages_cover_everything_once(gateway_factory):
    async with gateway_factory() as gw:
        await fill(gw)
        async with gw_client(gw, headers=ADMIN) as client:
            seen, cursor, pages = [], None, 0
            while True:
                params = {"limit": 6, "family": "streetlight", **({"cursor": cursor} if cursor else {})}
                doc = (await client.get("/api/gateway/events", params=params)).json()
                seen += [e["data"]["i"] for e in doc["events"]]
                pages += 1
                cursor = doc["next_cursor"]
                if cursor is None:
                    break
            assert seen == list(range(18, -1, -2)) and pages == 2


@pytest.mark.parametrize("params,message", [
    ({"limit": "0"}, "limit: expected an integer 1-1000, got 0"),
    ({"limit": "many"}, "limit: expected an integer 1-1000, got 'many'"),
    ({"severity": "urgent"}, "severity: expected one of info, warning, critical, got 'urgent'"),
    ({"since": "yesterday"}, "since: expected an ISO 8601 time (2026-01-02T03:04:05Z) or epoch seconds, "
                             "got 'yesterday'"),
    ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor: not a cursor returned by this API"),
])
async def test_bad_filters_get_a_precise_400(gateway_factory, params, message):
    async with gateway_factory() as gw:
        async with gw_client(gw, headers=ADMIN) as client:
            r = await client.get("/api/gateway/events", params=params)
            assert r.status_code == 400
            assert r.json()["error"]["message"] == message


async def test_the_events_api_needs_the_admin_token(gateway_factory):
    async with gateway_factory() as gw:
        async with gw_client(gw) as client:
            assert (await client.get("/api/gateway/events")).status_code == 401
            assert (await client.get("/api/gateway/alerts")).status_code == 401


@pytest.mark.parametrize("kwargs,message", [
    ({"type": "has space"}, "type: expected letters, digits and _ . : - (at most 64), got 'has space'"),
    ({"severity": "fatal"}, "severity: expected one of info, warning, critical, got 'fatal'"),
    ({"data": {"x": float("nan")}}, "data: not JSON-serializable: Out of range float values are not JSON compliant"),
    ({"data": [1, 2]}, "data: expected a dict, got list"),
    ({"duration_s": -1}, "duration_s: expected a number >= 0 or None, got -1"),
])
async def test_bad_events_are_refused_counted_and_not_stored(gateway_factory, kwargs, message):
    async with gateway_factory() as gw:
        args = {"type": "ok", **kwargs}
        etype = args.pop("type")
        with pytest.raises(EventError) as info:
            await gw.events.emit("fam", "d1", etype, **args)
        assert str(info.value) == message
        assert gw.metrics.counter("gatewayd_events_rejected_total", "", ("family",)).value(family="fam") == 1
        rows, _ = await gw.events.query(EventQuery())
        assert rows == []


async def test_hook_alert_rules(gateway_factory):
    """A plugin's default rule is loaded (family = the plugin) and fires via ctx.events."""
    plugin_everything.calls.clear()
    async with gateway_factory(plugins=[EVERYTHING], settings=["plugins.everything.threshold=50"]) as gw:
        assert "alert_rules" in plugin_everything.calls
        (rule,) = gw.events.engine.rules
        assert (rule.name, rule.family, rule.source) == ("everything-high-reading", "everything", "plugin:everything")
        ctx = gw.contexts["everything"]
        await ctx.events.emit("d1", "reading", {"value": 40})
        await gw.events.emit("other", "d1", "reading", {"value": 99})  # another family: not this rule
        assert gw.events.engine.stats.fired == 0
        await ctx.events.emit("d1", "reading", {"value": 60})
        assert gw.events.engine.stats.by_rule == {"everything-high-reading": 1}


async def test_a_family_sees_its_active_alerts(gateway_factory):
    """ctx.events.active(): this family's alerts firing now, until resolved; not another family's."""
    config = ('[[rules]]\nname = "door-open"\ntype = "door_open"\nactions = [{ kind = "log" }]\n'
              '[[rules]]\nname = "any-tamper"\ntype = "tamper_detected"\nactions = [{ kind = "log" }]\n')
    async with gateway_factory(plugins=[EVERYTHING], settings=["plugins.everything.threshold=50"],
                               config_text=config) as gw:
        events = gw.contexts["everything"].events
        assert events.active() == []
        await events.emit("d1", "door_open", resolved=False)
        await events.emit("d2", "reading", {"value": 60})
        await gw.events.emit("other", "d9", "tamper_detected")  # another family's
        assert events.active() == [("door-open", "d1", "door_open"), ("everything-high-reading", "d2", "reading")]
        await events.emit("d1", "door_open", resolved=True)
        assert events.active() == [("everything-high-reading", "d2", "reading")]


async def test_a_config_rule_of_the_same_name_switches_a_plugin_rule_off(gateway_factory):
    config = '[[rules]]\nname = "everything-high-reading"\nenabled = false\n'
    async with gateway_factory(plugins=[EVERYTHING], config_text=config) as gw:
        assert gw.events.engine.rules == []
        await gw.contexts["everything"].events.emit("d1", "reading", {"value": 1000})
        assert gw.events.engine.stats.fired == 0


async def test_an_invalid_plugin_rule_fails_that_plugin_only(gateway_factory):
    bad = types.ModuleType("badrules")
    bad.gatewayd_alert_rules = hookimpl(lambda ctx: [{"name": "x", "when": ["t >> 1"], "actions": [{"kind": "log"}]}])
    async with gateway_factory(plugins=[EVERYTHING, ("badrules", bad)]) as gw:
        assert gw.health.plugins["badrules"].state == "failed"
        assert gw.health.plugins["badrules"].reason.startswith("alert rules: plugins.badrules.alert_rules[0].when[0]")
        assert gw.health.plugins["everything"].state == "ok"
        assert [r.name for r in gw.events.engine.rules] == ["everything-high-reading"]


async def test_presence_style_emit_signature(gateway_factory):
    """presence calls `await emit(family, device_id, type, data)` positionally."""
    async with gateway_factory() as gw:
        event = await gw.events.emit("paku", "pk-1", "device_offline", {"last_seen": T0})
        assert (event.id, event.severity, event.resolved) == (1, "info", None)


def gatewayd(*args, data_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gatewayd", *args, "--set", f"gateway.data_dir='{data_dir}'"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


async def test_cli_events_and_alerts_list(gateway_factory, tmp_path):
    rules = '[[rules]]\nname = "tamper"\ntype = "tamper_detected"\ncooldown_s = 0\nactions = [{ kind = "log" }]\n'
    async with gateway_factory(config_text=rules) as gw:
        await fill(gw)

        async def all_sent():
            return len(await gw.storage.read(list_notifications, "sent", 100)) >= 7

        await wait_until(all_sent)
    data_dir = tmp_path / "var"
    result = await trio.to_thread.run_sync(functools.partial(
        gatewayd, "events", "list", "--family", "edgesentinel", "--type", "sd_error", "--json", data_dir=data_dir))
    assert result.returncode == 0, result.stderr
    assert [e["data"]["i"] for e in json.loads(result.stdout)["events"]] == [17, 11, 5]
    result = await trio.to_thread.run_sync(functools.partial(
        gatewayd, "events", "list", "--severity", "critical", "--limit", "2", data_dir=data_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:6] == ["ID", "TIME", "FAMILY", "DEVICE", "TYPE", "SEVERITY"]
    assert "sd_error" in lines[1] and lines[-1].startswith("(more: --cursor ")
    result = await trio.to_thread.run_sync(functools.partial(
        gatewayd, "alerts", "list", "--state", "sent", "--json", data_dir=data_dir))
    alerts = json.loads(result.stdout)["alerts"]
    assert len(alerts) == 7 and {(a["rule"], a["action"], a["state"]) for a in alerts} == {("tamper", "log", "sent")}
    result = await trio.to_thread.run_sync(functools.partial(
        gatewayd, "events", "list", "--since", "noon", data_dir=data_dir))
    assert result.returncode == 2 and "expected an ISO 8601 time" in result.stderr
