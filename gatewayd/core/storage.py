"""peewee over SQLite (WAL): one writer thread with group commit, reader threads, schemas.

Every write goes through `await storage.write(fn, *args)`: `fn` runs on the writer
thread inside a transaction shared with whatever other writes were queued at the same
moment (each in its own savepoint, so one failing job does not undo the others), and the
call returns only after COMMIT. That is what lets a plugin acknowledge a device safely.

Reads run `fn` on a bounded pool of reader threads, each with its own connection; WAL
lets them proceed while the writer commits.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import peewee
import trio
from playhouse.migrate import SqliteMigrator

from .admission import step_aside, step_back
from .backupdir import BackupDirError, prepare_dir, prune_pre_upgrade, space_problem
from .health import ComponentState
from .logs import get_logger

__all__ = [
    "Storage",
    "StorageError",
    "StatementError",
    "StorageFull",
    "StorageUnavailable",
    "MigrationError",
    "UnusableDatabase",
    "unusable_from",
    "unusable_message",
    "SchemaSpec",
    "backup_database",
    "BACKUP_MARKER",
    "core_statements",
]

T = TypeVar("T")
log = get_logger("gatewayd.storage")
_STOP = object()


class StorageError(Exception):
    """A write could not be committed."""


class StatementError(StorageError):
    """SQLite refused the statement itself (no such table or column, a syntax error, a
    value it cannot hold): the storage is fine, and the same write fails the same way
    every time, so it is a bug of whoever wrote it, not a reason to wait and retry."""


class StorageFull(StorageError):
    """The disk (or the database's size limit) is full; nothing of the write was kept."""


class StorageUnavailable(StorageError):
    """The storage is closed or not yet open."""


class MigrationError(StorageError):
    """A schema migration failed; its component's tables are as they were before it."""


class UnusableDatabase(StorageError):
    """The database cannot be used as it is: not a SQLite database or corrupt, or a
    newer release's schema. Every start fails the same way until an operator acts."""


SQLITE_ERROR = 1  # the generic code: what SQLite gives a statement it cannot run
SQLITE_FULL = 13
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
SQLITE_TOOBIG = 18
SQLITE_MISMATCH = 20
SQLITE_RANGE = 25
#: Codes of a statement that fails whatever the state of the disk and the database.
#: (Busy, locked, read-only, I/O, full, cannot open, corrupt, schema changed: the others
#: can pass, and are retried.) Python's sqlite3 raises TOOBIG as DataError, MISMATCH as
#: IntegrityError and RANGE as InterfaceError, never as OperationalError: those are left
#: unchanged (a handler error); only SQLITE_ERROR reaches this set in practice.
_STATEMENT_CODES = frozenset({SQLITE_ERROR, SQLITE_TOOBIG, SQLITE_MISMATCH, SQLITE_RANGE})
#: An I/O error with less than this free on the database's filesystem is a full disk:
#: SQLite reports ENOSPC as SQLITE_FULL on plain writes, but as an I/O error where it
#: grows the WAL index (-shm) or syncs.
LOW_SPACE_BYTES = 1 << 20


def _sqlite_errors(exc: BaseException) -> list[sqlite3.Error]:
    """The sqlite3 errors in `exc`'s chain, first raised first.

    peewee re-raises each sqlite3 error as its own class (the original as context), and
    a failed COMMIT is followed by peewee's ROLLBACK, which fails in turn ("cannot
    rollback - no transaction is active") when SQLite already rolled back: the error
    that matters is the first, not the last.
    """
    found: list[sqlite3.Error] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.Error):
            found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found[::-1]


#: SQLITE_ERROR about the connection's transaction state: the writer's, not the statement's
#: fault, and it can pass (the writer ends a transaction left open after a failure).
_WRITER_STATE = ("cannot start a transaction within a transaction", "cannot commit - no transaction is active",
                 "cannot rollback - no transaction is active", "no such savepoint")


def _writer_state(message: str) -> bool:
    return message.startswith(_WRITER_STATE)


def _own_transaction_statement(exc: BaseException) -> bool:
    """SQLITE_ERROR about the transaction state, first in ``exc``'s chain."""
    errors = _sqlite_errors(exc)
    return bool(errors) and getattr(errors[0], "sqlite_errorcode", 0) & 0xFF == SQLITE_ERROR \
        and _writer_state(str(errors[0]))


