"""The live-event hub: what the gateway just saw, pushed to whoever watches.

Streams are named `<family>.<kind>.<device>` (`paku.telemetry.pk-1`). A subscriber asks
for patterns: `*` stands for one name, `#` as the last part for any number of them
(`paku.#` is everything of one family, `*.*.pk-1` one device of any family).

The hub never makes ingest wait: `publish` is synchronous and does a bounded amount of
work per subscriber (append to its queue). A subscriber that reads too slowly loses its
oldest undelivered events; the next thing it reads is a `Gap` saying how many, and the
drop is counted. Memory is bounded: each subscriber holds at most `queue_size` events,
the hub at most `max_subscribers` subscribers (`per_owner` each for one token or
session: the kaiabc spec says 5), and a ring of the last `ring_size` events lets an SSE
client resume after a reconnect (`Last-Event-ID`).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .access import LiveAccess

__all__ = ["FamilyLive", "Gap", "LiveEvent", "LiveHub", "LiveLimit", "Subscription", "matches", "validate_pattern"]


class LiveLimit(Exception):
    """Too many subscribers (for this owner, or in all)."""


@dataclass(frozen=True, eq=False)
class LiveEvent:
    """One event: `id` increases by one per event published (resumption key)."""

    id: int
    stream: str
    ts: float
    data: Any

    def json(self) -> str:
        """The event as one line of JSON, encoded once however many clients get it."""
        cached = self.__dict__.get("_json")
        if cached is None:
            cached = json.dumps({"id": self.id, "stream": self.stream, "ts": self.ts, "data": self.data},
                                separators=(",", ":"), allow_nan=False)
            object.__setattr__(self, "_json", cached)
        return cached


@dataclass(frozen=True)
class Gap:
    """`dropped` events this subscriber did not get (it read too slowly, or resumed too late)."""

    dropped: int

    def json(self) -> str:
        return json.dumps({"gap": self.dropped})


def validate_pattern(pattern: str) -> str:
    """A stream pattern: dot-separated names, `*` for one, `#` as the last for the rest."""
    parts = pattern.split(".")
    if not pattern or len(pattern) > 256 or any(not p for p in parts):
        raise ValueError(f"stream pattern {pattern[:64]!r}: expected names separated by dots, e.g. paku.telemetry.*")
    if "#" in parts[:-1] or any(("*" in p or "#" in p) and len(p) > 1 for p in parts):
        raise ValueError(f"stream pattern {pattern[:64]!r}: '*' stands for one whole name, '#' only for the last ones")
    return pattern


def matches(pattern: str, stream: str) -> bool:
    """True if `stream` is one of those `pattern` names."""
    want, have = pattern.split("."), stream.split(".")
    for i, part in enumerate(want):
        if part == "#":
            return True
        if i >= len(have) or (part != "*" and part != have[i]):
            return False
    return len(want) == len(have)


class Subscription:
    """One client's view of the hub: its patterns and a bounded queue of what matched."""

    def __init__(self, hub: LiveHub, owner: str, patterns: Iterable[str], queue_size: int) -> None:
        self.hub = hub
        self.owner = owner
        self.patterns: set[str] = set()
        self._queue: deque[LiveEvent] = deque(maxlen=queue_size)
        self._dropped = 0  # not yet reported to the client
        self._wake = trio.Event()
        self.closed = False
        self.add(patterns)

    def add(self, patterns: Iterable[str]) -> None:
        self.patterns |= {validate_pattern(p) for p in patterns}
        self.hub._changed()

    def remove(self, patterns: Iterable[str]) -> None:
        self.patterns -= set(patterns)
        self.hub._changed()

    def _push(self, event: LiveEvent) -> None:
        if len(self._queue) == self._queue.maxlen:
            self._dropped += 1  # the deque drops its oldest on append
            self.hub.stats["dropped"] += 1
        self._queue.append(event)
        self._wake.set()

    async def next(self) -> list[LiveEvent | Gap]:
        """Wait for what came since the last call: events in order, a Gap first if some were
        dropped. An empty list means the hub closed this subscription."""
        while not self._queue and not self._dropped and not self.closed:
            self._wake = trio.Event()
            await self._wake.wait()
        out: list[LiveEvent | Gap] = []
        if self._dropped:
            out.append(Gap(self._dropped))
            self.hub.stats["gaps"] += 1
            self._dropped = 0
        out.extend(self._queue)
        self._queue.clear()
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._wake.set()
            self.hub._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LiveHub:
    """Named streams of events, fanned out to bounded subscribers (see the module docstring)."""

    def __init__(self, *, ring_size: int = 1000, queue_size: int = 256, max_subscribers: int = 200,
                 per_owner: int = 5, max_event_bytes: int = 65536, clock: Callable[[], float] = time.time) -> None:
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self.per_owner = per_owner
        self.max_event_bytes = max_event_bytes
        self.clock = clock
        self._ring: deque[LiveEvent] = deque(maxlen=ring_size)
        self._subs: list[Subscription] = []
        self._routes: dict[str, list[Subscription]] = {}  # stream -> who gets it (cached)
        self._next_id = 1
        self.closed = False
        self.stats = {"published": 0, "delivered": 0, "dropped": 0, "gaps": 0, "refused": 0}

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def publish(self, stream: str, data: Any) -> LiveEvent:
        """Hand an event to every subscriber whose patterns match; never waits.

        `data` must be JSON (no NaN); ValueError if it is not, or larger than
        `max_event_bytes` encoded.
        """
        event = LiveEvent(self._next_id, stream, self.clock(), data)
        if len(event.json()) > self.max_event_bytes:  # encodes (and checks) it once, here
            raise ValueError(f"live event on {stream!r}: larger than {self.max_event_bytes} bytes")
        self._next_id += 1
        self._ring.append(event)
        self.stats["published"] += 1
        targets = self._routes.get(stream)
        if targets is None:
            targets = [s for s in self._subs if any(matches(p, stream) for p in s.patterns)]
            if len(self._routes) > 10_000:
                self._routes.clear()
            self._routes[stream] = targets
        for sub in targets:
            sub._push(event)
        self.stats["delivered"] += len(targets)
        return event

    def subscribe(self, patterns: Iterable[str], *, owner: str, last_id: int | None = None) -> Subscription:
        """A new subscriber. `last_id`: the last event the client saw (SSE's Last-Event-ID):
        what it missed is queued first, from the ring, or a Gap if the ring has moved on.
        Raises LiveLimit over `per_owner` for `owner` or `max_subscribers` in all."""
        if self.closed:
            raise LiveLimit("the gateway is shutting down")
        if len(self._subs) >= self.max_subscribers:
            self.stats["refused"] += 1
            raise LiveLimit(f"{self.max_subscribers} live subscribers already")
        if sum(1 for s in self._subs if s.owner == owner) >= self.per_owner:
            self.stats["refused"] += 1
            raise LiveLimit(f"{self.per_owner} live connections for this token already")
        sub = Subscription(self, owner, patterns, self.queue_size)
        self._subs.append(sub)
        self._changed()
        if last_id is not None:
            self._replay(sub, last_id)
        return sub

    def _replay(self, sub: Subscription, last_id: int) -> None:
        oldest = self._ring[0].id if self._ring else self._next_id
        if last_id + 1 < oldest:
            sub._dropped += oldest - last_id - 1  # gone from the ring: the client sees a gap
        for event in self._ring:
            if event.id > last_id and any(matches(p, event.stream) for p in sub.patterns):
                sub._push(event)

    def close(self) -> None:
        """Shutdown: every subscriber's `next()` returns what it has, then []."""
        self.closed = True
        for sub in list(self._subs):
            sub.close()

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            self._changed()

    def _changed(self) -> None:
        self._routes.clear()


