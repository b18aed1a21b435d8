"""Right-hand side of the Rust et al. (2007) model and its state variables.

The integrated state is three concentrations in uM, ``(C_T, C_ST, C_S)``;
``C_U = [KaiC] - C_T - C_ST - C_S`` is conserved away.  Batches of nodes are
stored as arrays shaped ``(3, n_nodes)`` so each species is one contiguous row.
Time is in hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .params import STEP_NAMES, KaiParameters

STATE_NAMES: tuple[str, ...] = ("C_T", "C_ST", "C_S")
SPEC_VARIABLES: tuple[str, ...] = ("C_U", "C_T", "C_ST", "C_S", "A_free", "CABC_complex")
_UT, _TD, _SD, _US, _TU, _DT, _DS, _SU = range(len(STEP_NAMES))


@dataclass(frozen=True)
class NodeRates:
    """Per-node rate data, ready for :func:`rhs_batch`.

    ``k0`` and ``ka`` are ``(8, n_nodes)`` (temperature already applied);
    ``sequestration`` is ``(n_nodes,)``; the rest are scalars in uM.
    """

    k0: np.ndarray
    ka: np.ndarray
    sequestration: np.ndarray
    kaia_total: float
    kaic_total: float
    k_half: float

    @property
    def n_nodes(self) -> int:
        return self.k0.shape[1]

    def node(self, i: int) -> "NodeRates":
        """The rates of one node, as a batch of one."""
        return NodeRates(self.k0[:, i : i + 1], self.ka[:, i : i + 1], self.sequestration[i : i + 1],
                         self.kaia_total, self.kaic_total, self.k_half)


def rhs_batch(y: np.ndarray, r: NodeRates, out: np.ndarray | None = None) -> np.ndarray:
    """d(C_T, C_ST, C_S)/dt in uM/h for states shaped ``(3, n_nodes)`` (written into ``out`` if given)."""
    t, d, s = y
    a = r.kaia_total - r.sequestration * s
    np.maximum(a, 0.0, out=a)
    k = r.k0 + r.ka * (a / (r.k_half + a))
    u = r.kaic_total - t - d - s
    if out is None:
        out = np.empty_like(y)
    out[0] = k[_UT] * u + k[_DT] * d - (k[_TU] + k[_TD]) * t
    out[1] = k[_TD] * t + k[_SD] * s - (k[_DT] + k[_DS]) * d
    out[2] = k[_US] * u + k[_DS] * d - (k[_SU] + k[_SD]) * s
    return out


def make_scalar_rhs(rates: NodeRates) -> Callable[[float, np.ndarray], list[float]]:
    """A plain-float RHS ``f(t, y)`` of one node, for ``scipy.integrate.solve_ivp``.

    Written with Python floats rather than numpy because per-call overhead,
    not arithmetic, dominates a three-variable system.
    """
    if rates.n_nodes != 1:
        raise ValueError("make_scalar_rhs takes the rates of a single node")
    k0 = [float(v) for v in rates.k0[:, 0]]
    ka = [float(v) for v in rates.ka[:, 0]]
    seq = float(rates.sequestration[0])
    kaia, ctot, kh = rates.kaia_total, rates.kaic_total, rates.k_half

    def f(_t: float, y: np.ndarray) -> list[float]:
        t, d, s = y
        a = kaia - seq * s
        frac = a / (kh + a) if a > 0.0 else 0.0
        kut, ktd, ksd, kus, ktu, kdt, kds, ksu = (b + c * frac for b, c in zip(k0, ka))
        u = ctot - t - d - s
        return [kut * u + kdt * d - (ktu + ktd) * t,
                ktd * t + ksd * s - (kdt + kds) * d,
                kus * u + kds * d - (ksu + ksd) * s]

    return f


def phosphorylated_fraction(y: np.ndarray, kaic_total: float) -> np.ndarray:
    """Fraction of KaiC carrying at least one phosphate, (T + ST + S)/[KaiC]."""
    return (y[0] + y[1] + y[2]) / kaic_total


def state_variables(y: np.ndarray, params: KaiParameters, sequestration: np.ndarray | float | None = None) -> dict:
    """The specification's six state variables (uM) from ``(C_T, C_ST, C_S)``.

    * ``C_U`` = [KaiC] - C_T - C_ST - C_S (conservation of KaiC).
    * ``A_free`` = max(0, [KaiA] - n*C_S): KaiA not sequestered (n = 2, Rust 2007).
    * ``CABC_complex`` = [KaiA] - A_free: KaiA held in S-KaiC*KaiB*KaiA
      complexes, i.e. min([KaiA], n*C_S), in uM of KaiA monomer.
    Works for one state ``(3,)`` or a batch ``(3, n)``.
    """
    y = np.asarray(y, dtype=float)
    n = params.sequestration if sequestration is None else sequestration
    a_free = np.maximum(params.kaia_total - n * y[2], 0.0)
    return {
        "C_U": params.kaic_total - y[0] - y[1] - y[2],
        "C_T": y[0],
        "C_ST": y[1],
        "C_S": y[2],
        "A_free": a_free,
        "CABC_complex": params.kaia_total - a_free,
    }


def state_from_variables(values: Mapping[str, float], params: KaiParameters, *,
                         units: str = "uM", tol: float = 1e-6) -> np.ndarray:
    """Build ``(C_T, C_ST, C_S)`` from a mapping of the specification's variables.

    ``units`` is ``"uM"`` or ``"fraction"`` (of total KaiC for C_*, of total
    KaiA for A_free/CABC_complex).  Only C_T, C_ST, C_S are free; C_U,
    A_free and CABC_complex are determined by them, so if given they must
    agree (within ``tol``) or a ValueError is raised rather than silently
    overriding one of them.
    """
    unknown = set(values) - set(SPEC_VARIABLES)
    if unknown:
        raise ValueError(f"unknown state variables: {sorted(unknown)}")
    if units not in ("uM", "fraction"):
        raise ValueError("units must be 'uM' or 'fraction'")
    c_scale = params.kaic_total if units == "fraction" else 1.0
    a_scale = params.kaia_total if units == "fraction" else 1.0
    y = np.array([float(values.get(n, 0.0)) * c_scale for n in STATE_NAMES])
    if np.any(y < -tol) or y.sum() > params.kaic_total + tol:
        raise ValueError("C_T, C_ST, C_S must be >= 0 and sum to at most total KaiC")
    derived = state_variables(y, params)
    for name, scale in (("C_U", c_scale), ("A_free", a_scale), ("CABC_complex", a_scale)):
        if name in values and abs(float(values[name]) * scale - float(derived[name])) > tol * max(1.0, scale):
            raise ValueError(
                f"{name}={values[name]} is inconsistent with C_T/C_ST/C_S "
                f"(the model implies {float(derived[name]) / scale:.6g} {units}); it is derived, not free")
    return y


def unphosphorylated_state(params: KaiParameters) -> np.ndarray:
    """All KaiC unphosphorylated: the usual start of an in vitro reaction."""
    return np.zeros(3)
