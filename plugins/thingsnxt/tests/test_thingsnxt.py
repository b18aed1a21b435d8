"""gatewayd_thingsnxt against a real gateway from gatewayd.testing (SQLite under tmp_path, real
listeners, the reference upstream receiver, a real webhook receiver): what an ESP32 and an
app of the specification do. Run them with ./scripts/test plugins/thingsnxt."""

import functools
import gzip
import hashlib
import hmac
import json
import logging
import re
from html import unescape

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio
from trio_websocket import open_websocket_url

import gatewayd_thingsnxt
from gatewayd.testing import gw_client, gw_url, provision, storage_full, wait_until

PLUGIN = [("thingsnxt", gatewayd_thingsnxt)]
TOKEN = "thingsnxt-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
UNLIMITED = ["plugins.thingsnxt.rate_limit=0"]


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


def v2(client, creds, data, device_id=None, **kwargs):
    return client.post(f"/thingsnxt/devices/{device_id or creds.device_id}/telemetry",
                       json={"device_token": creds.key, "data": data}, **kwargs)


async def test_a_device_sends_telemetry_and_it_is_stored_and_forwarded(gateway_factory, upstream_receiver):
    async with gateway_factory(plugins=PLUGIN, upstream=upstream_receiver, settings=UNLIMITED) as gw, \
            gw_client(gw) as client:
        esp = await provision(gw, "thingsnxt", "6123456abc")
        r = await v2(client, esp, {"v0": 1, "v1": 0, "temperature": 25.5})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert (answer["message"], answer["device_id"], answer["data"]) == \
            ("ok", "6123456abc", {"v0": 1, "v1": 0, "temperature": 25.5})
        assert answer["timestamp"].endswith("Z")
        # Picked by kind: the device's own events (coming online) may be forwarded first.
        [record] = await wait_until(lambda: [r for r in upstream_receiver.records() if r["kind"] == "telemetry"],
                                    what="the telemetry record upstream")
        assert (record["family"], record["device"], record["kind"], record["data"]) == \
            ("thingsnxt", "6123456abc", "telemetry", {"v0": 1, "v1": 0, "temperature": 25.5})
        # The legacy endpoint: the token alone says which device; the LED state in the answer.
        r = await client.post("/thingsnxt/telemetry", json={"device_token": esp.key, "data": {"temperature": 26}})
        assert r.status_code == 200 and (r.json()["device_id"], r.json()["led"]) == ("6123456abc", 1)
        assert r.json()["updated_data"] == {"v0": 1, "v1": 0, "temperature": 26}
        # Polling: the latest state.
        r = await client.get("/thingsnxt/telemetry/latest", params={"device_token": esp.key})
        assert r.status_code == 200 and r.json()["data"]["temperature"] == 26
        assert (await client.get("/thingsnxt/health")).json() == {"status": "ok"}
        await upstream_receiver.wait_for(2)


