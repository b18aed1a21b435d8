"""The spec's Pico (MicroPython) and ELM11 (Lua) clients, as it prints them, against a
real gateway: only API_BASE, API_KEY and NODE_ID changed."""

import hashlib
import importlib.util
import json
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from kaiabc_testbed import AUTH, KAIABC, V1

from gatewayd.testing import gw_client, gw_url, provision

ROOT = Path(__file__).resolve().parents[3]
SEED = Path("/work/shared/seeds/004_475ef7bb118ffc3d.txt")
# SHA-256 of the two code blocks of the seed, as extracted below (for a checkout without the seed).
SEED_SHA256 = {"pico_client.py": "9846a87614348136fade264e3b21cb7a689510ffdb5142b836559a3a0fa37088",
               "elm11_client.lua": "a7dcfd80d3ede30cc79ad3ef6057953dd3744ea8b621b51585a76e938279a5b0"}

spec = importlib.util.spec_from_file_location("kaiabc_runner", ROOT / "firmware" / "kaiabc" / "runner.py")
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)


def seed_blocks(text: str) -> dict[str, str]:
    """The spec's client blocks: the first ```python after the Pico heading, ```lua after the ELM11's."""
    pico = text[text.index("### Raspberry Pi Pico Client Integration"):]
    elm = text[text.index("### ELM11 Lua Client Integration"):]
    return {"pico_client.py": re.search(r"```python\n(.*?)```", pico, re.S).group(1),
            "elm11_client.lua": re.search(r"```lua\n(.*?)```", elm, re.S).group(1)}


def test_the_clients_are_the_specs_text():
    for name, digest in SEED_SHA256.items():
        assert hashlib.sha256((ROOT / "firmware" / "kaiabc" / name).read_bytes()).hexdigest() == digest, name
    if SEED.exists():  # the seed itself, where it is checked out
        for name, block in seed_blocks(SEED.read_text()).items():
            assert (ROOT / "firmware" / "kaiabc" / name).read_text() == block, name


def test_only_the_three_constants_change():
    text = runner.PICO.read_text()
    changed = runner.with_constants(text, API_BASE="http://gw/kaiabc/v1", API_KEY="k" * 20, NODE_ID="n1")
    diff = [(a, b) for a, b in zip(text.splitlines(), changed.splitlines()) if a != b]
    assert [b for _, b in diff] == ['API_BASE = "http://gw/kaiabc/v1"', f'API_KEY = "{"k" * 20}"', 'NODE_ID = "n1"']


async def test_the_pico_client_against_the_gateway(gateway_factory):
    key = "kaiabc_node_pico_001"
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        await provision(gw, "kaiabc", "pico_001", key=key)  # flashed into the node beforehand
        base = gw_url(gw) + V1
        machine_pwm = None

        def run():
            nonlocal machine_pwm
            pico = runner.load_pico(base, key, "pico_001")
            machine_pwm = pico.pwm_pin
            first = pico.register_node()
            again = pico.register_node()  # the next boot
            batch = pico.send_sensor_data(298.65, 45.2, 101325)
            state = pico.get_current_state()
            return first, again, batch, state

        first, again, batch, state = await trio.to_thread.run_sync(run)
        assert first == {"success": True, "node_id": "pico_001", "hardware_type": "raspberry_pi_pico",
                         "api_key": key, "mqtt_topic": "kaiabc/sensors/pico_001"}
        assert again["error"]["code"] == "CONFLICT"
        assert batch["accepted"] == 1 and batch["rejected"] == 0
        assert batch["latest_filtered"]["temperature_kelvin"] == pytest.approx(298.65)
        assert 0 <= state["output_pwm"] <= 255 and state["temperature_kelvin"] == pytest.approx(298.65)
        assert machine_pwm.frequency == 1000 and machine_pwm.duty == state["output_pwm"] * 257
        r = await client.get(f"{V1}/sensors/nodes", headers=AUTH)
        [node] = r.json()["nodes"]
        assert node["node_id"] == "pico_001" and node["status"] == "online" and node["location"] == "Lab Bench 3"


async def test_the_elm11_client_against_the_gateway(gateway_factory):
    key = "kaiabc_node_elm11_001"
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        await provision(gw, "kaiabc", "elm11_001", key=key)
        base = gw_url(gw) + V1
        done = await trio.to_thread.run_sync(runner.run_elm11, base, key, "elm11_001", 3, [25.0, 26.0, 27.0])
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "registered true"
        batches = [json.loads(line[6:]) for line in lines if line.startswith("batch ")]
        states = [json.loads(line[6:]) for line in lines if line.startswith("state ")]
        duties = [int(line.split()[2]) for line in lines if line.startswith("pwm ")]
        assert len(batches) == len(states) == 3 and lines[-1] == "done 3"
        assert batches[0]["accepted"] == 1  # os.date has whole seconds: a reading in the same second is refused
        assert all(b["accepted"] + b["rejected"] == 1 for b in batches)
        assert all(0 <= s["output_pwm"] <= 255 for s in states)
        assert duties == [int((s["output_pwm"] / 255) * 1023) for s in states]
        assert states[0]["temperature_kelvin"] == pytest.approx(298.15)
        r = await client.get(f"{V1}/sensors/nodes", headers=AUTH)
        [node] = r.json()["nodes"]
        assert node["hardware_type"] == "elm11" and node["runtime"] == "lua" and node["location"] == "Outdoor Station"
        # the next boot: 409, which the client reports as false
        again = await trio.to_thread.run_sync(runner.run_elm11, base, key, "elm11_001", 1, [25.0])
        assert again.stdout.splitlines()[0] == "registered false"


