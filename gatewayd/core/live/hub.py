"""The live-event hub: what the gateway just saw, pushed to whoever watches.

Streams are named `<family>.<kind>.<device>` (`paku.telemetry.pk-1`). A subscriber asks
for patterns: `*` stands for one name, `#` as the last part for any number of them
(`paku.#` is everything of one family, `*.*.pk-1` one device of any family).

The hub never makes ingest wait: `publish` is synchronous and does a bounded amount of
work per *channel*, not per subscriber. Subscribers that watch the same patterns share a
channel: one bounded ring (`queue_size` events) of what matched, and each subscriber a
cursor into it. One that reads too slowly falls behind the ring's tail and loses its
oldest undelivered events; the next thing it reads is a `Gap` saying how many, and the
drop is counted. A channel's events become readable in cuts, at most one per `batch_s`
(longer when more subscribers than `writes_per_s` × `batch_s` watch: each cut is a write
per subscriber), so the subscribers woken meanwhile read the same events, and
`next_encoded` encodes them once (a WebSocket frame, an SSE chunk) for all of them.
The hub's one timer task makes the cuts (the first in the round after an event that
found none due); a cut wakes the channel's readers through one `trio.Event`: a reader
costs a wake-up per cut, not a timer of its own (bench/live_bench.py). Only while the
write budget does not bind (few subscribers) does each reader keep a timer for its next
cut, to run in the round it falls due (latency) rather than a round after the timer's.
While it binds (many subscribers), a reader that can be written to from any task (the
core's WebSocket and SSE endpoints: `next_encoded(direct=...)`) parks instead: the cut
is written to its connection by whoever makes it, the encoded batch shared, and the
reader's task sleeps on; it is woken only for a gap, a write that could not be made, or
the rest of one the socket took only part of (bench/live_bench.py --direct: at 100
subscribers, that wake-up and its round were most of the fan-out's CPU).

Memory is bounded: a channel holds at most `queue_size` events, there are no more
channels than subscribers, at most `max_subscribers` of those (`per_owner` each for one
token or session: the kaiabc spec says 5), and a ring of the last `ring_size` events lets
an SSE client resume after a reconnect (`Last-Event-ID`).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ...protocol.json_encoders import json_encoder
from ...protocol.json_text import Encoded

if TYPE_CHECKING:
    from .access import LiveAccess

__all__ = ["FamilyLive", "Gap", "LiveEvent", "LiveHub", "LiveLimit", "Subscription", "matches", "overlaps",
           "validate_pattern"]


def _encode(obj: Any) -> str:
    """`json.dumps(obj, separators=(",", ":"), allow_nan=False)`, this thread's encoder."""
    return json_encoder(separators=(",", ":"), allow_nan=False)(obj)


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
            cached = _encode({"id": self.id, "stream": self.stream, "ts": self.ts, "data": self.data})
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


T = TypeVar("T")


def overlaps(a: str, b: str) -> bool:
    """True if some stream matches both patterns (`paku.*.pk-1` and `paku.telemetry.#`)."""
    pa, pb = a.split("."), b.split(".")
    for i in range(max(len(pa), len(pb))):
        x = pa[i] if i < len(pa) else None
        y = pb[i] if i < len(pb) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None or (x != y and "*" not in (x, y)):
            return False
    return True


