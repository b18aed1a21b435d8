"""The spec's workflows as the family's default rules, firing real webhooks at a local
HTTP server: an event a node reports, the gateway's own connectivity_lost from silence
with its L1 -> L2 -> L3 escalation, the operating hours of a light-curtain breach, and a
node's retry count."""

from __future__ import annotations

import functools
import json
from contextlib import asynccontextmanager

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio
from sentinel_testbed import API, OPEN, PLUGIN, T0, compress, upload

from gatewayd.testing import gw_client, provision, wait_until


TOKEN = "es-workflows-token"


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


class Hooks:
    """A local webhook endpoint per team: `/hook/<team>`; what each received."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict]] = []
        self.app = QuartTrio("hooks")
        self.app.add_url_rule("/hook/<team>", "hook", self.hook, methods=["POST"])

    async def hook(self, team: str):
        self.received.append((team, json.loads(await request.get_data())))
        return {"ok": True}

    def rules(self, team: str) -> list[str]:
        return [doc["rule"] for t, doc in self.received if t == team]


@asynccontextmanager
async def serving(hooks: Hooks):
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(functools.partial(serve, hooks.app, config, shutdown_trigger=stop.wait))
        yield urls[0]
        stop.set()


def teams(url: str, *names: str) -> list[str]:
    out = []
    for name in names:
        out += [f"plugins.edgesentinel.teams.{name}.webhooks=[{{url='{url}/hook/{name}'}}]",
                f"plugins.edgesentinel.teams.{name}.email=['{name}@site.example']"]
    return out


async def test_reported_events_fire_their_workflows(gateway_factory):
    hooks = Hooks()
    async with serving(hooks) as url:
        settings = [*OPEN, *teams(url, "security", "it", "maintenance")]
        async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
            node = await provision(gw, "edgesentinel", "es-1")
            noon = T0 + 12 * 3600  # inside 07:00-19:00 UTC: a breach is expected then
            doc = {"system_events": [
                {"ts": T0, "event_type": "tamper_detected", "severity": "critical", "description": "lid open"},
                {"ts": noon, "event_type": "light_curtain_breach", "severity": "warning"},
                {"ts": T0 + 60, "event_type": "light_curtain_breach", "severity": "warning"},  # 00:01: outside
                {"ts": T0, "event_type": "supercap_low", "severity": "warning",
                 "meta": {"voltage": 9.0, "rated_voltage": 12.0}}],
                "diagnostics": {"retry_count": 7}}
            r = await client.post(f"{API}/telemetry/batch", **upload(node, compress(doc)))
            assert r.status_code == 200 and r.json()["accepted"] == 4, r.text
            await wait_until(lambda: len(hooks.received) >= 4, what="four webhooks")
            assert sorted(hooks.rules("security")) == ["edgesentinel-light-curtain", "edgesentinel-tamper"]
            assert hooks.rules("maintenance") == ["edgesentinel-supercap-low"]
            assert hooks.rules("it") == ["edgesentinel-server-unreachable"]
            [tamper] = [d for t, d in hooks.received if d["rule"] == "edgesentinel-tamper"]
            assert tamper["device_id"] == "es-1" and "security@site.example" in tamper["to"]
            # Both breaches are stored as events (/api/gateway/events); the one at noon raised nothing.
            r = await client.get("/api/gateway/events", headers={"Authorization": f"Bearer {TOKEN}"},
                                 params={"family": "edgesentinel", "type": "light_curtain_breach"})
            assert sorted(e["ts"] for e in r.json()["events"]) == [T0 + 60, noon]


async def test_silence_is_connectivity_lost_and_escalates_l1_l2_l3(gateway_factory):
    hooks = Hooks()
    async with serving(hooks) as url:
        settings = [*OPEN, *teams(url, "maintenance", "l2", "l3"), "devices.presence_flush_s=0.2",
                    "plugins.edgesentinel.silence_s=0.5", "plugins.edgesentinel.connectivity_lost_s=1.5",
                    "plugins.edgesentinel.escalate_l2_s=3", "plugins.edgesentinel.escalate_l3_s=4.5"]
        async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
            node = await provision(gw, "edgesentinel", "es-1")
            r = await client.post(f"{API}/auth/handshake", headers={"X-Device-Id": "es-1", "X-Auth-Key": node.key})
            assert r.status_code == 200
            await wait_until(lambda: len(hooks.received) >= 3, what="alert, L2, L3", timeout=30)
            order = [(t, d["rule"], d["level"]) for t, d in hooks.received]
            assert order == [("maintenance", "edgesentinel-connectivity-lost", "alert"),
                             ("l2", "edgesentinel-connectivity-lost", "escalation"),
                             ("l3", "edgesentinel-connectivity-lost-l3", "alert")], order


async def test_a_node_back_in_time_raises_nothing(gateway_factory):
    hooks = Hooks()
    async with serving(hooks) as url:
        settings = [*OPEN, *teams(url, "maintenance"), "devices.presence_flush_s=0.2",
                    "plugins.edgesentinel.silence_s=0.5", "plugins.edgesentinel.connectivity_lost_s=2",
                    "plugins.edgesentinel.escalate_l2_s=3", "plugins.edgesentinel.escalate_l3_s=4"]
        async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
            node = await provision(gw, "edgesentinel", "es-1")
            headers = {"X-Device-Id": "es-1", "X-Auth-Key": node.key}
            for _ in range(12):  # a node heard every 0.3 s for 3.6 s: never silent long enough
                assert (await client.post(f"{API}/auth/handshake", headers=headers)).status_code == 200
                await trio.sleep(0.3)
            assert hooks.received == []