async def test_the_specifications_error_codes(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=UNLIMITED) as gw, gw_client(gw) as client:
        esp = await provision(gw, "thingsnxt", "esp-1")
        other = await provision(gw, "thingsnxt", "esp-2")
        post = functools.partial(client.post, "/thingsnxt/devices/esp-1/telemetry")
        cases = [
            (post(content=b"{not json"), 400, "body: "),
            (post(content=b'{"device_token": "x", "data": {"t": NaN}}'), 400, ""),
            (post(json={"data": {"v0": 1}}), 400, "device_token: required"),
            (post(json={"device_token": esp.key, "data": {"a b": 1}}), 400, "data: key 'a b': expected 1-64"),
            (post(json={"device_token": other.key, "data": {}}), 403, "Invalid device token"),
            (post(json={"device_token": "wrong", "data": {}}), 403, "Invalid device token"),
            (v2(client, esp, {}, device_id="nobody"), 404, "Device not found"),
            (client.post("/thingsnxt/telemetry", json={"device_token": "wrong"}), 403, "Invalid device token"),
            (client.get("/thingsnxt/telemetry/latest"), 400, "device_token"),
            (client.get("/thingsnxt/telemetry/latest", params={"device_token": "wrong"}), 403, "Invalid"),
            (post(content=b"\x1f\x8b\x08\x00garbage", headers={"Content-Encoding": "gzip"}), 400, ""),
            (post(content=gzip.compress(b" " * 5_000_000), headers={"Content-Encoding": "gzip"}), 413, ""),
            (post(content=b"{}", headers={"Content-Encoding": "br"}), 415, ""),
        ]
        for request_, status, start in cases:
            r = await request_
            assert r.status_code == status, r.text
            assert set(r.json()) == {"detail"} and r.json()["detail"].startswith(start), r.text
        r = await client.get("/thingsnxt/telemetry/latest", params={"device_token": esp.key})
        assert r.json()["data"] == {}  # nothing refused was stored
        async with storage_full(gw):  # full once the pages in use are
            while (r := await v2(client, esp, {"t": 1})).status_code == 200:
                pass
            assert r.status_code == 507 and r.json()["detail"].startswith("Storage full")


