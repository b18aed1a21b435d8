"""Review 10 of core/admission.py's second line: a handler waiting elsewhere (the storage's
writes and reads, `waiting_elsewhere`) gives its place on and takes one again before new
requests. The Admission against a reference model of the two lines on trio's virtual clock,
then a seated handler (as lean.py seats it) around real storage at awkward moments."""

from __future__ import annotations

import heapq
import random
import threading
from collections import deque
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any, AsyncIterator

import httpx
import pytest
import trio
import trio.testing

import gatewayd_kaiabc
from gatewayd_kaiabc.service import Kaiabc

from gatewayd.core.admission import (Admission, Seat, current, step_aside, step_back, waiting_elsewhere,
                                     waiting_elsewhere_for)
from gatewayd.core.http.lean import LeanQuart
from gatewayd.core.http.serve import serve_app
from gatewayd.core.schema import Address
from gatewayd.core.storage import Storage
from gatewayd.testing import gw_client, wait_until
from gatewayd.testing.ports import reserved_port

# A request: (arrival, runs before its wait elsewhere, waits elsewhere, runs after, cancel at or None)
Req = tuple[float, float, float, float, "float | None"]


# -- a reference model of the two lines ------------------------------------------------------


def _reference(limit: int, hold: float, reqs: list[Req]) -> dict[str, Any]:
    """Who is let in when, by the rule written plainly: a place counts from its grant until
    its handler steps aside or leaves; past `hold` s it is overdue, and the overdue are
    taken back when someone needs a place and none is free. Whenever fewer than `limit`
    count, the first handler back from a wait goes in, else the first new request. A
    handler whose place was taken back before it stepped aside runs on uncounted to its
    end; one whose place was overdue but not taken back steps aside and returns as any."""
    ARRIVE, CANCEL, ASIDE, RETURN, FINISH, EXPIRE = range(6)
    events: list[tuple[float, int, int, int]] = []  # (time, kind, i, grant)
    for i, (arrive, _, _, _, cancel) in enumerate(reqs):
        heapq.heappush(events, (arrive, ARRIVE, i, 0))
        if cancel is not None:
            heapq.heappush(events, (cancel, CANCEL, i, 0))
    new: deque[int] = deque()
    back: deque[int] = deque()
    counted: dict[int, int] = {}  # request -> its grant number
    grants = 0
    phase: dict[int, str] = {}  # in line / first run / aside / second run / done
    admitted: dict[int, float] = {}
    returned: dict[int, float] = {}
    overdue: dict[int, int] = {}  # request -> its grant, past `hold` and still counted
    stats = {"at_once": 0, "gave_up": 0, "aside": 0, "expired": 0}

    def room() -> bool:
        if len(counted) >= limit:  # full: the overdue are taken back
            for j, g in list(overdue.items()):
                if counted.get(j) == g:
                    del counted[j]
                    stats["expired"] += 1
            overdue.clear()
        return len(counted) < limit
    while events:
        now, kind, i, grant = heapq.heappop(events)
        if phase.get(i) == "done" and kind != EXPIRE:
            continue
        if kind == ARRIVE:
            if not new and not back and room():
                stats["at_once"] += 1
            new.append(i)
            phase[i] = "new"
        elif kind == CANCEL:
            if i in new:
                new.remove(i)
                stats["gave_up"] += 1
            if i in back:
                back.remove(i)
            counted.pop(i, None)
            phase[i] = "done"
        elif kind == ASIDE:
            if counted.pop(i, None) is not None:
                stats["aside"] += 1
                phase[i] = "aside"
                heapq.heappush(events, (now + reqs[i][2], RETURN, i, 0))
            else:  # overran: runs on uncounted to its end, its wait included
                phase[i] = "uncounted"
                heapq.heappush(events, (now + reqs[i][2] + reqs[i][3], FINISH, i, 0))
        elif kind == RETURN:
            back.append(i)
            phase[i] = "back"
        elif kind == FINISH:
            counted.pop(i, None)
            phase[i] = "done"
        elif counted.get(i) == grant:  # EXPIRE of the grant still counted
            overdue[i] = grant
        while (back or new) and room():
            line = back if back else new
            j = line.popleft()
            grants += 1
            counted[j] = grants
            heapq.heappush(events, (now + hold, EXPIRE, j, grants))
            if line is new:
                admitted[j] = now
                phase[j] = "first"
                heapq.heappush(events, (now + reqs[j][1], ASIDE, j, 0))
            else:
                returned[j] = now
                phase[j] = "second"
                heapq.heappush(events, (now + reqs[j][3], FINISH, j, 0))
    return {"admitted": admitted, "returned": returned, **stats}


