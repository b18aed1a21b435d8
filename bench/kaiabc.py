"""Vectorized KaiABC integrator vs a loop of solve_ivp calls, 24 simulated hours.

    python bench/kaiabc.py [--quick] [--repeats R]

Both paths use the same pair family and settings (Dormand-Prince/RKF45 via
SolverConfig for the batch, scipy RK45 = Dormand-Prince for the loop, same
rtol/atol/max_step), so the comparison is at matched accuracy; the table
also shows each path's worst error against LSODA (rtol 1e-10) on sampled
nodes.  Nodes get spread temperatures (25-35 degC) and phases.  The
per-node loop for large N is timed on a sample and extrapolated (marked *).
Times are medians of the repeats.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np
from scipy.integrate import solve_ivp

try:
    from gatewayd_kaiabc.engine import RUST_2007, SolverConfig, integrate_batch, limit_cycle, make_scalar_rhs, preset
except ImportError:  # running from a checkout without the plugin installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "plugins" / "kaiabc"))
    from gatewayd_kaiabc.engine import RUST_2007, SolverConfig, integrate_batch, limit_cycle, make_scalar_rhs, preset

HOURS = 24.0


def _nodes(n: int, rng: np.random.Generator, cycle):
    temps = rng.uniform(298.15, 308.15, n)
    y0 = cycle.state_at(rng.uniform(0, 1, n))
    return temps, y0


def _loop(rates, y0, idx, config):
    clock = time.perf_counter()
    finals = []
    for i in idx:
        res = solve_ivp(make_scalar_rhs(rates.node(i)), (0.0, HOURS), y0[:, i], method="RK45",
                        rtol=config.relative_tolerance, atol=config.absolute_tolerance,
                        max_step=config.max_step_size)
        finals.append(res.y[:, -1])
    return (time.perf_counter() - clock) / len(idx), np.array(finals).T


def _reference(rates, y0, idx):
    out = []
    for i in idx:
        res = solve_ivp(make_scalar_rhs(rates.node(i)), (0.0, HOURS), y0[:, i], method="LSODA",
                        rtol=1e-10, atol=1e-12)
        out.append(res.y[:, -1])
    return np.array(out).T


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N up to 1,000 and fewer repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--solver", default="DOPRI5", help="DOPRI5 (matches scipy RK45) or RKF45")
    args = ap.parse_args(argv)
    sizes = (1, 100, 1000) if args.quick else (1, 100, 1000, 10000)
    repeats = args.repeats or (3 if args.quick else 5)
    sample = 5 if args.quick else 20
    config = SolverConfig(solver_type=args.solver)
    tm = preset("compensated")
    cycle = limit_cycle(RUST_2007, tm)
    rng = np.random.default_rng(7)
    print(f"KaiABC, {HOURS:g} h per node, {config.solver_type} rtol={config.relative_tolerance:g} "
          f"atol={config.absolute_tolerance:g} max_step={config.max_step_size:g} h; medians of {repeats}")
    head = (f"{'N':>6} {'batch s':>9} {'steps':>6} {'node-steps/s':>13} {'loop s':>10} {'loop steps/s':>13} "
            f"{'ratio':>7} {'batch err':>10} {'loop err':>10}")
    print(head)
    print("-" * len(head))
    for n in sizes:
        temps, y0 = _nodes(n, rng, cycle)
        rates = tm.node_rates(RUST_2007, temps)
        walls, res = [], None
        for _ in range(repeats):
            res = integrate_batch(y0, (0.0, HOURS), rates, config)
            walls.append(res.stats.wall_time_s)
        batch = statistics.median(walls)
        idx = np.arange(n) if n <= sample else rng.choice(n, sample, replace=False)
        per_node = [_loop(rates, y0, idx, config) for _ in range(repeats)]
        loop_each = statistics.median(p[0] for p in per_node)
        loop_total = loop_each * n
        loop_steps = solve_ivp(make_scalar_rhs(rates.node(int(idx[0]))), (0.0, HOURS), y0[:, idx[0]],
                               method="RK45", rtol=config.relative_tolerance, atol=config.absolute_tolerance,
                               max_step=config.max_step_size).t.size - 1
        ref = _reference(rates, y0, idx)
        batch_err = np.abs(res.y_final[:, idx] - ref).max()
        loop_err = np.abs(per_node[0][1] - ref).max()
        mark = "*" if len(idx) < n else " "
        print(f"{n:>6} {batch:>9.4f} {res.stats.accepted:>6} {res.stats.accepted * n / batch:>13.3g} "
              f"{loop_total:>9.3f}{mark} {loop_steps / loop_each:>13.3g} {loop_total / batch:>6.1f}x "
              f"{batch_err:>10.2e} {loop_err:>10.2e}")
    print("* loop time extrapolated from a sample of "
          f"{sample} nodes (per-node median x N). Errors: max |y - LSODA(rtol 1e-10)| in uM on sampled nodes.")
    print("steps/s: batch = accepted batch steps x N per second; loop = accepted steps per second of one node.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
