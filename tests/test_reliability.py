"""The two rules under abuse: kill -9 while ingesting and draining, and a full disk.

1. Nothing acknowledged to a device is lost: after any number of `kill -9`, every
   record answered 201 reaches the receiver exactly once, and nothing else does.
2. A full disk refuses new records with 507/503, damages nothing already stored, and
   ingest resumes when space returns.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from gatewayd.testing import gw_client, reserved_port, wait_until
from tests import plugin_ingest
from tests.test_sync import SECRET, receiver, received, upstream_config

INGEST = ("ingest", plugin_ingest)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def upstream_secret(monkeypatch):
    monkeypatch.setenv("GATEWAYD_UPSTREAM_SECRET", SECRET)


# -- kill -9 -----------------------------------------------------------------------


class Daemon:
    """`python -m gatewayd -p tests.plugin_ingest run` as a subprocess."""

    def __init__(self, tmp_path: Path, receiver_url: str):
        self.port = reserved_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / "gatewayd.toml"
        self.config.write_text(
            f"[gateway]\nid = 'site-1'\ndata_dir = '{tmp_path / 'var'}'\nshutdown_grace_s = 1.0\n"
            f"[http]\nlisten = '127.0.0.1:{self.port}'\naccess_log = false\n"
            "[mqtt]\nbroker = 'off'\n"
            + upstream_config(receiver_url, max_records=200)
        )
        self.log = tmp_path / "daemon.log"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gatewayd", "-p", "tests.plugin_ingest", "run", "--config", str(self.config)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "GATEWAYD_UPSTREAM_SECRET": SECRET},
            )
        async with httpx.AsyncClient(timeout=1) as client:

            async def healthy() -> bool:
                try:
                    if (await client.get(self.base + "/health")).status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                return False

            await wait_until(healthy, timeout=120, step=0.05, what="the daemon answers /health with 200")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    async def backlog(self) -> int:
        async with httpx.AsyncClient(timeout=2) as client:
            text = (await client.get(self.base + "/metrics")).text
        for line in text.splitlines():
            if line.startswith('gatewayd_sync_backlog_records{sink="cloud"}'):
                return int(float(line.split()[-1]))
        raise AssertionError("no backlog metric")


async def hammer(base: str, next_seq, attempted: set[int], acked: set[int], stop: trio.Event) -> None:
    """One device: post readings until told to stop; note what was answered 201."""
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        while not stop.is_set():
            seq = next_seq()
            attempted.add(seq)
            try:
                r = await client.post("/ingest/records", json={"device": f"dev-{seq % 7}", "seq": seq,
                                                               "cls": random.choice(["history", "state", "alert"])})
            except httpx.TransportError:
                return  # the gateway was killed under us: this seq may or may not be stored
            if r.status_code == 201:
                acked.add(seq)
            else:
                raise AssertionError(f"unexpected {r.status_code}: {r.text}")


PER_LIFE = 60  # records acknowledged in each life of the daemon before its kill -9


@pytest.mark.timeout(600)  # ~25 s on an idle machine; a loaded one starts and ingests slower
async def test_kill_9_repeatedly_loses_nothing_acknowledged_and_duplicates_nothing(tmp_path):
    db = tmp_path / "received.db"
    attempted: set[int] = set()
    acked: set[int] = set()
    counter = iter(range(10**9))
    rng = random.Random(4)
    # A slow, flaky receiver: kills land while batches are in flight and being retried.
    async with receiver(db, delay_ms=30, fail_rate=0.2, rng=random.Random(1)) as url:
        daemon = Daemon(tmp_path, url)
        for _ in range(4):
            await daemon.start()
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                before = len(acked)
                for _ in range(6):
                    nursery.start_soon(hammer, daemon.base, lambda: next(counter), attempted, acked, stop)
                # Once this life has acknowledged enough to matter, however slow the machine...
                await wait_until(lambda: len(acked) >= before + PER_LIFE, timeout=120,
                                 what=f"{PER_LIFE} more records acknowledged")
                await trio.sleep(rng.uniform(0.0, 0.8))  # ... at a different moment each time (not a wait)
                daemon.kill()  # kill -9 while devices post and the sink drains
                stop.set()
        await daemon.start()
        await wait_until(lambda: acked <= {r["data"]["seq"] for r in received(db)}, timeout=180)

        async def drained() -> bool:
            return not await daemon.backlog()

        await wait_until(drained, timeout=120, step=0.1)
        assert daemon.stop() == 0
    got = [r["data"]["seq"] for r in received(db)]
    assert len(acked) >= 4 * PER_LIFE, "the test did not ingest enough to mean anything"
    assert acked <= set(got), f"acknowledged but lost: {sorted(acked - set(got))[:20]}"
    assert len(got) == len(set(got)), "a record reached the receiver twice"
    assert set(got) <= attempted, "the receiver holds records nobody sent"
    log = (tmp_path / "daemon.log").read_text()
    assert log.count("gateway started") == 5
    assert "resending open batches" in log  # at least one kill landed with a batch open


# -- disk full -----------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _fill(path: Path) -> Path:
    """Take every free byte of the filesystem holding `path`."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
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


