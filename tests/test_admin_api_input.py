"""Bad input to the core admin API: a precise 400 (or 404/507/503) in the core shape, never a 500.

Each case here answered 500 ("unhandled error in request") or was wrongly accepted
before (issue 14, items 5 and 6).
"""

import types

import pytest
import trio

from gatewayd.testing import gw_client, gw_url, storage_failing, storage_full

TOKEN = "admin-secret-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEVICES = "/api/gateway/devices"
# A family exists when a plugin of that name is enabled; these have no hooks at all.
FAMILIES = [("meter", types.ModuleType("meter")), ("other", types.ModuleType("other"))]


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


def error_of(r, status: int) -> str:
    """The message of a core-shaped error with `status`."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and isinstance(error["code"], str)
    return error["message"]


async def test_a_device_id_of_the_wrong_type_is_a_400_naming_the_field(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=FAMILIES) as gw, gw_client(gw) as client:
            for bad in (5, [1], {"a": 1}, True, ""):
                r = await client.post(DEVICES, headers=AUTH, json={"family": "meter", "id": bad})
                assert error_of(r, 400).startswith("id:"), r.text
            assert await gw.devices.registry.list() == []


DEEP = b'{"family": "meter", "metadata": ' + b"[" * 1000 + b"]" * 1000 + b"}"
WRITE_ROUTES = [f"{DEVICES}", f"{DEVICES}/claim-codes", f"{DEVICES}/m1/rotate", f"{DEVICES}/m1/commands"]


@pytest.mark.parametrize("path", WRITE_ROUTES)
async def test_deep_or_non_utf8_or_non_json_bodies_are_400(gateway_factory, path):
    with trio.fail_after(30):
        async with gateway_factory(plugins=FAMILIES) as gw, gw_client(gw) as client:
            await gw.devices.registry.provision("meter", "m1")
            cases = [
                (DEEP, "nested deeper than 64"),
                (b"[" * 100_000, "nested deeper than 64"),
                (b'{"family": "meter", "name": "caf\xe9"}', "body: not UTF-8"),
                (b"\xff\xfe{\x00}\x00", "body: not UTF-8"),
                (b'{"family": ', "body: not JSON"),
                (b"[1, 2]", "body: expected a JSON object, got an array"),
            ]
            for raw, message in cases:
                r = await client.post(path, headers=AUTH, content=raw)
                assert message in error_of(r, 400), (raw[:40], r.text)


async def test_numbers_json_cannot_hold_or_sqlite_cannot_store_are_400_naming_the_path(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=FAMILIES) as gw, gw_client(gw) as client:
            await gw.devices.registry.provision("meter", "m1")
            big = "9" * 400
            cases = [
                (DEVICES, '{"family": "meter", "metadata": {"v": NaN}}', "metadata.v: NaN"),
                (DEVICES, '{"family": "meter", "metadata": {"a": [1, Infinity]}}', "metadata.a[1]: Infinity"),
                (DEVICES, '{"family": "meter", "metadata": {"a": -Infinity}}', "metadata.a: -Infinity"),
                (DEVICES, '{"family": "meter", "metadata": {"a": 1e400}}', "metadata.a: 1e400 is out of range"),
                (DEVICES, '{"family": "meter", "metadata": {"a": 9223372036854775808}}',
                 "metadata.a: 9223372036854775808 is outside"),
                (DEVICES, f'{{"family": "meter", "metadata": {{"odd key": -{big}}}}}', 'metadata["odd key"]: -999'),
                (DEVICES, '{"family": "meter", "name": "\\ud800"}', "name: a lone surrogate"),
                (f"{DEVICES}/claim-codes", '{"family": "meter", "ttl_s": NaN}', "ttl_s: NaN"),
                (f"{DEVICES}/claim-codes", f'{{"family": "meter", "ttl_s": {big}}}', "ttl_s: 999"),
                (f"{DEVICES}/m1/commands", '{"payload": {"v": NaN}}', "payload.v: NaN"),
                (f"{DEVICES}/m1/commands", '{"payload": 1, "ttl_s": Infinity}', "ttl_s: Infinity"),
                (f"{DEVICES}/m1/commands", '{"payload": 1, "priority": 1000000000000000000000000000000}',
                 "priority: 1000000000000000000000000000000 is outside"),
                (f"{DEVICES}/m1/commands", '{"payload": 1, "priority": -1000000000000000000000000000000}',
                 "priority: -1000000000000000000000000000000 is outside"),
                (f"{DEVICES}/m1/rotate", '{"grace_s": NaN}', "grace_s: NaN"),
            ]
            for path, text, message in cases:
                r = await client.post(path, headers=AUTH, content=text.encode())
                assert message in error_of(r, 400), (text[:60], r.text)
            assert [d.id for d in await gw.devices.registry.list()] == ["m1"]
            assert await gw.devices.commands.list() == []


async def test_field_values_out_of_range_are_400_naming_the_field(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=FAMILIES) as gw, gw_client(gw) as client:
            await gw.devices.registry.provision("meter", "m1")
            cases = [
                (f"{DEVICES}/claim-codes", {"family": "meter", "ttl_s": 1e300}, "ttl_s:"),
                (f"{DEVICES}/claim-codes", {"family": "meter", "ttl_s": 0}, "ttl_s:"),
                (f"{DEVICES}/claim-codes", {"family": "meter", "device_id": ["m1"]}, "device_id:"),
                (f"{DEVICES}/claim-codes", {"family": "meter", "device_id": 7}, "device_id:"),
                (f"{DEVICES}/claim-codes", {"family": ["meter"]}, "family:"),
                (f"{DEVICES}/m1/commands", {"payload": 1, "ttl_s": 1e300}, "ttl_s:"),
                (f"{DEVICES}/m1/commands", {"payload": 1, "priority": 2**63 - 1 + 0.5}, "priority:"),
                (f"{DEVICES}/m1/commands", {"payload": 1, "priority": True}, "priority:"),
                (f"{DEVICES}/m1/rotate", {"grace_s": 1e300}, "grace_s:"),
                (f"{DEVICES}/m1/rotate", {"grace_s": "10"}, "grace_s:"),
            ]
            for path, doc, field in cases:
                r = await client.post(path, headers=AUTH, json=doc)
                assert error_of(r, 400).startswith(field), (doc, r.text)
            r = await client.get(f"{DEVICES}/m1", headers=AUTH)
            assert r.status_code == 200  # the rotations above were refused: the device is as it was


async def test_length_limits_on_every_field(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=FAMILIES) as gw, gw_client(gw) as client:
            cases = [
                ({"key": "k"}, "key:"),
                ({"key": "k" * 15}, "key:"),
                ({"key": "k" * 257}, "key:"),
                ({"key": "with a space 123"}, "key:"),
                ({"signing_secret": "s"}, "signing_secret:"),
                ({"name": "n" * 200_000}, "name:"),
                ({"model": "m" * 129}, "model:"),
                ({"firmware": "f" * 65}, "firmware:"),
                ({"metadata": {"notes": "x" * 20_000}}, "metadata:"),
                ({"id": "i" * 129}, "id:"),
                ({"family": "f" * 65}, "family:"),
            ]
            for fields, field in cases:
                r = await client.post(DEVICES, headers=AUTH, json={"family": "meter", **fields})
                assert error_of(r, 400).startswith(field), (str(fields)[:60], r.text)
            assert await gw.devices.registry.list() == []
            # At the limits: accepted.
            r = await client.post(DEVICES, headers=AUTH, json={
                "family": "meter", "id": "i" * 128, "key": "k" * 16, "signing_secret": "s" * 256, "name": "n" * 256,
                "model": "m" * 128, "firmware": "f" * 64, "metadata": {"notes": "é" * 4096}})
            assert r.status_code == 201, r.text
            assert r.json()["credentials"]["key"] == "k" * 16


async def test_unknown_families_are_refused_naming_the_known_ones(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=FAMILIES, settings=["plugins.other.enabled=false"]) as gw, \
                gw_client(gw) as client:
            for family in ("nosuch", "other"):  # not installed; installed but disabled
                for path in (DEVICES, f"{DEVICES}/claim-codes"):
                    r = await client.post(path, headers=AUTH, json={"family": family})
                    message = error_of(r, 400)
                    assert message.startswith(f"family: no enabled plugin {family!r}") and "meter" in message, message
            assert await gw.devices.registry.list() == []
            r = await client.post(f"{DEVICES}/claim-codes", headers=AUTH, json={"family": "meter"})
            assert r.status_code == 201


async def test_write_routes_answer_507_on_a_full_disk_and_503_when_storage_fails(gateway_factory):
    with trio.fail_after(60):
        async with gateway_factory(plugins=FAMILIES) as gw, gw_client(gw) as client:
            await gw.devices.registry.provision("meter", "m1")
            requests = [
                (DEVICES, {"family": "meter", "id": "m2", "metadata": {"pad": "x" * 8000}}),
                (f"{DEVICES}/claim-codes", {"family": "meter"}),
                (f"{DEVICES}/m1/commands", {"payload": {"pad": "x" * 8000}}),
                (f"{DEVICES}/m1/rotate", {}),
                (f"{DEVICES}/m1/revoke", {}),
                (f"{DEVICES}/m1/disable", {}),
            ]
            async with storage_full(gw):  # SQLite's own size cap at the current size
                for path, doc in (requests[0], requests[2]):  # these need new pages
                    r = await client.post(path, headers=AUTH, json=doc)
                    assert "storage full" in error_of(r, 507), (path, r.text)
            async with storage_failing(gw):  # another storage failure (the database refuses writes): 503
                for path, doc in requests:
                    r = await client.post(path, headers=AUTH, json=doc)
                    assert "storage" in error_of(r, 503), (path, r.text)
            r = await client.post(*requests[0][:1], headers=AUTH, json=requests[0][1])
            assert r.status_code == 201, r.text


async def test_the_plugin_list_needs_the_admin_token(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=FAMILIES) as gw, gw_client(gw) as client:
            assert error_of(await client.get("/api/gateway/plugins"), 401)
            r = await client.get("/api/gateway/plugins", headers=AUTH)
            assert r.status_code == 200 and {p["name"] for p in r.json()["plugins"]} == {"meter", "other"}


async def test_responses_never_carry_nan_or_infinity(gateway_factory):
    """The response encoder refuses what strict JSON parsers refuse (a 500 in the log,
    never `NaN` on the wire), and so does the command renderer that feeds MQTT."""
    from gatewayd.core.devices.commands import Command, default_render

    async with gateway_factory(plugins=FAMILIES) as gw:
        for value in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError):
                gw.app.json.dumps({"v": value})
            with pytest.raises(ValueError):
                default_render(Command("c1", "meter", "m1", {"v": value}, 0, "pending", 0.0, None))
        assert gw.app.json.dumps({"v": 1.5}) == '{"v": 1.5}'


async def test_events_cursor_with_a_huge_number_is_400(gateway_factory):
    import base64
    import json

    with trio.fail_after(30):
        async with gateway_factory(plugins=FAMILIES) as gw, gw_client(gw) as client:
            cursors = [base64.urlsafe_b64encode(json.dumps({"before": before}).encode()).decode()
                       for before in (10**30, -(10**30), 2**63)]
            cursors.append(base64.urlsafe_b64encode(b"[" * 1000 + b"]" * 1000).decode())
            for cursor in cursors:
                r = await client.get("/api/gateway/events", headers=AUTH, params={"cursor": cursor})
                assert error_of(r, 400).startswith("cursor:"), r.text
            for limit in ("²", "1e3", "9" * 5000):
                for path in ("/api/gateway/events", "/api/gateway/alerts"):
                    r = await client.get(path, headers=AUTH, params={"limit": limit})
                    assert error_of(r, 400).startswith("limit:"), r.text


async def test_an_answer_before_the_body_was_read_does_not_stall_the_connection(gateway_factory):
    """hypercorn 0.18 neither answers nor closes a keep-alive connection whose last
    response went out before the request's body came in (a 401 from the token check, a
    plugin's 429): the client's next request on it hung for ever. The app now reads the
    body before it answers."""
    with trio.fail_after(30):
        async with gateway_factory(plugins=FAMILIES) as gw:
            host, port = gw_url(gw).split("//")[1].rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(b"POST /api/gateway/devices HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n\r\n")
            await trio.sleep(0.2)  # a slow client: the body comes later (the old app answered meanwhile)
            await stream.send_all(b"{}{}" + b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            received = b""
            while b"HTTP/1.1 200" not in received or not received.endswith(b"}\n"):  # both answers, whole
                received += await stream.receive_some()
            assert received.startswith(b"HTTP/1.1 401")
