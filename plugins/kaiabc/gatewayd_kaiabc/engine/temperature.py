"""Temperature dependence: the entrainment transfer function (ETF) of the specification.

Rust et al. (2007) fitted their rates at 30 degC only and give no temperature
dependence, so everything here is a model assumption on top of the published
set, which applies unchanged at the reference temperature.  docs/model.md,
section 5, gives the reasoning and the sources; in short, each step's whole
rate (its k0 and kA terms together, so a rate never changes sign) follows
Arrhenius, ``k(T) = f * k(T_ref) * exp(-Ea/R * (1/T - 1/T_ref))``, with the
activation energy of its mechanism:

* the four phosphorylation steps (UT, TD, SD, US) and the two S431
  dephosphorylation steps (DT, SU): the spec's activation energy E;
* the two T432 dephosphorylation steps (TU, DS), which run as ATP synthesis
  from ADP bound to KaiC (the ATPase constraint): ``E * (1 - c * (1 - rho))``
  with ``rho = COMPENSATION_RATIO`` for the ``compensated`` preset (1 for
  ``case_ii_mutant``) and c the coupling strength.

With the published set the T432 dephosphorylation steps carry nearly all of
the period's sensitivity to dephosphorylation (control coefficients TU + DS =
-1.16 against DT + SU = -0.01), so giving them the low activation energy
compensates the period (Ruoff's balance, sum C_i E_i = 0) while the other
steps keep E: a temperature change then moves the phosphorylation and the
T432 dephosphorylation phases differently, and the clock entrains to
temperature cycles.  KaiA sequestration by S-KaiC (structural coupling) may
carry a temperature dependence of its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from .model import NodeRates
from .params import RUST_2007_TEMPERATURE_K, STEP_NAMES, KaiParameters

GAS_CONSTANT = 8.314462618  # J/(mol K)
DEFAULT_ACTIVATION_KJ_MOL = 40.0  # the spec's arrhenius_scaling value
# The spec's pre_exponential_factor and baseline_f_hyd values: the published rates.
NOMINAL_PREFACTOR = 1.5e8
NOMINAL_F_HYD = 0.5
# T432-dephosphorylation Ea as a fraction of E that nulls Q10(25->35 degC) at
# E = 40 kJ/mol (solved numerically; see docs/model.md).
COMPENSATION_RATIO = 0.162
MODULATION_FUNCTIONS = ("linear", "nonlinear_sigmoid", "exponential")
PRESETS = ("compensated", "case_ii_mutant")
T432_DEPHOSPHORYLATION = ("TU", "DS")
_T432_OFF = np.array([name in T432_DEPHOSPHORYLATION for name in STEP_NAMES])
TEMPERATURE_RANGE_K = (273.15, 323.15)  # the specification's valid range


class EtfMappingError(ValueError):
    """An ETF parameter the model cannot take, naming it (``field`` is its dotted path)."""

    def __init__(self, message: str, field: str = "", provided: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.provided = provided


@dataclass(frozen=True)
class StructuralCoupling:
    """KaiA sequestration strength and its temperature modulation.

    Rust's feedback is the sequestration of KaiA by S-KaiC (with KaiB):
    ``A = max(0, [KaiA] - 2 d(T) [S])``.  ``baseline_d_i`` is d at the
    reference temperature (1.0 = the published model); away from it
    ``d(T) = baseline_d_i * g(sensitivity * (T - T_ref) / 10 K)`` with g(0) = 1:
    linear ``1 + x`` (floored at 0), exponential ``exp(x)``, nonlinear_sigmoid
    ``2 / (1 + exp(-x))``.
    """

    baseline_d_i: float = 1.0
    modulation_function: str = "linear"
    sensitivity: float = 0.0

    def __post_init__(self) -> None:
        if not self.baseline_d_i > 0:
            raise EtfMappingError("structural_coupling.baseline_d_i must be > 0", "structural_coupling.baseline_d_i",
                                  self.baseline_d_i)
        if self.modulation_function not in MODULATION_FUNCTIONS:
            raise EtfMappingError(f"structural_coupling.modulation_function must be one of {MODULATION_FUNCTIONS}",
                                  "structural_coupling.modulation_function", self.modulation_function)

    def factor(self, temperatures: np.ndarray, t_ref: float) -> np.ndarray:
        return _modulation(np.array([MODULATION_FUNCTIONS.index(self.modulation_function)]),
                           self.sensitivity * (np.asarray(temperatures, dtype=float) - t_ref) / 10.0) * self.baseline_d_i


def _modulation(kind: np.ndarray, x: np.ndarray) -> np.ndarray:
    """g(x) per node: kind indexes MODULATION_FUNCTIONS (linear, sigmoid, exponential)."""
    with np.errstate(over="ignore"):
        return np.where(kind == 0, np.maximum(1.0 + x, 0.0),
                        np.where(kind == 1, 2.0 / (1.0 + np.exp(-x)), np.exp(np.minimum(x, 50.0))))


@dataclass(frozen=True)
class TemperatureModel:
    """Per-step activation energies (J/mol, ordered as STEP_NAMES), constant rate factors, a
    reference temperature and an optional structural coupling.

    Step rate k(T) = factor * k(T_ref) * exp(-Ea/R * (1/T - 1/T_ref)).
    """

    name: str
    activation_energies: tuple[float, ...]
    reference_temperature_k: float = RUST_2007_TEMPERATURE_K
    structural: StructuralCoupling | None = None
    rate_factors: tuple[float, ...] = (1.0,) * len(STEP_NAMES)

    def __post_init__(self) -> None:
        if len(self.activation_energies) != len(STEP_NAMES) or len(self.rate_factors) != len(STEP_NAMES):
            raise ValueError(f"need {len(STEP_NAMES)} activation energies and rate factors ordered {STEP_NAMES}")
        if not self.reference_temperature_k > 0:
            raise EtfMappingError("reference temperature must be > 0 K", "reference_temperature_kelvin",
                                  self.reference_temperature_k)

    def step_scale(self, temperatures: np.ndarray) -> np.ndarray:
        """Rate factor per step and node, shaped ``(8, n_nodes)``."""
        return ModelStack([self]).step_scale(temperatures)

    def node_rates(self, params: KaiParameters, temperatures: np.ndarray) -> NodeRates:
        """Rate data for a batch of nodes at the given temperatures (K), all with this model."""
        return ModelStack([self]).node_rates(params, temperatures)


class ModelStack:
    """One temperature model per node, as arrays: the rates of a whole batch in one pass.

    A stack of one model broadcasts over any number of temperatures.
    """

    def __init__(self, models: Sequence[TemperatureModel]) -> None:
        if not models:
            raise ValueError("need at least one temperature model")
        self.models = tuple(models)
        self.ea = np.array([m.activation_energies for m in models], dtype=float).T  # (8, n)
        self.factors = np.array([m.rate_factors for m in models], dtype=float).T
        self.t_ref = np.array([m.reference_temperature_k for m in models], dtype=float)
        plain = StructuralCoupling()
        sc = [m.structural or plain for m in models]
        self.d0 = np.array([s.baseline_d_i for s in sc])
        self.sensitivity = np.array([s.sensitivity for s in sc])
        self.kind = np.array([MODULATION_FUNCTIONS.index(s.modulation_function) for s in sc])

    def __len__(self) -> int:
        return len(self.models)

    def step_scale(self, temperatures: np.ndarray | float) -> np.ndarray:
        temps = np.atleast_1d(np.asarray(temperatures, dtype=float))
        if np.any(~np.isfinite(temps)) or np.any(temps <= 0):
            raise ValueError("temperatures must be finite and in kelvin (> 0)")
        inv = 1.0 / temps - 1.0 / self.t_ref
        return self.factors * np.exp(-self.ea / GAS_CONSTANT * inv)

    def sequestration(self, params: KaiParameters, temperatures: np.ndarray | float) -> np.ndarray:
        temps = np.atleast_1d(np.asarray(temperatures, dtype=float))
        x = self.sensitivity * (temps - self.t_ref) / 10.0
        return params.sequestration * self.d0 * _modulation(self.kind, x)

    def node_rates(self, params: KaiParameters, temperatures: np.ndarray | float) -> NodeRates:
        temps = np.atleast_1d(np.asarray(temperatures, dtype=float))
        scale = self.step_scale(temps)
        seq = np.broadcast_to(self.sequestration(params, temps), scale.shape[1:]).copy()
        return NodeRates(params.k0_array()[:, None] * scale, params.ka_array()[:, None] * scale, seq,
                         params.kaia_total, params.kaic_total, params.k_half)


# -- the spec's ETF parameters --------------------------------------------------------

_NUMBERS: dict[str, tuple[float, float, bool]] = {  # field -> (low, high, low exclusive)
    "reference_temperature_kelvin": (*TEMPERATURE_RANGE_K, False),
    "arrhenius_scaling.activation_energy_kJ_mol": (0.0, 200.0, False),
    "arrhenius_scaling.pre_exponential_factor": (NOMINAL_PREFACTOR / 10, NOMINAL_PREFACTOR * 10, False),
    "structural_coupling.baseline_d_i": (0.0, 5.0, True),
    "structural_coupling.sensitivity": (-10.0, 10.0, False),
    "atpase_constraint.baseline_f_hyd": (0.05, 0.95, False),
    "atpase_constraint.coupling_strength": (0.0, 1.0, False),
}
_CHOICES = {
    "structural_coupling.modulation_function": MODULATION_FUNCTIONS,
    "atpase_constraint.temperature_dependence": PRESETS,
}
_ATTRIBUTES = {
    "reference_temperature_kelvin": "reference_temperature_k",
    "arrhenius_scaling.activation_energy_kJ_mol": "activation_energy_kj_mol",
    "arrhenius_scaling.pre_exponential_factor": "pre_exponential_factor",
    "structural_coupling.baseline_d_i": "baseline_d_i",
    "structural_coupling.modulation_function": "modulation_function",
    "structural_coupling.sensitivity": "sensitivity",
    "atpase_constraint.baseline_f_hyd": "baseline_f_hyd",
    "atpase_constraint.temperature_dependence": "temperature_dependence",
    "atpase_constraint.coupling_strength": "coupling_strength",
}
GROUPS = ("arrhenius_scaling", "structural_coupling", "atpase_constraint")


@dataclass(frozen=True)
class EtfParameters:
    """The specification's ETFParameters (and the reference temperature), every field with
    its meaning in the model (docs/model.md, section 5).  The defaults are the
    published model at 303.15 K, temperature compensated."""

    activation_energy_kj_mol: float = DEFAULT_ACTIVATION_KJ_MOL
    pre_exponential_factor: float = NOMINAL_PREFACTOR
    baseline_d_i: float = 1.0
    modulation_function: str = "linear"
    sensitivity: float = 0.0
    baseline_f_hyd: float = NOMINAL_F_HYD
    temperature_dependence: str = "compensated"
    coupling_strength: float = 1.0
    reference_temperature_k: float = RUST_2007_TEMPERATURE_K

    def __post_init__(self) -> None:
        for path, attribute in _ATTRIBUTES.items():
            _check(path, getattr(self, attribute))

    def document(self) -> dict[str, Any]:
        """The spec's ``parameters`` object (GET /entrainment/parameters)."""
        out: dict[str, Any] = {group: {} for group in GROUPS}
        for path, attribute in _ATTRIBUTES.items():
            if "." in path:
                group, key = path.split(".")
                out[group][key] = getattr(self, attribute)
        return out

    def merge(self, patch: Mapping[str, Any]) -> EtfParameters:
        """Apply a partial ``parameters`` object as a JSON merge patch (RFC 7396): given
        fields change, the rest stay as they are, ``null`` restores a field's default.
        ``reference_temperature_kelvin`` may be given at the top level too.
        Raises :class:`EtfMappingError` naming the first field it cannot take."""
        changes: dict[str, Any] = {}
        defaults = EtfParameters()
        for group, body in patch.items():
            if group == "reference_temperature_kelvin":
                changes["reference_temperature_k"] = defaults.reference_temperature_k if body is None else body
                continue
            if group not in GROUPS:
                raise EtfMappingError(f"unknown ETF parameter group {group!r}; expected one of {GROUPS}", group)
            if body is None:
                for path, attribute in _ATTRIBUTES.items():
                    if path.startswith(group + "."):
                        changes[attribute] = getattr(defaults, attribute)
                continue
            if not isinstance(body, Mapping):
                raise EtfMappingError(f"{group} must be an object", group, body)
            for key, value in body.items():
                path = f"{group}.{key}"
                if path not in _ATTRIBUTES:
                    known = sorted(p.split(".")[1] for p in _ATTRIBUTES if p.startswith(group + "."))
                    raise EtfMappingError(f"unknown ETF parameter {path}; {group} takes {known}", path)
                attribute = _ATTRIBUTES[path]
                changes[attribute] = getattr(defaults, attribute) if value is None else _check(path, value)
        return replace(self, **changes)

    def model(self) -> TemperatureModel:
        """The temperature model these parameters describe."""
        e = self.activation_energy_kj_mol * 1e3
        rho = COMPENSATION_RATIO if self.temperature_dependence == "compensated" else 1.0
        ea = np.where(_T432_OFF, e * (1.0 - self.coupling_strength * (1.0 - rho)), e)
        factors = np.full(len(STEP_NAMES), self.pre_exponential_factor / NOMINAL_PREFACTOR)
        factors[_T432_OFF] *= (self.baseline_f_hyd / NOMINAL_F_HYD) ** self.coupling_strength
        structural = None
        if (self.baseline_d_i, self.sensitivity) != (1.0, 0.0):
            structural = StructuralCoupling(self.baseline_d_i, self.modulation_function, self.sensitivity)
        return TemperatureModel(self.temperature_dependence, tuple(float(v) for v in ea),
                                self.reference_temperature_k, structural, tuple(float(v) for v in factors))

    def as_dict(self) -> dict[str, Any]:
        """Flat, for storage: ``EtfParameters(**d)`` rebuilds it."""
        return asdict(self)


