"""Tokens with the spec's roles, issued by the gateway: observer reads, researcher also
changes simulation and entrainment, admin everything."""

from kaiabc_testbed import AUTH, KAIABC, V1, register

from gatewayd.testing import gw_client
from test_api_sensors import error


async def token(client, name, role):
    r = await client.post(f"{V1}/auth/tokens", headers=AUTH, json={"name": name, "role": role, "ttl_days": 1})
    assert r.status_code == 201, r.text
    assert r.json()["role"] == role and r.json()["token"].startswith("kbt_")
    return {"Authorization": f"Bearer {r.json()['token']}"}


async def test_roles(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        await register(client)
        observer, researcher = await token(client, "screen", "observer"), await token(client, "lab", "researcher")
        error(await client.post(f"{V1}/auth/tokens", headers=AUTH, json={"name": "lab", "role": "admin"}),
              409, "CONFLICT")
        error(await client.post(f"{V1}/auth/tokens", headers=researcher, json={"name": "x", "role": "admin"}),
              403, "PERMISSION_DENIED")
        listed = (await client.get(f"{V1}/auth/tokens", headers=AUTH)).json()["tokens"]
        assert [(t["name"], t["role"]) for t in listed] == [("lab", "researcher"), ("screen", "observer")]
        assert "token" not in listed[0]

        for who in (observer, researcher):
            r = await client.get(f"{V1}/oscillator/state", headers=who, params={"node_id": "pico_001"})
            assert r.status_code == 200, r.text
            assert (await client.get(f"{V1}/sensors/nodes", headers=who)).status_code == 200
        pause = {"node_id": "pico_001"}
        body = error(await client.post(f"{V1}/simulation/pause", headers=observer, json=pause), 403,
                     "PERMISSION_DENIED")
        assert body["details"] == {"role": "observer", "required_role": "researcher"}
        assert (await client.post(f"{V1}/simulation/pause", headers=researcher, json=pause)).status_code == 200
        r = await client.put(f"{V1}/entrainment/parameters", headers=researcher,
                             json={"node_id": "pico_001", "parameters": {"structural_coupling": {"sensitivity": 1.0}}})
        assert r.status_code == 200
        error(await client.put(f"{V1}/output/mapping", headers=researcher, json={"invert": True}), 403,
              "PERMISSION_DENIED")
        r = await client.delete(f"{V1}/auth/tokens/screen", headers=AUTH)
        assert r.json() == {"success": True, "name": "screen"}
        error(await client.get(f"{V1}/sensors/nodes", headers=observer), 401, "AUTHENTICATION_FAILED")
        error(await client.delete(f"{V1}/auth/tokens/screen", headers=AUTH), 404, "NOT_FOUND")
        error(await client.get(f"{V1}/sensors/nodes", headers={"Authorization": "Bearer kbt_forged"}), 401,
              "AUTHENTICATION_FAILED")
