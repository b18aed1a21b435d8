"""The lights' HTTP API against a real gateway: the specification's bodies, codes and cadence."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from streetlight_testbed import (
    ADMIN,
    BASE,
    IMEI,
    PLUGIN,
    REGISTRATION,
    bearer,
    command,
    configure,
    gz,
    sign,
    status_report,
)

from gatewayd.testing import add_firmware, gw_client, provision, wait_until


async def test_configure_answers_the_light_id_its_config_and_a_seven_day_token(gateway_factory, upstream_receiver):
    async with gateway_factory(plugins=PLUGIN, upstream=upstream_receiver) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        answer = await configure(client)
        assert answer["status"] == "success" and answer["light_id"] == "SL001"
        assert answer["config"] == {"schedule_enabled": True, "sunrise_time": "06:00:00", "sunset_time": "18:30:00",
                                    "brightness_level": 100, "auto_dimming": True}
        assert answer["mqtt_enabled"] is False and "mqtt_password" not in answer
        claims = jwt.decode(answer["device_token"], options={"verify_signature": False})
        assert claims["sub"] == IMEI and claims["exp"] - claims["iat"] == 7 * 86400
        assert answer["server_timestamp"].endswith("Z")
        again = await configure(client)  # a reboot: the same light id
        assert again["light_id"] == "SL001"
        [record, _] = await upstream_receiver.wait_for(2)
        assert record["device"] == IMEI and record["kind"] == "configure" and record["data"]["city"] == "Delhi"


async def test_configure_refusals_in_the_specifications_error_body(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=["plugins.streetlight.service_area=[8, 68, 37, 97]"]) as gw, \
            gw_client(gw) as client:
        r = await client.post(f"{BASE}/{IMEI}/configure", json=REGISTRATION)
        assert r.status_code == 404 and r.json() == {
            "status": "error", "code": "DEVICE_NOT_FOUND",
            "message": f"light {IMEI} is not registered on this gateway", "retry_after_seconds": 300}
        await provision(gw, "streetlight", IMEI)
        r = await client.post(f"{BASE}/{IMEI}/configure", json={**REGISTRATION, "latitude": 51.5, "longitude": -0.1})
        assert r.status_code == 400 and r.json()["code"] == "CONFIG_INVALID"
        assert r.json()["message"] == "GPS coordinates 51.5, -0.1 out of service area"
        assert r.json()["retry_after_seconds"] == 300
        r = await client.post(f"{BASE}/{IMEI}/configure", json={**REGISTRATION, "latitude": "north"})
        assert r.status_code == 400 and r.json()["code"] == "INVALID_PAYLOAD" and "latitude" in r.json()["message"]
        r = await client.post(f"{BASE}/{IMEI}/configure", content=b'{"latitude": NaN}')
        assert r.status_code == 400 and "NaN" in r.json()["message"]
        r = await client.post(f"{BASE}/{IMEI}/configure", json={**REGISTRATION, "device_id": "IMEI:1"})
        assert r.status_code == 400 and r.json()["message"].startswith("device_id:")
        r = await client.post(f"{BASE}/{IMEI}/configure", json={**REGISTRATION, "timestamp": "1970-01-01T00:00:00Z"})
        assert r.status_code == 400 and "clock" in r.json()["message"]


async def test_a_light_with_a_flashed_secret_must_sign(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        creds = await provision(gw, "streetlight", IMEI, metadata={"signed": True})
        body = json.dumps(REGISTRATION).encode()
        r = await client.post(f"{BASE}/{IMEI}/configure", content=body)
        assert r.status_code == 401 and r.json()["code"] == "SIGNATURE_INVALID"
        r = await client.post(f"{BASE}/{IMEI}/configure", content=body, headers=sign("wrong", body))
        assert r.status_code == 401
        r = await client.post(f"{BASE}/{IMEI}/configure", content=body, headers=sign(creds.signing_secret, body))
        assert r.status_code == 200
        token = r.json()["device_token"]
        report = json.dumps(status_report()).encode()
        r = await client.post(f"{BASE}/{IMEI}/status", content=report, headers=bearer(token))
        assert r.status_code == 401 and r.json()["code"] == "SIGNATURE_INVALID"
        r = await client.post(f"{BASE}/{IMEI}/status", content=report,
                              headers={**bearer(token), **sign(creds.signing_secret, report)})
        assert r.status_code == 200


async def test_a_light_that_signs_unasked_must_sign_correctly_on_every_route(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)  # not "signed": it need not sign, but may
        auth = bearer((await configure(client))["device_token"])
        report = json.dumps(status_report()).encode()
        # The header found whatever its case, on a body and on a GET alike.
        for name in ("X-Device-Signature", "x-device-signature"):
            forged = {name: sign("wrong", report)["X-Device-Signature"]}
            r = await client.post(f"{BASE}/{IMEI}/status", content=report, headers={**auth, **forged})
            assert r.status_code == 401 and r.json()["code"] == "SIGNATURE_INVALID", name
            r = await client.get(f"{BASE}/{IMEI}/commands", headers={**auth, **forged})
            assert r.status_code == 401 and r.json()["code"] == "SIGNATURE_INVALID", name
        r = await client.post(f"{BASE}/{IMEI}/status", content=report, headers=auth)
        assert r.status_code == 200  # unsigned: fine for a light that need not sign


async def test_enrollment_keeps_an_unknown_light_pending_until_approved(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=["plugins.streetlight.enrollment=true"]) as gw, \
            gw_client(gw, headers=ADMIN) as client:
        for _ in range(2):
            r = await client.post(f"{BASE}/{IMEI}/configure", json=REGISTRATION)
            assert r.status_code == 403 and r.json()["code"] == "PENDING_APPROVAL"
        r = await client.get(f"/api/gateway/devices/{IMEI}")
        assert r.json()["device"]["status"] == "disabled"
        assert (await client.post(f"/api/gateway/devices/{IMEI}/enable")).status_code == 200
        assert (await configure(client))["light_id"] == "SL001"


async def test_status_is_stored_and_answered_with_the_cadence(gateway_factory, upstream_receiver):
    async with gateway_factory(plugins=PLUGIN, upstream=upstream_receiver) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        r = await client.post(f"{BASE}/{IMEI}/status", json=status_report(), headers=auth)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert (answer["status"], answer["message"], answer["next_update_seconds"]) == ("success", "Status recorded", 30)
        assert "device_token" not in answer  # seven days left: no refresh yet
        for status, seconds in (({"temperature_celsius": 61}, 10), ({"battery_percentage": 19}, 10),
                                ({"temperature_celsius": 60, "battery_percentage": 20}, 30)):
            r = await client.post(f"{BASE}/{IMEI}/status", json=status_report(**status), headers=auth)
            assert r.json()["next_update_seconds"] == seconds, status
        records = await upstream_receiver.wait_for(5)
        first = [r for r in records if r["kind"] == "status"][0]  # (its online event may come before it)
        assert first["kind"] == "status" and first["data"]["energy"]["cumulative_kwh"] == 1245.67
        assert first["data"]["timestamp"] == "2025-12-17T10:30:35Z"
        r = await client.get(f"{BASE}/{IMEI}/health", headers=auth)
        health = r.json()
        assert health["indicator"] == "green" and health["last_status"]["battery"] == 20
        # the compact form of the MQTT topic and the pseudocode
        r = await client.post(f"{BASE}/{IMEI}/status", headers=auth,
                              json={"light_id": "SL001", "status": "on", "brightness": 85, "battery": 9})
        assert r.status_code == 200 and r.json()["next_update_seconds"] == 10
        health = (await client.get(f"{BASE}/{IMEI}/health", headers=auth)).json()
        assert health["indicator"] == "red" and "battery critical" in health["reason"]


async def test_the_kept_answers_are_the_apps_json_on_the_wire(gateway_factory):
    """A poll with nothing waiting and a status without a new token answer bytes kept per
    second (routes._answer): the same bytes and headers as the app's JSON provider gives."""
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        for path, send in (("commands", lambda: client.get(f"{BASE}/{IMEI}/commands", headers=auth)),
                           ("status", lambda: client.post(f"{BASE}/{IMEI}/status", json=status_report(),
                                                          headers=auth))):
            answers = [await send() for _ in range(3)]  # the first made, the next (mostly) kept
            for r in answers:
                assert r.status_code == 200, (path, r.text)
                assert r.content == (json.dumps(r.json(), sort_keys=True, separators=(",", ":")) + "\n").encode()
                assert r.headers["content-type"] == "application/json"
                assert r.headers["content-length"] == str(len(r.content))
            assert len({tuple(sorted(k for k in r.headers if k != "date")) for r in answers}) == 1, path
        hot = await client.post(f"{BASE}/{IMEI}/status", json=status_report(temperature_celsius=61), headers=auth)
        assert hot.json()["next_update_seconds"] == 10  # the hint is part of what is kept: not the last answer's


