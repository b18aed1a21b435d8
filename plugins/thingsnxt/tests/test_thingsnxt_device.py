"""The reference firmware (firmware/thingsnxt/device.py) end to end: provisioned over a pty by
`gatewayd thingsnxt provision`, then running its loop against a real gateway, an app's
change reaching its LEDs, and its back-off on 429."""

import importlib.util
import json
import os
import subprocess
import sys
import threading
import tty
from pathlib import Path

import pytest
import trio

import gatewayd_thingsnxt
from gatewayd.testing import gw_client, gw_url, provision

PLUGIN = [("thingsnxt", gatewayd_thingsnxt)]
TOKEN = "thingsnxt-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FIRMWARE = Path(__file__).resolve().parents[3] / "firmware" / "thingsnxt" / "device.py"


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


@pytest.fixture(scope="module")
def firmware():
    spec = importlib.util.spec_from_file_location("thingsnxt_firmware", FIRMWARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Pty:
    """A pty pair: the firmware holds the master (the ESP32's UART), the gateway opens the slave."""

    def __init__(self):
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        self._slave = slave  # kept open so the master never reads EOF between the gateway's opens

    def close(self):
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass


class Ran:
    def __init__(self, done: subprocess.CompletedProcess):
        self.code, self.out, self.err = done.returncode, done.stdout.decode(), done.stderr.decode()


def provision_cmd(tmp_path, port, *extra, device_id="esp-1", timeout="5"):
    """`gatewayd thingsnxt provision ...` as an installer runs it (a process of its own)."""
    argv = [sys.executable, "-m", "gatewayd", "thingsnxt", "provision", port, "--id", device_id, "--timeout", timeout,
            *extra, "--set", f"gateway.data_dir='{tmp_path / 'cli'}'"]

    async def run() -> Ran:
        return Ran(await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False))

    return run


