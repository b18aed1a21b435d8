"""Ingest and drain bench: the real ingest path and sync worker against same-run baselines.

    .venv/bin/python bench/ingest_bench.py [--quick]

1. Batch ingest: `Ingest.records()` (validation, JSON, the writer thread's group commit,
   family rows + outbox rows + counts in one transaction) vs raw `sqlite3.executemany`
   of the same final rows into the same tables, one transaction per chunk, same pragmas.
2. Drain: a backlog sent by the real `SyncWorker` + `HttpSink` (zstd) to the reference
   receiver (`python -m gatewayd receive`, a separate process), until the backlog is 0.
3. Memory: a 1,000,000-record backlog drained by a fresh process; its peak RSS
   (VmHWM) and RSS sampled during the drain.
4. Where the time goes: each stage of the drain run back to back on one thread, in
   microseconds per record: the gateway's (choose the batch, splice the records,
   encode = compress + sign, mark delivered) and the reference receiver's (decode =
   verify + decompress + parse + validate, store).

5. Profiles (`gateway.profile`, core/profile.py): the 1,000,000-record drain again with
   each profile's settings (garbage collector, upstream batch size, reader threads),
   peak RSS side by side.

Medians of the repeats; goals: ingest >= 40 % of executemany, drain >= 100k records/s,
RSS during the 1M drain < 200 MB; with gateway.profile = "small", peak RSS < 100 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gatewayd.core.outbox.ingest import Ingest, Record  # noqa: E402
from gatewayd.core.outbox.store import Outbox, OutboxPolicy  # noqa: E402
from gatewayd.core.storage import Storage  # noqa: E402
from gatewayd.core.upstream.http_sink import HttpSink  # noqa: E402
from gatewayd.core.upstream.worker import SyncWorker  # noqa: E402

SECRET = "bench-secret"
CHUNK = 5000
FAMILY_SQL = "CREATE TABLE IF NOT EXISTS bench_reading (id INTEGER PRIMARY KEY, device TEXT, seq INTEGER, value REAL)"


def records(start: int, n: int) -> list[Record]:
    return [Record(f"dev-{i % 50}", "reading", {"seq": i, "value": i * 0.5, "unit": "C"}, None, "history")
            for i in range(start, start + n)]


def family(start: int, n: int) -> list[tuple]:
    return [(f"dev-{i % 50}", i, i * 0.5) for i in range(start, start + n)]


# -- 1. batch ingest ------------------------------------------------------------------


async def ingest_run(path: Path, total: int, callers: int = 1) -> float:
    storage = Storage(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        await storage.write(lambda: storage.database.execute_sql(FAMILY_SQL))
        outbox = Outbox(storage, OutboxPolicy(), ["cloud"])
        await outbox.open()
        ingest = Ingest(outbox, "bench", time.time)
        conn_rows = storage.database
        starts = iter(range(0, total, CHUNK))

        async def caller() -> None:
            for start in starts:
                rows = family(start, CHUNK)
                await ingest.records(records(start, CHUNK), family_rows=lambda: conn_rows.connection().executemany(
                    "INSERT INTO bench_reading (device, seq, value) VALUES (?, ?, ?)", rows))

        began = time.perf_counter()
        async with trio.open_nursery() as callers_nursery:
            for _ in range(callers):
                callers_nursery.start_soon(caller)
        elapsed = time.perf_counter() - began
        nursery.cancel_scope.cancel()
    return total / elapsed


def raw_run(path: Path, total: int, outbox_rows: list[list[tuple]]) -> float:
    """The floor: the same final rows, prepared statements, one transaction per chunk."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("PRAGMA synchronous=normal")
    conn.execute(FAMILY_SQL)
    conn.execute("CREATE TABLE core_outbox (id INTEGER PRIMARY KEY, prio INTEGER, pending INTEGER,"
                 " created REAL, ts REAL, family TEXT, device TEXT, kind TEXT, size INTEGER, data TEXT)")
    conn.execute("CREATE INDEX core_outbox_send ON core_outbox (prio, id, pending)")
    began = time.perf_counter()
    for n, start in enumerate(range(0, total, CHUNK)):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO bench_reading (device, seq, value) VALUES (?, ?, ?)", family(start, CHUNK))
        conn.executemany("INSERT INTO core_outbox (id, prio, pending, created, ts, family, device, kind, size, data)"
                         " VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?)", outbox_rows[n])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - began
    conn.close()
    return total / elapsed