def _check(path: str, value: Any) -> Any:
    if path in _CHOICES:
        if value not in _CHOICES[path]:
            raise EtfMappingError(f"{path} must be one of {list(_CHOICES[path])}, got {value!r}", path, value)
        return value
    low, high, open_low = _NUMBERS[path]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EtfMappingError(f"{path} must be a finite number, got {value!r}", path, value)
    if not (low < value if open_low else low <= value) or value > high:
        bound = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise EtfMappingError(f"{path} must be within {bound}, got {value!r}", path, value)
    return float(value)


def preset(name: str, *, activation_energy_kj_mol: float = DEFAULT_ACTIVATION_KJ_MOL,
           coupling_strength: float | None = None,
           reference_temperature_k: float = RUST_2007_TEMPERATURE_K,
           structural: StructuralCoupling | None = None) -> TemperatureModel:
    """A named temperature preset (``compensated`` or ``case_ii_mutant``) with the other
    ETF fields at their defaults; ``coupling_strength`` c in [0, 1] blends the T432
    dephosphorylation Ea between compensated (c = 1) and uncompensated (c = 0)."""
    if name not in PRESETS:
        raise EtfMappingError(f"unknown temperature preset {name!r}; choose one of {PRESETS}",
                              "atpase_constraint.temperature_dependence", name)
    etf = EtfParameters(activation_energy_kj_mol=activation_energy_kj_mol, temperature_dependence=name,
                        coupling_strength=1.0 if coupling_strength is None else coupling_strength,
                        reference_temperature_k=reference_temperature_k)
    return replace(etf.model(), structural=structural)


