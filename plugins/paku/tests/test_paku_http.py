"""paku's HTTP API through the real app: provisioning, claim codes, devices, telemetry, OTA."""

import hashlib
import json

import pytest
from paku_testbed import AUTH, PAKU

from gatewayd.plugins.api import InboundMessage, Rejected
from gatewayd.testing import add_firmware, gw_client

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def telemetry(device: str, doc: dict | bytes) -> InboundMessage:
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return InboundMessage(f"paku/{device}/telemetry", payload, 1, False, False)


async def test_health_with_mqtt_off(gateway_factory):
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        r = await client.get("/paku/health")
        assert r.status_code == 200
        assert r.json()["mqtt"]["connected"] is False and "idle" in r.json()["mqtt"]["detail"]
        r = await client.get("/health")
        assert r.status_code == 200 and r.json()["plugins"]["paku"]["state"] == "ok"


async def test_provision_list_show_and_notes(gateway_factory):
    settings = ["plugins.paku.mqtt_host='broker.site.lan'", "plugins.paku.mqtt_port=18830"]
    async with gateway_factory(plugins=PAKU, settings=settings) as gw, gw_client(gw) as client:
        r = await client.post("/paku/devices", json={"id": "pk-1"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert (await client.get("/api/gateway/devices", headers=AUTH)).json()["devices"] == []

        r = await client.post("/paku/devices", headers=AUTH,
                              json={"id": "pk-1", "model": "pk-a", "notes": "boiler room"})
        assert r.status_code == 201, r.text
        doc = r.json()
        assert doc["id"] == "pk-1" and doc["model"] == "pk-a"
        assert doc["mqtt"]["host"] == "broker.site.lan" and doc["mqtt"]["port"] == 18830
        assert doc["mqtt"]["username"] == "pk-1" and len(doc["mqtt"]["password"]) >= 20
        assert doc["topics"]["telemetry"] == "paku/pk-1/telemetry"
        password = doc["mqtt"]["password"]

        r = await client.post("/paku/devices", headers=AUTH, json={})  # an id is made up
        assert r.status_code == 201 and r.json()["id"].startswith("paku-") and r.json()["model"] == "paku"
        assert (await client.post("/paku/devices", headers=AUTH, json={"id": "pk-1"})).status_code == 409
        r = await client.post("/paku/devices", headers=AUTH, json={"id": "a/b"})
        assert r.status_code == 400 and "id:" in r.json()["error"]["message"]
        r = await client.post("/paku/devices", headers=AUTH, json={"id": "x:1"})  # not an MQTT username
        assert r.status_code == 400
        r = await client.post("/paku/devices", headers=AUTH, json={"id": "pk-9", "notes": 5})
        assert r.status_code == 400 and "notes" in r.json()["error"]["message"]
        r = await client.post("/paku/devices", headers=AUTH, content=b"[1]")
        assert r.status_code == 400

        r = await client.get("/paku/devices", headers=AUTH)
        assert r.status_code == 200
        ids = [d["id"] for d in r.json()["devices"]]
        assert "pk-1" in ids and len(ids) == 2
        assert password not in r.text  # shown once
        assert (await client.get("/paku/devices")).status_code == 401

        r = await client.get("/paku/devices/pk-1", headers=AUTH)
        one = r.json()
        assert one["notes"] == "boiler room" and one["model"] == "pk-a" and one["createdAt"] > 0
        assert one["state"] is None and one["telemetry"] is None and one["fwVersion"] is None

        r = await client.patch("/paku/devices/pk-1", headers=AUTH, json={"notes": "moved to the attic"})
        assert r.status_code == 200 and r.json()["notes"] == "moved to the attic"
        assert (await client.patch("/paku/devices/nope", headers=AUTH, json={})).status_code == 404
        assert (await client.get("/paku/devices/nope", headers=AUTH)).status_code == 404


async def test_claim_code_flow(gateway_factory):
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        r = await client.post("/api/gateway/devices/claim-codes", headers=AUTH, json={"family": "paku"})
        code = r.json()["claim_code"]["code"]

        r = await client.post("/paku/claim", json={"code": code, "id": "pk-self", "model": "pk-b"})
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "pk-self" and r.json()["mqtt"]["password"]
        assert r.json()["status"] == "claimed" and r.json()["model"] == "pk-b"
        r = await client.post("/paku/claim", json={"code": code})
        assert r.status_code == 403 and "already used" in r.json()["error"]["message"]
        r = await client.post("/paku/claim", json={"code": "AAAA-BBBB-CCCC"})
        assert r.status_code == 403 and "unknown" in r.json()["error"]["message"]
        assert (await client.post("/paku/claim", json={})).status_code == 400

        # A code made for a provisioned device claims it; its password was handed out before.
        await client.post("/paku/devices", headers=AUTH, json={"id": "pk-2"})
        r = await client.post("/api/gateway/devices/claim-codes", headers=AUTH,
                              json={"family": "paku", "device_id": "pk-2"})
        r = await client.post("/paku/claim", json={"code": r.json()["claim_code"]["code"]})
        assert r.status_code == 200 and r.json()["status"] == "claimed" and "password" not in r.json()["mqtt"]
        r = await client.get("/api/gateway/devices/pk-2", headers=AUTH)
        assert r.json()["device"]["status"] == "claimed"


async def test_claim_is_rate_limited(gateway_factory):
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        answers = [(await client.post("/paku/claim", json={"code": "AAAA-BBBB-CCCC"})).status_code
                   for _ in range(11)]
        assert answers[:10] == [403] * 10 and answers[10] == 429


async def test_a_group_of_telemetry_is_stored_together_and_a_bad_message_is_rejected_alone(gateway_factory):
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        await client.post("/paku/devices", headers=AUTH, json={"id": "pk-1"})
        paku = gw.contexts["paku"].state
        group = [telemetry("pk-1", {"ts": T0, "temp_c": 20}), telemetry("pk-1", b'{"temp_c": NaN}'),
                 telemetry("pk-9", {"temp_c": 1}), telemetry("pk-1", {"ts": T0 + 1, "temp_c": 21})]
        outcomes = await paku.on_telemetry_group(group)
        assert outcomes[0] is None and outcomes[3] is None
        assert outcomes[1].reason.startswith("temp_c: NaN is not a JSON number"), outcomes[1].reason
        assert outcomes[2].reason == "unknown device 'pk-9': not registered in family paku"
        r = await client.get("/paku/devices/pk-1/telemetry", headers=AUTH)
        assert [m["payload"]["temp_c"] for m in r.json()["telemetry"]] == [21, 20], r.json()
        assert paku.is_online("pk-1")  # heard: touched once for the group
        metrics = (await client.get("/metrics")).text
        assert 'gatewayd_paku_messages_total{kind="telemetry",outcome="stored"} 2' in metrics
        assert 'gatewayd_paku_messages_total{kind="telemetry",outcome="rejected"} 2' in metrics


async def test_telemetry_query_with_cursor(gateway_factory):
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        await client.post("/paku/devices", headers=AUTH, json={"id": "pk-1"})
        handlers = gw.contexts["paku"].state
        for i in range(25):
            await handlers.on_telemetry(telemetry("pk-1", {"ts": T0 + i, "temp_c": 20 + i}))

        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 10, "since": T0 + 2, "until": "2026-01-01T00:00:22Z"}
            r = await client.get("/paku/devices/pk-1/telemetry", headers=AUTH,
                                 params={**params, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200, r.text
            seen += [m["payload"]["temp_c"] for m in r.json()["telemetry"]]
            cursor, pages = r.json()["next_cursor"], pages + 1
            if cursor is None:
                break
        assert seen == list(range(41, 21, -1)) and pages == 2  # ts 2..21, newest first

        for bad, word in [({"limit": 0}, "limit"), ({"limit": "x"}, "limit"), ({"since": "yesterday"}, "since"),
                          ({"cursor": "bm9wZQ"}, "cursor")]:
            r = await client.get("/paku/devices/pk-1/telemetry", headers=AUTH, params=bad)
            assert r.status_code == 400 and r.json()["error"]["message"].startswith(word)
        assert (await client.get("/paku/devices/nope/telemetry", headers=AUTH)).status_code == 404

        r = await client.get("/paku/devices/pk-1", headers=AUTH)
        assert r.json()["telemetry"]["payload"]["temp_c"] == 44 and r.json()["lastSeenAt"] is not None


async def test_bad_messages_are_rejected_precisely(gateway_factory):
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        await client.post("/paku/devices", headers=AUTH, json={"id": "pk-1"})
        handlers = gw.contexts["paku"].state
        cases = [
            (telemetry("ghost", {"t": 1}), "unknown device 'ghost'"),
            (telemetry("pk-1", b'{"temp": '), "payload: not JSON (Expecting value: line 1 column 10 (char 9))"),
            (telemetry("pk-1", b"[1, 2]"), "expected a JSON object, got an array"),
            (telemetry("pk-1", b'{"t": NaN}'), "t: NaN is not a JSON number"),
            (telemetry("pk-1", b"\xff\xfe"), "payload: not UTF-8"),
            (telemetry("pk-1", {"ts": 1767225600000}), "ts: 1767225600000 is not between 2000 and 2200"),
            (InboundMessage("paku/pk-1/state", b'{"rssi": "strong"}', 0, True, False), "rssi: expected a signal strength in dBm"),
            (InboundMessage("paku/pk-1/event/a/b", b"{}", 1, False, False), "event name 'a/b'"),
            (InboundMessage("paku/pk-1/event/ack", b'{"id": "nope"}', 1, False, False),
             "ack: no command 'nope' for device 'pk-1'"),
        ]
        for msg, reason in cases:
            with pytest.raises(Rejected) as e:
                await handlers.on_event(msg) if "/event/" in msg.topic else (
                    await handlers.on_state(msg) if msg.topic.endswith("/state") else await handlers.on_telemetry(msg))
            assert e.value.reason.startswith(reason), e.value.reason
        assert (await client.post("/api/gateway/devices/pk-1/disable", headers=AUTH)).status_code == 200
        with pytest.raises(Rejected, match="disabled"):
            await handlers.on_telemetry(telemetry("pk-1", {"t": 1}))
        r = await client.get("/paku/devices/pk-1", headers=AUTH)
        assert r.json()["telemetry"] is None and r.json()["state"] is None
        r = await client.get("/metrics")
        assert 'gatewayd_paku_messages_total{kind="telemetry",outcome="rejected"} 7' in r.text


async def test_ota_manifest_and_download(gateway_factory, tmp_path):
    image = tmp_path / "pk-a-1.2.0.bin"
    image.write_bytes(bytes(range(256)) * 40)
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    async with gateway_factory(plugins=PAKU) as gw, gw_client(gw) as client:
        await add_firmware(gw, _write(tmp_path / "old.bin"), family="paku", model="pk-a", version="1.1.0")
        await add_firmware(gw, image, family="paku", model="pk-a", version="1.2.0")

        r = await client.get("/paku/ota/manifest.json", params={"model": "pk-a", "current": "1.1.0"})
        assert r.status_code == 200
        [entry] = r.json()
        assert entry["model"] == "pk-a" and entry["version"] == "1.2.0" and entry["sha256"] == sha
        assert (await client.get("/paku/ota/manifest.json", params={"model": "pk-a", "current": "1.2"})).json() == []
        assert [e["version"] for e in (await client.get("/paku/ota/manifest.json")).json()] == ["1.2.0"]
        r = await client.get("/paku/ota/manifest.json", params={"model": "pk-a", "current": "one"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("current:")

        r = await client.get(entry["url"])
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == sha
        assert r.headers["ETag"] == f'"{sha}"'
        r = await client.get(entry["url"], headers={"Range": "bytes=100-"})
        assert r.status_code == 206 and r.content == image.read_bytes()[100:]
        assert (await client.get("/paku/ota/999/firmware.bin")).status_code == 404


async def test_urls_and_addresses_handed_to_devices_come_from_the_config_not_the_host_header(gateway_factory, tmp_path):
    image = _write(tmp_path / "img.bin")
    settings = ["http.public_url='http://192.0.2.10:8080'"]
    async with gateway_factory(plugins=PAKU, settings=settings) as gw, gw_client(gw) as client:
        await add_firmware(gw, image, family="paku", model="m", version="1.0.0")
        forged = {"Host": "evil.example"}
        [entry] = (await client.get("/paku/ota/manifest.json", headers=forged)).json()
        assert entry["url"].startswith("http://192.0.2.10:8080/paku/ota/")
        r = await client.post("/paku/devices", headers={**AUTH, **forged}, json={"id": "pk-1"})
        assert r.json()["mqtt"]["host"] == "192.0.2.10"


def _write(path):
    path.write_bytes(b"old image")
    return path
