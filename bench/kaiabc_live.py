"""kaiabc's live oscillators in real time: CPU seconds per wall second for N nodes.

    .venv/bin/python bench/kaiabc_live.py [--seconds 10] [--sizes 100,1000,10000] [--stream-every 1]

What runs is the plugin's own loop (`gatewayd_kaiabc.live.Fleet`): every node advanced
by one simulated second per wall second (1 s ticks, the default `tick_s` and
`time_acceleration`), one batch on a worker thread, each node at its own temperature
(25-35 degC) and phase; every `--stream-every` seconds every node's `oscillator.state`
(and `output.pwm` where the duty changed) is published on the core's live hub as the
plugin does it (`publish_states`: a few columnar batches per tick), and one
WebSocket-like subscriber watching every node (the core's default queue of 256 events)
turns them into the spec's per-node text frames as the plugin's socket does
(`gatewayd_kaiabc.ws.frames`). The HTTP/WebSocket
transport itself is not in the figure. CPU is the process's (`time.process_time`: the trio thread and the worker
threads). Baseline in the same run: the engine alone, `integrate_batch` advancing the
same N nodes by one simulated second (CPU per call = CPU per wall second at 1 s ticks).
Medians over the ticks; the goal (issue 20): 10,000 live nodes under 0.25 CPU s/s.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np
import trio

try:
    import gatewayd_kaiabc  # noqa: F401
except ImportError:  # a checkout without the plugin installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "plugins" / "kaiabc"))

from gatewayd.core.live.hub import FamilyLive, Gap, LiveHub  # noqa: E402
from gatewayd_kaiabc.engine import RUST_2007, integrate_batch  # noqa: E402
from gatewayd_kaiabc.live import BATCHED, Fleet, publish_states  # noqa: E402
from gatewayd_kaiabc.ws import frames  # noqa: E402


async def live(n: int, seconds: int, stream_every: int) -> tuple[float, float, int, int]:
    """(CPU s per wall s over the run, median CPU s of one tick, frames delivered, hub events dropped)."""
    fleet = Fleet()
    await fleet.prepare()
    rng = np.random.default_rng(7)
    for i in range(n):
        fleet.add(f"n{i:05d}")
    cycle = fleet.cycle
    assert cycle is not None
    fleet.y[:, :n] = cycle.state_at(rng.uniform(0, 1, n))
    fleet.temps[:n] = rng.uniform(298.15, 308.15, n)
    hub = LiveHub(max_subscribers=4)  # the core's defaults: a subscriber's queue holds 256 events, the ring 1,000
    family = FamilyLive(hub, "kaiabc", None)  # type: ignore[arg-type]  # publishing needs no access check
    # what the plugin's WebSocket asks of the hub for a client subscribed to oscillator.state.* and output.pwm.*
    sub = hub.subscribe([f"kaiabc.{kind}.*" for kind in BATCHED.values()], owner="bench")
    kinds = {f"kaiabc.{hub_kind}": kind for kind, hub_kind in BATCHED.items()}
    delivered = gaps = 0

    async def socket() -> None:
        nonlocal delivered, gaps
        while batch := await sub.next():
            for item in batch:  # what the plugin's WebSocket sends: one text frame per node's event
                if isinstance(item, Gap):
                    gaps += item.dropped
                    continue
                delivered += len(frames(kinds[item.stream.rsplit(".", 1)[0]], item.data, {"*"}))

    ticks: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(socket)
        await fleet.tick(1 / 3600)  # warm up (rates, first step)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        deadline = trio.current_time()
        for second in range(seconds):
            deadline += 1.0
            await trio.sleep_until(deadline)
            cpu = time.process_time()
            await fleet.tick(1 / 3600)
            if second % stream_every == 0:
                now = time.time()  # as the plugin does: events built on a worker thread, published here
                states, pwm = await trio.to_thread.run_sync(fleet.live_events, now, "2026-01-01T00:00:00Z")
                publish_states(family, states, pwm)
                await trio.sleep(0)  # let the subscriber take them within this tick
            ticks.append(time.process_time() - cpu)
        await trio.sleep(0.5)  # the last events out
        wall, cpu_total = time.perf_counter() - start_wall, time.process_time() - start_cpu
        nursery.cancel_scope.cancel()
    return cpu_total / wall, statistics.median(ticks), delivered, gaps


def engine(n: int, repeats: int = 11) -> float:
    """Median CPU s of integrate_batch advancing n nodes by one simulated second."""
    fleet = Fleet()
    rng = np.random.default_rng(7)
    y = np.abs(rng.normal(0.5, 0.2, (3, n)))
    rates = fleet.model.node_rates(RUST_2007, rng.uniform(298.15, 308.15, n))
    integrate_batch(y, (0.0, 1 / 3600), rates, fleet.config)
    cpu = []
    for _ in range(repeats):
        clock = time.process_time()
        integrate_batch(y, (0.0, 1 / 3600), rates, fleet.config)
        cpu.append(time.process_time() - clock)
    return statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--stream-every", type=int, default=1, help="seconds between state streams (1: every tick)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"kaiabc live: 1 s ticks in real time for {args.seconds} s, state streamed every {args.stream_every} s "
          "to one subscriber of every stream")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    head = (f"{'N':>6} {'CPU s/s':>8} {'tick CPU ms':>12} {'frames/s':>9} {'dropped':>8} {'engine ms':>10} "
            f"{'live/engine':>12} {'goal':>12}")
    print(head)
    print("-" * len(head))
    for n in sizes:
        base = engine(n)
        share, tick, delivered, dropped = trio.run(live, n, args.seconds, args.stream_every)
        goal = "< 0.25 " + ("ok" if share < 0.25 else "MISSED") if n == 10_000 else ""
        print(f"{n:>6} {share:>8.3f} {1e3 * tick:>12.2f} {delivered / args.seconds:>9.0f} {dropped:>8} "
              f"{1e3 * base:>10.2f} {tick / base:>11.1f}x {goal:>12}")
    print("CPU s/s: process CPU seconds per wall second over the run (trio and worker threads).")
    print("tick CPU ms: median CPU of one tick (advance + stream); engine ms: integrate_batch alone, same N")
    print("(CPU ms per simulated second: at 1 s ticks, engine CPU s/s = engine ms / 1000). frames/s: the spec's")
    print("per-node frames the subscriber built; dropped: hub events its queue (256, the core's default) lost.")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
