"""`Kaiabc`, the plugin's state (`ctx.state`): nodes, readings and the live oscillators.

The routes (and later the MQTT and serial handlers) call it; it checks nothing about
who asks (the routes did) and acknowledges nothing before the write that stores it
returned.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import trio

from gatewayd.plugins.api import PluginContext, Record, waiting_elsewhere, waiting_elsewhere_for

from .config import KaiabcConfig
from .engine import TEMPERATURE_RANGE_K, EtfParameters, PhaseResponseCurve, SolverConfig, compute_prc
from .errors import Fail, invalid, iso
from .live import Fleet, publish_states, stream_name
from .people import Tokens
from .models import PRUNE_PART, NodeInfo, Store

HUMIDITY_RANGE = (0.0, 100.0)
OUTLIER_SIGMA = 5.0  # a temperature reading this many predicted standard deviations off is an outlier
RESTAMP_S = 0.001  # a reading stamped by a clock behind the last one: this much after it (iso() shows ms)
DIVERGED_AFTER = 5  # consecutive outliers: the filter diverged
PRESSURE_RANGE_PA = (10_000.0, 120_000.0)
STARTUP_WAIT_S = 30.0  # a request during the plugin's startup waits this long for it, then 503
PRUNE_EVERY_S = 600.0  # readings past readings_retention_days are deleted this often (trio time)


@dataclass(frozen=True)
class Reading:
    """One reading as the node sent it (kelvin, percent, pascal), its time in epoch seconds."""

    ts: float
    temperature_k: float | None
    humidity_percent: float | None = None
    pressure_pa: float | None = None
    quality: str | None = None
    stamped: bool = False  # the node sent no timestamp: `ts` is the gateway's clock when it came


def check_reading(r: Reading, where: str) -> None:
    """400 INVALID_PARAMETER, with the spec's details, for a value outside its range."""
    for name, value, (low, high) in (("temperature_kelvin", r.temperature_k, TEMPERATURE_RANGE_K),
                                     ("humidity_percent", r.humidity_percent, HUMIDITY_RANGE),
                                     ("pressure_pa", r.pressure_pa, PRESSURE_RANGE_PA)):
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            label = name.split("_")[0].capitalize()
            raise invalid(f"{where}{name}", f"{label} value out of valid range", value, valid_range=[low, high])


