"""Published parameters of the Rust et al. (2007) four-phosphoform KaiC model.

Source: M. J. Rust, J. S. Markson, W. S. Lane, D. S. Fisher, E. K. O'Shea,
"Ordered phosphorylation governs oscillation of a three-protein circadian
clock", Science 318:809-812 (2007), supporting online material, Table S2
(rate constants fitted to KaiA+KaiC phosphorylation/dephosphorylation time
courses at 30 degC).

Every first-order step X -> Y has the rate law

    k_XY(S) = k0_XY + kA_XY * A(S) / (K_half + A(S)),
    A(S)    = max(0, [KaiA] - 2 [S])

where A is the KaiA not sequestered by S-KaiC (with KaiB).  Rust writes the
doubly phosphorylated (S431 and T432) form as D; this package calls it ST,
as the gateway specification does, but keeps Rust's step names (kTD = T->ST,
kDS = ST->S, ...) so the table can be checked against the paper.
"""

from __future__ import annotations

from typing import Any

from dataclasses import dataclass, field, replace

import numpy as np

# Order used by every rate array in the engine.  D is Rust's name for ST.
STEP_NAMES: tuple[str, ...] = ("UT", "TD", "SD", "US", "TU", "DT", "DS", "SU")
PHOSPHORYLATION_STEPS: tuple[str, ...] = ("UT", "TD", "SD", "US")
DEPHOSPHORYLATION_STEPS: tuple[str, ...] = ("TU", "DT", "DS", "SU")

# Table S2 of Rust et al. 2007, per hour.  The negative kA values are
# published: KaiA *slows* ST->S and S->U dephosphorylation.
_RUST_K0 = (0.0, 0.0, 0.0, 0.0, 0.21, 0.0, 0.31, 0.11)
_RUST_KA = (0.479077, 0.212923, 0.505692, 0.0532308, 0.0798462, 0.173, -0.319385, -0.133077)


@dataclass(frozen=True)
class KaiParameters:
    """Rate constants (1/h) and concentrations (uM, KaiC monomer units) of the model.

    ``k0`` and ``ka`` are ordered as :data:`STEP_NAMES`.  ``sequestration`` is
    the number of KaiA monomers taken out of action per S-KaiC monomer (2 in
    the published model).  The defaults are the published set; use
    :func:`dataclasses.replace` for variants.
    """

    k0: tuple[float, ...] = _RUST_K0
    ka: tuple[float, ...] = _RUST_KA
    kaia_total: float = 1.3
    kaic_total: float = 3.4
    k_half: float = 0.43
    sequestration: float = 2.0
    source: str = field(default="Rust et al., Science 318:809 (2007), Table S2", compare=False)

    def __post_init__(self) -> None:
        if len(self.k0) != len(STEP_NAMES) or len(self.ka) != len(STEP_NAMES):
            raise ValueError(f"k0 and ka need {len(STEP_NAMES)} entries ordered {STEP_NAMES}")
        for name in ("kaia_total", "kaic_total", "k_half"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.sequestration < 0:
            raise ValueError("sequestration must be >= 0")

    def k0_array(self) -> np.ndarray:
        return np.asarray(self.k0, dtype=float)

    def ka_array(self) -> np.ndarray:
        return np.asarray(self.ka, dtype=float)

    def rate_constants(self, kaia_free: float) -> dict[str, float]:
        """Every step's rate constant (1/h) at a given free-KaiA level (uM)."""
        frac = kaia_free / (self.k_half + kaia_free)
        return {n: a + b * frac for n, a, b in zip(STEP_NAMES, self.k0, self.ka)}

    def with_overrides(self, **changes: float) -> "KaiParameters":
        """A copy with some fields replaced (validated like the original)."""
        fields: dict[str, Any] = dict(changes)
        return replace(self, **fields)


RUST_2007 = KaiParameters()
"""The published parameter set (30 degC, [KaiA] 1.3 uM, [KaiC] 3.4 uM, K_half 0.43 uM)."""

# Temperature at which Rust et al. measured the time courses behind Table S2.
RUST_2007_TEMPERATURE_K = 303.15