def _requests(rng: random.Random, n: int, hold: float) -> list[Req]:
    reqs: list[Req] = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(1 / rng.choice([0.001, 0.05, 0.3]))  # bursts and lulls
        first = rng.choice([rng.uniform(0.001, hold * 0.9), rng.uniform(hold * 1.1, hold * 3)])
        wait = rng.uniform(0.001, hold * 3)
        second = rng.choice([rng.uniform(0.001, hold * 0.9), rng.uniform(hold * 1.1, hold * 3)])
        cancel = t + rng.uniform(0.001, hold * 6) if rng.random() < 0.25 else None
        reqs.append((t, first, wait, second, cancel))
    return reqs


@pytest.mark.parametrize("seed", range(40))
async def test_both_lines_let_in_whom_the_reference_model_does_and_when(autojump_clock, seed):
    rng = random.Random(seed)
    limit, hold = rng.randint(1, 5), rng.choice([0.1, 0.5, 2.0])
    reqs = _requests(rng, 120, hold)
    admission = Admission(limit, hold)
    admitted: dict[int, float] = {}
    returned: dict[int, float] = {}
    scopes = [trio.CancelScope() for _ in reqs]

    def check() -> None:
        assert len(admission._running) <= limit
        # nobody waits while a place is free (places past their time count until taken back)
        assert not (admission._waiting or admission._back) or len(admission._running) == limit

    async def one(i: int) -> None:
        arrive, first, wait, second, _ = reqs[i]
        await trio.sleep_until(arrive)
        with scopes[i]:
            check()
            seat = Seat(admission, await admission.enter(), trio.lowlevel.current_task())
            admitted[i] = trio.current_time()
            held = current.set(seat)
            try:
                check()
                await trio.sleep(first)
                async with waiting_elsewhere():
                    check()
                    await trio.sleep(wait)
                if seat.place is not None:  # took a place again (not: it had overran)
                    returned[i] = trio.current_time()
                check()
                await trio.sleep(second)
            finally:
                current.reset(held)
                seat.leave()
                check()

    async def cancel(i: int, at: float) -> None:
        await trio.sleep_until(at)
        scopes[i].cancel()

    with trio.fail_after(10_000):  # virtual seconds: a waiter stranded for ever ends here
        async with trio.open_nursery() as nursery:
            for i, req in enumerate(reqs):
                nursery.start_soon(one, i)
                if req[4] is not None:
                    nursery.start_soon(cancel, i, req[4])
    want = _reference(limit, hold, reqs)
    assert admitted.keys() == want["admitted"].keys()
    for i, t in want["admitted"].items():
        assert admitted[i] == pytest.approx(t, abs=1e-6), i
    assert returned.keys() == want["returned"].keys()
    for i, t in want["returned"].items():
        assert returned[i] == pytest.approx(t, abs=1e-6), i
    for key in ("at_once", "gave_up", "aside", "expired"):
        assert admission.stats[key] == want[key], key
    assert admission.running == admission.waiting == 0


async def test_a_returner_arriving_while_a_new_request_keeps_the_clock_goes_first(autojump_clock):
    # "new" keeps the clock (first in line, sleeping until the holder's place is up at 1.0);
    # a handler back from a wait joins at 0.5: the place up at 1.0 is the returner's.
    admission = Admission(1, hold_s=1)
    log: list[tuple[str, float]] = []

    async def handler() -> None:
        async with _seated(admission):
            async with waiting_elsewhere():
                await trio.sleep(0.5)
            log.append(("back", trio.current_time()))
            await trio.sleep(0.2)

    async def new() -> None:
        place = await admission.enter()
        log.append(("new", trio.current_time()))
        admission.leave(place)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler)
        await trio.testing.wait_all_tasks_blocked()  # stepped aside: the place is free
        holder = await admission.enter()  # never leaves: its place is up at 1.0
        await trio.sleep(0.1)
        nursery.start_soon(new)
    assert log == [("back", pytest.approx(1.0)), ("new", pytest.approx(1.2))]
    assert admission.stats["expired"] == 1 and admission.running == 0 and admission.waiting == 0
    admission.leave(holder)  # its place was given on already: no harm


# -- a seated handler around real storage ------------------------------------------------------


@asynccontextmanager
async def _seated(admission: Admission) -> AsyncIterator[Seat]:
    """As lean.py runs a handler: a place, the seat in the contextvar, the place left after."""
    seat = Seat(admission, await admission.enter(), trio.lowlevel.current_task())
    held = current.set(seat)
    try:
        yield seat
    finally:
        current.reset(held)
        seat.leave()


