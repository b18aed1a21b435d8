"""The spec's section 8: period stability, entrainment efficiency, export (CSV or JSON,
streamed from the stored history)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import trio
from msgspec import Meta, Struct
from quart import Response
from quart.typing import ResponseReturnValue

from .engine import RUST_2007, crossing_times, period_stability, simulated_q10, temperature_correlation
from .errors import Fail, invalid, iso

if TYPE_CHECKING:
    from gatewayd.plugins.api import Routes

    from .routes import Api

NodeId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")]
EXPORT_COLUMNS = ("timestamp", "simulated_hours", "C_T", "C_ST", "C_S", "C_U", "koa", "temperature_kelvin")
PAGE = 5000


class StabilityQuery(Struct, forbid_unknown_fields=True):
    node_id: NodeId
    days: Annotated[float, Meta(gt=0, le=365)] = 7.0


class EfficiencyQuery(Struct, forbid_unknown_fields=True):
    node_id: NodeId
    shift_id: Annotated[str, Meta(max_length=64)] | None = None


class ExportQuery(Struct, forbid_unknown_fields=True):
    node_id: NodeId
    start_time: Annotated[str, Meta(max_length=64)] | None = None
    end_time: Annotated[str, Meta(max_length=64)] | None = None
    format: Literal["json", "csv", "hdf5"] = "json"
    variables: Annotated[str, Meta(max_length=200)] | None = None


class Analytics:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.ctx = api.ctx
        self._q10: dict[Any, float] = {}

    def register(self, r: Routes) -> None:
        ok: dict[int, Any] = {200: dict[str, Any]}
        nf = {404: "the node is not registered (NODE_NOT_FOUND)"}
        r.get("/v1/analytics/period-stability", query=StabilityQuery, responses=ok,
              errors={**nf, 422: "fewer than two cycles in the window (INVALID_PARAMETER)"})(self.stability)
        r.get("/v1/analytics/entrainment-efficiency", query=EfficiencyQuery, responses=ok, errors=nf)(self.efficiency)
        r.get("/v1/analytics/export", query=ExportQuery, responses={200: dict[str, Any]}, errors=nf)(self.export)

    async def stability(self, query: StabilityQuery) -> ResponseReturnValue:
        """Cycle periods of a node over the last days (in simulated hours), their spread and Q10"""
        await self.api.caller(query.node_id, "query")
        state = self.ctx.state
        state.node(query.node_id)
        end = self.ctx.now()
        start = end - query.days * 86400
        rows = await self._rows(query.node_id, start, end)
        if len(rows) < 3:
            raise Fail(422, "INVALID_PARAMETER", "not enough history in the window for a period", {
                "parameter": "days", "provided": query.days})
        data = np.asarray([r[1:] for r in rows], dtype=float)  # ts, c_t, c_st, c_s, koa, temperature, sim_h
        sim, temps = data[:, 6], data[:, 5]
        p = (data[:, 1] + data[:, 2] + data[:, 3]) / RUST_2007.kaic_total
        if np.ptp(p) < 1e-6:
            raise Fail(422, "INVALID_PARAMETER", "the oscillator did not move in the window", {"parameter": "days"})
        marks = crossing_times(sim, p, 0.5 * (p.max() + p.min()))
        periods = np.diff(marks)
        try:
            stats = period_stability(periods)
        except ValueError:
            raise Fail(422, "INVALID_PARAMETER", f"fewer than two cycles in the last {query.days:g} days "
                       f"({marks.size} period markers)", {"parameter": "days", "provided": query.days}) from None
        cycle_temps = np.asarray([temps[(sim >= a) & (sim < b)].mean() for a, b in zip(marks[:-1], marks[1:])])
        try:
            corr = temperature_correlation(periods, cycle_temps)
            correlation: dict[str, Any] = {"pearson_r": round(corr.pearson_r, 4), "p_value": round(corr.p_value, 4)}
        except ValueError as e:
            correlation = {"pearson_r": None, "p_value": None, "note": str(e)}
        return {"node_id": query.node_id, "analysis_period": {"start": iso(start), "end": iso(end)},
                "statistics": {"mean_period_hours": round(stats.mean_period_hours, 4),
                               "std_deviation_hours": round(stats.std_deviation_hours, 4),
                               "min_period_hours": round(stats.min_period_hours, 4),
                               "max_period_hours": round(stats.max_period_hours, 4),
                               "q10_value": round(await self._q10_of(query.node_id), 4),
                               "coefficient_variation": round(stats.coefficient_variation, 5),
                               "cycles": stats.cycles},
                "temperature_correlation": correlation, "quality_assessment": stats.quality_assessment}

    async def _q10_of(self, node_id: str) -> float:
        fleet = self.ctx.state.fleet
        etf = fleet.etfs[fleet.index[node_id]]
        if etf not in self._q10:
            model = fleet.model_of(etf)
            self._q10[etf] = (await trio.to_thread.run_sync(simulated_q10, model)).q10
        return self._q10[etf]

    async def efficiency(self, query: EfficiencyQuery) -> ResponseReturnValue:
        """How the node's recent phase shifts went"""
        await self.api.caller(query.node_id, "query")
        state = self.ctx.state
        state.node(query.node_id)
        shifts = [s for s in state.shift_log if s.get("node_id") == query.node_id]
        shifts += [s.summary(iso) for s in state.fleet.shifts.values() if s.node_id == query.node_id]
        if query.shift_id is not None:
            shifts = [s for s in shifts if s["shift_id"] == query.shift_id]
            if not shifts:
                raise Fail(404, "NOT_FOUND", f"no shift {query.shift_id!r} of {query.node_id!r}",
                           {"parameter": "shift_id", "provided": query.shift_id})
        done = [s["efficiency"] for s in shifts if s["efficiency"] is not None]
        average = round(float(np.mean(done)), 3) if done else None
        advice = []
        if average is not None and average < 0.5:
            advice.append("Shifts reach less than half their target: consider a larger temperature_delta_kelvin or "
                          "a longer duration_minutes, or increasing structural_coupling.sensitivity")
        if average is not None and average > 1.5:
            advice.append("Shifts overshoot: consider a smaller temperature_delta_kelvin or a shorter pulse")
        return {"node_id": query.node_id, "recent_shifts": shifts[-20:], "average_efficiency": average,
                "recommendations": advice}

    async def export(self, query: ExportQuery) -> ResponseReturnValue:
        """A node's stored history as CSV or JSON, streamed"""
        await self.api.caller(query.node_id, "query")
        self.ctx.state.node(query.node_id)
        if query.format == "hdf5":
            raise invalid("format", "hdf5 is not offered by the gateway: use csv or json", "hdf5",
                          valid_values=["json", "csv"])
        now = self.ctx.now()
        end = self.api.time(query.end_time, "end_time") if query.end_time else now + 1
        start = self.api.time(query.start_time, "start_time") if query.start_time else end - 86400
        columns = EXPORT_COLUMNS if query.variables is None else \
            ("timestamp", *(v.strip() for v in query.variables.split(",")))
        unknown = [c for c in columns if c not in EXPORT_COLUMNS]
        if unknown:
            raise invalid("variables", f"unknown variables {unknown}; choose from {list(EXPORT_COLUMNS[1:])}",
                          query.variables)
        stream = self._csv(query.node_id, start, end, columns) if query.format == "csv" else \
            self._json(query.node_id, start, end, columns)
        response = Response(stream, content_type="text/csv" if query.format == "csv" else "application/json")
        response.headers["Content-Disposition"] = \
            f'attachment; filename="{query.node_id}_history.{query.format}"'
        response.timeout = None
        return response

    async def _pages(self, node_id: str, start: float, end: float) -> AsyncIterator[list[tuple[Any, ...]]]:
        after = 0
        while True:
            rows = await self.ctx.storage.read(self.ctx.state.store.history_rows, node_id, start, end, after, PAGE)
            if not rows:
                return
            yield rows
            after = rows[-1][0]

    async def _rows(self, node_id: str, start: float, end: float) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        async for rows in self._pages(node_id, start, end):
            out += rows
        return out

    async def _csv(self, node_id: str, start: float, end: float, columns: tuple[str, ...]) -> AsyncIterator[bytes]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        async for rows in self._pages(node_id, start, end):
            for row in rows:
                writer.writerow([_value(c, row) for c in columns])
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
        yield buffer.getvalue().encode()

    async def _json(self, node_id: str, start: float, end: float, columns: tuple[str, ...]) -> AsyncIterator[bytes]:
        yield json.dumps({"node_id": node_id, "start_time": iso(start), "end_time": iso(end)})[:-1].encode() + \
            b', "records": ['
        first = True
        async for rows in self._pages(node_id, start, end):
            text = ",".join(json.dumps({c: _value(c, r) for c in columns}) for r in rows)
            yield (text if first else "," + text).encode()
            first = False
        yield b"]}"


def _value(column: str, row: tuple[Any, ...]) -> Any:
    _, ts, c_t, c_st, c_s, koa_value, temperature, sim_h = row
    return {"timestamp": iso(ts), "simulated_hours": sim_h, "C_T": c_t, "C_ST": c_st, "C_S": c_s,
            "C_U": RUST_2007.kaic_total - c_t - c_st - c_s, "koa": koa_value, "temperature_kelvin": temperature}[column]

