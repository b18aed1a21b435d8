"""Events: what plugins and the core report about devices, stored and run through rules.

A plugin calls `await ctx.events.emit("streetlight", "SL001", "battery_low",
{"battery": 7}, severity="warning")`. The event is committed to `core_event`, then the
rule engine evaluates it; what fires goes to the durable notification queue, and the
notifier delivers it in the background, so `emit` never waits for a webhook.

`observe()` is the cheap sibling for periodic readings (a status report every 30 s):
the reading goes through the rules but is stored only if a rule fires on it. That is
how thresholds on status fields and silence (`absent_for_s`) rules work without one
event row per reading.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import peewee
import trio

from ...protocol.cursors import decode_cursor as _decode_cursor
from ...protocol.cursors import encode_cursor as _encode_cursor
from ...protocol.json_encoders import json_encoder
from ...protocol.times import parse_time
from ..logs import get_logger
from ..storage import SchemaSpec, StorageError
from .engine import ANY_TYPE, Firing, RuleEngine
from .rules import SEVERITIES, Rule

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..storage import Storage
    from .notify import Notifier

__all__ = [
    "Event",
    "EventBus",
    "EventError",
    "EventQuery",
    "EVENTS_SCHEMA",
    "parse_time",
    "query_events",
]

log = get_logger("gatewayd.events")
_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
MAX_DATA_BYTES = 64 * 1024


class EventError(ValueError):
    """An event the core refuses (bad type, severity, data); nothing was stored."""


class CoreEvent(peewee.Model):
    ts = peewee.FloatField(index=True)
    received_at = peewee.FloatField()
    family = peewee.CharField(max_length=64)
    device_id = peewee.CharField(max_length=128, null=True)
    type = peewee.CharField(max_length=64, index=True)
    severity = peewee.CharField(max_length=16)
    data = peewee.TextField(default="{}")
    duration_s = peewee.FloatField(null=True)
    resolved = peewee.BooleanField(null=True)

    class Meta:
        table_name = "core_event"
        indexes = ((("family", "device_id", "ts"), False),)


EVENTS_SCHEMA = SchemaSpec("core_events", [CoreEvent], version=1)


@dataclass
class Event:
    """One event. `resolved`: None (a point event), False (open), True (it has ended)."""

    family: str
    device_id: str | None
    type: str
    severity: str = "info"
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = 0.0
    duration_s: float | None = None
    resolved: bool | None = None
    id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "time": iso(self.ts),
            "family": self.family,
            "device_id": self.device_id,
            "type": self.type,
            "severity": self.severity,
            "data": self.data,
            "duration_s": self.duration_s,
            "resolved": self.resolved,
        }


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_NAMES_OK: set[tuple[str, str]] = set()  # (family, type) pairs that passed: a status per light is one pair


def _check_names(family: Any, type: Any) -> None:
    if not isinstance(family, str) or not _TYPE.fullmatch(family):
        raise EventError(f"family: expected a plugin name, got {family!r}")
    if not isinstance(type, str) or not _TYPE.fullmatch(type):
        raise EventError(f"type: expected letters, digits and _ . : - (at most 64), got {type!r}")
    if len(_NAMES_OK) >= 10_000:  # types may come from devices (an alert's alert_type): bounded
        _NAMES_OK.clear()
    _NAMES_OK.add((family, type))


def make_event(
    family: str,
    device_id: str | None,
    type: str,
    data: dict[str, Any] | None,
    *,
    severity: str,
    duration_s: float | None,
    resolved: bool | None,
    ts: float | None,
    now: float,
) -> Event:
    """Check an emitted event field by field; raise EventError saying which is wrong."""
    if family.__class__ is not str or type.__class__ is not str or (family, type) not in _NAMES_OK:
        _check_names(family, type)
    if device_id is not None and (not isinstance(device_id, str) or not 0 < len(device_id) <= 128):
        raise EventError(f"device_id: expected a string of 1-128 characters or None, got {device_id!r}")
    if severity not in SEVERITIES:
        raise EventError(f"severity: expected one of {', '.join(SEVERITIES)}, got {severity!r}")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise EventError(f"data: expected a dict, got {data.__class__.__name__}")
    try:
        encoded = json_encoder(allow_nan=False)(data)  # json.dumps(data, allow_nan=False), made once
    except (TypeError, ValueError) as e:
        raise EventError(f"data: not JSON-serializable: {e}") from None
    if len(encoded) > MAX_DATA_BYTES:
        raise EventError(f"data: {len(encoded)} bytes of JSON, more than {MAX_DATA_BYTES}")
    for name, value in (("duration_s", duration_s), ("ts", ts)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value) or value < 0):
            raise EventError(f"{name}: expected a number >= 0 or None, got {value!r}")
    if resolved is not None and not isinstance(resolved, bool):
        raise EventError(f"resolved: expected true, false or None, got {resolved!r}")
    return Event(family, device_id, type, severity, data, float(now if ts is None else ts),
                 None if duration_s is None else float(duration_s), resolved)


def _insert(event: Event, received_at: float) -> int:
    return CoreEvent.insert(
        ts=event.ts, received_at=received_at, family=event.family, device_id=event.device_id, type=event.type,
        severity=event.severity, data=json.dumps(event.data), duration_s=event.duration_s, resolved=event.resolved,
    ).execute()


class EventBus:
    """Stores events, runs them through the rule engine, hands firings to the notifier.

    `clock` is wall-clock seconds (tests pass one that follows trio's clock so rule
    timers run under `autojump_clock`).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        rules: Iterable[Rule] = (),
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ):
        self.storage = storage
        self.engine = RuleEngine(rules)
        self.notifier = notifier
        self.clock = clock
        self._wake = trio.Event()
        self._sleep_until: float | None = None  # when the timer loop wakes by itself (None: not asleep)
        self._emitted = self._rejected = self._fired = self._lost = self._errors = None
        if metrics is not None:
            self._emitted = metrics.counter("gatewayd_events_total", "Events stored", ("family", "severity"))
            self._rejected = metrics.counter("gatewayd_events_rejected_total", "Events refused as invalid", ("family",))
            self._fired = metrics.counter("gatewayd_rule_firings_total", "Alert rules fired", ("rule", "level"))
            self._lost = metrics.counter(
                "gatewayd_rule_firings_unqueued_total", "Firings that could not be queued (storage error)")
            self._errors = metrics.counter("gatewayd_rule_errors_total", "Rule evaluations that raised (a bug)")

    def set_rules(self, rules: Iterable[Rule]) -> None:
        """Replace the rule set (config rules merged over plugin defaults)."""
        self.engine.set_rules(rules)
        self._wake.set()

    async def emit(
        self,
        family: str,
        device_id: str | None,
        type: str,
        data: dict[str, Any] | None = None,
        *,
        severity: str = "info",
        duration_s: float | None = None,
        resolved: bool | None = None,
        ts: float | None = None,
    ) -> Event:
        """Store an event, then evaluate the rules on it; returns it with its `id`.

        `severity` is info, warning or critical. `duration_s`: how long the condition
        lasted (or has lasted so far); `resolved`: False for "it began", True for "it
        ended" (see `min_duration_s` and `resolved_by` in docs/events.md). `ts` is when
        it happened (epoch seconds; default now). Raises EventError on bad input and
        StorageError when it could not be committed. Returns once committed; alert
        delivery happens later, in the notifier.
        """
        now = self.clock()
        event = self._check(family, device_id, type, data, severity, duration_s, resolved, ts, now)
        event.id = await self.storage.write(_insert, event, now)
        if self._emitted is not None:
            self._emitted.inc(family=family, severity=severity)
        await self._dispatch(self._evaluate(event))
        return event

    async def observe(
        self,
        family: str,
        device_id: str | None,
        type: str,
        data: dict[str, Any] | None = None,
        *,
        severity: str = "info",
        ts: float | None = None,
    ) -> Event | None:
        """Run a reading through the rules; store it as an event only if a rule fires.

        For periodic reports (status every 30 s): thresholds on their fields and
        silence rules see every one, the event table only the interesting ones.
        Returns the stored event, or None when nothing fired.
        """
        now = self.clock()
        event = self._check(family, device_id, type, data, severity, None, None, ts, now)
        firings = self._evaluate(event)
        self._wake_if_sooner()  # a silence timer was re-armed: later, as a rule, for a report
        if not firings:
            return None
        event.id = await self.storage.write(_insert, event, now)
        await self._dispatch(firings)
        return event

    def _check(self, family, device_id, type, data, severity, duration_s, resolved, ts, now) -> Event:
        try:
            return make_event(family, device_id, type, data, severity=severity, duration_s=duration_s,
                              resolved=resolved, ts=ts, now=now)
        except EventError as e:
            if self._rejected is not None:
                self._rejected.inc(family=str(family)[:64])
            log.warning("event rejected", family=str(family)[:64], error=str(e))
            raise

    def _evaluate(self, event: Event) -> list[Firing]:
        # A bug in a rule must not turn a committed event into an error for the device
        # (it would resend it); it is logged and counted instead.
        try:
            return self.engine.on_event(event, self.clock())
        except Exception as e:
            self._engine_error(e)
            return []

    def _engine_error(self, e: Exception) -> None:
        if self._errors is not None:
            self._errors.inc()
        log.exception("rule evaluation failed", error=repr(e))

    def _wake_if_sooner(self) -> None:
        """Wake the timer loop only if a deadline now comes before it wakes by itself: a
        status from each of 1,000 lights must not wake it each time."""
        deadline = self.engine.next_deadline()
        if deadline is not None and (self._sleep_until is None or deadline < self._sleep_until):
            self._wake.set()

    async def _dispatch(self, firings: list[Firing]) -> None:
        self._wake_if_sooner()  # timers may have changed
        if not firings:
            return
        for f in firings:
            if self._fired is not None:
                self._fired.inc(rule=f.rule.name, level=f.level)
            log.info("rule fired", rule=f.rule.name, level=f.level, family=f.key[1], device=f.key[2],
                     reason=f.reason, grouped=f.grouped)
        if self.notifier is None:
            return
        try:
            await self.notifier.enqueue(firings)
        except StorageError as e:
            # The event itself is committed; failing the caller would make a device
            # resend it. Losing the notification is logged and counted instead.
            if self._lost is not None:
                self._lost.inc(len(firings))
            log.error("could not queue notifications", firings=len(firings), error=str(e))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Fire timed rules (open events, silences, escalations) when they come due."""
        task_status.started()
        while True:
            self._wake = trio.Event()
            deadline = self.engine.next_deadline()
            # Re-check at least every minute: the wall clock may have been stepped.
            now = self.clock()
            wait = 60.0 if deadline is None else min(60.0, max(0.0, deadline - now))
            self._sleep_until = now + wait
            with trio.move_on_after(wait):
                await self._wake.wait()
            self._sleep_until = None
            try:
                firings = self.engine.due(self.clock())
            except Exception as e:  # never take the gateway's core nursery down
                self._engine_error(e)
                await trio.sleep(1.0)
                continue
            await self._dispatch(firings)

    async def query(self, q: EventQuery) -> tuple[list[dict[str, Any]], str | None]:
        """Stored events, newest first, and the cursor of the next page (or None)."""
        return await self.storage.read(query_events, q)


@dataclass
class EventQuery:
    """Filters for listing events; `cursor` is what the previous page returned."""

    family: str | None = None
    device: str | None = None
    types: list[str] = field(default_factory=list)
    severities: list[str] = field(default_factory=list)
    since: float | None = None
    until: float | None = None
    limit: int = 100
    cursor: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad filter."""
        if not 1 <= self.limit <= 1000:
            raise ValueError(f"limit: expected 1-1000, got {self.limit}")
        for s in self.severities:
            if s not in SEVERITIES:
                raise ValueError(f"severity: expected one of {', '.join(SEVERITIES)}, got {s!r}")
        if self.cursor is not None:
            decode_cursor(self.cursor)