@asynccontextmanager
async def _storage(tmp_path: Any) -> AsyncIterator[Storage]:
    storage = Storage(tmp_path / "gatewayd.sqlite3")
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        yield storage
        nursery.cancel_scope.cancel()


def _fails() -> None:
    raise LookupError("no such row")  # what a read's fn raises for a 404 (peewee's DoesNotExist)


async def test_a_read_that_raises_gives_the_handler_its_place_again(tmp_path):
    # A read whose fn raises (a row not found: the handler answers 404) skipped step_back: the
    # handler ran on uncounted, and with the limit 1 a new request was let in beside it.
    admission = Admission(1, hold_s=3600)
    async with _storage(tmp_path) as storage, _seated(admission) as seat:
        with pytest.raises(LookupError):
            await storage.read(_fails)
        assert seat.place is not None  # it runs on the CPU, counted, as a handler does
        assert admission.running == 1
    assert admission.running == admission.waiting == 0


async def test_a_write_whose_job_fails_gives_the_handler_its_place_again(tmp_path):
    admission = Admission(1, hold_s=3600)
    async with _storage(tmp_path) as storage, _seated(admission) as seat:
        with pytest.raises(LookupError):
            await storage.write(_fails)
        assert seat.place is not None and admission.running == 1
        assert await storage.write(lambda: 7) == 7  # and the next write steps aside and back as usual
        assert seat.place is not None and admission.stats["aside"] == 2
    assert admission.running == admission.waiting == 0


async def test_a_wait_of_a_plugins_own_around_a_storage_call_holds_no_place_until_it_ends(tmp_path):
    # waiting_elsewhere is public: a plugin's `async with waiting_elsewhere(): await
    # ctx.storage.write(...); await device_answer()`. The write's step_back took a place in
    # the middle of the outer wait, and held it while the device was awaited.
    admission = Admission(1, hold_s=3600)
    async with _storage(tmp_path) as storage, _seated(admission) as seat:
        async with waiting_elsewhere():
            await storage.read(lambda: 1)
            async with waiting_elsewhere():  # nested, as a plugin helper may be
                pass
            assert seat.place is None and admission.running == 0  # still waiting on the device
        assert seat.place is not None and admission.running == 1
    assert admission.running == admission.waiting == 0


async def test_kaiabcs_startup_wait_that_times_out_gives_the_handler_its_place_again(autojump_clock):
    # move_on_after around waiting_elsewhere: the timeout's Cancelled went through __aexit__,
    # which does not step back: the handler answered (503) on, uncounted.
    admission = Admission(1, hold_s=3600)
    starting = SimpleNamespace(ready=trio.Event())  # a kaiabc whose startup does not end
    async with _seated(admission) as seat:
        assert await Kaiabc.wait_started(starting, timeout_s=1) is False  # type: ignore[arg-type]
        assert seat.place is not None and admission.running == 1
    assert admission.running == admission.waiting == 0


@pytest.mark.parametrize("where", ["waiting for the commit", "in the returners' line"])
async def test_cancelled_at_each_await_of_a_write_no_place_is_kept(tmp_path, where):
    admission = Admission(1, hold_s=3600)
    writer_busy = threading.Event()
    async with _storage(tmp_path) as storage:
        async with trio.open_nursery() as nursery:
            async def handler() -> None:
                async with _seated(admission):
                    await storage.write(writer_busy.wait, 20)
            nursery.start_soon(handler)
            await wait_until(lambda: admission.stats["aside"] == 1, what="the handler waits for the commit")
            if where == "in the returners' line":
                other = await admission.enter()  # the place it gave is taken: back, it waits in line
                writer_busy.set()
                await wait_until(lambda: admission.waiting == 1, what="the handler waits in the returners' line")
            nursery.cancel_scope.cancel()  # its client left (abandon, or out of the line)
        writer_busy.set()
        if where == "in the returners' line":
            admission.leave(other)
    assert admission.running == admission.waiting == 0


async def test_a_handler_cancelled_in_the_returners_line_leaves_it_and_no_place(autojump_clock):
    admission = Admission(1, hold_s=3600)
    scope = trio.CancelScope()
    after: list[str] = []

    async def handler() -> None:
        with scope:
            async with _seated(admission) as seat:
                async with waiting_elsewhere():
                    await trio.sleep(1)
                after.append("ran on")  # never: cancelled in line
        assert seat.place is None

    async def returner() -> None:  # a second handler, back later: it must get the place
        async with _seated(admission):
            async with waiting_elsewhere():
                await trio.sleep(2)
            after.append("returner back")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler)
        await trio.sleep(0.1)
        nursery.start_soon(returner)  # its place at once (the handler stepped aside)
        await trio.sleep(0.1)
        new = await admission.enter()  # the place the returner gave: now held
        await trio.sleep(1)  # the handler is back, waits in line first (keeps the clock)
        assert admission.waiting == 1
        scope.cancel()
        await trio.sleep(1.5)  # the returner back at 2.1: in line, and the one now first
        assert admission.waiting == 1
        admission.leave(new)
    assert after == ["returner back"]
    assert admission.running == admission.waiting == 0


