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
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Protocol

import numpy as np
import trio

from .engine import (RUST_2007, EtfParameters, LimitCycle, ModelStack, PwmMapping, SensorKalmanFilter,
                     SolverConfig, TemperatureModel, integrate_batch, koa, koa_normalized, koa_trend, limit_cycle,
                     state_variables)
from .engine.timebase import circadian_time
from .shifts import Shift, ct_reached, measured

DEFAULT_ETF = EtfParameters()
DEFAULT_MAPPING = PwmMapping()
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
        self.etf = etf or EtfParameters()  # the site's default, for new nodes
        self.model = self.etf.model()
        self.etfs: list[EtfParameters] = []  # per node
        self.mappings: list[PwmMapping] = []  # per node
        self.overrides: dict[str, tuple[int, float, str]] = {}  # node -> (pwm, expires at, override id)
        self.previous_koa: dict[str, float] = {}
        self._last_duty: dict[str, int] = {}
        self.shifts: dict[str, Shift] = {}  # by shift id; complete ones stay for analytics
        self.completed: list[Shift] = []  # completed since the service last took them
        self._models: dict[EtfParameters, TemperatureModel] = {}
        self._stack: ModelStack | None = None
        self.config = config or SolverConfig()
        self.cycles: dict[EtfParameters, tuple[LimitCycle, tuple[float, float]]] = {}
        self._touched: set[int] = set()
        self.ticks = 0
        self.tick_seconds = 0.0
        self.last_tick_at = 0.0  # trio clock
        self.accepted_steps = 0
        self.rejected_steps = 0

    # -- setup ------------------------------------------------------------------------

    async def prepare(self, etf: EtfParameters | None = None) -> None:
        """The limit cycle of an ETF (phase, period, KOA range): a second of numerics, off the
        trio thread; ValueError when the model does not oscillate with those parameters."""
        etf = etf or self.etf
        if etf in self.cycles:
            return
        cycle = await trio.to_thread.run_sync(limit_cycle, RUST_2007, self.model_of(etf))
        values = koa(cycle.samples.T, RUST_2007.kaic_total)
        self.cycles[etf] = (cycle, (float(values.min()), float(values.max())))

    @property
    def cycle(self) -> LimitCycle | None:
        """The site default's limit cycle (None until `prepare` ran)."""
        found = self.cycles.get(self.etf)
        return None if found is None else found[0]

    def cycle_of(self, node_id: str) -> tuple[LimitCycle, tuple[float, float]] | None:
        return self.cycles.get(self.etfs[self.index[node_id]]) or self.cycles.get(self.etf)

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
        self.etfs.append(self.etf)
        self.mappings.append(DEFAULT_MAPPING)  # shared: one vectorised group (`_groups`)
        self._stack = None
        self._touched.add(i)
        return i

    def model_of(self, etf: EtfParameters) -> TemperatureModel:
        model = self._models.get(etf)
        if model is None:
            model = self._models[etf] = etf.model()
        return model

    def set_etf(self, node_id: str, etf: EtfParameters) -> None:
        self.etfs[self.index[node_id]] = etf
        self._stack = None

    def stack(self) -> ModelStack:
        """Every node's temperature model as arrays (rebuilt only after a change)."""
        if self._stack is None or len(self._stack) != len(self.ids):
            self._stack = ModelStack([self.model_of(e) for e in self.etfs])
        return self._stack

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
        settings = json.loads(row["settings"] or "{}")
        if "etf" in settings:
            self.etfs[i] = EtfParameters(**settings["etf"])
        if "mapping" in settings:
            m = settings["mapping"]
            self.mappings[i] = PwmMapping(**{**m, "custom_points": tuple(map(tuple, m.get("custom_points", ())))})
        if "override" in settings:
            pwm, expires, override_id = settings["override"]
            self.overrides[row["node_id"]] = (int(pwm), float(expires), str(override_id))
        if "shift" in settings:  # under way when the gateway stopped: it goes on from its stage
            shift = Shift.from_doc(settings["shift"])
            self.shifts[shift.shift_id] = shift

    # -- the tick ---------------------------------------------------------------------

    async def tick(self, dt_hours: float) -> None:
        """Advance every running node by `dt_hours` in one batch on a worker thread."""
        n = len(self.ids)
        if n == 0 or dt_hours <= 0:
            return
        self._touched = set()
        y0, temps, stack = self.y[:, :n].copy(), self.temps[:n].copy(), self.stack()
        active = [s for s in self.shifts.values() if s.stage in ("pulsing", "settling")]
        if active:  # pulses on their nodes, and the unpulsed twins as extra columns of the same batch
            cols = [self.index[s.node_id] for s in active]
            for s, i in zip(active, cols):
                if s.stage == "pulsing":
                    temps[i] += s.delta_k
            y0 = np.concatenate([y0, np.stack([s.twin for s in active], axis=1)], axis=1)
            temps = np.concatenate([temps, self.temps[cols]])
            stack = ModelStack([*stack.models, *(stack.models[i] for i in cols)])
        ct_before = {s.node_id: self.circadian_time_of(s.node_id) for s in self.shifts.values()
                     if s.stage == "waiting"}
        y1, seconds = await trio.to_thread.run_sync(self._solve, y0, temps, stack, dt_hours)
        keep = self.paused[:n].copy()
        keep[list(i for i in self._touched if i < n)] = True  # reset or restored while it ran
        self.y[:, :n] = np.where(keep, self.y[:, :n], y1[:, :n])
        self.sim_hours[:n] += np.where(keep, 0.0, dt_hours)
        for k, s in enumerate(active):
            s.twin = y1[:, n + k].copy()
        self._advance_shifts(ct_before)
        self.last_tick_at = trio.current_time()
        self.ticks += 1
        self.tick_seconds += seconds

    def _advance_shifts(self, ct_before: dict[str, float | None]) -> None:
        """Move each shift on: waiting -> pulsing (its CT reached) -> settling -> complete."""
        for s in list(self.shifts.values()):
            if s.node_id not in self.index:
                continue
            i = self.index[s.node_id]
            if s.stage == "waiting":
                before, after = ct_before.get(s.node_id), self.circadian_time_of(s.node_id)
                if before is not None and after is not None and ct_reached(before, after, s.start_ct):
                    s.stage, s.pulse_start_h, s.twin = "pulsing", float(self.sim_hours[i]), self.y[:, i].copy()
            elif s.stage == "pulsing" and self.sim_hours[i] >= s.pulse_start_h + s.duration_h:
                s.stage = "settling"
            elif s.stage == "settling" and self.sim_hours[i] >= s.pulse_start_h + s.duration_h + s.settle_h:
                found = self.cycle_of(s.node_id)
                s.actual_hours = measured(found[0], self.y[:, i], s.twin) if found is not None else 0.0
                s.stage = "complete"
                self.completed.append(s)

    def _solve(self, y0: np.ndarray, temps: np.ndarray, stack: ModelStack,
               dt_hours: float) -> tuple[np.ndarray, float]:
        import time

        clock = time.perf_counter()
        rates = stack.node_rates(RUST_2007, temps)
        res = integrate_batch(y0, (0.0, dt_hours), rates, self.config)
        self.accepted_steps += res.stats.accepted
        self.rejected_steps += res.stats.rejected
        if not np.all(np.isfinite(res.y_final)):
            raise FloatingPointError("the integration gave a non-finite state")
        return res.y_final, time.perf_counter() - clock

    # -- nodes ------------------------------------------------------------------------

    def snapshot(self, node_id: str, now: float, stale_after_s: float) -> Snapshot:
        i = self.index[node_id]
        last = self.last_reading[i]
        return Snapshot(node_id, self.y[:, i].copy(), float(self.temps[i]), float(self.sim_hours[i]),
                        bool(self.paused[i]), bool(math.isnan(last) or now - last > stale_after_s),
                        not math.isnan(last))

    def output(self, snap: Snapshot, now: float) -> dict[str, Any]:
        """KOA, its normalised value, trend and the PWM duty (a live manual override wins)."""
        i = self.index[snap.node_id]
        value = float(koa(snap.state, RUST_2007.kaic_total))
        found = self.cycle_of(snap.node_id)
        normalized = float(koa_normalized(value, *found[1])) if found is not None else value
        previous = self.previous_koa.get(snap.node_id, value)
        self.previous_koa[snap.node_id] = value
        duty = int(self.mappings[i].pwm(normalized))
        override = self.overrides.get(snap.node_id)
        if override is not None and override[1] <= now:
            del self.overrides[snap.node_id]
            override = None
        if override is not None:
            duty = override[0]
        return {"koa_value": value, "koa_normalized": normalized, "koa_phase": koa_trend(previous, value),
                "duty": duty, "override": override}

    def describe(self, snap: Snapshot, now: float, now_iso: str, detail: str) -> dict[str, Any]:
        """The spec's `GET /oscillator/state` body for one node."""
        y = snap.state
        out = self.output(snap, now)
        found = self.cycle_of(snap.node_id)
        cycle = None if found is None else found[0]
        phase = float(cycle.phase_of(y)[0]) if cycle is not None else None
        body: dict[str, Any] = {
            "node_id": snap.node_id, "timestamp": now_iso,
            "circadian_time": None if phase is None else round(float(circadian_time(phase)), 4),
            "phase": None if phase is None else round(phase, 4),
            "koa_metric": round(out["koa_normalized"], 4), "output_pwm": out["duty"],
        }
        if detail == "minimal":
            return body
        model = self.model_of(self.etfs[self.index[snap.node_id]])
        rates = model.node_rates(RUST_2007, np.array([snap.temperature_k]))
        sv = state_variables(y[:, None], RUST_2007, sequestration=rates.sequestration)
        body.update({
            "period_hours": None if cycle is None else round(cycle.period, 4),
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

    def circadian_time_of(self, node_id: str) -> float | None:
        found = self.cycle_of(node_id)
        if found is None:
            return None
        return round(float(circadian_time(float(found[0].phase_of(self.y[:, self.index[node_id]])[0]))), 4)

    def set_paused(self, node_id: str, paused: bool) -> None:
        self.paused[self.index[node_id]] = paused

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

    def row(self, node_id: str, now: float, under_way: dict[str, Shift] | None = None) -> dict[str, Any]:
        i = self.index[node_id]
        last = self.last_reading[i]
        return {"node_id": node_id, "c_t": float(self.y[0, i]), "c_st": float(self.y[1, i]),
                "c_s": float(self.y[2, i]), "sim_hours": float(self.sim_hours[i]),
                "temperature_k": float(self.temps[i]), "filter_state": json.dumps(_filter_state(self.filters[node_id])),
                "last_reading_at": None if math.isnan(last) else float(last), "paused": bool(self.paused[i]),
                "settings": json.dumps(self.settings(node_id, under_way)), "saved_at": now}

    def settings(self, node_id: str, under_way: dict[str, Shift] | None = None) -> dict[str, Any]:
        """What a node was set to, when it differs from the defaults, and its phase shift under way."""
        i = self.index[node_id]
        out: dict[str, Any] = {}
        if self.etfs[i] != DEFAULT_ETF:
            out["etf"] = self.etfs[i].as_dict()
        if self.mappings[i] != DEFAULT_MAPPING:
            out["mapping"] = asdict(self.mappings[i])
        if node_id in self.overrides:
            out["override"] = list(self.overrides[node_id])
        shift = (under_way if under_way is not None else self.shifts_under_way()).get(node_id)
        if shift is not None:
            out["shift"] = shift.to_doc()
        return out

    def shifts_under_way(self) -> dict[str, Shift]:
        """Each node's phase shift not yet complete (at most one: the route answers 409 for a second)."""
        return {s.node_id: s for s in self.shifts.values() if s.stage != "complete"}

    def live_events(self, now: float, now_iso: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every node's `oscillator.state`, and the `output.pwm` of each node whose duty changed
        since the last call, as columnar batches (`batches`). Phases in one KD-tree query per ETF.

        Safe on a worker thread while the trio thread goes on: it works on copies (a node added
        meanwhile waits for the next call)."""
        ids = list(self.ids)
        n = len(ids)
        if n == 0:
            return [], []
        y = self.y[:, :n].copy()
        values = koa(y, RUST_2007.kaic_total)
        a_free = np.maximum(RUST_2007.kaia_total - RUST_2007.sequestration * y[2], 0.0)
        phase = np.full(n, np.nan)
        normalized = values.copy()
        for etf, idx in _groups(self.etfs[:n]):
            found = self.cycles.get(etf) or self.cycles.get(self.etf)
            if found is None:
                continue
            phase[idx] = found[0].phase_of(y[:, idx])
            normalized[idx] = koa_normalized(values[idx], *found[1])
        duties = np.zeros(n, dtype=int)
        for mapping, idx in _groups(self.mappings[:n]):  # one vectorised call per distinct mapping
            duties[idx] = mapping.pwm(normalized[idx])
        for node_id, (forced, expires, _) in list(self.overrides.items()):
            if expires > now and self.index.get(node_id, n) < n:
                duties[self.index[node_id]] = forced
        metrics = np.round(normalized, 4)
        known = ~np.isnan(phase)
        columns = {"circadian_time": _nullable(np.round(24.0 * phase, 4), known),
                   "phase": _nullable(np.round(phase, 4), known), "koa_metric": metrics.tolist(),
                   "C_ST": np.round(y[1], 6).tolist(), "A_free": np.round(a_free, 6).tolist()}
        states = batches(ids, now_iso, columns, STATE_COLUMNS)
        last = self._last_duty
        changed = np.nonzero(duties != np.array([last.get(i, -1) for i in ids]))[0].tolist()
        moved = [ids[i] for i in changed]
        for i in changed:
            last[ids[i]] = int(duties[i])
        overridden = {node for node, override in self.overrides.items() if override[1] > now}
        pwm = batches(moved, now_iso, {"duty_cycle": duties[changed].tolist(), "koa_source": metrics[changed].tolist(),
                                       "manual_override": [node in overridden for node in moved]}, PWM_COLUMNS)
        return states, pwm if moved else []

    def history_rows(self, now: float) -> list[tuple[Any, ...]]:
        """(node_id, ts, c_t, c_st, c_s, koa, temperature_k, sim_hours) of every node, in one pass."""
        n = len(self.ids)
        y = self.y[:, :n]
        values = koa(y, RUST_2007.kaic_total)
        return list(zip(self.ids, [now] * n, y[0].tolist(), y[1].tolist(), y[2].tolist(), values.tolist(),
                        self.temps[:n].tolist(), self.sim_hours[:n].tolist()))

    def rows(self, now: float) -> list[tuple[Any, ...]]:
        under_way = self.shifts_under_way()
        return [tuple(self.row(node_id, now, under_way).values()) for node_id in self.ids]


# The hub's kinds of the batches (`kaiabc.<kind>.<k>`), by the kind of the events they carry.
BATCHED = {"oscillator_state": "oscillator_state_batch", "output_pwm": "output_pwm_batch"}
STATE_COLUMNS = ("circadian_time", "phase", "koa_metric", "C_ST", "A_free")
PWM_COLUMNS = ("duty_cycle", "koa_source", "manual_override")
BATCH_BYTES = 16_384  # a batch's JSON: under the hub's 64 KiB per event; 10,000 nodes in about 60 (a queue holds 256)


def batches(ids: list[str], timestamp: str, columns: Mapping[str, list[Any]],
            names: tuple[str, ...]) -> list[dict[str, Any]]:
    """One tick's events of many nodes as a few columnar documents (`timestamp`, `node_id` and
    the `names` columns, one list each, in one order), each under BATCH_BYTES of JSON: what the
    plugin publishes on the hub (`kaiabc.oscillator_state_batch.<k>`, `kaiabc.output_pwm_batch.<k>`:
    one event per batch, not one per node). The WebSocket turns a batch into the spec's per-node
    frames for the nodes its client watches (`ws.frames`)."""
    def batch(a: int, b: int) -> dict[str, Any]:
        return {"timestamp": timestamp, "node_id": ids[a:b], **{k: columns[k][a:b] for k in names}}

    out: list[dict[str, Any]] = []
    start = size = 0
    for i, node_id in enumerate(ids):
        cost = len(node_id) + 96  # the id, quoted, and five numbers of at most 12 characters, with commas
        if size + cost > BATCH_BYTES and i > start:
            out.append(batch(start, i))
            start, size = i, 0
        size += cost
    out.append(batch(start, len(ids)))
    return out


def stream_name(node_id: str) -> str:
    """A node as the live hub names it in a stream (`kaiabc.oscillator_state.<node>`):
    '.' separates a stream's parts, so the hub writes it '_' ("a.b" and "a_b" are one)."""
    return node_id.replace(".", "_")


class Publisher(Protocol):
    def publish(self, kind: str, device_id: str, data: Any) -> None: ...


def publish_states(live: Publisher, states: list[dict[str, Any]], pwm: list[dict[str, Any]]) -> None:
    """One tick's state and PWM batches on the live hub (`ctx.live`)."""
    for kind, found in (("oscillator_state", states), ("output_pwm", pwm)):
        for k, batch in enumerate(found):
            live.publish(BATCHED[kind], str(k), batch)


def _nullable(values: np.ndarray, known: np.ndarray) -> list[float | None]:
    """A column as a list, None where `known` is False (no limit cycle yet)."""
    out: list[float | None] = values.tolist()
    if not known.all():
        for i in np.nonzero(~known)[0].tolist():
            out[i] = None
    return out


def _groups(items: list[Any]) -> list[tuple[Any, np.ndarray]]:
    """Each distinct object of `items` with the indexes holding it. By identity, not equality: nodes
    share the site default's object, and hashing 10,000 frozen dataclasses costs more than the
    rest of a state stream (equal copies only make an extra group, never a wrong one)."""
    found: dict[int, tuple[Any, list[int]]] = {}
    for i, item in enumerate(items):
        entry = found.get(id(item))
        if entry is None:
            entry = found[id(item)] = (item, [])
        entry[1].append(i)
    return [(item, np.asarray(members)) for item, members in found.values()]


def _filter_state(fil: SensorKalmanFilter) -> dict[str, Any]:
    return fil.to_doc()


def _filter_from(doc: Mapping[str, Any]) -> SensorKalmanFilter:
    """The filter exactly as it was persisted: estimate and covariance resume. A row written before
    the covariance was kept (no `p`) resumes from its estimate, its covariance at the measurement noise."""
    if "p" in doc:
        return SensorKalmanFilter.from_doc(doc)
    fil = SensorKalmanFilter(doc.get("process_noise"), doc.get("measurement_noise"))
    if doc.get("t") is not None:
        fil.update(doc["t"], {k: v for k, v in doc["estimate"].items() if v is not None})
        fil.measurement_count = int(doc.get("count", 0))
    return fil
