"""Backpressure: when a node is told to slow down, and by how much. Pure.

The gateway is under pressure when its outbox fills (the cloud is away and data piles
up), when the database's write queue is deep, or when many batches are being stored at
once. README.md ("Backpressure") states the policy; `judge` is it:

| condition | level | answer |
|---|---|---|
| batches in flight >= `max_inflight`, or the writer's queue >= `max_writer_queue` | reject | 429, `next_hint: "backoff_ms: <backoff_ms>"` |
| inflated, the batch would take those in flight past `max_inflight_bytes` (`over_budget`) | reject | 429, the same |
| outbox fill >= `reject_fill` | reject | 429, the hint growing from 5 x `backoff_ms` (doubling every tenth of the rest) up to `max_backoff_ms` |
| outbox fill >= `elevated_fill` | elevated | 200, the hint growing linearly from `backoff_ms` to 5 x `backoff_ms` |
| otherwise | normal | 200, `next_hint: null` |

Pressure (elevated or worse) sustained for `degrade_after_s` lowers the sampling rates
the node's `/config` answer gives it (`Degrade`), until the pressure is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import Backpressure

Level = Literal["normal", "elevated", "reject"]


@dataclass(frozen=True)
class Verdict:
    level: Level
    backoff_ms: int | None
    reason: str

    @property
    def hint(self) -> str | None:
        """The spec's `next_hint`: `"backoff_ms: 5000"`, or None."""
        return None if self.backoff_ms is None else f"backoff_ms: {self.backoff_ms}"


def judge(outbox_fill: float, writer_queue: int, inflight: int, policy: Backpressure) -> Verdict:
    """The level and hint for a batch arriving now (`inflight`: batches already being stored)."""
    if inflight >= policy.max_inflight:
        return Verdict("reject", policy.backoff_ms, f"ingest queue deep: {inflight} batches being stored")
    if writer_queue >= policy.max_writer_queue:
        return Verdict("reject", policy.backoff_ms, f"database busy: {writer_queue} writes queued")
    if outbox_fill >= policy.reject_fill:
        beyond = (outbox_fill - policy.reject_fill) / max(1e-9, 1.0 - policy.reject_fill)
        backoff = min(policy.max_backoff_ms, int(5 * policy.backoff_ms * 2 ** (10 * min(1.0, beyond))))
        return Verdict("reject", backoff, f"outbox {outbox_fill:.0%} full: the upstream link is behind")
    if outbox_fill >= policy.elevated_fill:
        share = (outbox_fill - policy.elevated_fill) / (policy.reject_fill - policy.elevated_fill)
        backoff = min(policy.max_backoff_ms, int(policy.backoff_ms * (1 + 4 * share)))
        return Verdict("elevated", backoff, f"outbox {outbox_fill:.0%} full")
    return Verdict("normal", None, "")


def over_budget(inflight_bytes: int, size: int, policy: Backpressure) -> Verdict | None:
    """A 429 verdict when an inflated batch of `size` bytes would take the batches being
    stored past `max_inflight_bytes` (a batch alone always fits: it is at most
    `max_decompressed_bytes`), else None."""
    if inflight_bytes and inflight_bytes + size > policy.max_inflight_bytes:
        return Verdict("reject", policy.backoff_ms, f"memory budget: {inflight_bytes} inflated bytes being stored")
    return None


class Degrade:
    """Whether sustained pressure lowers the sampling rates: `observe` each verdict, read `factor`."""

    def __init__(self, policy: Backpressure) -> None:
        self.policy = policy
        self.since: float | None = None  # when the current stretch of pressure began
        self.reason = ""

    def observe(self, level: Level, reason: str, now: float) -> None:
        if level == "normal":
            self.since = None
        elif self.since is None:
            self.since = now
        if reason:
            self.reason = reason

    def factor(self, now: float) -> float:
        """`degrade_factor` once pressure has lasted `degrade_after_s`, else 1.0."""
        if self.since is not None and now - self.since >= self.policy.degrade_after_s:
            return self.policy.degrade_factor
        return 1.0