def _low_on_space(path: Path | None) -> bool:
    if path is None:
        return False
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE_BYTES


def _classify(exc: BaseException, path: Path | None = None) -> BaseException:
    """StorageFull for a full disk or database, StatementError for a statement SQLite
    cannot run (no such table or column, a syntax error), StorageError for another
    SQLite failure (each with the message of the error that caused it), anything else
    unchanged (an IntegrityError of a constraint, a ProgrammingError of the bindings)."""
    if isinstance(exc, MemoryError):  # SQLITE_NOMEM comes as a bare MemoryError: it can pass
        return StorageError(f"out of memory{': ' + str(exc) if str(exc) else ''}")
    if not isinstance(exc, (peewee.OperationalError, sqlite3.OperationalError)):
        # A corrupt page or file comes as a plain DatabaseError: the storage, not the
        # statement (an IntegrityError, a ProgrammingError stay what they are).
        if isinstance(exc, (peewee.DatabaseError, sqlite3.DatabaseError)):
            errors = _sqlite_errors(exc)
            if errors and getattr(errors[0], "sqlite_errorcode", 0) & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB):
                return StorageError(str(errors[0]))
        return exc
    errors = _sqlite_errors(exc)
    codes = [getattr(e, "sqlite_errorcode", 0) & 0xFF for e in errors]
    if codes and codes[0] in _STATEMENT_CODES and not _writer_state(str(errors[0])):
        return StatementError(str(errors[0]))
    if SQLITE_FULL in codes:
        return StorageFull(str(errors[codes.index(SQLITE_FULL)]))
    if SQLITE_IOERR in codes:
        error = errors[codes.index(SQLITE_IOERR)]
        if _low_on_space(path):
            return StorageFull(f"{error} (less than {LOW_SPACE_BYTES >> 20} MiB free on the disk holding {path})")
        return StorageError(str(error))
    return StorageError(str(errors[0] if errors else exc))


def unusable_from(exc: BaseException, path: Path) -> UnusableDatabase | None:
    """An UnusableDatabase for a corrupt or not-SQLite database anywhere in `exc` (its
    exception groups and chains): what `gatewayd run` says when the start reads a bad
    page (the file opened, a table's first read failed). None when there is none."""
    if isinstance(exc, UnusableDatabase):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := unusable_from(inner, path)) is not None:
                return found
        return None
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        for error in _sqlite_errors(link):
            if getattr(error, "sqlite_errorcode", 0) & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB):
                return UnusableDatabase(unusable_message(path, str(error)))
        link = link.__cause__ or link.__context__
    return None


def unusable_message(path: Path, error: str) -> str:
    """What to say of a database file SQLite cannot use (`gatewayd run`, the doctor)."""
    return (f"{path} is not a usable SQLite database ({error}): move it away and restore the last good backup "
            f"(backup.dir; docs/site-box.md, Restore), or move it away to start with an empty one")


@contextmanager
def core_statements() -> Iterator[None]:
    """Around the core's own statements in a write job (the outbox's rows, a delivery
    mark): SQLite refusing one of them (no such table or column) says the database's
    schema is not this gatewayd's (migrated under it by another process, altered by
    hand), a storage problem to wait out (StorageError), not a plugin's bug
    (StatementError, whose message is rejected and acknowledged)."""
    try:
        yield
    except (peewee.OperationalError, sqlite3.OperationalError) as e:
        error = _classify(e)
        if isinstance(error, StatementError):
            raise StorageError(f"the gateway's own tables refuse the write ({error}): is the database "
                               f"another gatewayd's, or being migrated?") from e
        raise


class _Meta(peewee.Model):
    component = peewee.CharField(primary_key=True)
    version = peewee.IntegerField()
    updated_at = peewee.FloatField()

    class Meta:
        table_name = "core_schema"


@dataclass
class SchemaSpec:
    """One component's tables: its models, current version and upgrade steps.

    `migrations[v]` upgrades a database from version v-1 to v; it is called with a
    playhouse `SqliteMigrator` and the database, inside the upgrade transaction.
    """

    component: str
    models: list[type[peewee.Model]]
    version: int = 1
    migrations: dict[int, Callable[[SqliteMigrator, peewee.Database], None]] = field(default_factory=dict)


