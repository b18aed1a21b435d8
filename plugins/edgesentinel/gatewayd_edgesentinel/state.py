"""`Sentinel`, the plugin's state (`ctx.state`): a telemetry batch from its headers to
its commit, the handshake's nonces, and the backpressure verdicts; and the key that
signs firmware download URLs (`url_key`).

Across a restart (README.md, "Restarts"): the URL key is kept in the plugin's data
folder, so the download URLs handed out stay good until they expire; the nonces live in
memory only (at most `nonce_ttl_s`): a node holding one is refused once (401, "not a
fresh nonce ...: handshake again") and does a new handshake.

A batch is taken under its device's lock (one batch of a device at a time), so a
replayed Idempotency-Key and the record-level duplicate check see every batch before
it committed: the key's answer and the record hashes commit in the same transaction
as the rows and the upstream records (`ctx.ingest.records(..., family_rows=...)`).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gatewayd.plugins.api import Device, PluginContext, Record

from . import models
from .batch import Batch, BatchError
from .fastpath import read_batch
from .pressure import Degrade, Verdict, judge
from .windows import pack, window_stats

if TYPE_CHECKING:
    from .config import EdgesentinelConfig

MAX_NONCES = 10_000  # outstanding handshake nonces, all devices (oldest forgotten first)
MAX_SIGNED = 100_000  # timestamp-signed batches remembered while their timestamp is good (oldest forgotten first)
URL_KEY = "url-signing.key"


def url_key(directory: Path) -> bytes:
    """The key signing firmware download URLs: `<plugin data>/url-signing.key` (32 random
    bytes, 0600), made on first use. Read once, as the routes are built."""
    path = directory / URL_KEY
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    if len(key) == 32:
        if os.stat(path).st_mode & 0o077:  # restored or copied readable by others: private again
            os.chmod(path, 0o600)
        return key
    directory.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    tmp = path.with_name(URL_KEY + ".tmp")
    tmp.unlink(missing_ok=True)  # a stale one keeps its mode through O_CREAT: start afresh
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a damaged file is replaced: only the URLs handed out before die
    return key


@dataclass(frozen=True)
class Answer:
    """What a batch was answered: the status and the JSON document."""

    status: int
    doc: dict[str, Any]
    replayed: bool = False


class Sentinel:
    """The plugin's state: one per gateway."""

    def __init__(self, ctx: PluginContext[EdgesentinelConfig, Sentinel]) -> None:
        self.ctx = ctx
        self.rows = models.Rows(ctx.storage.connection)
        self.degrade = Degrade(ctx.config.backpressure)
        self.inflight = 0
        self.inflight_bytes = 0  # inflated bytes of those batches (backpressure.max_inflight_bytes)
        self._locks: dict[str, trio.Lock] = {}
        self._nonces: OrderedDict[str, float] = OrderedDict()  # "<device>\n<nonce>" -> expiry
        # "<device>\n<X-Timestamp>\n<body's sha256>" -> (Idempotency-Key, expiry)
        self._signed: OrderedDict[str, tuple[str, float]] = OrderedDict()
        m = ctx.metrics
        self.batches = m.counter("batches_total", "Telemetry batches answered", ("outcome",))
        self.records = m.counter("records_total", "Records of accepted batches", ("outcome",))
        self.pressure_gauge = m.gauge("backpressure_level", "0 normal, 1 elevated, 2 rejecting")

    # -- backpressure -----------------------------------------------------------------

    def verdict(self) -> Verdict:
        """The backpressure verdict for a batch arriving now (README.md, "Backpressure")."""
        p = self.ctx.ingest.pressure()
        v = judge(p.outbox_fill, p.writer_queue, self.inflight, self.ctx.config.backpressure)
        self.degrade.observe(v.level, v.reason, self.ctx.now())
        self.pressure_gauge.set({"normal": 0, "elevated": 1, "reject": 2}[v.level])
        return v

    # -- handshake nonces ---------------------------------------------------------------

    def issue_nonce(self, device_id: str) -> str:
        now = self.ctx.now()
        self._forget_expired(now)
        nonce = secrets.token_hex(16)
        self._nonces[f"{device_id}\n{nonce}"] = now + self.ctx.config.nonce_ttl_s
        while len(self._nonces) > MAX_NONCES:
            self._nonces.popitem(last=False)
        return nonce

    def take_nonce(self, device_id: str, nonce: str) -> bool:
        """True once for a nonce the handshake gave this device, while it is fresh."""
        expiry = self._nonces.pop(f"{device_id}\n{nonce}", None)
        return expiry is not None and expiry >= self.ctx.now()

    def first_signed(self, device_id: str, stamp: str, checksum: str, key: str, good_until: float) -> bool:
        """False when this timestamp-signed body (the same `X-Timestamp` and body: the same
        signed message) already came under another Idempotency-Key while its timestamp is
        still good: a captured request sent again under a new key (README.md, "Signing").
        The same key is the node's own retry, answered from the ledger."""
        now = self.ctx.now()
        while self._signed:
            oldest, (_, expiry) = next(iter(self._signed.items()))
            if expiry >= now:
                break
            del self._signed[oldest]
        name = f"{device_id}\n{stamp}\n{checksum}"
        seen = self._signed.get(name)
        if seen is not None and seen[0] != key:
            return False
        self._signed[name] = (key, good_until)
        while len(self._signed) > MAX_SIGNED:
            self._signed.popitem(last=False)
        return True

    def _forget_expired(self, now: float) -> None:
        while self._nonces:
            key, expiry = next(iter(self._nonces.items()))
            if expiry >= now:
                break
            del self._nonces[key]

    # -- a batch --------------------------------------------------------------------------

    def lock(self, device_id: str) -> trio.Lock:
        lock = self._locks.get(device_id)
        if lock is None:
            lock = self._locks[device_id] = trio.Lock()
        return lock

    async def replay(self, device: Device, key: str, checksum: str) -> Answer | None:
        """The answer already given under this Idempotency-Key, or None; BatchError 409 for
        the same key with another body."""
        found = await self.ctx.storage.read(models.answered, device.id, key)
        if found is None:
            return None
        stored_checksum, answer = found
        if stored_checksum != checksum:
            raise BatchError(409, "idempotency_conflict", f"Idempotency-Key {key} was used for another body "
                                                          f"(its Content-SHA256 was {stored_checksum})")
        return Answer(200, json.loads(answer), replayed=True)

    async def take(self, device: Device, key: str, checksum: str, inflated: bytes, verdict: Verdict) -> Answer:
        """Parse, deduplicate and store a batch; the answer once committed. Call it under
        `lock(device.id)` after `replay` found nothing."""
        received = self.ctx.now()
        batch = await trio.to_thread.run_sync(self._parse, inflated, device.id, key, received)
        if batch.restamp and batch.sent_at is not None:
            batch.shift(received - batch.sent_at)
        seen = await self.ctx.storage.read(models.seen_hashes, device.id, batch.batch_id)
        rows, records, duplicates = await trio.to_thread.run_sync(self._rows, device.id, batch, seen, received)
        accepted = batch.valid - duplicates
        doc = {"accepted": accepted, "duplicates": duplicates, "rejected": len(batch.rejections),
               "next_hint": verdict.hint, "batch_id": batch.batch_id,
               "rejections": [r.as_json() for r in batch.rejections[:100]]}
        rows["packet"] = [(device.id, key, checksum, batch.batch_id, "accepted", received, accepted, duplicates,
                           len(batch.rejections), json.dumps(doc, separators=(",", ":")))]
        await self.ctx.ingest.records(records, family_rows=lambda: self.rows.write(rows))
        self.batches.inc(outcome="accepted")
        self.records.inc(accepted, outcome="accepted")
        self.records.inc(duplicates, outcome="duplicate")
        self.records.inc(len(batch.rejections), outcome="rejected")
        self.ctx.devices.touch(device.id)
        await self._observe(device.id, batch)
        return Answer(200, doc)

    def _parse(self, inflated: bytes, device_id: str, key: str, received: float) -> Batch:
        config = self.ctx.config
        return read_batch(inflated, device_id=device_id, idempotency_key=key, max_records=config.max_records,
                          max_samples=config.windows.max_samples, received=received)

    def _rows(self, device_id: str, batch: Batch, seen: set[int], now: float
              ) -> tuple[dict[str, list[tuple[Any, ...]]], list[Record], int]:
        """The rows of each table and the upstream records of the batch's new records (a
        worker thread: thousands of tuples); and how many were duplicates."""
        config = self.ctx.config
        fresh: set[int] = set()
        duplicates = 0

        def new(h: int) -> bool:
            nonlocal duplicates
            if h in seen or h in fresh:
                duplicates += 1
                return False
            fresh.add(h)
            return True

        rows: dict[str, list[tuple[Any, ...]]] = {name: [] for name in models.SERIES}
        records: list[Record] = []
        d = device_id
        point_rows, add_fresh = rows["points"], fresh.add
        for ts, metric, value, unit, meta_text, meta, h in batch.points:  # the hot loop: new() inline
            if h in seen or h in fresh:
                duplicates += 1
                continue
            add_fresh(h)
            point_rows.append((ts, d, metric, value, unit, meta_text))
            records.append(Record(d, "point", {"metric": metric, "value": value, "unit": unit, "meta": meta}
                                  if meta is not None else {"metric": metric, "value": value, "unit": unit}, ts))
        for ts, metric, stats, window_s, h in batch.windows:
            if new(h):
                rows["windows"].append((ts, d, metric, json.dumps(stats), window_s, "node"))
                records.append(Record(d, "window", {"metric": metric, "stats": stats, "window_s": window_s,
                                                    "source": "node"}, ts))
        waves = [w for w in batch.waveforms if new(w[5])]
        stats_list = window_stats([(ts, m, rate, s) for ts, m, rate, s, _, _ in waves], config.windows.bands_hz,
                                  config.windows.nperseg)
        for (ts, metric, rate, samples, unit, _), stats in zip(waves, stats_list, strict=True):
            window_s = len(samples) / rate
            rows["windows"].append((ts, d, metric, json.dumps(stats), window_s, "gateway"))
            records.append(Record(d, "window", {"metric": metric, "stats": stats, "window_s": window_s,
                                                "source": "gateway"}, ts))
            if config.windows.raw_retention_days > 0:
                rows["waveforms"].append((ts, d, metric, rate, unit, pack(samples)))
            if config.windows.forward_raw:
                records.append(Record(d, "waveform", {"metric": metric, "rate_hz": rate, "unit": unit,
                                                      "samples": samples}, ts, "log"))
        for ts, door, kind, rest, h in batch.door_events:
            if new(h):
                rows["door_events"].append((ts, d, door, kind, json.dumps(rest)))
                records.append(Record(d, "door_event", {"door_id": door, "type": kind, **rest}, ts, "state"))
        for ts, event_type, severity, description, duration, resolved, event_meta, h in batch.system_events:
            if new(h):
                rows["system_events"].append((ts, d, event_type, severity, description, duration, resolved,
                                              json.dumps(event_meta)))
                records.append(Record(d, "system_event", {
                    "event_type": event_type, "severity": severity, "description": description,
                    "duration": duration, "resolved": resolved, "meta": event_meta},
                    ts, "alert" if severity == "critical" else "state"))
        rows["seen"] = [(d, batch.batch_id, h, now) for h in fresh]
        return rows, records, duplicates

    async def _observe(self, device_id: str, batch: Batch) -> None:
        """The batch's events through the family's rules (workflows.py), after the commit:
        system events are stored as the core's events too (`/api/gateway/events`)."""
        events = self.ctx.events
        for ts, event_type, severity, description, duration, resolved, meta, _ in batch.system_events:
            data = {k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))}
            await events.emit(device_id, event_type, {**data, "description": description}, severity=severity,
                              duration_s=duration, resolved=resolved, ts=ts)
        for ts, door, kind, rest, _ in batch.door_events:
            if kind in ("over_torque", "vibration_alert"):
                await events.observe(device_id, kind, {"door_id": door, **{k: v for k, v in rest.items()
                                                                          if k != "meta"}}, severity="warning", ts=ts)
        retries = batch.diagnostics.get("retry_count")
        if retries is not None:
            await events.observe(device_id, "upload_diagnostics", {"retry_count": retries})

    # -- retention ----------------------------------------------------------------------

    async def expire(self) -> int:
        """One pass of local retention: idempotency keys and hashes past `dedup_days`,
        series past `retention_days`, raw waveforms past `windows.raw_retention_days`."""
        config, now, day = self.ctx.config, self.ctx.now(), 86400.0
        removed = 0
        jobs: list[tuple[Any, ...]] = [
            (models.expire_ledger, models.Packet, "received_at", now - config.dedup_days * day, now),
            (models.expire_ledger, models.Seen, "at", now - config.dedup_days * day, now),
            (models.expire_series, models.Waveform, "device", now - config.windows.raw_retention_days * day),
        ]
        if config.retention_days > 0:
            before = now - config.retention_days * day
            jobs += [(models.expire_series, m, "device", before)
                     for m in (models.Point, models.Window, models.DoorEvent, models.SystemEvent)]
        for fn, *args in jobs:
            while (n := await self.ctx.storage.write(fn, *args)) > 0:
                removed += n
                await trio.sleep(0)  # other writes between steps
        return removed

    async def run_retention(self) -> None:
        """The background task: a pass an hour (the first a minute after start)."""
        await trio.sleep(60)
        while True:
            started = time.monotonic()
            removed = await self.expire()
            if removed:
                self.ctx.log.info("retention", removed=removed, took_s=round(time.monotonic() - started, 3))
            await trio.sleep(3600)
