"""The reference firmware (firmware/paku/device.py) as a subprocess against a real gateway:
one cycle connects, reports, executes a waiting command, and installs a newer image."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import trio
from paku_testbed import AUTH, PAKU, device_view

from gatewayd.testing import add_firmware, device_mqtt, gw_client, provision

FIRMWARE = Path(__file__).resolve().parents[3] / "firmware" / "paku" / "device.py"


async def test_reference_firmware_one_cycle(gateway_factory, tmp_path):
    image = tmp_path / "pk-a-1.1.0.bin"
    image.write_bytes(b"\x7fPAKU" + bytes(range(256)) * 64)
    async with gateway_factory(plugins=PAKU, mqtt=True) as gw, gw_client(gw) as client:
        creds = await provision(gw, "paku", "pk-1", model="pk-a")
        await add_firmware(gw, image, family="paku", model="pk-a", version="1.1.0")
        r = await client.post("/api/gateway/devices/pk-1/commands", headers=AUTH,
                              json={"payload": {"action": "ping"}})
        command_id = r.json()["command"]["id"]
        async with device_mqtt(creds, client_id="probe"):
            pass  # the broker has loaded the new account

        state_dir = tmp_path / "pk-1"
        argv = [sys.executable, "-u", str(FIRMWARE), "--host", creds.mqtt.host, "--port", str(creds.mqtt.port),
                "--id", "pk-1", "--password=" + creds.key, "--http", str(client.base_url).rstrip("/") + "/paku",
                "--once", "--ota-every", "1", "--listen-s", "5", "--state-dir", str(state_dir)]
        with open(tmp_path / "firmware.log", "wb") as log:
            done = await trio.run_process(argv, stdout=log, stderr=subprocess.STDOUT, check=False)
        out = (tmp_path / "firmware.log").read_text()
        assert done.returncode == 0, out
        assert f"command {command_id} done: pong" in out and "ota: installed 1.1.0" in out

        view = await device_view(client, "pk-1")
        assert view["telemetry"]["payload"]["temp_c"] > 0
        assert view["state"]["online"] is False  # said goodbye
        assert view["fwVersion"] == "1.1.0"
        r = await client.get("/api/gateway/devices/pk-1/commands", headers=AUTH)
        [cmd] = r.json()["commands"]
        assert cmd["status"] == "executed" and cmd["result"] == "pong"
        r = await client.get("/api/gateway/firmware/reports", headers=AUTH, params={"device": "pk-1"})
        assert [rep["status"] for rep in r.json()["reports"]] == ["installed", "verified", "started"]  # newest first
        installed = json.loads((state_dir / "installed.json").read_text())
        assert installed["version"] == "1.1.0"
        assert hashlib.sha256(Path(installed["image"]).read_bytes()).digest() == \
            hashlib.sha256(image.read_bytes()).digest()


def test_firmware_needs_a_password():
    done = subprocess.run([sys.executable, str(FIRMWARE), "--id", "pk-1"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert done.returncode == 2 and "--password" in done.stderr


async def test_reference_firmware_pins_the_site_ca_over_tls_only_listeners(gateway_factory, tmp_path):
    """Issue 21: the firmware can pin the site CA; MQTT over TLS only, the OTA manifest over HTTPS."""
    import ssl

    from gatewayd.testing import gw_url, reserved_port

    def tls_init(data_dir: Path) -> Path:
        subprocess.run([sys.executable, "-m", "gatewayd", "tls", "init", "--only", "--name", "localhost", "--ip",
                        "127.0.0.1", "--set", f"gateway.data_dir='{data_dir}'"], check=True, capture_output=True)
        return data_dir / "tls" / "ca.crt"

    ca = tls_init(tmp_path / "var")
    other_ca = tls_init(tmp_path / "other")
    port = reserved_port()
    settings = ["tls.http=true", f"tls.mqtt_listen='127.0.0.1:{port}'", "tls.mqtt_plain=false"]
    async with gateway_factory(plugins=PAKU, mqtt=True, settings=settings) as gw, \
            gw_client(gw, verify=ssl.create_default_context(cafile=str(ca))) as client:
        creds = await provision(gw, "paku", "pk-1", model="pk-a")

        async def cycle(cafile: Path) -> tuple[int, str]:
            argv = [sys.executable, "-u", str(FIRMWARE), "--host", "localhost", "--port", str(port), "--id", "pk-1",
                    "--password=" + creds.key, "--http", gw_url(gw) + "/paku", "--once", "--ota-every", "1",
                    "--listen-s", "1", "--state-dir", str(tmp_path / "pk-1"), "--cafile", str(cafile)]
            done = await trio.run_process(argv, capture_stdout=True, stderr=subprocess.STDOUT, check=False)
            return done.returncode, done.stdout.decode()

        assert gw_url(gw).startswith("https://")
        code, out = await cycle(other_ca)  # a gateway the device does not pin: refused
        assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in out, out
        code, out = await cycle(ca)
        assert code == 0, out
        view = await device_view(client, "pk-1")
        assert view["telemetry"]["payload"]["temp_c"] > 0
