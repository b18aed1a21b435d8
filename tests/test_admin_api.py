"""The admin device API: token required; provision, list, show, disable, rotate, commands, claim codes."""

import types

import pytest
import trio

from gatewayd.testing import gw_client
from tests import plugin_devices

TOKEN = "admin-secret-for-tests"
KEY = "m1-token-for-tests"


def families(*names: str) -> list:
    """Plugins with no hooks: a family exists (devices may be added) once its plugin is enabled."""
    return [(name, types.ModuleType(name)) for name in names]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


async def test_without_the_token(gateway_factory, admin_token):
    with trio.fail_after(30):
        async with gateway_factory() as gw, gw_client(gw) as client:
            for method, path in [("GET", "/api/gateway/devices"), ("POST", "/api/gateway/devices"),
                                 ("POST", "/api/gateway/devices/x/rotate")]:
                r = await client.request(method, path, json={"family": "kaiabc"})
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
                r = await client.request(method, path, headers={"Authorization": "Bearer wrong"})
                assert r.status_code == 401
            assert await gw.devices.registry.list() == []


async def test_disabled_when_no_token_is_configured(gateway_factory, monkeypatch):
    monkeypatch.delenv("GATEWAYD_ADMIN_TOKEN", raising=False)
    with trio.fail_after(30):
        async with gateway_factory() as gw, gw_client(gw) as client:
            r = await client.get("/api/gateway/devices", headers=AUTH)
            assert r.status_code == 503 and "GATEWAYD_ADMIN_TOKEN" in r.json()["error"]["message"]


async def test_provision_list_show_disable(gateway_factory, admin_token):
    with trio.fail_after(30):
        async with gateway_factory(plugins=[("meter", plugin_devices)]) as gw, gw_client(gw) as client:
            r = await client.post("/api/gateway/devices", headers=AUTH,
                                  json={"family": "meter", "id": "m1", "name": "Meter 1", "metadata": {"floor": 2}})
            assert r.status_code == 201
            doc = r.json()
            key = doc["credentials"]["key"]
            assert doc["device"]["status"] == "provisioned" and doc["credentials"]["mqtt_username"] == "m1"

            r = await client.post("/api/gateway/devices", headers=AUTH, json={"family": "meter", "id": "m1"})
            assert r.status_code == 409
            r = await client.post("/api/gateway/devices", headers=AUTH, json={"id": "m2"})
            assert r.status_code == 400
            r = await client.post("/api/gateway/devices", headers=AUTH, json={"family": "meter", "id": "bad id"})
            assert r.status_code == 400 and "device id" in r.json()["error"]["message"]
            r = await client.post("/api/gateway/devices", headers=AUTH, content=b"[1,2]")
            assert r.status_code == 400

            r = await client.get("/api/gateway/devices", headers=AUTH)
            assert [d["id"] for d in r.json()["devices"]] == ["m1"]
            assert "credentials" not in r.text and key not in r.text  # shown once, never again
            r = await client.get("/api/gateway/devices/m1", headers=AUTH)
            assert r.json()["device"]["metadata"] == {"floor": 2} and r.json()["device"]["online"] is False
            assert (await client.get("/api/gateway/devices/nope", headers=AUTH)).status_code == 404

            assert (await client.post("/meter/ingest", headers={"X-API-Key": key})).status_code == 200
            r = await client.get("/api/gateway/devices/m1", headers=AUTH)
            assert r.json()["device"]["status"] == "active" and r.json()["device"]["online"] is True

            r = await client.post("/api/gateway/devices/m1/disable", headers=AUTH)
            assert r.json()["device"]["status"] == "disabled"
            assert (await client.post("/meter/ingest", headers={"X-API-Key": key})).status_code == 403
            r = await client.post("/api/gateway/devices/m1/enable", headers=AUTH)
            assert (await client.post("/meter/ingest", headers={"X-API-Key": key})).status_code == 200


