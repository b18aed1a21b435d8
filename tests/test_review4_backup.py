"""Review 4: `backup.require_mount` unset is automatic for a `backup.dir` under /media, /mnt
or /run/media. A backup.dir given as a link to such a place (`/var/backups/gatewayd ->
/mnt/usb`) was judged by the link's own path: no check, and with the stick not mounted
the copies filled its mount point folder, on the data's disk. And the other way round: a
gateway.data_dir under /mnt (the data moved to an SSD at /mnt/ssd) with the default
backup.dir (<data_dir>/backups, on the data's disk by definition) had every copy refused."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from gatewayd.core.backup import BackupSection, Backups, backup_dir
from gatewayd.core.backupdir import mount_required
from gatewayd.core.health import Health
from gatewayd.core.metrics import Metrics
from gatewayd.core.storage import Storage


def test_a_backup_dir_linked_to_a_mount_point_must_be_mounted(tmp_path):
    link = tmp_path / "backups"
    os.symlink("/mnt/review4-usb", link)  # (the link only: nothing is made under /mnt)
    assert not mount_required(tmp_path / "elsewhere", None)
    assert mount_required(link, None)
    assert mount_required(link / "gatewayd", None)
    assert not mount_required(link, False)  # said in the file: it wins


@pytest.fixture
def data_under_mount_root():
    """gateway.data_dir under /media or /mnt (an SSD mounted at /mnt/ssd, the data moved onto
    it): here a folder of /media on this machine's disk, removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix="review4-ssd-", dir="/media"))
    try:
        yield top / "gatewayd"
    finally:
        shutil.rmtree(top, ignore_errors=True)


async def test_default_backups_of_a_data_dir_under_a_mount_root_are_taken(data_under_mount_root):
    storage = Storage(data_under_mount_root / "gatewayd.sqlite3")
    storage.open()
    try:
        storage.database.execute_sql("CREATE TABLE t (x INTEGER)")
        section = BackupSection(interval_s=3600)  # the shipped defaults: dir "", require_mount unset
        backups = Backups(section, storage.path, backup_dir(section, data_under_mount_root, None), data_dir=data_under_mount_root,
                          master_key_env="", health=Health(), metrics=Metrics())
        path = await backups.take()
        assert path is not None, backups.last_error
        assert path.parent == data_under_mount_root / "backups"
    finally:
        storage.close()


@pytest.fixture
def run_tmpfs():
    """A folder of a tmpfs other than the data's disk, as /run is: /dev/shm's."""
    top = Path(tempfile.mkdtemp(prefix="review4-run-", dir="/dev/shm"))
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


async def test_a_stick_whose_mount_point_went_with_it_is_not_mounted(tmp_path, run_tmpfs, monkeypatch):
    """udisks makes /run/media/<user>/<label> when it mounts a stick and removes it when it
    unmounts: with the stick gone, the nearest existing folder is /run/media/<user>, on /run's
    tmpfs. Another filesystem than the data's, but no disk: a copy there lives in memory
    and is gone at the next boot."""
    from gatewayd.core import backupdir

    media = run_tmpfs / "media"  # stands for /run/media
    (media / "pi").mkdir(parents=True)
    monkeypatch.setattr(backupdir, "MOUNT_ROOTS", (media,))
    data_dir = tmp_path / "var"
    storage = Storage(data_dir / "gatewayd.sqlite3")
    storage.open()
    try:
        storage.database.execute_sql("CREATE TABLE t (x INTEGER)")
        directory = media / "pi" / "STICK" / "backups"
        backups = Backups(BackupSection(interval_s=3600), storage.path, directory, data_dir=data_dir,
                          master_key_env="", health=Health(), metrics=Metrics())
        assert backups.apart_from == data_dir  # automatic: under the mount root
        assert await backups.take() is None
        assert list((media / "pi").iterdir()) == []  # nothing made where the stick's mount point was
        assert backups.not_mounted == 1
    finally:
        storage.close()