class Kaiabc:
    """The plugin's state: built once by `gatewayd_setup`."""

    def __init__(self, ctx: PluginContext[KaiabcConfig, Kaiabc]) -> None:
        self.ctx = ctx
        self.store = Store()
        self.fleet = Fleet()
        self.nodes: dict[str, NodeInfo] = {}
        self.started = 0.0
        self.readings = ctx.metrics.counter("readings_total", "Sensor readings accepted", labels=("via",))
        self.refused = ctx.metrics.counter("refused_total", "Requests refused", labels=("code",))
        self.live_nodes = ctx.metrics.gauge("live_nodes", "Live oscillators")
        self._node_lock = trio.Lock()
        self.etf_lock = trio.Lock()  # a PUT of entrainment parameters merges into what the last one left
        self._reading_locks: dict[str, trio.Lock] = {}  # one node's readings are filtered in order
        self._prcs: dict[tuple[Any, ...], PhaseResponseCurve] = {}
        self.shift_log: list[dict[str, Any]] = []
        self.notes: deque[dict[str, Any]] = deque(maxlen=2000)  # GET /diagnostics/logs
        self.behind: set[str] = set()  # nodes whose readings the gateway's clock stamps behind the last
        self.readings_restamped = ctx.metrics.counter(
            "readings_restamped_total", "Readings without a timestamp stamped just after the node's last one: "
            "the gateway's clock was behind it")
        self.noted = 0
        self.diverged: dict[str, bool] = {}  # nodes whose filter diverged (FILTER_DIVERGENCE)
        self.outliers: dict[str, int] = {}
        self.tokens = Tokens()
        self.requests = 0
        self.errors = 0
        self.response_seconds = 0.0
        self._stream_names: dict[str, str] = {}  # stream_name(node_id) -> the registered node holding it
        self._thinned_to = 0.0  # history before this is thinned already (epoch s, on a bucket edge; persisted)
        self.ready = trio.Event()  # start() is over: every persisted node and oscillator is loaded

    # -- start and stop -----------------------------------------------------------------

    async def start(self) -> None:
        """Resume every persisted oscillator where it was."""
        self.started = self.ctx.now()
        settings = await self.ctx.storage.read(self.store.settings)
        if "etf" in settings:
            self.fleet.etf = EtfParameters(**settings["etf"])
            self.fleet.model = self.fleet.model_of(self.fleet.etf)
        self.shift_log = list(settings.get("shifts", []))
        self._thinned_to = float(settings.get("history_thinned_to", 0.0))
        if "solver" in settings:
            self.fleet.config = SolverConfig.from_spec(settings["solver"])
        self.tokens.load(await self.ctx.storage.read(self.store.tokens))
        self.nodes = {n.node_id: n for n in await self.ctx.storage.read(self.store.nodes)}
        if self.nodes:  # with none yet, the first registration prepares it: scipy.integrate is ~35 MB of RSS
            await self.fleet.prepare()
        # Nodes of an older release may already collide: the first (by id) keeps the name.
        for node_id in sorted(self.nodes, reverse=True):
            self._stream_names[stream_name(node_id)] = node_id
        for row in await self.ctx.storage.read(self.store.oscillators):
            if row["node_id"] in self.nodes:
                self.fleet.restore(row)
        for etf in set(self.fleet.etfs):
            try:
                await self.fleet.prepare(etf)
            except ValueError as e:  # accepted once, so it oscillated then; keep running on the default's cycle
                self.ctx.log.warning("no limit cycle for a node's ETF", error=str(e))
        for node_id in self.nodes:  # a node whose oscillator row is missing starts afresh
            if node_id not in self.fleet.index:
                self.fleet.add(node_id)
        self.live_nodes.set(len(self.fleet.ids))
        self.ready.set()

    async def wait_started(self, timeout_s: float = STARTUP_WAIT_S) -> bool:
        """Whether start() is over, waiting up to `timeout_s` for it. The core serves HTTP (and
        MQTT) before a plugin's startup ends; a request in that window waits here instead of
        finding no nodes (404) or changing an oscillator that the resumption then overwrites."""
        if not self.ready.is_set():
            # a request waiting here needs no CPU: its place to the next request meanwhile
            # (the timeout inside: cancelled through waiting_elsewhere, it would not take one again)
            async with waiting_elsewhere():
                with trio.move_on_after(timeout_s):
                    await self.ready.wait()
        return self.ready.is_set()

    async def save(self, *node_ids: str) -> None:
        """Commit these nodes' oscillators and settings now (before a change is acknowledged)."""
        now = self.ctx.now()
        await self.ctx.storage.write(self.store.save_oscillators,
                                     [tuple(self.fleet.row(n, now).values()) for n in node_ids])

    async def put_setting(self, key: str, value: Any) -> None:
        await self.ctx.storage.write(self.store.put_setting, key, value)

    async def persist(self) -> None:
        rows = self.fleet.rows(self.ctx.now())
        if rows:
            await self.ctx.storage.write(self.store.save_oscillators, rows)

    async def run(self) -> None:
        """The background task: tick every `tick_s`, persist every `persist_every_s`."""
        config = self.ctx.config
        last = saved = sampled = streamed = trio.current_time()
        pruned = last - PRUNE_EVERY_S  # the first tick prunes what aged while the gateway was down
        while True:
            await trio.sleep(config.tick_s)
            now = trio.current_time()
            await self.fleet.tick((now - last) * config.time_acceleration / 3600.0)
            last = now
            if self.fleet.completed:
                await self.shifts_completed()
            if now - streamed >= config.state_every_s:
                await self.stream()
                streamed = now
            if now - sampled >= config.history_every_s:
                await self.sample()
                sampled = now
            if now - saved >= config.persist_every_s:
                await self.persist()
                saved = now
            if now - pruned >= PRUNE_EVERY_S:
                await self.prune_readings()
                pruned = now

    async def prc(self, etf: EtfParameters, delta_k: float, duration_h: float, resolution: int) -> PhaseResponseCurve:
        """The PRC of these parameters to this pulse (cached; half a second on a worker thread)."""
        key = (etf, delta_k, duration_h, resolution)
        if key not in self._prcs:
            await self.fleet.prepare(etf)
            cycle = self.fleet.cycles[etf][0]
            model = self.fleet.model_of(etf)
            self._prcs[key] = await trio.to_thread.run_sync(
                lambda: compute_prc(delta_k=delta_k, duration_h=duration_h, resolution=resolution,
                                    temperature_model=model, cycle=cycle))
            if len(self._prcs) > 64:
                self._prcs.pop(next(iter(self._prcs)))
        return self._prcs[key]

    async def shifts_completed(self) -> None:
        """`phase_shift.complete` for each shift the tick completed: stored as an event, then live."""
        done, self.fleet.completed = self.fleet.completed, []
        for s in done:
            now = self.ctx.now()
            s.completed_at = now
            summary = s.summary(iso)
            self.shift_log = (self.shift_log + [summary])[-500:]
            await self.put_setting("shifts", self.shift_log)
            data = {"target_shift_hours": abs(s.target_hours), "actual_shift_hours": summary["actual_shift_hours"],
                    "efficiency": summary["efficiency"], "duration_minutes": round(s.duration_h * 60, 3)}
            await self.ctx.events.emit(s.node_id, "phase_shift.complete", {"shift_id": s.shift_id, **data})
            self.ctx.live.publish("phase_shift_complete", s.node_id, {
                "event": "phase_shift.complete", "shift_id": s.shift_id, "node_id": s.node_id,
                "timestamp": iso(now), "data": data})
            self.fleet.shifts.pop(s.shift_id, None)
            await self.save(s.node_id)  # its settings no longer hold the shift

    async def stream(self) -> None:
        """Every node's `oscillator.state`, and `output.pwm` where a duty changed, to the live hub as a
        few columnar batches (`live.batches`: one hub event per batch; the WebSocket sends the spec's
        per-node frames); built on a worker thread."""
        now = self.ctx.now()
        states, pwm = await trio.to_thread.run_sync(self.fleet.live_events, now, iso(now))
        publish_states(self.ctx.live, states, pwm)

    async def sample(self) -> None:
        """Every node's oscillator into its history (one statement); older than `history_full_days`
        thinned to one sample per `history_coarse_s`; older than `history_days` deleted."""
        rows = self.fleet.history_rows(self.ctx.now())
        if rows:
            config, now = self.ctx.config, self.ctx.now()
            coarse = config.history_coarse_s
            thin_to = math.floor((now - config.history_full_days * 86400) / coarse) * coarse
            await self.ctx.storage.write(self._sample, rows, now - config.history_days * 86400,
                                         self._thinned_to, thin_to, coarse)
            self._thinned_to = max(self._thinned_to, thin_to)

    def _sample(self, rows: list[tuple[Any, ...]], cutoff: float, thinned_to: float, thin_to: float,
                coarse: float) -> None:
        self.store.add_history(rows)
        self.store.history.delete().where(self.store.history.ts < cutoff).execute()
        if thin_to > thinned_to:  # only what became old since the last time
            self.store.thin_history(thinned_to, thin_to, coarse)
            self.store.put_setting("history_thinned_to", thin_to)

    async def prune_readings(self, part: int = PRUNE_PART) -> int:
        """Delete the readings older than `readings_retention_days`, one part (`part` rows, one
        statement) per write job, so an ingest waits behind one part at most; how many went."""
        cutoff = self.ctx.now() - self.ctx.config.readings_retention_days * 86400
        total = 0
        while deleted := await self.ctx.storage.write(self.store.prune_readings, cutoff, part):
            total += deleted
        return total

    def note(self, level: str, message: str, node_id: str | None = None, **details: Any) -> None:
        """A log line of the plugin (`ctx.log`), also kept for GET /diagnostics/logs."""
        getattr(self.ctx.log, level)(message, node=node_id or "-", **details)
        self.noted += 1  # a note's number: its key in the logs' pages with its timestamp
        self.notes.append({"timestamp": self.ctx.now(), "level": level, "node_id": node_id, "message": message,
                           "details": details, "seq": self.noted})

    # -- nodes --------------------------------------------------------------------------

    def node(self, node_id: str) -> NodeInfo:
        info = self.nodes.get(node_id)
        if info is None:
            raise Fail(404, "NODE_NOT_FOUND", f"sensor node {node_id!r} is not registered",
                       {"parameter": "node_id", "provided": node_id})
        return info

    async def register(self, info: NodeInfo, key: str | None) -> str | None:
        """Register a node (and, with no device in the registry yet, provision it with a fresh key,
        returned); 409 CONFLICT when it is registered already."""
        async with waiting_elsewhere_for(self._node_lock):
            if info.node_id in self.nodes:
                raise Fail(409, "CONFLICT", f"sensor node {info.node_id!r} is already registered",
                           {"parameter": "node_id", "provided": info.node_id})
            if (taken := self._stream_names.get(stream_name(info.node_id))) is not None:
                # Live streams and WebSocket subscriptions name a node with '.' as '_': two such
                # nodes would share one stream, each one's watchers seeing the other's frames.
                raise Fail(409, "CONFLICT", f"sensor node {info.node_id!r} would share its live stream name "
                           f"{stream_name(info.node_id)!r} with the registered node {taken!r} ('.' is '_' there)",
                           {"parameter": "node_id", "provided": info.node_id, "conflicts_with": taken})
            if len(self.nodes) >= self.ctx.config.max_nodes:
                raise Fail(503, "SERVICE_UNAVAILABLE", f"this gateway keeps at most {self.ctx.config.max_nodes} nodes "
                           "(plugins.kaiabc.max_nodes)")
            await self.fleet.prepare()  # the site default's limit cycle, which a new node starts on (cached)
            new_key = None
            fields = {"name": info.name or info.node_id, "model": info.hardware_type,
                      "firmware": info.firmware_version}
            if await self.ctx.devices.get(info.node_id) is None:
                new_key = key or "kaiabc_node_" + secrets.token_urlsafe(18)
                try:
                    await self.ctx.devices.provision(info.node_id, key=new_key, **fields)
                except ValueError as e:
                    raise invalid("node_id", str(e), info.node_id) from None
            else:
                await self.ctx.devices.update(info.node_id, **fields)
            row = self.fleet.add(info.node_id) if info.node_id not in self.fleet.index else \
                self.fleet.row(info.node_id, self.ctx.now())
            if not await self.ctx.storage.write(self.store.add_node, info, row):
                raise Fail(409, "CONFLICT", f"sensor node {info.node_id!r} is already registered")
            self.nodes[info.node_id] = info
            self._stream_names[stream_name(info.node_id)] = info.node_id
            self.live_nodes.set(len(self.fleet.ids))
            self.note("info", "node registered", info.node_id, hardware_type=info.hardware_type)
            return new_key

    # -- filter divergence ----------------------------------------------------------------

    def _outlier(self, node_id: str, fil: Any, ts: float, temperature: float, count: int) -> int:
        """The run of consecutive temperature readings beyond OUTLIER_SIGMA of the filter's prediction."""
        if not fil.estimate()["temperature_kelvin"]:
            return 0
        fil.predict(ts)
        spread = float(fil._p[0, 0]) + fil.measurement_noise["temperature"]
        innovation = temperature - float(fil._x[0])
        return count + 1 if innovation * innovation > OUTLIER_SIGMA ** 2 * spread else 0

    async def _diverged(self, node_id: str, outliers: int) -> None:
        """FILTER_DIVERGENCE: an alert event (stored, then live) until POST /filter/reset."""
        self.diverged[node_id] = True
        details = {"consecutive_outliers": outliers, "threshold_sigma": OUTLIER_SIGMA,
                   "action": "POST /v1/filter/reset, or PUT /v1/filter/parameters with more process noise"}
        self.note("warning", "Kalman filter diverged", node_id, code="FILTER_DIVERGENCE", **details)
        await self.ctx.events.emit(node_id, "alert", {"code": "FILTER_DIVERGENCE", **details}, severity="warning")
        now = self.ctx.now()
        self.ctx.live.publish("alert", node_id, {
            "event": "alert", "severity": "warning", "node_id": node_id, "timestamp": iso(now),
            "message": "Kalman filter diverged: the readings left its prediction", "code": "FILTER_DIVERGENCE",
            "details": details})

    def filter_reset(self, node_id: str) -> None:
        self.diverged.pop(node_id, None)
        self.outliers.pop(node_id, None)

    # -- readings -----------------------------------------------------------------------

    async def ingest(self, node_id: str, readings: Sequence[Reading], via: str) -> dict[str, Any]:
        """Filter and store a node's readings; the filter moves on only once they are committed.

        Readings not newer than the filter's last (a buffered batch sent twice) are
        rejected, not stored. Returns accepted, rejected (indexes and reasons) and the
        latest filtered values."""
        lock = self._reading_locks.setdefault(node_id, trio.Lock())
        async with waiting_elsewhere_for(lock):  # a lock's holder waits on the storage under it
            return await self._ingest(node_id, readings, via)

    def _clock_behind(self, node_id: str, restamped: int, stamped: bool, now: float, stamped_at: float) -> None:
        """A warning in the log (and GET /diagnostics/logs) when a node's readings begin to be
        restamped, and a note when one stamped by the gateway's clock needs it no more."""
        if restamped and node_id not in self.behind:
            self.behind.add(node_id)
            self.readings_restamped.inc(restamped)
            self.note("warning", "the gateway's clock is behind this node's last reading (stepped back?): readings "
                      "without a timestamp are stamped just after it until the clock catches up", node_id,
                      gateway_time=iso(now), stamped_at=iso(stamped_at))
        elif restamped:
            self.readings_restamped.inc(restamped)
        elif stamped and node_id in self.behind:
            self.behind.discard(node_id)
            self.note("info", "the gateway's clock has caught up with this node's readings", node_id)

    async def _ingest(self, node_id: str, readings: Sequence[Reading], via: str) -> dict[str, Any]:
        info = self.node(node_id)
        offset = float(info.calibration.get("temperature_offset", 0.0))
        hum_offset = float(info.calibration.get("humidity_offset", 0.0))
        fil = self.fleet.filter_copy(node_id)
        now = self.ctx.now()
        rows: list[dict[str, Any]] = []
        records: list[Record] = []
        rejected: list[dict[str, Any]] = []
        state: Mapping[str, Any] = fil.state()
        kept: list[Reading] = []
        outliers = self.outliers.get(node_id, 0)
        restamped = 0
        for i, r in enumerate(sorted(readings, key=lambda r: r.ts)):
            if r.stamped and fil._t is not None and r.ts <= fil._t:
                # The gateway's clock is behind the last reading filtered (stepped back, by NTP or
                # by hand): a reading stamped with it is still a new one. Just after the last,
                # so it is filtered, not refused for the length of the step; flagged.
                r = replace(r, ts=fil._t + RESTAMP_S)
                restamped += 1
            if fil._t is not None and r.ts <= fil._t:
                rejected.append({"index": i, "reason": "not newer than the last reading filtered"})
                continue
            kept.append(r)
            if r.temperature_k is not None:
                outliers = self._outlier(node_id, fil, r.ts, r.temperature_k + offset, outliers)
            values = {"temperature_kelvin": None if r.temperature_k is None else r.temperature_k + offset,
                      "humidity_percent": None if r.humidity_percent is None else r.humidity_percent + hum_offset,
                      "pressure_pa": r.pressure_pa}
            state = fil.update(r.ts, values)
            est = state["state_estimate"]
            rows.append({"node_id": node_id, "ts": r.ts, "received_at": now, "temperature_k": values["temperature_kelvin"],
                         "humidity_percent": values["humidity_percent"], "pressure_pa": r.pressure_pa,
                         "filtered_k": est["temperature_kelvin"]})
            records.append(Record(node_id, "reading", {k: v for k, v in values.items() if v is not None} |
                                  {"filtered_temperature_kelvin": est["temperature_kelvin"]}, r.ts, "history"))
        if records:
            await self.ctx.ingest.records(records, family_rows=lambda: self.store.add_readings(rows))
            self._clock_behind(node_id, restamped, any(r.stamped for r in kept), now, kept[-1].ts)
            self.fleet.filtered(node_id, fil, now)
            self.readings.inc(len(records), via=via)
            self.outliers[node_id] = outliers
            if outliers >= DIVERGED_AFTER and not self.diverged.get(node_id):
                await self._diverged(node_id, outliers)
            last = rows[-1]
            cov = fil.state()["covariance_matrix"]
            self.ctx.live.publish("sensors_reading", node_id, {
                "event": "sensors.reading", "node_id": node_id, "timestamp": iso(last["ts"]), "data": {
                    "temperature_kelvin": last["filtered_k"], "temperature_raw": last["temperature_k"],
                    "kalman_variance": float(cov[0][0]) if cov else None,
                    "quality": kept[-1].quality or "good"}})
        estimate = dict(state["state_estimate"])
        variance = None
        cov = state["covariance_matrix"]
        if cov:
            variance = float(cov[0][0])
        return {"accepted": len(records), "rejected": len(rejected), "rejections": rejected, "restamped": restamped,
                "filter_diverged": bool(self.diverged.get(node_id)),
                "latest_filtered": estimate, "kalman_variance": variance}
