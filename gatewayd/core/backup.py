"""Backups the daemon takes itself (`[backup]`), each one checked, and reported.

Every `backup.interval_s` the running gateway copies its database with SQLite's online
backup API (`storage.backup_database`: one consistent snapshot while writes go on, the
copy marked as a backup and checked with `PRAGMA integrity_check`; a copy that fails the
check is deleted, never kept as a backup) into `backup.dir`, then deletes the oldest of
its own copies beyond `backup.keep`. Only files it names itself
(`gatewayd-<UTC time>.sqlite3`) are ever deleted, and the copies taken before
migrations beyond `backup.keep_pre_upgrade` (`gatewayd-pre-upgrade-<UTC time>.sqlite3`,
pruned by backupdir.prune_pre_upgrade after each such copy and at each backup). A copy
must leave room for the one the next upgrade takes (backupdir.space_problem).

/health's `backup` component and /metrics say when the last good one was taken; a
failed attempt turns the component `failed`, a last good one older than two intervals
`stale`. Each report also says where the master key is: a backup holds device secrets
encrypted with it, so a backup without the master key kept elsewhere restores devices
that can no longer authenticate. Restore stays the documented command
(docs/site-box.md#backups).
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .health import ComponentState, Health
from .logs import get_logger
from .metrics import Metrics, Sample
from .schema import ConfigError, ConfigErrors
from .backupdir import (BackupDirError, NotMountedError, mount_required, prepare_dir, prune_pre_upgrade, space_needed,
                        space_problem)
from .storage import StorageError, backup_database

__all__ = ["BackupSection", "Backups", "BackupDirError", "BACKUP_NAME", "master_key_location", "prepare_dir",
           "space_needed"]

log = get_logger("gatewayd.backup")

#: The names of the copies the daemon takes (and the only files it deletes).
BACKUP_NAME = re.compile(r"gatewayd-\d{8}T\d{6}Z\.sqlite3")
#: What a copy is called while it is written (the daemon's and the pre-upgrade one's),
#: and SQLite's journal beside it.
PARTIAL_NAME = re.compile(r"gatewayd-(pre-upgrade-)?\d{8}T\d{6}Z\.sqlite3\.partial(-journal)?")


@dataclass
class BackupSection:
    """`[backup]`: the daemon's own backups."""

    #: Seconds between backups; 0 turns them off.
    interval_s: float = 86400.0
    #: How many of its copies to keep (the oldest beyond this are deleted). 3: three
    #: days of daily copies; with the copy being taken, four database sizes at the peak
    #: (7 were eight: 8 GiB of a 16 GB SD card for a 1 GiB database).
    keep: int = 3
    #: Where they go; "" = `<data_dir>/backups`. Another disk (a USB stick, a NAS mount)
    #: survives the SD card.
    dir: str = ""
    #: Refuse to write when `dir` is on the same filesystem as `gateway.data_dir` (a USB
    #: stick that is not mounted: its mount point is a folder of the SD card). Unset:
    #: true when `dir` is under /media, /mnt or /run/media.
    require_mount: bool | None = None
    #: How many of the copies taken before schema migrations to keep
    #: (`gatewayd-pre-upgrade-<UTC time>.sqlite3`, the newest, the one just taken among
    #: them): 2, the way back from this upgrade and the one before.
    keep_pre_upgrade: int = 2

    def validate(self) -> None:
        errors = []
        if self.interval_s != 0 and not 60 <= self.interval_s <= 30 * 86400:
            errors.append(ConfigError("interval_s", f"must be 0 (off) or 60 .. 2592000 seconds, got {self.interval_s}"))
        if not 1 <= self.keep <= 1000:
            errors.append(ConfigError("keep", f"must be 1 .. 1000, got {self.keep}"))
        if not 1 <= self.keep_pre_upgrade <= 100:
            errors.append(ConfigError("keep_pre_upgrade", f"must be 1 .. 100, got {self.keep_pre_upgrade} (the copy "
                                                          "taken before a migration is the way back from it)"))
        if errors:
            raise ConfigErrors(errors)


def master_key_location(data_dir: Path, env_name: str) -> str:
    """Where the master key is: "env NAME", "file PATH", or "missing"."""
    if env_name and os.environ.get(env_name):
        return f"env {env_name}"
    path = data_dir / "master.key"
    return f"file {path}" if path.is_file() else "missing"


