"""Review 9 of http/admission.py (`[http] max_handlers`): the Admission checked against a
plain reference model on trio's virtual clock, at awkward moments, and in the gateway."""

from __future__ import annotations

import heapq
import random
from collections import deque
from typing import Any

import pytest
import trio

from gatewayd.core.http.admission import Admission


# -- a reference model ---------------------------------------------------------------------


def _reference(limit: int, hold: float, reqs: list[tuple[float, float, float | None]]) -> dict[str, Any]:
    """When each request is let in, by the rule written plainly: a place counts from its
    grant until its handler leaves or `hold` s have passed, whichever is first; whenever
    fewer than `limit` count, the first in line is let in. `reqs`: (arrival, runs, cancel
    at or None). Returns {"admitted": {i: t}, "at_once": n, "gave_up": n}."""
    events: list[tuple[float, int, int]] = []  # (time, kind, i); kinds below
    ARRIVE, CANCEL, FINISH, EXPIRE = 0, 1, 2, 3
    for i, (arrive, _, cancel) in enumerate(reqs):
        heapq.heappush(events, (arrive, ARRIVE, i))
        if cancel is not None:
            heapq.heappush(events, (cancel, CANCEL, i))
    line: deque[int] = deque()
    counted: set[int] = set()
    running: set[int] = set()
    admitted: dict[int, float] = {}
    at_once = gave_up = 0
    while events:
        now, kind, i = heapq.heappop(events)
        if kind == ARRIVE:
            if not line and len(counted) < limit:
                at_once += 1
            line.append(i)
        elif kind == CANCEL:
            if i in line:
                line.remove(i)
                gave_up += 1
            running.discard(i)
            counted.discard(i)
        elif kind == FINISH:
            running.discard(i)
            counted.discard(i)
        else:
            counted.discard(i)
        while line and len(counted) < limit:
            j = line.popleft()
            admitted[j] = now
            counted.add(j)
            running.add(j)
            heapq.heappush(events, (now + reqs[j][1], FINISH, j))
            heapq.heappush(events, (now + hold, EXPIRE, j))
    return {"admitted": admitted, "at_once": at_once, "gave_up": gave_up}


def _requests(rng: random.Random, n: int, hold: float) -> list[tuple[float, float, float | None]]:
    reqs: list[tuple[float, float, float | None]] = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(1 / rng.choice([0.001, 0.05, 0.3]))  # bursts and lulls
        runs = rng.choice([rng.uniform(0.001, hold * 0.9), rng.uniform(hold * 1.1, hold * 6)])
        cancel = t + rng.uniform(0.001, hold * 4) if rng.random() < 0.2 else None
        reqs.append((t, runs, cancel))
    return reqs


@pytest.mark.parametrize("seed", range(40))
async def test_the_admission_lets_in_whom_the_reference_model_does_and_when(autojump_clock, seed):
    rng = random.Random(seed)
    limit, hold = rng.randint(1, 5), rng.choice([0.1, 0.5, 2.0])
    reqs = _requests(rng, 120, hold)
    admission = Admission(limit, hold)
    admitted: dict[int, float] = {}
    scopes = [trio.CancelScope() for _ in reqs]

    def check() -> None:
        # the places counted are at most the limit, and nobody waits while one is free
        assert len(admission._running) <= limit
        assert not admission._waiting or len(admission._running) == limit

    async def one(i: int) -> None:
        arrive, runs, _ = reqs[i]
        await trio.sleep_until(arrive)
        with scopes[i]:
            check()
            place = await admission.enter()
            admitted[i] = trio.current_time()
            check()
            try:
                await trio.sleep(runs)
            finally:
                admission.leave(place)
                check()

    async def cancel(i: int, at: float) -> None:
        await trio.sleep_until(at)
        scopes[i].cancel()

    with trio.fail_after(10_000):  # virtual seconds: a waiter stranded for ever ends here
        async with trio.open_nursery() as nursery:
            for i, (_, _, at) in enumerate(reqs):
                nursery.start_soon(one, i)
                if at is not None:
                    nursery.start_soon(cancel, i, at)
    want = _reference(limit, hold, reqs)
    assert admitted.keys() == want["admitted"].keys()
    for i, t in want["admitted"].items():
        assert admitted[i] == pytest.approx(t, abs=1e-6), i
    assert admission.stats["at_once"] == want["at_once"]
    assert admission.stats["gave_up"] == want["gave_up"]
    assert admission.running == admission.waiting == 0


@pytest.mark.parametrize("seed", range(40))
async def test_at_awkward_moments_the_order_the_limit_and_the_line_hold(autojump_clock, seed):
    # Times on a 0.1 s grid: arrivals, leavings, cancellations and places' time up fall on
    # the same instants (a place given and its request cancelled before it ran, the first in
    # line cancelled as it is given one, a burst as places expire), in trio's random order.
    rng = random.Random(seed)
    limit, hold = rng.randint(1, 4), 0.5
    n = 100
    admission = Admission(limit, hold)
    called: list[int] = []  # the order enter() was called in
    admitted: list[int] = []
    admitted_at: dict[int, float] = {}
    out_of_line: set[int] = set()
    scopes = [trio.CancelScope() for _ in range(n)]

    async def one(i: int, arrive: float, runs: float) -> None:
        await trio.sleep_until(arrive)
        with scopes[i]:
            called.append(i)
            try:
                place = await admission.enter()
            finally:
                out_of_line.add(i)
            admitted.append(i)
            admitted_at[i] = trio.current_time()
            assert len(admission._running) <= limit
            try:
                await trio.sleep(runs)
            finally:
                admission.leave(place)
                admission.leave(place)  # twice: no harm
                in_line = [j for j in called if j not in out_of_line]
                if in_line and rng.random() < 0.3:
                    # cancel the one just given this place before it ran, or the new first in line
                    scopes[in_line[rng.randrange(min(2, len(in_line)))]].cancel()
            assert not admission._waiting or len(admission._running) == limit

    async def cancel(i: int, at: float) -> None:
        await trio.sleep_until(at)
        scopes[i].cancel()

    with trio.fail_after(10_000):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                arrive = rng.randrange(60) / 10
                nursery.start_soon(one, i, arrive, rng.randrange(1, 20) / 10)
                if rng.random() < 0.2:
                    nursery.start_soon(cancel, i, arrive + rng.randrange(0, 20) / 10)
    # first come first served: in the order enter() was called, admitted no earlier than the one before
    # (two let in at the same instant run in trio's order, so compare times, not the order they ran)
    times = [admitted_at[i] for i in called if i in admitted_at]
    assert times == sorted(times)
    s = admission.stats
    assert s["at_once"] + s["waited"] + s["gave_up"] == len(called)
    assert len(admitted) <= s["at_once"] + s["waited"]
    assert admission.running == admission.waiting == 0