def encode_cursor(before_id: int) -> str:
    return _encode_cursor(before_id)


def decode_cursor(cursor: str) -> int:
    """The id the next page starts below; ValueError for anything not made by encode_cursor."""
    (before,) = _decode_cursor(cursor, (int,))
    if before < 1:
        raise ValueError("cursor: not a cursor returned by this API")
    return int(before)


def query_events(q: EventQuery) -> tuple[list[dict[str, Any]], str | None]:
    """Run on a reader thread (`storage.read`) or in the CLI (`storage.run_blocking`)."""
    query = CoreEvent.select().order_by(CoreEvent.id.desc())
    if q.family:
        query = query.where(CoreEvent.family == q.family)
    if q.device:
        query = query.where(CoreEvent.device_id == q.device)
    if q.types:
        query = query.where(CoreEvent.type.in_(q.types))
    if q.severities:
        query = query.where(CoreEvent.severity.in_(q.severities))
    if q.since is not None:
        query = query.where(CoreEvent.ts >= q.since)
    if q.until is not None:
        query = query.where(CoreEvent.ts < q.until)
    if q.cursor:
        query = query.where(CoreEvent.id < decode_cursor(q.cursor))
    rows = list(query.limit(q.limit + 1))
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    out = [
        Event(r.family, r.device_id, r.type, r.severity, json.loads(r.data), r.ts, r.duration_s, r.resolved,
              r.id).as_dict()
        for r in rows
    ]
    return out, (encode_cursor(rows[-1].id) if more else None)


