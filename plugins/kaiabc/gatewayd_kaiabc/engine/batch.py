"""Many nodes advanced together in real time: ``OscillatorBatch.advance(dt, temperatures)``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .integrate import SolverConfig, StepStats, integrate_batch
from .model import NodeRates, state_variables
from .params import RUST_2007, KaiParameters
from .temperature import TemperatureModel, preset


@dataclass(frozen=True)
class PerformanceMetrics:
    """The ``performance_metrics`` block of the spec's ``GET /simulation/config``.

    * ``average_steps_per_second`` -- accepted batch steps per wall-clock second
      (each step advances every node); ``node_steps_per_second`` multiplies by
      the node count.
    * ``average_iteration_time_ms`` -- mean wall time of one ``advance`` call.
    * ``stability_index`` -- accepted / attempted steps (1.0 = no rejections).
    """

    average_steps_per_second: float
    node_steps_per_second: float
    average_iteration_time_ms: float
    stability_index: float
    iterations: int
    accepted_steps: int
    rejected_steps: int
    rhs_evaluations: int

    def to_spec(self) -> dict:
        return {"average_steps_per_second": self.average_steps_per_second,
                "average_iteration_time_ms": self.average_iteration_time_ms,
                "stability_index": self.stability_index}


class OscillatorBatch:
    """A batch of independent KaiABC oscillators, one per node, sharing one clock.

    States are ``(3, n_nodes)`` arrays of (C_T, C_ST, C_S) in uM; time is in
    hours.  Each node has its own temperature (K); rates are recomputed only
    when temperatures change.  Not thread-safe: drive it from one task.
    """

    def __init__(self, n_nodes: int, *, params: KaiParameters = RUST_2007,
                 temperature_model: TemperatureModel | None = None,
                 config: SolverConfig | None = None,
                 initial_state: np.ndarray | None = None,
                 temperatures: np.ndarray | float | None = None) -> None:
        if n_nodes < 1:
            raise ValueError("n_nodes must be >= 1")
        self.params = params
        self.temperature_model = temperature_model or preset("compensated")
        self.config = config or SolverConfig()
        self.n_nodes = n_nodes
        self.time = 0.0
        self._state = np.zeros((3, n_nodes))
        self.reset(state=initial_state)
        ref = self.temperature_model.reference_temperature_k
        self._temperatures = np.full(n_nodes, np.nan)
        self._rates: NodeRates | None = None
        self.set_temperatures(ref if temperatures is None else temperatures)
        self._next_step: float | None = None
        self._totals = StepStats()
        self._iterations = 0

    @property
    def state(self) -> np.ndarray:
        """A copy of the current ``(3, n_nodes)`` state."""
        return self._state.copy()

    @property
    def temperatures(self) -> np.ndarray:
        return self._temperatures.copy()

    def set_temperatures(self, temperatures: np.ndarray | float) -> None:
        """Set per-node temperatures (K): a scalar or an array of length n_nodes."""
        temps = np.broadcast_to(np.asarray(temperatures, dtype=float), (self.n_nodes,))
        if not np.all(np.isfinite(temps)) or np.any(temps <= 0):
            raise ValueError("temperatures must be finite and in kelvin")
        if not np.array_equal(temps, self._temperatures):
            self._temperatures = temps.copy()
            self._rates = self.temperature_model.node_rates(self.params, self._temperatures)

    def set_config(self, config: SolverConfig) -> None:
        """Swap solver settings; takes effect on the next ``advance`` (no restart needed)."""
        self.config = config
        self._next_step = None

    def reset(self, nodes: np.ndarray | slice | None = None, state: np.ndarray | None = None) -> None:
        """Reset some (default all) nodes to ``state`` ((3,) or (3, k)); default all unphosphorylated."""
        sel = slice(None) if nodes is None else nodes
        value = np.zeros(3) if state is None else np.asarray(state, dtype=float)
        if value.ndim == 1:
            value = value[:, None]
        self._state[:, sel] = value

    def advance(self, dt_hours: float, temperatures: np.ndarray | float | None = None) -> np.ndarray:
        """Advance every node by ``dt_hours``, optionally at new temperatures; returns the new state."""
        if dt_hours < 0:
            raise ValueError("dt_hours must be >= 0")
        if temperatures is not None:
            self.set_temperatures(temperatures)
        if dt_hours == 0:
            return self.state
        assert self._rates is not None  # set by the constructor's set_temperatures
        res = integrate_batch(self._state, (self.time, self.time + dt_hours), self._rates, self.config,
                              first_step=self._next_step)
        self._state = res.y_final
        self._next_step = res.next_step
        self.time += dt_hours
        self._totals.add(res.stats)
        self._iterations += 1
        return self.state

    def state_variables(self) -> dict[str, np.ndarray]:
        """The spec's six state variables per node (uM), including the temperature-dependent sequestration."""
        assert self._rates is not None
        return state_variables(self._state, self.params, sequestration=self._rates.sequestration)

    @property
    def metrics(self) -> PerformanceMetrics:
        s = self._totals
        wall = s.wall_time_s
        attempted = s.accepted + s.rejected
        return PerformanceMetrics(
            average_steps_per_second=s.accepted / wall if wall > 0 else 0.0,
            node_steps_per_second=s.accepted * self.n_nodes / wall if wall > 0 else 0.0,
            average_iteration_time_ms=1e3 * wall / self._iterations if self._iterations else 0.0,
            stability_index=s.accepted / attempted if attempted else 1.0,
            iterations=self._iterations, accepted_steps=s.accepted, rejected_steps=s.rejected,
            rhs_evaluations=s.rhs_evaluations)