class _Channel:
    """What the subscribers of one set of patterns get: a bounded ring of events, numbered
    from 0 (`head` is the number of the next one), read through each subscriber's cursor."""

    __slots__ = ("asked", "cut", "cut_at", "encoded", "events", "head", "members", "parked", "patterns", "ready",
                 "size")

    def __init__(self, patterns: frozenset[str], size: int) -> None:
        self.patterns = patterns
        self.size = size
        self.events: list[LiveEvent] = []  # grows to `size`, then event n lives at n % size
        self.head = 0
        self.members = 0
        self.cut = 0  # readers see the events before `cut` (batching: LiveHub._cutter)
        self.cut_at = -math.inf
        self.asked = False  # events past the cut wait for the hub's timer task to cut them
        self.ready = trio.Event()  # set (and replaced) by a cut, or when readers must look again
        self.encoded: dict[tuple[object, int], Any] = {}  # (encoder, start) -> its output up to `cut`
        # readers parked for direct writes (Subscription._park): their (encode, direct)
        self.parked: dict[Subscription, tuple[Callable[[list[Any]], Any], Callable[[Any], Any]]] = {}

    @property
    def tail(self) -> int:
        """The number of the oldest event still held."""
        return self.head - len(self.events)

    def append(self, event: LiveEvent) -> None:
        if len(self.events) < self.size:
            self.events.append(event)
        else:
            self.events[self.head % self.size] = event
        self.head += 1

    def make_cut(self, now: float) -> None:
        """Everything published so far readable: written straight to the parked readers that
        can take it (`Subscription.next_encoded(direct=...)`), and the readers waiting look again."""
        self.cut, self.cut_at = self.head, now
        self.encoded.clear()
        if self.parked:
            self._write_parked(now)
        self.rouse(parked=False)

    def _write_parked(self, now: float) -> None:
        """The cut to each parked reader, encoded once, by its `direct` function: from this task,
        without waking one task a reader (a wake-up and its round cost the gateway more than the
        write itself: bench/live_bench.py --direct). A reader with something else to read first
        (a gap, events of its own), or whose write could not be made or finished here, is woken."""
        for sub, (encode, direct) in list(self.parked.items()):
            start = sub._cursor
            if start >= self.cut:
                continue  # nothing new for it
            if sub._pending or sub._dropped or start < self.tail or sub.closed:
                self.wake(sub)
                continue
            try:
                done = direct(self.encoded_from(encode, start))
            except Exception:  # its own task runs the same and raises there, not in the hub's
                done = False
            if done is False:
                self.wake(sub)  # it writes the batch itself, when its connection lets it
                continue
            sub._cursor, sub.written_at = self.cut, now
            if done is not True:
                sub._finish = done  # the rest of a partial write: its task sends it
                self.wake(sub)

    def encoded_from(self, encode: Callable[[list[Any]], T], start: int) -> T:
        """Events start .. cut-1 as `encode` makes them, once for every reader that reads them."""
        key = (encode, start)
        found = self.encoded.get(key)
        if found is None:
            if len(self.encoded) >= 4:  # readers that lag read from older starts: keep a few
                self.encoded.clear()
            found = self.encoded[key] = encode(list(self.between(start, self.cut)))
        return found

    def wake(self, sub: Subscription) -> None:
        """A parked reader looks again."""
        if self.parked.pop(sub, None) is not None and sub._wake is not None:
            sub._wake.set()

    def rouse(self, *, parked: bool = True) -> None:
        """The readers waiting look again (`parked`: those parked for direct writes too)."""
        self.ready.set()
        self.ready = trio.Event()
        if parked and self.parked:
            for sub in list(self.parked):
                self.wake(sub)

    def between(self, start: int, end: int) -> list[LiveEvent]:
        """Events start .. end-1 (tail <= start <= end <= head)."""
        if start >= end:
            return []
        a, b = start % self.size, end % self.size
        return self.events[a:b] if a < b else self.events[a:] + self.events[:b]