def bench_ingest(tmp: Path, total: int, repeats: int) -> dict:
    ing = Ingest(None, "bench", time.time)  # only to build the exact rows the path stores
    prepared = [[(s + i + 1, *row) for i, row in enumerate(ing._rows(list(records(s, CHUNK)), time.time()))]
                for s in range(0, total, CHUNK)]
    ours, pair, raw = [], [], []
    for r in range(repeats):  # interleaved: the machine is noisy
        raw.append(raw_run(tmp / f"raw-{r}.sqlite3", total, prepared))
        ours.append(trio.run(ingest_run, tmp / f"ingest-{r}.sqlite3", total, 1))
        pair.append(trio.run(ingest_run, tmp / f"ingest2-{r}.sqlite3", total, 2))
    base = statistics.median(raw)
    return {"records": total, "raw_executemany_rps": base,
            "ingest_rps": statistics.median(ours), "ratio": statistics.median(ours) / base,
            "ingest_2_callers_rps": statistics.median(pair), "ratio_2_callers": statistics.median(pair) / base}


# -- 2./3. drain ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def null_receiver(port: int) -> None:
    """A far end that reads each batch and answers 200 without decoding or storing it:
    what the gateway side alone can push."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without this, Nagle's algorithm holds
        # the body until the client's delayed ACK (40 ms) and the bench measures that.
        disable_nagle_algorithm = True

        def do_GET(self):
            self._answer(b'{"status":"ok"}')

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._answer(b'{"accepted":null,"duplicates":0,"rejected":0,"next_hint":null}')

        def _answer(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def start_receiver(db: Path | None) -> tuple[subprocess.Popen, str]:
    """The reference receiver (`gatewayd receive`), or the null one when `db` is None."""
    port = free_port()
    command = ([sys.executable, __file__, "--null-receiver", str(port)] if db is None else
               [sys.executable, "-m", "gatewayd", "receive", "--listen", f"127.0.0.1:{port}", "--db", str(db)])
    proc = subprocess.Popen(
        command,
        cwd=ROOT, env={**os.environ, "GATEWAYD_UPSTREAM_SECRET": SECRET},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("receiver did not start")


async def fill(path: Path, total: int) -> None:
    storage = Storage(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        outbox = Outbox(storage, OutboxPolicy(), ["cloud"])
        await outbox.open()
        ingest = Ingest(outbox, "bench", time.time)
        for start in range(0, total, 20_000):
            await ingest.records(records(start, min(20_000, total - start)))
        nursery.cancel_scope.cancel()


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def drain(path: Path, url: str, profile: str | None = None) -> dict:
    """Drain the backlog; with `profile`, with what that profile configures (a gateway
    with one [[upstream]] and nothing else set), else with the bench's own settings."""
    max_records, max_bytes, readers = 5000, 4 << 20, 4
    if profile is not None:
        from gatewayd.core.config import load_config

        config = load_config(None, [f"gateway.profile='{profile}'"],
                             text='[[upstream]]\nname = "cloud"\nurl = "http://bench"\n')
        sink = config.upstream[0]
        max_records, max_bytes, readers = sink.max_records, sink.max_bytes, config.storage.readers
    storage = Storage(path, readers=readers)
    samples: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        outbox = Outbox(storage, OutboxPolicy(), ["cloud"])
        await outbox.open()
        total = outbox.counts["sink:cloud"][0]
        worker = SyncWorker(outbox, HttpSink("cloud", url), gateway_id="bench-gw", secret=SECRET.encode(),
                            compression="zstd", max_records=max_records, max_bytes=max_bytes, linger_s=0)
        began = time.perf_counter()
        await nursery.start(worker.run)
        while outbox.counts["sink:cloud"][0]:
            samples.append(rss_kb())
            await trio.sleep(0.05)
        elapsed = time.perf_counter() - began
        nursery.cancel_scope.cancel()
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return {"records": total, "seconds": elapsed, "rps": total / elapsed,
            "rss_max_mb": max(samples, default=0) / 1024, "vmhwm_mb": hwm / 1024,
            "batches": worker.stats.batches}


