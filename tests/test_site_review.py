"""Review of issue 21 (the gateway on a site box): attacks as an installer and as a
LAN attacker would try them, with real parts."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from gatewayd.core.backup import BackupSection, Backups, list_backups
from gatewayd.core.health import Health
from gatewayd.core.metrics import Metrics
from gatewayd.core.storage import Storage
from gatewayd.cli import main
from gatewayd.core.tls import init_site
from gatewayd.testing import gw_client
from gatewayd.testing import reserved_port

REPO = Path(__file__).resolve().parent.parent


async def test_a_clock_set_back_does_not_prune_the_copy_just_taken(tmp_path):
    """A box without a real-time clock (a Raspberry Pi) whose clock was ahead and is then
    set right: the copies taken meanwhile have names from the 'future', so a new copy
    sorts as the oldest. Pruning must not delete the copy it has just checked (and
    /health must not point at a deleted file), nor keep the stale ones forever."""
    storage = Storage(tmp_path / "gatewayd.sqlite3")
    storage.open()
    try:
        storage.database.execute_sql("CREATE TABLE t (x INTEGER)")
        now = [1_800_000_000.0]  # the clock is a year ahead
        health = Health()
        backups = Backups(BackupSection(interval_s=3600, keep=2), storage.path, tmp_path / "bk",
                          data_dir=tmp_path, master_key_env="", health=health, metrics=Metrics(),
                          clock=lambda: now[0])
        for _ in range(2):
            assert await backups.take() is not None
            now[0] += 3600
        now[0] = 1_770_000_000.0  # NTP sets it right
        storage.database.execute_sql("INSERT INTO t VALUES (42)")
        new = await backups.take()
        assert new is not None
        assert new.exists(), "the copy just taken and checked was deleted by the pruning"
        assert new in list_backups(tmp_path / "bk")
        ok, doc = health.snapshot()
        assert doc["components"]["backup"]["last_good"] == str(new)
        copy = sqlite3.connect(new)
        assert copy.execute("SELECT count(*) FROM t").fetchone()[0] == 1
        copy.close()
    finally:
        storage.close()


async def test_a_copy_from_the_future_does_not_put_the_next_backup_a_year_away(tmp_path, mock_clock):
    storage = Storage(tmp_path / "gatewayd.sqlite3")
    storage.open()
    try:
        storage.database.execute_sql("CREATE TABLE t (x INTEGER)")
        ahead = Backups(BackupSection(interval_s=3600, keep=2), storage.path, tmp_path / "bk",
                        data_dir=tmp_path, master_key_env="", health=Health(), metrics=Metrics(),
                        clock=lambda: 1_800_000_000.0)
        future = await ahead.take()
        os.utime(future, (1_800_000_000.0, 1_800_000_000.0))  # its mtime is the clock's too
        backups = Backups(BackupSection(interval_s=3600, keep=2), storage.path, tmp_path / "bk",
                          data_dir=tmp_path, master_key_env="", health=Health(), metrics=Metrics(),
                          clock=lambda: 1_770_000_000.0 + trio.current_time())
        async with trio.open_nursery() as nursery:
            await nursery.start(backups.run)
            mock_clock.jump(301)
            with trio.fail_after(30):
                while backups.taken == 0:
                    await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
        assert backups.taken == 1
    finally:
        storage.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="scripts/install runs as root")
@pytest.mark.parametrize("args", [["--uninstall"], ["--no-start"]])
def test_install_refuses_a_path_the_unit_cannot_hold(tmp_path, args):
    """A data dir with a space became `ReadWritePaths=/x/my` and `data` (ignored, a
    warning only: systemd-analyze verify passes): the service could not write its data."""
    spaced = tmp_path / "site box"
    env = {**os.environ, "GATEWAYD_PREFIX": str(spaced / "opt"), "GATEWAYD_ETC": str(spaced / "etc"),
           "GATEWAYD_DATA": str(spaced / "data"), "GATEWAYD_UNIT_DIR": str(spaced / "unit"),
           "GATEWAYD_BIN_DIR": str(spaced / "bin"), "GATEWAYD_USER": "gwt-never-made"}
    result = subprocess.run([str(REPO / "scripts" / "install"), *args], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result.stderr
    assert f"only letters, digits and . _ - + @ / in a path: '{spaced / 'opt'}'" in result.stderr
    assert not spaced.exists()


async def test_a_copy_left_half_written_by_a_killed_run_is_removed_at_start(tmp_path, mock_clock):
    """A stop during a long copy ends in SIGKILL (TimeoutStopSec=20): the `.partial` copy,
    as big as the database, was never removed (the next copy has another name)."""
    storage = Storage(tmp_path / "gatewayd.sqlite3")
    storage.open()
    try:
        bk = tmp_path / "bk"
        bk.mkdir()
        left = [bk / "gatewayd-20260101T020000Z.sqlite3.partial", bk / "gatewayd-20260101T020000Z.sqlite3.partial-journal",
                bk / "gatewayd-pre-upgrade-20260101T020000Z.sqlite3.partial"]
        for p in left:
            p.write_bytes(b"x" * 4096)
        foreign = bk / "notes.sqlite3.partial"
        foreign.write_text("not ours")
        backups = Backups(BackupSection(interval_s=3600, keep=2), storage.path, bk,
                          data_dir=tmp_path, master_key_env="", health=Health(), metrics=Metrics(),
                          clock=lambda: 1_770_000_000.0 + trio.current_time())
        async with trio.open_nursery() as nursery:
            await nursery.start(backups.run)
            nursery.cancel_scope.cancel()
        assert [p for p in left if p.exists()] == []
        assert foreign.exists()
    finally:
        storage.close()


async def test_a_backup_taken_under_heavy_writes_restores_with_the_documented_commands(gateway_factory, tmp_path):
    """The copy is taken while another connection commits as fast as it can (WAL), then
    restored exactly as docs/site-box.md says (rm the database and its -wal/-shm, cp,
    chmod 600) and the gateway started on it."""
    data = tmp_path / "var"
    async with gateway_factory(settings=["backup.interval_s=3600", f"backup.dir='{tmp_path / 'bk'}'"]) as gw:
        db = gw.storage.path
        setup = sqlite3.connect(db)
        setup.execute("CREATE TABLE heavy (n INTEGER PRIMARY KEY, pad BLOB)")
        setup.commit()
        setup.close()
        stop = threading.Event()
        written = [0]

        def writer() -> None:
            conn = sqlite3.connect(db, timeout=30)
            while not stop.is_set():
                with conn:
                    conn.executemany("INSERT INTO heavy (pad) VALUES (?)", [(b"x" * 512,)] * 200)
                written[0] += 200
            conn.close()

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            while written[0] < 20_000:
                await trio.sleep(0.01)
            path = await gw.backups.take()
        finally:
            stop.set()
            thread.join()
        assert path is not None
        seq_before = sqlite3.connect(db).execute(
            "SELECT rows FROM core_outbox_count WHERE key = 'seq:outbox'").fetchone()[0]
    # The documented restore.
    for end in ("", "-wal", "-shm"):
        (data / f"gatewayd.sqlite3{end}").unlink(missing_ok=True)
    shutil.copy(path, data / "gatewayd.sqlite3")
    (data / "gatewayd.sqlite3").chmod(0o600)
    copy = sqlite3.connect(data / "gatewayd.sqlite3")
    n = copy.execute("SELECT count(*) FROM heavy").fetchone()[0]
    assert n % 200 == 0 and n >= 20_000  # whole transactions only
    copy.close()
    async with gateway_factory(settings=["backup.interval_s=3600", f"backup.dir='{tmp_path / 'bk'}'"]) as gw:
        async with gw_client(gw) as client:
            r = await client.get("/health")
            assert r.status_code == 200, r.text
        conn = sqlite3.connect(gw.storage.path)
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'core_backup_taken'").fetchone()[0] == 0
        seq = conn.execute("SELECT rows FROM core_outbox_count WHERE key = 'seq:outbox'").fetchone()[0]
        conn.close()
        assert seq > seq_before + 1_000_000


def test_doctor_warns_about_a_private_key_others_can_read(tmp_path):
    """ca.key restored from a tarball (or copied in by hand) as 0644: any account on the
    box can issue certificates every device trusts. The doctor checked the master key's
    mode, not the TLS keys'."""
    gatewayd = REPO / ".venv" / "bin" / "gatewayd"
    config = tmp_path / "gatewayd.toml"
    config.write_text(f'[gateway]\ndata_dir = "{tmp_path / "var"}"\n[http]\nlisten = "127.0.0.1:0"\n'
                      '[mqtt]\nbroker = "off"\n[tls]\nhttp = true\n')
    run = subprocess.run([str(gatewayd), "--config", str(config), "tls", "init", "--only", "--name", "gw.local"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr

    def tls_check() -> tuple[int, dict]:
        r = subprocess.run([str(gatewayd), "--config", str(config), "doctor", "--json", "--no-network"],
                           capture_output=True, text=True, timeout=120)
        return r.returncode, next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "tls")

    assert tls_check()[1]["status"] == "ok"
    ca_key = tmp_path / "var" / "tls" / "ca.key"
    ca_key.chmod(0o644)
    _, check = tls_check()
    assert check["status"] == "warn"
    assert check["message"] == f"{ca_key} readable by others: chmod 600 {ca_key}"


async def test_doctor_knows_its_own_running_gateway_behind_required_client_certificates(gateway_factory, tmp_path,
                                                                                         capsys):
    """tls.client_auth = "required" on HTTPS: the doctor's own /health request carries no
    client certificate, so the running gateway's ports were 'in use by another program'
    and the doctor failed a healthy box."""
    init_site(tmp_path / "var" / "tls", "gw", ["localhost"], ["127.0.0.1"])
    port = reserved_port()
    tls = ["tls.http=true", "tls.client_auth='required'"]
    async with gateway_factory(settings=[f"http.listen='127.0.0.1:{port}'", *tls]):
        argv = ["doctor", "--json", "--no-network", "--set", f"gateway.data_dir='{tmp_path / 'var'}'",
                "--set", f"http.listen='127.0.0.1:{port}'", "--set", "mqtt.broker='off'"]
        for s in tls:
            argv += ["--set", s]
        code = await trio.to_thread.run_sync(main, argv)
        checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["port http"]["status"] == "ok", checks["port http"]
    assert "held by this gateway" in checks["port http"]["message"]