class Subscription:
    """One client's view of the hub: its patterns, its cursor into their channel, and what
    it must read first (a gap; events carried over when its patterns changed, or replayed)."""

    def __init__(self, hub: LiveHub, owner: str, patterns: Iterable[str]) -> None:
        self.hub = hub
        self.owner = owner
        self.patterns: frozenset[str] = frozenset()
        self._channel = hub._join(self.patterns)
        self._cursor = self._channel.head
        self._pending: deque[LiveEvent] = deque(maxlen=hub.queue_size)  # read before the channel
        self._dropped = 0  # not yet reported to the client
        self._wake: trio.Event | None = None  # while parked (next_encoded(direct=...))
        self._finish: Callable[[], Awaitable[None]] | None = None  # the rest of a write begun for it
        self.written_at = -math.inf  # (trio clock) the last batch the hub wrote for it, directly
        self.closed = False
        self.add(patterns)

    def add(self, patterns: Iterable[str]) -> None:
        self._move(self.patterns | {validate_pattern(p) for p in patterns})

    def remove(self, patterns: Iterable[str]) -> None:
        self._move(self.patterns - set(patterns))

    def _move(self, patterns: frozenset[str]) -> None:
        """To the channel of `patterns`; what it had not read yet of the old one comes first."""
        if patterns == self.patterns:
            return
        if self.closed:
            self.patterns = patterns
            return
        old = self._channel
        self._catch_up()
        for event in old.between(self._cursor, old.head):
            self._push(event)
        self.hub._leave(old)
        old.rouse()  # a reader waiting on the old channel looks again
        self.patterns = patterns
        self._channel = self.hub._join(patterns)
        self._cursor = self._channel.head
        self.hub._changed()

    def _push(self, event: LiveEvent) -> None:
        """Queue an event of its own (replay, carry-over), the oldest dropped past queue_size."""
        if len(self._pending) == self._pending.maxlen:
            self._drop(1)
        self._pending.append(event)

    def _drop(self, n: int) -> None:
        self._dropped += n
        self.hub.stats["dropped"] += n

    def _catch_up(self) -> None:
        """Past the channel's tail: the events it missed are dropped (counted, then a Gap)."""
        tail = self._channel.tail
        if self._cursor < tail:
            self._drop(tail - self._cursor)
            self._cursor = tail

    async def _wait(self, encode: Callable[[list[Any]], Any] | None = None,
                    direct: Callable[[Any], Any] | None = None) -> bool:
        """Until there is something to read (False: closed, and nothing left).

        Events become readable in cuts, which the hub's timer task makes (`LiveHub._cutter`):
        every reader of the channel woken by a cut reads up to it, so they read the same
        events and `next_encoded` encodes them once."""
        while True:
            ch = self._channel
            start = max(self._cursor, ch.tail)
            if ch.cut <= start < ch.head:  # events not cut yet: if the cut is due (or closed), now
                now = trio.current_time()
                if self.closed or now >= ch.cut_at + self.hub.cut_every_s:
                    ch.make_cut(now)
                else:
                    self.hub._ask_cut(ch)  # (publish asked already, unless this reader moved here since)
            if self._pending or self._dropped or self._cursor < ch.tail or start < ch.cut:
                return True  # a gap, events of its own, or cut events to read
            if self.closed:
                return False
            due = ch.cut_at + self.hub.cut_every_s
            if self.hub.cut_every_s <= self.hub.batch_s and trio.current_time() < due:
                # Few subscribers (the write budget does not bind): each keeps a timer for the next
                # cut and runs in the round it falls due (and makes it), not a round after the
                # timer task's: under load a round is long (p99 at 10 subscribers, live_bench).
                with trio.move_on_at(due):
                    await ch.ready.wait()
                continue
            if direct is not None and encode is not None:
                await self._park(ch, encode, direct)
                continue
            await ch.ready.wait()

    async def _park(self, ch: _Channel, encode: Callable[[list[Any]], Any], direct: Callable[[Any], Any]) -> None:
        """Wait while the hub writes each cut straight to this reader's connection (`direct`),
        until it must look itself (a gap, events of its own, a write the hub could not make or
        finish, closed). The rest of a write the hub began is sent before anything else, even
        when cancelled (it is shielded): a frame or chunk is never left half written."""
        self._wake = wake = trio.Event()
        ch.parked[self] = (encode, direct)
        try:
            await wake.wait()
        finally:
            ch.parked.pop(self, None)
            self._wake = None
            finish, self._finish = self._finish, None
            if finish is not None:
                with trio.CancelScope(shield=True):  # never half a frame on the wire
                    await finish()

    def _take(self) -> list[LiveEvent | Gap]:
        """What there is to read now, in order: a Gap first, then events (advances the cursor)."""
        self._catch_up()
        out: list[LiveEvent | Gap] = []
        if self._dropped:
            out.append(Gap(self._dropped))
            self.hub.stats["gaps"] += 1
            self._dropped = 0
        out.extend(self._pending)
        self._pending.clear()
        ch = self._channel
        end = max(self._cursor, min(ch.cut, ch.head))
        out.extend(ch.between(self._cursor, end))
        self._cursor = end
        return out

    async def next(self) -> list[LiveEvent | Gap]:
        """Wait for what came since the last call: events in order, a Gap first if some were
        dropped. An empty list means the hub closed this subscription."""
        if not await self._wait():
            return []
        return self._take()

    async def next_encoded(self, encode: Callable[[list[LiveEvent | Gap]], T], *,
                           direct: Callable[[T], bool | Callable[[], Awaitable[None]]] | None = None) -> T | None:
        """As `next`, but the batch as `encode` makes it (one WebSocket frame, one SSE chunk):
        subscribers of the same patterns that read the same events get the same object, encoded
        once (pass the same function, not a new lambda each time). None: closed.

        `direct`: while many subscribers share the write budget (`cut_every_s` > `batch_s`),
        the hub itself hands each cut to `direct(encoded)`, from its own task and without
        waiting, and this call goes on waiting: `direct` returns True (written whole; also
        when there was nothing to write), False (nothing written: this call returns the batch,
        to be written by the caller) or a function to await that sends the rest (this call
        awaits it first). `written_at` says when the hub last wrote (for heartbeats)."""
        if not await self._wait(encode, direct):
            return None
        ch = self._channel
        if self._pending or self._dropped or self._cursor < ch.tail:
            return encode(self._take())  # its own batch: a gap, or events of its own first
        found = ch.encoded_from(encode, self._cursor)
        self._cursor = ch.cut
        return found

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._catch_up()  # what it lost before it went is counted too
            self._channel.rouse(parked=False)
            self._channel.wake(self)
            self.hub._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LiveHub:
    """Named streams of events, fanned out to bounded subscribers (see the module docstring)."""

    def __init__(self, *, ring_size: int = 1000, queue_size: int = 256, max_subscribers: int = 200,
                 per_owner: int = 5, max_event_bytes: int = 65536, batch_s: float = 0.0,
                 writes_per_s: float = math.inf, clock: Callable[[], float] = time.time) -> None:
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self.per_owner = per_owner
        self.max_event_bytes = max_event_bytes
        self.batch_s = batch_s
        self.writes_per_s = writes_per_s
        self.clock = clock
        self._ring: deque[LiveEvent] = deque(maxlen=ring_size)
        self._subs: list[Subscription] = []
        self._channels: dict[frozenset[str], _Channel] = {}
        self._routes: dict[str, tuple[list[_Channel], int]] = {}  # stream -> (channels, subscribers) (cached)
        self._watched: dict[str, bool] = {}  # pattern -> has_subscribers (cached)
        self._next_id = 1
        self._asked: list[_Channel] = []  # channels with events to cut, for the timer task
        self._cutter_wake = trio.Event()  # set when a channel is asked (it may be due sooner), or at close
        self._cutter_run: object = None  # the trio run the timer task belongs to
        self.closed = False
        self.stats = {"published": 0, "delivered": 0, "dropped": 0, "gaps": 0, "refused": 0}

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @property
    def cut_every_s(self) -> float:
        """How often a channel's events are cut into a batch: `batch_s`, or longer when there are
        so many subscribers that each writing a batch that often would pass `writes_per_s` in
        all (a write costs the gateway about as much whatever its size: bench/live_bench.py)."""
        return max(self.batch_s, len(self._subs) / self.writes_per_s)

    def publish(self, stream: str, data: Any) -> LiveEvent:
        """Hand an event to every subscriber whose patterns match; never waits.

        `data` must be JSON (no NaN); ValueError if it is not, or larger than
        `max_event_bytes` encoded. It may be an `Encoded` (gatewayd.protocol.json_text):
        its value is the event's data, and its text (when ASCII without DEL, as this JSON is) is
        written into the event's as it is, not encoded again.
        """
        if type(data) is Encoded:
            event = LiveEvent(self._next_id, stream, self.clock(), data.value)
            # ASCII but for U+007F, which the outbox's text keeps as it is and the hub's own
            # encoding (ensure_ascii) writes `\u007f`: the same bytes as an event encoded here.
            if (data.text.isascii() and "\x7f" not in data.text and type(event.ts) is float
                    and math.isfinite(event.ts)):
                # The event's JSON as _encode writes the whole, with the data's text as made.
                object.__setattr__(event, "_json", f'{{"id":{event.id},"stream":{encode_basestring_ascii(stream)},'
                                                   f'"ts":{float.__repr__(event.ts)},"data":{data.text}}}')
        else:
            event = LiveEvent(self._next_id, stream, self.clock(), data)
        if len(event.json()) > self.max_event_bytes:  # encodes (and checks) it once, here
            raise ValueError(f"live event on {stream!r}: larger than {self.max_event_bytes} bytes")
        self._next_id += 1
        self._ring.append(event)
        self.stats["published"] += 1
        route = self._routes.get(stream)
        if route is None:
            channels = [c for c in self._channels.values() if any(matches(p, stream) for p in c.patterns)]
            if len(self._routes) > 10_000:
                self._routes.clear()
            route = self._routes[stream] = (channels, sum(c.members for c in channels))
        for channel in route[0]:
            channel.append(event)
            if not channel.asked:
                self._ask_cut(channel)
        self.stats["delivered"] += route[1]
        return event

    def _ask_cut(self, channel: _Channel) -> None:
        """The timer task cuts `channel` when due: in the next scheduler round if its last cut
        is older than `cut_every_s` (the events published in this round go together), else
        when it is. In the first case its readers are woken too: the first of them to run
        makes the cut (`Subscription._wait`), one round sooner than through the timer task."""
        if channel.asked:
            return
        channel.asked = True
        self._asked.append(channel)
        self._cutter_wake.set()
        if trio.current_time() >= channel.cut_at + self.cut_every_s:
            channel.rouse(parked=False)  # after a quiet spell: the event reaches the readers in the next round
        root = trio.lowlevel.current_root_task()
        if self._cutter_run is not root:  # the first in this trio run: its timer task
            self._cutter_run = root
            trio.lowlevel.spawn_system_task(self._cutter, root, name="gatewayd live hub: cuts")

    async def _cutter(self, root: object) -> None:
        """Cut every asked channel when due, and wake its readers (one Event each): one timer
        for the hub, not one a reader (a timer's expiry is a Cancelled raised and caught; with
        100 subscribers, those and the readers' second wake-up per cut were a quarter of the
        fan-out's CPU: bench/live_bench.py --direct)."""
        while self._cutter_run is root and not self.closed:
            self._cutter_wake = trio.Event()
            now, every = trio.current_time(), self.cut_every_s
            later: list[_Channel] = []
            for channel in self._asked:
                if not channel.members or channel.cut == channel.head:
                    channel.asked = False  # gone, or cut meanwhile by a closing reader
                elif now >= channel.cut_at + every:
                    channel.asked = False
                    channel.make_cut(now)
                else:
                    later.append(channel)
            self._asked = later
            with trio.move_on_at(min((c.cut_at for c in later), default=math.inf) + every):
                await self._cutter_wake.wait()  # or a channel asked meanwhile: maybe due sooner

    def has_subscribers(self, pattern: str) -> bool:
        """True if a subscriber watches some stream `pattern` names (`kaiabc.oscillator_state.#`):
        a publisher may skip building events nobody watches. Cheap: cached until the next
        subscribe, unsubscribe or close."""
        found = self._watched.get(pattern)
        if found is None:
            validate_pattern(pattern)
            if len(self._watched) > 1000:
                self._watched.clear()
            found = self._watched[pattern] = any(
                overlaps(p, pattern) for c in self._channels.values() if c.members for p in c.patterns)
        return found

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
        patterns = list(patterns)
        for pattern in patterns:
            validate_pattern(pattern)
        sub = Subscription(self, owner, patterns)
        self._subs.append(sub)
        self._changed()
        if last_id is not None:
            self._replay(sub, last_id)
        return sub

    def _replay(self, sub: Subscription, last_id: int) -> None:
        oldest = self._ring[0].id if self._ring else self._next_id
        if last_id + 1 < oldest:
            sub._drop(oldest - last_id - 1)  # gone from the ring: the client sees a gap
        for event in self._ring:
            if event.id > last_id and any(matches(p, event.stream) for p in sub.patterns):
                sub._push(event)

    def close(self) -> None:
        """Shutdown: every subscriber's `next()` returns what it has, then []."""
        self.closed = True
        self._cutter_wake.set()
        for sub in list(self._subs):
            sub.close()

    def _join(self, patterns: frozenset[str]) -> _Channel:
        channel = self._channels.get(patterns)
        if channel is None:
            channel = self._channels[patterns] = _Channel(patterns, self.queue_size)
        channel.members += 1
        return channel

    def _leave(self, channel: _Channel) -> None:
        channel.members -= 1
        if not channel.members:
            del self._channels[channel.patterns]

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            self._leave(sub._channel)
            self._changed()

    def _changed(self) -> None:
        self._routes.clear()
        self._watched.clear()


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

    def has_subscribers(self, kind: str | None = None, device_id: str | None = None) -> bool:
        """Does anybody watch `<family>.<kind>.<device_id>` (None: any)? Cheap (cached until
        the next subscribe or close): a plugin may skip building events nobody watches."""
        parts = [self.family] + [x.replace(".", "_") if x is not None else "*" for x in (kind, device_id)]
        return self._hub.has_subscribers(".".join(parts))

    def subscribe(self, patterns: Iterable[str], *, owner: str, last_id: int | None = None) -> Subscription:
        """Watch this family's streams from a plugin route of its own (in the family's own
        shape: thingsnxt's SSE, kaiabc's WebSocket). Patterns are relative to the family:
        `telemetry.*` watches `<family>.telemetry.*`. Raises LiveLimit over the limits."""
        return self._hub.subscribe([f"{self.family}.{validate_pattern(p)}" for p in patterns], owner=owner,
                                   last_id=last_id)
