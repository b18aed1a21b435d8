"""``gatewayd kaiabc simulate | q10 | prc``: the engine from the command line.

Registered through the core's command registry (``add_commands``).  Every
command prints a short human table, or one JSON object with ``--json``;
bad input prints one ``error: ...`` line to stderr and returns 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import numpy as np

from gatewayd.plugins.api import CommandRegistry

from .engine import (
    PRESETS,
    RUST_2007,
    EtfMappingError,
    SolverConfig,
    compute_prc,
    estimate_period,
    integrate_batch,
    limit_cycle,
    phosphorylated_fraction,
    preset,
    simulated_q10,
)

_MIN_HOURS = 48.0  # two-plus cycles: fewer gives no usable period


def add_commands(commands: CommandRegistry) -> None:
    """Register the kaiabc commands on the core's registry (``commands.add(name, help, setup, run)``)."""
    commands.add("simulate", "simulate nodes and report period, amplitude and wall time",
                 _setup_simulate, _guarded(_run_simulate))
    commands.add("q10", "temperature coefficient of the period between 25 and 35 degC", _setup_q10,
                 _guarded(_run_q10))
    commands.add("prc", "phase response curve to warm and cold temperature pulses", _setup_prc,
                 _guarded(_run_prc))


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (EtfMappingError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    wrapper.__doc__ = run.__doc__
    return wrapper


def _preset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="compensated", help=f"temperature preset: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _emit(args: argparse.Namespace, body: dict[str, Any], lines: list[str]) -> int:
    print(json.dumps(body) if args.json else "\n".join(lines))
    return 0


def _setup_simulate(p: argparse.ArgumentParser) -> None:
    _preset_arg(p)
    p.add_argument("--temperature-k", type=float, default=303.15, help="temperature in kelvin (303.15)")
    p.add_argument("--hours", type=float, default=120.0, help=f"simulated hours (>= {_MIN_HOURS:g}; 120)")
    p.add_argument("--nodes", type=int, default=1, help="nodes advanced together (1)")


def _run_simulate(args: argparse.Namespace) -> int:
    """Integrate --nodes identical nodes (timed), plus one sampled node for the statistics."""
    if args.hours < _MIN_HOURS:
        raise ValueError(f"--hours must be >= {_MIN_HOURS:g} to estimate a period")
    if not 1 <= args.nodes <= 1_000_000:
        raise ValueError("--nodes must be within 1..1000000")
    tm = preset(args.preset)
    config = SolverConfig()
    rates = tm.node_rates(RUST_2007, np.full(args.nodes, args.temperature_k))
    clock = time.perf_counter()
    batch = integrate_batch(np.zeros((3, args.nodes)), (0.0, args.hours), rates, config)
    wall = time.perf_counter() - clock
    t = np.arange(0.0, args.hours, 0.02)
    one = integrate_batch(np.zeros((3, 1)), (0.0, args.hours), rates.node(0), config, t_eval=t)
    assert one.y is not None  # t_eval given
    p = phosphorylated_fraction(one.y[:, :, 0].T, RUST_2007.kaic_total)
    est = estimate_period(t, p)
    tail = p[t >= args.hours - est.period]
    body = {"preset": args.preset, "temperature_k": args.temperature_k, "hours": args.hours,
            "nodes": args.nodes, "period_hours": est.period, "cycles_used": est.cycles,
            "amplitude": float(0.5 * (tail.max() - tail.min())),
            "phosphorylated_fraction_min": float(tail.min()), "phosphorylated_fraction_max": float(tail.max()),
            "wall_time_s": wall, "solver": config.solver_type, "steps": batch.stats.accepted,
            "rejected_steps": batch.stats.rejected}
    return _emit(args, body, [
        f"preset {args.preset} at {args.temperature_k:.2f} K, {args.nodes} node(s), {args.hours:g} h",
        f"period            {est.period:.3f} h  ({est.cycles} cycles)",
        f"amplitude         {body['amplitude']:.4f}  (half peak-to-trough, phosphorylated fraction)",
        f"phosphorylated    {tail.min():.4f} .. {tail.max():.4f}  (last cycle)",
        f"wall time         {wall:.3f} s  ({batch.stats.accepted} steps, {config.solver_type})"])


def _setup_q10(p: argparse.ArgumentParser) -> None:
    _preset_arg(p)


def _run_q10(args: argparse.Namespace) -> int:
    """Q10 from simulated limit-cycle periods at 298.15 K and 308.15 K."""
    res = simulated_q10(preset(args.preset))
    body = {"preset": args.preset, "q10": res.q10, "period_25c_hours": res.period_low_hours,
            "period_35c_hours": res.period_high_hours}
    return _emit(args, body, [f"preset {args.preset}",
                              f"period at 25 degC  {res.period_low_hours:.3f} h",
                              f"period at 35 degC  {res.period_high_hours:.3f} h",
                              f"Q10               {res.q10:.3f}"])


def _setup_prc(p: argparse.ArgumentParser) -> None:
    _preset_arg(p)
    p.add_argument("--resolution", type=int, default=24, help="circadian times sampled (24)")
    p.add_argument("--delta-k", type=float, default=3.0, help="pulse size in kelvin, applied + and - (3)")
    p.add_argument("--duration-min", type=float, default=30.0, help="pulse length in minutes (30)")


def _run_prc(args: argparse.Namespace) -> int:
    """Settled phase shifts to a warm and a cold pulse at each circadian time."""
    if not 2 <= args.resolution <= 240:
        raise ValueError("--resolution must be within 2..240")
    if not args.delta_k > 0 or not args.duration_min > 0:
        raise ValueError("--delta-k and --duration-min must be > 0")
    tm = preset(args.preset)
    cycle = limit_cycle(RUST_2007, tm)
    kw = dict(duration_h=args.duration_min / 60.0, resolution=args.resolution, temperature_model=tm,
              cycle=cycle)
    warm, cold = compute_prc(delta_k=args.delta_k, **kw), compute_prc(delta_k=-args.delta_k, **kw)
    rows = [{"circadian_time": float(ct), "shift_warm_pulse_hours": float(w),
             "shift_cold_pulse_hours": float(c)}
            for ct, w, c in zip(warm.circadian_time, warm.shift_hours, cold.shift_hours)]
    body = {"preset": args.preset, "reference": "Rust et al. 2007 model, numerical PRC",
            "resolution": args.resolution, "delta_k": args.delta_k, "duration_minutes": args.duration_min,
            "period_hours": cycle.period, "data": rows}
    lines = [f"PRC, preset {args.preset}, +/-{args.delta_k:g} K for {args.duration_min:g} min "
             f"(period {cycle.period:.3f} h; + = advance)", "   CT    warm (h)   cold (h)"]
    lines += [f"{ct:5.1f}  {w:+9.3f}  {c:+9.3f}"
              for ct, w, c in zip(warm.circadian_time, warm.shift_hours, cold.shift_hours)]
    return _emit(args, body, lines)
