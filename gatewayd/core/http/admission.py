"""Admission: at most `limit` request handlers run at once; the others wait, first come
first served (`[http] max_handlers`, `[http] handler_hold_s`).

Why: trio runs every ready task in turn. When a site's 1,000 lights send at once (after a
power cut, or the gateway's own restart) 1,000 handlers share the CPU and all of them are
answered near the end of the burst: processor sharing, the slowest light answered after
2.3-4.0 s in bench/streetlight_bench.py's fleet (past the specification's 5 s for a few
in one sitting). Run 32 at a time in the order they came, the first are answered at once
and the last no later than before (0.7-1.4 s in the same bench).

A handler keeps its place for at most `hold_s`: one that waits longer than that (for a
plugin still starting, a device, an event) is no longer counted and goes on running, so
a few slow handlers cannot hold up the rest. Places are taken back lazily, by the first
request waiting, which sleeps until the oldest place's time is up: no task of its own.

Only a request whose body has arrived whole is admitted here (lean.LeanHTTPConnection):
the handler of a body still coming waits on its client, not on the CPU. What a handler
answers is sent after it has left its place: a live stream (SSE) holds none while it lasts.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

import trio


class Place:
    """A running handler's place; `expired` once its `hold_s` was up and it was given on."""

    __slots__ = ("deadline", "expired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = False


class _Turn:
    """A waiting request: the place it was given, and what wakes it."""

    __slots__ = ("place", "woken")

    def __init__(self) -> None:
        self.place: Place | None = None
        self.woken = trio.Event()


class Admission:
    """At most `limit` handlers at once, each counted for at most `hold_s` seconds; the
    rest admitted first come first served. One for all of the gateway's listeners: they
    share the one CPU."""

    def __init__(self, limit: int, hold_s: float) -> None:
        if limit < 1 or not hold_s > 0:
            raise ValueError(f"need limit >= 1 and hold_s > 0, got {limit}, {hold_s}")
        self.limit = limit
        self.hold_s = hold_s
        # oldest first (their deadlines in order); an OrderedDict, not a deque: a handler
        # leaves in any order, and a deque's remove() searches (max_handlers may be large)
        self._running: OrderedDict[Place, None] = OrderedDict()
        self._waiting: deque[_Turn] = deque()  # first come first
        #: handlers let in at once, or after waiting their turn; requests whose client left
        #: while they waited, or as they were let in (gave_up: their handler never ran);
        #: places given on because their handler ran longer than hold_s (expired)
        self.stats = {"at_once": 0, "waited": 0, "gave_up": 0, "expired": 0}

    @property
    def running(self) -> int:
        """Handlers holding a place."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests waiting for a place."""
        return len(self._waiting)

    async def enter(self) -> Place:
        """A place for this request's handler, once the requests before it have theirs;
        give it back with `leave`. Cancelled (the client left), it waits no longer."""
        running = self._running
        if not self._waiting:
            if len(running) >= self.limit:
                self._expire(trio.current_time())
            if len(running) < self.limit:
                place = Place(trio.current_time() + self.hold_s)
                running[place] = None
                self.stats["at_once"] += 1
                return place
        return await self._wait()

    def leave(self, place: Place) -> None:
        """The handler is done: its place goes to the first request waiting."""
        if place.expired:
            return  # given on already
        place.expired = True
        del self._running[place]
        self._hand_on()

    async def _wait(self) -> Place:
        turn = _Turn()
        self._waiting.append(turn)
        try:
            while turn.place is None:
                deadline = math.inf
                if self._waiting[0] is turn:
                    # The first in line keeps the clock: it wakes when the oldest place's
                    # time is up (a handler waiting on something else) and takes it.
                    self._expire(trio.current_time())
                    if turn.place is not None:
                        break
                    if self._running:
                        deadline = next(iter(self._running)).deadline
                turn.woken = trio.Event()
                with trio.move_on_at(deadline):
                    await turn.woken.wait()
        except BaseException:
            self.stats["gave_up"] += 1  # its handler never ran, given a place or not
            if turn.place is not None:
                self.leave(turn.place)  # given a place, then cancelled before it ran
            else:
                first = self._waiting[0] is turn
                self._waiting.remove(turn)
                if first and self._waiting:
                    self._waiting[0].woken.set()  # the next in line keeps the clock now
            raise
        self.stats["waited"] += 1  # counted here, not as given: a request cancelled first gave up
        return turn.place

    def _hand_on(self) -> None:
        """A place came free: to the first request waiting, if any."""
        waiting = self._waiting
        if not waiting:
            return
        turn = waiting.popleft()
        place = Place(trio.current_time() + self.hold_s)
        self._running[place] = None
        turn.place = place
        turn.woken.set()
        if waiting:
            waiting[0].woken.set()  # the new first in line: it keeps the clock

    def _expire(self, now: float) -> None:
        """Places held past their time are given on (their handlers run on, uncounted)."""
        running = self._running
        while running:
            place = next(iter(running))
            if place.deadline > now:
                return
            running.popitem(last=False)
            place.expired = True
            self.stats["expired"] += 1
            self._hand_on()
