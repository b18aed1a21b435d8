"""Admission: at most `limit` request handlers run at once; the others wait, first come
first served (`[http] max_handlers`, `[http] handler_hold_s`).

Why: trio runs every ready task in turn. When a site's 1,000 lights send at once (after a
power cut, or the gateway's own restart) 1,000 handlers share the CPU and all of them are
answered near the end of the burst: processor sharing, the slowest light answered after
4-5 s in bench/streetlight_bench.py's fleet (past the specification's 5 s for some, in
two sittings of five). Run 32 at a time in the order they came, the first are answered at
once and the slowest after 1-3 s (no light past 5 s in any sitting).

A place is for running on the CPU. A handler about to wait on something else (the
database, a device, a plugin's startup) gives its place to the next request and, its wait
over, takes one again before any new request (`waiting_elsewhere`): the storage does so
for each write and read, so the CPU does not idle while 32 handlers wait for a commit and
a group commit is not capped at 32 writes; a plugin does so around a wait of its own
(kaiabc's requests during its startup). A handler that runs longer than `hold_s` anyway
(a wait that does not say so) loses its place and runs on uncounted, so a few slow
handlers cannot hold up the rest. Places are taken back lazily, by the first request in
line, which sleeps until the oldest place's time is up: no task of its own.

Only a request whose body has arrived whole is admitted (lean.LeanHTTPConnection): the
handler of a body still coming waits on its client, not on the CPU. What a handler
answers is sent after it has left its place: a live stream (SSE) holds none while it lasts.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from contextvars import ContextVar
from types import TracebackType

import trio


class Place:
    """A running handler's place; `expired` once given back (or its `hold_s` was up)."""

    __slots__ = ("deadline", "expired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = False


class _Turn:
    """A request in line: the place it was given, and what wakes it."""

    __slots__ = ("line", "place", "woken")

    def __init__(self, line: deque[_Turn]) -> None:
        self.line = line
        self.place: Place | None = None
        self.woken = trio.Event()


class Admission:
    """At most `limit` handlers at once, each counted for at most `hold_s` seconds; the
    rest admitted first come first served, handlers back from a wait elsewhere first. One
    for all of the gateway's listeners: they share the one CPU."""

    def __init__(self, limit: int, hold_s: float) -> None:
        if limit < 1 or not hold_s > 0:
            raise ValueError(f"need limit >= 1 and hold_s > 0, got {limit}, {hold_s}")
        self.limit = limit
        self.hold_s = hold_s
        # oldest first (their deadlines in order); an OrderedDict, not a deque: a handler
        # leaves in any order, and a deque's remove() searches (max_handlers may be large)
        self._running: OrderedDict[Place, None] = OrderedDict()
        self._back: deque[_Turn] = deque()  # handlers back from a wait elsewhere: served first
        self._waiting: deque[_Turn] = deque()  # new requests, first come first
        #: handlers let in at once, or after waiting their turn; requests whose client left
        #: while they waited, or as they were let in (gave_up: their handler never ran);
        #: places given back for a wait elsewhere (aside); places given on because their
        #: handler ran longer than hold_s (expired: counted when taken back, which is only
        #: when someone waits)
        self.stats = {"at_once": 0, "waited": 0, "gave_up": 0, "expired": 0, "aside": 0}

    @property
    def running(self) -> int:
        """Handlers holding a place."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests and handlers waiting for a place."""
        return len(self._waiting) + len(self._back)

    async def enter(self) -> Place:
        """A place for a new request's handler, once the requests before it have theirs;
        give it back with `leave`. Cancelled (the client left), it waits no longer."""
        if not self._waiting and not self._back and self._room():
            self.stats["at_once"] += 1
            return self._take()
        try:
            place = await self._wait(self._waiting)
        except BaseException:
            self.stats["gave_up"] += 1  # its handler never ran, given a place or not
            raise
        self.stats["waited"] += 1  # counted here, not as given: a request cancelled first gave up
        return place

    async def reenter(self) -> Place:
        """A place again for a handler back from a wait elsewhere, before any new request."""
        if not self._back and self._room():
            return self._take()
        return await self._wait(self._back)

    def leave(self, place: Place) -> None:
        """The handler is done: its place goes to the first in line."""
        if place.expired:
            return  # given on already
        place.expired = True
        del self._running[place]
        self._hand_on()

    def _room(self) -> bool:
        if len(self._running) >= self.limit:
            self._expire(trio.current_time())
        return len(self._running) < self.limit

    def _take(self) -> Place:
        place = Place(trio.current_time() + self.hold_s)
        self._running[place] = None
        return place

    def _first(self) -> _Turn | None:
        return self._back[0] if self._back else self._waiting[0] if self._waiting else None

    async def _wait(self, line: deque[_Turn]) -> Place:
        turn = _Turn(line)
        line.append(turn)
        try:
            while turn.place is None:
                deadline = math.inf
                if self._first() is turn:
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
            if turn.place is not None:
                self.leave(turn.place)  # given a place, then cancelled before it ran
            else:
                first = self._first() is turn
                line.remove(turn)
                if first and (after := self._first()) is not None:
                    after.woken.set()  # the next in line keeps the clock now
            raise
        return turn.place

    def _hand_on(self) -> None:
        """A place came free: to the first in line, if any."""
        turn = self._first()
        if turn is None:
            return
        turn.line.popleft()
        turn.place = self._take()
        turn.woken.set()
        if (after := self._first()) is not None:
            after.woken.set()  # the new first in line: it keeps the clock

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


class Seat:
    """A request handler's hold on its admission: the place it runs in (None while it
    waits elsewhere, or after it overran), in the task that runs it."""

    __slots__ = ("admission", "place", "task", "aside")

    def __init__(self, admission: Admission, place: Place, task: trio.lowlevel.Task) -> None:
        self.admission = admission
        self.place: Place | None = place
        self.task = task
        self.aside = False  # gave its place back for a wait elsewhere: takes one again after

    def leave(self) -> None:
        """The handler is done: its place, if it holds one, to the first in line."""
        if self.place is not None:
            self.admission.leave(self.place)
            self.place = None


#: The request handler running in this task (lean.py sets it; tasks the handler starts
#: inherit it, but only the handler's own task gives its place back and takes it again).
current: ContextVar[Seat | None] = ContextVar("gatewayd_admission_seat", default=None)


def _seat() -> Seat | None:
    seat = current.get()
    # a thread started by the handler sees its context too, and must not touch trio
    if seat is None or not trio.lowlevel.in_trio_task() or trio.lowlevel.current_task() is not seat.task:
        return None
    return seat


def step_aside() -> bool:
    """The request handler running in this task is about to wait on something other than
    the CPU: its place goes to the next in line. Whether it gave one: if so, `step_back`
    after the wait (only then: a wait inside another wait, as a storage call inside a
    plugin's `waiting_elsewhere`, must not take a place before the outer wait is over).
    Nothing outside a request handler's own task, when places are not limited, or when it
    holds none (it gave it already, or overran)."""
    seat = _seat()
    if seat is None or seat.place is None:
        return False
    place, seat.place = seat.place, None
    if place.expired:  # one that overran runs on uncounted, and stays so
        return False
    seat.aside = True
    seat.admission.stats["aside"] += 1
    seat.admission.leave(place)
    return True


async def step_back() -> None:
    """After `step_aside`'s wait: a place again, before any new request (at once when one
    is free). Nothing when this task's handler did not step aside."""
    seat = _seat()
    if seat is None or not seat.aside:
        return
    seat.aside = False
    seat.place = await seat.admission.reenter()


class waiting_elsewhere:  # noqa: N801  (used as a function: `async with waiting_elsewhere():`)
    """`async with waiting_elsewhere(): await ...`: the request handler running in this task
    gives its place to the next request while it waits on something other than the CPU (a
    device, a plugin's startup, an event), and takes one again, before new requests, once
    the wait is over, or ended in an exception the handler may answer. Outside a request
    handler, inside another such wait (a storage call inside it counts as one), or with
    `[http] max_handlers = 0`, nothing. A wait cancelled (its client left, or a timeout
    around it) does not take a place again: the handler runs on uncounted, so put a
    timeout inside, `async with waiting_elsewhere(): with trio.move_on_after(s): ...`."""

    __slots__ = ("_stepped",)

    def __init__(self) -> None:
        self._stepped = False

    async def __aenter__(self) -> None:
        self._stepped = step_aside()

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        # not when cancelled: waiting in line again would only end in Cancelled
        if self._stepped and (kind is None or issubclass(kind, Exception)):
            self._stepped = False
            await step_back()


class waiting_elsewhere_for:  # noqa: N801  (used as a function: `async with waiting_elsewhere_for(lock):`)
    """`async with waiting_elsewhere_for(lock): ...`, for `async with lock: ...` in a request
    handler that waits on something else under the lock (the storage): while another
    handler has the lock, this one waits for it without a place. Waited on in a place, a
    lock stalls its holder: back from the storage, the holder finds every place held by
    the handlers waiting on its lock, and takes one only once the oldest is past
    `[http] handler_hold_s`. Taken at once, no place is given."""

    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        lock = self._lock
        await trio.lowlevel.checkpoint_if_cancelled()  # as trio.Lock.acquire does
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()  # held now: not cancelled past this
            return
        stepped = step_aside()
        await lock.acquire()  # cancelled here, it holds no lock (and runs on uncounted, ending)
        if stepped:
            try:
                await step_back()
            except BaseException:
                lock.release()  # cancelled in line: not through the `async with`, so release here
                raise

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._lock.release()
