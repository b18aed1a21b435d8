"""The sender's side of the upstream protocol: what to do with an answer, and when
to try again.

:func:`parse_response` classifies the receiver's answer into an :class:`Outcome`;
:class:`Backoff` (exponential, jittered) and :class:`CircuitBreaker` decide when to
resend. All pure: randomness and time are injected, nothing sleeps. The sync worker
sleeps itself (under trio, with ``trio.current_time`` as the breaker's clock, so
``autojump_clock`` tests run instantly).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Literal

__all__ = ["Backoff", "CircuitBreaker", "Outcome", "parse_response"]

# Longest Retry-After / next_hint we obey: a bogus far-future date must not park the
# outbox for days.
MAX_RETRY_AFTER_S = 3600.0
_NEXT_HINT = re.compile(r"\s*backoff_ms\s*:\s*([0-9]{1,9})\s*")


@dataclass(frozen=True)
class Outcome:
    """What the sender does with one answer.

    ``kind``: ``delivered`` (2xx) and ``already_delivered`` (409) remove the batch
    from the outbox; ``retry_after`` waits ``delay_s`` then resends; ``retry``
    follows the :class:`Backoff` schedule and counts as a
    failure for the circuit breaker; ``dead_letter`` moves the batch aside with
    ``reason``. On 2xx a ``next_hint`` in the body sets ``delay_s``: wait that long
    before the *next* batch. Counts are None when the body did not carry them.
    """

    kind: Literal["delivered", "already_delivered", "retry_after", "retry", "dead_letter"]
    status: int
    accepted: int | None = None
    duplicates: int | None = None
    rejected: int | None = None
    rejected_ids: list[int | str | None] = field(default_factory=list)
    delay_s: float | None = None
    reason: str | None = None


def parse_response(
    status: int, headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> Outcome:
    """Classify the receiver's answer to one batch (see :class:`Outcome`).

    ``now`` (epoch seconds) resolves a ``Retry-After`` HTTP-date; it defaults to
    the wall clock. A transport failure (timeout, reset) never reaches this function:
    the caller treats it as ``retry``.
    """
    doc = _json_object(body)
    counts = {name: _count(doc.get(name)) for name in ("accepted", "duplicates", "rejected")}
    ids = doc.get("rejected_ids")
    ids = ids if isinstance(ids, list) else []
    rejected_ids = [i for i in ids if i is None or isinstance(i, (int, str))]
    hint_s = _next_hint_s(doc.get("next_hint"))

    if 200 <= status < 300:
        return Outcome("delivered", status, **counts, rejected_ids=rejected_ids, delay_s=hint_s)
    if status == 409:
        return Outcome("already_delivered", status, **counts, rejected_ids=rejected_ids)
    if status in (429, 503):
        h = {name.lower(): value for name, value in headers.items()}
        header_s = _retry_after_s(h.get("retry-after"), now)
        waits = [s for s in (header_s, hint_s) if s is not None]
        if waits:
            return Outcome("retry_after", status, delay_s=min(max(waits), MAX_RETRY_AFTER_S))
        return Outcome("retry", status, reason=f"HTTP {status} without Retry-After")
    if status >= 500 or status == 408 or 300 <= status < 400:
        # A redirect is a misconfigured endpoint, not a bad batch: keep the data.
        return Outcome("retry", status, reason=_error_reason(status, doc, body))
    return Outcome("dead_letter", status, reason=_error_reason(status, doc, body))


class Backoff:
    """Exponential backoff with jitter: 1 s, 2 s, 4 s ... capped at 300 s, each ±25 %.

    The jittered delay never exceeds ``cap``, so at the cap delays spread over
    [0.75 * cap, cap]: a fleet that lost its cloud together does not come back
    together. ``rng`` is any object with ``uniform(a, b)`` (``random.Random``).
    """

    def __init__(
        self,
        *,
        base: float = 1.0,
        cap: float = 300.0,
        factor: float = 2.0,
        jitter: float = 0.25,
        rng: random.Random | None = None,
    ) -> None:
        if not (0 < base <= cap and factor >= 1 and 0 <= jitter < 1):
            raise ValueError("need 0 < base <= cap, factor >= 1, 0 <= jitter < 1")
        self.base = base
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self.attempt = 0

    def nominal(self, attempt: int) -> float:
        """The un-jittered delay before retry number ``attempt`` (0-based)."""
        # Exponent clamped so a long outage cannot overflow the float.
        return min(self.cap, self.base * self.factor ** min(attempt, 64))

    def next_delay(self) -> float:
        """The delay before the next retry; advances the attempt counter."""
        nominal = self.nominal(self.attempt)
        self.attempt += 1
        spread = self._rng.uniform(1 - self.jitter, 1 + self.jitter)
        return min(self.cap, nominal * spread)

    def reset(self) -> None:
        """Call after a success: the next failure starts again at ``base``."""
        self.attempt = 0


State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Fail fast after ``threshold`` consecutive failures; probe after ``cooldown_s``.

    closed --threshold failures--> open --cooldown elapsed--> half_open
    half_open --probe succeeds--> closed; half_open --probe fails--> open (again).

    In ``half_open`` exactly one request (the probe) is allowed until its result is
    recorded. ``clock`` returns seconds on any monotonic scale (``trio.current_time``).
    Count as failures what says the far end is unwell: 5xx, timeouts, resets. A 4xx
    or a 429/503 with Retry-After means the far end answered: record a success.
    """

    def __init__(
        self, *, threshold: int = 5, cooldown_s: float = 60.0, clock: Callable[[], float]
    ) -> None:
        if threshold < 1 or cooldown_s < 0:
            raise ValueError("need threshold >= 1 and cooldown_s >= 0")
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> State:
        """The current state; an elapsed cool-down reads as ``half_open``."""
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            self._state = "half_open"
            self._probing = False
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """May a request go out now? In half_open, True once (for the probe)."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def retry_in(self) -> float:
        """Seconds until :meth:`allow` can next return True (0 if it can now)."""
        state = self.state
        if state == "open":
            return max(0.0, self._opened_at + self.cooldown_s - self._clock())
        if state == "half_open" and self._probing:
            return self.cooldown_s  # the probe's result will decide; check back then
        return 0.0

    def record_success(self) -> None:
        self._state = "closed"
        self._failures = 0
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self.state == "half_open" or self._failures >= self.threshold:
            self._state = "open"
            self._opened_at = self._clock()
            self._probing = False


# -- internals -------------------------------------------------------------------


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body) if body else {}
    except (ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _next_hint_s(hint: Any) -> float | None:
    if not isinstance(hint, str):
        return None
    match = _NEXT_HINT.fullmatch(hint)
    return int(match.group(1)) / 1000 if match else None


def _retry_after_s(value: str | None, now: float | None) -> float | None:
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses as naive; HTTP-dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    reference = datetime.now(timezone.utc).timestamp() if now is None else now
    return max(0.0, when.timestamp() - reference)


def _error_reason(status: int, doc: dict[str, Any], body: bytes) -> str:
    error = doc.get("error")
    if isinstance(error, dict) and error.get("code"):
        return f"HTTP {status} {error.get('code')}: {error.get('message', '')}".rstrip(": ")
    text = body[:200].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f": {text}" if text else "")


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
