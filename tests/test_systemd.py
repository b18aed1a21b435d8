"""systemd's notifications from the trio loop (READY, STATUS, WATCHDOG, STOPPING), read
from a real unix datagram socket, and the service unit checked by systemd-analyze."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio

from gatewayd.core.runtime import run_until_signalled
from gatewayd.core.sdnotify import SystemdNotifier
from gatewayd.testing import gw_client

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
        await trio.sleep(1.2)
        healthy = [m for _, m in _drain(sock) if m == "WATCHDOG=1"]
        assert len(healthy) >= 8  # every 0.1 s while the loop runs
        # A wedged loop (a blocking call on the trio thread) stops the pings: what
        # systemd's watchdog acts on. The same 1.2 s, 1 s of it wedged:
        time.sleep(1.0)
        await trio.sleep(0.2)
        wedged = [m for _, m in _drain(sock) if m == "WATCHDOG=1"]
        assert 1 <= len(wedged) <= 4, (len(healthy), len(wedged))
        os.kill(os.getpid(), signal.SIGTERM)  # what systemctl stop sends
    assert any(m.startswith("STOPPING=1") for _, m in _drain(sock))
    sock.close()


def _service_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name  # an ordinary account name: no "special user" warning


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed "
                    "(scripts/bootstrap --test installs it as root)")
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
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
