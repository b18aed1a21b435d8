"""A full disk: every write path says StorageFull (not a generic error), /health says
storage is full while writes fail for lack of space and ok once they succeed, and
nothing committed is lost or damaged.

The real thing is a small tmpfs mounted for the test (we run as root); where mounting
is not permitted those tests skip and the `max_page_count` ones (SQLite's own size
cap, SQLITE_FULL, works anywhere) still cover the storage layer.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import peewee
import pytest
import trio

from gatewayd.core.storage import SchemaSpec, Storage, StorageFull
from gatewayd.testing import gw_client
from tests import plugin_ingest

PAD = "x" * 3000  # a few rows fill a page


class Row(peewee.Model):
    n = peewee.IntegerField()
    pad = peewee.TextField(default="")

    class Meta:
        table_name = "t_full"


class Later(peewee.Model):
    name = peewee.TextField()

    class Meta:
        table_name = "t_later"


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                          capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the max_page_count tests cover storage")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=10)


def fill(disk: Path) -> Path:
    """Take every free byte of the filesystem holding `disk`; unlink the file to free them."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


async def write_until_refused(storage: Storage, committed: set[int], start: int) -> StorageFull:
    """Concurrent writes (they share group commits) until one is refused; the refusal."""
    refusals: list[BaseException] = []

    async def one(n: int) -> None:
        try:
            await storage.write(lambda: Row.create(n=n, pad=PAD))
            committed.add(n)
        except Exception as e:
            refusals.append(e)

    for round_ in range(300):
        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(one, start + round_ * 8 + k)
        if refusals:
            break
    assert refusals, "the disk never filled"
    for e in refusals:
        assert isinstance(e, StorageFull), repr(e)
        assert "cannot rollback" not in str(e)  # the cause, not what failed after it
    return refusals[0]


async def refused_again(storage: Storage) -> StorageFull:
    with pytest.raises(StorageFull) as caught:
        await storage.write(lambda: Row.insert_many([{"n": -1, "pad": PAD}] * 50).execute())
    return caught.value


def stored_rows(path: Path) -> set[int]:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {n for (n,) in conn.execute("SELECT n FROM t_full")}


async def test_a_real_full_disk_is_storage_full_shown_in_health_and_loses_nothing(small_disk):
    storage = Storage(small_disk / "db.sqlite3")
    committed: set[int] = set()
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        await trio.to_thread.run_sync(storage.install, SchemaSpec("t", [Row]))
        for n in range(20):
            await storage.write(lambda n=n: Row.create(n=n, pad=PAD))
            committed.add(n)
        assert storage.health_state().state == "ok"
        filler = fill(small_disk)
        await write_until_refused(storage, committed, 1000)
        error = await refused_again(storage)
        with pytest.raises(StorageFull):  # the path CLI commands use
            await trio.to_thread.run_sync(storage.write_blocking, lambda: Row.create(n=-2, pad=PAD))
        with pytest.raises(StorageFull):  # a plugin's tables created at start-up
            await trio.to_thread.run_sync(storage.install, SchemaSpec("later", [Later]))
        health = storage.health_state()
        assert health.state == "full" and "lack of space" in health.reason and str(error) in health.reason
        assert await storage.write(lambda: Row.select().count()) > 0  # commits, having written nothing:
        assert storage.health_state().state == "full"  # that says nothing about space
        # Space returns: the next write commits and storage is ok again.
        filler.unlink()
        await storage.write(lambda: Row.create(n=99_999, pad=PAD))
        committed.add(99_999)
        assert storage.health_state().state == "ok"
        assert {r.n for r in await storage.read(lambda: list(Row.select(Row.n)))} == committed
        nursery.cancel_scope.cancel()
    assert stored_rows(small_disk / "db.sqlite3") == committed  # reopened: every committed row, nothing else


async def test_a_full_database_size_cap_shows_in_health_until_a_write_succeeds(tmp_path):
    storage = Storage(tmp_path / "db.sqlite3")
    committed: set[int] = set()
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        await trio.to_thread.run_sync(storage.install, SchemaSpec("t", [Row]))
        database = storage.database
        pages = await storage.write(lambda: database.execute_sql("PRAGMA page_count").fetchone()[0])
        await storage.write(lambda: database.execute_sql(f"PRAGMA max_page_count = {pages + 20}"))
        await write_until_refused(storage, committed, 0)
        await refused_again(storage)
        assert storage.health_state().state == "full"
        await storage.write(lambda: database.execute_sql("PRAGMA max_page_count = 1073741823"))
        assert storage.health_state().state == "full"  # nothing written yet
        await storage.write(lambda: Row.create(n=-1))
        committed.add(-1)
        assert storage.health_state().state == "ok"
        nursery.cancel_scope.cancel()
    assert stored_rows(tmp_path / "db.sqlite3") == committed


async def test_the_gateway_answers_507_and_its_health_says_full_until_space_returns(gateway_factory, small_disk):
    settings = [f"gateway.data_dir='{small_disk / 'var'}'"]
    async with gateway_factory(plugins=[("ingest", plugin_ingest)], settings=settings) as gw:
        async with gw_client(gw) as client:
            assert (await client.get("/health")).json()["components"]["storage"]["state"] == "ok"
            filler = fill(small_disk)
            acked = 0
            for seq in range(20_000):
                r = await client.post("/ingest/bulk", json={"device": "d", "start": seq * 50, "count": 50})
                if r.status_code != 201:
                    break
                acked += 50
            assert r.status_code == 507, r.text  # full, not "storage unavailable"
            health = await client.get("/health")
            storage = health.json()["components"]["storage"]
            assert health.status_code == 503 and storage["state"] == "full", storage
            assert "lack of space" in storage["reason"]
            filler.unlink()
            r = await client.post("/ingest/records", json={"device": "d", "seq": 10**9})
            assert r.status_code == 201, r.text
            assert (await client.get("/health")).json()["components"]["storage"]["state"] == "ok"
            assert (await client.get("/ingest/count")).json()["count"] == acked + 1


async def test_a_backup_onto_a_full_disk_is_storage_full_and_leaves_nothing_behind(small_disk, tmp_path):
    storage = Storage(tmp_path / "db.sqlite3")
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        await trio.to_thread.run_sync(storage.install, SchemaSpec("t", [Row]))
        await storage.write(lambda: Row.insert_many([{"n": n, "pad": PAD} for n in range(2000)]).execute())
        with pytest.raises(StorageFull):  # ~6 MB onto a 4 MB disk
            await storage.backup(small_disk / "backup.sqlite3")
        assert sorted(p.name for p in small_disk.iterdir()) == []
        nursery.cancel_scope.cancel()
