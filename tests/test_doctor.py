"""`gatewayd doctor`: all green on a fresh box, each problem named on a broken one, and
the exit status non-zero only for real problems. Real ports, real files, a real
running gateway and the reference upstream receiver."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import trio

from gatewayd.cli import main
from gatewayd.cli.doctor import run_checks
from gatewayd.core.serial.link import SerialSettings
from gatewayd.plugins.api import hookimpl
from gatewayd.plugins.manager import build_plugin_manager
from gatewayd.core.devices.secrets import load_master_key
from gatewayd.core.tls import init_site
from gatewayd.testing import provision
from gatewayd.testing import reserved_port


def _doctor(capsys, tmp_path: Path, *settings: str, config: Path | None = None) -> tuple[int, dict[str, dict]]:
    argv = ["doctor", "--json", "--set", f"gateway.data_dir='{tmp_path / 'var'}'",
            "--set", f"http.listen='127.0.0.1:{reserved_port()}'", "--set", f"mqtt.listen='127.0.0.1:{reserved_port()}'"]
    if config is not None:
        argv += ["--config", str(config)]
    for s in settings:
        argv += ["--set", s]
    code = main(argv)
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] == (code == 0)
    return code, {c["name"]: c for c in doc["checks"]}


def _fresh(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir(mode=0o700)
    load_master_key(tmp_path / "var")  # what scripts/install does


def test_a_fresh_box_is_all_green(tmp_path, capsys):
    _fresh(tmp_path)
    code, checks = _doctor(capsys, tmp_path)
    assert code == 0
    assert {c["status"] for c in checks.values()} <= {"ok", "skip"}, checks
    for name in ("config", "port http", "port mqtt", "data dir", "disk", "mosquitto", "master key"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["mosquitto"]["details"]["version"].startswith("2.")


def test_text_report_and_help(tmp_path, capsys):
    _fresh(tmp_path)
    assert main(["doctor", "--no-network", "--set", f"gateway.data_dir='{tmp_path / 'var'}'",
                 "--set", f"http.listen='127.0.0.1:{reserved_port()}'", "--set",
                 f"mqtt.listen='127.0.0.1:{reserved_port()}'"]) == 0
    out = capsys.readouterr().out
    assert "[ok  ] mosquitto" in out and "[skip] upstream       --no-network" in out and "all checks passed" in out


def test_a_config_error_is_a_failure_naming_the_key(tmp_path, capsys):
    (tmp_path / "gatewayd.toml").write_text("[http]\nlisen = '0.0.0.0:80'\n")
    code, checks = _doctor(capsys, tmp_path, config=tmp_path / "gatewayd.toml")
    assert code == 1
    assert checks["config"]["status"] == "fail"
    assert "http.lisen: unknown key (did you mean 'listen'?)" in checks["config"]["message"]


def test_a_broken_box_names_each_problem(tmp_path, capsys):
    (tmp_path / "var").mkdir()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        code, checks = _doctor(capsys, tmp_path, f"http.listen='127.0.0.1:{port}'", "mqtt.mosquitto='/nowhere/mosquitto'",
                               "outbox.max_bytes=1125899906842624", "tls.http=true")
    finally:
        busy.close()
    assert code == 1
    assert checks["port http"]["status"] == "fail" and "in use by another program" in checks["port http"]["message"]
    assert checks["mosquitto"]["status"] == "fail" and "apt-get install mosquitto" in checks["mosquitto"]["message"]
    assert checks["disk"]["status"] == "fail" and "outbox.max_bytes" in checks["disk"]["message"]
    assert checks["tls"]["status"] == "fail" and "tls.cert: no file at" in checks["tls"]["message"]
    assert checks["master key"]["status"] == "warn"  # no device yet: not a problem


def test_a_data_dir_that_is_a_file_fails(tmp_path, capsys):
    (tmp_path / "var").write_text("oops")
    code, checks = _doctor(capsys, tmp_path)
    assert code == 1 and checks["data dir"]["status"] == "fail" and "is not a folder" in checks["data dir"]["message"]


def test_tls_expiring_is_a_warning_valid_is_ok(tmp_path, capsys):
    _fresh(tmp_path)
    init_site(tmp_path / "var" / "tls", "gw", ["localhost"], ["127.0.0.1"], days=10)
    code, checks = _doctor(capsys, tmp_path, "tls.http=true", "tls.warn_days=30")
    assert code == 0 and checks["tls"]["status"] == "warn" and "expires in 10 days" in checks["tls"]["message"]
    init_site(tmp_path / "var" / "tls", "gw", ["localhost"], ["127.0.0.1"])
    code, checks = _doctor(capsys, tmp_path, "tls.http=true")
    assert code == 0 and checks["tls"]["status"] == "ok"


async def test_a_running_gateway_holds_its_ports_and_a_lost_master_key_fails(gateway_factory, tmp_path, capsys):
    async with gateway_factory(mqtt=True) as gw:
        await provision(gw, "fam", "d1")
        h, m = gw.config.http.listen, gw.config.mqtt.listen
        port = gw.http_urls["main"][0].rsplit(":", 1)[1]
        code, checks = await trio.to_thread.run_sync(
            lambda: _doctor(capsys, tmp_path, f"http.listen='127.0.0.1:{port}'", f"mqtt.listen='{m}'"))
        assert h.port == 0  # the test gateway took a free port; the doctor was told which
        assert checks["port http"]["status"] == "ok" and "held by this gateway" in checks["port http"]["message"]
        assert checks["port mqtt"]["status"] == "ok" and "held by this gateway" in checks["port mqtt"]["message"]
        assert checks["master key"]["status"] == "ok"
    (tmp_path / "var" / "master.key").unlink()
    code, checks = _doctor(capsys, tmp_path)
    assert code == 1 and checks["master key"]["status"] == "fail"
    assert "1 device(s) are provisioned" in checks["master key"]["message"]


async def test_upstream_dry_batch(upstream_receiver, tmp_path, capsys):
    _fresh(tmp_path)
    config = tmp_path / "gatewayd.toml"
    config.write_text(upstream_receiver.config_text())
    code, checks = await trio.to_thread.run_sync(lambda: _doctor(capsys, tmp_path, config=config))
    assert code == 0, checks
    assert checks["upstream cloud"]["status"] == "ok" and "accepted a signed dry batch" in checks["upstream cloud"]["message"]
    assert upstream_receiver.records() == []  # a dry batch stores nothing
    assert abs(checks["clock"]["details"]["skew_s"]) < 5
    # The wrong secret: refused, named.
    os.environ[upstream_receiver.secret_env], good = "wrong", os.environ[upstream_receiver.secret_env]
    try:
        code, checks = await trio.to_thread.run_sync(lambda: _doctor(capsys, tmp_path, config=config))
    finally:
        os.environ[upstream_receiver.secret_env] = good
    assert code == 1 and checks["upstream cloud"]["status"] == "fail"
    assert "refused the gateway (401)" in checks["upstream cloud"]["message"]
    # Nothing listening there: unreachable.
    config.write_text(upstream_receiver.config_text().replace(upstream_receiver.url, f"http://127.0.0.1:{reserved_port()}"))
    code, checks = await trio.to_thread.run_sync(lambda: _doctor(capsys, tmp_path, config=config))
    assert code == 1 and "unreachable" in checks["upstream cloud"]["message"]


class SerialPlugin:
    """Two serial lines: one on a real pty (opens), one on a device that is not there."""

    def __init__(self, good: str) -> None:
        self.good = good

    @hookimpl
    def gatewayd_serial_links(self, links, ctx):
        async def handler(frame, link):
            pass

        links.add("meter", SerialSettings(port=self.good), handler)
        links.add("gone", SerialSettings(port="/dev/ttyGATEWAYD-NOT-THERE"), handler)


def test_serial_lines_the_plugins_declare_are_opened(tmp_path):
    import argparse

    _fresh(tmp_path)
    master, slave = os.openpty()
    try:
        manager = build_plugin_manager(entry_points=False, plugins=[("serialdoc", SerialPlugin(os.ttyname(slave)))])
        args = argparse.Namespace(config=None, set=[f"gateway.data_dir='{tmp_path / 'var'}'"], no_network=True,
                                  timeout=5.0)
        checks = {c.name: c for c in run_checks(args, manager)}
    finally:
        os.close(master)
        os.close(slave)
    assert checks["serial serialdoc.meter"].status == "ok"
    assert checks["serial serialdoc.gone"].status == "fail"
    assert "/dev/ttyGATEWAYD-NOT-THERE" in checks["serial serialdoc.gone"].message


def test_mqtt_upstream_login(tmp_path, capsys, monkeypatch):
    """A real mosquitto with a password file: the doctor logs in as the sink would."""
    import shutil
    import subprocess
    import time

    from gatewayd.core.mqtt.broker import hash_password

    _fresh(tmp_path)
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    (broker_dir / "passwd").write_text(f"cloud-gw:{hash_password('right')}\n")
    port = reserved_port()
    (broker_dir / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {broker_dir / 'passwd'}\n"
        "user root\n")  # run by this test (as root in CI): read its own files
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                               str(broker_dir / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not listen"
                time.sleep(0.05)
        config = tmp_path / "gatewayd.toml"
        config.write_text(f'[[upstream]]\nname = "cloudmq"\nkind = "mqtt"\nurl = "mqtt://127.0.0.1:{port}"\n'
                          'username = "cloud-gw"\npassword_env = "DOCTOR_TEST_MQTT_PW"\n')
        monkeypatch.setenv("DOCTOR_TEST_MQTT_PW", "right")
        code, checks = _doctor(capsys, tmp_path, config=config)
        check = checks["upstream cloudmq"]
        assert check["status"] == "ok", check
        assert check["message"] == f"127.0.0.1:{port} accepted the gateway's login as cloud-gw"
        assert check["details"]["client_id"].endswith("-cloudmq-doctor")
        monkeypatch.setenv("DOCTOR_TEST_MQTT_PW", "wrong")
        code, checks = _doctor(capsys, tmp_path, config=config)
        check = checks["upstream cloudmq"]
        assert code == 1 and check["status"] == "fail"
        assert check["message"].startswith(f"127.0.0.1:{port} refused the gateway's login as cloud-gw: ")
        assert "check upstream.username and DOCTOR_TEST_MQTT_PW" in check["message"]
        monkeypatch.delenv("DOCTOR_TEST_MQTT_PW")
        code, checks = _doctor(capsys, tmp_path, config=config)
        assert checks["upstream cloudmq"]["message"] == ("environment variable DOCTOR_TEST_MQTT_PW "
                                                          "(upstream.password_env) is not set")
    finally:
        broker.terminate()
        broker.wait(10)
    monkeypatch.setenv("DOCTOR_TEST_MQTT_PW", "right")
    code, checks = _doctor(capsys, tmp_path, config=config)  # nothing listens any more
    assert checks["upstream cloudmq"]["status"] == "fail" and "unreachable" in checks["upstream cloudmq"]["message"]


def test_smtp_login_over_cleartext_is_a_warning(tmp_path, capsys):
    _fresh(tmp_path)
    server = ["notifications.smtp.host='mx.site.example'", "notifications.smtp.user='gw'",
              "notifications.smtp.password_env='SMTP_PASSWORD'"]
    code, checks = _doctor(capsys, tmp_path, "upstream=[]", *server, "notifications.smtp.starttls=false")
    assert code == 0 and checks["smtp"]["status"] == "warn"
    assert checks["smtp"]["message"].startswith("logs in to mx.site.example:587 as 'gw' over cleartext")
    _, checks = _doctor(capsys, tmp_path, "upstream=[]", *server)
    assert checks["smtp"] == {"name": "smtp", "status": "ok", "message": "mx.site.example:587 over STARTTLS, "
                              "logs in as 'gw'", "details": {"host": "mx.site.example", "port": 587}}
    _, checks = _doctor(capsys, tmp_path, "upstream=[]")
    assert checks["smtp"]["status"] == "skip"


def test_the_doctors_checks_are_imported_only_when_it_runs():
    # `gatewayd run` builds every command's parser; the checks module (~2 MB of RSS on a
    # small board, issue 21) is imported by `gatewayd doctor` alone.
    code = ("import sys; from gatewayd.cli import build_parser; from gatewayd.plugins.manager import "
            "build_plugin_manager; build_parser(build_plugin_manager(), set()).parse_args(['doctor', '--json']); "
            "print('gatewayd.cli.doctor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
