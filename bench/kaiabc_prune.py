"""kaiabc's readings retention: the part-wise prune against one DELETE of the same rows.

    .venv/bin/python bench/kaiabc_prune.py [--rows 600000] [--old 0.33] [--runs 3]

The plugin's own `kaiabc_reading` table (`gatewayd_kaiabc.models`, real SQLite in WAL
with `synchronous=NORMAL` as the gateway opens it) filled with `--rows` readings, the
first `--old` fraction past the retention. Each run starts from a copy of that file:

- parts: `Store.prune_readings(cutoff, PRUNE_PART)` until it deletes nothing, each part
  its own transaction, as the plugin's writer jobs run it;
- baseline (same run, a fresh copy): one `DELETE ... WHERE received_at < cutoff` in one
  transaction, what a prune without parts would hold the writer for.

Printed: the median and the longest part (ms per statement, what an ingest may wait
behind), the parts' total, the single DELETE (ms), their ratios, medians of `--runs`,
with the load average of the machine next to them.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import peewee

try:
    import gatewayd_kaiabc  # noqa: F401
except ImportError:  # a checkout without the plugin installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "plugins" / "kaiabc"))

from gatewayd_kaiabc.models import PRUNE_PART, Store, named  # noqa: E402

START = 1_767_225_600.0
DAY = 86400.0


def open_db(path: str) -> peewee.SqliteDatabase:
    db = peewee.SqliteDatabase(path, pragmas={"journal_mode": "wal", "synchronous": "normal"})
    db.bind(named("kaiabc"))
    return db


def build(path: str, rows: int, nodes: int = 100) -> float:
    """`rows` readings over 45 days, in arrival order; returns the cutoff of 30 days' retention."""
    db = open_db(path)
    db.create_tables(named("kaiabc"))
    table = Store().reading._meta.table_name
    step = 45 * DAY / rows
    with db.atomic():
        db.connection().executemany(
            f"INSERT INTO {table} (node_id, ts, received_at, temperature_k, humidity_percent, pressure_pa, filtered_k) "
            "VALUES (?,?,?,?,?,?,?)",
            ((f"pico_{i % nodes:04d}", START + i * step, START + i * step, 298.0 + (i % 50) / 10, 45.0, 101325.0,
              298.0) for i in range(rows)))
    db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return START + 15 * DAY


def parts(path: str, cutoff: float) -> tuple[list[float], int]:
    db = open_db(path)
    store, times, deleted = Store(), [], 0
    while True:
        t0 = time.perf_counter()
        with db.atomic():
            n = store.prune_readings(cutoff, PRUNE_PART)
        times.append((time.perf_counter() - t0) * 1000)
        deleted += n
        if not n:
            break
    db.close()
    return times, deleted


def one_delete(path: str, cutoff: float) -> tuple[float, int]:
    db = open_db(path)
    reading = Store().reading
    t0 = time.perf_counter()
    with db.atomic():
        n = reading.delete().where(reading.received_at < cutoff).execute()
    ms = (time.perf_counter() - t0) * 1000
    db.close()
    return ms, int(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=600_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        source = f"{tmp}/source.sqlite3"
        cutoff = build(source, args.rows)
        for run in range(args.runs):
            a, b = f"{tmp}/a{run}.sqlite3", f"{tmp}/b{run}.sqlite3"
            shutil.copy(source, a)
            shutil.copy(source, b)
            times, deleted = parts(a, cutoff)
            single, deleted_once = one_delete(b, cutoff)
            assert deleted == deleted_once, (deleted, deleted_once)
            part_times = times[:-1]  # the last statement found nothing to delete
            row = {"median": statistics.median(part_times), "max": max(part_times), "total": sum(times),
                   "single": single, "parts": len(part_times), "deleted": deleted}
            results.append(row)
            print(f"run {run + 1}: {row['parts']} parts of {PRUNE_PART}: median {row['median']:.2f} ms, "
                  f"longest {row['max']:.2f} ms, total {row['total']:.0f} ms; one DELETE of the same "
                  f"{deleted} rows {single:.0f} ms   (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
            os.remove(a)
            os.remove(b)
    med = {k: statistics.median(r[k] for r in results) for k in ("median", "max", "total", "single")}
    print(f"\n{args.rows} readings, {results[0]['deleted']} past the retention; medians of {args.runs} runs:")
    print(f"  a part ({PRUNE_PART} rows, one statement): median {med['median']:.2f} ms, longest {med['max']:.2f} ms")
    print(f"  one DELETE (baseline, same run):        {med['single']:.0f} ms  "
          f"= {med['single'] / med['median']:.0f}x a part's median, {med['single'] / med['max']:.0f}x the longest")
    print(f"  all parts together: {med['total']:.0f} ms = {med['total'] / med['single']:.2f}x the one DELETE")
    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