async def test_an_integer_field_sent_as_a_whole_float_is_accepted(gateway_factory, upstream_receiver):
    """`uptime_seconds: 864000.0` (an encoder that writes every number as a float) is 864000;
    864000.5 is not an integer, and is refused naming the field."""
    async with gateway_factory(plugins=PLUGIN, upstream=upstream_receiver) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        r = await client.post(f"{BASE}/{IMEI}/status", json=status_report(uptime_seconds=864000.0), headers=auth)
        assert r.status_code == 200, r.text
        health = (await client.get(f"{BASE}/{IMEI}/health", headers=auth)).json()
        assert health["last_status"]["uptime"] == 864000 and type(health["last_status"]["uptime"]) is int
        # The status report's record: the light's own events (it came online) may go up meanwhile.
        [record] = await wait_until(
            lambda: [rec for rec in upstream_receiver.records()
                     if isinstance(rec["data"], dict) and isinstance(rec["data"].get("status"), dict)],
            what="the status report's record upstream")
        assert json.dumps(record["data"]["status"]["uptime_seconds"]) == "864000"
        compact = {"light_id": "SL001", "status": "on", "uptime_seconds": 7200.0}
        assert (await client.post(f"{BASE}/{IMEI}/status", json=compact, headers=auth)).status_code == 200
        r = await client.post(f"{BASE}/{IMEI}/status", json=status_report(uptime_seconds=864000.5), headers=auth)
        assert r.status_code == 400 and r.json()["message"].startswith("status.uptime_seconds"), r.text


