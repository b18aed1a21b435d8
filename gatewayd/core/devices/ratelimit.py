"""Token-bucket rate limits keyed by (device or client address, route class).

A plugin defines its route classes once (`ctx.ratelimit.define("ingest", 100, 60)`:
100 requests per 60 s, refilled continuously), then checks each request::

    decision = ctx.ratelimit.check(device.id, "ingest")
    if not decision.allowed:
        return family_error(429, ...), 429, ctx.ratelimit.headers(decision)
    ... answer, with ctx.ratelimit.headers(decision) added

Buckets live in memory only (a restart forgets them, which is harmless); idle buckets
are evicted (least recently used first) so memory stays bounded however many keys
appear. The clock is injectable; by default `trio.current_time`, so tests run with
`autojump_clock`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import trio

__all__ = ["RateLimiter", "RateClass", "Decision", "FamilyRateLimits"]


@dataclass(frozen=True)
class RateClass:
    """`limit` requests per `per_s` seconds; the bucket holds at most `burst` (default `limit`)."""

    limit: int
    per_s: float
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.limit < 1 or self.per_s <= 0:
            raise ValueError(f"a rate class needs limit >= 1 and per_s > 0, got {self.limit}/{self.per_s}")

    @property
    def capacity(self) -> int:
        return self.burst or self.limit

    @property
    def rate(self) -> float:
        return self.limit / self.per_s


class Decision(NamedTuple):
    """The outcome of one `check`: allowed or not, and what the headers should say."""

    # A NamedTuple, not a frozen dataclass: as immutable, and made in a third of the time
    # (a check per device request).

    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    """Seconds until the bucket is full again."""
    retry_after_s: float
    """Seconds until one request is allowed (0 when allowed)."""


class RateLimiter:
    """Token buckets for all plugins; `max_buckets` bounds memory."""

    def __init__(self, *, clock: Callable[[], float] = trio.current_time, wall_clock: Callable[[], float] = time.time,
                 max_buckets: int = 50_000):
        self.clock = clock
        self.wall_clock = wall_clock
        self.max_buckets = max_buckets
        self.classes: dict[str, RateClass] = {}
        self._class_of: dict[str, tuple[RateClass, int, float]] = {}  # cls -> (it, its capacity, its rate)
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()  # (tokens, at)

    def define(self, cls: str, limit: int, per_s: float, *, burst: int | None = None) -> None:
        """Declare (or redefine) a route class."""
        rc = self.classes[cls] = RateClass(limit, per_s, burst)
        self._class_of[cls] = (rc, rc.capacity, rc.rate)

    def check(self, key: str, cls: str, cost: float = 1.0) -> Decision:
        """Take `cost` tokens from the bucket of (`key`, `cls`) if it has them."""
        known = self._class_of.get(cls)
        if known is None:
            raise KeyError(f"rate class {cls!r} is not defined (known: {', '.join(sorted(self.classes)) or 'none'})")
        rc, capacity, rate = known
        now = self.clock()
        bucket_key = (cls, key)
        buckets = self._buckets
        held = buckets.get(bucket_key)
        if held is None:
            tokens = float(capacity)
        else:
            tokens = min(capacity, held[0] + (now - held[1]) * rate)
            buckets.move_to_end(bucket_key)  # most recently used last: the eviction's order
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        buckets[bucket_key] = (tokens, now)
        self._evict(now)
        retry = 0.0 if allowed else (cost - tokens) / rate
        return Decision(allowed, rc.limit, max(0, int(tokens)), (capacity - tokens) / rate, retry)

    def _evict(self, now: float) -> None:
        # Oldest-touched first: a bucket untouched long enough to refill is no loss,
        # and past max_buckets even a partly drained one goes (memory wins over precision).
        buckets = self._buckets
        while len(buckets) > self.max_buckets:
            buckets.popitem(last=False)
        while buckets:
            (cls, _), (tokens, at) = next(iter(buckets.items()))
            known = self._class_of.get(cls)
            if known is not None and tokens + (now - at) * known[2] < known[1]:
                break
            buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)

    def headers(self, decision: Decision, *, reset: str = "epoch") -> dict[str, str]:
        """`X-RateLimit-Limit/Remaining/Reset` (+ `Retry-After` when refused).

        `reset="epoch"` gives the Unix time the bucket is full again (kaiabc's
        convention); `reset="delta"` gives seconds from now.
        """
        reset_value = math.ceil(decision.reset_s)
        if reset == "epoch":
            reset_value = math.ceil(self.wall_clock() + decision.reset_s)
        out = {
            "X-RateLimit-Limit": str(decision.limit),
            "X-RateLimit-Remaining": str(decision.remaining),
            "X-RateLimit-Reset": str(reset_value),
        }
        if not decision.allowed:
            out["Retry-After"] = str(max(1, math.ceil(decision.retry_after_s)))
        return out


class FamilyRateLimits:
    """`ctx.ratelimit`: the limiter with class names scoped to one plugin."""

    def __init__(self, limiter: RateLimiter, family: str):
        self._limiter = limiter
        self.family = family
        self._names: dict[str, str] = {}  # cls -> "<family>:<cls>", not formatted per check

    def define(self, cls: str, limit: int, per_s: float, *, burst: int | None = None) -> None:
        """`limit` requests per `per_s` seconds for route class `cls` (per key)."""
        self._limiter.define(f"{self.family}:{cls}", limit, per_s, burst=burst)

    def check(self, key: str, cls: str, cost: float = 1.0) -> Decision:
        """Key by device id when authenticated, else by client address."""
        name = self._names.get(cls)
        if name is None:
            name = self._names[cls] = f"{self.family}:{cls}"
        return self._limiter.check(key, name, cost)

    def headers(self, decision: Decision, *, reset: str = "epoch") -> dict[str, str]:
        return self._limiter.headers(decision, reset=reset)
