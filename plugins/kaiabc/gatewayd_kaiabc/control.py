"""The spec's control routes (sections 2, 4–7): oscillator reset, entrainment parameters,
simulation config, pause and resume, output mapping and override, the Kalman filter.

Reads: a node for itself (X-API-Key) or a person. Changes: a person (the admin token),
rate limited as configuration; each change is committed before it is answered.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct
from quart.typing import ResponseReturnValue

from gatewayd.plugins.api import waiting_elsewhere_for

from .engine import RUST_2007, EtfMappingError, EtfParameters, PwmMapping, SensorKalmanFilter, SolverConfig
from .engine.model import state_from_variables
from .errors import Fail, invalid, iso
from .shifts import Shift

if TYPE_CHECKING:
    from gatewayd.plugins.api import Routes

    from .routes import Api

NodeId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")]
Reason = Annotated[str, Meta(max_length=512)]
Concentration = Annotated[float, Meta(ge=0, le=100)]
ANY_OBJECT = dict[str, Any]


class NodeQuery(Struct, forbid_unknown_fields=True):
    node_id: NodeId | None = None


class NodeRequired(Struct, forbid_unknown_fields=True):
    node_id: NodeId


class InitialConditions(Struct, forbid_unknown_fields=True):
    C_U: Concentration | None = None
    C_S: Concentration | None = None
    C_T: Concentration | None = None
    C_ST: Concentration | None = None
    A_free: Concentration | None = None
    CABC_complex: Concentration | None = None


class ResetBody(Struct, forbid_unknown_fields=True):
    node_id: NodeId
    initial_conditions: InitialConditions | None = None
    units: Literal["fraction", "uM"] = "fraction"
    reason: Reason | None = None


class EtfBody(Struct, forbid_unknown_fields=True):
    parameters: ANY_OBJECT = msgspec.field(default_factory=dict)
    node_id: NodeId | None = None
    reference_temperature_kelvin: Annotated[float, Meta(ge=273.15, le=323.15)] | None = None
    reason: Reason | None = None


class PauseBody(Struct, forbid_unknown_fields=True):
    node_id: NodeId | None = None
    reason: Reason | None = None


class MappingBody(Struct, forbid_unknown_fields=True):
    node_id: NodeId | None = None
    mapping_function: Literal["linear", "sigmoid", "custom"] = "linear"
    pwm_min: Annotated[int, Meta(ge=0, le=255)] = 0
    pwm_max: Annotated[int, Meta(ge=0, le=255)] = 255
    koa_threshold_low: Annotated[float, Meta(ge=0, le=1)] = 0.0
    koa_threshold_high: Annotated[float, Meta(ge=0, le=1)] = 1.0
    invert: bool = False
    custom_points: Annotated[list[tuple[float, float]], Meta(max_length=64)] = msgspec.field(default_factory=list)


class OverrideBody(Struct, forbid_unknown_fields=True):
    node_id: NodeId
    override_enabled: bool
    pwm_value: Annotated[int, Meta(ge=0, le=255)] = 0
    duration_minutes: Annotated[float, Meta(gt=0, le=7 * 24 * 60)] = 60.0
    reason: Reason | None = None


class Noise(Struct, forbid_unknown_fields=True):
    temperature: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    humidity: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    pressure: Annotated[float, Meta(ge=0, le=1e9)] | None = None


class FilterBody(Struct, forbid_unknown_fields=True):
    node_id: NodeId
    process_noise: Noise | None = None
    measurement_noise: Noise | None = None


class FilterReset(Struct, forbid_unknown_fields=True):
    node_id: NodeId
    reason: Reason | None = None


class PhaseShiftBody(Struct, forbid_unknown_fields=True):
    node_id: NodeId
    shift_type: Literal["advance", "delay"]
    magnitude_hours: Annotated[float, Meta(gt=0, le=12)]
    method: Literal["temperature_step"] = "temperature_step"
    temperature_delta_kelvin: Annotated[float, Meta(ge=-20, le=20)] = 3.0
    duration_minutes: Annotated[float, Meta(ge=1, le=600)] = 30.0


class PrcQuery(Struct, forbid_unknown_fields=True):
    model: Literal["standard", "custom"] = "standard"
    resolution: Annotated[int, Meta(ge=4, le=96)] = 24
    node_id: NodeId | None = None
    temperature_delta_kelvin: Annotated[float, Meta(gt=0, le=20)] = 3.0
    duration_minutes: Annotated[float, Meta(ge=1, le=600)] = 30.0


NODE_404 = {404: "the node is not registered (NODE_NOT_FOUND)"}


class Control:
    """Sections 2 (reset), 4 (parameters), 5, 6 and 7 of the spec."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.ctx = api.ctx

    def register(self, r: Routes) -> None:
        ok: dict[int, Any] = {200: ANY_OBJECT}
        person = self.api.person_auth
        r.post("/v1/oscillator/reset", body=ResetBody, auth=person, responses=ok, errors=NODE_404)(self.reset)
        r.get("/v1/entrainment/parameters", query=NodeQuery, responses=ok, errors=NODE_404)(self.etf)
        r.put("/v1/entrainment/parameters", body=EtfBody, auth=person, responses=ok,
              errors={**NODE_404, 422: "the model does not oscillate with these parameters (ODE_INSTABILITY)"}
              )(self.put_etf)
        r.post("/v1/entrainment/phase-shift", body=PhaseShiftBody, auth=person, responses=ok,
               errors={**NODE_404, 409: "a shift of this node is under way (CONFLICT)",
                       422: "no circadian time gives that shift with this pulse (INVALID_PARAMETER)"})(self.phase_shift)
        r.get("/v1/entrainment/prc", query=PrcQuery, responses=ok, errors=NODE_404)(self.prc)
        r.get("/v1/simulation/config", auth=person, responses=ok)(self.solver)
        r.put("/v1/simulation/config", body=ANY_OBJECT, auth=person, responses=ok)(self.put_solver)
        r.post("/v1/simulation/pause", body=PauseBody, auth=person, responses=ok, errors=NODE_404)(self.pause)
        r.post("/v1/simulation/resume", body=PauseBody, auth=person, responses=ok, errors=NODE_404)(self.resume)
        r.get("/v1/output/koa", query=NodeQuery, responses=ok, errors=NODE_404)(self.koa)
        r.put("/v1/output/mapping", body=MappingBody, auth=person, responses=ok, errors=NODE_404)(self.mapping)
        r.post("/v1/output/manual-override", body=OverrideBody, auth=person, responses=ok, errors=NODE_404)(self.override)
        r.get("/v1/filter/state", query=NodeRequired, responses=ok, errors=NODE_404)(self.filter_state)
        r.put("/v1/filter/parameters", body=FilterBody, auth=person, responses=ok, errors=NODE_404)(self.filter_parameters)
        r.post("/v1/filter/reset", body=FilterReset, auth=person, responses=ok, errors=NODE_404)(self.filter_reset)

    # -- 2. reset ------------------------------------------------------------------------

    async def reset(self, body: ResetBody) -> ResponseReturnValue:
        """Reset a node's oscillator to initial conditions (default: the spec's, all unphosphorylated)"""
        await self.api.person("configuration", "researcher")
        state = self.ctx.state
        state.node(body.node_id)
        given = {k: v for k, v in msgspec.structs.asdict(body.initial_conditions or InitialConditions()).items()
                 if v is not None}
        # Only C_T, C_ST and C_S are free; C_U, A_free and CABC_complex follow from them (README,
        # "Decisions"): the spec's own example gives C_U 0.5 with the rest 0, so they are reported, not used.
        derived = sorted(k for k in given if k in ("C_U", "A_free", "CABC_complex"))
        try:
            y = state_from_variables({k: v for k, v in given.items() if k not in derived}, RUST_2007,
                                     units=body.units)
        except ValueError as e:
            raise invalid("initial_conditions", str(e)) from None
        state.fleet.reset(body.node_id, y)
        await state.save(body.node_id)
        self.ctx.state.note("info", "oscillator reset", body.node_id, reason=body.reason or "")
        return {"success": True, "message": "Oscillator reset to initial conditions", "node_id": body.node_id,
                "timestamp": iso(self.ctx.now()), "derived_not_set": derived}

    # -- 4. entrainment parameters -------------------------------------------------------

    def _etf_of(self, node_id: str | None) -> EtfParameters:
        fleet = self.ctx.state.fleet
        if node_id is None:
            return fleet.etf
        self.ctx.state.node(node_id)
        return fleet.etfs[fleet.index[node_id]]

    async def etf(self, query: NodeQuery) -> ResponseReturnValue:
        """The entrainment transfer function's parameters (a node's, or the site's default)"""
        await self._reader(query.node_id)
        etf = self._etf_of(query.node_id)
        return {"node_id": query.node_id, "etf_active": True, "reference_temperature_kelvin":
                etf.reference_temperature_k, "parameters": etf.document(), "prc_model": "standard",
                "phase_lock_target": None}

    async def put_etf(self, body: EtfBody) -> ResponseReturnValue:
        """Change ETF parameters: merged into the current ones (null restores a default)"""
        await self.api.person("configuration", "researcher")
        async with waiting_elsewhere_for(self.ctx.state.etf_lock):  # read, merge, prepare, set: one change at a time
            return await self._put_etf(body)

    async def _put_etf(self, body: EtfBody) -> ResponseReturnValue:
        state = self.ctx.state
        before = self._etf_of(body.node_id)
        patch: dict[str, Any] = dict(body.parameters)
        if body.reference_temperature_kelvin is not None:
            patch["reference_temperature_kelvin"] = body.reference_temperature_kelvin
        try:
            after = before.merge(patch)
        except EtfMappingError as e:
            raise invalid(f"parameters.{e.field}" if e.field else "parameters", str(e), e.provided) from None
        try:
            await state.fleet.prepare(after)
        except ValueError as e:
            raise Fail(422, "ODE_INSTABILITY", f"the oscillator has no limit cycle with these parameters: {e}",
                       {"parameter": "parameters"}) from None
        if body.node_id is not None:
            state.fleet.set_etf(body.node_id, after)
            await state.save(body.node_id)
        else:  # the site's default, and every node merged with the same patch
            nodes = list(state.fleet.ids)
            merged = [state.fleet.etfs[state.fleet.index[n]].merge(patch) for n in nodes]
            for etf in set(merged):
                await state.fleet.prepare(etf)
            for n, etf in zip(nodes, merged):
                state.fleet.set_etf(n, etf)
            state.fleet.etf, state.fleet.model = after, state.fleet.model_of(after)
            await state.put_setting("etf", after.as_dict())
            if nodes:
                await state.save(*nodes)
        self.ctx.state.note("info", "ETF parameters updated", body.node_id, reason=body.reason or "")
        return {"success": True, "message": "ETF parameters updated", "effective_timestamp": iso(self.ctx.now()),
                "previous_parameters": before.document(), "new_parameters": after.document()}

    async def phase_shift(self, body: PhaseShiftBody) -> ResponseReturnValue:
        """Shift a node's live oscillator with a temperature step given at the PRC's best time"""
        await self.api.person("configuration", "researcher")
        state = self.ctx.state
        state.node(body.node_id)
        if body.temperature_delta_kelvin == 0:
            raise invalid("temperature_delta_kelvin", "a temperature step of 0 K shifts nothing", 0.0)
        fleet = state.fleet
        _no_shift_under_way(fleet, body.node_id)
        etf = fleet.etfs[fleet.index[body.node_id]]
        duration_h = body.duration_minutes / 60.0
        prc = await state.prc(etf, body.temperature_delta_kelvin, duration_h, 48)
        sign = 1.0 if body.shift_type == "advance" else -1.0
        candidates = [(abs(v - sign * body.magnitude_hours), i) for i, v in enumerate(prc.shift_hours) if sign * v > 0]
        if not candidates:
            raise Fail(422, "INVALID_PARAMETER", f"a {body.temperature_delta_kelvin:+g} K step for "
                       f"{body.duration_minutes:g} min gives no {body.shift_type} at any circadian time; "
                       "try the opposite temperature_delta_kelvin", {"parameter": "temperature_delta_kelvin"})
        _, best = min(candidates)
        start_ct, expected = float(prc.circadian_time[best]), float(prc.shift_hours[best])
        good = [float(ct) for ct, v in zip(prc.circadian_time, prc.shift_hours) if sign * v >= 0.5 * sign * expected]
        window = _window(good, start_ct, 24.0 / prc.shift_hours.size)
        now = self.ctx.now()
        current = fleet.circadian_time_of(body.node_id) or 0.0
        found = fleet.cycle_of(body.node_id)
        period = found[0].period if found is not None else 24.0
        settle_h = self.ctx.config.phase_shift_settle_hours
        sim_hours = ((start_ct - current) % 24.0) / 24.0 * period + duration_h + settle_h
        done_at = now + sim_hours * 3600.0 / self.ctx.config.time_acceleration
        shift_id = f"shift_{time.strftime('%Y%m%d', time.gmtime(now))}_{secrets.token_hex(3)}"
        # again: another request for this node may have planned its shift while this one awaited the PRC
        _no_shift_under_way(fleet, body.node_id)
        fleet.shifts[shift_id] = Shift(shift_id, body.node_id, body.shift_type, sign * body.magnitude_hours,
                                       body.temperature_delta_kelvin, duration_h, start_ct, expected, settle_h, now)
        try:  # committed before it is acknowledged (and resumed after a restart)
            await state.save(body.node_id)
        except BaseException:
            fleet.shifts.pop(shift_id, None)
            raise
        return {"success": True, "shift_id": shift_id, "expected_phase_change": round(expected, 3),
                "current_circadian_time": current, "optimal_ct_window": window,
                "start_circadian_time": start_ct, "estimated_completion": iso(done_at)}

    async def prc(self, query: PrcQuery) -> ResponseReturnValue:
        """The phase response curve to warm and cold steps (this gateway's model, computed)"""
        await self._reader(query.node_id)
        etf = EtfParameters() if query.model == "standard" else self._etf_of(query.node_id)
        d, h = query.temperature_delta_kelvin, query.duration_minutes / 60.0
        warm = await self.ctx.state.prc(etf, d, h, query.resolution)
        cold = await self.ctx.state.prc(etf, -d, h, query.resolution)
        rows = [{"circadian_time": float(ct), "phase_shift_advance": round(max(w, c, 0.0), 4),
                 "phase_shift_delay": round(min(w, c, 0.0), 4), "warm_pulse_shift": round(float(w), 4),
                 "cold_pulse_shift": round(float(c), 4)}
                for ct, w, c in zip(warm.circadian_time, warm.shift_hours.tolist(), cold.shift_hours.tolist())]
        return {"model": query.model, "reference": "Rust et al. 2007, with this gateway's ETF (docs/model.md)",
                "resolution": query.resolution, "temperature_delta_kelvin": d,
                "duration_minutes": query.duration_minutes, "period_hours": round(warm.period, 4), "data": rows}

    # -- 5. simulation -------------------------------------------------------------------

    async def solver(self) -> ResponseReturnValue:
        """The ODE solver configuration and how it performs"""
        await self.api.person("query")
        fleet = self.ctx.state.fleet
        ticks = fleet.ticks
        return {**fleet.config.to_spec(), "performance_metrics": {
            "ticks": ticks, "nodes": len(fleet.ids),
            "average_iteration_time_ms": 1e3 * fleet.tick_seconds / ticks if ticks else 0.0,
            "time_acceleration": self.ctx.config.time_acceleration, "tick_s": self.ctx.config.tick_s}}

    async def put_solver(self, body: dict[str, Any]) -> ResponseReturnValue:
        """Change the solver configuration (from the next tick; no restart)"""
        await self.api.person("configuration", "researcher")
        fleet = self.ctx.state.fleet
        try:
            config = SolverConfig.from_spec({k: v for k, v in body.items() if k != "performance_metrics"},
                                            fleet.config)
        except (ValueError, TypeError) as e:
            raise invalid("body", f"solver configuration: {e}") from None
        if not (config.max_step_size <= 1.0 and config.absolute_tolerance <= 1e-2 and config.relative_tolerance <= 1e-2
                and config.min_step_size >= 1e-9 and config.absolute_tolerance >= 1e-12
                and config.relative_tolerance >= 1e-12):
            raise invalid("body", "solver configuration out of range: tolerances 1e-12..1e-2, steps 1e-9..1 h")
        await self.ctx.state.put_setting("solver", config.to_spec())
        fleet.config = config
        return {"success": True, "message": "Solver configuration updated", "restart_required": False}

    async def pause(self, body: PauseBody) -> ResponseReturnValue:
        """Pause a node's oscillator, or every node's"""
        return await self._pause(body, True)

    async def resume(self, body: PauseBody) -> ResponseReturnValue:
        """Resume a node's oscillator, or every node's"""
        return await self._pause(body, False)

    async def _pause(self, body: PauseBody, paused: bool) -> ResponseReturnValue:
        await self.api.person("configuration", "researcher")
        state = self.ctx.state
        nodes = [body.node_id] if body.node_id is not None else list(state.fleet.ids)
        for n in nodes:
            state.node(n)
        for n in nodes:
            state.fleet.set_paused(n, paused)
        ct = state.fleet.circadian_time_of(nodes[0]) if len(nodes) == 1 else None  # before a tick moves it
        if nodes:
            await state.save(*nodes)
        if paused:
            return {"success": True, "state_saved": True, "paused_at_ct": ct, "nodes": len(nodes)}
        return {"success": True, "resumed_from_ct": ct, "timestamp": iso(self.ctx.now()), "nodes": len(nodes)}

    # -- 6. output -----------------------------------------------------------------------

    async def koa(self, query: NodeQuery) -> ResponseReturnValue:
        """KOA (Kai-complex output activity) and its PWM duty"""
        await self._reader(query.node_id)
        node_id = self._one(query.node_id)
        state, now = self.ctx.state, self.ctx.now()
        snap = state.fleet.snapshot(node_id, now, self.ctx.config.stale_after_s)
        out = state.fleet.output(snap, now)
        return {"node_id": node_id, "koa_value": round(out["koa_value"], 6),
                "koa_normalized": round(out["koa_normalized"], 6), "koa_phase": out["koa_phase"],
                "contributing_states": {"C_ST": float(snap.state[1]), "C_S": float(snap.state[2])},
                "pwm_mapping": {"duty_cycle": out["duty"], "duty_cycle_percent": round(100 * out["duty"] / 255, 1),
                                "frequency_hz": 1000, "manual_override": out["override"] is not None}}

    async def mapping(self, body: MappingBody) -> ResponseReturnValue:
        """Configure the KOA to PWM mapping (a node's, or every node's)"""
        await self.api.person("configuration")
        state = self.ctx.state
        try:
            mapping = PwmMapping(body.mapping_function, body.pwm_min, body.pwm_max, body.koa_threshold_low,
                                 body.koa_threshold_high, body.invert,
                                 tuple((float(a), float(b)) for a, b in body.custom_points))
        except ValueError as e:
            raise invalid("mapping", str(e)) from None
        nodes = [body.node_id] if body.node_id is not None else list(state.fleet.ids)
        for n in nodes:
            state.node(n)
        for n in nodes:
            state.fleet.mappings[state.fleet.index[n]] = mapping
        if nodes:
            await state.save(*nodes)
        return {"success": True, "message": "Output mapping updated",
                "test_values": {f"koa_{k}": {"pwm": int(mapping.pwm(k))} for k in (0.0, 0.5, 1.0)}}

    async def override(self, body: OverrideBody) -> ResponseReturnValue:
        """Override a node's PWM output for a while (override_enabled false ends it)"""
        await self.api.person("configuration")
        state = self.ctx.state
        state.node(body.node_id)
        now = self.ctx.now()
        if not body.override_enabled:
            ended = state.fleet.overrides.pop(body.node_id, None)
            await state.save(body.node_id)
            return {"success": True, "override_id": None if ended is None else ended[2], "expires_at": None}
        override_id = f"override_{secrets.token_hex(6)}"
        expires = now + body.duration_minutes * 60
        state.fleet.overrides[body.node_id] = (body.pwm_value, expires, override_id)
        await state.save(body.node_id)
        return {"success": True, "override_id": override_id, "expires_at": iso(expires)}

    # -- 7. filter -----------------------------------------------------------------------

    async def filter_state(self, query: NodeRequired) -> ResponseReturnValue:
        """A node's Kalman filter"""
        await self._reader(query.node_id)
        self.ctx.state.node(query.node_id)
        state = self.ctx.state
        return {"node_id": query.node_id, **state.fleet.filters[query.node_id].state(),
                "diverged": bool(state.diverged.get(query.node_id)),
                "consecutive_outliers": state.outliers.get(query.node_id, 0)}

    async def filter_parameters(self, body: FilterBody) -> ResponseReturnValue:
        """Change a node's filter noise levels (the estimate is kept)"""
        await self.api.person("configuration")
        state = self.ctx.state
        state.node(body.node_id)
        fil = state.fleet.filter_copy(body.node_id)

        def given(noise: Noise | None) -> dict[str, float]:
            return {} if noise is None else {k: v for k, v in msgspec.structs.asdict(noise).items() if v is not None}

        try:
            fil.set_parameters(given(body.process_noise), given(body.measurement_noise))
        except ValueError as e:
            raise invalid("measurement_noise", str(e)) from None
        state.fleet.filters[body.node_id] = fil
        await state.save(body.node_id)
        return {"success": True, "message": "Kalman filter parameters updated", "filter_reset": False}

    async def filter_reset(self, body: FilterReset) -> ResponseReturnValue:
        """Reset a node's Kalman filter (its noise levels are kept)"""
        await self.api.person("configuration")
        state = self.ctx.state
        state.node(body.node_id)
        old = state.fleet.filters[body.node_id]
        state.fleet.filters[body.node_id] = SensorKalmanFilter(old.process_noise, old.measurement_noise)
        state.filter_reset(body.node_id)
        await state.save(body.node_id)
        self.ctx.state.note("info", "filter reset", body.node_id, reason=body.reason or "")
        return {"success": True, "message": "Kalman filter reset", "timestamp": iso(self.ctx.now())}

    # -- shared --------------------------------------------------------------------------

    async def _reader(self, node_id: str | None) -> None:
        if node_id is None:
            await self.api.person("query")
        else:
            await self.api.caller(node_id, "query")

    def _one(self, node_id: str | None) -> str:
        nodes = self.ctx.state.nodes
        if node_id is None:
            if len(nodes) != 1:
                raise invalid("node_id", f"node_id is required: this gateway has {len(nodes)} nodes")
            return next(iter(nodes))
        self.ctx.state.node(node_id)
        return node_id



def _window(good: list[float], center: float, step: float) -> str:
    """The contiguous run of circadian times around `center` (in `good`), as "16-22"."""
    have = {round(ct / step) for ct in good}
    n = round(24.0 / step)
    lo = hi = round(center / step)
    while (lo - 1) % n in have and hi - lo < n - 1:
        lo -= 1
    while (hi + 1) % n in have and hi - lo < n - 1:
        hi += 1
    return f"{(lo % n) * step:g}-{((hi + 1) % n) * step or 24:g}"


def _no_shift_under_way(fleet: Any, node_id: str) -> None:
    """409 CONFLICT while a phase shift of the node is not complete."""
    if any(s.node_id == node_id and s.stage != "complete" for s in fleet.shifts.values()):
        raise Fail(409, "CONFLICT", f"a phase shift of {node_id!r} is under way; wait for phase_shift.complete")
