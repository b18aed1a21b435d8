"""scripts/install for real: a system user, the code and its venv, config, secrets and
data laid out with their owners and modes, the unit verified; then the installed
daemon run as that user the way systemd runs it (User=, the environment file,
NOTIFY_SOCKET): ready, healthy, no root process, a clean stop; `doctor` green; and
uninstall keeping the data unless --purge.

It creates a user and installs a venv (a minute or two): root only, once per run.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from gatewayd.testing import reserved_port

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    # Never skipped in CI (GATEWAYD_CI, .ci/run): the installed layout must be tested there.
    pytest.mark.skipif((os.geteuid() != 0 or shutil.which("useradd") is None) and not os.environ.get("GATEWAYD_CI"),
                       reason="installing a service needs root and useradd (CI runs the suite as root)"),
    pytest.mark.timeout(900),  # the first test waits for the install (a venv: a minute or two)
]


@pytest.fixture(scope="module")
def installed():
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.fail("CI must test the install: it needs root and useradd")
    # Not under pytest's temporary folder: that is 0700, closed to the service user.
    root = Path(tempfile.mkdtemp(prefix="gatewayd-site-", dir="/tmp"))
    root.chmod(0o755)
    user = f"gwt{secrets.token_hex(3)}"
    ports = {"http": reserved_port(), "mqtt": reserved_port()}
    env = {**os.environ, "GATEWAYD_PREFIX": str(root / "opt"), "GATEWAYD_ETC": str(root / "etc"),
           "GATEWAYD_DATA": str(root / "data"), "GATEWAYD_USER": user, "GATEWAYD_UNIT_DIR": str(root / "unit"),
           "GATEWAYD_BIN_DIR": str(root / "bin"), "GATEWAYD_HTTP_LISTEN": f"127.0.0.1:{ports['http']}",
           "GATEWAYD_MQTT_LISTEN": f"127.0.0.1:{ports['mqtt']}"}
    env.pop("PYTHON", None)
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run([str(REPO / "scripts" / "install"), "--no-start"], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    site = {"root": root, "user": user, "env": env, "ports": ports, "output": result.stderr}
    try:
        yield site
    finally:
        subprocess.run([str(REPO / "scripts" / "install"), "--uninstall", "--purge"], env=env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _mode(path: Path) -> tuple[str, str, int]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, _group(st.st_gid), stat.S_IMODE(st.st_mode)


def _group(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


def test_layout_owners_and_modes(installed):
    root, user = installed["root"], installed["user"]
    account = pwd.getpwnam(user)
    assert account.pw_uid != 0 and account.pw_shell == "/usr/sbin/nologin"
    assert _mode(root / "data") == (user, user, 0o700)
    assert _mode(root / "data" / "master.key") == (user, user, 0o600)
    assert _mode(root / "etc" / "gatewayd.env") == (user, user, 0o600)  # secrets: the service user's only
    assert _mode(root / "etc" / "gatewayd.toml") == ("root", user, 0o640)
    assert _mode(root / "opt")[0] == "root" and not _mode(root / "opt")[2] & 0o022  # code: read-only to it
    assert "GATEWAYD_ADMIN_TOKEN=" in (root / "etc" / "gatewayd.env").read_text()
    unit = (root / "unit" / "gatewayd.service").read_text()
    assert f"User={user}" in unit and f"ReadWritePaths={root / 'data'}" in unit
    assert not [line for line in unit.splitlines() if "@" in line and not line.startswith("#")]  # all filled in
    assert f"ExecStart={root / 'opt'}/.venv/bin/gatewayd run --config {root / 'etc'}/gatewayd.toml" in unit
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify", str(root / "unit" / "gatewayd.service")],
                               capture_output=True, text=True)
        assert check.returncode == 0 and check.stderr == "", check.stderr


def test_doctor_on_the_fresh_install_is_all_green(installed):
    out = subprocess.run([str(installed["root"] / "bin" / "gatewayd"), "doctor", "--json"], capture_output=True,
                         text=True, timeout=120)
    doc = json.loads(out.stdout)
    assert out.returncode == 0 and doc["ok"], out.stdout
    assert {c["status"] for c in doc["checks"]} <= {"ok", "skip"}, doc["checks"]
    assert next(c for c in doc["checks"] if c["name"] == "data dir")["message"].endswith(f"by {installed['user']}")


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key] = value
    return out


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    return []


def test_the_installed_daemon_runs_as_its_user_with_no_root_process(installed, tmp_path):
    root, user = installed["root"], installed["user"]
    account = pwd.getpwnam(user)
    notify_dir = root / "notify"  # where the service user can reach it (pytest's tmp_path is 0700)
    notify_dir.mkdir()
    os.chown(notify_dir, account.pw_uid, account.pw_gid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_dir / "sock"))
    os.chmod(notify_dir / "sock", 0o777)
    sock.settimeout(60)
    # What systemd does with the unit: User=, EnvironmentFile=, WorkingDirectory=, NOTIFY_SOCKET.
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "NOTIFY_SOCKET": str(notify_dir / "sock"),
           "WATCHDOG_USEC": "2000000", **_env_file(root / "etc" / "gatewayd.env")}
    daemon = subprocess.Popen([str(root / "opt" / ".venv" / "bin" / "gatewayd"), "run", "--config",
                               str(root / "etc" / "gatewayd.toml")], user=account.pw_uid, group=account.pw_gid,
                              extra_groups=[], cwd=root / "data", env=env, stdout=subprocess.DEVNULL,
                              stderr=(tmp_path / "daemon.log").open("wb"))
    try:
        message = sock.recv(4096).decode()
        assert message.startswith("READY=1\nSTATUS=running: http://"), message  # the daemon's, no one else's
        r = httpx.get(f"http://127.0.0.1:{installed['ports']['http']}/health", timeout=10)
        assert r.status_code == 200 and r.json()["components"]["mqtt_broker"]["state"] == "ok", r.text
        assert sock.recv(100) == b"WATCHDOG=1"
        processes = _tree(daemon.pid)
        names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in processes}
        assert "mosquitto" in names.values(), names  # the managed broker, the same user's child
        for pid in processes:
            assert 0 not in _uids(pid), (names[pid], _uids(pid))
            assert set(_uids(pid)) == {account.pw_uid}
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        messages = []
        sock.settimeout(1)
        try:
            while True:
                messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert any(m.startswith("STOPPING=1") for m in messages)
        assert b"should not be run as root" not in (tmp_path / "daemon.log").read_bytes()
    finally:
        if daemon.poll() is None:  # a failed test: the daemon and its mosquitto go
            for pid in reversed(_tree(daemon.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            daemon.wait()
        sock.close()


def test_a_second_run_upgrades_in_place_keeping_config_secrets_and_data(installed):
    root, user, env = installed["root"], installed["user"], installed["env"]
    config = root / "etc" / "gatewayd.toml"
    config.write_text(config.read_text() + "\n# edited on site\n")
    kept = {p: p.read_bytes() for p in (config, root / "etc" / "gatewayd.env", root / "data" / "master.key")}
    (root / "data" / "site-note.txt").write_text("data of the site")
    (root / "opt" / "stale-module.py").write_text("from the previous release")
    result = subprocess.run([str(REPO / "scripts" / "install"), "--no-start"], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" not in result.stderr and "created the system user" not in result.stderr  # nothing new
    assert {p: p.read_bytes() for p in kept} == kept
    assert (root / "data" / "site-note.txt").read_text() == "data of the site"
    assert not (root / "opt" / "stale-module.py").exists()  # the code is replaced, not merged
    assert _mode(root / "etc" / "gatewayd.env") == (user, user, 0o600)
    assert _mode(root / "etc" / "gatewayd.toml") == ("root", user, 0o640)
    assert _mode(root / "data") == (user, user, 0o700)
    wrapper = (root / "bin" / "gatewayd").read_text()
    assert f'GATEWAYD_UNIT="{root / "unit" / "gatewayd.service"}"' in wrapper


@pytest.mark.parametrize("override, message", [
    ({"GATEWAYD_PREFIX": "/"}, "not an absolute path other than /: '/'"),
    ({"GATEWAYD_DATA": "var/lib/gatewayd"}, "not an absolute path other than /: 'var/lib/gatewayd'"),
])
def test_paths_that_are_not_safe_to_remove_are_refused(installed, override, message):
    for args in (["--no-start"], ["--uninstall", "--purge"]):
        result = subprocess.run([str(REPO / "scripts" / "install"), *args], env={**installed["env"], **override},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and message in result.stderr


def test_a_prefix_or_data_that_is_not_gatewayds_is_not_removed(installed, tmp_path):
    other = Path(tempfile.mkdtemp(prefix="not-gatewayd-", dir="/tmp"))
    try:
        (other / "precious.txt").write_text("someone else's")
        for override, args in (({"GATEWAYD_PREFIX": str(other)}, ["--no-start"]),
                               ({"GATEWAYD_PREFIX": str(other)}, ["--uninstall"]),
                               ({"GATEWAYD_DATA": str(other)}, ["--uninstall", "--purge"])):
            result = subprocess.run([str(REPO / "scripts" / "install"), *args],
                                    env={**installed["env"], **override}, capture_output=True, text=True, timeout=60)
            assert result.returncode == 1 and f"{other}" in result.stderr and "not" in result.stderr, result.stderr
            assert (other / "precious.txt").read_text() == "someone else's"
        assert (installed["root"] / "opt" / "scripts" / "install").exists()  # the refusals removed nothing
        assert (installed["root"] / "data" / "master.key").exists()
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_the_wrapper_reads_the_secrets_as_systemd_does_not_as_shell(installed):
    """The wrapper sourced gatewayd.env with sh: a password with & ; $ or a space (an MQTT
    upstream password pasted on site) ran as a command, and the value the doctor tested
    was not the one systemd's EnvironmentFile= gives the daemon."""
    root = installed["root"]
    env_file = root / "etc" / "gatewayd.env"
    kept = env_file.read_bytes()
    marker = Path(f"/tmp/gatewayd-review-{secrets.token_hex(4)}")
    try:
        env_file.write_bytes(kept + f"GATEWAYD_REVIEW_A=ab$cd&ef\nGATEWAYD_REVIEW_B=two words\n"
                                    f"GATEWAYD_REVIEW_C=x;touch {marker}\n".encode())
        out = subprocess.run([str(root / "bin" / "gatewayd"), "--version"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert not marker.exists()
    finally:
        env_file.write_bytes(kept)
        marker.unlink(missing_ok=True)


def test_uninstall_keeps_the_data_unless_purged(installed):
    root, env = installed["root"], installed["env"]
    install = str(REPO / "scripts" / "install")
    result = subprocess.run([install, "--uninstall"], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "kept" in result.stderr
    assert not (root / "opt").exists() and not (root / "unit" / "gatewayd.service").exists()
    assert (root / "data" / "master.key").exists() and (root / "etc" / "gatewayd.toml").exists()
    pwd.getpwnam(installed["user"])  # still there
    result = subprocess.run([install, "--uninstall", "--purge"], env=env, capture_output=True, text=True)
    assert result.returncode == 0
    assert not (root / "data").exists() and not (root / "etc").exists()
    with pytest.raises(KeyError):
        pwd.getpwnam(installed["user"])

