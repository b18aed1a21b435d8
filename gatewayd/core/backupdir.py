"""Where backups go (`backup.dir`): a folder that can hold a copy of the database.

Used by the daemon's backups (backup.py), the copy before a schema migration
(storage.py) and `gatewayd doctor`, so the three say the same thing in the same words.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from .logs import get_logger

__all__ = ["PRE_UPGRADE_NAME", "BackupDirError", "MOUNT_ROOTS", "list_pre_upgrade", "prune_pre_upgrade", "NotMountedError", "SAME_DISK_RESERVE", "SPACE_MARGIN", "mount_problem",
           "mount_required", "prepare_dir", "space_needed", "space_problem"]

#: Room left free beside a copy: a filesystem is never filled to its last byte.
SPACE_MARGIN = 16 << 20
#: ... and, when the copies share the database's filesystem, the database's own room
#: to grow (the doctor's minimum free space): a backup never takes the outbox's disk.
SAME_DISK_RESERVE = 100 << 20


log = get_logger("gatewayd.backup")

#: The copies taken before a schema migration (storage.py), pruned by `backup.keep_pre_upgrade`.
PRE_UPGRADE_NAME = re.compile(r"gatewayd-pre-upgrade-\d{8}T\d{6}Z\.sqlite3")

#: Where removable disks are mounted: a `backup.dir` under one of these must be on
#: another filesystem than `gateway.data_dir` (`backup.require_mount` unset).
MOUNT_ROOTS = (Path("/media"), Path("/mnt"), Path("/run/media"))


class BackupDirError(Exception):
    """`backup.dir` cannot hold copies; the message names the key and the path."""


class NotMountedError(BackupDirError):
    """`backup.dir` must be another disk, and that disk is not mounted."""


def mount_required(path: Path, setting: bool | None, data_dir: Path | None = None) -> bool:
    """`backup.require_mount`, or when unset: is `path`, or where it leads (a link to
    /mnt/usb), under /media, /mnt or /run/media, and not inside `data_dir` (the default
    `<data_dir>/backups` is on the data's disk by choice, wherever that disk is mounted)?"""
    if setting is not None:
        return setting
    try:
        inside = data_dir is not None and path.resolve().is_relative_to(data_dir.resolve())
    except (OSError, RuntimeError):  # (a loop of links: prepare_dir names it)
        inside = False
    return not inside and any(_under(path, root) for root in MOUNT_ROOTS)


def _nearest(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_problem(path: Path, data_dir: Path) -> str | None:
    """Why `path` is not another disk than `data_dir`'s: both (or their nearest existing
    folders) on one filesystem (`st_dev`), e.g. a USB stick not mounted: its mount point
    is an empty folder of the SD card. None when they differ."""
    here, data = _nearest(path), _nearest(data_dir)
    # Under /run/media a disk's mount point goes when it is unmounted (udisks): the nearest
    # folder left is on /run's tmpfs, another filesystem than the data's, but no disk. A
    # disk under a mount root is on another filesystem than the folder holding that root.
    holder = next((_nearest(root.parent) for root in MOUNT_ROOTS if _under(path, root)), None)
    try:
        same = os.stat(here).st_dev == os.stat(data).st_dev
        other = holder if holder is not None and os.stat(here).st_dev == os.stat(holder).st_dev else None
    except OSError:
        return None  # (a folder that cannot be looked at is named by prepare_dir)
    if not same and other is None:
        return None
    where = f"the same filesystem as gateway.data_dir ({data_dir})" if same else f"the filesystem of {other}"
    return (f"backup.dir: {path} is not mounted: {here} is on {where}, "
            "not on a disk of its own (backup.require_mount); nothing is written there: mount the disk (and check "
            "/etc/fstab), or set backup.require_mount = false to keep the copies on the data's disk")


def _under(path: Path, root: Path) -> bool:
    """`path`, or where it leads, is under `root`."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        resolved = path
    return path.is_relative_to(root) or resolved.is_relative_to(root)


def prepare_dir(path: Path, *, apart_from: Path | None = None) -> None:
    """Make `path` (0700) if missing. Raises BackupDirError naming `backup.dir`.
    `apart_from` (`gateway.data_dir`, with `backup.require_mount`): first check that
    `path` is on another filesystem (NotMountedError): nothing is made on the wrong disk."""
    if apart_from is not None and (problem := mount_problem(path, apart_from)):
        raise NotMountedError(problem)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise BackupDirError(f"backup.dir: {path} is a file, not a folder: point backup.dir at a folder "
                             "(or move the file away)") from None
    except NotADirectoryError:
        in_way = next((p for p in path.parents if p.exists() and not p.is_dir()), path)
        raise BackupDirError(f"backup.dir: {path} cannot be made: {in_way} is a file, not a folder") from None
    except OSError as e:
        raise BackupDirError(f"backup.dir: cannot make {path}: {e.strerror}") from None
    if not path.is_dir():
        raise BackupDirError(f"backup.dir: {path} is not a folder")
    probe = path / f".gatewayd-probe-{os.getpid()}"
    try:  # a real write: access() does not see every read-only mount
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        probe.unlink()
    except OSError as e:
        if e.errno == errno.EROFS:
            raise BackupDirError(f"backup.dir: {path} is on a read-only filesystem for this process (under the "
                                 "service unit's ProtectSystem=strict, add it to ReadWritePaths: sudo systemctl "
                                 "edit gatewayd)") from None
        raise BackupDirError(f"backup.dir: {path} is not writable by this user (uid {os.geteuid()}): "
                             f"{e.strerror}") from None


def space_needed(database: Path, directory: Path) -> int:
    """Free bytes `directory` needs for a copy of `database` (its file and WAL: the
    copy holds both), with a margin, and the database's own reserve on a shared disk."""
    size = sum(p.stat().st_size for p in (database, database.with_name(database.name + "-wal")) if p.exists())
    need = size + size // 10 + SPACE_MARGIN
    try:
        if database.exists() and os.stat(directory).st_dev == os.stat(database).st_dev:
            need += SAME_DISK_RESERVE
    except OSError:
        pass
    return need


def list_pre_upgrade(directory: Path) -> list[Path]:
    """The copies taken before migrations in `directory`, oldest first."""
    try:
        return sorted(p for p in directory.iterdir() if PRE_UPGRADE_NAME.fullmatch(p.name))
    except OSError:
        return []


def prune_pre_upgrade(directory: Path, keep: int, new: Path | None = None) -> list[Path]:
    """Delete the copies taken before migrations beyond the newest `keep` (`new`, the one
    just taken and checked, is kept whatever its name: a clock set back names it older)."""
    copies = [p for p in list_pre_upgrade(directory) if p != new]
    removed = []
    for old in copies[: max(0, len(copies) - (keep - (new is not None)))]:
        try:
            old.unlink()
            removed.append(old)
            log.info("deleted a copy taken before an older upgrade (backup.keep_pre_upgrade)", path=str(old))
        except OSError as e:
            log.warning("cannot delete a copy taken before an upgrade", path=str(old), error=str(e))
    return removed


def _held(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def space_problem(database: Path, directory: Path, *, freed: int | None = None) -> str | None:
    """Why a copy of `database` does not fit in `directory` now, or None.

    `freed` (the daemon's own copies: the bytes its rotation deletes once this copy
    passed): the copy must also leave room for the one the next upgrade takes before
    migrating, which a start cannot do without (it refuses to migrate). So a copy that
    no rotation pays back (while fewer than `keep` exist) needs room for two."""
    need, free = space_needed(database, directory), shutil.disk_usage(directory).free
    pre = list_pre_upgrade(directory)
    held = (f"; the {len(pre)} copies taken before upgrades hold {_held(pre) >> 20} MiB "
            "(backup.keep_pre_upgrade)") if pre else ""
    if free < need:
        return (f"not enough free space in {directory} (backup.dir): {free >> 20} MiB free, a copy of the database "
                f"needs {need >> 20} MiB (its size, 10% and a margin){held}; free space, lower backup.keep, or point "
                "backup.dir at a larger disk")
    copy = _held([database, database.with_name(database.name + "-wal")])
    if freed is not None and free - copy + freed < need:
        return (f"not enough free space in {directory} (backup.dir) for this copy and the one the next upgrade "
                f"takes before migrating: {free >> 20} MiB free, {(need + copy - freed) >> 20} MiB needed{held}; "
                "free space, lower backup.keep or backup.keep_pre_upgrade, or point backup.dir at a larger disk")
    return None
