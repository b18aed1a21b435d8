"""Bad input to paku's HTTP API: a precise 4xx (or 507/503) in paku's error shape, never a 500.

Each case here answered 500 before (issue 14, item 5).
"""

import base64
import json

from paku_testbed import AUTH, PAKU

from gatewayd.testing import gw_client, storage_failing, storage_full


def error_of(r, status: int) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and isinstance(error["code"], str)
    return error["message"]


async def test_bodies_that_are_not_strict_json_are_400(gateway_factory):
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        await client.post("/paku/devices", headers=AUTH, json={"id": "pk-1"})
        cases = [
            (b'{"id": "pk-2", "notes": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nested deeper than 64"),
            (b'{"a": ' * 5000, "nested deeper than 64"),
            (b'{"id": "pk-2", "name": "caf\xe9"}', "body: not UTF-8"),
            (b'{"id": "pk-2", "notes": NaN}', "notes: NaN"),
            (b'{"id": "pk-2", "n": 123456789012345678901234567890}', "n: 123456789012345678901234567890 is outside"),
            (b'{"id": "pk-2", "name": "\\udc00"}', "name: a lone surrogate"),
        ]
        for method, path, headers in [("POST", "/paku/devices", AUTH), ("PATCH", "/paku/devices/pk-1", AUTH),
                                      ("POST", "/paku/claim", {})]:
            for raw, message in cases:
                r = await client.request(method, path, headers=headers, content=raw)
                assert message in error_of(r, 400), (method, path, raw[:40], r.text)
        r = await client.get("/api/gateway/devices", headers=AUTH)
        assert [d["id"] for d in r.json()["devices"]] == ["pk-1"]


async def test_query_parameters_and_cursors_out_of_range_are_400(gateway_factory):
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        await client.post("/paku/devices", headers=AUTH, json={"id": "pk-1"})

        def cursor(doc) -> str:
            return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

        cases = [
            ({"limit": "²"}, "limit:"),
            ({"limit": "٣"}, "limit:"),
            ({"limit": "9" * 5000}, "limit:"),
            ({"cursor": cursor([1.0, 10**30])}, "cursor:"),
            ({"cursor": cursor([10**400, 1])}, "cursor:"),
            ({"cursor": cursor([1.0, -(2**63) - 1])}, "cursor:"),
            ({"cursor": "%%%"}, "cursor:"),
            ({"cursor": base64.urlsafe_b64encode(b"[" * 1000 + b"]" * 1000).decode()}, "cursor:"),
        ]
        for params, field in cases:
            r = await client.get("/paku/devices/pk-1/telemetry", headers=AUTH, params=params)
            assert error_of(r, 400).startswith(field), (params, r.text)
        r = await client.get("/paku/ota/99999999999999999999999/firmware.bin")
        assert error_of(r, 404).startswith("no paku firmware")


async def test_field_limits_are_400_naming_the_field(gateway_factory):
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        await client.post("/paku/devices", headers=AUTH, json={"id": "pk-1"})
        cases = [({"name": "n" * 200_000}, "'name'"), ({"model": "m" * 129}, "'model'"),
                 ({"firmware": "f" * 65}, "'firmware'"), ({"notes": "x" * 4097}, "'notes'")]
        for doc, field in cases:
            for method, path in [("POST", "/paku/devices"), ("PATCH", "/paku/devices/pk-1")]:
                r = await client.request(method, path, headers=AUTH, json=doc)
                assert field in error_of(r, 400), (method, doc.keys(), r.text)
        r = await client.patch("/paku/devices/pk-1", headers=AUTH, json={"name": "n" * 256, "notes": "é" * 4096})
        assert r.status_code == 200 and r.json()["name"] == "n" * 256


async def test_a_full_disk_is_507_and_a_failing_database_503(gateway_factory):
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        await client.post("/paku/devices", headers=AUTH, json={"id": "pk-1"})
        r = await client.post("/api/gateway/devices/claim-codes", headers=AUTH, json={"family": "paku"})
        code = r.json()["claim_code"]["code"]
        async with storage_full(gw):
            r = await client.post("/paku/devices", headers=AUTH, json={"id": "pk-2", "notes": "x" * 4000})
            assert "storage full" in error_of(r, 507)
            r = await client.patch("/paku/devices/pk-1", headers=AUTH, json={"notes": "x" * 4000})
            assert "storage full" in error_of(r, 507)
        async with storage_failing(gw):
            for method, path, doc in [("POST", "/paku/devices", {"id": "pk-3"}), ("PATCH", "/paku/devices/pk-1", {}),
                                      ("POST", "/paku/claim", {"code": code})]:
                r = await client.request(method, path, headers=AUTH, json=doc)
                assert "storage" in error_of(r, 503), (method, path, r.text)
        r = await client.post("/paku/claim", json={"code": code, "id": "pk-4"})
        assert r.status_code == 201, r.text  # the failed claim did not spend the code