class FamilyLive:
    """`ctx.live`: a plugin's streams, `<family>.<kind>.<device>`."""

    def __init__(self, hub: LiveHub, family: str, access: LiveAccess) -> None:
        self._hub = hub
        self._access = access
        self.family = family

    async def authorize(self, headers: Mapping[str, str], args: Mapping[str, str]) -> str:
        """For a plugin's own stream route: the owner of the connection (pass it to
        `subscribe`) if the request may watch this family's streams: the admin token
        (`Authorization: Bearer`), a token scoped `live:<family>` or `live:*` (header or
        `?token=`), or a dashboard session. Raises LiveDenied (`status` 401 or 403,
        `reason`): answer it in the family's shape."""
        return await self._access.owner_for(self.family, headers, args)

    def publish(self, kind: str, device_id: str, data: Any) -> None:
        """Push `data` (JSON) to whoever watches `<family>.<kind>.<device_id>`; never waits.

        Call it after the data is committed: a live view must not show what the gateway
        then failed to store. Dots in `kind` or `device_id` are replaced by `_`.
        """
        self._hub.publish(f"{self.family}.{kind.replace('.', '_')}.{device_id.replace('.', '_')}", data)

    def subscribe(self, patterns: Iterable[str], *, owner: str, last_id: int | None = None) -> Subscription:
        """Watch this family's streams from a plugin route of its own (in the family's own
        shape: thingsnxt's SSE, kaiabc's WebSocket). Patterns are relative to the family:
        `telemetry.*` watches `<family>.telemetry.*`. Raises LiveLimit over the limits."""
        return self._hub.subscribe([f"{self.family}.{validate_pattern(p)}" for p in patterns], owner=owner,
                                   last_id=last_id)