def tls_init(data_dir: Path) -> Path:
    """`gatewayd tls init` for localhost / 127.0.0.1 in `data_dir`; the site CA's path."""
    subprocess.run([sys.executable, "-m", "gatewayd", "tls", "init", "--only", "--name", "localhost", "--ip",
                    "127.0.0.1", "--set", f"gateway.data_dir='{data_dir}'"], check=True, capture_output=True)
    return data_dir / "tls" / "ca.crt"


async def test_what_runs_the_clients_pins_the_site_ca(gateway_factory, tmp_path):
    """Issue 21: the clients unchanged, the runner pins the site CA for an https:// API_BASE
    (the Pico's urequests shim; the ELM11's socket.http over LuaSec). Another CA pinned: the
    gateway's certificate is refused; no CA for the ELM11: it does not run (LuaSec alone
    would take any certificate)."""
    ca = str(tls_init(tmp_path / "var"))
    other_ca = str(tls_init(tmp_path / "other"))
    pico_key, elm_key = "kaiabc_node_pico_001", "kaiabc_node_elm11_001"
    async with gateway_factory(plugins=KAIABC, settings=["tls.http=true"]) as gw, \
            gw_client(gw, verify=ssl.create_default_context(cafile=ca)) as client:
        base = gw_url(gw) + V1
        assert base.startswith("https://")
        await provision(gw, "kaiabc", "pico_001", key=pico_key)
        await provision(gw, "kaiabc", "elm11_001", key=elm_key)

        stranger = runner.load_pico(base, pico_key, "pico_001", cafile=other_ca)
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
            await trio.to_thread.run_sync(stranger.get_current_state)
        [registered, cycle] = await trio.to_thread.run_sync(lambda: runner.run_pico(base, pico_key, "pico_001", 1,
                                                                                    cafile=ca))
        assert registered["register"]["success"] is True and cycle["batch"]["accepted"] == 1, cycle

        refused = await trio.to_thread.run_sync(lambda: runner.run_elm11(base, elm_key, "elm11_001", 1, [25.0],
                                                                         cafile=other_ca))
        assert refused.returncode == 0, refused.stderr
        assert refused.stdout.splitlines()[0] == "registered false", refused.stdout
        assert "Error: HTTP certificate verify failed" in refused.stdout and "batch null" in refused.stdout
        unpinned = await trio.to_thread.run_sync(lambda: runner.run_elm11(base, elm_key, "elm11_001", 1, [25.0]))
        assert unpinned.returncode != 0 and "KAIABC_CAFILE" in unpinned.stderr, unpinned.stderr
        done = await trio.to_thread.run_sync(lambda: runner.run_elm11(base, elm_key, "elm11_001", 2, [25.0, 26.0],
                                                                      cafile=ca))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "registered true" and lines[-1] == "done 2", done.stdout
        assert json.loads(lines[1][6:])["accepted"] == 1

        r = await client.get(f"{V1}/sensors/nodes", headers=AUTH)
        assert {n["node_id"] for n in r.json()["nodes"]} == {"pico_001", "elm11_001"}


async def test_a_certificate_of_the_site_ca_for_another_name_is_refused(gateway_factory, tmp_path):
    """The host name is checked too (LuaSec 1.2 does not; lua/pinned_http.lua does): the
    gateway serves a certificate of the pinned CA that names another host."""
    subprocess.run([sys.executable, "-m", "gatewayd", "tls", "init", "--only", "--name", "gw.other.example", "--ip",
                    "10.9.9.9", "--set", f"gateway.data_dir='{tmp_path / 'var'}'"], check=True, capture_output=True)
    ca = str(tmp_path / "var" / "tls" / "ca.crt")
    async with gateway_factory(plugins=KAIABC, settings=["tls.http=true"]) as gw:
        base = gw_url(gw) + V1
        assert base.startswith("https://127.0.0.1:")
        await provision(gw, "kaiabc", "elm11_001", key="kaiabc_node_elm11_001")
        done = await trio.to_thread.run_sync(lambda: runner.run_elm11(base, "kaiabc_node_elm11_001", "elm11_001", 1,
                                                                      [25.0], cafile=ca))
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == "registered false", done.stdout
        assert "Error: HTTP certificate does not name 127.0.0.1" in done.stdout and "batch null" in done.stdout
        pico = runner.load_pico(base, "kaiabc_node_pico_001", "pico_001", cafile=ca)
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED.*IP address mismatch"):
            await trio.to_thread.run_sync(pico.get_current_state)
