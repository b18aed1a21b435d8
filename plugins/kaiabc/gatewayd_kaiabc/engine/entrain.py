"""Entrainment to a temperature cycle: does the oscillator lock, with what period and phase?

A square-wave cycle holds ``high_k`` for the warm part of each cycle
(``warm_fraction``, 0.5 = 12:12 for 24 h) and ``low_k`` for the rest, starting
warm at t = 0.  Several nodes start at evenly spaced phases of the free-running
limit cycle and run together in one batch for ``days`` cycles.  The phase
marker is the upward crossing of the phosphorylated fraction through the
middle of its range over the last cycles (CT 0); the period is the mean
interval between markers over the last ``cycles`` cycles, and the phase angle
is where the marker falls after the warm onset, in hours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .integrate import SolverConfig, integrate_batch
from .model import phosphorylated_fraction
from .params import RUST_2007, KaiParameters
from .temperature import TemperatureModel, preset
from .timebase import crossing_times, limit_cycle

ENTRAIN_SOLVER = SolverConfig(solver_type="DOPRI5", absolute_tolerance=1e-8, relative_tolerance=1e-6,
                              max_step_size=0.1)
PERIOD_TOLERANCE_H = 0.1  # locked: the mean period over the last cycles within this of the cycle's
PHASE_SPREAD_H = 0.5  # ... and the phase angle moving less than this over them, from every start


@dataclass(frozen=True)
class EntrainmentResult:
    """What ``entrain`` found; periods and angles per starting phase, in hours."""

    locked: bool
    cycle_hours: float
    low_k: float
    high_k: float
    days: int
    cycles: int
    period_hours: float  # mean over every start of the mean period over the last `cycles` cycles
    periods: tuple[float, ...]  # per start
    phase_angle_hours: float | None  # CT 0 after the warm onset (circular mean over starts), None if not locked
    phase_angles: tuple[float, ...]  # per start, at the last cycle
    phase_spread_hours: float  # largest drift of the angle over the last cycles, over every start
    free_running_period_hours: float

    def to_json(self) -> dict[str, object]:
        return {"locked": self.locked, "cycle_hours": self.cycle_hours, "low_k": self.low_k, "high_k": self.high_k,
                "days": self.days, "cycles_used": self.cycles, "period_hours": self.period_hours,
                "periods_hours": list(self.periods), "phase_angle_hours": self.phase_angle_hours,
                "phase_angles_hours": list(self.phase_angles), "phase_spread_hours": self.phase_spread_hours,
                "free_running_period_hours": self.free_running_period_hours}


def _circular_spread(angles: np.ndarray, period: float) -> float:
    """Largest distance of the angles from their circular mean (hours)."""
    mean = _circular_mean(angles, period)
    d = (angles - mean + period / 2) % period - period / 2
    return float(np.abs(d).max())


def _circular_mean(angles: np.ndarray, period: float) -> float:
    z = np.exp(2j * np.pi * np.asarray(angles) / period).mean()
    return float((np.angle(z) / (2 * np.pi) * period) % period)


def entrain(*, cycle_hours: float = 24.0, low_k: float, high_k: float, days: int = 30,
            warm_fraction: float = 0.5, temperature_model: TemperatureModel | None = None,
            params: KaiParameters = RUST_2007, starts: int = 4, cycles: int = 5,
            config: SolverConfig = ENTRAIN_SOLVER) -> EntrainmentResult:
    """Run ``starts`` nodes through ``days`` temperature cycles and judge the lock (see the module doc)."""
    if not 1.0 <= cycle_hours <= 240.0:
        raise ValueError("cycle_hours must be within 1..240")
    if not low_k < high_k:
        raise ValueError("low_k must be below high_k")
    if not 0.0 < warm_fraction < 1.0:
        raise ValueError("warm_fraction must be within (0, 1)")
    if not cycles + 2 <= days <= 1000:
        raise ValueError(f"days must be within {cycles + 2}..1000")
    tm = temperature_model or preset("compensated")
    free = limit_cycle(params, tm)
    y = np.asarray(free.state_at(np.arange(starts) / starts)).reshape(3, starts)
    warm = tm.node_rates(params, np.full(starts, high_k))
    cold = tm.node_rates(params, np.full(starts, low_k))
    keep_from = (days - cycles - 1) * cycle_hours  # the last cycles, and one before them for the first interval
    times: list[np.ndarray] = []
    values: list[np.ndarray] = []
    t = 0.0
    for _ in range(days):
        for rates, length in ((warm, warm_fraction * cycle_hours), (cold, (1 - warm_fraction) * cycle_hours)):
            if t + length <= keep_from:
                y = integrate_batch(y, (t, t + length), rates, config).y_final
            else:
                tt = np.linspace(t, t + length, max(2, int(length / 0.01)) + 1)
                res = integrate_batch(y, (t, t + length), rates, config, t_eval=tt)
                assert res.y is not None  # t_eval given
                y = res.y_final
                times.append(tt[:-1])
                values.append(phosphorylated_fraction(np.moveaxis(res.y, 0, -1), params.kaic_total)[:, :-1])
            t += length
    tt, p = np.concatenate(times), np.concatenate(values, axis=1)
    periods, angles, spreads = [], [], []
    for row in p:
        level = 0.5 * (row.max() + row.min())
        marks = crossing_times(tt, row, level)
        marks = marks[marks >= tt[0] + cycle_hours]  # exactly the last `cycles` intervals, when it is locked
        if marks.size < 2 or row.max() - row.min() < 1e-3:
            periods.append(float("nan"))
            angles.append(float("nan"))
            spreads.append(float("inf"))
            continue
        periods.append(float((marks[-1] - marks[0]) / (marks.size - 1)))
        angle = marks % cycle_hours
        angles.append(float(angle[-1]))
        spreads.append(_circular_spread(angle, cycle_hours))
    per = np.asarray(periods)
    locked = bool(np.all(np.isfinite(per)) and np.all(np.abs(per - cycle_hours) <= PERIOD_TOLERANCE_H)
                  and max(spreads) <= PHASE_SPREAD_H
                  and _circular_spread(np.asarray(angles), cycle_hours) <= PHASE_SPREAD_H)
    return EntrainmentResult(
        locked=locked, cycle_hours=cycle_hours, low_k=low_k, high_k=high_k, days=days, cycles=cycles,
        period_hours=float(np.nanmean(per)) if np.any(np.isfinite(per)) else float("nan"),
        periods=tuple(periods), phase_angle_hours=_circular_mean(np.asarray(angles), cycle_hours) if locked else None,
        phase_angles=tuple(angles), phase_spread_hours=float(max(spreads)), free_running_period_hours=free.period)
