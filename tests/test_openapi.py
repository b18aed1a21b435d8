"""The OpenAPI documents: built from the declarations that validate requests, served per
listener and per mount, behind the admin token (or a dashboard session) unless a plugin's
are made public; a validation failure answered in the family's own shape; the page to
read them, markup only."""

from __future__ import annotations

import gzip
import re
from typing import Annotated, Any

import pytest
import zstandard
from msgspec import Meta, Struct
from quart import Blueprint, Response, jsonify, request

from gatewayd.core.http.declare import operation_of
from gatewayd.plugins.api import BadJSON, DeviceAuth, Routes, hookimpl
from gatewayd.testing import gw_client, provision

TOKEN = "admin-token-for-openapi"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


class NewReading(Struct, forbid_unknown_fields=True):
    """A reading of one device."""

    value: Annotated[float, Meta(ge=-100, le=100)]


class Stored(Struct):
    id: int


class Window(Struct):
    limit: Annotated[int, Meta(ge=1, le=50)] = 10


class Refusal(Struct):
    """This family's error shape (its specification's, not the gateway's)."""

    ok: bool
    reason: str


class Thermo:
    """A family with an error shape of its own: `{"ok": false, "reason": ...}`."""

    @hookimpl
    def gatewayd_http_routes(self, ctx: Any) -> Blueprint:
        bp = Blueprint(ctx.name, __name__)
        routes = Routes(bp, error=Refusal, tag=ctx.name, auth=DeviceAuth.api_key())

        @bp.errorhandler(BadJSON)  # one handler: strict JSON and declarations alike
        async def bad_input(e: BadJSON) -> Response:
            response = jsonify({"ok": False, "reason": str(e)})
            response.status_code = 400
            return response

        @routes.post("/devices/<device_id>/readings", body=NewReading, responses={201: Stored})
        async def post_reading(device_id: str, body: NewReading) -> tuple[Stored, int]:
            """Store a reading."""
            await ctx.auth.api_key(request.headers, request.remote_addr, device_id=device_id)
            return Stored(int(body.value)), 201

        @routes.post("/batch", body=list[NewReading], auth=None, max_inflated=4096, responses={200: Stored})
        async def post_batch(body: list[NewReading]) -> Stored:
            """Count a batch of readings, gzip or zstd accepted."""
            return Stored(len(body))

        @routes.get("/recent", query=Window, auth=None, responses={200: list[Stored]})
        async def recent(query: Window) -> Any:
            """The newest readings."""
            return [{"id": i} for i in range(query.limit)]

        @routes.get("/devices/<device_id>/since", path={"device_id": ThermoId}, query=Since, auth=None,
                    responses={200: Stored})
        async def since(device_id: str, query: Since) -> Stored:
            """Readings of one device since a time."""
            return Stored(int(query.after) + len(device_id))

        return bp


ThermoId = Annotated[str, Meta(pattern="^t[0-9]{1,4}$")]


class Since(Struct, forbid_unknown_fields=True):
    after: float


PLUGIN = [("thermo", Thermo())]


