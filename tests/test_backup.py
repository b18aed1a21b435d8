"""The daemon's own backups ([backup]): taken on schedule from a real database, each a
checked, consistent copy, the oldest beyond `keep` deleted, reported in /health and
/metrics; a failure is reported and keeps the previous copies."""

from __future__ import annotations

import sqlite3

import pytest
import trio
import trio.testing

from gatewayd.core.backup import BackupSection, Backups, list_backups
from gatewayd.core.config import load_config
from gatewayd.core.health import Health
from gatewayd.core.metrics import Metrics
from gatewayd.core.schema import ConfigErrors
from gatewayd.core.storage import BACKUP_MARKER, Storage
from gatewayd.testing import gw_client


def _metric(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])


async def _until(condition) -> None:
    with trio.fail_after(30):  # a mock clock only moves when told: a deadline in its time
        while not condition():
            await trio.lowlevel.checkpoint()  # the copy runs on a thread; its end wakes us


async def test_backups_on_schedule_checked_and_pruned(tmp_path, mock_clock):
    storage = Storage(tmp_path / "var" / "gatewayd.sqlite3")
    storage.open()
    try:
        storage.database.execute_sql("CREATE TABLE t (x INTEGER)")
        health, metrics = Health(), Metrics()
        backups = Backups(BackupSection(interval_s=3600, keep=2), storage.path, tmp_path / "bk",
                          data_dir=tmp_path / "var", master_key_env="", health=health, metrics=metrics,
                          clock=lambda: 1_700_000_000 + trio.current_time())
        async with trio.open_nursery() as nursery:
            await nursery.start(backups.run)
            for i in range(3):
                storage.database.execute_sql("INSERT INTO t VALUES (?)", (i,))
                mock_clock.jump(299)
                await trio.testing.wait_all_tasks_blocked()
                assert backups.taken == i  # not due yet
                mock_clock.jump(1 if i == 0 else 3301)  # the first one 300 s after start, then hourly
                await _until(lambda: backups.taken == i + 1)
            nursery.cancel_scope.cancel()
        assert backups.taken == 3 and backups.failed == 0
        copies = list_backups(tmp_path / "bk")
        assert len(copies) == 2  # keep = 2: the oldest went
        newest = sqlite3.connect(copies[-1])
        assert newest.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert newest.execute("SELECT count(*) FROM t").fetchone()[0] == 3  # what was there when it was taken
        assert newest.execute(f"SELECT count(*) FROM {BACKUP_MARKER}").fetchone()[0] == 1
        newest.close()
        assert (tmp_path / "bk").stat().st_mode & 0o777 == 0o700
        assert copies[-1].stat().st_mode & 0o777 == 0o600
        ok, doc = health.snapshot()
        assert ok and doc["components"]["backup"]["state"] == "ok"
        assert doc["components"]["backup"]["last_good"] == str(copies[-1])
        assert doc["components"]["backup"]["master_key"] == "missing"
        text = metrics.render()
        assert _metric(text, 'gatewayd_backups_total{result="ok"}') == 3
    finally:
        storage.close()


async def test_a_stale_backup_is_reported(tmp_path):
    storage = Storage(tmp_path / "gatewayd.sqlite3")
    storage.open()
    try:
        now = [1_700_000_000.0]
        health = Health()
        backups = Backups(BackupSection(interval_s=3600, keep=2), storage.path, tmp_path / "bk",
                          data_dir=tmp_path, master_key_env="", health=health, metrics=Metrics(),
                          clock=lambda: now[0])
        assert await backups.take() is not None
        now[0] += 3 * 3600
        state = backups.state()
        assert state.state == "stale" and "3.0 h old" in state.reason
    finally:
        storage.close()


async def test_gateway_reports_a_backup_and_a_failure_in_health_and_metrics(gateway_factory, tmp_path):
    async with gateway_factory(settings=["backup.interval_s=3600", f"backup.dir='{tmp_path / 'bk'}'"]) as gw:
        path = await gw.backups.take()
        assert path is not None and path.parent == tmp_path / "bk"
        async with gw_client(gw) as client:
            r = await client.get("/health")
            assert r.status_code == 200
            backup = r.json()["components"]["backup"]
            assert backup["state"] == "ok" and backup["last_good"] == str(path) and backup["age_s"] < 60
            metrics = (await client.get("/metrics")).text
            assert 0 <= _metric(metrics, "gatewayd_backup_age_seconds") < 60
            assert _metric(metrics, 'gatewayd_backups_total{result="ok"}') == 1
            # The destination becomes unusable (a file where the folder was): reported as a
            # warning (200: the gateway still does its job), naming the key and the path.
            (tmp_path / "bk2").write_text("not a folder")
            gw.backups.directory = tmp_path / "bk2"
            assert await gw.backups.take() is None
            r = await client.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "warning"
            backup = r.json()["components"]["backup"]
            assert backup["state"] == "failed" and backup["severity"] == "warning"
            assert backup["reason"] == (f"the last backup failed: backup.dir: {tmp_path / 'bk2'} is a file, not a "
                                        "folder: point backup.dir at a folder (or move the file away)")
            assert backup["last_good"] == str(path)  # the good one is still named
            metrics = (await client.get("/metrics")).text
            assert _metric(metrics, 'gatewayd_backups_total{result="failed"}') == 1
        assert list_backups(tmp_path / "bk") == [path]


async def test_backups_off(gateway_factory):
    async with gateway_factory(settings=["backup.interval_s=0"]) as gw:
        async with gw_client(gw) as client:
            assert "backup" not in (await client.get("/health")).json()["components"]


@pytest.mark.parametrize("setting, message", [
    ("backup.interval_s=5", "backup.interval_s: must be 0 (off) or 60 .. 2592000 seconds, got 5.0"),
    ("backup.keep=0", "backup.keep: must be 1 .. 1000, got 0"),
    ("backup.every=1", "backup.every: unknown key"),
    ("backup.dir=3", "backup.dir: expected a string, got 3 (integer)"),
])
def test_backup_config_names_the_key(setting, message):
    with pytest.raises(ConfigErrors) as e:
        load_config(None, [setting])
    assert message in str(e.value)