async def test_rotate_and_revoke(gateway_factory, admin_token):
    with trio.fail_after(30):
        async with gateway_factory(plugins=[("meter", plugin_devices)]) as gw, gw_client(gw) as client:
            r = await client.post("/api/gateway/devices", headers=AUTH, json={"family": "meter", "id": "m1"})
            old = r.json()["credentials"]["key"]
            r = await client.post("/api/gateway/devices/m1/rotate", headers=AUTH)
            new = r.json()["credentials"]["key"]
            assert new != old
            assert (await client.post("/meter/ingest", headers={"X-API-Key": old})).status_code == 401
            assert (await client.post("/meter/ingest", headers={"X-API-Key": new})).status_code == 200
            r = await client.post("/api/gateway/devices/m1/rotate", headers=AUTH, json={"grace_s": -1})
            assert r.status_code == 400
            assert (await client.post("/api/gateway/devices/m1/revoke", headers=AUTH)).json()["revoked"] is True
            assert (await client.post("/meter/ingest", headers={"X-API-Key": new})).status_code == 401


async def test_same_id_in_two_families_needs_family(gateway_factory, admin_token):
    with trio.fail_after(30):
        async with gateway_factory(plugins=families("kaiabc", "paku")) as gw, gw_client(gw) as client:
            for family in ("kaiabc", "paku"):
                r = await client.post("/api/gateway/devices", headers=AUTH, json={"family": family, "id": "d1"})
                assert r.status_code == 201
            assert (await client.get("/api/gateway/devices/d1", headers=AUTH)).status_code == 409
            r = await client.get("/api/gateway/devices/d1", headers=AUTH, params={"family": "paku"})
            assert r.json()["device"]["family"] == "paku"
            r = await client.get("/api/gateway/devices", headers=AUTH, params={"family": "kaiabc"})
            assert [d["family"] for d in r.json()["devices"]] == ["kaiabc"]


async def test_commands(gateway_factory, admin_token):
    with trio.fail_after(30):
        async with gateway_factory(plugins=[("meter", plugin_devices)]) as gw, gw_client(gw) as client:
            await client.post("/api/gateway/devices", headers=AUTH,
                              json={"family": "meter", "id": "m1", "key": KEY})
            r = await client.post("/api/gateway/devices/m1/commands", headers=AUTH,
                                  json={"payload": {"action": "on"}, "ttl_s": 60, "priority": 2})
            assert r.status_code == 201
            cid = r.json()["command"]["id"]
            for bad in ({}, {"payload": 1, "ttl_s": 0}, {"payload": 1, "priority": "high"}):
                r = await client.post("/api/gateway/devices/m1/commands", headers=AUTH, json=bad)
                assert r.status_code == 400
            r = await client.get("/meter/commands", params={"device_token": KEY})
            assert [c["id"] for c in r.json()["commands"]] == [cid]
            r = await client.get("/api/gateway/devices/m1/commands", headers=AUTH)
            assert [(c["id"], c["status"]) for c in r.json()["commands"]] == [(cid, "delivered")]


async def test_claim_codes(gateway_factory, admin_token):
    with trio.fail_after(30):
        async with gateway_factory(plugins=families("edgesentinel")) as gw, gw_client(gw) as client:
            await client.post("/api/gateway/devices", headers=AUTH, json={"family": "edgesentinel", "id": "door-1"})
            r = await client.post("/api/gateway/devices/claim-codes", headers=AUTH,
                                  json={"family": "edgesentinel", "device_id": "door-1", "ttl_s": 600})
            assert r.status_code == 201
            code = r.json()["claim_code"]["code"]
            device, creds = await gw.devices.registry.redeem_claim_code("edgesentinel", code)
            assert device.status == "claimed" and creds is None
            r = await client.post("/api/gateway/devices/claim-codes", headers=AUTH,
                                  json={"family": "edgesentinel", "device_id": "ghost"})
            assert r.status_code == 404
            r = await client.post("/api/gateway/devices/claim-codes", headers=AUTH, json={"family": "edgesentinel", "ttl_s": -5})
            assert r.status_code == 400