async def test_tasks_a_handler_starts_and_storage_outside_handlers_change_nothing(tmp_path):
    admission = Admission(1, hold_s=3600)
    async with _storage(tmp_path) as storage:
        await storage.write(lambda: 1)  # MQTT ingest, background tasks: no seat
        await storage.read(lambda: 1)
        async with _seated(admission) as seat:
            async with trio.open_nursery() as nursery:  # a child task (a nursery in a handler)
                nursery.start_soon(storage.write, lambda: 1)
                nursery.start_soon(storage.read, lambda: 1)
            assert seat.place is not None and admission.stats["aside"] == 0
            step_aside()
            step_aside()  # twice: the second has nothing to give
            assert admission.stats["aside"] == 1 and admission.running == 0
            await step_back()
            await step_back()  # twice: the second takes nothing
            assert admission.running == 1
            seat.leave()
            seat.leave()
            assert admission.running == 0
    assert admission.running == admission.waiting == 0


async def test_a_sync_view_in_a_thread_holds_its_place_and_gives_it_back():
    app = LeanQuart("sync")

    @app.get("/sync")
    def sync_view() -> str:  # Quart runs it in a thread, with the handler's context
        step_aside()  # not on the trio thread: nothing
        return "sync"

    admission, stop = Admission(1, hold_s=3600), trio.Event()
    port = reserved_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_app(
            app, Address("127.0.0.1", port), shutdown_trigger=stop.wait, graceful_timeout=1, access_log=False,
            admission=admission, task_status=task_status))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            for _ in range(3):
                assert (await client.get("/sync")).text == "sync"
        stop.set()
    assert admission.stats["aside"] == 0 and admission.running == admission.waiting == 0


async def test_a_wait_ended_by_an_error_the_handler_answers_takes_a_place_again(autojump_clock):
    admission = Admission(1, hold_s=3600)
    async with _seated(admission) as seat:
        with pytest.raises(TimeoutError):
            async with waiting_elsewhere():
                raise TimeoutError("the device did not answer")  # the handler answers 504
        assert seat.place is not None and admission.running == 1
        with trio.move_on_after(1):
            async with waiting_elsewhere():
                await trio.sleep(2)  # cancelled: it does not take a place again
        assert seat.place is None and admission.running == 0
        async with waiting_elsewhere():  # nor does a later wait: it has no place to give
            pass
        assert seat.place is None and admission.running == 0
    assert admission.running == admission.waiting == 0


async def test_the_returner_keeping_the_clock_cancelled_hands_it_to_the_first_new_request(autojump_clock):
    # "holder" never leaves (its place is up at 1.01); the returner, first in line, keeps the
    # clock; cancelled at 0.5, the new request behind it must keep it and go in at 1.01
    admission = Admission(1, hold_s=1)
    scope = trio.CancelScope()
    log: list[tuple[str, float]] = []

    async def returner() -> None:
        with scope:
            async with _seated(admission):
                async with waiting_elsewhere():
                    await trio.sleep(0.05)
                log.append(("returner", trio.current_time()))  # never: cancelled in line

    async def new() -> None:
        place = await admission.enter()
        log.append(("new", trio.current_time()))
        admission.leave(place)

    with trio.fail_after(100):  # virtual seconds: "new" stranded, never keeping the clock, ends here
        async with trio.open_nursery() as nursery:
            nursery.start_soon(returner)
            await trio.sleep(0.01)
            holder = await admission.enter()  # the place the returner gave
            await trio.sleep(0.09)
            assert admission.waiting == 1  # the returner, back at 0.05, in line
            nursery.start_soon(new)
            await trio.sleep(0.4)
            scope.cancel()
    assert log == [("new", pytest.approx(1.01))]
    admission.leave(holder)
    assert admission.running == admission.waiting == 0


