"""`gatewayd devices ...` as a subprocess, also while a gateway runs on the same database."""

import json
import subprocess
import sys

import trio

from gatewayd.testing import wait_until


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def gatewayd_inproc(tmp_path, capsys, *args, check=True):
    """The same CLI, in this process (the subprocess start-up is slow; the code path is the same)."""
    from gatewayd.cli import main

    code = main([*args, "--set", f"gateway.data_dir='{tmp_path / 'var'}'"])
    out, err = capsys.readouterr()
    if check:
        assert code == 0, err
    return Result(code, out, err)


def gatewayd(tmp_path, *args, check=True):
    cmd = [sys.executable, "-m", "gatewayd", *args, "--set", f"gateway.data_dir='{tmp_path / 'var'}'"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_add_then_list_shows_the_device(tmp_path):
    added = json.loads(gatewayd(tmp_path, "devices", "add", "--family", "kaiabc", "--id", "pico_001",
                                "--name", "Chamber A", "--json").stdout)
    assert added["device"]["id"] == "pico_001" and added["credentials"]["key"]
    listed = json.loads(gatewayd(tmp_path, "devices", "list", "--json").stdout)
    assert [(d["family"], d["id"], d["name"]) for d in listed["devices"]] == [("kaiabc", "pico_001", "Chamber A")]
    assert "credentials" not in json.dumps(listed)
    database = b"".join(p.read_bytes() for p in (tmp_path / "var").glob("gatewayd.sqlite3*"))
    assert added["credentials"]["key"].encode() not in database


def test_the_other_subcommands(tmp_path, capsys):
    out = gatewayd_inproc(tmp_path, capsys, "devices", "add", "--family", "kaiabc").stdout
    assert "provisioned" in out and "shown once" in out
    device_id = out.split()[1].split("/")[1]
    shown = json.loads(gatewayd_inproc(tmp_path, capsys, "devices", "show", device_id, "--json").stdout)
    assert shown["device"]["status"] == "provisioned"
    rotated = json.loads(gatewayd_inproc(tmp_path, capsys, "devices", "rotate", device_id, "--grace", "60", "--json").stdout)
    assert rotated["credentials"]["key"]
    queued = json.loads(gatewayd_inproc(tmp_path, capsys, "devices", "command", device_id, '{"action": "on"}', "--ttl", "60",
                                 "--priority", "3", "--json").stdout)
    assert queued["command"]["priority"] == 3 and queued["command"]["payload"] == {"action": "on"}
    code = json.loads(gatewayd_inproc(tmp_path, capsys, "devices", "claim-code", "--family", "paku", "--ttl", "600",
                               "--json").stdout)
    assert len(code["claim_code"]["code"]) == 14
    assert "disabled" in gatewayd_inproc(tmp_path, capsys, "devices", "disable", device_id).stdout
    assert json.loads(gatewayd_inproc(tmp_path, capsys, "devices", "list", "--status", "disabled", "--json").stdout)["devices"]


def test_errors_exit_1_with_a_message(tmp_path, capsys):
    gatewayd_inproc(tmp_path, capsys, "devices", "add", "--family", "kaiabc", "--id", "n1")
    r = gatewayd_inproc(tmp_path, capsys, "devices", "add", "--family", "kaiabc", "--id", "n1", check=False)
    assert r.returncode == 1 and "already registered" in r.stderr
    r = gatewayd_inproc(tmp_path, capsys, "devices", "show", "nope", check=False)
    assert r.returncode == 1 and "no device 'nope'" in r.stderr
    r = gatewayd_inproc(tmp_path, capsys, "devices", "command", "n1", "{not json", check=False)
    assert r.returncode == 1 and "not valid JSON" in r.stderr
    r = gatewayd_inproc(tmp_path, capsys, "devices", "add", "--family", "kaiabc", "--key-env", "UNSET_VAR_X", check=False)
    assert r.returncode == 1 and "UNSET_VAR_X" in r.stderr


def test_bad_values_exit_1_naming_them(tmp_path, capsys, monkeypatch):
    """Each of these was accepted (a NaN stored, a device of no plugin) or ended in a traceback."""
    gatewayd_inproc(tmp_path, capsys, "devices", "add", "--family", "kaiabc", "--id", "n1")
    monkeypatch.setenv("SHORT_KEY", "k")
    cases = [
        (["add", "--family", "lamp"], "--family: no enabled plugin 'lamp' (enabled: kaiabc, paku, streetlight)"),
        (["add", "--family", "kaiabc", "--set", "plugins.kaiabc.enabled=false"], "no enabled plugin 'kaiabc'"),
        (["claim-code", "--family", "nosuch"], "--family: no enabled plugin 'nosuch'"),
        (["add", "--family", "kaiabc", "--metadata", '{"v": NaN}'], "--metadata is not valid JSON: v: NaN"),
        (["add", "--family", "kaiabc", "--metadata", "[" * 5000], "nested deeper than 64"),
        (["add", "--family", "kaiabc", "--key-env", "SHORT_KEY"], "key: expected 16-256"),
        (["add", "--family", "kaiabc", "--name", "n" * 300], "name: 300 characters, more than 256"),
        (["rotate", "n1", "--grace", "nan"], "grace_s: expected a number"),
        (["command", "n1", '{"v": Infinity}'], "the command is not valid JSON: v: Infinity"),
        (["command", "n1", "{}", "--ttl", "inf"], "ttl_s: expected a number"),
        (["command", "n1", "{}", "--priority", str(10**30)], "priority: expected an integer"),
        (["claim-code", "--family", "kaiabc", "--ttl", "nan"], "ttl_s: expected a number"),
        (["claim-code", "--family", "kaiabc", "--ttl", "0"], "ttl_s: expected a number"),
    ]
    for args, message in cases:
        r = gatewayd_inproc(tmp_path, capsys, "devices", *args, check=False)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr[-300:])
    listed = json.loads(gatewayd_inproc(tmp_path, capsys, "devices", "list", "--json").stdout)["devices"]
    assert [d["id"] for d in listed] == ["n1"]


async def test_cli_while_the_gateway_runs(gateway_factory, tmp_path):
    changed = []
    with trio.fail_after(60):
        async with gateway_factory(settings=["devices.presence_flush_s=0.05"]) as gw:
            gw.devices.registry.on_credentials_changed = changed.append
            cmd = [sys.executable, "-m", "gatewayd", "devices", "add", "--family", "paku", "--id", "plug-1", "--json",
                   "--set", f"gateway.data_dir='{tmp_path / 'var'}'"]
            result = await trio.run_process(cmd, cwd=tmp_path, capture_stdout=True, capture_stderr=True)
            creds = json.loads(result.stdout)["credentials"]
            assert (await gw.devices.registry.verify_key("paku", creds["key"])).id == "plug-1"
            # The daemon notices the new MQTT account without a restart.
            await wait_until(lambda: "paku" in changed)
            assert [u for u, _ in await gw.devices.registry.mqtt_accounts("paku")] == ["plug-1"]
