"""edgesentinel: batch ingest over HTTP against the core's batch ingest, and windows per second.

    .venv/bin/python bench/edgesentinel_bench.py [--batches 6] [--records 5000]

1. Batch ingest. One gateway (the plugin, an upstream whose records wait in the outbox:
   nothing drains them, so both paths write the same outbox), in this process, with
   the collector settings of `gatewayd run` (tune_gc). Each
   round: a 5,000-record zstd batch of realistic records (points of eight metrics with
   units, a meta object on one in ten, door events, system events) POSTed to
   `/edgesentinel/api/iot/v1/telemetry/batch` with its headers (auth, Idempotency-Key,
   Content-SHA256), answered after the commit, the duplicate check included
   (seen hashes read, the new ones written); then the baseline: the same records, as
   the plugin turns them into `Record`s and table rows, through `ctx.ingest.records`
   with the same family rows. Figures: records/s of each (medians), and their ratio;
   goal: HTTP >= 50 % of the core's.
2. Windows: `window_stats` over 1,000 vibration waveforms of 1,024 samples (one batch:
   one 2-D numpy array, scipy's Welch along its rows), against the same statistics
   computed one waveform at a time (the baseline); windows/s of each, medians.
3. Retention: the same gateway's point table grown to `--purge-rows` more rows (20
   nodes, a row every few seconds), then the purge of the older half by age, a step
   (`models.STEP` rows, one write transaction) at a time: how long each step holds the
   writer (median, max), against the baseline of the run's `ctx.ingest.records` commits
   of 5,000 records. Goal: a step holds the writer no longer than an ingest batch does
   (else monthly partitioning would be worth it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import trio
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gatewayd_edgesentinel  # noqa: E402
from gatewayd.core.runtime import tune_gc  # noqa: E402
from gatewayd.testing.gateway import gw_url, start_gateway  # noqa: E402
from gatewayd_edgesentinel import models  # noqa: E402
from gatewayd_edgesentinel.batch import parse_batch  # noqa: E402
from gatewayd_edgesentinel.windows import window_stats  # noqa: E402

T0 = 1_767_225_600.0
METRICS = [("stator_temp_c", "C"), ("ambient_temp_c", "C"), ("rh_pct", "%"), ("torque_nm", "Nm"),
           ("current_a", "A"), ("vibration_rms_g", "g"), ("acoustic_db", "dB"), ("supercap_pct", "%")]
UPSTREAM = '[[upstream]]\nname = "cloud"\nurl = "http://127.0.0.1:9/"\nsecret_env = "ES_BENCH_SECRET"\n'


def batch_doc(round_: int, n: int) -> dict[str, object]:
    base = T0 + round_ * n
    points = []
    for i in range(n - n // 100 - 5):
        metric, unit = METRICS[i % len(METRICS)]
        point: dict[str, object] = {"ts": base + i * 0.1, "metric": metric, "value": round(20 + math.sin(i) * 5, 3),
                                    "unit": unit}
        if i % 10 == 0:
            point["meta"] = {"door_id": f"dock-{i % 4}", "seq": i}
        points.append(point)
    doors = [{"ts": base + i, "door_id": f"dock-{i % 4}", "type": "cycle_open" if i % 2 else "cycle_close",
              "duration_ms": 2000 + i} for i in range(n // 100)]
    events = [{"ts": base + i, "event_type": "supercap_low", "severity": "warning", "description": "76% of rated",
               "meta": {"voltage_pct": 76}} for i in range(n - len(points) - len(doors))]
    return {"batch_id": f"buf-{round_}", "points": points, "door_events": doors, "system_events": events}


async def run(batches: int, n: int, purge_rows: int) -> tuple[list[float], list[float], list[float], list[float]]:
    os.environ["ES_BENCH_SECRET"] = "s" * 32
    http_rates, core_rates, core_s = [], [], []
    settings = ["plugins.edgesentinel.require_claim=false", "log.level='warning'", "outbox.max_rows=100000000",
                "http.max_body_bytes=67108864"]
    with tempfile.TemporaryDirectory(prefix="es-bench-") as tmp:
        async with start_gateway(Path(tmp), plugins=[("edgesentinel", gatewayd_edgesentinel)], settings=settings,
                                 config_text=UPSTREAM) as gw:
            _, creds = await gw.devices.registry.provision("edgesentinel", "es-bench")
            ctx = gw.contexts["edgesentinel"]
            state = ctx.state
            zstd = zstandard.ZstdCompressor(level=3)
            async with httpx.AsyncClient(base_url=gw_url(gw), timeout=120) as client:
                for r in range(batches + 1):  # the first round warms up
                    doc = batch_doc(r, n)
                    body = zstd.compress(json.dumps(doc).encode())
                    headers = {"X-Device-Id": "es-bench", "X-Auth-Key": creds.key,
                               "Idempotency-Key": str(uuid.uuid4()), "Content-SHA256": hashlib.sha256(body).hexdigest(),
                               "Content-Encoding": "zstd"}
                    began = time.perf_counter()
                    answer = await client.post("/edgesentinel/api/iot/v1/telemetry/batch", content=body,
                                               headers=headers)
                    took = time.perf_counter() - began
                    assert answer.status_code == 200 and answer.json()["accepted"] == n, answer.text
                    # The baseline: the same records and rows, straight into ctx.ingest.records.
                    again = {**doc, "batch_id": f"core-{r}"}
                    parsed = parse_batch(again, device_id="es-bench", idempotency_key="k", max_records=n,
                                         max_samples=16)
                    rows, records, _ = state._rows("es-bench", parsed, set(), time.time())
                    rows["seen"] = []
                    began = time.perf_counter()
                    await ctx.ingest.records(records, family_rows=lambda rows=rows: state.rows.write(rows))
                    core_took = time.perf_counter() - began
                    if r:
                        http_rates.append(n / took)
                        core_rates.append(n / core_took)
                        core_s.append(core_took)
                    print(f"  round {r}: http {n / took:,.0f} records/s, core {n / core_took:,.0f} records/s"
                          + (" (warm-up)" if not r else ""), flush=True)
            steps = await purge(ctx, purge_rows)
    return http_rates, core_rates, core_s, steps


async def purge(ctx: object, rows: int) -> list[float]:
    """Grow the point table by `rows` (20 devices, by time), then time each retention step
    deleting the older half."""
    table = models.Point._meta.table_name
    sql = f'INSERT INTO "{table}" (ts, device, metric, value, unit, meta) VALUES (?, ?, ?, ?, ?, ?)'
    chunk = 50_000

    def insert(start: int) -> None:
        models._connection(models.Point._meta.database).executemany(sql, (
            (T0 - 40 * 86400 + i * 3.0, f"node-{i % 20}", "vibration_rms_g", 0.5, "g", "{}")
            for i in range(start, min(rows, start + chunk))))

    for start in range(0, rows, chunk):
        await ctx.storage.write(insert, start)  # type: ignore[attr-defined]
    cut = T0 - 40 * 86400 + rows * 3.0 / 2
    steps = []
    while True:
        began = time.perf_counter()
        n = await ctx.storage.write(models.expire_series, models.Point, "device", cut)  # type: ignore[attr-defined]
        if not n:
            break
        steps.append(time.perf_counter() - began)
    print(f"  purge: {len(steps)} steps of up to {models.STEP:,} rows out of {rows:,} added", flush=True)
    return steps


def windows_bench(repeats: int = 5) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    t = np.arange(1024) / 1000.0
    waves = [(T0, "vibration", 1000.0, (np.sin(2 * math.pi * (20 + i % 200) * t) + 0.1 * rng.standard_normal(1024))
              .tolist()) for i in range(1000)]
    bands = {"vibration": [[10.0, 100.0], [100.0, 500.0]]}
    vector, single = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        window_stats(waves, bands)
        vector.append(len(waves) / (time.perf_counter() - began))
        began = time.perf_counter()
        for w in waves[:200]:
            window_stats([w], bands)
        single.append(200 / (time.perf_counter() - began))
    return statistics.median(vector), statistics.median(single)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--purge-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    tune_gc()  # as `gatewayd run`: both paths run in this process
    print(f"1. batch ingest: {args.batches} rounds of {args.records}-record zstd batches")
    http_rates, core_rates, core_s, steps = trio.run(run, args.batches, args.records, args.purge_rows)
    http, core = statistics.median(http_rates), statistics.median(core_rates)
    ratios = [h / c for h, c in zip(http_rates, core_rates, strict=True)]
    print(f"   HTTP batch (auth, hash, zstd, parse, dedup, store): {http:,.0f} records/s (median)")
    print(f"   ctx.ingest.records, same records and rows:          {core:,.0f} records/s (median)")
    print(f"   ratio {http / core:.0%} (median of per-round ratios {statistics.median(ratios):.0%}); goal >= 50 %")
    vector, single = windows_bench()
    print("2. windows: 1,000 waveforms x 1,024 samples, rms/max/std/2 bands (Welch)")
    print(f"   vectorised: {vector:,.0f} windows/s; one at a time: {single:,.0f} windows/s; x{vector / single:.1f}")
    step, commit = statistics.median(steps), statistics.median(core_s)
    print(f"3. retention: the older half of {args.purge_rows:,} more point rows purged by age, {models.STEP:,} a step")
    print(f"   a step holds the writer {step * 1000:.1f} ms (median; max {max(steps) * 1000:.1f} ms); "
          f"a {args.records:,}-record ctx.ingest.records commit {commit * 1000:.1f} ms (median): "
          f"x{step / commit:.2f}; goal <= x1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
