"""KOA (Kai-complex output activity) and the KOA -> PWM mappings.

KOA is the fraction of KaiC phosphorylated on S431, (C_ST + C_S)/[KaiC]:
the two states the specification lists as contributing (``C_ST``, ``C_S``).
These are the forms that bind KaiB and hence drive the output pathway
(SasA/CikA -> RpaA) in vivo, so their share is a natural output activity.
It lies in [0, 1] by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAPPING_FUNCTIONS = ("linear", "sigmoid", "custom")
# Logistic steepness: the sigmoid reaches 1% / 99% at the two thresholds.
_SIGMOID_SPAN = 2.0 * np.log(99.0)


def koa(y: np.ndarray, kaic_total: float) -> np.ndarray:
    """KOA in [0, 1] for a state ``(3,)`` or batch ``(3, n)`` of (C_T, C_ST, C_S) in uM."""
    y = np.asarray(y, dtype=float)
    return np.clip((y[1] + y[2]) / kaic_total, 0.0, 1.0)


def koa_normalized(value: np.ndarray | float, cycle_min: float, cycle_max: float) -> np.ndarray:
    """KOA rescaled to [0, 1] over its limit-cycle range (clipped)."""
    if not cycle_max > cycle_min:
        raise ValueError("cycle_max must exceed cycle_min")
    return np.clip((np.asarray(value, dtype=float) - cycle_min) / (cycle_max - cycle_min), 0.0, 1.0)


def koa_trend(previous: float, current: float, tolerance: float = 1e-9) -> str:
    """The spec's ``koa_phase``: ``ascending``, ``descending`` or ``steady``."""
    if current - previous > tolerance:
        return "ascending"
    if previous - current > tolerance:
        return "descending"
    return "steady"


def _logistic(v, lo: float, hi: float):
    return 1.0 / (1.0 + np.exp(-_SIGMOID_SPAN / (hi - lo) * (v - 0.5 * (lo + hi))))


@dataclass(frozen=True)
class PwmMapping:
    """The spec's ``PUT /output/mapping`` body.

    KOA is first placed on [0, 1] between the thresholds: ``linear`` maps
    ``(koa - low) / (high - low)`` clipped; ``sigmoid`` is a logistic
    centred between the thresholds, rescaled to be exactly 0 at ``low`` and
    1 at ``high``; ``custom`` interpolates ``custom_points`` ((koa, level)
    pairs, koa increasing, level in [0, 1]).  ``invert`` flips the level,
    then it is spread over [pwm_min, pwm_max] and rounded half up.
    """

    mapping_function: str = "linear"
    pwm_min: int = 0
    pwm_max: int = 255
    koa_threshold_low: float = 0.0
    koa_threshold_high: float = 1.0
    invert: bool = False
    custom_points: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.mapping_function not in MAPPING_FUNCTIONS:
            raise ValueError(f"mapping_function must be one of {MAPPING_FUNCTIONS}")
        if not 0 <= self.pwm_min < self.pwm_max <= 255:
            raise ValueError("need 0 <= pwm_min < pwm_max <= 255")
        if not 0.0 <= self.koa_threshold_low < self.koa_threshold_high <= 1.0:
            raise ValueError("need 0 <= koa_threshold_low < koa_threshold_high <= 1")
        if self.mapping_function == "custom":
            pts = np.asarray(self.custom_points, dtype=float)
            if pts.ndim != 2 or pts.shape[0] < 2 or pts.shape[1] != 2:
                raise ValueError("custom mapping needs at least two (koa, level) points")
            if np.any(np.diff(pts[:, 0]) <= 0) or np.any((pts < 0) | (pts > 1)):
                raise ValueError("custom points need increasing koa and values within [0, 1]")

    def level(self, value: np.ndarray | float) -> np.ndarray:
        """Output level in [0, 1] before scaling to PWM counts."""
        x = np.clip(np.asarray(value, dtype=float), 0.0, 1.0)
        lo, hi = self.koa_threshold_low, self.koa_threshold_high
        if self.mapping_function == "linear":
            out = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
        elif self.mapping_function == "sigmoid":
            s0, s1, sx = (_logistic(v, lo, hi) for v in (lo, hi, x))
            out = np.clip((sx - s0) / (s1 - s0), 0.0, 1.0)
        else:
            pts = np.asarray(self.custom_points, dtype=float)
            out = np.interp(x, pts[:, 0], pts[:, 1])
        return 1.0 - out if self.invert else out

    def pwm(self, value: np.ndarray | float) -> np.ndarray:
        """Integer duty cycle in [pwm_min, pwm_max] (numpy int array, or 0-d for a scalar)."""
        span = self.pwm_max - self.pwm_min
        return np.floor(self.pwm_min + span * self.level(value) + 0.5).astype(int)

    def test_values(self) -> dict:
        """The spec's ``test_values`` block: PWM at KOA 0, 0.5 and 1."""
        return {f"koa_{v:.1f}": {"pwm": int(self.pwm(v))} for v in (0.0, 0.5, 1.0)}