async def test_provisioned_over_serial_then_it_runs_against_the_gateway(gateway_factory, firmware, tmp_path,
                                                                      monkeypatch):
    settings = ["plugins.thingsnxt.rate_limit=0"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        creds = await provision(gw, "thingsnxt", "esp-1")
        monkeypatch.setenv("THINGSNXT_DEVICE_TOKEN", creds.key)
        base = gw_url(gw) + "/thingsnxt"
        prefs = str(tmp_path / "prefs.json")
        pty = Pty()
        try:
            console = threading.Thread(target=firmware.serve_console, args=(pty.master, prefs), daemon=True)
            console.start()
            # The URL from the configuration (plugins.thingsnxt.api_base_url), as an installer's gatewayd.toml.
            ran = await provision_cmd(tmp_path, pty.path, "--set", f"plugins.thingsnxt.api_base_url='{base}'")()
            assert ran.code == 0, ran.err
            assert json.loads(ran.out)["device_id"] == "esp-1"
        finally:
            pty.close()
        stored = firmware.load_prefs(prefs)
        assert stored == {"device_id": "esp-1", "device_token": creds.key, "api_base_url": base}

        # An app switches v1 on; the device, running 100x faster, sends and polls.
        r = await client.put("/thingsnxt/devices/esp-1/state", json={"data": {"v1": 1}}, headers=ADMIN)
        assert r.status_code == 200
        device = firmware.Device(stored, speed=100.0, log=lambda message: None)
        await trio.to_thread.run_sync(device.run, 3)
        assert device.leds == {"v1": 1} and device.stats["sent"] == 3 and device.stats["healthy"] >= 1
        r = await client.get("/thingsnxt/devices/esp-1/state", headers=ADMIN)
        assert r.json()["pending"] == {} and r.json()["data"]["v1"] == 1  # it reported the app's value back


async def test_provisioning_refuses_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("THINGSNXT_DEVICE_TOKEN", "tok-123")
    public = ("--set", "http.public_url='http://gw.example:8080'")  # the URL: public_url + the mount
    # Nobody answers on the line.
    pty = Pty()
    try:
        ran = await provision_cmd(tmp_path, pty.path, *public, timeout="0.5")()
    finally:
        pty.close()
    assert ran.code == 1 and "no answer from the device" in ran.err
    # The device answers another id (its console echoes a stale provisioning).
    pty = Pty()

    def wrong_device():
        sent.append(json.loads(os.read(pty.master, 4096)))
        os.write(pty.master, b'booting...\n{"provisioned": true, "device_id": "esp-9"}\n')

    sent = []

    threading.Thread(target=wrong_device, daemon=True).start()
    try:
        ran = await provision_cmd(tmp_path, pty.path, *public)()
    finally:
        pty.close()
    assert ran.code == 1 and "another id: 'esp-9'" in ran.err
    assert sent == [{"cmd": "provision", "device_id": "esp-1", "device_token": "tok-123",
                     "api_base_url": "http://gw.example:8080/thingsnxt"}]
    # A port that does not exist.
    ran = await provision_cmd(tmp_path, str(tmp_path / "ttyNONE"), *public, timeout="0.5")()
    assert ran.code == 1 and "cannot open" in ran.err
    # Bad arguments: exit 2, naming them.
    for extra, device_id, env, message in (
            (public, "a b", "tok", "--id: expected"),
            (public, "esp-1", "", "THINGSNXT_DEVICE_TOKEN: expected the device's token"),
            ((), "esp-1", "tok", "--api-base-url: expected an http"),  # no URL configured anywhere
            (("--api-base-url", "ftp://x"), "esp-1", "tok", "--api-base-url: expected an http")):
        monkeypatch.setenv("THINGSNXT_DEVICE_TOKEN", env)
        ran = await provision_cmd(tmp_path, "/dev/null", *extra, device_id=device_id)()
        assert ran.code == 2 and message in ran.err, ran.err


def test_the_firmware_refuses_a_bad_provisioning_and_keeps_nothing(firmware, tmp_path):
    prefs = str(tmp_path / "prefs.json")
    assert firmware.provision_reply("not json", prefs) is None
    reply = firmware.provision_reply(json.dumps({"cmd": "provision", "device_id": "e", "device_token": "t",
                                                 "api_base_url": "gw:8080"}), prefs)
    assert reply == {"provisioned": False, "error": "api_base_url: expected http:// or https://"}
    assert firmware.load_prefs(prefs) == {}


def test_the_firmware_retries_with_back_off_and_slows_down_on_429(firmware):
    answers = [(-1, None), (503, None), (200, {"data": {"v0": 1}}),  # two failures, then through
               (429, None), (429, None), (200, {"data": {}}), (200, {"data": {}})]
    sent, slept = [], []

    def http(method, url, doc):
        sent.append((method, url))
        return answers.pop(0)

    device = firmware.Device({"device_id": "e", "device_token": "t", "api_base_url": "http://gw/thingsnxt"},
                             http=http, sleep=slept.append, log=lambda message: None)
    assert device.send_telemetry() == 200 and device.leds == {"v0": 1}
    assert slept == [2.0, 4.0]  # RETRY_BASE_DELAY * 2^n, three tries
    assert device.send_telemetry() == 429 and device.slowdown == 2  # a 429 is not retried: the interval doubles
    assert device.send_telemetry() == 429 and device.slowdown == 4
    device.send_telemetry()
    device.send_telemetry()
    assert device.slowdown == 1 and len(sent) == 7  # each success halves it back


def tls_init(data_dir: Path) -> Path:
    """`gatewayd tls init` for localhost / 127.0.0.1 in `data_dir`; the site CA's path."""
    subprocess.run([sys.executable, "-m", "gatewayd", "tls", "init", "--only", "--name", "localhost", "--ip",
                    "127.0.0.1", "--set", f"gateway.data_dir='{data_dir}'"], check=True, capture_output=True)
    return data_dir / "tls" / "ca.crt"


async def test_the_firmware_pins_the_site_ca(gateway_factory, firmware, tmp_path):
    """Issue 21: `--cafile` pins the site CA. Against the gateway's HTTPS listener the device
    sends and polls; with another CA pinned, the gateway's certificate is refused and
    nothing reaches it."""
    import ssl

    ca = tls_init(tmp_path / "var")
    other_ca = tls_init(tmp_path / "other")
    settings = ["plugins.thingsnxt.rate_limit=0", "tls.http=true"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, \
            gw_client(gw, verify=ssl.create_default_context(cafile=str(ca))) as client:
        assert gw_url(gw).startswith("https://")
        creds = await provision(gw, "thingsnxt", "esp-1")
        prefs = str(tmp_path / "prefs.json")
        firmware.save_prefs(prefs, {"device_id": "esp-1", "device_token": creds.key,
                                    "api_base_url": gw_url(gw) + "/thingsnxt"})

        async def run(cafile: Path) -> Ran:
            argv = [sys.executable, str(FIRMWARE), "--prefs", prefs, "--cycles", "1", "--speed", "100",
                    "--cafile", str(cafile)]
            return Ran(await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False))

        ran = await run(other_ca)
        assert ran.code == 0 and "CERTIFICATE_VERIFY_FAILED" in ran.err, ran.err
        assert json.loads(ran.out)["sent"] == 0 and json.loads(ran.out)["healthy"] == 0
        r = await client.get("/thingsnxt/devices/esp-1/state", headers=ADMIN)
        assert "temperature" not in (r.json()["data"] or {})  # nothing reached the gateway
        ran = await run(ca)
        assert ran.code == 0 and json.loads(ran.out)["sent"] == 1 and json.loads(ran.out)["healthy"] == 1, ran.err
        r = await client.get("/thingsnxt/devices/esp-1/state", headers=ADMIN)
        assert r.json()["data"]["temperature"] == 21.1
