"""Maintenance mode: the operator's switch (CLI, admin API), read by plugins as ctx.maintenance."""

from __future__ import annotations

import json
import sys

import pytest
import trio

from gatewayd.testing import gw_client, wait_until
from tests import plugin_ingest

TOKEN = "maint-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PLUGIN = [("ingest", plugin_ingest)]


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


async def test_the_admin_api_switches_it_and_plugins_read_it(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        ctx = gw.contexts["ingest"]
        assert (await client.get("/api/gateway/maintenance")).status_code == 401
        r = await client.get("/api/gateway/maintenance", headers=ADMIN)
        assert r.json()["maintenance"]["active"] is False and not ctx.maintenance.active
        r = await client.put("/api/gateway/maintenance", headers=ADMIN,
                             json={"active": True, "reason": "replacing the switch", "retry_after_s": 600})
        state = r.json()["maintenance"]
        assert r.status_code == 200 and state["active"] and state["since"] is not None
        assert ctx.maintenance.active and ctx.maintenance.state.reason == "replacing the switch"
        assert ctx.maintenance.state.retry_after_s == 600
        health = await client.get("/health")  # the operator's choice, not a failure
        assert health.status_code == 200
        assert health.json()["components"]["maintenance"]["reason"] == "replacing the switch"
        assert "gatewayd_maintenance 1.0" in (await client.get("/metrics")).text
        r = await client.put("/api/gateway/maintenance", headers=ADMIN, json={"active": False})
        assert r.json()["maintenance"] == {"active": False, "reason": "", "since": None, "retry_after_s": 300}
        assert not ctx.maintenance.active
        assert (await client.get("/health")).json()["components"]["maintenance"]["state"] == "off"


@pytest.mark.parametrize("body, message", [
    ({}, "active: required"),
    ({"active": "yes"}, "active: expected a boolean, got a string"),
    ({"active": True, "retry_after_s": 0}, "retry_after_s: expected an integer 1-86400, got 0"),
    ({"active": True, "retry_after_s": 1.5}, "retry_after_s: expected an integer, got 1.5"),
    ({"active": True, "reason": "x" * 513}, "reason: expected a string of length <= 512"),
    ({"active": True, "resaon": "typo"}, "resaon: unknown field (expected active, reason, retry_after_s)"),
])
async def test_bad_changes_are_refused_naming_the_field(gateway_factory, body, message):
    async with gateway_factory() as gw, gw_client(gw) as client:
        r = await client.put("/api/gateway/maintenance", headers=ADMIN, json=body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert not gw.maintenance.state.active


async def test_it_survives_a_restart(gateway_factory):
    async with gateway_factory() as gw, gw_client(gw) as client:
        await client.put("/api/gateway/maintenance", headers=ADMIN, json={"active": True, "reason": "r"})
        since = gw.maintenance.state.since
    async with gateway_factory(plugins=PLUGIN) as gw:
        assert gw.contexts["ingest"].maintenance.active and gw.maintenance.state.since == since


async def test_the_cli_switches_a_running_gateway(gateway_factory, tmp_path):
    def cli(*args: str) -> list[str]:
        return [sys.executable, "-m", "gatewayd", "maintenance", *args, "--set", f"gateway.data_dir='{tmp_path / 'var'}'"]

    with trio.fail_after(60):
        async with gateway_factory(plugins=PLUGIN) as gw:
            ctx = gw.contexts["ingest"]
            done = await trio.run_process(cli("on", "--reason", "firmware rollout", "--retry-after", "120"),
                                          capture_stdout=True, capture_stderr=True)
            assert "maintenance mode ON" in done.stdout.decode() and "firmware rollout" in done.stdout.decode()
            await wait_until(lambda: ctx.maintenance.active, what="the daemon follows the CLI")
            assert ctx.maintenance.state.retry_after_s == 120
            done = await trio.run_process(cli("status", "--json"), capture_stdout=True)
            assert json.loads(done.stdout)["maintenance"]["active"] is True
            await trio.run_process(cli("off"), capture_stdout=True)
            await wait_until(lambda: not ctx.maintenance.active, what="the daemon follows the CLI off")
            bad = await trio.run_process(cli("on", "--retry-after", "0"), capture_stderr=True, check=False)
            assert bad.returncode == 2 and b"retry_after_s" in bad.stderr
