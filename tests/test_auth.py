"""Every auth scheme accepted and refused; brute-force lockout; the real HTTP path."""

import base64
import hashlib
import hmac
import json

import pytest
import trio
import trio.testing

from gatewayd.core.devices.auth import AuthError
from gatewayd.core.devices.registry import DeviceRegistry
from gatewayd.testing import gw_client
from tests import plugin_devices
from tests.device_services_setup import FakeClock, open_services

CLIENT = "192.0.2.10"


def sign(secret: str, body: bytes, prefix: bytes = b"") -> str:
    return hmac.new(secret.encode(), prefix + body, hashlib.sha256).hexdigest()


async def refused(coro, status, match=""):
    with pytest.raises(AuthError) as info:
        await coro
    assert info.value.status == status, info.value.reason
    assert match in info.value.reason
    return info.value


async def test_api_key(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("kaiabc", "pico_001")
        device = await s.auth.api_key("kaiabc", {"x-api-key": creds.key}, CLIENT)
        assert device.id == "pico_001" and device.status == "active"
        assert (await s.auth.api_key("kaiabc", {"X-API-Key": creds.key}, CLIENT, device_id="pico_001")).id == "pico_001"
        await refused(s.auth.api_key("kaiabc", {"X-API-Key": creds.key + "x"}, CLIENT), 401, "invalid API key")
        await refused(s.auth.api_key("kaiabc", {}, CLIENT), 401, "missing X-API-Key")
        await refused(s.auth.api_key("kaiabc", {"X-API-Key": creds.key}, CLIENT, device_id="pico_002"), 401)
        await refused(s.auth.api_key("paku", {"X-API-Key": creds.key}, CLIENT), 401)
        assert s.auth._failed.value(family="kaiabc", scheme="api_key") == 3
        assert s.auth.device_failures[("kaiabc", "pico_002")] == 1


async def test_body_token_in_json_or_query(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("thingsnxt", "esp1", key="dev_token_123456")
        assert (await s.auth.body_token("thingsnxt", CLIENT, json={"device_token": "dev_token_123456"})).id == "esp1"
        assert (await s.auth.body_token("thingsnxt", CLIENT, query={"device_token": "dev_token_123456"})).id == "esp1"
        await refused(s.auth.body_token("thingsnxt", CLIENT, json={"device_token": "dev_token_1234"}), 401)
        await refused(s.auth.body_token("thingsnxt", CLIENT, json={"device_token": 12345}), 401, "missing")
        await refused(s.auth.body_token("thingsnxt", CLIENT, json=["x"]), 401, "missing")


async def test_body_token_for_the_device_the_url_names(tmp_path):
    async with open_services(tmp_path) as s:
        await s.registry.provision("thingsnxt", "esp1", key="dev_token_123456")
        await s.registry.provision("thingsnxt", "esp2", key="dev_token_654321")
        token = {"device_token": "dev_token_123456"}
        assert (await s.auth.body_token("thingsnxt", CLIENT, json=token, device_id="esp1")).id == "esp1"
        e = await refused(s.auth.body_token("thingsnxt", CLIENT, json=token, device_id="esp2"), 401, "invalid")
        assert e.device_id == "esp2" and s.auth.device_failures[("thingsnxt", "esp2")] == 1
        assert not s.presence.is_online("thingsnxt", "esp2")


async def test_a_verified_key_is_remembered_until_the_registry_changes(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("kaiabc", "n1")
        headers = {"X-API-Key": creds.key}
        for _ in range(2):  # the first activates the device: a change, which forgets what was verified
            assert (await s.auth.api_key("kaiabc", headers, CLIENT)).id == "n1"
        # Another process (the CLI) revokes the key in the same database: this registry
        # has not been told, so the key it checked a moment ago is still accepted...
        other = DeviceRegistry(s.storage, s.registry.keyring)
        await other.revoke("kaiabc", "n1")
        assert (await s.auth.api_key("kaiabc", headers, CLIENT)).id == "n1"
        assert await s.registry.verify_key("kaiabc", creds.key) is None  # without max_age_s: the hash
        # ...until the change is reported (DeviceServices' watch does it: next test).
        await s.registry.notify_changed("kaiabc")
        await refused(s.auth.api_key("kaiabc", headers, CLIENT), 401, "invalid API key")


async def test_requests_in_flight_for_one_key_share_one_hash_check(tmp_path, monkeypatch):
    """After the memory is cleared (any registry change), 32 requests of one device in flight
    ran PBKDF2 32 times on worker threads; now the first checks and the others wait for it."""
    from gatewayd.core.devices import registry as registry_module

    checks = []
    real = registry_module.verify_secret
    monkeypatch.setattr(registry_module, "verify_secret", lambda key, h: checks.append(key) or real(key, h))
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("kaiabc", "n1")
        await s.registry.verify_key("kaiabc", creds.key, max_age_s=300)
        await s.registry.notify_changed("kaiabc")
        checks.clear()
        found = []

        async def one() -> None:
            found.append(await s.registry.verify_key("kaiabc", creds.key, max_age_s=300))

        async with trio.open_nursery() as n:
            for _ in range(32):
                n.start_soon(one)
        assert [d.id for d in found] == ["n1"] * 32 and len(checks) == 1
        # A first check cancelled half-way: the ones waiting for it still get their answer.
        await s.registry.notify_changed("kaiabc")
        found.clear()
        first = trio.CancelScope()

        async def cancelled() -> None:
            with first:
                await s.registry.verify_key("kaiabc", creds.key, max_age_s=300)

        async with trio.open_nursery() as n:
            n.start_soon(cancelled)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(one)
            n.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
        assert [d.id for d in found] == ["n1"] * 2


async def test_the_watch_makes_another_processs_revocation_count(tmp_path):
    async with open_services(tmp_path, settings=["devices.presence_flush_s=0.05"]) as s, trio.open_nursery() as n:
        await n.start(s.run)
        _, creds = await s.registry.provision("kaiabc", "n1")
        headers = {"X-API-Key": creds.key}
        for _ in range(2):
            assert (await s.auth.api_key("kaiabc", headers, CLIENT)).id == "n1"
        await DeviceRegistry(s.storage, s.registry.keyring).disable("kaiabc", "n1")
        with trio.fail_after(10):
            while (await s.registry.verify_key("kaiabc", creds.key, max_age_s=300)).status != "disabled":
                await trio.sleep(0.05)
        await refused(s.auth.api_key("kaiabc", headers, CLIENT), 403, "disabled")
        n.cancel_scope.cancel()


async def test_this_processs_changes_and_the_grace_period_end_count_at_once(tmp_path):
    clock = FakeClock()
    async with open_services(tmp_path, clock=clock) as s:
        _, old = await s.registry.provision("kaiabc", "n1")
        assert (await s.auth.api_key("kaiabc", {"X-API-Key": old.key}, CLIENT)).id == "n1"
        new = await s.registry.rotate("kaiabc", "n1", grace_s=600)
        for key in (old.key, new.key, old.key, new.key):  # remembered from the second time on
            assert (await s.auth.api_key("kaiabc", {"X-API-Key": key}, CLIENT)).id == "n1"
        clock.advance(601)  # remembered, but no longer than the old key lives
        await refused(s.auth.api_key("kaiabc", {"X-API-Key": old.key}, CLIENT), 401)
        await s.registry.revoke("kaiabc", "n1")
        await refused(s.auth.api_key("kaiabc", {"X-API-Key": new.key}, CLIENT), 401)


async def test_without_the_cache_every_key_is_checked_against_its_hash(tmp_path):
    async with open_services(tmp_path, settings=["auth.key_cache_s=0"]) as s:
        _, creds = await s.registry.provision("kaiabc", "n1")
        for _ in range(2):
            assert (await s.auth.api_key("kaiabc", {"X-API-Key": creds.key}, CLIENT)).id == "n1"
        await DeviceRegistry(s.storage, s.registry.keyring).revoke("kaiabc", "n1")
        await refused(s.auth.api_key("kaiabc", {"X-API-Key": creds.key}, CLIENT), 401)


async def test_device_id_and_key_headers(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("edgesentinel", "door-7")
        await s.registry.provision("edgesentinel", "door-8")
        ok = {"X-Device-Id": "door-7", "X-Auth-Key": creds.key}
        assert (await s.auth.device_key("edgesentinel", ok, CLIENT)).id == "door-7"
        await refused(s.auth.device_key("edgesentinel", {**ok, "X-Device-Id": "door-8"}, CLIENT), 401)
        await refused(s.auth.device_key("edgesentinel", {"X-Device-Id": "door-7"}, CLIENT), 401, "missing")


async def test_disabled_and_unclaimed_devices_are_forbidden(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("edgesentinel", "door-7")
        headers = {"X-Device-Id": "door-7", "X-Auth-Key": creds.key}
        s.auth.policy("edgesentinel").require_claim = True
        e = await refused(s.auth.device_key("edgesentinel", headers, CLIENT), 403, "not claimed")
        assert e.device_id == "door-7"
        code = await s.registry.create_claim_code("edgesentinel", ttl_s=60, device_id="door-7")
        await s.registry.redeem_claim_code("edgesentinel", code.code)
        assert (await s.auth.device_key("edgesentinel", headers, CLIENT)).status == "active"
        await s.registry.disable("edgesentinel", "door-7")
        await refused(s.auth.device_key("edgesentinel", headers, CLIENT), 403, "disabled")
        await s.registry.set_status("edgesentinel", "door-7", "active")
        assert (await s.auth.device_key("edgesentinel", headers, CLIENT)).id == "door-7"


async def test_jwt_issue_verify_expire(tmp_path):
    clock = FakeClock()
    async with open_services(tmp_path, clock=clock) as s:
        device, _ = await s.registry.provision("streetlight", "SL001")
        issued = s.auth.issue_jwt(device)
        assert issued.expires_at == pytest.approx(clock.now + 7 * 86400, abs=1)
        bearer = {"Authorization": f"Bearer {issued.token}"}
        assert (await s.auth.bearer_jwt("streetlight", bearer, CLIENT, device_id="SL001")).id == "SL001"
        await refused(s.auth.bearer_jwt("streetlight", bearer, CLIENT, device_id="SL002"), 401, "not for this device")
        await refused(s.auth.bearer_jwt("kaiabc", bearer, CLIENT), 401, "not for this device")
        await refused(s.auth.bearer_jwt("streetlight", {"Authorization": "Basic abc"}, CLIENT), 401, "missing")
        await refused(s.auth.bearer_jwt("streetlight", {"Authorization": "Bearer " + issued.token[:-3] + "AAA"},
                                        CLIENT), 401, "invalid token")
        clock.advance(7 * 86400 - 10)
        refreshed = s.auth.issue_jwt(device)  # what a status answer hands back
        clock.advance(20)
        await refused(s.auth.bearer_jwt("streetlight", bearer, CLIENT), 401, "expired")
        assert (await s.auth.bearer_jwt("streetlight", {"Authorization": f"Bearer {refreshed.token}"}, CLIENT)).id


async def test_rotation_and_revocation_invalidate_jwts(tmp_path):
    clock = FakeClock()
    async with open_services(tmp_path, clock=clock) as s:
        device, _ = await s.registry.provision("streetlight", "SL001")
        old = {"Authorization": f"Bearer {s.auth.issue_jwt(device).token}"}
        await s.registry.rotate("streetlight", "SL001", grace_s=60)
        assert (await s.auth.bearer_jwt("streetlight", old, CLIENT)).id == "SL001"  # in grace
        clock.advance(61)
        await refused(s.auth.bearer_jwt("streetlight", old, CLIENT), 401, "revoked")
        device = await s.registry.get("streetlight", "SL001")
        new = {"Authorization": f"Bearer {s.auth.issue_jwt(device).token}"}
        assert (await s.auth.bearer_jwt("streetlight", new, CLIENT)).id == "SL001"
        await s.registry.revoke("streetlight", "SL001")
        await refused(s.auth.bearer_jwt("streetlight", new, CLIENT), 401, "revoked")


async def test_a_jwt_check_reads_its_device_once_per_few_seconds(tmp_path, monkeypatch):
    """A light reporting every few seconds costs no database read per request; a change
    through the registry (revoke, disable) is seen at once all the same."""
    async with open_services(tmp_path) as s:
        device, _ = await s.registry.provision("streetlight", "SL001")
        bearer = {"Authorization": f"Bearer {s.auth.issue_jwt(device).token}"}
        reads = []
        find = s.registry.find

        async def counted(*args, **kwargs):
            reads.append(args)
            return await find(*args, **kwargs)

        monkeypatch.setattr(s.registry, "find", counted)
        await s.auth.bearer_jwt("streetlight", bearer, CLIENT)  # its first: provisioned becomes active (a write)
        reads.clear()
        for _ in range(20):
            assert (await s.auth.bearer_jwt("streetlight", bearer, CLIENT)).id == "SL001"
        assert len(reads) == 1
        await s.registry.set_status("streetlight", "SL001", "disabled")
        await refused(s.auth.bearer_jwt("streetlight", bearer, CLIENT), 403, "disabled")


async def test_signature_of_the_raw_body(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("streetlight", "SL001")
        body = b'{"status":"on","brightness":80}'
        hex_sig = sign(creds.signing_secret, body)
        assert (await s.auth.signature("streetlight", {"X-Device-Signature": hex_sig}, body, CLIENT,
                                       device_id="SL001")).id == "SL001"
        b64_sig = base64.b64encode(bytes.fromhex(hex_sig)).decode()
        assert await s.auth.signature("streetlight", {"X-Device-Signature": "sha256=" + b64_sig}, body, CLIENT,
                                      device_id="SL001")
        await refused(s.auth.signature("streetlight", {"X-Device-Signature": hex_sig}, body + b" ", CLIENT,
                                       device_id="SL001"), 401, "bad signature")
        await refused(s.auth.signature("streetlight", {"X-Device-Signature": sign("wrong", body)}, body, CLIENT,
                                       device_id="SL001"), 401, "bad signature")
        await refused(s.auth.signature("streetlight", {"X-Device-Signature": "zz"}, body, CLIENT,
                                       device_id="SL001"), 401, "malformed")
        await refused(s.auth.signature("streetlight", {"X-Device-Signature": hex_sig}, body, CLIENT,
                                       device_id="SL999"), 401, "unknown device")


async def test_signed_timestamp_stops_replay(tmp_path):
    clock = FakeClock()
    async with open_services(tmp_path, clock=clock) as s:
        _, creds = await s.registry.provision("edgesentinel", "door-7")
        body = b'{"batch":[1,2,3]}'
        stamp = str(int(clock.now))
        headers = {"X-Signature": sign(creds.signing_secret, body, stamp.encode() + b"."), "X-Timestamp": stamp}

        def check(h):
            return s.auth.signature("edgesentinel", h, body, CLIENT, device_id="door-7", header_name="X-Signature",
                                    timestamp_header="X-Timestamp")

        assert (await check(headers)).id == "door-7"
        # The same request captured and replayed six minutes later: the timestamp is stale.
        clock.advance(360)
        await refused(check(headers), 401, "timestamp outside")
        # Moving the timestamp forward breaks the signature, which covers it.
        await refused(check({**headers, "X-Timestamp": str(int(clock.now))}), 401, "bad signature")
        # ISO 8601 timestamps work too (signed as sent).
        iso = "2027-01-15T08:00:00Z"
        clock.now = 1_800_000_000.0 + 30  # 30 s after that instant
        iso_sig = sign(creds.signing_secret, body, iso.encode() + b".")
        assert await check({"X-Signature": iso_sig, "X-Timestamp": iso})
        await refused(check({"X-Signature": iso_sig, "X-Timestamp": "2027-01-15T08:00:00"}), 401, "malformed")
        await refused(check({"X-Signature": headers["X-Signature"]}), 401, "X-Timestamp")


async def test_nonce_is_accepted_once(tmp_path):
    clock = FakeClock()
    async with open_services(tmp_path, clock=clock) as s:
        _, creds = await s.registry.provision("edgesentinel", "door-7")
        body = b"{}"
        stamp = str(clock.now)
        prefix = f"{stamp}.n-1.".encode()
        headers = {"X-Signature": sign(creds.signing_secret, body, prefix), "X-Timestamp": stamp, "X-Nonce": "n-1"}

        def check(h):
            return s.auth.signature("edgesentinel", h, body, CLIENT, device_id="door-7", header_name="X-Signature",
                                    timestamp_header="X-Timestamp", nonce_header="X-Nonce")

        assert await check(headers)
        await refused(check(headers), 401, "replayed")


async def test_repeated_failures_lock_the_address_out(tmp_path, autojump_clock):
    async with open_services(tmp_path, settings=["auth.max_failures=10", "auth.lockout_s=300"]) as s:
        _, creds = await s.registry.provision("kaiabc", "pico_001")
        for _ in range(10):
            await refused(s.auth.api_key("kaiabc", {"X-API-Key": "guess"}, CLIENT), 401)
        # Locked: even the right key is not looked at.
        e = await refused(s.auth.api_key("kaiabc", {"X-API-Key": creds.key}, CLIENT), 429)
        assert 1 <= e.retry_after_s <= 300
        assert s.auth._failed.value(family="kaiabc", scheme="locked_out") == 1
        # Another address is unaffected.
        assert (await s.auth.api_key("kaiabc", {"X-API-Key": creds.key}, "192.0.2.99")).id == "pico_001"
        await trio.sleep(301)
        assert (await s.auth.api_key("kaiabc", {"X-API-Key": creds.key}, CLIENT)).id == "pico_001"


async def test_failures_spread_over_time_do_not_lock(tmp_path, autojump_clock):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("kaiabc", "pico_001")
        for _ in range(30):
            await refused(s.auth.api_key("kaiabc", {"X-API-Key": "guess"}, CLIENT), 401)
            await trio.sleep(7)  # < 10 per 60 s
        assert (await s.auth.api_key("kaiabc", {"X-API-Key": creds.key}, CLIENT)).id == "pico_001"


async def test_authenticated_devices_are_marked_seen(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("kaiabc", "pico_001")
        assert not s.presence.is_online("kaiabc", "pico_001")
        await s.auth.api_key("kaiabc", {"X-API-Key": creds.key}, CLIENT)
        assert s.presence.is_online("kaiabc", "pico_001")


# -- through the real HTTP app and a plugin's ctx --------------------------------------


async def test_schemes_through_a_plugin(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=[("meter", plugin_devices)]) as gw:
            registry = gw.devices.registry
            _, creds = await registry.provision("meter", "m1")
            async with gw_client(gw) as client:
                r = await client.post("/meter/ingest", headers={"X-API-Key": creds.key})
                assert r.status_code == 200 and r.json() == {"ok": True, "device": "m1"}
                r = await client.post("/meter/ingest", headers={"X-API-Key": "nope"})
                assert r.status_code == 401 and r.json()["reason"] == "invalid API key"

                r = await client.post("/meter/configure/m1", headers={"X-Device-Id": "m1", "X-Auth-Key": creds.key})
                token = r.json()["token"]
                r = await client.post("/meter/status/m1", headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200 and r.json()["token"]
                r = await client.post("/meter/status/m2", headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 401

                body = json.dumps({"v": 1}).encode()
                stamp = str(int(gw.clock()))
                sig = sign(creds.signing_secret, body, stamp.encode() + b".")
                r = await client.post("/meter/signed/m1", content=body,
                                      headers={"X-Device-Signature": sig, "X-Timestamp": stamp})
                assert r.status_code == 200
                r = await client.post("/meter/signed/m1", content=body + b" ",
                                      headers={"X-Device-Signature": sig, "X-Timestamp": stamp})
                assert r.status_code == 401

                await registry.disable("meter", "m1")
                r = await client.post("/meter/ingest", headers={"X-API-Key": creds.key})
                assert r.status_code == 403
            metrics = gw.metrics.render()
            assert 'gatewayd_auth_failures_total{family="meter",scheme="api_key"}' in metrics


async def test_lockout_over_http_answers_429_with_retry_after(gateway_factory):
    with trio.fail_after(30):
        async with gateway_factory(plugins=[("meter", plugin_devices)], settings=["auth.max_failures=3"]) as gw:
            async with gw_client(gw) as client:
                for _ in range(3):
                    assert (await client.post("/meter/ingest", headers={"X-API-Key": "guess"})).status_code == 401
                r = await client.post("/meter/ingest", headers={"X-API-Key": "guess"})
                assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0


async def test_malformed_bearer_tokens_and_timestamps_are_401_not_500(gateway_factory):
    """A JWT header nested 1,000 deep (RecursionError) or a token with non-ASCII bytes
    (UnicodeEncodeError) answered 500; a timestamp of "nan" passed the skew check."""
    nested = base64.urlsafe_b64encode(b"[" * 1000 + b"]" * 1000).decode().rstrip("=")
    with trio.fail_after(30):
        async with gateway_factory(plugins=[("meter", plugin_devices)]) as gw:
            _, creds = await gw.devices.registry.provision("meter", "m1")
            async with gw_client(gw) as client:
                for token in (f"{nested}.e30.c2ln".encode(), "\u00e9.e30.c2ln".encode("latin-1"),
                              b"eyJhbGciOiJIUzI1NiJ9.\xff.c2ln"):
                    r = await client.post("/meter/status/m1", headers={"Authorization": b"Bearer " + token})
                    assert r.status_code == 401 and r.json()["reason"] == "invalid token", r.text
                body = b"{}"
                for stamp in ("nan", "inf", "-inf", "1e400"):
                    sig = sign(creds.signing_secret, body, stamp.encode() + b".")
                    r = await client.post("/meter/signed/m1", content=body,
                                          headers={"X-Device-Signature": sig, "X-Timestamp": stamp})
                    assert r.status_code == 401 and "X-Timestamp" in r.json()["reason"], (stamp, r.text)
