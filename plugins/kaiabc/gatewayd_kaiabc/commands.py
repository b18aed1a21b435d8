"""``gatewayd kaiabc simulate | q10 | prc | entrain``: the engine from the command line.

Registered through the core's command registry (``add_commands``).  Every
command prints a short human table, or one JSON object with ``--json``;
bad input prints one ``error: ...`` line to stderr and returns 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Callable

import numpy as np

from gatewayd.plugins.api import CommandRegistry

from .engine import (
    NAMED_SETS,
    RUST_2007,
    TEMPERATURE_RANGE_K,
    EtfMappingError,
    SolverConfig,
    compute_prc,
    entrain,
    estimate_period,
    integrate_batch,
    limit_cycle,
    phosphorylated_fraction,
    named_set,
    simulated_q10,
)

_PERIOD_HOURS = 48.0  # two-plus cycles: fewer gives no usable period
_MAX_HOURS = 24.0 * 365  # a year of simulated time: a bound, so a typo cannot run for ever


def add_commands(commands: CommandRegistry) -> None:
    """Register the kaiabc commands on the core's registry (``commands.add(name, help, setup, run)``)."""
    commands.add("simulate", "simulate nodes and report period, amplitude and wall time",
                 _setup_simulate, _guarded(_run_simulate))
    commands.add("q10", "temperature coefficient of the period between 25 and 35 degC", _setup_q10,
                 _guarded(_run_q10))
    commands.add("prc", "phase response curve to warm and cold temperature pulses", _setup_prc,
                 _guarded(_run_prc))
    commands.add("entrain", "does the oscillator lock to a square temperature cycle? period and phase angle",
                 _setup_entrain, _guarded(_run_entrain))


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
    p.add_argument("--preset", default="compensated", help=f"temperature preset: {', '.join(NAMED_SETS)} "
                   "(docs/model.md, section 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _emit(args: argparse.Namespace, body: dict[str, Any], lines: list[str]) -> int:
    print(json.dumps(body) if args.json else "\n".join(lines))
    return 0


def _setup_simulate(p: argparse.ArgumentParser) -> None:
    _preset_arg(p)
    p.add_argument("--temperature-k", type=float, default=303.15, help="temperature in kelvin (303.15)")
    p.add_argument("--hours", type=float, default=120.0,
                   help=f"simulated hours (up to {_MAX_HOURS:g}; a period needs {_PERIOD_HOURS:g}; 120)")
    p.add_argument("--nodes", type=int, default=1, help="nodes advanced together (1)")


def _run_simulate(args: argparse.Namespace) -> int:
    """Integrate --nodes identical nodes (timed), plus one sampled node for the statistics."""
    _temperature(args.temperature_k, "--temperature-k")
    if not (math.isfinite(args.hours) and 0 < args.hours <= _MAX_HOURS):
        raise ValueError(f"--hours must be within (0, {_MAX_HOURS:g}], got {args.hours}")
    if not 1 <= args.nodes <= 1_000_000:
        raise ValueError("--nodes must be within 1..1000000")
    tm = named_set(args.preset)
    config = SolverConfig()
    rates = tm.node_rates(RUST_2007, np.full(args.nodes, args.temperature_k))
    clock = time.perf_counter()
    batch = integrate_batch(np.zeros((3, args.nodes)), (0.0, args.hours), rates, config)
    wall = time.perf_counter() - clock
    t = np.linspace(0.0, args.hours, max(2, int(args.hours / 0.02)) + 1)
    one = integrate_batch(np.zeros((3, 1)), (0.0, args.hours), rates.node(0), config, t_eval=t)
    assert one.y is not None  # t_eval given
    p = phosphorylated_fraction(one.y[:, :, 0].T, RUST_2007.kaic_total)
    body: dict[str, Any] = {"preset": args.preset, "temperature_k": args.temperature_k, "hours": args.hours,
                            "nodes": args.nodes, "phosphorylated_fraction_final": float(p[-1]),
                            "wall_time_s": wall, "solver": config.solver_type, "steps": batch.stats.accepted,
                            "rejected_steps": batch.stats.rejected}
    lines = [f"preset {args.preset} at {args.temperature_k:.2f} K, {args.nodes} node(s), {args.hours:g} h",
             f"phosphorylated    {p[-1]:.4f}  (at {args.hours:g} h)"]
    est = None
    if args.hours >= _PERIOD_HOURS:
        try:
            est = estimate_period(t, p)
        except ValueError:
            est = None
    if est is None:
        body.update(period_hours=None, note=f"a period needs at least {_PERIOD_HOURS:g} simulated hours "
                                            f"(--hours {_PERIOD_HOURS:g} or more)")
        lines.append(f"period            -  (needs at least {_PERIOD_HOURS:g} simulated hours)")
    else:
        tail = p[t >= args.hours - est.period]
        body.update(period_hours=est.period, cycles_used=est.cycles, amplitude=float(0.5 * (tail.max() - tail.min())),
                    phosphorylated_fraction_min=float(tail.min()), phosphorylated_fraction_max=float(tail.max()))
        lines += [f"period            {est.period:.3f} h  ({est.cycles} cycles)",
                  f"amplitude         {body['amplitude']:.4f}  (half peak-to-trough, phosphorylated fraction)",
                  f"last cycle        {tail.min():.4f} .. {tail.max():.4f}  (phosphorylated fraction)"]
    lines.append(f"wall time         {wall:.3f} s  ({batch.stats.accepted} steps, {config.solver_type})")
    return _emit(args, body, lines)


def _temperature(value: float, flag: str) -> float:
    low, high = TEMPERATURE_RANGE_K
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{flag} must be within {low}..{high} K, got {value}")
    return value


def _setup_q10(p: argparse.ArgumentParser) -> None:
    _preset_arg(p)


def _run_q10(args: argparse.Namespace) -> int:
    """Q10 from simulated limit-cycle periods at 298.15 K and 308.15 K."""
    res = simulated_q10(named_set(args.preset))
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
    p.add_argument("--duration-min", type=float, default=30.0, help="pulse length in minutes, 1..600 (30)")


def _run_prc(args: argparse.Namespace) -> int:
    """Settled phase shifts to a warm and a cold pulse at each circadian time."""
    if not 2 <= args.resolution <= 240:
        raise ValueError("--resolution must be within 2..240")
    tm = named_set(args.preset)
    # The API's bounds (GET /entrainment/prc): a pulse inside the model's temperatures, at most
    # 10 hours long, so neither NaN nor a computation without end can come out.
    low, high = TEMPERATURE_RANGE_K
    base = tm.reference_temperature_k
    most = min(high - base, base - low)
    if not (math.isfinite(args.delta_k) and 0 < args.delta_k <= most):
        raise ValueError(f"--delta-k must be within (0, {most:g}] K (the pulses stay within {low}..{high} K "
                         f"around {base} K), got {args.delta_k}")
    if not (math.isfinite(args.duration_min) and 1 <= args.duration_min <= 600):
        raise ValueError(f"--duration-min must be within 1..600, got {args.duration_min}")
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


def _setup_entrain(p: argparse.ArgumentParser) -> None:
    _preset_arg(p)
    p.add_argument("--cycle-hours", type=float, default=24.0, help="length of one temperature cycle (24)")
    p.add_argument("--low-k", type=float, required=True, help="cold half temperature, kelvin")
    p.add_argument("--high-k", type=float, required=True, help="warm half temperature, kelvin")
    p.add_argument("--days", type=int, default=30, help="cycles simulated (30)")


def _run_entrain(args: argparse.Namespace) -> int:
    """Drive the oscillator with a 12:12 square temperature cycle; report lock, period, phase angle."""
    low, high = _temperature(args.low_k, "--low-k"), _temperature(args.high_k, "--high-k")
    if not math.isfinite(args.cycle_hours):
        raise ValueError("--cycle-hours must be a finite number")
    res = entrain(cycle_hours=args.cycle_hours, low_k=low, high_k=high, days=args.days,
                  temperature_model=named_set(args.preset))
    angle = "-" if res.phase_angle_hours is None else f"{res.phase_angle_hours:.2f} h after the warm onset"
    return _emit(args, {"preset": args.preset, **res.to_json()}, [
        f"{args.cycle_hours:g} h cycle {low:.2f} K / {high:.2f} K, {args.days} cycles, preset {args.preset}",
        f"locked            {'yes' if res.locked else 'no'}",
        f"period            {res.period_hours:.3f} h  (last {res.cycles} cycles; free-running "
        f"{res.free_running_period_hours:.3f} h)",
        f"phase angle       {angle}"])
