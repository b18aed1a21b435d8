"""Storage: group commit, failure isolation, migrations, backup, crash safety."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import peewee
import pytest
import trio

from gatewayd.core.storage import SchemaSpec, Storage, StorageError, StorageFull, backup_database


class Row(peewee.Model):
    n = peewee.IntegerField()

    class Meta:
        table_name = "t_row"


@pytest.fixture
async def storage(tmp_path):
    s = Storage(tmp_path / "db.sqlite3", group_commit_ms=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await trio.to_thread.run_sync(s.install, SchemaSpec("t", [Row]))
        yield s
        nursery.cancel_scope.cancel()


async def test_write_returns_after_commit_visible_to_another_connection(storage, tmp_path):
    await storage.write(lambda: Row.create(n=1))
    # A fresh connection (another process would see the same) sees the row.
    with sqlite3.connect(tmp_path / "db.sqlite3") as conn:
        assert conn.execute("select n from t_row").fetchall() == [(1,)]


async def test_concurrent_writers_share_commits(storage):
    async def writer(i):
        await storage.write(lambda: Row.create(n=i))

    async with trio.open_nursery() as nursery:
        for i in range(500):
            nursery.start_soon(writer, i)
    assert await storage.read(lambda: Row.select().count()) == 500
    assert storage.stats["jobs"] == 500
    # Group commit: far fewer transactions than jobs.
    assert storage.stats["commits"] < 250
    assert storage.stats["max_batch"] > 1


async def test_a_failing_job_does_not_undo_its_batch_mates(storage):
    def bad():
        Row.create(n=-1)
        raise ValueError("bad input")

    results = {}

    async def run(name, fn):
        try:
            results[name] = await storage.write(fn)
        except Exception as e:
            results[name] = e

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "a", lambda: Row.create(n=1).n)
        nursery.start_soon(run, "bad", bad)
        nursery.start_soon(run, "b", lambda: Row.create(n=2).n)
    assert results["a"] == 1 and results["b"] == 2
    assert isinstance(results["bad"], ValueError)
    assert sorted(await storage.read(lambda: [r.n for r in Row.select()])) == [1, 2]


async def test_disk_full_fails_the_write_and_keeps_what_was_stored(storage):
    await storage.write(lambda: Row.create(n=1))
    page_count = await storage.write(lambda: storage.database.execute_sql("pragma page_count").fetchone()[0])
    # Simulate a full disk: cap the database at its current size (on the writer's connection).
    await storage.write(lambda: storage.database.execute_sql(f"pragma max_page_count={page_count}"))
    with pytest.raises(StorageFull):
        await storage.write(lambda: Row.insert_many([{"n": i} for i in range(20000)]).execute())
    await storage.write(lambda: storage.database.execute_sql("pragma max_page_count=1073741823"))
    await storage.write(lambda: Row.create(n=2))
    assert sorted(await storage.read(lambda: [r.n for r in Row.select()])) == [1, 2]
    assert await storage.read(lambda: storage.database.execute_sql("pragma integrity_check").fetchone()[0]) == "ok"


class V1(peewee.Model):
    name = peewee.CharField()

    class Meta:
        table_name = "m_item"


class V2(peewee.Model):
    name = peewee.CharField()
    colour = peewee.CharField(default="red")

    class Meta:
        table_name = "m_item"


def test_migration_from_an_older_schema_keeps_data(tmp_path):
    from playhouse.migrate import migrate

    old = Storage(tmp_path / "db.sqlite3")
    old.open()
    old.install(SchemaSpec("m", [V1], version=1))
    old.write_blocking(lambda: V1.create(name="kept"))
    old.close()

    new = Storage(tmp_path / "db.sqlite3")
    new.open()
    spec = SchemaSpec("m", [V2], version=2, migrations={
        2: lambda migrator, db: migrate(migrator.add_column("m_item", "colour", V2.colour)),
    })
    new.install(spec)
    assert new.schema_version("m") == 2
    rows = new.run_blocking(lambda: [(r.name, r.colour) for r in V2.select()])
    new.close()
    assert rows == [("kept", "red")]


def test_downgrade_is_refused(tmp_path):
    s = Storage(tmp_path / "db.sqlite3")
    s.open()
    s.install(SchemaSpec("m", [V1], version=3, migrations={}))
    with pytest.raises(StorageError, match="newer than this gatewayd"):
        s.install(SchemaSpec("m", [V1], version=2))
    s.close()


def test_missing_migration_step_is_an_error_and_changes_nothing(tmp_path):
    s = Storage(tmp_path / "db.sqlite3")
    s.open()
    s.install(SchemaSpec("m", [V1], version=1))
    with pytest.raises(StorageError, match="no migration to schema version 2"):
        s.install(SchemaSpec("m", [V2], version=2))
    assert s.schema_version("m") == 1
    s.close()


async def test_backup_while_writing_is_consistent(storage, tmp_path):
    stop = trio.Event()
    written = 0

    async def keep_writing():
        nonlocal written
        while not stop.is_set():
            await storage.write(lambda: Row.insert_many([{"n": i} for i in range(50)]).execute())
            written += 50

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_writing)
        await trio.sleep(0.1)
        dest = await storage.backup(tmp_path / "backup.sqlite3")
        stop.set()
    with sqlite3.connect(dest) as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        count = conn.execute("select count(*) from t_row").fetchone()[0]
    assert 0 < count <= written
    assert count % 50 == 0  # a snapshot between commits, never half a transaction


WRITER = textwrap.dedent("""
    import sys, trio, peewee
    from gatewayd.core.storage import Storage, SchemaSpec

    class Row(peewee.Model):
        n = peewee.IntegerField()
        class Meta:
            table_name = "t_row"

    async def main():
        s = Storage(sys.argv[1])
        async with trio.open_nursery() as nursery:
            await nursery.start(s.run)
            await trio.to_thread.run_sync(s.install, SchemaSpec("t", [Row]))
            i = 0
            async def one(i):
                await s.write(lambda: Row.insert_many([{"n": i * 10 + k} for k in range(10)]).execute())
                print(i, flush=True)  # acknowledged: committed
            while True:
                async with trio.open_nursery() as batch:
                    for _ in range(20):
                        batch.start_soon(one, i)
                        i += 1

    trio.run(main)
""")


@pytest.mark.parametrize("round_", range(3))
def test_kill_9_during_writes_then_clean_reopen(tmp_path, round_):
    db = tmp_path / "db.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    acked = set()
    for line in proc.stdout:
        acked.add(int(line))
        if len(acked) >= 200 + 150 * round_:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for line in proc.stdout:  # acks printed before the kill landed
        acked.add(int(line))
    with sqlite3.connect(db) as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        stored = {n for (n,) in conn.execute("select n from t_row")}
    # Every acknowledged batch is there in full.
    for i in acked:
        assert set(range(i * 10, i * 10 + 10)) <= stored
    # And no torn batch: rows come in whole groups of ten.
    assert len(stored) % 10 == 0


async def test_cancelled_write_still_commits_and_others_are_woken(storage, tmp_path):
    """A caller cancelled while waiting gives up waiting, not the write; the writes that
    shared its group still return normally."""
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def cancelled():
            with scope:
                await storage.write(lambda: Row.create(n=1))
            assert scope.cancelled_caught

        nursery.start_soon(cancelled)
        await trio.sleep(0)
        scope.cancel()
        for i in (2, 3):
            nursery.start_soon(storage.write, lambda i=i: Row.create(n=i))
    with trio.fail_after(10):
        assert await storage.write(lambda: Row.select().count()) == 3