async def test_status_refusals(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        await provision(gw, "streetlight", "IMEI:351234567890999")
        auth = bearer((await configure(client))["device_token"])
        other = bearer((await configure(client, "IMEI:351234567890999"))["device_token"])
        r = await client.post(f"{BASE}/{IMEI}/status", json=status_report())
        assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED"
        r = await client.post(f"{BASE}/{IMEI}/status", json=status_report(), headers=other)
        assert r.status_code == 401
        r = await client.post(f"{BASE}/IMEI:000000000000001/status", json=status_report(), headers=auth)
        assert r.status_code == 404 and r.json()["code"] == "DEVICE_NOT_FOUND"
        for bad, field in (({"battery_percentage": 140}, "status.battery_percentage"),
                           ({"error_flags": "lamp"}, "status.error_flags"),
                           ({"power_state": "dim"}, "status.power_state")):
            r = await client.post(f"{BASE}/{IMEI}/status", json=status_report(**bad), headers=auth)
            assert r.status_code == 400 and r.json()["message"].startswith(field), r.text
            assert set(r.json()) == {"status", "code", "message", "retry_after_seconds"}
        r = await client.post(f"{BASE}/{IMEI}/status", content=b"{", headers=auth)
        assert r.status_code == 400 and r.json()["code"] == "INVALID_PAYLOAD"


async def test_commands_in_the_specifications_shape_high_priority_first(gateway_factory, upstream_receiver):
    async with gateway_factory(plugins=PLUGIN, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        r = await client.get(f"{BASE}/{IMEI}/commands", headers=auth)
        assert r.json()["commands"] == [] and r.json()["status"] == "ok" and r.json()["next_poll_seconds"] == 10
        schedule = {"enabled": True, "sunrise_time": "06:30:00", "sunset_time": "18:00:00"}
        low = await command(client, IMEI, {"command_type": "schedule_update", "schedule": schedule})
        normal = await command(client, IMEI, {"command_type": "brightness_control", "brightness_level": 75})
        high = await command(client, IMEI, {"command_type": "power_control", "action": "on"})
        r = await client.get(f"{BASE}/{IMEI}/commands", headers=auth)
        body = r.json()
        assert [c["command_id"] for c in body["commands"]] == [high["id"], normal["id"], low["id"]]
        first = body["commands"][0]
        assert set(first) == {"command_id", "command_type", "action", "priority", "requested_at"}
        assert (first["command_type"], first["action"], first["priority"]) == ("power_control", "on", "high")
        assert body["commands"][2]["schedule"] == schedule
        assert body["next_poll_seconds"] == 2  # a user's command waits for its ack
        assert (await client.get(f"{BASE}/{IMEI}/commands", headers=auth)).json()["commands"] == []
        ack = {"device_id": IMEI, "command_id": high["id"], "status": "executed",
               "execution_timestamp": "2025-12-17T10:30:47Z", "result": {"new_state": "on", "actual_brightness": 100}}
        for _ in range(2):  # a repeated ack changes nothing
            r = await client.post(f"{BASE}/{IMEI}/command-ack", json=ack, headers=auth)
            assert r.status_code == 200 and r.json()["command_status"] == "executed"
        r = await client.post(f"{BASE}/{IMEI}/command-ack", json={**ack, "status": "failed"}, headers=auth)
        assert r.json()["command_status"] == "executed"
        r = await client.post(f"{BASE}/{IMEI}/command-ack", json={**ack, "command_id": "CMD_404"}, headers=auth)
        assert r.status_code == 404 and r.json()["code"] == "COMMAND_NOT_FOUND"
        r = await client.get(f"{BASE}/{IMEI}/commands", headers=auth)
        assert r.json()["next_poll_seconds"] == 10
        stored = (await client.get(f"/api/gateway/devices/{IMEI}/commands", headers=ADMIN)).json()["commands"]
        assert {c["id"]: c["status"] for c in stored}[high["id"]] == "executed"
        records = await upstream_receiver.wait_for(2)
        acks = [r for r in records if r["kind"] == "command_ack"]
        assert len(acks) == 1 and acks[0]["data"]["result"] == {"new_state": "on", "actual_brightness": 100}


async def test_a_command_not_acknowledged_is_handed_out_again_after_command_redeliver_s(gateway_factory):
    now = [time.time()]
    async with gateway_factory(plugins=PLUGIN, clock=lambda: now[0]) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        queued = await command(client, IMEI, {"command_type": "power_control", "action": "off"})

        async def poll() -> tuple[list[str], int]:
            body = (await client.get(f"{BASE}/{IMEI}/commands", headers=auth)).json()
            return [c["command_id"] for c in body["commands"]], body["next_poll_seconds"]

        assert await poll() == ([queued["id"]], 2)
        now[0] += 29
        assert await poll() == ([], 2)  # handed out, its ack awaited: poll fast, nothing new
        now[0] += 2  # 31 s: the light must have missed it (rebooted before acking)
        assert await poll() == ([queued["id"]], 2)
        r = await client.post(f"{BASE}/{IMEI}/command-ack", headers=auth,
                              json={"command_id": queued["id"], "status": "executed"})
        assert r.status_code == 200
        now[0] += 60
        assert await poll() == ([], 10)


async def test_an_operators_command_is_checked_against_the_specification(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw, headers=ADMIN) as client:
        await provision(gw, "streetlight", IMEI)
        url = f"/api/gateway/devices/{IMEI}/commands"
        for payload, message in (
                ({"command_type": "dim"}, "command_type: expected one of power_control, brightness_control, "
                                          "schedule_update, got 'dim'"),
                ({"command_type": "brightness_control"}, "brightness_level: expected an integer 0-100"),
                ({"command_type": "power_control", "action": "on", "command_id": "X"}, "command_id: unknown field"),
                ({"command_type": "schedule_update", "schedule": {"sunset_time": "25:00:00"}}, "schedule.sunset_time")):
            r = await client.post(url, json={"payload": payload})
            assert r.status_code == 400 and r.json()["error"]["message"].startswith(message), r.text


async def test_offline_sync_alert_and_logs(gateway_factory, upstream_receiver):
    async with gateway_factory(plugins=PLUGIN, upstream=upstream_receiver) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        readings = [{**status_report(), "timestamp": 1765967400 + 30 * i} for i in range(360)]  # 3 hours
        r = await client.post(f"{BASE}/{IMEI}/sync", content=gz({"readings": readings}),
                              headers={**auth, "Content-Encoding": "gzip"})
        assert r.status_code == 200 and r.json()["stored"] == 360, r.text
        bad = readings[:3] + [{**status_report(), "timestamp": None}]
        r = await client.post(f"{BASE}/{IMEI}/sync", json={"readings": bad}, headers=auth)
        assert r.status_code == 400 and r.json()["message"].startswith("readings[3].timestamp: required")
        for reading, message in (({"device_id": "IMEI:1"}, "readings[1].device_id: 'IMEI:1' is not the device"),
                                 ({"timestamp": "1970-01-01T00:00:00Z"}, "readings[1].timestamp: '1970-01-01"),
                                 ({"status": {"battery_percentage": -1}}, "readings[1].status.battery_percentage: ")):
            bad = [readings[0], {**readings[1], **reading}]
            r = await client.post(f"{BASE}/{IMEI}/sync", json={"readings": bad}, headers=auth)
            assert r.status_code == 400 and r.json()["message"].startswith(message), r.text
        for logs, message in (([{"level": "loud", "message": "x"}], "logs[0].level: expected"),
                              ([{"message": "x", "timestamp": "soon"}], "logs[0].timestamp: expected an ISO 8601")):
            r = await client.post(f"{BASE}/{IMEI}/logs", json={"logs": logs}, headers=auth)
            assert r.status_code == 400 and r.json()["message"].startswith(message), r.text
        r = await client.post(f"{BASE}/{IMEI}/sync", content=gz({"readings": readings})[:-8],
                              headers={**auth, "Content-Encoding": "gzip"})
        assert r.status_code == 400 and r.json()["code"] == "PAYLOAD_CORRUPT"
        r = await client.post(f"{BASE}/{IMEI}/alert", headers=auth, json={
            "alert_type": "battery_low", "severity": "critical", "message": "battery 8%", "data": {"battery": 8}})
        assert r.status_code == 200 and r.json()["status"] == "success"
        r = await client.post(f"{BASE}/{IMEI}/logs", content=gz({"logs": [{"level": "error", "message": "relay"}]}),
                              headers={**auth, "Content-Encoding": "gzip"})
        assert r.status_code == 200, r.text
        records = await upstream_receiver.wait_for(1 + 360 + 2)
        kinds = [r["kind"] for r in records]
        assert kinds.count("status") == 360 and "alert" in kinds and "logs" in kinds
        synced = [r for r in records if r["kind"] == "status"]
        assert min(r["data"]["timestamp"] for r in synced) == "2025-12-17T10:30:00Z"  # each at its own time
        assert max(r["data"]["timestamp"] for r in synced) == "2025-12-17T13:29:30Z"


async def test_rate_limit_answers_429_with_retry_after_seconds(gateway_factory):
    settings = ["plugins.streetlight.requests_per_minute=3"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        codes = [(await client.get(f"{BASE}/{IMEI}/commands", headers=auth)).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        r = await client.get(f"{BASE}/{IMEI}/commands", headers=auth)
        assert r.json()["code"] == "RATE_LIMITED" and r.json()["retry_after_seconds"] >= 1
        assert int(r.headers["Retry-After"]) == r.json()["retry_after_seconds"]


def from_address(address: str) -> dict[str, Any]:
    """gw_client's arguments for a client at another loopback address (127.0.0.0/8)."""
    return {"transport": httpx.AsyncHTTPTransport(local_address=address)}


async def test_a_stranger_cannot_use_up_a_lights_configures(gateway_factory):
    settings = ["plugins.streetlight.configure_per_minute=2", "plugins.streetlight.configure_per_address_per_minute=8"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as light, \
            gw_client(gw, **from_address("127.0.0.2")) as stranger:
        creds = await provision(gw, "streetlight", IMEI, metadata={"signed": True})
        await provision(gw, "streetlight", "IMEI:351234567890124")
        body = json.dumps(REGISTRATION).encode()
        # Forged signatures: refused, and not counted against the light.
        for _ in range(4):
            r = await stranger.post(f"{BASE}/{IMEI}/configure", content=body, headers=sign("forged", body))
            assert r.status_code == 401 and r.json()["code"] == "SIGNATURE_INVALID"
        # An unsigned light's configures count per client address: the stranger's run out...
        other = f"{BASE}/IMEI:351234567890124/configure"
        answers = [await stranger.post(other, json={"latitude": 28.6, "longitude": 77.2}) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429]
        assert "the light's configure" in answers[2].json()["message"]
        # ... and the per-address limit stops the stranger whatever the id (8 a minute: the 9th).
        assert (await stranger.post(f"{BASE}/IMEI:999/configure", json={})).status_code == 404
        r = await stranger.post(f"{BASE}/IMEI:999/configure", json={})
        assert r.status_code == 429 and r.json()["code"] == "RATE_LIMITED" and "address" in r.json()["message"]
        assert int(r.headers["Retry-After"]) == r.json()["retry_after_seconds"] >= 1
        # The lights themselves, from their own address, are served.
        r = await light.post(f"{BASE}/{IMEI}/configure", content=body, headers=sign(creds.signing_secret, body))
        assert r.status_code == 200, r.text
        assert (await light.post(other, json={"latitude": 28.6, "longitude": 77.2})).status_code == 200
        # A light's own configures are limited (signed: per light, whatever the address).
        r = await light.post(f"{BASE}/{IMEI}/configure", content=body, headers=sign(creds.signing_secret, body))
        assert r.status_code == 200
        r = await light.post(f"{BASE}/{IMEI}/configure", content=body, headers=sign(creds.signing_secret, body))
        assert r.status_code == 429 and "the light's configure" in r.json()["message"]


async def test_a_status_answer_refreshes_a_token_near_its_expiry(gateway_factory):
    settings = ["plugins.streetlight.token_ttl_s=7200", "plugins.streetlight.token_refresh_before_s=3600"]
    now = [time.time()]
    async with gateway_factory(plugins=PLUGIN, settings=settings, clock=lambda: now[0]) as gw, \
            gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        token = (await configure(client))["device_token"]
        r = await client.post(f"{BASE}/{IMEI}/status", json=status_report(), headers=bearer(token))
        assert "device_token" not in r.json()
        now[0] += 3700  # 58 minutes left
        r = await client.post(f"{BASE}/{IMEI}/status", json=status_report(), headers=bearer(token))
        fresh = r.json()["device_token"]
        assert jwt.decode(fresh, options={"verify_signature": False})["exp"] == int(now[0]) + 7200
        now[0] += 3600  # the old one expired: the light reconfigures (401), the fresh one works
        r = await client.post(f"{BASE}/{IMEI}/status", json=status_report(), headers=bearer(token))
        assert r.status_code == 401 and r.json()["code"] == "TOKEN_EXPIRED"
        r = await client.post(f"{BASE}/{IMEI}/status", json=status_report(), headers=bearer(fresh))
        assert r.status_code == 200


async def test_a_light_silent_for_thirty_days_must_configure_again(gateway_factory):
    now = [time.time()]
    settings = [f"plugins.streetlight.token_ttl_s={60 * 86400}"]
    async with gateway_factory(plugins=PLUGIN, settings=settings, clock=lambda: now[0]) as gw, \
            gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        token = (await configure(client))["device_token"]
        now[0] += 29 * 86400
        assert (await client.get(f"{BASE}/{IMEI}/commands", headers=bearer(token))).status_code == 200
        now[0] += 31 * 86400 - 60
        r = await client.get(f"{BASE}/{IMEI}/commands", headers=bearer(token))
        assert r.status_code == 401 and r.json()["code"] == "TOKEN_EXPIRED", r.text
        token = (await configure(client))["device_token"]
        assert (await client.get(f"{BASE}/{IMEI}/commands", headers=bearer(token))).status_code == 200


async def test_every_route_is_declared_in_the_plugins_openapi_document(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw, headers=ADMIN) as client:
        doc = (await client.get("/streetlight/openapi.json")).json()
        device = "/streetlight/device/{device_id}"
        assert sorted(doc["paths"]) == sorted([f"{device}/{p}" for p in (
            "configure", "status", "sync", "commands", "command-ack", "alert", "logs", "health", "firmware")]
            + ["/streetlight/firmware/{firmware_id}/image"])
        status = doc["paths"][f"{device}/status"]["post"]
        assert status["security"] == [{"deviceJwt": []}] and "404" in status["responses"]
        assert "security" not in doc["paths"][f"{device}/configure"]["post"]
        assert "415" in doc["paths"][f"{device}/sync"]["post"]["responses"]  # gzip welcome
        error = doc["components"]["schemas"]["Error"]
        assert sorted(error["required"]) == ["code", "message", "retry_after_seconds", "status"]
        assert (await client.get("/streetlight/docs")).status_code == 200


async def test_the_health_thresholds_are_the_default_alert_rules(gateway_factory, upstream_receiver):
    settings = ["plugins.streetlight.health.errors_per_hour_max=2"]
    async with gateway_factory(plugins=PLUGIN, settings=settings, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        for status in ({"battery_percentage": 8}, {"temperature_celsius": 70}, {"gsm_signal_strength": 5},
                       {"error_flags": ["lamp"]}, {"error_flags": ["relay"]}, {"error_flags": ["lamp"]}):
            r = await client.post(f"{BASE}/{IMEI}/status", json=status_report(**status), headers=auth)
            assert r.status_code == 200
        records = await upstream_receiver.wait_for(1 + 6 + 4)
        rules = sorted(r["data"]["rule"] for r in records if r["kind"] == "alert")
        assert rules == ["streetlight-battery-critical", "streetlight-malfunction", "streetlight-overheating",
                         "streetlight-poor-connectivity"]
        health = (await client.get(f"{BASE}/{IMEI}/health", headers=auth)).json()
        assert health["indicator"] == "red" and "malfunction (3 errors in the last hour)" in health["reason"]


async def test_firmware_says_whether_a_newer_image_waits_and_serves_it(gateway_factory, tmp_path):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        url = f"{BASE}/{IMEI}/firmware"
        r = await client.put(url, json={"firmware_version": "v2.1.0"}, headers=auth)
        assert r.status_code == 200 and r.json()["update_available"] is False and "firmware" not in r.json()
        image = tmp_path / "sl-2.2.0.bin"
        image.write_bytes(bytes(range(256)) * 64)
        await add_firmware(gw, image, family="streetlight", model="streetlight", version="v2.2.0")
        r = await client.put(url, json={"firmware_version": "v2.1.0"}, headers=auth)
        answer = r.json()
        assert answer["update_available"] is True and answer["firmware"]["version"] == "v2.2.0"
        assert answer["firmware"]["size"] == 16384 and answer["firmware"]["sha256"] == hashlib.sha256(
            image.read_bytes()).hexdigest()
        path = urlsplit(answer["firmware"]["url"]).path
        nope = await client.get(path)
        assert nope.status_code == 401, (path, nope.text)  # the light's token
        got = await client.get(path, headers=auth)
        assert got.status_code == 200 and got.content == image.read_bytes()
        for wrong in ("/streetlight/firmware/abc/image", "/streetlight/firmware/-1/image"):
            r = await client.get(wrong, headers=auth)  # the family's error body, not the router's
            assert r.status_code == 400 and r.json()["code"] == "INVALID_PAYLOAD", r.text
        assert (await client.get("/streetlight/firmware/99/image", headers=auth)).json()["code"] == "FIRMWARE_NOT_FOUND"
        part = await client.get(path, headers={**auth, "Range": "bytes=256-511"})
        assert part.status_code == 206 and part.content == image.read_bytes()[256:512]
        # How the update goes, reported; the new version known.
        r = await client.put(url, json={"firmware_version": "v2.2.0", "status": "installed"}, headers=auth)
        assert r.status_code == 200 and r.json()["update_available"] is False
        device = await gw.contexts["streetlight"].devices.get(IMEI)
        assert device is not None and device.firmware == "v2.2.0"
        for bad, message in (({"status": "flying"}, "status: expected one of started, downloaded"),
                             ({"channel": "nightly"}, "channel: expected one of stable, beta"),
                             ({"firmware_version": ""}, "firmware_version: ")):
            r = await client.put(url, json={"firmware_version": "v2.2.0", **bad}, headers=auth)
            assert r.status_code == 400 and r.json()["message"].startswith(message), r.text
