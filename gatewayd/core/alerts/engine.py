"""The rule engine: events in, firings out. Sans-I/O: `now` is passed in, nothing sleeps.

The EventBus feeds every stored event to `on_event(event, now)` and calls `due(now)`
when `next_deadline()` passes; each returns `Firing`s for the notifier to deliver.

State is kept per *group key* `(rule, family, device, type)`:

- cooldown: after a firing, the same key stays quiet for `cooldown_s`; what it would
  have sent is counted and reported as `grouped` in the next firing (a flapping device
  sends one alert, then one summary, not a flood);
- open events: with `min_duration_s`, an event without `duration_s` starts a timer that
  fires unless a resolving event arrives first (`resolved = true` of the same type, or a
  type listed in `resolved_by`); an event that carries `duration_s` is judged at once;
- count windows: `more_than` N matching events `within_s` seconds (by event time);
- silence: `absent_for_s` fires once when a device that sent matching events stops;
- escalation: `escalate.after_s` after the alert *began* (the start of the episode),
  the escalation actions run if it is still unresolved;
- suppress: a firing rule may mute other rules for that device (e.g. a sensor fault
  mutes the alerts the broken sensor would raise) until it resolves or `for_s` passes.

State lives in memory: after a restart, open timers and windows start empty (stored
events are not replayed; see docs/events.md).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from .rules import Action, Condition, Rule

__all__ = ["RuleEngine", "Firing"]

Key = tuple[str, str, str, str]  # rule, family, device, type
ANY_TYPE = "*"
OPEN, ABSENT, ESCALATION = 0, 1, 2  # the timer tables, as the heap's entries name them
_MATCHING_MAX = 16384  # (family, device, type) keys whose matching rules are remembered


@dataclass
class Firing:
    """One rule firing (or escalation): the actions to run and what to tell."""

    rule: Rule
    level: Literal["alert", "escalation"]
    actions: list[Action]
    key: Key
    event: Any
    reason: str
    at: float
    grouped: int = 0

    @property
    def severity(self) -> str:
        return self.rule.alert_severity or getattr(self.event, "severity", "") or "warning"

    def payload(self, gateway_id: str) -> dict[str, Any]:
        """The JSON document every action sends (webhook body, MQTT payload, upstream record)."""
        _, family, device, etype = self.key
        event = self.event.as_dict() if hasattr(self.event, "as_dict") else None
        return {
            "gateway_id": gateway_id,
            "rule": self.rule.name,
            "level": self.level,
            "severity": self.severity,
            "message": self.rule.message or self.reason,
            "reason": self.reason,
            "family": family,
            "device_id": device or None,
            "event_type": etype if etype != ANY_TYPE else getattr(self.event, "type", None),
            "event": event,
            "grouped": self.grouped,
            "fired_at": self.at,
        }


@dataclass
class _Timer:
    deadline: float
    event: Any
    started: float = 0.0


@dataclass
class _Mute:
    until: float
    source: Key


@dataclass
class EngineStats:
    fired: int = 0
    escalated: int = 0
    suppressed: int = 0
    muted: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)


def _all_hold(conditions: tuple[Condition, ...], event: Any) -> bool:
    # A loop, not all() over a generator: this runs for every rule on every status.
    for condition in conditions:
        if not condition.check(event):
            return False
    return True


class RuleEngine:
    """Evaluates rules over events; holds cooldowns, windows, timers and mutes."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.stats = EngineStats()
        self._rules: dict[str, Rule] = {}
        self._last_fired: dict[Key, float] = {}
        self._grouped: dict[Key, int] = {}
        self._windows: dict[Key, deque[float]] = {}
        self._open: dict[Key, _Timer] = {}
        self._absent: dict[Key, _Timer] = {}
        self._escalations: dict[Key, _Timer] = {}
        self._tables = (self._open, self._absent, self._escalations)  # by OPEN, ABSENT, ESCALATION
        # Every armed timer, earliest first: (deadline, order, table, key, timer). A timer
        # replaced or cleared stays in the heap until it comes up and is skipped (its
        # table no longer holds it): a device's silence timer is re-armed by each of its
        # reports, and that must cost a push, not a sort of every device's timers.
        self._heap: list[tuple[float, int, int, Key, _Timer]] = []
        self._order = itertools.count()
        self._active: set[Key] = set()
        self._mutes: dict[tuple[str, str, str], _Mute] = {}
        # (family, device, type) -> the rules whose family and device globs match, and of
        # those the ones whose type globs match too: every event used to run each rule's
        # globs twice, more than the rest of its evaluation. Emptied with each new rule set.
        self._matching: dict[tuple[str, str | None, str], tuple[tuple[Rule, ...], tuple[Rule, ...]]] = {}
        self.set_rules(rules)

    @property
    def rules(self) -> list[Rule]:
        return list(self._rules.values())

    def set_rules(self, rules: Iterable[Rule]) -> None:
        """Replace the rule set; state of rules that are gone is dropped."""
        self._rules = {r.name: r for r in rules if r.enabled}
        self._matching = {}
        for table in (self._last_fired, self._grouped, self._windows, self._open, self._absent, self._escalations):
            for key in [k for k in table if k[0] not in self._rules]:
                del table[key]
        self._active = {k for k in self._active if k[0] in self._rules}

    # -- events --------------------------------------------------------------------

    def on_event(self, event: Any, now: float) -> list[Firing]:
        """Evaluate one event (after it was stored); return what fires now."""
        was_active = self._resolve(event, now)
        firings: list[Firing] = []
        for rule in self._matching_rules(event)[1]:
            if not rule.matches_severity(event.severity) or (self._mutes and self._muted(rule, event, now)):
                continue
            if rule.absent_for_s:
                key = (rule.name, event.family, event.device_id or "", ANY_TYPE)
                self._arm(ABSENT, key, _Timer(now + rule.absent_for_s, event, now))
                self._clear(key)  # the device spoke again: the silence is over
                continue
            key = (rule.name, event.family, event.device_id or "", event.type)
            if not _all_hold(rule.conditions, event) or not rule.in_time_window(event.ts):
                continue
            if event.resolved is True and not (rule.min_duration_s and event.duration_s is not None):
                continue  # a resolution never raises an alert of its own
            if rule.more_than:
                window = self._windows.setdefault(key, deque())
                window.append(event.ts)
                while window and window[0] <= event.ts - rule.within_s:
                    window.popleft()
                if len(window) <= rule.more_than:
                    continue
                reason = f"{len(window)} {event.type} events within {rule.within_s:g} s (more than {rule.more_than})"
            elif rule.min_duration_s:
                if event.duration_s is None:
                    self._arm(OPEN, key, _Timer(event.ts + rule.min_duration_s, event, event.ts))
                    continue
                if event.duration_s <= rule.min_duration_s or key in was_active:
                    continue
                reason = f"{event.type} lasted {event.duration_s:g} s (more than {rule.min_duration_s:g} s)"
            else:
                reason = self._describe(rule, event)
            firing = self._fire(rule, key, event, now, reason)
            if firing is not None:
                firings.append(firing)
        return firings

    def due(self, now: float) -> list[Firing]:
        """Timers that have passed: unresolved open events, silences, escalations."""
        firings: list[Firing] = []
        heap = self._heap
        # Earliest first; a firing may arm an escalation already due: it comes up here too.
        while heap and heap[0][0] <= now:
            _, _, kind, key, timer = heapq.heappop(heap)
            table = self._tables[kind]
            if table.get(key) is not timer:
                continue  # replaced or cleared since it was armed
            del table[key]
            rule = self._rules[key[0]]
            if kind == ESCALATION:
                if key not in self._active:
                    continue
                self.stats.escalated += 1
                reason = f"still unresolved {rule.escalate.after_s:g} s after it began ({timer.event.type})"
                firings.append(Firing(rule, "escalation", list(rule.escalate.actions), key, timer.event, reason, now))
                continue
            describe = self._describe_open if kind == OPEN else self._describe_absent
            firing = self._fire(rule, key, timer.event, now, describe(rule, timer), started=timer.started)
            if firing is not None:
                firings.append(firing)
        self._mutes = {k: m for k, m in self._mutes.items() if m.until > now}
        # Forget cooldowns long past so state stays bounded by what is recent.
        for key in [k for k, t in self._last_fired.items() if now - t > self._rules[k[0]].cooldown_s
                    and k not in self._grouped and k not in self._active]:
            del self._last_fired[key]
        return firings

    def next_deadline(self) -> float | None:
        """When `due()` next has something to do (None: nothing scheduled)."""
        heap = self._heap
        while heap and self._tables[heap[0][2]].get(heap[0][3]) is not heap[0][4]:
            heapq.heappop(heap)  # replaced or cleared: not a deadline any more
        return heap[0][0] if heap else None

    def active(self) -> list[Key]:
        """Keys that fired and are not resolved yet."""
        return sorted(self._active)

    # -- internals -----------------------------------------------------------------

    def _arm(self, kind: int, key: Key, timer: _Timer) -> None:
        self._tables[kind][key] = timer
        heap = self._heap
        heapq.heappush(heap, (timer.deadline, next(self._order), kind, key, timer))
        live = len(self._open) + len(self._absent) + len(self._escalations)
        if len(heap) > 2 * live + 1024:  # mostly replaced timers: rebuild from the live ones
            heap[:] = [e for e in heap if self._tables[e[2]].get(e[3]) is e[4]]
            heapq.heapify(heap)

    def _fire(self, rule: Rule, key: Key, event: Any, now: float, reason: str,
              started: float | None = None) -> Firing | None:
        last = self._last_fired.get(key)
        if last is not None and now - last < rule.cooldown_s:
            self._grouped[key] = self._grouped.get(key, 0) + 1
            self.stats.suppressed += 1
            return None
        grouped = self._grouped.pop(key, 0)
        self._last_fired[key] = now
        self._active.add(key)
        self.stats.fired += 1
        self.stats.by_rule[rule.name] = self.stats.by_rule.get(rule.name, 0) + 1
        if rule.escalate is not None and event.resolved is not True:
            began = started if started is not None else event.ts - (event.duration_s or 0.0)
            self._arm(ESCALATION, key, _Timer(max(began + rule.escalate.after_s, now), event, began))
        for action in rule.actions:
            if action.kind == "suppress":
                targets = action.rules or ["*"]
                for target in targets:
                    self._mutes[(target, key[1], key[2])] = _Mute(now + action.for_s, key)
        deliver = [a for a in rule.actions if a.kind != "suppress"]
        return Firing(rule, "alert", deliver, key, event, reason, now, grouped)

    def _muted(self, rule: Rule, event: Any, now: float) -> bool:
        for target in (rule.name, "*"):
            mute = self._mutes.get((target, event.family, event.device_id or ""))
            if mute is not None and mute.until > now and mute.source[0] != rule.name:
                self.stats.muted += 1
                return True
        return False

    def _resolve(self, event: Any, now: float) -> set[Key]:
        """Close what this event resolves; return the keys that had fired (were active)."""
        closed: set[Key] = set()
        for rule in self._matching_rules(event)[0]:
            family, device = event.family, event.device_id or ""
            if event.type in rule.resolved_by:
                keys = [k for k in (*self._open, *self._active, *self._escalations)
                        if k[0] == rule.name and k[1] == family and k[2] == device]
            elif event.resolved is True and rule.matches_type(event.type):
                keys = [(rule.name, family, device, event.type)]
            else:
                continue
            for key in keys:
                if key in self._active:
                    closed.add(key)
                self._clear(key)
        return closed

    def _matching_rules(self, event: Any) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
        """The rules matching the event's family and device, in rule order; and of those,
        the ones matching its type too (remembered per family, device and type)."""
        key = (event.family, event.device_id, event.type)
        found = self._matching.get(key)
        if found is None:
            by_source = tuple(r for r in self._rules.values() if r.matches_source(event))
            found = (by_source, tuple(r for r in by_source if r.matches_type(event.type)))
            if len(self._matching) >= _MATCHING_MAX:  # devices and types come from outside: bounded
                self._matching.clear()
            self._matching[key] = found
        return found

    def _clear(self, key: Key) -> None:
        self._open.pop(key, None)
        self._escalations.pop(key, None)
        self._active.discard(key)
        if self._mutes:  # usually none: each status of each light clears its silence timer's key
            for mute_key in [k for k, m in self._mutes.items() if m.source == key]:
                del self._mutes[mute_key]

    @staticmethod
    def _describe(rule: Rule, event: Any) -> str:
        parts = [f"{event.type} ({event.severity})"]
        parts += [c.text for c in rule.conditions]
        if rule.hours is not None:
            parts.append(f"outside {rule.outside_hours}" if rule.outside_hours else f"during {rule.inside_hours}")
        return ", ".join(parts)

    @staticmethod
    def _describe_open(rule: Rule, timer: _Timer) -> str:
        return f"{timer.event.type} not resolved within {rule.min_duration_s:g} s"

    @staticmethod
    def _describe_absent(rule: Rule, timer: _Timer) -> str:
        what = ", ".join(rule.types) or "events"
        return f"no {what} from the device for {rule.absent_for_s:g} s"
