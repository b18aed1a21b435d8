"""Issue 21, a fresh audit (stop 25): a database the gateway cannot use — a corrupt
file, or one a newer release migrated — named by the doctor, and by `gatewayd run` as a
message with the exit status the unit does not restart on (3), not a traceback followed
by a restart every five seconds for ever."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.cli import main
from gatewayd.core.devices.secrets import load_master_key
from gatewayd.testing import reserved_port

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "upgrade" / "v0-mqtt1"


def _corrupt(data: Path) -> None:
    data.mkdir(mode=0o700)
    load_master_key(data)
    (data / "gatewayd.sqlite3").write_bytes(bytes(range(256)) * 32)  # no SQLite header


def _bad_page(data: Path) -> None:
    """The previous release's database with one b-tree page overwritten (a bad SD card):
    the file opens; the outbox's first read fails."""
    data.mkdir(mode=0o700)
    for name in ("gatewayd.sqlite3", "master.key"):
        shutil.copy(FIXTURE / name, data / name)
    with (data / "gatewayd.sqlite3").open("r+b") as f:
        f.seek(4096 * 10)
        f.write(b"\x0d\xff\xff\xff\xff" * 8)


def _newer(data: Path) -> None:
    """The previous release's database, as a later release would leave it (core_devices at 99)."""
    data.mkdir(mode=0o700)
    for name in ("gatewayd.sqlite3", "master.key"):
        shutil.copy(FIXTURE / name, data / name)
    with sqlite3.connect(data / "gatewayd.sqlite3") as conn:
        conn.execute("UPDATE core_schema SET version = 99 WHERE component = 'core_devices'")


def _doctor(capsys, data: Path) -> tuple[int, dict[str, dict]]:
    code = main(["doctor", "--json", "--no-network", "--set", f"gateway.data_dir='{data}'",
                 "--set", f"http.listen='127.0.0.1:{reserved_port()}'",
                 "--set", f"mqtt.listen='127.0.0.1:{reserved_port()}'"])
    return code, {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}


def test_the_doctor_names_a_corrupt_database(tmp_path, capsys):
    _corrupt(tmp_path / "var")
    code, checks = _doctor(capsys, tmp_path / "var")
    assert code == 1 and checks["database"]["status"] == "fail", checks.get("database")
    assert "is not a usable SQLite database" in checks["database"]["message"]
    assert "restore" in checks["database"]["message"]


def test_the_doctor_passes_a_good_database_and_one_not_made_yet(tmp_path, capsys):
    (tmp_path / "new").mkdir()
    code, checks = _doctor(capsys, tmp_path / "new")
    assert checks["database"]["status"] == "skip"
    data = tmp_path / "var"
    data.mkdir(mode=0o700)
    for name in ("gatewayd.sqlite3", "master.key"):
        shutil.copy(FIXTURE / name, data / name)
    code, checks = _doctor(capsys, data)
    assert checks["database"]["status"] == "ok", checks["database"]


def _run(data: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", "run", "--set", f"gateway.data_dir='{data}'",
         "--set", "http.listen='127.0.0.1:0'", "--set", "mqtt.listen='127.0.0.1:0'", "--set", "backup.interval_s=0"],
        capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("make, message", [
    (_corrupt, "is not a usable SQLite database"),
    (_newer, "core_devices: the database holds schema version 99, newer than this gatewayd's"),
    (_bad_page, "is not a usable SQLite database (database disk image is malformed)"),
])
def test_run_names_an_unusable_database_and_exits_3(tmp_path, make, message):
    make(tmp_path / "var")
    done = _run(tmp_path / "var", tmp_path)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "| " not in done.stderr, done.stderr[-3000:]
    assert f"gatewayd: " in done.stderr and message in done.stderr


def test_tls_commands_name_a_file_where_a_folder_belongs(tmp_path, capsys):
    data = tmp_path / "var"
    data.mkdir()
    common = ["--set", f"gateway.data_dir='{data}'"]
    (data / "tls").write_text("not a folder")
    assert main(["tls", "init", "--only", "--name", "gw.local", *common]) == 1
    assert f"{data / 'tls'}: File exists" in capsys.readouterr().err
    (data / "tls").unlink()
    assert main(["tls", "init", "--only", "--name", "gw.local", *common]) == 0
    capsys.readouterr()
    (tmp_path / "out").write_text("not a folder")
    assert main(["tls", "client", "d1", "--out", str(tmp_path / "out"), *common]) == 1
    assert f"{tmp_path / 'out'}: File exists" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "not a folder"


def test_the_doctor_names_a_database_of_a_newer_release(tmp_path, capsys):
    _newer(tmp_path / "var")
    code, checks = _doctor(capsys, tmp_path / "var")
    assert code == 1 and checks["database"]["status"] == "fail", checks["database"]
    assert "core_devices: schema version 99, newer than this gatewayd's 1" in checks["database"]["message"]
    assert "pre-upgrade" in checks["database"]["message"]


async def test_the_doctor_knows_every_core_schema_a_gateway_writes(gateway_factory):
    from gatewayd.core.runtime import core_schema_versions

    async with gateway_factory(mqtt=True) as gw:  # core_mqtt comes with the MQTT service
        db = gw.config.data_dir / "gatewayd.sqlite3"
        written = dict(sqlite3.connect(db).execute("SELECT component, version FROM core_schema"))
    core = {c: v for c, v in written.items() if c not in gw.plugins.names}
    assert core == core_schema_versions()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None, reason="needs root and useradd")
def test_purge_keeps_an_account_the_install_did_not_create(tmp_path):
    """GATEWAYD_USER=pi (an existing login account the site chose to run the service):
    `--uninstall --purge` removed the account itself."""
    import pwd
    import secrets

    user = f"gwk{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "--comment", "a person", user], check=True)
    try:
        root = tmp_path / "site"
        for folder, marker in (("opt/scripts", "install"), ("etc", "gatewayd.toml"), ("data", "master.key")):
            (root / folder).mkdir(parents=True)
            (root / folder / marker).write_text("")
        env = {**os.environ, "GATEWAYD_PREFIX": str(root / "opt"), "GATEWAYD_ETC": str(root / "etc"),
               "GATEWAYD_DATA": str(root / "data"), "GATEWAYD_USER": user, "GATEWAYD_UNIT_DIR": str(root / "unit"),
               "GATEWAYD_BIN_DIR": str(root / "bin")}
        done = subprocess.run([str(REPO / "scripts" / "install"), "--uninstall", "--purge"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert not (root / "data").exists() and not (root / "etc").exists()
        assert pwd.getpwnam(user).pw_gecos == "a person"  # still there
        assert f"kept the user {user}" in done.stderr
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)
