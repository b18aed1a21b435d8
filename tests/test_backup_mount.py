"""`backup.dir` on a disk that is not mounted (a USB stick at /mnt/usb that did not come
up) is refused, not silently filled on the SD card's mount point folder: named in
/health as a warning, counted in /metrics (`result="not_mounted"`), failed by the doctor;
the copy before a migration is refused too (review of issue 21). The other disk is a
real tmpfs mounted during the test."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from gatewayd.cli import main
from gatewayd.core.backup import BackupSection, Backups, list_backups
from gatewayd.core.backupdir import mount_required
from gatewayd.core.health import Health
from gatewayd.core.metrics import Metrics
from gatewayd.core.storage import MigrationError, Storage
from gatewayd.testing import gw_client
from gatewayd.testing import reserved_port


def _metric(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])


@pytest.fixture
def usb(tmp_path):
    """A mount point on the data's disk, tmp_path/usb (the stick is not there yet)."""
    point = tmp_path / "usb"
    point.mkdir()
    return point


@pytest.fixture
def plug(usb):
    """Mount a 64 MB tmpfs on the mount point (the stick comes up); unmounted afterwards."""
    mounted = []

    def plug() -> None:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(usb)],
                              capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(usb)

    try:
        yield plug
    finally:
        for p in mounted:
            subprocess.run(["umount", "-l", str(p)], capture_output=True, timeout=10)


def test_require_mount_is_automatic_under_media_and_mnt():
    assert mount_required(Path("/mnt/usb/backups"), None)
    assert mount_required(Path("/media/pi/STICK"), None)
    assert mount_required(Path("/run/media/pi/STICK/bk"), None)
    assert not mount_required(Path("/var/lib/gatewayd/backups"), None)
    assert not mount_required(Path("/mnt/usb"), False)  # said in the file: it wins
    assert mount_required(Path("/srv/nas/gw"), True)


async def test_a_stick_not_mounted_is_refused_then_used_once_mounted(tmp_path, usb, plug):
    storage = Storage(tmp_path / "var" / "gatewayd.sqlite3")
    storage.open()
    try:
        storage.database.execute_sql("CREATE TABLE t (x INTEGER)")
        health, metrics = Health(), Metrics()
        backups = Backups(BackupSection(interval_s=3600, require_mount=True), storage.path, usb / "backups",
                          data_dir=tmp_path / "var", master_key_env="", health=health, metrics=metrics)
        assert await backups.take() is None
        assert list(usb.iterdir()) == []  # nothing made on the SD card's mount point folder
        assert backups.not_mounted == 1 and backups.failed == 0 and backups.no_space == 0
        state = backups.state()
        assert state.state == "not_mounted" and state.warning
        assert state.reason == (f"backup.dir: {usb / 'backups'} is not mounted: {usb} is on the same filesystem as "
                                f"gateway.data_dir ({tmp_path / 'var'}), not on a disk of its own "
                                "(backup.require_mount); nothing is written there: mount the disk (and check "
                                "/etc/fstab), or set backup.require_mount = false to keep the copies on the data's disk")
        ok, doc = health.snapshot()
        assert ok and doc["status"] == "warning" and doc["components"]["backup"]["severity"] == "warning"
        assert _metric(metrics.render(), 'gatewayd_backups_total{result="not_mounted"}') == 1

        plug()  # the stick comes up: the next attempt goes to it
        path = await backups.take()
        assert path is not None and list_backups(usb / "backups") == [path]
        assert os.stat(path).st_dev != os.stat(storage.path).st_dev
        assert backups.state().state == "ok" and health.snapshot()[1]["status"] == "ok"
        text = metrics.render()
        assert _metric(text, 'gatewayd_backups_total{result="ok"}') == 1
        assert _metric(text, 'gatewayd_backups_total{result="not_mounted"}') == 1
    finally:
        storage.close()


async def test_the_gateway_names_it_at_start_in_health_and_metrics(gateway_factory, tmp_path, usb):
    settings = ["backup.interval_s=3600", f"backup.dir='{usb / 'backups'}'", "backup.require_mount=true"]
    async with gateway_factory(settings=settings) as gw:
        async with gw_client(gw) as client:
            r = await client.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "warning"
            backup = r.json()["components"]["backup"]
            assert backup["state"] == "not_mounted" and "is not mounted" in backup["reason"]
            assert await gw.backups.take() is None
            metrics = (await client.get("/metrics")).text
    assert _metric(metrics, 'gatewayd_backups_total{result="not_mounted"}') == 1
    assert list(usb.iterdir()) == []


def test_the_copy_before_a_migration_is_refused_too(tmp_path, usb, plug):
    storage = Storage(tmp_path / "var" / "gatewayd.sqlite3")
    storage.open()
    try:
        storage.migration_backup_dir = usb / "backups"
        storage.migration_backup_apart_from = tmp_path / "var"
        with pytest.raises(MigrationError, match=r"the copy of the database before migrating failed \(backup.dir: "
                                                 r".* is not mounted.*\): nothing was migrated"):
            storage._backup_before_migrating(SimpleNamespace(component="core", version=9))  # type: ignore[arg-type]
        assert list(usb.iterdir()) == []
        plug()
        storage._backup_before_migrating(SimpleNamespace(component="core", version=9))  # type: ignore[arg-type]
        assert storage.pre_migration_backup is not None and storage.pre_migration_backup.parent == usb / "backups"
    finally:
        storage.close()


def test_doctor_fails_a_backup_dir_not_mounted(tmp_path, capsys, usb, plug):
    (tmp_path / "var").mkdir()
    argv = ["doctor", "--json", "--no-network", "--set", f"gateway.data_dir='{tmp_path / 'var'}'",
            "--set", f"http.listen='127.0.0.1:{reserved_port()}'", "--set", f"mqtt.listen='127.0.0.1:{reserved_port()}'",
            "--set", f"backup.dir='{usb / 'backups'}'", "--set", "backup.require_mount=true"]
    code = main(argv)
    check = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "backup dir")
    assert code == 1 and check["status"] == "fail" and check["message"].startswith(
        f"backup.dir: {usb / 'backups'} is not mounted: {usb} is on the same filesystem as gateway.data_dir")
    plug()
    main(argv)
    check = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "backup dir")
    assert check["status"] == "ok", check
