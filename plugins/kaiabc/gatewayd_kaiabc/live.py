"""The live oscillators: one per registered node, advanced together.

`Fleet` holds every node's state as columns of one `(3, n)` array, its filtered
temperature, its Kalman filter and its pause flag. `tick(dt_hours)` advances every
running node in one vectorised batch on a worker thread (never one solve per node,
never on the trio thread); a node that stops reporting runs on its last filtered
temperature and is flagged stale. `rows()` / `restore()` persist and resume it.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import trio

from .engine import (RUST_2007, EtfParameters, LimitCycle, PwmMapping, SensorKalmanFilter, SolverConfig,
                     integrate_batch, koa, koa_normalized, limit_cycle, state_variables)
from .engine.timebase import circadian_time

SPEC_STATE = ("C_U", "C_S", "C_T", "C_ST", "A_free", "CABC_complex")


@dataclass(frozen=True)
class Snapshot:
    """One node's oscillator as the state routes answer it."""

    node_id: str
    state: np.ndarray  # (3,) C_T, C_ST, C_S in uM
    temperature_k: float
    sim_hours: float
    paused: bool
    stale: bool
    has_reading: bool


class Fleet:
    """Every node's live oscillator (see the module doc). Drive `tick` from one task."""

    def __init__(self, etf: EtfParameters | None = None, config: SolverConfig | None = None) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.y = np.zeros((3, 0))
        self.sim_hours = np.zeros(0)
        self.temps = np.zeros(0)
        self.paused = np.zeros(0, dtype=bool)
        self.last_reading = np.zeros(0)  # epoch s; nan = never
        self.filters: dict[str, SensorKalmanFilter] = {}
        self.etf = etf or EtfParameters()
        self.model = self.etf.model()
        self.config = config or SolverConfig()
        self.mapping = PwmMapping()
        self.cycle: LimitCycle | None = None
        self._koa_range = (0.0, 1.0)
        self._touched: set[int] = set()
        self.ticks = 0
        self.tick_seconds = 0.0

    # -- setup ------------------------------------------------------------------------

    async def prepare(self) -> None:
        """The reference limit cycle (phase, period, KOA range): seconds of numerics, off the trio thread."""
        cycle = await trio.to_thread.run_sync(limit_cycle, RUST_2007, self.model)
        values = koa(cycle.samples.T, RUST_2007.kaic_total)
        self.cycle, self._koa_range = cycle, (float(values.min()), float(values.max()))

    def _grow(self, node_id: str) -> int:
        i = len(self.ids)
        self.ids.append(node_id)
        self.index[node_id] = i
        if self.y.shape[1] <= i:  # amortised growth: columns beyond len(ids) are spare
            extra = max(16, i)
            self.y = np.concatenate([self.y, np.zeros((3, extra))], axis=1)
            self.sim_hours, self.temps, self.last_reading = (np.concatenate([a, np.zeros(extra)]) for a in
                                                             (self.sim_hours, self.temps, self.last_reading))
            self.paused = np.concatenate([self.paused, np.zeros(extra, dtype=bool)])
        self._touched.add(i)
        return i

    def add(self, node_id: str) -> dict[str, Any]:
        """A new node: on the limit cycle at CT 0, at the reference temperature. Returns its stored row."""
        i = self._grow(node_id)
        self.y[:, i] = self.cycle.state_at(0.0) if self.cycle is not None else 0.0
        self.sim_hours[i], self.temps[i], self.paused[i] = 0.0, self.model.reference_temperature_k, False
        self.last_reading[i] = math.nan
        self.filters[node_id] = SensorKalmanFilter()
        return self.row(node_id, 0.0)

    def restore(self, row: Mapping[str, Any]) -> None:
        """A node as it was persisted (the `Oscillator` table's row)."""
        i = self._grow(row["node_id"])
        self.y[:, i] = (row["c_t"], row["c_st"], row["c_s"])
        self.sim_hours[i], self.temps[i], self.paused[i] = row["sim_hours"], row["temperature_k"], row["paused"]
        self.last_reading[i] = math.nan if row["last_reading_at"] is None else row["last_reading_at"]
        self.filters[row["node_id"]] = _filter_from(json.loads(row["filter_state"]))

    # -- the tick ---------------------------------------------------------------------

    async def tick(self, dt_hours: float) -> None:
        """Advance every running node by `dt_hours` in one batch on a worker thread."""
        n = len(self.ids)
        if n == 0 or dt_hours <= 0:
            return
        self._touched = set()
        y0, temps = self.y[:, :n].copy(), self.temps[:n].copy()
        y1, seconds = await trio.to_thread.run_sync(self._solve, y0, temps, dt_hours)
        keep = self.paused[:n].copy()
        keep[list(i for i in self._touched if i < n)] = True  # reset or restored while it ran
        self.y[:, :n] = np.where(keep, self.y[:, :n], y1)
        self.sim_hours[:n] += np.where(keep, 0.0, dt_hours)
        self.ticks += 1
        self.tick_seconds += seconds

    def _solve(self, y0: np.ndarray, temps: np.ndarray, dt_hours: float) -> tuple[np.ndarray, float]:
        import time

        clock = time.perf_counter()
        rates = self.model.node_rates(RUST_2007, temps)
        y1 = integrate_batch(y0, (0.0, dt_hours), rates, self.config).y_final
        return y1, time.perf_counter() - clock

    # -- nodes ------------------------------------------------------------------------

    def snapshot(self, node_id: str, now: float, stale_after_s: float) -> Snapshot:
        i = self.index[node_id]
        last = self.last_reading[i]
        return Snapshot(node_id, self.y[:, i].copy(), float(self.temps[i]), float(self.sim_hours[i]),
                        bool(self.paused[i]), bool(math.isnan(last) or now - last > stale_after_s),
                        not math.isnan(last))

    def describe(self, snap: Snapshot, now_iso: str, detail: str) -> dict[str, Any]:
        """The spec's `GET /oscillator/state` body for one node."""
        y = snap.state
        k = float(koa(y, RUST_2007.kaic_total))
        metric = float(koa_normalized(k, *self._koa_range))
        phase = float(self.cycle.phase_of(y)[0]) if self.cycle is not None else None
        body: dict[str, Any] = {
            "node_id": snap.node_id, "timestamp": now_iso,
            "circadian_time": None if phase is None else round(float(circadian_time(phase)), 4),
            "phase": None if phase is None else round(phase, 4),
            "koa_metric": round(metric, 4), "output_pwm": int(self.mapping.pwm(metric)),
        }
        if detail == "minimal":
            return body
        rates = self.model.node_rates(RUST_2007, np.array([snap.temperature_k]))
        sv = state_variables(y[:, None], RUST_2007, sequestration=rates.sequestration)
        body.update({
            "period_hours": None if self.cycle is None else round(self.cycle.period, 4),
            "state_variables": {name: round(float(np.asarray(sv[name]).ravel()[0]), 6) for name in SPEC_STATE},
            "entrainment_active": snap.has_reading and not snap.stale and not snap.paused,
            "temperature_kelvin": round(snap.temperature_k, 4),
            "temperature_stale": snap.stale, "paused": snap.paused,
        })
        if detail == "full":
            body["raw_state_um"] = {"C_T": float(y[0]), "C_ST": float(y[1]), "C_S": float(y[2])}
            body["simulated_hours"] = snap.sim_hours
            body["filter"] = self.filters[snap.node_id].state()
        return body

    def reset(self, node_id: str, state: np.ndarray) -> None:
        i = self.index[node_id]
        self.y[:, i] = state
        self.sim_hours[i] = 0.0
        self._touched.add(i)

    def filtered(self, node_id: str, fil: SensorKalmanFilter, at: float) -> None:
        """A committed reading: the node's filter, and its oscillator's temperature from now on."""
        self.filters[node_id] = fil
        i = self.index[node_id]
        estimate = fil.estimate()["temperature_kelvin"]
        if estimate is not None:
            self.temps[i] = estimate
        self.last_reading[i] = at

    def filter_copy(self, node_id: str) -> SensorKalmanFilter:
        return copy.deepcopy(self.filters[node_id])

    # -- persistence --------------------------------------------------------------------

    def row(self, node_id: str, now: float) -> dict[str, Any]:
        i = self.index[node_id]
        last = self.last_reading[i]
        return {"node_id": node_id, "c_t": float(self.y[0, i]), "c_st": float(self.y[1, i]),
                "c_s": float(self.y[2, i]), "sim_hours": float(self.sim_hours[i]),
                "temperature_k": float(self.temps[i]), "filter_state": json.dumps(_filter_state(self.filters[node_id])),
                "last_reading_at": None if math.isnan(last) else float(last), "paused": bool(self.paused[i]),
                "saved_at": now}

    def rows(self, now: float) -> list[tuple[Any, ...]]:
        return [tuple(self.row(node_id, now).values()) for node_id in self.ids]


def _filter_state(fil: SensorKalmanFilter) -> dict[str, Any]:
    return {"estimate": fil.estimate(), "t": fil._t, "count": fil.measurement_count,
            "process_noise": fil.process_noise, "measurement_noise": fil.measurement_noise}


def _filter_from(doc: Mapping[str, Any]) -> SensorKalmanFilter:
    """The filter resumes from its last estimate (its covariance restarts at the measurement noise)."""
    fil = SensorKalmanFilter(doc.get("process_noise"), doc.get("measurement_noise"))
    if doc.get("t") is not None:
        fil.update(doc["t"], {k: v for k, v in doc["estimate"].items() if v is not None})
        fil.measurement_count = int(doc.get("count", 0))
    return fil
