"""Where backups go (`backup.dir`): a folder that can hold a copy of the database.

Used by the daemon's backups (backup.py), the copy before a schema migration
(storage.py) and `gatewayd doctor`, so the three say the same thing in the same words.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = ["BackupDirError", "SAME_DISK_RESERVE", "SPACE_MARGIN", "prepare_dir", "space_needed", "space_problem"]

#: Room left free beside a copy: a filesystem is never filled to its last byte.
SPACE_MARGIN = 16 << 20
#: ... and, when the copies share the database's filesystem, the database's own room
#: to grow (the doctor's minimum free space): a backup never takes the outbox's disk.
SAME_DISK_RESERVE = 100 << 20


class BackupDirError(Exception):
    """`backup.dir` cannot hold copies; the message names the key and the path."""


def prepare_dir(path: Path) -> None:
    """Make `path` (0700) if missing. Raises BackupDirError naming `backup.dir`."""
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


def space_problem(database: Path, directory: Path) -> str | None:
    """Why a copy of `database` does not fit in `directory` now, or None."""
    need, free = space_needed(database, directory), shutil.disk_usage(directory).free
    if free >= need:
        return None
    return (f"not enough free space in {directory} (backup.dir): {free >> 20} MiB free, a copy of the database "
            f"needs {need >> 20} MiB (its size, 10% and a margin); free space, lower backup.keep, or point "
            "backup.dir at a larger disk")