class _Job:
    # A plain slotted class, not a dataclass: one is made per write, on the hot path.
    # `task` is the trio task waiting for it (None once that wait was cancelled);
    # `done` is set instead for a plain thread (write_blocking).
    __slots__ = ("fn", "args", "task", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple, task: Any = None, done: threading.Event | None = None):
        self.fn = fn
        self.args = args
        self.task = task
        self.done = done
        self.result: Any = None
        self.error: BaseException | None = None


class Storage:
    """The gateway's SQLite database: writer thread, readers, schemas, backups."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "normal",
        group_commit_ms: float = 0.0,
        group_commit_max: int = 1000,
        readers: int = 4,
    ):
        self.path = Path(path)
        self.synchronous = synchronous
        self.group_commit_s = group_commit_ms / 1000.0
        self.group_commit_max = group_commit_max
        self.database = peewee.SqliteDatabase(
            None,
            pragmas={
                "journal_mode": "wal",
                "synchronous": synchronous,
                "foreign_keys": 1,
                "busy_timeout": 10_000,
                # Checkpoints are cheap and frequent by default; keep the WAL bounded.
                "wal_autocheckpoint": 1000,
            },
        )
        self._readers = trio.CapacityLimiter(readers)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._open = False
        self.stats = {"commits": 0, "jobs": 0, "job_errors": 0, "commit_errors": 0, "max_batch": 0}
        # Writer-side caches kept over one transaction (see `defer`): (flush, reset) pairs.
        self._deferred: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self._writer_ident: int | None = None
        self._in_batch = False
        #: (since, error) while writes fail for lack of space; set and cleared by the writer
        #: thread (one assignment: /health reads it from the trio thread).
        self.full: tuple[float, str] | None = None
        #: Before the first migration this process makes, the whole database is copied
        #: here (`gatewayd-pre-upgrade-<UTC time>.sqlite3`); the runtime sets `[backup] dir`.
        self.migration_backup_dir: Path = self.path.parent / "backups"
        #: With backup.require_mount: the filesystem that folder must not be on (data_dir).
        self.migration_backup_apart_from: Path | None = None
        #: How many of those copies to keep (backup.keep_pre_upgrade), the new one among them.
        self.migration_backup_keep = 2
        self.pre_migration_backup: Path | None = None
        #: True while a schema's copy-then-migrate runs (set on the installing thread):
        #: the runtime tells systemd the start is progressing (EXTEND_TIMEOUT_USEC).
        self.migrating = False

    # -- life cycle --------------------------------------------------------------

    def open(self) -> None:
        """Open (creating) the database file and start the writer thread."""
        self._private_files()
        self.database.init(str(self.path))
        self.database.bind([_Meta])
        try:
            with self.database.connection_context():
                self.database.create_tables([_Meta], safe=True)
        except (peewee.DatabaseError, sqlite3.DatabaseError) as e:
            error = _classify(e, self.path)
            if not isinstance(error, StorageError) or isinstance(error, (StorageFull, StatementError)) \
                    or "locked" in str(error):
                raise
            raise UnusableDatabase(unusable_message(self.path, str(error))) from e
        self._writer = threading.Thread(target=self._writer_loop, name="gatewayd-writer", daemon=True)
        self._writer.start()
        self._open = True

    def _private_files(self) -> None:
        """The database holds password hashes, encrypted secrets and all telemetry: only
        its owner may read it. The data dir is made 0700 (if we make it), the database
        0600 before SQLite opens it (SQLite gives its -wal and -shm the database's mode),
        and files an older gatewayd left readable by others are set to 0600, logged."""
        try:
            self.path.parent.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            pass
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        for path in (self.path, *(self.path.with_name(self.path.name + end) for end in ("-wal", "-shm"))):
            try:
                mode = stat.S_IMODE(path.stat().st_mode)
                if mode & 0o077:
                    os.chmod(path, 0o600)
                    log.warning("database file was readable by others; now 0600", file=str(path), was=oct(mode))
            except FileNotFoundError:
                continue

    def close(self) -> None:
        """Finish every queued write, stop the writer thread, close connections."""
        if not self._open:
            return
        self._open = False
        self._queue.put(_STOP)
        if self._writer is not None:
            self._writer.join()
        if not self.database.is_closed():
            self.database.close()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Service shape: open, report started, and on cancellation drain and close."""
        self._token = trio.lowlevel.current_trio_token()
        await trio.to_thread.run_sync(self.open)
        try:
            task_status.started(self)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.close)

    def queue_depth(self) -> int:
        """Write jobs waiting for the writer thread (approximate: read without a lock)."""
        return self._queue.qsize()

    @property
    def is_open(self) -> bool:
        return self._open

    def health_state(self) -> ComponentState:
        """For /health: unavailable when closed, full while writes fail for lack of space."""
        if not self._open:
            return ComponentState("unavailable", "storage is closed")
        details = {"path": str(self.path)}
        full = self.full
        if full is not None:
            since, error = full
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
            return ComponentState("full", f"writes are refused for lack of space since {when} ({error}); free space "
                                  f"on the disk holding {self.path.parent}", {**details, "full_since": since})
        return ComponentState("ok", None, details)

    # -- schemas -----------------------------------------------------------------

    def install(self, spec: SchemaSpec) -> None:
        """Create or upgrade a component's tables (blocking: call from a thread).

        Before the first migration, the database is copied (`pre_migration_backup`); no
        copy, no migration. A migration runs in one transaction with its component's
        version: if it fails, MigrationError says how to roll back and nothing of that
        component changed. Raises StorageFull / StorageError when SQLite fails (nothing
        of it is kept)."""
        try:
            self.migrating = self._migration_pending(spec)
            if self.pre_migration_backup is None and self.migrating:
                self._backup_before_migrating(spec)
            self._install(spec)
        except (MigrationError, UnusableDatabase):
            raise
        except Exception as e:
            error = self._classify(e)
            if error is e:
                raise
            raise error from e
        finally:
            self.migrating = False

    def _install(self, spec: SchemaSpec) -> None:
        db = self.database
        db.bind(spec.models)
        # IMMEDIATE: take the write lock up front; a deferred transaction that reads
        # and then writes fails at once ("database is locked") if the writer thread
        # commits in between, and the busy timeout does not cover that case.
        with db.connection_context(), db.atomic("IMMEDIATE"):
            row = _Meta.get_or_none(_Meta.component == spec.component)
            if row is not None and row.version > spec.version:
                raise UnusableDatabase(
                    f"{spec.component}: the database holds schema version {row.version}, newer than "
                    f"this gatewayd's {spec.version}; refusing to downgrade (restore a backup or upgrade)"
                )
            if row is not None and row.version < spec.version:
                migrator = SqliteMigrator(db)
                for version in range(row.version + 1, spec.version + 1):
                    step = spec.migrations.get(version)
                    if step is None:
                        raise StorageError(f"{spec.component}: no migration to schema version {version}")
                    log.info("migrating schema", component=spec.component, to_version=version,
                             backup=str(self.pre_migration_backup))
                    try:
                        step(migrator, db)
                    except Exception as e:
                        raise MigrationError(self._rollback_advice(spec.component, row.version, version, e)) from e
            db.create_tables(spec.models, safe=True)
            _Meta.replace(component=spec.component, version=spec.version, updated_at=time.time()).execute()

    def _migration_pending(self, spec: SchemaSpec) -> bool:
        version = self.schema_version(spec.component)
        return version is not None and version < spec.version

    def _backup_before_migrating(self, spec: SchemaSpec) -> None:
        """The whole database, once, before anything is migrated; failing that, no migration."""
        dest = self.migration_backup_dir / time.strftime("gatewayd-pre-upgrade-%Y%m%dT%H%M%SZ.sqlite3", time.gmtime())
        try:
            prepare_dir(self.migration_backup_dir, apart_from=self.migration_backup_apart_from)
            if problem := space_problem(self.path, self.migration_backup_dir):
                raise BackupDirError(problem)
            self.pre_migration_backup = backup_database(self.path, dest)
            prune_pre_upgrade(self.migration_backup_dir, self.migration_backup_keep, self.pre_migration_backup)
        except (StorageError, OSError, BackupDirError) as e:
            raise MigrationError(
                f"{spec.component}: schema version {self.schema_version(spec.component)} needs migrating to "
                f"{spec.version}, but the copy of the database before migrating failed ({e}): nothing was "
                f"migrated; fix backup.dir ({self.migration_backup_dir}) and start again") from e
        log.warning("database copied before migrating its schema", backup=str(self.pre_migration_backup),
                    component=spec.component)

    def _rollback_advice(self, component: str, old: int, new: int, error: BaseException) -> str:
        return (f"{component}: migrating schema version {old} to {new} failed ({type(error).__name__}: {error}); "
                f"{component}'s tables are as they were (the migration is one transaction). To roll back: stop "
                f"gatewayd, reinstall the previous release, and restore the copy taken before migrating, "
                f"{self.pre_migration_backup} (docs/site-box.md#upgrades)")

    def schema_version(self, component: str) -> int | None:
        with self.database.connection_context():
            row = _Meta.get_or_none(_Meta.component == component)
        return None if row is None else row.version

    # -- writes ------------------------------------------------------------------

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the writer thread; return its result once committed.

        Raises StorageFull / StorageError when the commit fails (nothing of `fn` was
        kept), or whatever `fn` raised (its savepoint was rolled back). `fn` may run a
        second time when a job of the same group fails (the group is rolled back and
        re-run job by job): keep it to database work, no other side effects.
        """
        if not self._open:
            raise StorageUnavailable("storage is not open")
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        # The writer wakes this task directly (see _wake): no Event and parking lot per
        # write, which costs the busy trio thread more than the INSERT costs the writer.
        job = _Job(fn, args, trio.lowlevel.current_task())
        self._queue.put(job)
        stepped = step_aside()  # a request's handler waits for the commit: its place to the next request

        def abandon(_: Any) -> trio.lowlevel.Abort:
            job.task = None  # cancelled: the job still runs and commits, nobody waits
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abandon)
        if stepped:  # committed (or not): the handler's place again, before new requests
            await step_back()
        if job.error is not None:
            raise job.error
        return job.result

    def defer(self, flush: Callable[[], None], reset: Callable[[], None]) -> None:
        """Register a cache the writer's jobs keep in memory over one transaction, to write once.

        Writer jobs of one group may update the same rows (the outbox's counts): each
        reading and writing them costs statements per job. A cache registered here is
        written by `flush()` inside the transaction, after the group's jobs and before
        COMMIT (in the one-savepoint-per-job re-run: after each job, inside its
        savepoint), and forgotten by `reset()` after every COMMIT and every rollback (of
        the transaction or of a job's savepoint), so the next use reads the database
        again: what another connection committed meanwhile, and nothing rolled back.
        Use it only where `in_writer_batch()` is true.
        """
        self._deferred.append((flush, reset))

    def in_writer_batch(self) -> bool:
        """True on the writer thread while it runs a group's jobs (its caches apply, see `defer`)."""
        return self._in_batch and threading.get_ident() == self._writer_ident

    def _flush(self) -> None:
        for flush, _ in self._deferred:
            flush()

    def _reset(self) -> None:
        for _, reset in self._deferred:
            reset()

    def write_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Like `write`, for a plain thread (never call it on the trio thread)."""
        if not self._open:
            raise StorageUnavailable("storage is not open")
        job = _Job(fn, args, done=threading.Event())
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _writer_loop(self) -> None:
        db = self.database
        db.connect(reuse_if_open=True)
        self._writer_ident = threading.get_ident()
        stopping = False
        last_batch = 0
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            # Group commit: when writers are concurrent, wait one window so a burst shares
            # one COMMIT (one fsync with synchronous=FULL). One sleep, not a get() per
            # arriving job: every wake-up of this thread must win the GIL back from the
            # busy trio thread. A lone writer (last batch of one, nothing queued) pays no
            # window at all.
            if self.group_commit_s > 0 and (last_batch > 1 or not self._queue.empty()):
                time.sleep(self.group_commit_s)
            batch = [first]
            while len(batch) < self.group_commit_max:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True
                    break
                batch.append(job)
            last_batch = len(batch)
            self._run_batch(batch)
        db.close()

    def _run_batch(self, batch: list[_Job]) -> None:
        # Fast path: the whole group in one transaction, no savepoints. Every statement
        # the writer runs gives up the GIL and must win it back from the busy trio
        # thread, so two extra statements per job cost more than the jobs themselves
        # (bench/mqtt_bench.py). If any job raises, nothing was committed: run the group
        # again, each job in a savepoint of its own, so only the failing one fails.
        changes = self.database.connection().total_changes
        self._in_batch = True
        try:
            if self._run_group(batch):
                full_error = None
            else:
                full_error = self._run_isolated(batch)
        finally:
            self._in_batch = False
            self._reset()  # committed or rolled back: the next transaction reads afresh
        # Rows written and committed: there was room. (A batch that wrote nothing commits
        # on a full disk too, and says nothing about space.)
        wrote = full_error is None and self.database.connection().total_changes > changes
        self._note_space(full_error, wrote)
        self.stats["jobs"] += len(batch)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        self._wake(batch)

    def _run_group(self, batch: list[_Job]) -> bool:
        db = self.database
        try:
            with db.atomic():
                for job in batch:
                    job.result = job.fn(*job.args)
                self._flush()  # the caches' rows, once for the group, before COMMIT
        except Exception:
            for job in batch:
                job.result = None
            self._reset()
            self._end_transaction()
            return False
        self.stats["commits"] += 1
        return True

    def _end_transaction(self) -> None:
        """After a failure: make sure no transaction is left open on the writer's connection.

        peewee's ROLLBACK after a failed COMMIT may itself fail; if SQLite had not rolled
        back, every later BEGIN would fail too and the writer would refuse all writes.
        """
        conn = self.database.connection()
        if conn.in_transaction:
            try:
                conn.rollback()
            except sqlite3.Error as e:
                log.error("rollback after a failed write failed", error=str(e))

    def _note_space(self, full_error: StorageFull | None, wrote: bool) -> None:
        """Keep `self.full` (for /health): set while writes fail for lack of space, cleared
        by the first batch that commits rows without such a failure."""
        if full_error is not None:
            if self.full is None:
                log.error("storage is full: writes are refused until space is freed", path=str(self.path),
                          error=str(full_error))
                self.full = (time.time(), str(full_error))
            else:
                self.full = (self.full[0], str(full_error))
        elif wrote and self.full is not None:
            log.info("storage writes succeed again", path=str(self.path), full_s=round(time.time() - self.full[0], 1))
            self.full = None

    def _run_isolated(self, batch: list[_Job]) -> StorageFull | None:
        """Each job in a savepoint; returns the first lack-of-space failure, if any."""
        db = self.database
        conn = db.connection()
        lost: BaseException | None = None
        full: StorageFull | None = None
        try:
            with db.atomic():
                for job in batch:
                    # Each job in a savepoint of its own, so a failing job does not undo
                    # its batch mates. Raw SQL: peewee's savepoint costs ~10x more.
                    conn.execute("SAVEPOINT gatewayd_job")
                    try:
                        job.result = job.fn(*job.args)
                        self._flush()  # inside the job's savepoint: rolled back with it
                    except Exception as e:
                        self._reset()  # what the cache holds of this job is rolled back
                        job.error = self._classify(e)
                        self.stats["job_errors"] += 1
                        if full is None and job.error is not e and isinstance(job.error, StorageFull):
                            full = job.error  # classified from SQLite: the disk, not an outbox quota
                        if not conn.in_transaction:
                            # SQLite rolled the whole transaction back (SQLITE_FULL, IOERR):
                            # the jobs before this one are gone too, and the rest must not
                            # run outside a transaction. Fail the batch with the first cause
                            # (a failed ROLLBACK TO SAVEPOINT in the job hides it as __context__).
                            lost = self._classify(_first_cause(e))
                            raise
                        if type(job.error) is StorageError and _own_transaction_statement(e):
                            # The transaction is alive: the job's own BEGIN or RELEASE refused,
                            # the same way every time (the writer's state is only ever off
                            # outside a job, or once SQLite rolled back).
                            job.error = StatementError(str(job.error))
                        conn.execute("ROLLBACK TO gatewayd_job")
                    conn.execute("RELEASE gatewayd_job")
        except Exception as e:  # the COMMIT itself failed: nothing of the batch is kept
            self.stats["commit_errors"] += 1
            error = lost or self._classify(e)
            log.error("commit failed", jobs=len(batch), error=str(error))
            for job in batch:
                job.error, job.result = error, None
            self._end_transaction()
            if isinstance(error, StorageFull) and error is not e:
                full = full or error
        else:
            self.stats["commits"] += 1
        return full

    def _classify(self, exc: BaseException) -> BaseException:
        return _classify(exc, self.path)

    def _wake(self, batch: list[_Job]) -> None:
        # One call into trio per group, not one per job: every hand-off to the trio
        # thread is a GIL round trip.
        trio_jobs = []
        for job in batch:
            if job.done is not None:
                job.done.set()
            else:
                trio_jobs.append(job)
        if trio_jobs:
            try:
                self._token.run_sync_soon(_set_all, trio_jobs)
            except trio.RunFinishedError:
                pass

    # -- reads -------------------------------------------------------------------

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on a reader thread (own connection) and return its result."""
        if not self._open:
            raise StorageUnavailable("storage is not open")
        stepped = step_aside()  # a request's handler waits for a reader thread: its place to the next request
        try:
            result = await trio.to_thread.run_sync(self._read, fn, args, limiter=self._readers)
        except Exception:
            if stepped:  # a row not found, say: the handler answers it, in a place like any
                await step_back()
            raise
        if stepped:
            await step_back()
        return result

    def _read(self, fn: Callable[..., T], args: tuple) -> T:
        self.database.connect(reuse_if_open=True)
        try:
            return fn(*args)
        except Exception as e:
            error = self._classify(e)
            if error is e:
                raise
            raise error from e

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in one transaction on the calling thread (CLI commands).

        Raises StorageFull / StorageError for SQLite's failures, like `write`."""
        try:
            with self.database.connection_context(), self.database.atomic():
                return fn(*args)
        except Exception as e:
            error = self._classify(e)
            if error is e:
                raise
            raise error from e

    async def backup(self, dest: str | Path) -> Path:
        """A consistent online copy of the database (safe while writes continue)."""
        return await trio.to_thread.run_sync(backup_database, self.path, dest)


def _first_cause(exc: BaseException) -> BaseException:
    while exc.__context__ is not None and isinstance(exc.__context__, Exception):
        exc = exc.__context__
    return exc


def _set_all(jobs: Iterable[_Job]) -> None:
    # On the trio thread (run_sync_soon), like the abort in `write`: no race with it.
    reschedule = trio.lowlevel.reschedule
    for job in jobs:
        if job.task is not None:
            reschedule(job.task)


#: A table only backups have: a database that has it was restored from a backup (see
#: `backup_database`), and whatever numbers records must skip what the original
#: went on to issue after the copy (the outbox does: `Outbox.install`).
BACKUP_MARKER = "core_backup_taken"


def backup_database(source: str | Path, dest: str | Path) -> Path:
    """Copy a live database with SQLite's online backup API, then check the copy.

    The copy is made in one step under a read transaction, so it is one consistent
    snapshot even while the daemon keeps writing (WAL readers don't block the writer).
    The copy is marked (`BACKUP_MARKER`, with the time it was taken) so that a gateway
    later started on it knows it runs on a restored backup.
    """
    source, dest = Path(source), Path(dest)
    if not source.exists():
        raise StorageError(f"no database at {source}")
    if dest.is_dir():
        dest = dest / f"gatewayd-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.sqlite3"
    tmp = dest.with_name(dest.name + ".partial")
    tmp.unlink(missing_ok=True)
    # A copy of everything the database holds: as private as the database (0600, and
    # SQLite's journal next to it takes that mode); `replace` keeps it over an old file.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        check = _copy_database(source, tmp)
    except sqlite3.Error as e:
        _remove_database(tmp)
        error = _classify(e, tmp)
        raise (error if isinstance(error, StorageError) else StorageError(str(e))) from e
    except BaseException:
        _remove_database(tmp)
        raise
    if check != "ok":
        _remove_database(tmp)
        raise StorageError(f"backup failed its integrity check: {check}")
    tmp.replace(dest)
    return dest


def _remove_database(path: Path) -> None:
    """A database file and whatever SQLite left beside it (a failed copy's journal)."""
    for end in ("", "-journal", "-wal", "-shm"):
        path.with_name(path.name + end).unlink(missing_ok=True)


def _copy_database(source: Path, dest: Path) -> str:
    """Copy, mark as a backup, check; returns what integrity_check says."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=10)
    try:
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
            with out:
                out.execute(f"CREATE TABLE IF NOT EXISTS {BACKUP_MARKER} (taken_at REAL NOT NULL)")
                out.execute(f"DELETE FROM {BACKUP_MARKER}")
                out.execute(f"INSERT INTO {BACKUP_MARKER} (taken_at) VALUES (?)", (time.time(),))
            check = out.execute("PRAGMA integrity_check").fetchone()[0]
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()
    finally:
        src.close()
    return check
