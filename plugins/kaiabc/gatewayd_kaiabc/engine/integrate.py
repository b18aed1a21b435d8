"""Integrators: a ``solve_ivp`` reference path and a vectorized embedded Runge-Kutta.

The vectorized path advances every node of a batch with one shared step
size; the step is accepted only if every node's scaled error norm is <= 1,
so the batch meets the tolerances node by node.  Sharing the step keeps all
nodes on the same clock, which is what real-time ``advance(dt)`` needs, and
lets each stage be a handful of whole-array numpy operations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from .model import NodeRates, make_scalar_rhs, rhs_batch


class StepSizeError(RuntimeError):
    """Error control asked for a step below the configured ``min_step_size``."""


@dataclass(frozen=True)
class Tableau:
    """An embedded explicit RK pair; the solution advances with ``b`` (the higher order)."""

    c: np.ndarray
    a: tuple[np.ndarray, ...]
    b: np.ndarray
    e: np.ndarray  # b - b_low: weights of the local error estimate
    error_order: int  # exponent base for step control: 1 + lower order
    fsal: bool


_DOPRI5 = Tableau(
    c=np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]),
    a=(np.array([]), np.array([1 / 5]), np.array([3 / 40, 9 / 40]), np.array([44 / 45, -56 / 15, 32 / 9]),
       np.array([19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]),
       np.array([9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]),
       np.array([35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84])),
    b=np.array([35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0]),
    e=np.array([35 / 384 - 5179 / 57600, 0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
                -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40]),
    error_order=5, fsal=True)

# Fehlberg's pair, advanced with the 5th-order weights (local extrapolation).
_RKF45 = Tableau(
    c=np.array([0, 1 / 4, 3 / 8, 12 / 13, 1, 1 / 2]),
    a=(np.array([]), np.array([1 / 4]), np.array([3 / 32, 9 / 32]),
       np.array([1932 / 2197, -7200 / 2197, 7296 / 2197]),
       np.array([439 / 216, -8, 3680 / 513, -845 / 4104]),
       np.array([-8 / 27, 2, -3544 / 2565, 1859 / 4104, -11 / 40])),
    b=np.array([16 / 135, 0, 6656 / 12825, 28561 / 56430, -9 / 50, 2 / 55]),
    e=np.array([16 / 135 - 25 / 216, 0, 6656 / 12825 - 1408 / 2565, 28561 / 56430 - 2197 / 4104,
                -9 / 50 + 1 / 5, 2 / 55]),
    error_order=5, fsal=False)

TABLEAUX = {"RKF45": _RKF45, "DOPRI5": _DOPRI5}
_SOLVER_ALIASES = {"RKF45": "RKF45", "RKF": "RKF45", "DOPRI5": "DOPRI5", "DOPRI": "DOPRI5",
                   "DORMAND_PRINCE": "DOPRI5", "DORMAND-PRINCE": "DOPRI5"}


@dataclass(frozen=True)
class SolverConfig:
    """The spec's ``/simulation/config``: solver pair, tolerances (uM), step bounds (hours)."""

    solver_type: str = "RKF45"
    absolute_tolerance: float = 1e-6
    relative_tolerance: float = 1e-5
    max_step_size: float = 0.1
    min_step_size: float = 1e-6
    integration_method: str = "adaptive"

    def __post_init__(self) -> None:
        name = _SOLVER_ALIASES.get(str(self.solver_type).upper())
        if name is None:
            raise ValueError(f"solver_type must be one of {sorted(TABLEAUX)}")
        object.__setattr__(self, "solver_type", name)
        if self.integration_method != "adaptive":
            raise ValueError("integration_method: only 'adaptive' is implemented")
        if not (self.absolute_tolerance > 0 and self.relative_tolerance > 0):
            raise ValueError("tolerances must be > 0")
        if not 0 < self.min_step_size <= self.max_step_size:
            raise ValueError("need 0 < min_step_size <= max_step_size")

    @classmethod
    def from_spec(cls, body: Mapping[str, Any], base: "SolverConfig | None" = None) -> "SolverConfig":
        """Build (or update ``base``) from a spec-shaped config object; unknown keys are rejected."""
        known = {"solver_type", "tolerance", "max_step_size", "min_step_size", "integration_method",
                 "performance_metrics"}
        unknown = set(body) - known
        if unknown:
            raise ValueError(f"unknown solver config keys: {sorted(unknown)}")
        tol = body.get("tolerance", {})
        if not isinstance(tol, dict):  # ("" would pass the key check below and fail as a str)
            raise ValueError("tolerance must be an object with 'absolute' and/or 'relative'")
        if set(tol) - {"absolute", "relative"}:
            raise ValueError("tolerance takes only 'absolute' and 'relative'")
        base = base or cls()
        return replace(base, **{k: v for k, v in {
            "solver_type": body.get("solver_type"),
            "absolute_tolerance": tol.get("absolute"),
            "relative_tolerance": tol.get("relative"),
            "max_step_size": body.get("max_step_size"),
            "min_step_size": body.get("min_step_size"),
            "integration_method": body.get("integration_method")}.items() if v is not None})

    def to_spec(self) -> dict:
        return {"solver_type": self.solver_type,
                "tolerance": {"absolute": self.absolute_tolerance, "relative": self.relative_tolerance},
                "max_step_size": self.max_step_size, "min_step_size": self.min_step_size,
                "integration_method": self.integration_method}


@dataclass
class StepStats:
    """Counters of one integration (or a running total)."""

    accepted: int = 0
    rejected: int = 0
    rhs_evaluations: int = 0
    wall_time_s: float = 0.0

    def add(self, other: "StepStats") -> None:
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.rhs_evaluations += other.rhs_evaluations
        self.wall_time_s += other.wall_time_s


