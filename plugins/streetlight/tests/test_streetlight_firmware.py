"""End to end: the reference firmware (firmware/streetlight/controller.py), on a clock 30 times
faster than real time, against a real gateway and the upstream reference receiver."""

from __future__ import annotations

import importlib.util
import ssl
import subprocess
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from streetlight_testbed import ADMIN, IMEI, PLUGIN, command

from gatewayd.testing import gw_client, gw_url, provision, reserved_port, storage_failing, wait_until

FIRMWARE = Path(__file__).resolve().parents[3] / "firmware" / "streetlight" / "controller.py"
_spec = importlib.util.spec_from_file_location("streetlight_controller", FIRMWARE)
assert _spec is not None and _spec.loader is not None
controller: Any = importlib.util.module_from_spec(_spec)
sys.modules["streetlight_controller"] = controller  # (dataclasses look their module up)
_spec.loader.exec_module(controller)

SPEED = 30.0
# The light's clock runs 30 times faster than the gateway's: its 10-second polls are a
# third of a second here, so the per-light rate limit is raised for these tests.
SETTINGS = ["plugins.streetlight.requests_per_minute=100000"]


@asynccontextmanager
async def running(light: Any):
    """The light's main loop in a thread of its own (its HTTP calls block, as on a device)."""
    stop = threading.Event()
    thread = threading.Thread(target=light.run, args=(stop, 1.0), daemon=True)
    thread.start()
    try:
        yield light
    finally:
        stop.set()
        await trio.to_thread.run_sync(thread.join, 10)


