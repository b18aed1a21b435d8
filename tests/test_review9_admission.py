"""Review 9 of http/admission.py (`[http] max_handlers`): the Admission checked against a
plain reference model on trio's virtual clock, at awkward moments, and in the gateway."""

from __future__ import annotations

import heapq
import random
from collections import deque
from typing import Any

import httpx
import pytest
import trio
from quart import Blueprint
from trio_websocket import open_websocket_url

import gatewayd_kaiabc
from gatewayd_kaiabc.service import Kaiabc

from gatewayd.core.config import load_config
from gatewayd.core.admission import Admission, Place
from gatewayd.core.http.lean import LeanQuart
from gatewayd.core.http.serve import serve_app
from gatewayd.core.runtime import Gateway
from gatewayd.core.schema import Address
from gatewayd.plugins.manager import build_plugin_manager
from gatewayd.plugins.api import hookimpl
from gatewayd.testing import gw_client, gw_url, wait_until
from gatewayd.testing.ports import reserved_port

TOKEN = "review9-admin-token"


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
    assert len(admitted) == s["at_once"] + s["waited"]  # a request cancelled as it was let in gave up
    assert admission.running == admission.waiting == 0


async def test_a_request_cancelled_as_it_is_given_a_place_counts_as_gave_up_not_admitted(autojump_clock):
    admission = Admission(1, hold_s=100)
    holder = await admission.enter()
    ran: list[str] = []
    scope = trio.CancelScope()

    async def waiter() -> None:
        with scope:
            place = await admission.enter()
            ran.append("waiter")
            admission.leave(place)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await wait_until(lambda: admission.waiting == 1, what="the waiter is in line")
        scope.cancel()  # its client leaves (or the gateway shuts down) ...
        admission.leave(holder)  # ... as the place it waited for comes free, in the same instant
    assert ran == []  # its handler never ran
    assert admission.running == admission.waiting == 0
    # gatewayd_http_admission_total{outcome}: at_once + waited + gave_up = requests, each counted once
    assert admission.stats == {"at_once": 1, "waited": 0, "gave_up": 1, "expired": 0, "aside": 0}


async def test_leaving_costs_the_same_however_many_places_are_held(monkeypatch):
    compared = [0]

    def eq(self: Place, other: object) -> bool:  # what a search through the places calls
        compared[0] += 1
        return self is other

    monkeypatch.setattr(Place, "__eq__", eq)
    monkeypatch.setattr(Place, "__hash__", object.__hash__)  # the identity's, as before
    n = 2000
    admission = Admission(n, hold_s=3600)  # max_handlers = 2000: a large site's setting
    places = [await admission.enter() for _ in range(n)]
    random.Random(9).shuffle(places)  # handlers end in any order
    for place in places:
        admission.leave(place)
    assert admission.running == 0
    assert compared[0] <= 4 * n  # a few per leaving, not one per place held (~n^2/4 = 1,000,000)


# -- in the gateway --------------------------------------------------------------------------


class _Slow:
    """A plugin whose /hold waits until `release` is set (a handler waiting on a device, or
    on its plugin's startup), and whose /quick answers at once."""

    def __init__(self) -> None:
        self.release = trio.Event()

    @hookimpl
    def gatewayd_http_routes(self, ctx: Any) -> Blueprint:
        bp = Blueprint("slow", __name__)

        @bp.get("/hold")
        async def hold() -> Any:
            await self.release.wait()
            return {"held": True}

        @bp.get("/quick")
        async def quick() -> Any:
            return {"quick": True}

        return bp


async def _get(client: httpx.AsyncClient, path: str, answers: list[int]) -> None:
    try:
        answers.append((await client.get(path)).status_code)
    except httpx.HTTPError:
        answers.append(0)  # the gateway closed the connection (its shutdown)


async def test_live_streams_and_websockets_hold_no_place(gateway_factory, monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)
    async with gateway_factory(settings=["http.max_handlers=1", "http.handler_hold_s=3600"]) as gw, \
            gw_client(gw) as client:
        admission = gw.admission
        url = gw_url(gw).replace("http://", "ws://") + "/api/gateway/live?streams=x.%23"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with open_websocket_url(url, extra_headers=list(headers.items())), \
                client.stream("GET", "/api/gateway/live/events", params={"streams": "x.#"}, headers=headers) as sse:
            assert sse.status_code == 200
            assert admission.running == 0
            with trio.fail_after(20):
                assert (await client.get("/health")).status_code == 200
            assert admission.stats["waited"] == 0