def backup_dir(section: BackupSection, data_dir: Path, config_dir: Path | None) -> Path:
    if not section.dir:
        return data_dir / "backups"
    path = Path(section.dir)
    return path if path.is_absolute() else (config_dir or Path.cwd()) / path


def list_backups(directory: Path) -> list[Path]:
    """The daemon's copies in `directory`, oldest first."""
    try:
        return sorted(p for p in directory.iterdir() if BACKUP_NAME.fullmatch(p.name))
    except OSError:
        return []


class Backups:
    """Takes a backup every `interval_s`; its state for /health and /metrics."""

    def __init__(self, section: BackupSection, database: Path, directory: Path, *, data_dir: Path,
                 master_key_env: str, health: Health, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.section = section
        self.database = database
        self.directory = directory
        self.data_dir = data_dir
        self.master_key_env = master_key_env
        self.clock = clock
        self.last_good_at: float | None = None
        self.last_good: Path | None = None
        self.last_error: str | None = None
        self.taken = 0
        self.failed = 0
        self.no_space = 0
        self.not_mounted = 0
        #: With backup.require_mount: `gateway.data_dir`, the filesystem `directory` must not be on.
        self.apart_from: Path | None = data_dir if mount_required(directory, section.require_mount, data_dir) else None
        self._last_not_mounted = False
        if section.interval_s:
            health.probe("backup", self.state)
        self._register(metrics)

    @classmethod
    def from_config(cls, config: Any, database: Path, health: Health, metrics: Metrics,
                    clock: Callable[[], float] = time.time) -> Backups:
        directory = backup_dir(config.backup, config.data_dir, config.source.parent if config.source else None)
        return cls(config.backup, database, directory, data_dir=config.data_dir,
                   master_key_env=config.auth.master_key_env, health=health, metrics=metrics, clock=clock)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forever: wait until the next backup is due, take it. Off when interval_s is 0."""
        interval = self.section.interval_s
        existing = list_backups(self.directory)
        if existing:  # taken (and checked) by an earlier run: the schedule goes on from it
            self.last_good, self.last_good_at = existing[-1], existing[-1].stat().st_mtime
            if self.last_good_at > self.clock():  # taken while the clock was ahead (a box without RTC):
                self.last_good_at = None  # not a schedule a year away; the first one soon
        if interval:  # a folder that cannot hold copies is said at start, not at the first backup
            try:
                await trio.to_thread.run_sync(self._prepare)
                await trio.to_thread.run_sync(self._remove_partial)
            except BackupDirError as e:
                self.last_error, self._last_not_mounted = str(e), isinstance(e, NotMountedError)
                log.error("backups cannot be taken", dir=str(self.directory), error=str(e))
        task_status.started()
        if not interval:
            return
        while True:
            due = (self.last_good_at + interval) if self.last_good_at is not None else self.clock() + min(interval, 300)
            # A failed attempt is tried again sooner than a whole interval later.
            if self.last_error is not None:
                due = min(due, self.clock() + min(interval, 600))
            await trio.sleep(max(0.0, due - self.clock()))
            await self.take()

    async def take(self) -> Path | None:
        """One backup now, checked, then the oldest copies beyond `keep` deleted."""
        started = self.clock()
        self._last_not_mounted = False
        try:
            await trio.to_thread.run_sync(self._prepare)
            # Checked before each copy: a copy that fills the disk would fail half-written
            # (and take the database's own room with it on a shared disk).
            freed = await trio.to_thread.run_sync(self._freed_by_prune)
            if problem := await trio.to_thread.run_sync(
                    functools.partial(space_problem, self.database, self.directory, freed=freed)):
                self.no_space += 1
                self.last_error = problem
                log.error("backup refused", dir=str(self.directory), error=problem)
                return None
            # Named by this gateway's clock (so also under a test's clock), to the second.
            name = time.strftime("gatewayd-%Y%m%dT%H%M%SZ.sqlite3", time.gmtime(started))
            path = await trio.to_thread.run_sync(backup_database, self.database, self.directory / name)
        except NotMountedError as e:
            self.not_mounted += 1
            self.last_error, self._last_not_mounted = str(e), True
            log.error("backup refused", dir=str(self.directory), error=str(e))
            return None
        except (StorageError, OSError, BackupDirError) as e:
            self.failed += 1
            self.last_error = str(e)
            log.error("backup failed", dir=str(self.directory), error=str(e))
            return None
        self.taken += 1
        self.last_error = None
        self.last_good, self.last_good_at = path, self.clock()
        removed = await trio.to_thread.run_sync(self._prune, path)
        log.info("backup taken", path=str(path), bytes=path.stat().st_size, integrity_check="ok",
                 seconds=round(self.clock() - started, 2), removed=removed,
                 master_key=master_key_location(self.data_dir, self.master_key_env),
                 reminder="the master key is not in the backup: keep a copy of it off this box")
        return path

    def _prepare(self) -> None:
        prepare_dir(self.directory, apart_from=self.apart_from)
        # (A lowered backup.keep_pre_upgrade applies at once, not at the next upgrade.)
        prune_pre_upgrade(self.directory, self.section.keep_pre_upgrade)

    def _freed_by_prune(self) -> int:
        """The bytes `_prune` deletes once the next copy passed (the oldest beyond keep)."""
        copies = list_backups(self.directory)
        total = 0
        for old in copies[: max(0, len(copies) - (self.section.keep - 1))]:
            try:
                total += old.stat().st_size
            except OSError:
                pass
        return total

    def _remove_partial(self) -> None:
        """Copies an earlier run left half-written (killed mid-copy: a stop during a long
        copy ends in SIGKILL after the unit's TimeoutStopSec), each as big as the database."""
        for p in self.directory.iterdir():
            if PARTIAL_NAME.fullmatch(p.name):
                try:
                    p.unlink()
                    log.warning("removed a backup copy left unfinished by an earlier run", path=str(p))
                except OSError as e:
                    log.warning("cannot delete an unfinished backup copy", path=str(p), error=str(e))

    def _prune(self, new: Path) -> int:
        # The copy just taken and checked is kept whatever its name: a clock set back
        # (a box without RTC) names it older than copies taken while the clock was ahead.
        copies = [p for p in list_backups(self.directory) if p != new]
        removed = 0
        for old in copies[: max(0, len(copies) - (self.section.keep - 1))]:
            try:
                old.unlink()
                removed += 1
            except OSError as e:
                log.warning("cannot delete an old backup", path=str(old), error=str(e))
        return removed

    # -- /health and /metrics ----------------------------------------------------------

    def state(self) -> ComponentState:
        details: dict[str, Any] = {
            "dir": str(self.directory), "keep": self.section.keep,
            "master_key": master_key_location(self.data_dir, self.master_key_env),
        }
        if self.last_good_at is not None:
            details["last_good_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_good_at))
            details["age_s"] = round(self.clock() - self.last_good_at, 1)
            details["last_good"] = str(self.last_good)
        # Warnings (200): without a fresh backup the gateway still takes, stores and
        # forwards device data; a load balancer must not take it out of service for it.
        if self.last_error is not None and self._last_not_mounted:
            return ComponentState("not_mounted", self.last_error, details, critical=False)
        if self.last_error is not None:
            return ComponentState("failed", f"the last backup failed: {self.last_error}", details, critical=False)
        if self.last_good_at is not None and self.clock() - self.last_good_at > 2 * self.section.interval_s:
            return ComponentState("stale", f"the last good backup is {details['age_s'] / 3600:.1f} h old", details,
                                  critical=False)
        return ComponentState("ok", None, details)

    def _register(self, metrics: Metrics) -> None:
        metrics.collector(
            "gatewayd_backup_last_success_timestamp_seconds", "gauge",
            "When the last backup that passed its integrity check was taken (Unix time)",
            lambda: [Sample("gatewayd_backup_last_success_timestamp_seconds", {}, self.last_good_at)]
            if self.last_good_at is not None else [])
        metrics.collector(
            "gatewayd_backup_age_seconds", "gauge", "Age of the last good backup",
            lambda: [Sample("gatewayd_backup_age_seconds", {}, self.clock() - self.last_good_at)]
            if self.last_good_at is not None else [])
        metrics.collector(
            "gatewayd_backups_total", "counter", "Backups the daemon attempted, by result", lambda: [
                Sample("gatewayd_backups_total", {"result": "ok"}, self.taken),
                Sample("gatewayd_backups_total", {"result": "failed"}, self.failed),
                Sample("gatewayd_backups_total", {"result": "no_space"}, self.no_space),
                Sample("gatewayd_backups_total", {"result": "not_mounted"}, self.not_mounted)])