async def test_configure_status_command_ack_and_push(gateway_factory, upstream_receiver):
    async with gateway_factory(plugins=PLUGIN, settings=SETTINGS, mqtt=True, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        light = controller.StreetLight(gw_url(gw) + "/streetlight", IMEI, clock=controller.Clock(SPEED))
        async with running(light):
            await wait_until(lambda: light.state == "READY" and light.mqtt_connected(), what="configured, on MQTT")
            await wait_until(lambda: any(r["kind"] == "status" for r in upstream_receiver.records()),
                             what="a status upstream")
            # pushed over MQTT: executed and acknowledged
            queued = await command(client, IMEI, {"command_type": "power_control", "action": "on"})
            await wait_until(lambda: light.lamp.power_state == "on", what="the light switched on")
            await wait_until(lambda: _status_of(client, queued["id"]), what="the ack")
            assert await _status_of(client, queued["id"]) == "executed"
            # MQTT lost: it falls back to polling and still gets the next one
            light.mqtt.disconnect()
            await wait_until(lambda: not light.mqtt_connected())
            light.mqtt_retry_at = float("inf")  # stay on HTTP for the rest of the test
            queued = await command(client, IMEI, {"command_type": "brightness_control", "brightness_level": 40})
            await wait_until(lambda: light.lamp.brightness == 40, what="brightness 40 by poll")
            await wait_until(lambda: _status_of(client, queued["id"]), what="the ack")
            # the token revoked: 401, the light configures again and carries on
            old = light.flash["token"]  # before the revocation: the light may drop it at once
            assert (await client.post(f"/api/gateway/devices/{IMEI}/revoke", headers=ADMIN)).status_code == 200
            await wait_until(lambda: light.flash.get("token") not in (None, old) and light.state == "READY",
                             what="a new token")
            queued = await command(client, IMEI, {"command_type": "power_control", "action": "off"})
            await wait_until(lambda: light.lamp.power_state == "off", what="the light switched off")
        kinds = {r["kind"] for r in upstream_receiver.records()}
        assert {"configure", "status", "command_ack"} <= kinds


@pytest.mark.timeout(120)
async def test_offline_cache_synced_after_a_gateway_restart_acks_first(gateway_factory, upstream_receiver):
    port = reserved_port()
    settings = [*SETTINGS, f"http.listen='127.0.0.1:{port}'"]
    async with gateway_factory(plugins=PLUGIN, settings=settings, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        light = controller.StreetLight(f"http://127.0.0.1:{port}/streetlight", IMEI, clock=controller.Clock(SPEED),
                                       use_mqtt=False)
        stop = threading.Event()
        thread = threading.Thread(target=light.run, args=(stop, 1.0), daemon=True)
        thread.start()
        await wait_until(lambda: light.state == "READY", what="configured")
        execute = light.execute

        def execute_as_the_link_drops(cmd: dict[str, Any]) -> None:
            light.radio = False  # the GSM link drops as it executes: the ack waits in the queue
            execute(cmd)

        light.execute = execute_as_the_link_drops
        queued = await command(client, IMEI, {"command_type": "power_control", "action": "on"})
        await wait_until(lambda: light.lamp.power_state == "on" and light.queue, what="executed, the ack queued")
    try:
        # The gateway is down; the light, offline, keeps its readings (30-second ones, 10 at least).
        await wait_until(lambda: light.state == "OFFLINE" and len(light.cache) >= 10, what="cached readings")
        assert light.queue and light.queue[0].endpoint == "/command-ack"
        before = len(upstream_receiver.records())
        async with gateway_factory(plugins=PLUGIN, settings=settings, upstream=upstream_receiver) as gw, \
                gw_client(gw) as client:
            light.radio = True
            await wait_until(lambda: not light.cache and not light.queue and light.state == "READY", what="synced")
            assert await _status_of(client, queued["id"]) == "executed"
            await wait_until(lambda: len(upstream_receiver.records()) - before >= 11, what="the sync upstream")
    finally:
        stop.set()
        await trio.to_thread.run_sync(thread.join, 10)
    after = upstream_receiver.records()[before:]
    kinds = [r["kind"] for r in after]
    ack_at = kinds.index("command_ack")
    cached = [i for i, r in enumerate(after) if r["kind"] == "status" and r["class"] == "history"]
    assert len(cached) >= 10 and ack_at < min(cached)  # the ack arrives before the older cached readings


async def test_every_error_code_of_the_table_is_handled(gateway_factory):
    settings = ["plugins.streetlight.requests_per_minute=5"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        light = controller.StreetLight(gw_url(gw) + "/streetlight", IMEI, clock=controller.Clock(SPEED),
                                       use_mqtt=False)
        try:
            # 404 at configure: not registered; it waits retry_after_seconds (300 s) and tries again
            await trio.to_thread.run_sync(light.step)
            assert light.state == "CONFIGURING" and light.retry_at - light.clock.time() > 250
            await provision(gw, "streetlight", IMEI)
            light.retry_at = 0
            await trio.to_thread.run_sync(light.step)
            assert light.state == "READY"
            # 400: logged, dropped (an ack the gateway refuses for good is not retried)
            await trio.to_thread.run_sync(light.execute, {"command_id": "CMD_404", "command_type": "power_control",
                                                          "action": "on"})
            assert not light.queue and any("404" in e["message"] for e in light.logs)
            light.lamp.battery = 140  # a broken sensor: 400 INVALID_PAYLOAD, logged
            await trio.to_thread.run_sync(light.send_status)
            assert any("INVALID_PAYLOAD" in e["message"] for e in light.logs)
            light.lamp.battery = 90
            # 5xx: nothing was stored; it waits 30 s before trying again
            async with storage_failing(gw):
                await trio.to_thread.run_sync(light.send_status)
            assert any("STORAGE_UNAVAILABLE" in e["message"] for e in light.logs)
            assert 25 < light.retry_at - light.clock.time() <= 30
            light.retry_at = 0
            # 429: it waits what the answer says
            for _ in range(6):
                await trio.to_thread.run_sync(light.poll_commands)
            assert any("RATE_LIMITED" in e["message"] for e in light.logs) and light.retry_at > light.clock.time()
            light.retry_at = 0
            # 401: a bad token, it configures again
            light.flash["token"] = "not-a-token"
            await trio.to_thread.run_sync(light.send_status)
            assert light.state == "CONFIGURING" and "token" not in light.flash
            # 404 with a token: the light was removed from the gateway: back to CONFIGURING
            light.state = "READY"
            light.flash["token"] = "x"
            light.device_id = "IMEI:351234567890999"
            r = await trio.to_thread.run_sync(lambda: light.request("GET", "/commands"))
            assert r.status_code == 404
            await trio.to_thread.run_sync(light.handle_error, r)
            assert light.state == "CONFIGURING"
            # no answer: offline, polls back off 10 -> 30 -> 60 -> 300 s
            light.radio, light.state = False, "READY"
            for expected in (10, 30, 60, 300, 300):
                await trio.to_thread.run_sync(light.poll_commands)
                assert light.poll_s == expected
        finally:
            light.close()


def tls_init(data_dir: Path) -> Path:
    """`gatewayd tls init` for localhost / 127.0.0.1 in `data_dir`; the site CA's path."""
    subprocess.run([sys.executable, "-m", "gatewayd", "tls", "init", "--only", "--name", "localhost", "--ip",
                    "127.0.0.1", "--set", f"gateway.data_dir='{data_dir}'"], check=True, capture_output=True)
    return data_dir / "tls" / "ca.crt"


async def test_the_light_pins_the_site_ca_https_and_mqtt_over_tls(gateway_factory, tmp_path):
    """Issue 21: `--cafile` pins the site CA. Against a gateway whose HTTP and device MQTT
    are TLS only, the light configures over HTTPS and takes pushed commands over MQTT with
    TLS; with another CA pinned, the gateway's certificate is refused at the first request."""
    ca = tls_init(tmp_path / "var")
    other_ca = tls_init(tmp_path / "other")
    port = reserved_port()
    settings = [*SETTINGS, "tls.http=true", f"tls.mqtt_listen='127.0.0.1:{port}'", "tls.mqtt_plain=false"]
    async with gateway_factory(plugins=PLUGIN, settings=settings, mqtt=True) as gw, \
            gw_client(gw, verify=ssl.create_default_context(cafile=str(ca))) as client:
        assert gw_url(gw).startswith("https://")
        await provision(gw, "streetlight", IMEI)
        base = gw_url(gw) + "/streetlight"
        stranger = controller.StreetLight(base, IMEI, clock=controller.Clock(SPEED), cafile=str(other_ca))
        try:
            await trio.to_thread.run_sync(stranger.step)
        finally:
            stranger.close()
        assert stranger.state == "CONFIGURING" and "token" not in stranger.flash
        assert any("CERTIFICATE_VERIFY_FAILED" in e["message"] for e in stranger.logs), stranger.logs
        light = controller.main([base, IMEI, "--cafile", str(ca)])
        light.clock = controller.Clock(SPEED)
        async with running(light):
            await wait_until(lambda: light.state == "READY" and light.mqtt_connected(), what="configured, on MQTT")
            assert light.flash["mqtt"]["mqtt_port"] == port  # the TLS listener: nothing else is open
            queued = await command(client, IMEI, {"command_type": "power_control", "action": "on"})
            await wait_until(lambda: light.lamp.power_state == "on", what="the light switched on")
            await wait_until(lambda: _status_of(client, queued["id"]), what="the ack")
        assert await _status_of(client, queued["id"]) == "executed"


async def _status_of(client: Any, command_id: str) -> str | None:
    r = await client.get(f"/api/gateway/devices/{IMEI}/commands", headers=ADMIN)
    status = {c["id"]: c["status"] for c in r.json()["commands"]}.get(command_id)
    return status if status in ("executed", "failed") else None