async def post_until_refused(client: httpx.AsyncClient, start: int, acked: set[int]) -> int:
    """Ingest bulks of 200 until the gateway refuses one; return its status."""
    for i in range(500):
        seqs = range(start + i * 200, start + (i + 1) * 200)
        r = await client.post("/ingest/bulk", json={"device": "d", "start": seqs.start, "count": 200})
        if r.status_code != 201:
            return r.status_code
        acked.update(seqs)
    raise AssertionError("never refused: the disk did not fill")


@pytest.mark.timeout(120)  # the drain below may take up to 60 s on its own
@pytest.mark.parametrize("how", ["tmpfs", "max_page_count"])
async def test_disk_full_refuses_new_records_keeps_old_ones_and_recovers(gateway_factory, tmp_path, how):
    """tmpfs: a real ENOSPC from a 16 MB filesystem (needs root to mount); max_page_count:
    SQLite's own size cap on the writer connection (SQLITE_FULL, works anywhere)."""
    disk = tmp_path / "disk"
    if how == "tmpfs" and not _mount_tmpfs(disk, "16m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    db = tmp_path / "received.db"
    port = reserved_port()
    acked: set[int] = set()
    try:
        # The receiver is down while the disk fills: everything stays in the outbox.
        async with gateway_factory(plugins=[INGEST], settings=[f"gateway.data_dir='{disk / 'var'}'"],
                                   config_text=upstream_config(f"http://127.0.0.1:{port}")) as gw:
            database = gw.storage.database
            async with gw_client(gw) as client:
                r = await client.post("/ingest/bulk", json={"device": "d", "start": 0, "count": 200})
                assert r.status_code == 201
                acked.update(range(200))
                if how == "tmpfs":
                    filler = _fill(disk)
                else:
                    pages = await gw.storage.write(lambda: database.execute_sql("PRAGMA page_count").fetchone()[0])
                    await gw.storage.write(lambda: database.execute_sql(f"PRAGMA max_page_count = {pages + 40}"))
                status = await post_until_refused(client, 1000, acked)
                assert status in (507, 503)
                # Single records still fit in the last free pages for a while, then not.
                for seq in range(10**8, 10**8 + 5000):
                    r = await client.post("/ingest/records", json={"device": "d", "seq": seq})
                    if r.status_code != 201:
                        break
                    acked.add(seq)
                assert r.status_code in (507, 503), r.text
                # Space returns: ingest resumes.
                if how == "tmpfs":
                    filler.unlink()
                else:
                    await gw.storage.write(lambda: database.execute_sql("PRAGMA max_page_count = 1073741823"))
                r = await client.post("/ingest/bulk", json={"device": "d", "start": 10**7, "count": 200})
                assert r.status_code == 201, r.text
                acked.update(range(10**7, 10**7 + 200))
                count = (await client.get("/ingest/count")).json()["count"]
                assert count == len(acked)  # nothing refused was half-stored, nothing acked was lost
            check = await gw.storage.read(lambda: database.execute_sql("PRAGMA integrity_check").fetchone()[0])
            assert check == "ok"
            assert gw.outbox.counts["sink:cloud"][0] == len(acked)
        # Receiver up: every acknowledged record arrives, once.
        async with receiver(db, port=port) as url:
            async with gateway_factory(plugins=[INGEST], settings=[f"gateway.data_dir='{disk / 'var'}'"],
                                       config_text=upstream_config(url)) as gw:
                await wait_until(lambda: gw.outbox.counts["sink:cloud"][0] == 0, timeout=60)
        got = [r["data"]["seq"] for r in received(db)]
        assert sorted(got) == sorted(acked)
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


async def test_a_full_disk_mid_group_commit_keeps_exactly_the_acknowledged_records(gateway_factory):
    """SQLITE_FULL rolls the *whole* transaction back, not just the failing job's savepoint:
    the jobs sharing that group commit must all fail (none half-kept, none kept-but-refused)."""
    async with gateway_factory(plugins=[INGEST]) as gw:
        database = gw.storage.database
        pages = await gw.storage.write(lambda: database.execute_sql("PRAGMA page_count").fetchone()[0])
        await gw.storage.write(lambda: database.execute_sql(f"PRAGMA max_page_count = {pages + 12}"))
        acked: set[int] = set()
        refused: list[int] = []
        async with gw_client(gw) as client:

            async def post(seq: int) -> None:
                body = {"device": "d" * 200, "seq": seq, "value": 1.0}
                r = await client.post("/ingest/records", json=body)
                if r.status_code == 201:
                    acked.add(seq)
                else:
                    assert r.status_code in (507, 503), r.text
                    refused.append(r.status_code)

            for round_ in range(30):  # concurrent posts share group commits
                async with trio.open_nursery() as nursery:
                    for i in range(25):
                        nursery.start_soon(post, round_ * 100 + i)
            stored = await gw.storage.read(lambda: {s for (s,) in database.execute_sql(
                "SELECT seq FROM ingest_reading").fetchall()})
        assert refused, "the size cap was never reached"
        assert stored == acked
        assert 507 in refused  # a full database is reported as such, not as a generic error