def drain_in_subprocess(db: Path, url: str, profile: str | None = None) -> dict:
    """A fresh process, so its peak RSS is the drain's and nothing else's."""
    extra = ["--profile", profile] if profile else []
    out = subprocess.run([sys.executable, __file__, "--drain-only", str(db), url, *extra], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def receiver_ceiling(tmp: Path, total: int) -> float:
    """The reference receiver alone: pre-encoded batches posted back to back."""
    from gatewayd.protocol.batch import encode_batch

    wire = [{"id": i, "family": "bench", "device": f"dev-{i % 50}", "kind": "reading",
             "ts": "2026-01-01T00:00:00.000Z", "class": "history", "data": {"seq": i, "value": i * 0.5, "unit": "C"}}
            for i in range(total)]
    bodies = [encode_batch(wire[s:s + CHUNK], gateway_id="bench-gw", batch_id=str(uuid.uuid4()),
                           secret=SECRET.encode(), compression="zstd", now=time.time()) for s in range(0, total, CHUNK)]
    proc, url = start_receiver(tmp / "ceiling.db")
    try:
        with httpx.Client(timeout=60) as client:
            began = time.perf_counter()
            for batch in bodies:
                assert client.post(url + "/v1/batch", content=batch.body, headers=batch.headers).status_code == 200
            return total / (time.perf_counter() - began)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def stage_costs(tmp: Path, total: int) -> dict:
    """Microseconds per record of each drain stage, one thread, no network."""
    from gatewayd.core.outbox.records import OpenBatch, serialize_records
    from gatewayd.core.upstream.receiver import ReceiverStore
    from gatewayd.protocol.batch import decode_batch, encode_batch, rfc3339_utc

    db = tmp / "stages.sqlite3"
    trio.run(fill, db, total)
    storage = Storage(db)
    storage.open()  # this thread runs the writer's jobs itself: one thread for everything
    outbox = Outbox(storage, OutboxPolicy(), ["cloud"])
    outbox.install()
    conn = storage.database
    conn.connect(reuse_if_open=True)
    receiver = ReceiverStore(tmp / "stages-received.db")
    spent = dict.fromkeys(("choose", "splice", "encode", "delivered", "receiver_decode", "receiver_store"), 0.0)
    clock = time.perf_counter
    while True:
        t0 = clock()
        records = outbox._select(outbox.bits["cloud"], CHUNK, 4 << 20)
        if not records:
            break
        batch = OpenBatch("cloud", str(uuid.uuid4()), records)
        with conn.atomic():
            outbox._persist([batch])
        t1 = clock()
        spliced = serialize_records(batch.records)
        t2 = clock()
        encoded = encode_batch(spliced, gateway_id="bench-gw", batch_id=batch.batch_id, secret=SECRET.encode(),
                               compression="zstd", now=time.time())
        t3 = clock()
        with conn.atomic():
            outbox._delivered(batch, time.time())
        t4 = clock()
        decoded = decode_batch(encoded.body, encoded.headers, secret_for=lambda _: SECRET.encode(), now=time.time())
        t5 = clock()
        receiver.store_batch(decoded, rfc3339_utc(time.time()))
        t6 = clock()
        for key, took in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            spent[key] += took
    receiver.close()
    conn.close()
    storage.close()
    return {key: took * 1e6 / total for key, took in spent.items()}


def bench_drain(tmp: Path, total: int, repeats: int, *, null: bool = False, profile: str | None = None) -> dict:
    runs = []
    for r in range(repeats):
        db = tmp / f"drain-{total}-{null}-{profile}-{r}.sqlite3"
        received = None if null else tmp / f"received-{total}-{profile}-{r}.db"
        trio.run(fill, db, total)
        proc, url = start_receiver(received)
        try:
            runs.append(drain_in_subprocess(db, url, profile))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        if received is not None:
            got = sqlite3.connect(received).execute("SELECT COUNT(*) FROM records").fetchone()[0]
            assert got == total, f"receiver holds {got} of {total}"
        db.unlink()
    return {"records": total, "rps": statistics.median(r["rps"] for r in runs),
            "rss_max_mb": max(r["rss_max_mb"] for r in runs), "vmhwm_mb": max(r["vmhwm_mb"] for r in runs),
            "runs": runs}


def bench_profiles(tmp: Path, total: int) -> dict:
    """The big drain with each profile's settings, one after the other in this run."""
    out = {}
    for profile in ("default", "small"):
        run = bench_drain(tmp, total, 1, profile=profile)
        out[profile] = {"rps": run["rps"], "vmhwm_mb": run["vmhwm_mb"], "rss_max_mb": run["rss_max_mb"],
                        "batches": run["runs"][0]["batches"]}
    d, s = out["default"], out["small"]
    print(f"{total:,}-record drain, profile default  {d['rps']:>10,.0f} records/s   VmHWM {d['vmhwm_mb']:.0f} MB, "
          f"RSS max {d['rss_max_mb']:.0f} MB")
    print(f"{total:,}-record drain, profile small    {s['rps']:>10,.0f} records/s   VmHWM {s['vmhwm_mb']:.0f} MB, "
          f"RSS max {s['rss_max_mb']:.0f} MB (goal < 100 MB); throughput ratio {s['rps'] / d['rps']:.2f}, "
          f"peak ratio {s['vmhwm_mb'] / d['vmhwm_mb']:.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (CI smoke)")
    parser.add_argument("--drain-only", nargs=2, metavar=("DB", "URL"), help=argparse.SUPPRESS)
    parser.add_argument("--null-receiver", metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--default-gc", action="store_true", help="keep Python's GC thresholds (no tune_gc)")
    parser.add_argument("--profile", choices=["default", "small"], help=argparse.SUPPRESS)  # a drain subprocess
    parser.add_argument("--profiles-only", action="store_true", help="only the profiles' 1M drains (section 5)")
    args = parser.parse_args()
    if args.default_gc:
        os.environ["GATEWAYD_BENCH_DEFAULT_GC"] = "1"  # for the drain subprocesses too
    if args.profile:
        from gatewayd.core.runtime import tune_gc_for

        tune_gc_for(args.profile)  # what `gatewayd run` does with that profile
    elif not os.environ.get("GATEWAYD_BENCH_DEFAULT_GC"):
        from gatewayd.core.runtime import tune_gc

        tune_gc()  # what `gatewayd run` (and `gatewayd receive`) do
    if args.null_receiver:
        null_receiver(int(args.null_receiver))
        return
    if args.drain_only:
        print(json.dumps(trio.run(drain, Path(args.drain_only[0]), args.drain_only[1], args.profile)))
        return
    n_ingest, n_drain, n_big, repeats = (50_000, 50_000, 200_000, 3) if args.quick else (200_000, 200_000, 1_000_000, 5)
    with tempfile.TemporaryDirectory(prefix="gatewayd-ingest-bench-") as d:
        tmp = Path(d)
        if args.profiles_only:
            print(json.dumps({"profiles": bench_profiles(tmp, n_big)}))
            return
        ingest = bench_ingest(tmp, n_ingest, repeats)
        print(f"raw executemany (same rows)       {ingest['raw_executemany_rps']:>10,.0f} records/s")
        print(f"batch ingest, 1 caller            {ingest['ingest_rps']:>10,.0f} records/s   ratio {ingest['ratio']:.2f}"
              " (goal >= 0.40)")
        print(f"batch ingest, 2 callers           {ingest['ingest_2_callers_rps']:>10,.0f} records/s   ratio "
              f"{ingest['ratio_2_callers']:.2f}")
        ceiling = receiver_ceiling(tmp, n_drain)
        print(f"reference receiver alone          {ceiling:>10,.0f} records/s   (pre-encoded batches, no gateway)")
        drained = bench_drain(tmp, n_drain, 3)
        print(f"drain to the reference receiver   {drained['rps']:>10,.0f} records/s   ratio to the receiver alone "
              f"{drained['rps'] / ceiling:.2f} (goal >= 100,000)")
        null = bench_drain(tmp, n_drain, 3, null=True)
        print(f"drain to a null receiver          {null['rps']:>10,.0f} records/s   (the gateway side alone)")
        big = bench_drain(tmp, n_big, 1)
        print(f"{n_big:,}-record backlog drain  {big['rps']:>10,.0f} records/s   RSS max {big['rss_max_mb']:.0f} MB, "
              f"VmHWM {big['vmhwm_mb']:.0f} MB (goal < 200 MB)")
        profiles = bench_profiles(tmp, n_big)
        stages = stage_costs(tmp, n_drain)
        print("per record, one thread (us):       " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        print(json.dumps({"ingest": ingest, "receiver_alone_rps": ceiling, "stages_us_per_record": stages,
                          "drain": {k: v for k, v in drained.items() if k != "runs"},
                          "drain_null": {k: v for k, v in null.items() if k != "runs"},
                          "big_drain": big["runs"][0], "profiles": profiles}))


if __name__ == "__main__":
    main()