async def test_a_plugins_own_listener_shares_the_one_admission(gateway_factory):
    slow = _Slow()
    port = reserved_port()
    async with gateway_factory(plugins=[("slow", slow)],
                               settings=["http.max_handlers=1", "http.handler_hold_s=3600",
                                         f"plugins.slow.listen='127.0.0.1:{port}'"]) as gw:
        mount = gw.contexts["slow"].mount
        answers: list[int] = []
        async with gw_client(gw) as main, gw_client(gw, "slow") as own, trio.open_nursery() as nursery:
            nursery.start_soon(_get, main, f"{mount}/hold", answers)
            await wait_until(lambda: gw.admission.running == 1, what="the holding handler runs")
            nursery.start_soon(_get, own, "/quick", answers)
            await wait_until(lambda: gw.admission.waiting == 1, what="the plugin listener's request waits its turn")
            slow.release.set()
        assert answers == [200, 200]


async def test_shutdown_with_requests_in_line_ends_within_the_grace(gateway_factory):
    # every place held by a handler that never ends, three requests in line: SIGTERM's path
    slow = _Slow()
    answers: list[int] = []
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):  # the test's own guard; the figure is printed
            async with gateway_factory(plugins=[("slow", slow)],
                                       settings=["http.max_handlers=1", "http.handler_hold_s=3600",
                                                 "gateway.shutdown_grace_s=1.0"]) as gw:
                mount = gw.contexts["slow"].mount
                clients = [httpx.AsyncClient(base_url=gw_url(gw), timeout=60) for _ in range(4)]
                nursery.start_soon(_get, clients[0], f"{mount}/hold", answers)
                await wait_until(lambda: gw.admission.running == 1, what="the stuck handler runs")
                for c in clients[1:]:
                    nursery.start_soon(_get, c, f"{mount}/quick", answers)
                await wait_until(lambda: gw.admission.waiting == 3, what="three requests in line")
                began = trio.current_time()
            took = trio.current_time() - began
        print(f"shutdown with 3 in line took {took:.2f} s (grace 1.0 s)")
        for c in clients:
            await c.aclose()
    assert gw.admission.running == gw.admission.waiting == 0  # nobody left in line, no place kept
    assert answers == [0, 0, 0, 0]  # every connection closed by the shutdown, none answered late


async def test_requests_waiting_on_a_plugins_startup_hold_no_place(tmp_path, monkeypatch):
    starting, resume = Kaiabc.start, trio.Event()
    waiting_on_startup: list[int] = []
    wait_started = Kaiabc.wait_started

    async def slow_start(self: Kaiabc) -> None:  # a startup that takes long (slow storage, the numerics)
        await resume.wait()
        await starting(self)

    async def counted_wait(self: Kaiabc, *args: Any, **kwargs: Any) -> bool:
        waiting_on_startup.append(1)
        return await wait_started(self, *args, **kwargs)

    monkeypatch.setattr(Kaiabc, "start", slow_start)
    monkeypatch.setattr(Kaiabc, "wait_started", counted_wait)
    manager = build_plugin_manager(entry_points=False, plugins=[("kaiabc", gatewayd_kaiabc)])
    config = load_config(None, [f"gateway.data_dir='{tmp_path}'", "gateway.id='review9'", "http.listen='127.0.0.1:0'",
                                "http.access_log=false", "mqtt.broker='off'", "gateway.shutdown_grace_s=1.0",
                                "http.max_handlers=2"], manager.config_schemas())
    gateway = Gateway(config, manager)
    answers: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run)  # it reports started only once the plugins have: not here
        await wait_until(lambda: "main" in gateway.http_urls, what="the gateway serves HTTP")
        async with httpx.AsyncClient(base_url=gateway.http_urls["main"][0], timeout=60) as client:
            async with trio.open_nursery() as devices:
                for _ in range(2):
                    devices.start_soon(_get, client, "/kaiabc/v1/sensors/nodes", answers)
                await wait_until(lambda: len(waiting_on_startup) == 2, what="two requests wait on kaiabc's startup")
                try:
                    assert gateway.admission.running == 0  # they wait on the plugin, not on the CPU
                finally:
                    resume.set()
        gateway.request_shutdown()
    assert answers == [401, 401]  # answered once the plugin started (no device key), not 503


async def test_a_handler_asking_its_own_server_with_one_place_is_answered_after_the_hold():
    # The one place is held by a handler that waits on a request to the same server, which
    # needs a place: no deadlock, that request goes in once the holder's hold_s is up.
    app = LeanQuart("nested")
    port = reserved_port()
    base = f"http://127.0.0.1:{port}"

    @app.get("/quick")
    async def quick() -> str:
        return "quick"

    @app.get("/outer")
    async def outer() -> str:
        async with httpx.AsyncClient(base_url=base, timeout=20) as own:
            return "outer+" + (await own.get("/quick")).text

    admission, stop = Admission(1, hold_s=0.2), trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_app(
            app, Address("127.0.0.1", port), shutdown_trigger=stop.wait, graceful_timeout=1, access_log=False,
            admission=admission, task_status=task_status))
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            assert (await client.get("/outer")).text == "outer+quick"
        stop.set()
    assert admission.stats == {"at_once": 1, "waited": 1, "gave_up": 0, "expired": 1, "aside": 0}