async def test_gzip_and_bulk_for_a_device_that_cached_while_offline(gateway_factory, upstream_receiver):
    async with gateway_factory(plugins=PLUGIN, upstream=upstream_receiver, settings=UNLIMITED) as gw, \
            gw_client(gw) as client:
        esp = await provision(gw, "thingsnxt", "esp-1")
        now = gw.clock()
        doc = {"device_token": esp.key, "readings": [{"timestamp": now - 20 + i, "data": {"t": i}} for i in range(3)]}
        r = await client.post("/thingsnxt/devices/esp-1/telemetry/bulk", content=gzip.compress(json.dumps(doc).encode()),
                              headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        assert (r.json()["stored"], r.json()["data"]) == (3, {"t": 2})
        # Only the telemetry: the device's own events (it came online) may go upstream meanwhile.
        records = await wait_until(lambda: len(t := [rec for rec in upstream_receiver.records()
                                                     if rec["kind"] == "telemetry"]) >= 3 and t,
                                   what="3 telemetry records upstream")
        assert sorted((rec["ts"], rec["data"]["t"], rec["device"]) for rec in records) == \
            [(_iso(now - 20 + i), i, "esp-1") for i in range(3)]  # each with its own time
        r = await v2(client, esp, {"t": 9}, content=None)
        assert r.json()["data"] == {"t": 9}


async def test_an_app_sets_a_pin_and_the_device_gets_it(gateway_factory, upstream_receiver):
    settings = [*UNLIMITED, "plugins.thingsnxt.security.models.relay={device_writes=['v*', 'temperature']}"]
    async with gateway_factory(plugins=PLUGIN, upstream=upstream_receiver, settings=settings) as gw, \
            gw_client(gw) as client:
        esp = await provision(gw, "thingsnxt", "esp-1", model="relay")
        assert (await v2(client, esp, {"v0": 0, "temperature": 20})).status_code == 200
        r = await client.put("/thingsnxt/devices/esp-1/state", json={"data": {"v0": 1}}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["pending"] == {"v0": 1}, r.text
        # The device polls: the app's value.
        r = await client.get("/thingsnxt/telemetry/latest", params={"device_token": esp.key})
        assert r.json()["data"] == {"v0": 1, "temperature": 20}
        # Its next telemetry still says the old LED: the answer keeps the app's value to sync to.
        r = await v2(client, esp, {"v0": 0, "temperature": 21})
        assert r.json()["data"] == {"v0": 1, "temperature": 21}
        r = await v2(client, esp, {"v0": 1})  # synced
        assert (await client.get("/thingsnxt/devices/esp-1/state", headers=ADMIN)).json()["pending"] == {}
        # The security rules.
        r = await v2(client, esp, {"humidity": 40})
        assert r.status_code == 403 and r.json()["detail"] == "Security rules: this device may not write humidity"
        r = await client.put("/thingsnxt/devices/esp-1/state", json={"data": {"temperature": 5}}, headers=ADMIN)
        assert r.status_code == 403 and "may not set temperature" in r.json()["detail"]
        r = await client.put("/thingsnxt/devices/esp-1/state", json={"data": {"v0": 1}})
        assert r.status_code == 401 and r.json()["error"]["code"]  # the core's admin refusal
        r = await client.put("/thingsnxt/devices/ghost/state", json={"data": {"v0": 1}}, headers=ADMIN)
        assert r.status_code == 404
        records = await upstream_receiver.wait_for(4)
        assert ("state_set", {"v0": 1}) in [(rec["kind"], rec["data"]) for rec in records]


async def test_the_telemetry_bodies_are_in_the_openapi_document(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=UNLIMITED) as gw, gw_client(gw) as client:
        doc = (await client.get("/thingsnxt/openapi.json", headers=ADMIN)).json()
        bodies = {}
        for path, method in (("/thingsnxt/devices/{device_id}/telemetry", "post"), ("/thingsnxt/telemetry", "post"),
                             ("/thingsnxt/devices/{device_id}/telemetry/bulk", "post")):
            operation = doc["paths"][path][method]
            assert {"400", "403", "413", "415", "429"} <= set(operation["responses"]), path
            assert "gzip" in operation["responses"]["400"]["description"]
            ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            bodies[path] = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
        v2 = bodies["/thingsnxt/devices/{device_id}/telemetry"]
        assert v2["required"] == ["device_token"] and set(v2["properties"]) == {"device_token", "data"}
        assert v2["properties"]["data"]["propertyNames"] == {"pattern": "^[A-Za-z0-9_.:-]{1,64}$"}
        assert set(bodies["/thingsnxt/devices/{device_id}/telemetry/bulk"]["required"]) == {"device_token", "readings"}


async def test_an_operator_registers_a_device(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=UNLIMITED) as gw, gw_client(gw) as client:
        r = await client.post("/thingsnxt/devices", json={"device_id": "esp-9", "name": "hall"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        doc = r.json()
        assert doc["device_id"] == "esp-9" and doc["api_base_url"].endswith("/thingsnxt")
        r = await client.post("/thingsnxt/devices/esp-9/telemetry", json={"device_token": doc["device_token"]})
        assert r.status_code == 200
        r = await client.post("/thingsnxt/devices", json={"device_id": "esp-9"}, headers=ADMIN)
        assert r.status_code == 409
        r = await client.post("/thingsnxt/devices", json={"device_id": "esp 9"}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["detail"].startswith("device_id")


async def test_429_after_the_limit_but_never_for_health(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=["plugins.thingsnxt.rate_limit=5"]) as gw, \
            gw_client(gw) as client:
        esp = await provision(gw, "thingsnxt", "esp-1")
        statuses = [(await v2(client, esp, {"t": i})).status_code for i in range(7)]
        assert statuses == [200] * 5 + [429] * 2
        # Before the body is read: a client over its limit is not answered about its body.
        r = await client.post("/thingsnxt/telemetry", content=b"{not json")
        assert r.status_code == 429 and "Too many requests" in r.json()["detail"]
        r = await client.get("/thingsnxt/telemetry/latest", params={"device_token": esp.key})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and r.json()["detail"]
        assert all([(await client.get("/thingsnxt/health")).status_code == 200 for _ in range(10)])


async def test_config_typos_are_named(gateway_factory):
    for setting, message in (("plugins.thingsnxt.rate_limt=5", "rate_limt"),
                             ("plugins.thingsnxt.offline_after_s=1", "offline_after_s: must be at least 5"),
                             ("plugins.thingsnxt.webhooks=[{url='ftp://x'}]", "url: expected an http")):
        with pytest.raises(Exception, match=message):
            async with gateway_factory(plugins=PLUGIN, settings=[setting]):
                pass


async def test_sse_and_websocket_clients_receive_the_broadcast(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=UNLIMITED) as gw, gw_client(gw) as client:
        # Tokens as `gatewayd tokens add` makes them (the CLI's connection: before the traffic).
        app = await trio.to_thread.run_sync(gw.tokens.add_blocking, "app", ["live:thingsnxt"], 3600.0)
        other = await trio.to_thread.run_sync(gw.tokens.add_blocking, "lobby", ["live:paku"], 3600.0)
        esp = await provision(gw, "thingsnxt", "esp-1")
        assert (await v2(client, esp, {"v0": 1})).status_code == 200
        assert (await client.get("/thingsnxt/sse")).status_code == 401
        r = await client.get("/thingsnxt/sse", params={"token": other})
        assert r.status_code == 403 and r.json()["detail"].startswith("this token may not watch")
        ws_url = gw_url(gw).replace("http", "ws", 1)
        async with client.stream("GET", "/thingsnxt/sse/esp-1", params={"token": app}) as sse, \
                open_websocket_url(f"{ws_url}/thingsnxt/ws?token={app}") as ws:
            assert sse.status_code == 200
            messages = _data(sse.aiter_lines())
            first = await anext(messages)
            assert first["type"] == "state" and first["data"] == {"v0": 1}  # a late subscriber: the state first
            await wait_until(lambda: gw.live.subscribers == 2)
            assert (await v2(client, esp, {"v0": 0, "temperature": 22})).status_code == 200
            got = json.loads(await ws.get_message())
            assert (got["type"], got["device_id"], got["data"]) == \
                ("telemetry_update", "esp-1", {"v0": 0, "temperature": 22})
            assert await anext(messages) == got
            # Readings that arrive while the client is not reading come as one batch, each its own event, in order.
            for t in range(5):
                assert (await v2(client, esp, {"t": t})).status_code == 200
            assert [(await anext(messages))["data"] for _ in range(5)] == [{"t": t} for t in range(5)]
        async with open_websocket_url(f"{ws_url}/thingsnxt/ws?token={other}") as ws:
            with pytest.raises(Exception):
                await ws.get_message()
            assert ws.closed.code == 4403


async def _data(lines):
    async for line in lines:
        if line.startswith("data: "):
            yield json.loads(line[6:])


class Receiver:
    def __init__(self):
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.app = QuartTrio("receiver")
        self.app.add_url_rule("/hook", "hook", self.hook, methods=["POST"])

    async def hook(self):
        self.received.append(({k.lower(): v for k, v in request.headers.items()}, await request.get_data()))
        return {"ok": True}


async def test_a_signed_webhook_and_one_notification_despite_flapping(gateway_factory, upstream_receiver, monkeypatch,
                                                                     caplog):
    monkeypatch.setenv("THINGSNXT_HOOK_SECRET", "hook-secret")
    receiver = Receiver()
    config = HypercornConfig()
    config.bind, config.accesslog = ["127.0.0.1:0"], None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(functools.partial(serve, receiver.app, config, shutdown_trigger=stop.wait))
        hook = (f"plugins.thingsnxt.webhooks=[{{url='{url}/hook', secret_env='THINGSNXT_HOOK_SECRET', "
                f"events=['telemetry_update', 'device_offline']}}]")
        settings = [*UNLIMITED, hook, "devices.presence_flush_s=0.05", "plugins.thingsnxt.notify_cooldown_s=3600"]
        async with gateway_factory(plugins=PLUGIN, upstream=upstream_receiver, settings=settings) as gw, \
                gw_client(gw) as client:
            esp = await provision(gw, "thingsnxt", "esp-1")
            gw.devices.presence.offline_after("thingsnxt", 0.3)  # the configured minimum is 5 s: faster here
            for _ in range(3):  # online, silent, offline: flapping
                assert (await v2(client, esp, {"v0": 1})).status_code == 200
                await wait_until(lambda: not gw.contexts["thingsnxt"].devices.is_online("esp-1"), timeout=5)
            await wait_until(lambda: len(receiver.received) >= 4, timeout=10)
            await trio.sleep(0.5)
            kinds = [json.loads(body)["event_type"] for _, body in receiver.received]
            assert sorted(kinds) == ["device_offline"] + ["telemetry_update"] * 3  # one offline despite 3
            headers, body = receiver.received[0]
            expected = "sha256=" + hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["x-gatewayd-signature"], expected)
            records = await upstream_receiver.wait_for(5)  # 3 readings, 1 online, 1 offline
            await trio.sleep(0.5)
            alerts = [r["data"]["rule"] for r in upstream_receiver.records() if r["class"] == "alert"]
            assert sorted(alerts) == ["thingsnxt-offline", "thingsnxt-online"], records
            # Readings keep coming (webhooks queued) as the gateway stops: a clean stop says nothing alarming.
            caplog.clear()
            caplog.set_level(logging.WARNING)
            for i in range(20):
                assert (await v2(client, esp, {"t": i})).status_code == 200
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert "notification queue unavailable" not in caplog.text
        stop.set()


def _iso(ts):
    from gatewayd_thingsnxt.telemetry import iso
    return iso(ts)


async def test_the_dashboard_shows_its_health_and_charts(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=UNLIMITED) as gw, gw_client(gw) as client:
        esp = await provision(gw, "thingsnxt", "esp-1")
        for t in (20.5, 21.0):
            assert (await v2(client, esp, {"temperature": t, "relay_on": True, "room_name": "hall"})).status_code == 200
        page = await client.get("/dashboard/devices/esp-1", params={"family": "thingsnxt"}, headers=ADMIN)
        assert page.status_code == 200 and "temperature" in page.text and "sending" in page.text
        assert "relay_on" not in page.text and "room_name" not in page.text  # booleans and text are not charted


async def test_the_streams_say_when_a_device_comes_and_goes(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=UNLIMITED) as gw, gw_client(gw) as client:
        esp = await provision(gw, "thingsnxt", "esp.1")  # a dot: one name in the hub's stream (esp_1)
        gw.devices.presence.offline_after("thingsnxt", 0.3)
        ws_url = gw_url(gw).replace("http", "ws", 1)
        async with open_websocket_url(f"{ws_url}/thingsnxt/ws/esp.1", extra_headers=[("Authorization",
                                                                                     f"Bearer {TOKEN}")]) as ws:
            await wait_until(lambda: gw.live.subscribers == 1)
            assert (await v2(client, esp, {"v0": 1})).status_code == 200
            messages = [json.loads(await ws.get_message()) for _ in range(4)]
            assert [(m["type"], m.get("status")) for m in messages] == [
                ("state", None), ("status_update", "online"), ("telemetry_update", None), ("status_update", "offline")]
            assert all(m["device_id"] == "esp.1" for m in messages)


async def test_an_operator_sets_a_pin_from_the_dashboard(gateway_factory, upstream_receiver):
    settings = [*UNLIMITED, "plugins.thingsnxt.security.devices.esp-2={app_sets=['v1']}"]
    async with gateway_factory(plugins=PLUGIN, upstream=upstream_receiver, settings=settings) as gw, \
            gw_client(gw) as client:
        esp = await provision(gw, "thingsnxt", "esp-1")
        await provision(gw, "thingsnxt", "esp-2")
        assert (await v2(client, esp, {"v0": 0, "temperature": 20})).status_code == 200
        # A script with the admin token sees the pins, and no form (it has no session).
        page = (await client.get("/", headers=ADMIN)).text
        assert "Log in to the dashboard to set pins" in page and 'class="set-pin"' not in page
        assert (await client.post("/dashboard/login", data={"token": TOKEN})).status_code == 303
        row = _pins_row((await client.get("/")).text, "esp-1")
        assert "<code>v0</code> 0" in row and "temperature" not in row and ">v*<" in row  # only what an app may set
        assert ">v1<" in _pins_row((await client.get("/")).text, "esp-2")  # its own rules
        csrf = re.search(r'name="csrf" value="([^"]+)"', row)[1]
        origin = {"Origin": gw_url(gw)}

        async def set_pin(device, key, value, **extra):
            return await client.post("/thingsnxt/dashboard/pins", headers=origin,
                                     data={"csrf": csrf, "device": device, "key": key, "value": value, **extra})

        r = await set_pin("esp-1", "v0", "1")
        assert r.status_code == 303 and r.headers["location"] == "/#thingsnxt-pins"
        r = await client.get("/thingsnxt/telemetry/latest", params={"device_token": esp.key})
        assert r.json()["data"] == {"v0": 1, "temperature": 20}  # a number, as an app sets it
        page = (await client.get("/")).text
        assert 'data-outcome="ok"' in page and "(pending)" in _pins_row(page, "esp-1")
        assert (await set_pin("esp-1", "v2", "on")).status_code == 303
        state = (await client.get("/thingsnxt/devices/esp-1/state", headers=ADMIN)).json()
        assert state["pending"] == {"v0": 1, "v2": "on"}
        # The security rules, a bad key, an unknown device: refused, said on the panel, nothing set.
        for device, key, message in (("esp-1", "temperature", "esp-1: Security rules: an app may not set temperature"),
                                     ("esp-2", "v0", "esp-2: Security rules: an app may not set v0"),
                                     ("esp-1", "a b", "esp-1: data: key 'a b'"),
                                     ("ghost", "v0", "ghost: Device not found")):
            assert (await set_pin(device, key, "5")).status_code == 303
            outcome = re.search(r'data-outcome="(\w+)">([^<]*)<', (await client.get("/")).text)
            assert outcome[1] == "refused" and unescape(outcome[2]).startswith(message), outcome[2]
        assert (await client.get("/thingsnxt/devices/esp-1/state", headers=ADMIN)).json()["pending"] == \
            {"v0": 1, "v2": "on"}
        # Not from the dashboard's page: refused in the family's shape.
        for r in (await client.post("/thingsnxt/dashboard/pins", headers=origin,
                                    data={"device": "esp-1", "key": "v0", "value": "0"}),
                  await set_pin("esp-1", "v0", "0", csrf="forged"),
                  await client.post("/thingsnxt/dashboard/pins", data={"csrf": csrf, "device": "esp-1", "key": "v0",
                                                                       "value": "0"},
                                    headers={"Origin": "http://evil.example"}),
                  await client.post("/thingsnxt/dashboard/pins", headers=ADMIN,
                                    data={"device": "esp-1", "key": "v0", "value": "0"})):
            assert r.status_code == 403 and r.json()["detail"].startswith("This form was not sent"), r.text
        assert (await client.get("/thingsnxt/devices/esp-1/state", headers=ADMIN)).json()["data"]["v0"] == 1
        records = await upstream_receiver.wait_for(3)
        # Both, in either order: the outbox sends the newest state first when both wait.
        sets = [r["data"] for r in records if r["kind"] == "state_set"]
        assert sorted(sets, key=json.dumps) == [{"v0": 1}, {"v2": "on"}]


def _pins_row(page, device):
    return re.search(rf'<tr data-pins="{device}">(.*?)</tr>', page, re.S)[1]


class HeldReceiver(Receiver):
    """/global: its first delivery is held until `release`, then refused (503): retried;
    /esp-2: a per-device webhook's."""

    def __init__(self):
        super().__init__()
        self.release = trio.Event()
        self.held = trio.Event()
        self.by_path: dict[str, list[dict]] = {"/global": [], "/esp-2": []}
        self.answers: list[int] = []
        self.app.add_url_rule("/global", "global", self.hook_at, methods=["POST"])
        self.app.add_url_rule("/esp-2", "esp2", self.hook_at, methods=["POST"])

    async def hook_at(self):
        doc = json.loads(await request.get_data())
        self.by_path[request.path].append(doc)
        if request.path == "/global" and not self.release.is_set():
            self.held.set()
            await self.release.wait()
            self.answers.append(503)
            return {"busy": True}, 503
        self.answers.append(200)
        return {"ok": True}


async def test_global_and_per_device_webhooks_retried_and_never_in_the_way(gateway_factory):
    receiver = HeldReceiver()
    config = HypercornConfig()
    config.bind, config.accesslog = ["127.0.0.1:0"], None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(functools.partial(serve, receiver.app, config, shutdown_trigger=stop.wait))
        hooks = (f"plugins.thingsnxt.webhooks=[{{url='{url}/global'}}, "
                 f"{{url='{url}/esp-2', devices=['esp-2'], events=['telemetry_update']}}]")
        async with gateway_factory(plugins=PLUGIN, settings=[*UNLIMITED, hooks]) as gw, gw_client(gw) as client:
            one, two = await provision(gw, "thingsnxt", "esp-1"), await provision(gw, "thingsnxt", "esp-2")
            assert (await v2(client, one, {"t": 1})).status_code == 200
            await receiver.held.wait()  # the global webhook's receiver holds esp-1's delivery
            # Telemetry is answered meanwhile: the queue does not stand in its way.
            assert (await v2(client, two, {"t": 2})).status_code == 200
            assert (await v2(client, one, {"t": 3})).status_code == 200
            receiver.release.set()

            def delivered():
                return [(d["device_id"], d["event"]["data"]["data"]["t"]) for d in receiver.by_path["/global"]]

            # Deliveries go out side by side (an endpoint has room for two): while esp-1's first one
            # is held, the next may be held (and refused) too; each is retried on its own.
            await wait_until(lambda: delivered().count(("esp-1", 1)) >= 2 and len(set(delivered())) == 3
                             and receiver.by_path["/esp-2"], timeout=15,
                             what="the global webhook's three events (esp-1's first retried) and esp-2's own")
            deliveries = delivered()
            assert deliveries.count(("esp-1", 1)) == 2 and 503 in receiver.answers  # refused once, retried
            assert sorted(set(deliveries)) == [("esp-1", 1), ("esp-1", 3), ("esp-2", 2)]
            assert [(d["device_id"], d["event"]["data"]["data"]) for d in receiver.by_path["/esp-2"]] == [("esp-2", {"t": 2})]
        stop.set()


async def test_offline_after_s_is_the_families_threshold_and_bulk_readings_go_live(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=[*UNLIMITED, "plugins.thingsnxt.offline_after_s=7"]) as gw, \
            gw_client(gw) as client:
        assert gw.devices.presence.thresholds["thingsnxt"] == 7
        esp = await provision(gw, "thingsnxt", "esp-1")
        now = gw.clock()
        ws_url = gw_url(gw).replace("http", "ws", 1)
        async with open_websocket_url(f"{ws_url}/thingsnxt/ws/esp-1",
                                      extra_headers=[("Authorization", f"Bearer {TOKEN}")]) as ws:
            await wait_until(lambda: gw.live.subscribers == 1)
            doc = {"device_token": esp.key, "readings": [{"timestamp": now - 30 + i, "data": {"t": i}} for i in (2, 0, 1)]}
            r = await client.post("/thingsnxt/devices/esp-1/telemetry/bulk", json=doc)
            assert r.status_code == 200 and r.json()["stored"] == 3
            messages = [json.loads(await ws.get_message()) for _ in range(5)]
        assert [m["type"] for m in messages] == ["state", "status_update"] + ["telemetry_update"] * 3
        # Each reading, oldest first, with its own time.
        assert [(m["data"]["t"], m["timestamp"]) for m in messages[2:]] == [(i, _iso(now - 30 + i)) for i in range(3)]
