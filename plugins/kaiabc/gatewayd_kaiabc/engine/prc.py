"""Phase response curves to temperature pulses, and phase-shift planning.

A pulse is ``delta_k`` kelvin above (or below) the base temperature for
``duration_h`` hours.  For every circadian time a node starts on the limit
cycle, receives the pulse, and free-runs until transients have decayed; its
mid-level crossing is then compared with an unperturbed twin integrated in
the same batch (same steps, so integration error cancels).  Shifts are in
hours, positive = advance (the pulsed node now runs ahead).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .integrate import SolverConfig, integrate_batch
from .model import phosphorylated_fraction
from .params import RUST_2007, KaiParameters
from .temperature import TemperatureModel, preset
from .timebase import LimitCycle, circadian_time, crossing_times, limit_cycle

# The PRC compares two nearly equal trajectories, so it wants tighter
# tolerances than real-time running: shifts agree with an rtol-1e-9 run to
# ~1e-3 h.  Tighter still is mostly wasted on rejected steps at the
# A = max(0, ...) kink, which every node crosses twice per cycle.
PRC_SOLVER = SolverConfig(solver_type="DOPRI5", absolute_tolerance=1e-8, relative_tolerance=1e-6,
                          max_step_size=0.1)


@dataclass(frozen=True)
class PhaseResponseCurve:
    """Settled phase shift (h, + = advance) at each circadian time for one pulse."""

    circadian_time: np.ndarray
    shift_hours: np.ndarray
    delta_k: float
    duration_h: float
    base_temperature_k: float
    period: float

    def rows(self) -> list[dict]:
        return [{"circadian_time": float(ct), "phase_shift_hours": float(s)}
                for ct, s in zip(self.circadian_time, self.shift_hours)]


def _settled_shifts(cycle: LimitCycle, starts: np.ndarray, tm: TemperatureModel, params: KaiParameters,
                    base_k: float, delta_k: float, duration_h: float, settle_cycles: float,
                    config: SolverConfig, wait_h: float = 0.0) -> np.ndarray:
    n = starts.shape[1]
    y = np.concatenate([starts, starts], axis=1)  # pulsed | control
    pulsed = np.r_[np.full(n, base_k + delta_k), np.full(n, base_k)]
    base = np.full(2 * n, base_k)
    rates = tm.node_rates(params, base)
    if wait_h > 0:
        y = integrate_batch(y, (-wait_h, 0.0), rates, config).y_final
    y = integrate_batch(y, (0.0, duration_h), tm.node_rates(params, pulsed), config).y_final
    settle = duration_h + settle_cycles * cycle.period
    y = integrate_batch(y, (duration_h, settle), rates, config).y_final
    t = np.linspace(settle, settle + 1.6 * cycle.period, int(1.6 * cycle.period / 0.01) + 1)
    traj = integrate_batch(y, (settle, t[-1]), rates, config, t_eval=t).y
    assert traj is not None  # t_eval given
    p = phosphorylated_fraction(np.moveaxis(traj, 0, -1), params.kaic_total)  # (2n, len(t))
    first = np.array([crossing_times(t, row, cycle.level)[0] for row in p])
    d = first[n:] - first[:n]
    return (d + 0.5 * cycle.period) % cycle.period - 0.5 * cycle.period


def compute_prc(*, delta_k: float = 3.0, duration_h: float = 0.5, resolution: int = 24,
                temperature_model: TemperatureModel | None = None, params: KaiParameters = RUST_2007,
                base_temperature_k: float | None = None, settle_cycles: float = 6.0,
                cycle: LimitCycle | None = None, config: SolverConfig = PRC_SOLVER) -> PhaseResponseCurve:
    """PRC for one pulse at ``resolution`` evenly spaced circadian times (CT = 24 x phase)."""
    if resolution < 2:
        raise ValueError("resolution must be >= 2")
    if duration_h <= 0:
        raise ValueError("duration_h must be > 0")
    tm = temperature_model or preset("compensated")
    base = tm.reference_temperature_k if base_temperature_k is None else float(base_temperature_k)
    cyc = cycle or limit_cycle(params, tm, base)
    phases = np.arange(resolution) / resolution
    shifts = _settled_shifts(cyc, np.asarray(cyc.state_at(phases)), tm, params, base, delta_k, duration_h,
                             settle_cycles, config)
    return PhaseResponseCurve(np.asarray(circadian_time(phases)), shifts, float(delta_k), float(duration_h), base,
                              cyc.period)


@dataclass(frozen=True)
class PhaseShiftPlan:
    """A chosen pulse and timing for a requested shift, with prediction and simulated outcome."""

    shift_type: str
    target_hours: float  # signed: + advance, - delay
    circadian_time: float
    optimal_ct_window: str
    delta_k: float
    duration_h: float
    predicted_hours: float
    actual_hours: float
    efficiency: float  # actual / target, signed-consistent (1.0 = exactly as asked)


def _window(prc: PhaseResponseCurve, i: int, sign: float) -> str:
    good = sign * prc.shift_hours >= 0.5 * sign * prc.shift_hours[i]
    n = good.size
    lo = hi = i
    while good[(lo - 1) % n] and (i - lo) < n - 1:
        lo -= 1
    while good[(hi + 1) % n] and (hi - lo) < n - 1:
        hi += 1
    step = 24.0 / n
    return f"{(lo % n) * step:g}-{((hi + 1) % n) * step or 24:g}"


def plan_phase_shift(shift_type: str, magnitude_hours: float, prcs: list[PhaseResponseCurve], *,
                     temperature_model: TemperatureModel | None = None, params: KaiParameters = RUST_2007,
                     cycle: LimitCycle | None = None, current_state: np.ndarray | None = None,
                     settle_cycles: float = 6.0, config: SolverConfig = PRC_SOLVER) -> PhaseShiftPlan:
    """Choose the pulse and CT (from computed PRCs) whose predicted shift best matches the request.

    Prefers the candidate whose predicted shift is closest to the target
    (so the largest available when none reaches it).  The plan is then
    simulated: from ``current_state`` (default: on the cycle at the chosen
    CT) the node free-runs until its geometric phase reaches the chosen CT,
    receives the pulse and settles; the shift against an unpulsed twin is
    the reported actual shift.
    """
    if shift_type not in ("advance", "delay"):
        raise ValueError("shift_type must be 'advance' or 'delay'")
    if not magnitude_hours > 0:
        raise ValueError("magnitude_hours must be > 0")
    if not prcs:
        raise ValueError("need at least one PRC")
    sign = 1.0 if shift_type == "advance" else -1.0
    target = sign * magnitude_hours
    best = None
    for prc in prcs:
        for i, s in enumerate(prc.shift_hours):
            if sign * s > 0 and (best is None or abs(s - target) < abs(best[2] - target)):
                best = (prc, i, float(s))
    if best is None:
        raise ValueError(f"no computed PRC offers any {shift_type}")
    prc, i, predicted = best
    tm = temperature_model or preset("compensated")
    cyc = cycle or limit_cycle(params, tm, prc.base_temperature_k)
    target_phase = prc.circadian_time[i] / 24.0
    if current_state is None:
        start, wait = cyc.state_at(np.array([target_phase])), 0.0
    else:
        start = np.asarray(current_state, dtype=float).reshape(3, 1)
        wait = float((target_phase - cyc.phase_of(start)[0]) % 1.0) * cyc.period
    actual = float(_settled_shifts(cyc, start, tm, params, prc.base_temperature_k, prc.delta_k,
                                   prc.duration_h, settle_cycles, config, wait)[0])
    return PhaseShiftPlan(shift_type, target, float(prc.circadian_time[i]), _window(prc, i, sign),
                          prc.delta_k, prc.duration_h, predicted, actual, actual / target)