async def test_a_returner_cancelled_as_it_is_given_a_place_gives_it_to_the_next(autojump_clock):
    admission = Admission(1, hold_s=3600)
    scope = trio.CancelScope()
    log: list[str] = []

    async def returner() -> None:
        with scope:
            async with _seated(admission):
                async with waiting_elsewhere():
                    await trio.sleep(0.1)
                log.append("returner")  # never: cancelled as it was given the place

    async def new() -> None:
        place = await admission.enter()
        log.append("new")
        admission.leave(place)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(returner)
        await trio.testing.wait_all_tasks_blocked()
        holder = await admission.enter()
        nursery.start_soon(new)
        await trio.sleep(1)
        assert admission.waiting == 2  # the returner first, then "new"
        scope.cancel()  # the returner's client leaves (its wait is aborted) ...
        admission.leave(holder)  # ... and in the same instant, before it ran, it is given the place
    assert log == ["new"]
    assert admission.running == admission.waiting == 0


async def test_a_burst_of_registrations_is_not_held_up_by_the_node_lock(gateway_factory, monkeypatch):
    # POST /sensors/nodes takes kaiabc's one node lock and provisions the device (storage)
    # under it. The holder steps aside for the storage; the next requests are let in and wait
    # on the lock, in places (a lock's wait does not say so); back, the holder finds none free
    # until the oldest of theirs is past handler_hold_s (an hour here, 0.5 s by default: a
    # commissioning burst of nodes registered at about one per hold_s / max_handlers).
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", "review10-admin-token")
    auth = {"Authorization": "Bearer review10-admin-token"}
    async with gateway_factory(plugins=[("kaiabc", gatewayd_kaiabc)],
                               settings=["http.max_handlers=2", "http.handler_hold_s=3600"]) as gw, \
            gw_client(gw) as client:
        answers: list[int] = []

        async def register(node_id: str) -> None:
            body = {"node_id": node_id, "name": node_id, "hardware_type": "raspberry_pi_pico",
                    "runtime": "micropython", "sensor_types": ["temperature"], "location": "bench"}
            try:
                answers.append((await client.post("/kaiabc/v1/sensors/nodes", headers=auth, json=body)).status_code)
            except httpx.HTTPError:  # held up past the client's timeout
                answers.append(0)

        with trio.move_on_after(20):  # wall seconds, far more than 4 registrations take
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(register, f"node_{i}")
        assert answers == [201] * 4


async def test_a_lock_waited_for_elsewhere_holds_no_place_and_is_never_kept(autojump_clock):
    admission = Admission(1, hold_s=3600)
    lock = trio.Lock()
    async with _seated(admission) as seat:
        async with waiting_elsewhere_for(lock):  # free: taken at once, the place kept
            assert lock.locked() and seat.place is not None and admission.stats["aside"] == 0
    assert not lock.locked()
    scopes = {"for the lock": trio.CancelScope(), "in line": trio.CancelScope()}
    got: list[str] = []

    async def handler(name: str) -> None:
        with scopes[name]:
            async with _seated(admission):
                async with waiting_elsewhere_for(lock):
                    got.append(name)

    async with trio.open_nursery() as nursery:
        await lock.acquire()  # another handler has it
        nursery.start_soon(handler, "for the lock")
        await trio.testing.wait_all_tasks_blocked()
        assert admission.running == 0 and admission.waiting == 0  # waits for the lock with no place
        scopes["for the lock"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(handler, "in line")
        await trio.testing.wait_all_tasks_blocked()
        place = await admission.enter()  # the place it gave is taken: with the lock, it waits in line
        lock.release()
        await trio.testing.wait_all_tasks_blocked()
        assert admission.waiting == 1 and lock.locked()
        scopes["in line"].cancel()  # its client leaves: the lock it took is let go
    assert got == [] and not lock.locked()
    admission.leave(place)
    assert admission.running == admission.waiting == 0


async def test_devices_provisioned_at_once_are_not_held_up_by_the_broker_accounts_lock():
    # Provisioning a device of an MQTT family (a request handler) awaits the managed
    # broker's account update, one at a time under a lock, a storage read under it.
    from gatewayd.core.mqtt.service import MQTTService

    admission = Admission(2, hold_s=3600)

    async def accounts() -> list[Any]:
        async with waiting_elsewhere():  # as the registry's storage read does
            await trio.sleep(0.01)
        return []

    service = SimpleNamespace(broker=SimpleNamespace(set_accounts=lambda _: None), _families={"fam"},
                              _accounts_lock=trio.Lock(), _accounts=accounts)
    done: list[int] = []

    async def provisioning(i: int) -> None:
        async with _seated(admission):
            await MQTTService.credentials_changed(service, "fam")  # type: ignore[arg-type]
            done.append(i)

    with trio.move_on_after(10):  # wall seconds: three such updates take a few ms
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(provisioning, i)
    assert sorted(done) == [0, 1, 2]
