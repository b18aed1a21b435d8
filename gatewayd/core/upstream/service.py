"""Upstream: builds the sinks and sync workers from `[[upstream]]`, runs them, reports them.

The runtime starts it last (step 7 of the start order): the outbox maintenance task
(time-to-live, oldest ages) and one `SyncWorker` per enabled upstream. `/metrics` and
`/health` (one component `upstream.<name>` per sink) read the live figures here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio

from ...protocol.batch import CLASSES, mqtt_topic
from ...protocol.retry import Backoff, CircuitBreaker
from ..health import ComponentState, Health
from ..logs import get_logger
from ..metrics import Metrics, Sample
from ..outbox.store import Outbox
from ..schema import read_secret
from .http_sink import HttpSink
from .worker import SyncWorker

__all__ = ["Upstream"]

log = get_logger("gatewayd.sync")


class Upstream:
    """Every sync worker of the gateway, plus the outbox's maintenance task."""

    def __init__(self, config: Any, outbox: Outbox, metrics: Metrics, health: Health,
                 *, clock: Callable[[], float] = time.time):
        self.config = config
        self.outbox = outbox
        self.health = health
        self.clock = clock
        self.workers: dict[str, SyncWorker] = {}
        self.problems: dict[str, str] = {}  # sink -> why it cannot run (missing secret)
        self.restarts: dict[str, int] = {}
        self._register_metrics(metrics)

    def _build(self, entry: Any) -> SyncWorker | None:
        try:
            mqtt_topic(self.config.gateway.id)  # the protocol's gateway id rules
        except ValueError:
            self.problems[entry.name] = (f"gateway.id {self.config.gateway.id!r} is not a valid upstream gateway id "
                                         "(1-64 of [A-Za-z0-9._-], starting with a letter or digit)")
            return None
        secret = read_secret(entry.secret_env)
        if secret is None:
            self.problems[entry.name] = f"environment variable {entry.secret_env} (the HMAC secret) is not set"
            return None
        if entry.kind == "http":
            verify: bool | str = entry.tls_ca or entry.tls_verify
            sink: Any = HttpSink(entry.name, entry.url, path=entry.path, timeout_s=entry.timeout_s,
                                 verify=verify, clock=self.clock)
        else:
            from .mqtt_sink import cloud_sink

            try:
                sink = cloud_sink(entry, self.config.gateway.id)
            except Exception as e:
                self.problems[entry.name] = str(e)
                return None
        return SyncWorker(
            self.outbox, sink,
            gateway_id=self.config.gateway.id, secret=secret.encode("utf-8"), compression=entry.compression,
            max_records=entry.max_records, max_bytes=entry.max_bytes, linger_s=entry.linger_s,
            backoff=Backoff(), breaker=CircuitBreaker(threshold=entry.breaker_threshold,
                                                      cooldown_s=entry.breaker_cooldown_s, clock=trio.current_time),
            clock=self.clock,
        )

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start maintenance and every worker; `started()` once all of them are running."""
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: self.outbox.maintain(
                every_s=self.config.outbox.maintenance_s, task_status=task_status))
            for entry in self.config.upstream:
                if not entry.enabled:
                    continue
                worker = self._build(entry)
                self.health.probe(f"upstream.{entry.name}", lambda n=entry.name: self._state(n))
                if worker is None:
                    log.error("upstream cannot start; records wait in the outbox", sink=entry.name,
                              reason=self.problems[entry.name])
                    continue
                self.workers[entry.name] = worker
                await nursery.start(self._supervise, worker)
                log.info("upstream started", sink=entry.name, to=worker.sink.describe())
            task_status.started()

    async def _supervise(self, worker: SyncWorker, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run a worker; if it crashes (a bug), log it and restart it with backoff.

        The outbox is untouched by a crash: the restarted worker resends its open
        batches with their keys, exactly as after a process restart.
        """
        task_status.started()  # never hold the gateway's start-up on a sink
        delay = 1.0
        while True:
            began = trio.current_time()
            try:
                await worker.run()
                return
            except Exception as e:
                if trio.current_time() - began > 300:
                    delay = 1.0
                self.restarts[worker.name] = self.restarts.get(worker.name, 0) + 1
                log.exception("sync worker crashed; restarting", sink=worker.name, error=repr(e), restart_in_s=delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 300.0)

    # -- /health and /metrics ---------------------------------------------------------

    def _state(self, name: str) -> ComponentState:
        if name in self.problems:
            return ComponentState("failed", self.problems[name])
        worker = self.workers.get(name)
        if worker is None:
            return ComponentState("starting")
        details = worker.state()
        if worker.paused is not None:  # 401/403, a wrong URL, a wrong size limit: an operator has to act
            return ComponentState("failed", f"paused: {worker.paused}", details)
        if details["breaker"] == "open":
            # A warning, not a failure: the gateway still takes and stores device data, the
            # outbox keeps it, and the cloud's outage is not this box's to fix (last_error says why).
            return ComponentState("degraded", "circuit_open", details, critical=False)
        return ComponentState("ok", None, details)

    def _register_metrics(self, m: Metrics) -> None:
        o = self.outbox

        def per_class(name: str, index: int) -> Callable[[], list[Sample]]:
            return lambda: [Sample(name, {"class": c}, o.counts.get(f"class:{c}", [0, 0])[index]) for c in CLASSES]

        m.collector("gatewayd_outbox_records", "gauge", "Records waiting in the outbox, per class",
                    per_class("gatewayd_outbox_records", 0))
        m.collector("gatewayd_outbox_bytes", "gauge", "Bytes of records waiting in the outbox, per class",
                    per_class("gatewayd_outbox_bytes", 1))
        m.collector("gatewayd_outbox_oldest_age_seconds", "gauge", "Age of the oldest waiting record, per class",
                    lambda: [Sample("gatewayd_outbox_oldest_age_seconds", {"class": c},
                                    max(0.0, self.clock() - o.oldest[p]) if o.oldest.get(p) else 0)
                             for p, c in enumerate(CLASSES)])
        m.collector("gatewayd_outbox_dropped_total", "counter",
                    "Records dropped by the outbox policy (reason: capacity or ttl)",
                    lambda: [Sample("gatewayd_outbox_dropped_total", {"class": c, "reason": r}, n)
                             for (c, r), n in sorted(o.dropped.items())])
        m.collector("gatewayd_outbox_refused_total", "counter",
                    "Records refused at ingest because storage or the outbox was full or failing",
                    lambda: [Sample("gatewayd_outbox_refused_total", {"class": c}, n) for c, n in sorted(o.refused.items())])
        m.collector("gatewayd_sync_backlog_records", "gauge", "Records a sink has still to deliver",
                    lambda: [Sample("gatewayd_sync_backlog_records", {"sink": s}, o.counts.get(f"sink:{s}", [0, 0])[0])
                             for s in o.sinks])
        m.collector("gatewayd_sync_batches_total", "counter", "Batches sent, by outcome",
                    lambda: [Sample("gatewayd_sync_batches_total", {"sink": s, "outcome": k}, n)
                             for s, w in sorted(self.workers.items()) for k, n in sorted(w.stats.batches.items())])
        m.collector("gatewayd_sync_records_total", "counter",
                    "Records sent, by result (accepted, duplicates, rejected, dead_lettered)",
                    lambda: [Sample("gatewayd_sync_records_total", {"sink": s, "result": k}, n)
                             for s, w in sorted(self.workers.items()) for k, n in sorted(w.stats.records.items())])
        m.collector("gatewayd_sync_last_success_timestamp_seconds", "gauge", "When a sink last delivered a batch",
                    lambda: [Sample("gatewayd_sync_last_success_timestamp_seconds", {"sink": s}, w.stats.last_success or 0)
                             for s, w in sorted(self.workers.items())])
        m.collector("gatewayd_sync_worker_restarts_total", "counter", "Sync workers restarted after a crash",
                    lambda: [Sample("gatewayd_sync_worker_restarts_total", {"sink": s}, n)
                             for s, n in sorted(self.restarts.items())])
        m.collector("gatewayd_sync_paused", "gauge",
                    "1 while a sink is paused: the far end refuses the gateway's credentials (401/403), "
                    "has no batch endpoint at the configured URL (404/405) or has a size limit below what "
                    "it took before (413)",
                    lambda: [Sample("gatewayd_sync_paused", {"sink": s}, 1 if w.paused is not None else 0)
                             for s, w in sorted(self.workers.items())])
        m.collector("gatewayd_sync_breaker_open", "gauge", "1 while a sink's circuit breaker holds it",
                    lambda: [Sample("gatewayd_sync_breaker_open", {"sink": s}, 1 if w.breaker.state == "open" else 0)
                             for s, w in sorted(self.workers.items())])
