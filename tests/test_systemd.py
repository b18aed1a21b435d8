"""systemd's notifications from the trio loop (READY, STATUS, WATCHDOG, STOPPING), read
from a real unix datagram socket, and the service unit checked by systemd-analyze."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import peewee
import pytest
import trio

from gatewayd.core.runtime import run_until_signalled
from gatewayd.core.sdnotify import SystemdNotifier
from gatewayd.plugins.api import hookimpl
from gatewayd.testing import gw_client, wait_until

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "scripts" / "systemd" / "gatewayd.service"


def _listener(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> list[tuple[float, str]]:
    out = []
    while True:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except BlockingIOError:
            return out


def test_notify_path_and_abstract_sockets(tmp_path):
    with _listener(tmp_path) as sock:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "4000000"})
        assert notifier.enabled and notifier.watchdog_s == 4.0
        notifier.ready("running")
        notifier.stopping()
        notifier.close()
        got = [m for _, m in _drain(sock)]
    assert got[0].splitlines()[:2] == ["READY=1", "STATUS=running"] and got[1] == "STOPPING=1\nSTATUS=stopping"
    name = f"gatewayd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind(b"\0" + name.encode())
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.notify("WATCHDOG=1")
        assert abstract.recv(100) == b"WATCHDOG=1"
        notifier.close()


def test_the_variables_are_taken_out_of_the_environment(tmp_path, monkeypatch):
    # Children (the managed mosquitto, which speaks sd_notify itself) must not inherit them.
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = SystemdNotifier()
    assert notifier.enabled and notifier.watchdog_s == 1.0
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ


def test_not_under_systemd_nothing_is_sent():
    notifier = SystemdNotifier({})
    assert not notifier.enabled and not notifier.notify("READY=1") and notifier.sent == 0
    # A watchdog meant for another process (WATCHDOG_PID) is not ours to feed.
    assert SystemdNotifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None


async def test_ready_after_start_watchdog_from_the_loop_and_stopping(gateway_factory, tmp_path):
    sock = _listener(tmp_path)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"})
    async with gateway_factory() as gw:  # only to build a configured Gateway; stopped again below
        config, plugins = gw.config, gw.plugins
    from gatewayd.core.runtime import Gateway

    gateway = Gateway(config, plugins)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_until_signalled(gateway, task_status=task_status,
                                                                     notifier=notifier))
        ready = _drain(sock)
        assert ready and ready[0][1].startswith("READY=1\nSTATUS=running: http://127.0.0.1:")
        async with gw_client(gateway) as client:
            assert (await client.get("/health")).status_code == 200
        _drain(sock)
        pings: list[str] = []

        def pinged(n: int) -> bool:
            pings.extend(m for _, m in _drain(sock) if m == "WATCHDOG=1")
            return len(pings) >= n

        # Ping after ping while the loop runs (every 0.1 s; a loaded machine may take longer).
        await wait_until(lambda: pinged(8), timeout=60, what="8 watchdog pings while the loop runs")
        # A wedged loop (a blocking call on the trio thread) stops the pings: what
        # systemd's watchdog acts on. Not one while it is wedged, and they come back after.
        _drain(sock)
        time.sleep(1.0)
        assert [m for _, m in _drain(sock) if m == "WATCHDOG=1"] == []
        pings.clear()
        await wait_until(lambda: pinged(1), timeout=60, what="a watchdog ping once the loop runs again")
        os.kill(os.getpid(), signal.SIGTERM)  # what systemctl stop sends
    assert any(m.startswith("STOPPING=1") for _, m in _drain(sock))
    sock.close()


def _service_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name  # an ordinary account name: no "special user" warning


# Skipped on a box without it, never in CI (GATEWAYD_CI, .ci/run): there it fails.
@pytest.mark.skipif(shutil.which("systemd-analyze") is None and not os.environ.get("GATEWAYD_CI"),
                    reason="systemd-analyze is not installed (scripts/bootstrap --test installs it as root)")
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed (CI must verify the unit): apt-get install systemd")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "gatewayd.env").write_text("")
    text = UNIT.read_text()
    for key in ("Type=notify", "WatchdogSec=", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                "Restart=on-failure", "ReadWritePaths=@DATA@", "User=@USER@", "KillMode=mixed"):
        assert key in text
    rendered = (text.replace("@USER@", _service_user()).replace("@ETC@", str(tmp_path / "etc"))
                .replace("@DATA@", str(tmp_path)).replace("@PREFIX@", str(REPO)))
    if not (REPO / ".venv" / "bin" / "gatewayd").exists():
        pytest.fail("no .venv/bin/gatewayd: run scripts/bootstrap")
    unit = tmp_path / "gatewayd.service"
    unit.write_text(rendered)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # And it does catch a mistake (an unknown key is only a warning to systemd).
    unit.write_text(rendered.replace("WatchdogSec=", "WatchdogSek="))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert "Unknown key 'WatchdogSek'" in result.stderr


# -- a second look (issue 21): the watchdog's gap, the start of a migration, restarts --


class _Receiver:
    """Datagrams with the time each arrived, read by a thread (the trio loop may be the
    thing that is blocked)."""

    def __init__(self, path: Path) -> None:
        import threading

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.got: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                self.got.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


class _TimedNotifier(SystemdNotifier):
    """The real notifier, noting when each datagram left (on the trio thread)."""

    def __init__(self, environ):
        super().__init__(environ)
        self.sent_at: list[float] = []

    def notify(self, *lines: str) -> bool:
        ok = super().notify(*lines)
        if ok and lines == ("WATCHDOG=1",):
            self.sent_at.append(time.monotonic())
        return ok


async def test_a_blocked_loop_leaves_a_gap_longer_than_the_watchdog(tmp_path):
    receiver = _Receiver(tmp_path / "notify.sock")
    notifier = _TimedNotifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"})
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.watchdog)
            await wait_until(lambda: len(notifier.sent_at) >= 3, timeout=60, what="3 pings before the block")
            blocked_at = time.monotonic()
            time.sleep(0.8)  # the trio thread blocked: 4 watchdog periods
            unblocked_at = time.monotonic()
            await wait_until(lambda: len([t for t in notifier.sent_at if t > unblocked_at]) >= 2, timeout=60,
                             what="2 pings after the block")
            nursery.cancel_scope.cancel()
        # The receiving thread reads the last ones.
        await wait_until(lambda: len([m for _, m in receiver.got if m == "WATCHDOG=1"]) >= len(notifier.sent_at),
                         timeout=60, what="every ping sent reached the socket")
    finally:
        notifier.close()
        receiver.close()
    sent = notifier.sent_at
    # Nothing left while the loop was blocked: systemd, which kills a service whose pings
    # stop for WatchdogSec (0.2 s here), saw a gap of the whole blocked time.
    assert not [t for t in sent if blocked_at < t < unblocked_at]
    gap = min(t for t in sent if t >= unblocked_at) - max(t for t in sent if t <= blocked_at)
    assert gap >= 0.8
    assert len([t for t in sent if t < blocked_at]) >= 3 and len([t for t in sent if t > unblocked_at]) >= 2
    # ...and every one of them reached the socket.
    assert len([m for _, m in receiver.got if m == "WATCHDOG=1"]) == len(sent)


class _Old(peewee.Model):
    text = peewee.TextField()

    class Meta:
        table_name = "slowmig_row"


class _SlowV1:
    @hookimpl
    def gatewayd_storage_models(self, models):
        models.add(_Old)


class _SlowV2:
    extended = staticmethod(lambda: 5)  # how many EXTEND_TIMEOUT_USEC systemd got so far

    @hookimpl
    def gatewayd_storage_models(self, models):
        models.add(_Old)
        models.version = 2
        models.migrations[2] = self.migrate

    @staticmethod
    def migrate(migrator, db):
        # A long migration (on the installing thread, as a real one runs): it lasts until
        # systemd was told 5 times to wait longer, however slow the machine (at most 60 s).
        deadline = time.monotonic() + 60
        while _SlowV2.extended() < 5 and time.monotonic() < deadline:
            time.sleep(0.02)


async def test_a_migration_at_start_extends_systemds_start_timeout(gateway_factory, tmp_path):
    from gatewayd.core.runtime import Gateway

    async with gateway_factory(plugins=[("slowmig", _SlowV1())]) as gw:
        await gw.storage.write(lambda: _Old.insert(text="a").execute())
    async with gateway_factory(plugins=[("slowmig", _SlowV2())]) as gw:  # only to build the config
        config, plugins = gw.config, gw.plugins
    # The factory's gateway migrated already: back to version 1 for the one under test.
    with sqlite3.connect(config.data_dir / "gatewayd.sqlite3") as conn:
        conn.execute("UPDATE core_schema SET version = 1 WHERE component = 'slowmig'")
    receiver = _Receiver(tmp_path / "notify.sock")
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    gateway = Gateway(config, plugins)
    _SlowV2.extended = staticmethod(lambda: len([m for _, m in receiver.got if m.startswith("EXTEND_TIMEOUT_USEC")]))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_until_signalled(
                gateway, task_status=task_status, notifier=notifier, extend_every_s=0.1))
            assert gateway.storage.pre_migration_backup is not None
            await wait_until(lambda: any(m.startswith("READY=1") for _, m in receiver.got), timeout=60,
                             what="READY=1 reached the socket")  # read by the receiving thread
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        _SlowV2.extended = staticmethod(lambda: 5)
        receiver.close()
    messages = [m for _, m in receiver.got]
    ready = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
    extended = [m for m in messages[:ready] if m.startswith("EXTEND_TIMEOUT_USEC=60000000\n")]
    assert len(extended) >= 5, messages[:ready]  # every 0.1 s while the migration ran
    assert "STATUS=copying the database, then migrating its schema" in extended[0]
    assert not [m for m in messages[ready:] if m.startswith("EXTEND_TIMEOUT_USEC")]


def test_a_failed_migration_exits_3_which_the_unit_does_not_restart(tmp_path):
    fixture = REPO / "tests" / "fixtures" / "upgrade" / "v0-mqtt1"
    data = tmp_path / "var"
    data.mkdir(mode=0o700)
    for name in ("gatewayd.sqlite3", "master.key"):
        shutil.copy(fixture / name, data / name)
    with sqlite3.connect(data / "gatewayd.sqlite3") as conn:
        before = conn.execute("SELECT component, version FROM core_schema ORDER BY component").fetchall()
    (tmp_path / "file").write_text("not a folder")
    done = subprocess.run(
        [sys.executable, "-m", "gatewayd", "run", "--set", f"gateway.data_dir='{data}'",
         "--set", f"backup.dir='{tmp_path / 'file'}'", "--set", "http.listen='127.0.0.1:0'",
         "--set", "mqtt.listen='127.0.0.1:0'"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert f"the copy of the database before migrating failed (backup.dir: {tmp_path / 'file'} is a file" in done.stderr
    with sqlite3.connect(data / "gatewayd.sqlite3") as conn:  # nothing migrated (new components' tables made)
        after = dict(conn.execute("SELECT component, version FROM core_schema"))
    assert {c: after[c] for c, _ in before} == dict(before)
    assert ("core_mqtt", 1) in before
    unit = UNIT.read_text()
    assert "\nRestart=on-failure\n" in unit and "\nRestartPreventExitStatus=2 3\n" in unit


def test_ci_runs_the_units_check_and_does_not_skip_it(tmp_path):
    """The check above skips on a box without systemd-analyze; in CI (.ci/run sets
    GATEWAYD_CI) that must be a failure, or CI passes without the unit ever verified."""
    assert "GATEWAYD_CI=1" in (REPO / ".ci" / "run").read_text()
    env = {**os.environ, "PATH": str(tmp_path), "GATEWAYD_CI": "1"}  # no systemd-analyze on this PATH
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           f"{Path(__file__)}::test_the_unit_passes_systemd_analyze_verify"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1 and "1 failed" in done.stdout, done.stdout[-2000:]
    assert "systemd-analyze is not installed" in done.stdout