STRONG_COUPLING = EtfParameters(sensitivity=-0.25, coupling_strength=0.325)
"""The documented `strong_coupling` set (docs/model.md, 5): KaiA sequestration weakening with warmth
(structural sensitivity -0.25, linear) and the ATPase coupling re-solved so that Q10(25->35 degC) is
1.00 again; the published model at the reference temperature, and three to four times the default's
PRC (+0.57 / -0.40 h to the spec's +3 K, 30 min pulse). As the spec's body: `PUT /entrainment/parameters`
`{"structural_coupling": {"sensitivity": -0.25}, "atpase_constraint": {"coupling_strength": 0.325}}`."""
NAMED_SETS = {"compensated": EtfParameters(), "case_ii_mutant": EtfParameters(temperature_dependence="case_ii_mutant"),
              "strong_coupling": STRONG_COUPLING}


def named_set(name: str) -> TemperatureModel:
    """The model of a named parameter set (the CLI's `--preset`): the spec's two presets and
    `strong_coupling`."""
    if name not in NAMED_SETS:
        raise EtfMappingError(f"unknown temperature preset {name!r}; choose one of {sorted(NAMED_SETS)}",
                              "preset", name)
    return NAMED_SETS[name].model()


def from_etf(parameters: Mapping[str, Any], *, reference_temperature_k: float | None = None,
             default_preset: str = "compensated") -> TemperatureModel:
    """The model of the spec's ETFParameters object, merged onto the defaults."""
    base = EtfParameters(temperature_dependence=default_preset,
                         reference_temperature_k=(RUST_2007_TEMPERATURE_K if reference_temperature_k is None
                                                  else reference_temperature_k))
    return base.merge(parameters).model()
