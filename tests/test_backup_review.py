"""The review of issue 21 on backups: a `backup.dir` that cannot hold copies is named
(key and path) at start and by the doctor; free space is checked before each copy (a
refused copy is counted, reported, and leaves nothing behind); /health says "warning"
(200) for backups and an expiring certificate, 503 for an expired one."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from gatewayd.cli import main
from gatewayd.core.backup import BackupSection, Backups, list_backups, space_needed
from gatewayd.core.health import Health
from gatewayd.core.metrics import Metrics
from gatewayd.core.storage import Storage
from gatewayd.core.tls import init_site
from gatewayd.testing import gw_client
from gatewayd.testing import reserved_port


def _metric(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs at tmp_path/disk (as tests/test_storage_full.py), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                          capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=10)


def test_the_default_keeps_three_copies():
    assert BackupSection().keep == 3


async def test_a_backup_that_does_not_fit_is_refused_counted_and_leaves_nothing(tmp_path, small_disk):
    storage = Storage(tmp_path / "var" / "gatewayd.sqlite3")
    storage.open()
    try:
        storage.database.execute_sql("CREATE TABLE t (x TEXT)")
        storage.database.execute_sql("INSERT INTO t VALUES (?)", ("x" * 100_000,))
        health, metrics = Health(), Metrics()
        backups = Backups(BackupSection(interval_s=3600), storage.path, small_disk / "bk", data_dir=tmp_path / "var",
                          master_key_env="", health=health, metrics=metrics)
        assert await backups.take() is None
        assert list(small_disk.rglob("*")) == [small_disk / "bk"]  # no copy, no .partial
        assert backups.no_space == 1 and backups.failed == 0
        state = backups.state()
        assert state.state == "failed" and state.warning
        need = space_needed(storage.path, small_disk / "bk") >> 20
        free = shutil.disk_usage(small_disk).free >> 20
        assert state.reason == (f"the last backup failed: not enough free space in {small_disk / 'bk'} (backup.dir): "
                                f"{free} MiB free, a copy of the database needs {need} MiB (its size, 10% and a margin); "
                                "free space, lower backup.keep, or point backup.dir at a larger disk")
        ok, doc = health.snapshot()
        assert ok and doc["status"] == "warning"
        text = metrics.render()
        assert _metric(text, 'gatewayd_backups_total{result="no_space"}') == 1
        assert _metric(text, 'gatewayd_backups_total{result="failed"}') == 0
        # On a disk with room, the same Backups takes it and the warning ends.
        backups.directory = tmp_path / "bk"
        path = await backups.take()
        assert path is not None and list_backups(tmp_path / "bk") == [path]
        assert backups.state().state == "ok" and health.snapshot()[1]["status"] == "ok"
    finally:
        storage.close()


async def test_a_file_as_backup_dir_is_named_at_start(gateway_factory, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    async with gateway_factory(settings=["backup.interval_s=3600", f"backup.dir='{tmp_path / 'file'}'"]) as gw:
        async with gw_client(gw) as client:
            r = await client.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "warning"
        backup = r.json()["components"]["backup"]
        assert backup["state"] == "failed"
        assert f"backup.dir: {tmp_path / 'file'} is a file, not a folder" in backup["reason"]
    (tmp_path / "dir").write_text("a file where a parent folder should be")
    async with gateway_factory(settings=["backup.interval_s=3600", f"backup.dir='{tmp_path / 'dir' / 'bk'}'"]) as gw:
        assert await gw.backups.take() is None
        assert gw.backups.last_error == (f"backup.dir: {tmp_path / 'dir' / 'bk'} cannot be made: {tmp_path / 'dir'} "
                                         "is a file, not a folder")


async def test_an_expired_certificate_is_503_an_expiring_one_200(gateway_factory, tmp_path):
    import datetime as dt

    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=100)
    init_site(tmp_path / "var" / "tls", "gw", ["localhost"], ["127.0.0.1"], days=30, now=long_ago)
    settings = [f"tls.mqtt_listen='127.0.0.1:{reserved_port()}'"]  # TLS on the MQTT edge, /health plain
    async with gateway_factory(mqtt=True, settings=settings) as gw:
        async with gw_client(gw) as client:
            r = await client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "degraded"
    tls = r.json()["components"]["tls"]
    assert tls["state"] == "expired" and "severity" not in tls and "devices refuse it" in tls["reason"]


# -- the doctor --------------------------------------------------------------------------


def _doctor(capsys, tmp_path: Path, *settings: str) -> tuple[int, dict]:
    argv = ["doctor", "--json", "--no-network", "--set", f"gateway.data_dir='{tmp_path / 'var'}'",
            "--set", f"http.listen='127.0.0.1:{reserved_port()}'", "--set", f"mqtt.listen='127.0.0.1:{reserved_port()}'"]
    for s in settings:
        argv += ["--set", s]
    code = main(argv)
    return code, next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "backup dir")


def test_doctor_checks_backup_dir(tmp_path, capsys, small_disk):
    (tmp_path / "var").mkdir()
    code, check = _doctor(capsys, tmp_path)
    assert check["status"] == "ok" and "(made at the first backup)" in check["message"]
    assert check["details"]["dir"] == str(tmp_path / "var" / "backups")
    (tmp_path / "file").write_text("x")
    code, check = _doctor(capsys, tmp_path, f"backup.dir='{tmp_path / 'file'}'")
    assert code == 1 and check["status"] == "fail"
    assert check["message"] == f"{tmp_path / 'file'} (backup.dir): {tmp_path / 'file'} is a file, not a folder"
    code, check = _doctor(capsys, tmp_path, f"backup.dir='{tmp_path / 'file' / 'sub'}'")
    assert code == 1 and check["status"] == "fail" and "is a file, not a folder" in check["message"]
    code, check = _doctor(capsys, tmp_path, f"backup.dir='{small_disk}'")
    assert code == 1 and check["status"] == "fail" and "4 MiB free, a copy of the database needs" in check["message"]


def test_doctor_checks_the_service_may_write_data_dir_and_backup_dir(tmp_path, capsys, monkeypatch):
    (tmp_path / "var").mkdir()
    unit = tmp_path / "gatewayd.service"
    unit.write_text((Path(__file__).parent.parent / "scripts" / "systemd" / "gatewayd.service").read_text()
                    .replace("@DATA@", str(tmp_path / "var")))
    monkeypatch.setenv("GATEWAYD_UNIT", str(unit))

    def service_check(*settings: str) -> tuple[int, dict]:
        argv = ["doctor", "--json", "--no-network", "--set", f"gateway.data_dir='{tmp_path / 'var'}'",
                "--set", f"http.listen='127.0.0.1:{reserved_port()}'", "--set", f"mqtt.listen='127.0.0.1:{reserved_port()}'"]
        for s in settings:
            argv += ["--set", s]
        code = main(argv)
        return code, next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "service paths")

    code, check = service_check()
    assert check["status"] == "ok" and check["details"]["read_write_paths"] == [str(tmp_path / "var")]
    usb = tmp_path / "usb"
    usb.mkdir()
    code, check = service_check(f"backup.dir='{usb / 'gatewayd'}'")
    assert code == 1 and check["status"] == "fail"
    assert check["message"] == (f"{usb / 'gatewayd'} (backup.dir) is read-only to the service "
                                f"(ProtectSystem=strict): add it with `sudo systemctl edit gatewayd` ([Service] "
                                f"ReadWritePaths={usb / 'gatewayd'}), then restart")
    (tmp_path / "gatewayd.service.d").mkdir()
    (tmp_path / "gatewayd.service.d" / "override.conf").write_text(f"[Service]\nReadWritePaths={usb}\n")
    code, check = service_check(f"backup.dir='{usb / 'gatewayd'}'")
    assert check["status"] == "ok"
    monkeypatch.setenv("GATEWAYD_UNIT", str(tmp_path / "none.service"))
    assert service_check()[1]["status"] == "skip"


def test_a_read_only_backup_dir_names_the_sandbox(tmp_path):
    from gatewayd.core.backupdir import BackupDirError, prepare_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True,
                          text=True, timeout=10)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        with pytest.raises(BackupDirError) as e:
            prepare_dir(ro)
        assert str(e.value) == (f"backup.dir: {ro} is on a read-only filesystem for this process (under the service "
                                "unit's ProtectSystem=strict, add it to ReadWritePaths: sudo systemctl edit gatewayd)")
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True, timeout=10)


def test_doctor_warns_when_keep_copies_do_not_fit(tmp_path, capsys):
    import sqlite3

    disk = tmp_path / "disk64"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                          text=True, timeout=10)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        (tmp_path / "var").mkdir()
        with sqlite3.connect(tmp_path / "var" / "gatewayd.sqlite3") as conn:
            conn.execute("CREATE TABLE t (b BLOB)")
            conn.execute("INSERT INTO t VALUES (zeroblob(12 * 1024 * 1024))")
        # 10 copies of 12 MiB (keep = 7, the new one, and the 2 copies kept from before
        # upgrades) do not fit in 64 MiB; 4 do (keep = 2, keep_pre_upgrade = 1).
        code, check = _doctor(capsys, tmp_path, f"backup.dir='{disk}'", "backup.keep=7")
        assert code == 0 and check["status"] == "warn"
        assert check["message"].startswith(f"{disk} (backup.dir): backup.keep = 7 and backup.keep_pre_upgrade = 2 mean "
                                           "10 copies of 12 MiB at the peak, 120 MiB; 64 MiB are there (free, and the "
                                           "0 copies already taken): lower backup.keep or backup.keep_pre_upgrade")
        code, check = _doctor(capsys, tmp_path, f"backup.dir='{disk}'", "backup.keep=2", "backup.keep_pre_upgrade=1")
        assert code == 0 and check["status"] == "ok"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=10)
