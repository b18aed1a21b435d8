"""The device registry: provisioning, secrets at rest, rotation, MQTT accounts, claim codes."""

import pytest

from gatewayd.core.devices.registry import ClaimError, DeviceExists, UnknownDevice
from gatewayd.core.mqtt.broker import verify_password
from tests.device_services_setup import FakeClock, open_services


async def test_provision_then_get_and_list(tmp_path):
    async with open_services(tmp_path) as s:
        device, creds = await s.registry.provision("kaiabc", "pico_001", name="Chamber A", model="pico",
                                                   metadata={"room": 105})
        assert (device.family, device.id, device.status) == ("kaiabc", "pico_001", "provisioned")
        assert creds.key and creds.signing_secret and creds.key != creds.signing_secret
        got = await s.registry.get("kaiabc", "pico_001")
        assert got.name == "Chamber A" and got.metadata == {"room": 105} and got.first_seen is None
        generated, _ = await s.registry.provision("kaiabc")
        assert generated.id.startswith("kaiabc-")
        assert [d.id for d in await s.registry.list("kaiabc")] == sorted(["pico_001", generated.id])
        assert await s.registry.list("paku") == []


async def test_same_id_is_unique_per_family_only(tmp_path):
    async with open_services(tmp_path) as s:
        await s.registry.provision("kaiabc", "dev1")
        with pytest.raises(DeviceExists):
            await s.registry.provision("kaiabc", "dev1")
        await s.registry.provision("paku", "dev1")
        assert {d.family for d in await s.registry.find("dev1")} == {"kaiabc", "paku"}


@pytest.mark.parametrize("device_id", ["-lead", "has space", "a/b", "x" * 129, "plus+"])
async def test_bad_ids_are_refused(tmp_path, device_id):
    async with open_services(tmp_path) as s:
        with pytest.raises(ValueError, match="device id"):
            await s.registry.provision("kaiabc", device_id)


async def test_unknown_device(tmp_path):
    async with open_services(tmp_path) as s:
        with pytest.raises(UnknownDevice):
            await s.registry.get("kaiabc", "nope")
        with pytest.raises(UnknownDevice):
            await s.registry.rotate("kaiabc", "nope")