class FamilyEvents:
    """`ctx.events`: the event bus bound to one family (rules and queries stay the core's)."""

    def __init__(self, bus: EventBus, family: str) -> None:
        self._bus = bus
        self.family = family

    async def emit(self, device_id: str | None, type: str, data: dict[str, Any] | None = None, *,
                   severity: str = "info", duration_s: float | None = None, resolved: bool | None = None,
                   ts: float | None = None) -> Event:
        """Store an event of this family, then run the alert rules on it; returns it once
        committed (with its `id`). `severity`: info, warning or critical; `duration_s`
        and `resolved` describe conditions that last (docs/events.md). Raises EventError
        on bad input, StorageError when it could not be committed."""
        return await self._bus.emit(self.family, device_id, type, data, severity=severity, duration_s=duration_s,
                                    resolved=resolved, ts=ts)

    async def observe(self, device_id: str | None, type: str, data: dict[str, Any] | None = None, *,
                      severity: str = "info", ts: float | None = None) -> Event | None:
        """Run a reading through the rules; store it as an event only if a rule fires
        (periodic reports: thresholds and silence rules see each one, the event table
        only the interesting ones). Returns the stored event or None."""
        return await self._bus.observe(self.family, device_id, type, data, severity=severity, ts=ts)

    def active(self) -> list[tuple[str, str | None, str | None]]:
        """This family's alerts firing now (fired, not yet resolved), as `(rule, device, event
        type)`, sorted: what `GET /api/gateway/alerts` lists as `active`, for a dashboard panel.
        Held in memory by the rule engine: empty again after a restart."""
        return [(rule, device or None, None if etype == ANY_TYPE else etype)
                for rule, family, device, etype in self._bus.engine.active() if family == self.family]
