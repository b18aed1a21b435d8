"""The copies taken before schema migrations (`gatewayd-pre-upgrade-*.sqlite3`) are
pruned by their own rule, `backup.keep_pre_upgrade`, and counted where space is
checked: a daily copy leaves room for the one the next upgrade needs (without it, the
start after an upgrade refuses to migrate), and the doctor's peak counts them (review
of issue 21). The small disk is a real tmpfs."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from gatewayd.cli import main
from gatewayd.core.backup import BackupSection, Backups, list_backups
from gatewayd.core.backupdir import list_pre_upgrade
from gatewayd.core.config import load_config
from gatewayd.core.health import Health
from gatewayd.core.metrics import Metrics
from gatewayd.core.schema import ConfigErrors
from gatewayd.core.storage import Storage
from gatewayd.testing import reserved_port

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path):
    """A 64 MB tmpfs at tmp_path/disk, unmounted afterwards."""
    point = tmp_path / "disk"
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point)],
                          capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=10)


def _spec() -> SimpleNamespace:
    return SimpleNamespace(component="core", version=9)


def test_the_copies_before_migrations_keep_the_newest_two_and_nothing_else_is_touched(tmp_path):
    storage = Storage(tmp_path / "var" / "gatewayd.sqlite3")
    storage.open()
    try:
        bk = tmp_path / "var" / "backups"
        bk.mkdir(mode=0o700)
        old = [bk / f"gatewayd-pre-upgrade-2026010{i}T020000Z.sqlite3" for i in (1, 2, 3)]
        others = [bk / "gatewayd-20260104T020000Z.sqlite3", bk / "gatewayd-pre-upgrade-mine.sqlite3", bk / "notes.txt"]
        for p in old + others:
            p.write_bytes(b"x")
        storage.migration_backup_dir = bk
        storage.migration_backup_keep = 2  # as the runtime sets it from backup.keep_pre_upgrade
        storage._backup_before_migrating(_spec())  # type: ignore[arg-type]
        new = storage.pre_migration_backup
        assert new is not None
        assert list_pre_upgrade(bk) == [old[2], new]  # the newest older one and the one just taken
        assert all(p.exists() for p in others)  # only the names it makes are ever deleted
    finally:
        storage.close()


async def test_a_lowered_keep_applies_at_the_next_backup(tmp_path):
    storage = Storage(tmp_path / "var" / "gatewayd.sqlite3")
    storage.open()
    try:
        bk = tmp_path / "bk"
        bk.mkdir(mode=0o700)
        old = [bk / f"gatewayd-pre-upgrade-2026010{i}T020000Z.sqlite3" for i in (1, 2, 3)]
        for p in old:
            p.write_bytes(b"x")
        backups = Backups(BackupSection(interval_s=3600, keep_pre_upgrade=1), storage.path, bk,
                          data_dir=tmp_path / "var", master_key_env="", health=Health(), metrics=Metrics())
        assert await backups.take() is not None
        assert list_pre_upgrade(bk) == [old[2]]
    finally:
        storage.close()


def test_keep_pre_upgrade_is_checked():
    with pytest.raises(ConfigErrors) as e:
        load_config(None, ["backup.keep_pre_upgrade=0"])
    assert "backup.keep_pre_upgrade: must be 1 .. 100, got 0" in str(e.value)
    assert BackupSection().keep_pre_upgrade == 2


async def test_a_daily_copy_leaves_room_for_the_next_upgrades_copy(tmp_path, disk, capsys):
    data = tmp_path / "var"
    storage = Storage(data / "gatewayd.sqlite3")
    storage.open()
    try:
        storage.database.execute_sql("CREATE TABLE t (b BLOB)")
        storage.database.execute_sql("INSERT INTO t VALUES (zeroblob(12 * 1024 * 1024))")
        storage.database.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        # Two copies from earlier upgrades take 24 of the 64 MiB: 40 MiB free hold one copy
        # (12 MiB, 29 with the margin), not that copy and the next upgrade's.
        pre = [disk / f"gatewayd-pre-upgrade-2026010{i}T020000Z.sqlite3" for i in (1, 2)]
        for p in pre:
            p.write_bytes(bytes(12 * MiB))
        metrics = Metrics()
        backups = Backups(BackupSection(interval_s=3600, keep=3), storage.path, disk, data_dir=data,
                          master_key_env="", health=Health(), metrics=metrics)
        assert await backups.take() is None
        assert backups.no_space == 1 and list_backups(disk) == []
        assert backups.last_error is not None and backups.last_error.startswith(
            f"not enough free space in {disk} (backup.dir) for this copy and the one the next upgrade takes before "
            "migrating: ")
        assert "the 2 copies taken before upgrades hold 24 MiB (backup.keep_pre_upgrade)" in backups.last_error
        assert list_pre_upgrade(disk) == pre  # keep_pre_upgrade = 2: both kept

        # The doctor counts them too: keep 3 + 2 before upgrades + 1 = 6 copies of 12 MiB.
        argv = ["doctor", "--json", "--no-network", "--set", f"gateway.data_dir='{data}'",
                "--set", f"http.listen='127.0.0.1:{reserved_port()}'", "--set", f"mqtt.listen='127.0.0.1:{reserved_port()}'",
                "--set", f"backup.dir='{disk}'"]
        assert main(argv) == 0
        check = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "backup dir")
        assert check["status"] == "warn" and check["details"]["held_bytes"] == 24 * MiB
        assert "mean 6 copies of 12 MiB at the peak, 72 MiB; 64 MiB are there (free, and the 2 copies" in check["message"]

        # One copy from before upgrades kept: room for both; then, with keep = 1, the
        # copy the rotation deletes after the next one counts as room.
        backups.section.keep_pre_upgrade = 1
        first = await backups.take()
        assert first is not None and list_pre_upgrade(disk) == [pre[1]]
        (disk / "filler").write_bytes(bytes(12 * MiB))  # 28 MiB free: not even a copy with its margin
        backups.section.keep = 1
        assert await backups.take() is None and backups.no_space == 2
        (disk / "filler").unlink()
        (disk / "filler").write_bytes(bytes(4 * MiB))  # 36 MiB free, 24 after the copy, + the 12 the rotation frees
        second = await backups.take()
        assert second is not None and list_backups(disk) == [second]
        with sqlite3.connect(second) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        storage.close()