async def test_the_documents_need_the_admin_token_or_a_dashboard_session(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        for path in ("/openapi.json", "/thermo/openapi.json"):
            r = await client.get(path)
            assert r.status_code == 401 and "admin token" in r.json()["error"]["message"]
            assert (await client.get(path, headers=ADMIN)).json()["openapi"] == "3.1.0"
        r = await client.get("/docs")
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/login?next=%2Fdocs"
        cookie, _ = gw.sessions.login(TOKEN)
        client.cookies.set("gatewayd_session", cookie)
        r = await client.get("/docs")
        assert r.status_code == 200 and "/api/gateway/devices" in r.text


async def test_a_plugin_may_make_its_own_document_public(gateway_factory):
    settings = ["plugins.thermo.public_docs=true", "plugins.thermo.listen='127.0.0.1:0'"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client, \
            gw_client(gw, "thermo") as own:
        doc = (await client.get("/thermo/openapi.json")).json()
        assert sorted(doc["paths"]) == ["/thermo/batch", "/thermo/devices/{device_id}/readings",
                                   "/thermo/devices/{device_id}/since", "/thermo/recent"]
        assert (await client.get("/thermo/docs")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 401  # the whole gateway's is not
        own_doc = (await own.get("/openapi.json")).json()
        assert sorted(own_doc["paths"]) == ["/batch", "/devices/{device_id}/readings", "/devices/{device_id}/since",
                                            "/recent"]


async def test_a_document_says_what_the_declarations_check(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw, headers=ADMIN) as client:
        doc = (await client.get("/thermo/openapi.json")).json()
        post = doc["paths"]["/thermo/devices/{device_id}/readings"]["post"]
        schemas = doc["components"]["schemas"]
        assert post["requestBody"] == {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/NewReading"}}}}
        assert schemas["NewReading"]["properties"]["value"] == {"type": "number", "minimum": -100, "maximum": 100}
        assert schemas["NewReading"]["additionalProperties"] is False
        assert post["security"] == [{"deviceKey": []}]
        assert doc["components"]["securitySchemes"]["deviceKey"]["name"] == "X-API-Key"
        refusal = {"$ref": "#/components/schemas/Refusal"}
        for status in ("400", "401", "403", "429"):  # the family's shape: validation and device auth
            assert post["responses"][status]["content"]["application/json"]["schema"] == refusal, status
        core = {"$ref": "#/components/schemas/ErrorBody"}
        # No EncodingError handler on its Blueprint: the core answers a body over http.max_body_bytes.
        assert post["responses"]["413"]["content"]["application/json"]["schema"] == core
        assert post["responses"]["503"]["content"]["application/json"]["schema"] == {"anyOf": [refusal, core]}
        recent = doc["paths"]["/thermo/recent"]["get"]
        assert "security" not in recent
        assert recent["parameters"] == [{"name": "limit", "in": "query", "required": False, "schema": {
            "type": "integer", "minimum": 1, "maximum": 50, "default": 10}}]
        assert "Window" not in schemas  # a query's fields are parameters, not a schema


async def test_a_refusal_of_the_declaration_is_answered_in_the_familys_shape(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        creds = await provision(gw, "thermo", "t1")
        post = "/thermo/devices/t1/readings"
        for body, reason in ((b'{"value": 500}', "value: expected a number -100-100, got 500"),
                             (b'{"value": "hot"}', "value: expected a number, got a string"),
                             (b'{"value": 1, "unit": "C"}', "unit: unknown field (expected value)"),
                             (b'{"value": NaN}', "value: NaN is not a JSON number (only finite numbers are)"),
                             (b"", "body: expected a JSON object, got an empty body")):
            r = await client.post(post, content=body, headers={"X-API-Key": creds.key})
            assert (r.status_code, r.json()) == (400, {"ok": False, "reason": reason}), body
        r = await client.post(post, json={"value": 21.5}, headers={"X-API-Key": creds.key})
        assert (r.status_code, r.json()) == (201, {"id": 21})
        r = await client.get("/thermo/recent", params={"limit": "1e3"})
        assert r.json() == {"ok": False, "reason": "limit: expected an integer 1-50, got '1e3'"}
        assert (await client.get("/thermo/recent", params={"limit": "2"})).json() == [{"id": 0}, {"id": 1}]
        for _ in range(2):  # the second time as the first: from what was remembered or made once
            assert len((await client.get("/thermo/recent")).json()) == 10
            assert len((await client.get("/thermo/recent?")).json()) == 10
            r = await client.get("/thermo/devices/t12/since", params={"after": "5"})
            assert (r.status_code, r.json()) == (200, {"id": 8})
            r = await client.get("/thermo/devices/x12/since", params={"after": "5"})
            assert (r.status_code, r.json()["ok"]) == (400, False)
            assert r.json()["reason"] == "path: expected a string matching regex '^t[0-9]{1,4}$'"  # as before
            r = await client.get("/thermo/devices/t12/since")
            assert r.json() == {"ok": False, "reason": "after: required"}
            r = await client.get("/thermo/devices/t12/since", params={"afterr": "5"})
            assert r.json() == {"ok": False, "reason": "afterr: unknown query parameter (expected after)"}


async def test_a_declared_body_may_come_compressed(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw, headers=ADMIN) as client:
        batch = b'[{"value": 1}, {"value": 2}]'
        for encoding, body in (("gzip", gzip.compress(batch)), ("zstd", zstandard.compress(batch)),
                               ("identity", batch)):
            r = await client.post("/thermo/batch", content=body, headers={"Content-Encoding": encoding})
            assert (r.status_code, r.json()) == (200, {"id": 2}), encoding
        r = await client.post("/thermo/batch", content=gzip.compress(b'[{"value": 1}]' * 1000),
                              headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and "4096" in r.text
        r = await client.post("/thermo/batch", content=gzip.compress(batch)[:-6], headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400
        r = await client.post("/thermo/batch", content=batch, headers={"Content-Encoding": "br"})
        assert r.status_code == 415
        r = await client.post("/thermo/batch", content=gzip.compress(b'[{"value": 500}]'),
                              headers={"Content-Encoding": "gzip"})
        assert r.json() == {"ok": False, "reason": "[0].value: expected a number -100-100, got 500"}
        post = (await client.get("/thermo/openapi.json")).json()["paths"]["/thermo/batch"]["post"]
        assert {"400", "413", "415"} <= set(post["responses"])
        assert "4096 bytes once inflated" in post["responses"]["413"]["description"]
        # Without max_inflated the body is taken as sent: compressed bytes are no JSON.
        r = await client.post("/thermo/devices/t1/readings", content=gzip.compress(b'{"value": 1}'),
                              headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400


# Served on the main listener, in no document: pages for people, their assets, the documents.
UNDOCUMENTED = {"/", "/dashboard/login", "/dashboard/logout", "/dashboard/devices/<device_id>",
                "/dashboard/devices/<device_id>/commands",  # the dashboard's pages and forms: HTML, not the API
                "/dashboard/static/<name>", "/static/<path:filename>", "/openapi.json", "/docs",
                "/thermo/openapi.json", "/thermo/docs"}


async def test_every_route_of_the_core_is_declared(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw, headers=ADMIN) as client:
        undeclared = {r.rule for r in gw.app.url_map.iter_rules()
                      if operation_of(gw.app.view_functions[r.endpoint]) is None}
        assert undeclared == UNDOCUMENTED
        doc = (await client.get("/openapi.json")).json()
        rules = {re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", r.rule) for r in gw.app.url_map.iter_rules()}
        assert set(doc["paths"]) == rules - {re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", u) for u in UNDOCUMENTED}
        for path, methods in doc["paths"].items():
            for method, op in methods.items():
                assert op.get("summary"), f"{method} {path}: no summary"
                if path.startswith("/api/gateway/"):
                    assert op.get("security"), f"{method} {path}: the admin API without auth"


async def test_the_page_is_markup_only(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw, headers=ADMIN) as client:
        r = await client.get("/docs")
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert r.headers["content-security-policy"].startswith("default-src 'none';")
        assert "<script" not in r.text and "http://" not in r.text and "https://" not in r.text
        assert '<span class="path">/api/gateway/devices/{device_id}/rotate</span>' in r.text
        assert 'id="schema-NewDevice"' in r.text
        page = (await client.get("/thermo/docs")).text
        assert "/thermo/recent" in page and "/api/gateway/devices" not in page