@dataclass
class BatchResult:
    """``y`` is ``(len(t), 3, n_nodes)`` when ``t_eval`` was given, else None."""

    t: np.ndarray
    y: np.ndarray | None
    y_final: np.ndarray
    next_step: float
    stats: StepStats = field(default_factory=StepStats)


def _hermite(y0, f0, y1, f1, h, theta):
    t2, t3 = theta * theta, theta * theta * theta
    return ((2 * t3 - 3 * t2 + 1) * y0 + (t3 - 2 * t2 + theta) * h * f0
            + (3 * t2 - 2 * t3) * y1 + (t3 - t2) * h * f1)


def integrate_batch(y0: np.ndarray, t_span: tuple[float, float], rates: NodeRates,
                    config: SolverConfig = SolverConfig(), *, t_eval: np.ndarray | None = None,
                    first_step: float | None = None) -> BatchResult:
    """Integrate ``(3, n_nodes)`` states over ``t_span`` (hours) with the configured RK pair.

    Output at ``t_eval`` uses cubic Hermite interpolation inside accepted
    steps, so sampling does not shorten the steps.  Raises
    :class:`StepSizeError` if the error control needs a step below
    ``config.min_step_size``.
    """
    tab = TABLEAUX[config.solver_type]
    t0, t1 = float(t_span[0]), float(t_span[1])
    y = np.array(y0, dtype=float, copy=True).reshape(3, -1)
    stages = np.empty((len(tab.c),) + y.shape)
    flat = stages.reshape(len(tab.c), -1)  # a view: stage sums become one BLAS gemv each
    shape = y.shape
    stats = StepStats()
    clock = time.perf_counter()
    out_t = None if t_eval is None else np.asarray(t_eval, dtype=float)
    out_y = None if out_t is None else np.empty((out_t.size,) + y.shape)
    n_out = 0
    if out_t is not None:
        assert out_y is not None
        while n_out < out_t.size and out_t[n_out] <= t0:
            out_y[n_out] = y
            n_out += 1
    rhs_batch(y, rates, out=stages[0])
    stats.rhs_evaluations += 1
    h_try = min(first_step or config.max_step_size, config.max_step_size)
    exponent = -1.0 / tab.error_order
    t = t0
    end_tol = 1e-12 * max(1.0, abs(t1))
    while t1 - t > end_tol:
        h = min(h_try, t1 - t)
        for i in range(1, len(tab.c)):
            if i == len(tab.c) - 1 and tab.fsal:
                y_new = y + ((h * tab.b[:i]) @ flat[:i]).reshape(shape)
                rhs_batch(y_new, rates, out=stages[i])
            else:
                rhs_batch(y + ((h * tab.a[i]) @ flat[:i]).reshape(shape), rates, out=stages[i])
            stats.rhs_evaluations += 1
        if not tab.fsal:
            y_new = y + ((h * tab.b) @ flat).reshape(shape)
        err = ((h * tab.e) @ flat).reshape(shape)
        scale = np.maximum(np.abs(y), np.abs(y_new))
        scale *= config.relative_tolerance
        scale += config.absolute_tolerance
        err /= scale
        err *= err
        err_norm = float(np.sqrt(err.sum(axis=0).max() / 3.0))
        if err_norm <= 1.0:
            f_new = stages[-1] if tab.fsal else rhs_batch(y_new, rates)
            stats.rhs_evaluations += 0 if tab.fsal else 1
            if out_t is not None:
                assert out_y is not None
                while n_out < out_t.size and out_t[n_out] <= t + h:
                    theta = (out_t[n_out] - t) / h
                    out_y[n_out] = _hermite(y, stages[0], y_new, f_new, h, theta)
                    n_out += 1
            t = t1 if t1 - (t + h) <= end_tol else t + h
            y = y_new
            stages[0] = f_new
            stats.accepted += 1
            grow = 5.0 if err_norm == 0 else min(5.0, 0.9 * err_norm ** exponent)
            if h >= h_try or grow < 1.0:  # a step clipped to land on t1 says nothing about h_try
                h_try = min(config.max_step_size, h * grow)
        else:
            stats.rejected += 1
            h_try = h * max(0.2, 0.9 * err_norm ** exponent)
            if h_try < config.min_step_size:
                raise StepSizeError(f"step {h_try:.3g} h below min_step_size {config.min_step_size:.3g} "
                                    f"at t={t:.6g} h (error norm {err_norm:.3g})")
    stats.wall_time_s = time.perf_counter() - clock
    return BatchResult(out_t if out_t is not None else np.array([t1]), out_y, y, h_try, stats)


def solve_reference(rates: NodeRates, y0: np.ndarray, t_span: tuple[float, float], *,
                    t_eval: np.ndarray | None = None, method: str = "LSODA",
                    rtol: float = 1e-10, atol: float = 1e-12, **kwargs: Any):
    """One node through ``scipy.integrate.solve_ivp``: the reference path.

    ``rates`` must hold a single node (see :meth:`NodeRates.node`).  Returns
    scipy's result object; raises RuntimeError if the solver fails.
    """
    from scipy.integrate import solve_ivp  # imported when used: scipy.integrate costs ~0.5 s at every start

    res = solve_ivp(make_scalar_rhs(rates), t_span, np.asarray(y0, dtype=float).reshape(3),
                    method=method, t_eval=t_eval, rtol=rtol, atol=atol, **kwargs)
    if not res.success:
        raise RuntimeError(f"solve_ivp failed: {res.message}")
    return res
