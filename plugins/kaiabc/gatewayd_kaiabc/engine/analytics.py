"""Period statistics, Q10 and temperature correlation (the spec's /analytics endpoints)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .params import RUST_2007, KaiParameters
from .temperature import TemperatureModel
from .timebase import limit_cycle

# Our own grading of the coefficient of variation; the spec shows the labels
# but not the thresholds.
_QUALITY = ((0.01, "excellent"), (0.03, "good"), (0.06, "fair"))


@dataclass(frozen=True)
class PeriodStability:
    """Statistics of a window of cycle periods (hours)."""

    mean_period_hours: float
    std_deviation_hours: float
    min_period_hours: float
    max_period_hours: float
    coefficient_variation: float
    cycles: int

    @property
    def quality_assessment(self) -> str:
        for limit, label in _QUALITY:
            if self.coefficient_variation < limit:
                return label
        return "poor"


def period_stability(periods: np.ndarray) -> PeriodStability:
    """Mean, sample std, min, max and CV (= std/mean) of at least two periods."""
    p = np.asarray(periods, dtype=float)
    p = p[np.isfinite(p)]
    if p.size < 2:
        raise ValueError("need at least two finite periods")
    mean, std = float(p.mean()), float(p.std(ddof=1))
    return PeriodStability(mean, std, float(p.min()), float(p.max()), std / mean, int(p.size))


def q10_from_periods(period_1: float, temperature_1_k: float, period_2: float, temperature_2_k: float) -> float:
    """Q10 of the oscillator's frequency: (P1 / P2) ** (10 / (T2 - T1)).

    > 1 means the clock runs faster when warmer; 1 is perfect compensation.
    """
    if temperature_2_k == temperature_1_k:
        raise ValueError("temperatures must differ")
    if period_1 <= 0 or period_2 <= 0:
        raise ValueError("periods must be positive")
    return float((period_1 / period_2) ** (10.0 / (temperature_2_k - temperature_1_k)))


@dataclass(frozen=True)
class Q10Result:
    q10: float
    period_low_hours: float
    period_high_hours: float
    temperature_low_k: float
    temperature_high_k: float


def simulated_q10(temperature_model: TemperatureModel, params: KaiParameters = RUST_2007, *,
                  temperature_low_k: float = 298.15, temperature_high_k: float = 308.15) -> Q10Result:
    """Q10 from limit-cycle periods simulated (solve_ivp, LSODA) at two temperatures (default 25/35 degC)."""
    p_low = limit_cycle(params, temperature_model, temperature_low_k).period
    p_high = limit_cycle(params, temperature_model, temperature_high_k).period
    return Q10Result(q10_from_periods(p_low, temperature_low_k, p_high, temperature_high_k),
                     p_low, p_high, temperature_low_k, temperature_high_k)


@dataclass(frozen=True)
class Correlation:
    pearson_r: float
    p_value: float
    n: int


def temperature_correlation(periods: np.ndarray, temperatures: np.ndarray) -> Correlation:
    """Pearson r (and two-sided p-value) between per-cycle periods and mean cycle temperatures."""
    p, t = np.asarray(periods, dtype=float), np.asarray(temperatures, dtype=float)
    if p.shape != t.shape:
        raise ValueError("periods and temperatures must have the same length")
    ok = np.isfinite(p) & np.isfinite(t)
    if ok.sum() < 3:
        raise ValueError("need at least three finite pairs")
    if any(np.ptp(x[ok]) <= 1e-9 * max(1.0, float(np.abs(x[ok]).max())) for x in (p, t)):
        raise ValueError("correlation is undefined when either series is constant")
    from scipy.stats import pearsonr  # imported when used: scipy.stats costs ~1 s at every start

    res = pearsonr(p[ok], t[ok])
    return Correlation(float(res.statistic), float(res.pvalue), int(ok.sum()))