async def test_secrets_are_not_in_the_database_files(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("edgesentinel", "door-7")
        rotated = await s.registry.rotate("edgesentinel", "door-7", grace_s=60)
        await s.registry.provision("thingsnxt", "esp1", key="dev_token_123456")
        # Read while the database is open, so the WAL still holds the recent pages.
        blobs = b"".join(p.read_bytes() for p in tmp_path.glob("gatewayd.sqlite3*"))
        assert b"door-7" in blobs  # the check can see what is there
        for secret in (creds.key, creds.signing_secret, rotated.key, rotated.signing_secret, "dev_token_123456"):
            assert secret.encode() not in blobs


async def test_rotation_revokes_the_old_key(tmp_path):
    async with open_services(tmp_path) as s:
        _, old = await s.registry.provision("kaiabc", "n1")
        new = await s.registry.rotate("kaiabc", "n1")
        assert await s.registry.verify_key("kaiabc", old.key) is None
        assert (await s.registry.verify_key("kaiabc", new.key)).id == "n1"
        _, secrets = await s.registry.signing_secrets("kaiabc", "n1")
        assert secrets == [new.signing_secret]


async def test_rotation_with_grace_keeps_both_until_it_ends(tmp_path):
    clock = FakeClock()
    async with open_services(tmp_path, clock=clock) as s:
        _, old = await s.registry.provision("kaiabc", "n1")
        new = await s.registry.rotate("kaiabc", "n1", grace_s=600)
        assert (await s.registry.verify_key("kaiabc", old.key)).id == "n1"
        assert (await s.registry.verify_key("kaiabc", new.key)).id == "n1"
        assert (await s.registry.signing_secrets("kaiabc", "n1"))[1] == [new.signing_secret, old.signing_secret]
        clock.advance(601)
        assert await s.registry.verify_key("kaiabc", old.key) is None
        assert (await s.registry.verify_key("kaiabc", new.key)).id == "n1"


async def test_revoke_stops_every_credential(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("kaiabc", "n1")
        await s.registry.revoke("kaiabc", "n1")
        assert await s.registry.verify_key("kaiabc", creds.key) is None
        assert (await s.registry.signing_secrets("kaiabc", "n1"))[1] == []
        assert await s.registry.mqtt_accounts("kaiabc") == []


async def test_key_is_scoped_to_family_and_device(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("kaiabc", "n1")
        await s.registry.provision("kaiabc", "n2")
        assert await s.registry.verify_key("paku", creds.key) is None
        assert await s.registry.verify_key("kaiabc", creds.key, "n2") is None
        assert (await s.registry.verify_key("kaiabc", creds.key, "n1")).id == "n1"


async def test_mqtt_accounts_are_mosquitto_hashes_of_the_key(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("paku", "plug-1")
        _, other = await s.registry.provision("paku", "IMEI:35123")
        await s.registry.provision("paku", "off-1")
        await s.registry.disable("paku", "off-1")
        accounts = dict(await s.registry.mqtt_accounts("paku"))
        assert set(accounts) == {"plug-1", "IMEI_35123"}
        assert accounts["plug-1"].startswith("$7$") and verify_password(creds.key, accounts["plug-1"])
        assert verify_password(other.key, accounts["IMEI_35123"])
        rotated = await s.registry.rotate("paku", "plug-1", grace_s=60)
        accounts = dict(await s.registry.mqtt_accounts("paku"))
        assert verify_password(rotated.key, accounts["plug-1"]) and not verify_password(creds.key, accounts["plug-1"])


async def test_issue_key_replaces_the_key_and_keeps_the_signing_secret_and_tokens(tmp_path):
    changed = []
    async with open_services(tmp_path) as s:
        device, creds = await s.registry.provision("streetlight", "IMEI:351234567890123",
                                                   signing_secret="flashed-at-the-factory-0001")
        token = s.auth.issue_jwt(device)
        s.registry.on_credentials_changed = changed.append
        key = await s.registry.issue_key("streetlight", "IMEI:351234567890123", mqtt_username="SL001")
        assert key != creds.key and changed == ["streetlight"]
        assert await s.registry.verify_key("streetlight", creds.key) is None
        assert (await s.registry.verify_key("streetlight", key)).id == "IMEI:351234567890123"
        assert (await s.registry.signing_secrets("streetlight", "IMEI:351234567890123"))[1] == \
            ["flashed-at-the-factory-0001"]
        headers = {"Authorization": f"Bearer {token.token}"}
        assert (await s.auth.bearer_jwt("streetlight", headers, "10.0.0.9")).id == "IMEI:351234567890123"
        [(username, hashed)] = await s.registry.mqtt_accounts("streetlight")
        assert username == "SL001" and verify_password(key, hashed)
        # Another key keeps the username; so does an operator's rotation (new signing secret).
        again = await s.registry.issue_key("streetlight", "IMEI:351234567890123")
        assert [u for u, _ in await s.registry.mqtt_accounts("streetlight")] == ["SL001"]
        rotated = await s.registry.rotate("streetlight", "IMEI:351234567890123")
        assert rotated.mqtt_username == "SL001" and await s.registry.verify_key("streetlight", again) is None
        [(username, hashed)] = await s.registry.mqtt_accounts("streetlight")
        assert username == "SL001" and verify_password(rotated.key, hashed)
        for bad in ("SL:001", "a/b", "", "x" * 129, "+", 7):
            with pytest.raises(ValueError, match="mqtt_username"):
                await s.registry.issue_key("streetlight", "IMEI:351234567890123", mqtt_username=bad)
        with pytest.raises(UnknownDevice):
            await s.registry.issue_key("streetlight", "IMEI:000")


async def test_credential_changes_call_the_hook(tmp_path):
    changed = []
    async with open_services(tmp_path) as s:
        s.registry.on_credentials_changed = changed.append
        await s.registry.provision("paku", "p1")
        await s.registry.rotate("paku", "p1")
        await s.registry.set_status("paku", "p1", "active")  # who may log in is unchanged: no call
        await s.registry.disable("paku", "p1")
        await s.registry.set_status("paku", "p1", "active")  # enabled again: a call

        async def broken(family):
            raise RuntimeError("broker down")

        s.registry.on_credentials_changed = broken
        await s.registry.provision("paku", "p2")  # a failing hook doesn't fail provisioning
    assert changed == ["paku", "paku", "paku", "paku"]


async def test_claim_code_claims_its_device_once(tmp_path):
    async with open_services(tmp_path) as s:
        await s.registry.provision("edgesentinel", "door-1")
        code = await s.registry.create_claim_code("edgesentinel", ttl_s=600, device_id="door-1")
        device, creds = await s.registry.redeem_claim_code("edgesentinel", code.code.lower())
        assert device.status == "claimed" and creds is None
        with pytest.raises(ClaimError, match="already used"):
            await s.registry.redeem_claim_code("edgesentinel", code.code)


async def test_claim_code_refusals(tmp_path):
    clock = FakeClock()
    async with open_services(tmp_path, clock=clock) as s:
        await s.registry.provision("edgesentinel", "door-1")
        code = await s.registry.create_claim_code("edgesentinel", ttl_s=60, device_id="door-1")
        with pytest.raises(ClaimError, match="unknown"):
            await s.registry.redeem_claim_code("paku", code.code)
        with pytest.raises(ClaimError, match="another device"):
            await s.registry.redeem_claim_code("edgesentinel", code.code, "door-2")
        with pytest.raises(ClaimError, match="unknown"):
            await s.registry.redeem_claim_code("edgesentinel", "AAAA-BBBB-CCCC")
        clock.advance(61)
        with pytest.raises(ClaimError, match="expired"):
            await s.registry.redeem_claim_code("edgesentinel", code.code)
        assert (await s.registry.get("edgesentinel", "door-1")).status == "provisioned"
        with pytest.raises(UnknownDevice):
            await s.registry.create_claim_code("edgesentinel", ttl_s=60, device_id="ghost")


async def test_unbound_claim_code_registers_a_new_device(tmp_path):
    async with open_services(tmp_path) as s:
        code = await s.registry.create_claim_code("paku", ttl_s=600)
        device, creds = await s.registry.redeem_claim_code("paku", code.code, "plug-9", model="plug")
        assert (device.id, device.status, device.model) == ("plug-9", "claimed", "plug")
        assert (await s.registry.verify_key("paku", creds.key)).id == "plug-9"
        # A registration that fails gives the code back.
        code2 = await s.registry.create_claim_code("paku", ttl_s=600)
        with pytest.raises(DeviceExists):
            await s.registry.redeem_claim_code("paku", code2.code, "plug-9")
        device, _ = await s.registry.redeem_claim_code("paku", code2.code, "plug-10")
        assert device.id == "plug-10"


async def test_update_merges_metadata(tmp_path):
    async with open_services(tmp_path) as s:
        await s.registry.provision("streetlight", "SL001", metadata={"city": "Delhi"})
        device = await s.registry.update("streetlight", "SL001", firmware="v2.1.0", metadata={"lat": 28.6})
        assert device.firmware == "v2.1.0" and device.metadata == {"city": "Delhi", "lat": 28.6}
        with pytest.raises(ValueError):
            await s.registry.update("streetlight", "SL001", status="active")


async def test_registry_survives_a_restart(tmp_path):
    async with open_services(tmp_path) as s:
        _, creds = await s.registry.provision("kaiabc", "n1")
    async with open_services(tmp_path) as s:
        assert (await s.registry.verify_key("kaiabc", creds.key)).id == "n1"
        assert (await s.registry.signing_secrets("kaiabc", "n1"))[1] == [creds.signing_secret]


async def test_recent_lookups_see_this_processes_changes_at_once_and_others_after_max_age(tmp_path):
    import trio

    from gatewayd.core.devices.registry import DeviceRow

    async with open_services(tmp_path) as s:
        reg = s.registry
        assert await reg.recent("paku", "p1", 60) is None  # unknown, remembered as such...
        await reg.provision("paku", "p1")  # ...until this registry writes
        assert (await reg.recent("paku", "p1", 60)).status == "provisioned"
        await reg.disable("paku", "p1")
        assert (await reg.recent("paku", "p1", 60)).status == "disabled"  # seen at once
        # Another process (the CLI) changes the row behind this registry's back:
        await s.storage.write(lambda: DeviceRow.update(status="active").where(DeviceRow.device_id == "p1").execute())
        assert (await reg.recent("paku", "p1", 60)).status == "disabled"  # within max_age: the old answer
        await trio.sleep(0.06)
        assert (await reg.recent("paku", "p1", 0.05)).status == "active"  # older than max_age: read again


async def test_recent_lookups_of_one_device_at_once_share_one_read(tmp_path, monkeypatch):
    import trio

    async with open_services(tmp_path) as s:
        reg = s.registry
        await reg.provision("paku", "p1")
        reads = 0
        real_find = reg.find

        async def counting_find(*args, **kwargs):
            nonlocal reads
            reads += 1
            await trio.sleep(0.05)  # a slow disk: every lookup arrives while the first reads
            return await real_find(*args, **kwargs)

        monkeypatch.setattr(reg, "find", counting_find)
        found = []
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(lambda: _append(found, reg.recent("paku", "p1", 60)))
        assert reads == 1 and len(found) == 50 and {d.id for d in found} == {"p1"}
        # A write while a read is under way: that read's answer is not kept.
        async with trio.open_nursery() as nursery:
            reg._recent.clear()
            nursery.start_soon(lambda: _append(found, reg.recent("paku", "p1", 60)))
            await trio.sleep(0.01)
            await reg.disable("paku", "p1")
        assert (await reg.recent("paku", "p1", 60)).status == "disabled"
        # Many waiting on a read that a write overtakes (so it caches nothing): one of
        # them reads again while the others wait for it (before, each woken waiter began
        # a read of its own, and the second to finish failed with a KeyError: paku's
        # bench lost a message to it).
        reads, found = 0, []
        async with trio.open_nursery() as nursery:
            reg._recent.clear()
            for _ in range(20):
                nursery.start_soon(lambda: _append(found, reg.recent("paku", "p1", 60)))
            await trio.sleep(0.01)
            await reg.update("paku", "p1", name="lamp")
        assert len(found) == 20 and {d.id for d in found} == {"p1"}
        assert reads == 2 and not reg._loading
        # Last-seen times (presence, every few seconds) do not empty the cache.
        reads = 0
        await reg.record_seen({("paku", "p1"): 1.0})
        await reg.recent("paku", "p1", 60)
        assert reads == 0


async def _append(found, lookup):
    found.append(await lookup)


async def test_field_limits_and_bad_values_are_value_errors_naming_the_field(tmp_path):
    """What plugins and the CLI pass is checked where it is stored: before, NaN metadata
    was stored (and listed as `NaN`), a one-character key imported, a 200,000-character
    name kept, a claim code made to live for ever (`expires_at: Infinity`)."""
    async with open_services(tmp_path) as s:
        r = s.registry
        provision_cases = [
            ({"metadata": {"v": float("nan")}}, "metadata: not storable as strict JSON"),
            ({"metadata": ["a"]}, "metadata: expected an object"),
            ({"metadata": {"n": "x" * 17_000}}, "metadata: 17008 characters of JSON, more than 16384"),
            ({"key": "k"}, "key: expected 16-256 printable ASCII characters"),
            ({"key": "ключ-ключ-ключ-ключ"}, "key: expected 16-256 printable ASCII characters"),
            ({"signing_secret": "s" * 257}, "signing_secret: expected 16-256"),
            ({"name": "n" * 200_000}, "name: 200000 characters, more than 256"),
            ({"name": 5}, "name: expected a string"),
            ({"name": "\ud800"}, "name: a lone surrogate"),
            ({"device_id": "m1\n"}, "id: bad device id"),
            ({"device_id": ["m1"]}, "id: bad device id"),
        ]
        for fields, message in provision_cases:
            with pytest.raises(ValueError) as e:
                await r.provision("meter", **fields)
            assert str(e.value).startswith(message), str(e.value)
        with pytest.raises(ValueError, match="^family: expected"):
            await r.provision(["meter"])
        assert await r.list() == []

        await r.provision("meter", "m1", metadata={"notes": "x" * 16_000})
        with pytest.raises(ValueError, match="^metadata: 17022 characters"):  # the merged object must fit too
            await r.update("meter", "m1", metadata={"more": "y" * 1000})
        with pytest.raises(ValueError, match="^firmware: 65 characters"):
            await r.update("meter", "m1", firmware="f" * 65)
        assert (await r.get("meter", "m1")).metadata == {"notes": "x" * 16_000}
        for grace in (float("nan"), float("inf"), -1, 1e300):
            with pytest.raises(ValueError, match="^grace_s: expected a number of seconds >= 0"):
                await r.rotate("meter", "m1", grace_s=grace)
        for ttl in (float("nan"), float("inf"), 0, 10**400):
            with pytest.raises(ValueError, match="^ttl_s: expected a number of seconds > 0"):
                await r.create_claim_code("meter", ttl_s=ttl)
        with pytest.raises(ValueError, match="^device_id: bad device id"):
            await r.create_claim_code("meter", ttl_s=60, device_id=["m1"])


async def test_activation_does_not_undo_a_disable_made_after_the_device_was_read(tmp_path):
    # The auto-activation of a device's first message must not flip an operator's
    # `disabled` (made between reading the device and activating it) back to active.
    async with open_services(tmp_path) as s:
        registry = s.registry
        device, _ = await registry.provision("kaiabc", "d1")
        await registry.set_status("kaiabc", "d1", "disabled")
        after = await registry.set_status("kaiabc", "d1", "active", only_from=("provisioned", "claimed"))
        assert after.status == "disabled"
        assert (await registry.get("kaiabc", "d1")).status == "disabled"
        again = await registry.set_status("kaiabc", "d1", "active")
        assert again.status == "active"
