"""Who may read the database: its files are 0600 (they hold password hashes, encrypted
secrets and all telemetry), the data dir 0700 when the gateway makes it, backups 0600,
and files left readable by others by an older gatewayd are tightened at start."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from gatewayd.core.storage import Storage, backup_database

REPO = Path(__file__).resolve().parents[1]
DB_FILES = ("gatewayd.sqlite3", "gatewayd.sqlite3-wal", "gatewayd.sqlite3-shm")


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(os.stat(path).st_mode))


@pytest.fixture(autouse=True)
def usual_umask():
    """The umask of most services (022): left to it, new files would be 0644."""
    old = os.umask(0o022)
    yield
    os.umask(old)


async def test_a_new_database_and_its_data_dir_are_private(gateway_factory, tmp_path):
    async with gateway_factory() as gw:
        await gw.storage.write(lambda: gw.storage.database.execute_sql("CREATE TABLE t (x)"))
        var = tmp_path / "var"
        assert mode(var) == "0o700"
        assert {name: mode(var / name) for name in DB_FILES} == dict.fromkeys(DB_FILES, "0o600")


async def test_files_left_readable_by_others_are_tightened_at_start_and_logged(tmp_path, caplog):
    var = tmp_path / "var"
    var.mkdir(mode=0o755)
    # An older gatewayd's files: 0644, the WAL and its index still there (a connection is open).
    other = sqlite3.connect(var / "gatewayd.sqlite3")
    other.execute("PRAGMA journal_mode=wal")
    other.execute("CREATE TABLE t (x)")
    other.execute("INSERT INTO t VALUES (1)")
    other.commit()
    assert {name: mode(var / name) for name in DB_FILES} == dict.fromkeys(DB_FILES, "0o644")
    storage = Storage(var / "gatewayd.sqlite3")
    with caplog.at_level(logging.WARNING, logger="gatewayd.storage"):
        async with trio.open_nursery() as nursery:
            await nursery.start(storage.run)
            assert {name: mode(var / name) for name in DB_FILES} == dict.fromkeys(DB_FILES, "0o600")
            nursery.cancel_scope.cancel()
    other.close()
    tightened = [r for r in caplog.records if "now 0600" in r.getMessage()]
    assert sorted(r.fields["file"] for r in tightened) == sorted(str(var / name) for name in DB_FILES)
    assert {r.fields["was"] for r in tightened} == {"0o644"}
    assert mode(var) == "0o755"  # the operator's own directory: not ours to change


async def test_backups_are_private_even_over_a_file_readable_by_others(tmp_path):
    storage = Storage(tmp_path / "var" / "gatewayd.sqlite3")
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        await storage.write(lambda: storage.database.execute_sql("CREATE TABLE t (x)"))
        (tmp_path / "old-backup.sqlite3").write_bytes(b"")
        assert mode(tmp_path / "old-backup.sqlite3") == "0o644"
        dest = await storage.backup(tmp_path / "old-backup.sqlite3")
        assert mode(dest) == "0o600"
        (tmp_path / "backups").mkdir()
        dest = await trio.to_thread.run_sync(backup_database, storage.path, tmp_path / "backups")
        assert mode(dest) == "0o600" and dest.parent == tmp_path / "backups"
        nursery.cancel_scope.cancel()
    done = subprocess.run([sys.executable, "-m", "gatewayd", "backup", str(tmp_path / "cli.sqlite3"),
                           "--set", f"gateway.data_dir='{tmp_path / 'var'}'"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert mode(tmp_path / "cli.sqlite3") == "0o600"
    # The command never writes over a file: it could be the master key or the live database.
    live = tmp_path / "var" / "gatewayd.sqlite3"
    before = live.stat().st_ino
    again = subprocess.run([sys.executable, "-m", "gatewayd", "backup", str(live),
                            "--set", f"gateway.data_dir='{tmp_path / 'var'}'"],
                           capture_output=True, text=True, timeout=60, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert again.returncode == 1 and "exists already" in again.stderr and live.stat().st_ino == before
