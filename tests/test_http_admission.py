"""gatewayd.core.admission: at most `max_handlers` request handlers at once, the rest
first come first served; a handler past `handler_hold_s` runs on uncounted. First the
Admission alone on trio's virtual clock, then over real sockets (hypercorn and the lean
app), then the `[http]` keys and the gateway's wiring."""

from __future__ import annotations

import contextvars
import random
import socket
import threading
from typing import Any

import httpx
import pytest
import trio
from quart import Response, request

from gatewayd.core.config import load_config
from gatewayd.core.admission import Admission, Seat, current, step_aside, step_back, waiting_elsewhere
from gatewayd.core.storage import Storage
from gatewayd.core.http.lean import LeanQuart
from gatewayd.core.http.serve import serve_app
from gatewayd.core.schema import Address
from gatewayd.testing import ConfigErrors, gw_client, wait_until
from gatewayd.testing.ports import reserved_port


async def _handler(admission: Admission, log: list[tuple[str, Any, float]], name: Any, *, after: float,
                   runs: float) -> None:
    """A request arriving `after` s that runs `runs` s once admitted (lean.py's use of it)."""
    await trio.sleep(after)
    place = await admission.enter()
    try:
        log.append(("in", name, trio.current_time()))
        await trio.sleep(runs)
    finally:
        admission.leave(place)
        log.append(("out", name, trio.current_time()))


# -- the Admission alone (virtual time) -------------------------------------------------------


async def test_at_most_the_limit_run_and_the_rest_in_the_order_they_came(autojump_clock):
    admission = Admission(2, hold_s=100)
    log: list[tuple[str, Any, float]] = []
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(lambda i=i: _handler(admission, log, i, after=i * 0.01, runs=1.0 + (i % 3) * 0.1))
    assert [name for what, name, _ in log if what == "in"] == list(range(8))
    inside = peak = 0
    for what, _, _ in log:
        inside += 1 if what == "in" else -1
        peak = max(peak, inside)
    assert peak == 2
    assert admission.stats == {"at_once": 2, "waited": 6, "gave_up": 0, "expired": 0, "aside": 0}
    assert admission.running == admission.waiting == 0


async def test_a_handler_past_its_hold_runs_on_and_its_place_goes_to_the_next(autojump_clock):
    admission = Admission(1, hold_s=0.5)
    log: list[tuple[str, Any, float]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _handler(admission, log, "slow", after=0, runs=10))
        nursery.start_soon(lambda: _handler(admission, log, "next", after=0.1, runs=0.3))
        nursery.start_soon(lambda: _handler(admission, log, "third", after=0.2, runs=1))
    at = {(what, name): t for what, name, t in log}
    assert at[("in", "next")] == pytest.approx(0.5)  # the slow one's time was up
    assert at[("in", "third")] == pytest.approx(0.8)  # the next one left within its time
    assert admission.stats["expired"] == 1
    assert admission.running == 0  # the slow one's leaving (after 10 s) gave nothing back twice


async def test_a_held_place_is_taken_back_only_when_someone_waits(autojump_clock):
    admission = Admission(1, hold_s=0.5)
    first = await admission.enter()
    await trio.sleep(5)
    assert admission.running == 1 and admission.stats["expired"] == 0
    second = await admission.enter()  # at once: the first's time was long up
    assert admission.stats == {"at_once": 2, "waited": 0, "gave_up": 0, "expired": 1, "aside": 0}
    admission.leave(first)
    assert admission.running == 1
    admission.leave(second)
    assert admission.running == 0


async def test_a_request_whose_client_left_while_waiting_leaves_the_line(autojump_clock):
    admission = Admission(1, hold_s=100)
    log: list[tuple[str, Any, float]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _handler(admission, log, "holder", after=0, runs=1))
        gone = trio.CancelScope()
        nursery.start_soon(lambda: _cancellable(gone, admission, log, "gone"))
        await trio.sleep(0.1)
        nursery.start_soon(lambda: _handler(admission, log, "after", after=0, runs=1))
        await trio.sleep(0.1)
        assert admission.waiting == 2
        gone.cancel()
        await trio.sleep(0.1)
        assert admission.waiting == 1
    assert [name for what, name, _ in log if what == "in"] == ["holder", "after"]
    assert admission.stats == {"at_once": 1, "waited": 1, "gave_up": 1, "expired": 0, "aside": 0}


async def _cancellable(scope: trio.CancelScope, admission: Admission, log: list, name: str) -> None:
    with scope:
        await _handler(admission, log, name, after=0.05, runs=1)  # after the holder


async def test_when_the_first_in_line_leaves_the_next_keeps_the_clock(autojump_clock):
    # Only the first waiting request sleeps until the oldest place's time is up; when it
    # leaves the line, the next must take that over, or a stuck handler would stop everyone.
    admission = Admission(1, hold_s=1.0)
    log: list[tuple[str, Any, float]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _handler(admission, log, "stuck", after=0, runs=1000))
        gone = trio.CancelScope()
        nursery.start_soon(lambda: _cancellable(gone, admission, log, "first"))
        await trio.sleep(0.1)
        nursery.start_soon(lambda: _handler(admission, log, "second", after=0, runs=1))
        await trio.sleep(0.1)
        gone.cancel()
    at = {(what, name): t for what, name, t in log}
    assert ("in", "first") not in at
    assert at[("in", "second")] == pytest.approx(1.0)


async def test_a_place_given_to_a_request_cancelled_before_it_ran_goes_on(autojump_clock):
    admission = Admission(1, hold_s=100)
    holder = await admission.enter()
    entered: dict[str, float] = {}
    done: list[str] = []

    async def lean_like(name: str, scope: trio.CancelScope) -> None:
        with scope:
            place = await admission.enter()  # a place given is returned (no checkpoint after)
            try:
                entered[name] = trio.current_time()
                await trio.sleep(1)  # the cancelled one ends here, at its first checkpoint
                done.append(name)
            finally:
                admission.leave(place)

    async with trio.open_nursery() as nursery:
        doomed, kept = trio.CancelScope(), trio.CancelScope()
        nursery.start_soon(lean_like, "doomed", doomed)
        await trio.sleep(0.1)
        nursery.start_soon(lean_like, "kept", kept)
        await trio.sleep(0.1)
        admission.leave(holder)  # the place goes to "doomed", which is cancelled before it runs
        doomed.cancel()
    assert done == ["kept"]
    assert entered["kept"] == pytest.approx(0.2)  # when "doomed" gave its place on, not 1 s later
    assert admission.running == admission.waiting == 0


@pytest.mark.parametrize("seed", range(20))
async def test_random_arrivals_leavings_and_overruns_keep_order_and_the_limit(autojump_clock, seed):
    rng = random.Random(seed)
    limit = rng.randint(1, 4)
    admission = Admission(limit, hold_s=0.5)
    admitted: list[int] = []
    counted: dict[int, bool] = {}
    scopes: dict[int, trio.CancelScope] = {}

    async def one(i: int, runs: float) -> None:
        with scopes[i]:
            place = await admission.enter()
            admitted.append(i)
            counted[i] = True
            assert sum(1 for p in admission._running if not p.expired) <= limit
            try:
                await trio.sleep(runs)
            finally:
                admission.leave(place)

    n = 60
    async with trio.open_nursery() as nursery:
        for i in range(n):
            scopes[i] = trio.CancelScope()
            nursery.start_soon(one, i, rng.choice([0.05, 0.2, 0.3, 2.0]))
            await trio.sleep(rng.random() * 0.1)
            if rng.random() < 0.15:
                scopes[rng.randrange(i + 1)].cancel()
    gave_up = [i for i in range(n) if i not in counted]
    assert admitted == sorted(admitted)  # first come first served
    s = admission.stats
    assert s["at_once"] + s["waited"] == len(admitted) and s["gave_up"] == len(gave_up)
    assert admission.running == admission.waiting == 0


def test_an_admission_needs_a_limit_and_a_hold():
    with pytest.raises(ValueError):
        Admission(0, 1.0)
    with pytest.raises(ValueError):
        Admission(1, float("nan"))


# -- over real sockets ------------------------------------------------------------------------


def _app(release: trio.Event) -> LeanQuart:
    app = LeanQuart("admission")

    @app.get("/hold")
    async def hold() -> str:
        await release.wait()
        return "held"

    @app.get("/quick")
    async def quick() -> str:
        return "quick"

    @app.post("/echo")
    async def echo() -> Any:
        return Response(await request.get_data(), content_type="application/octet-stream")

    @app.get("/stream")
    async def stream() -> Any:
        async def lines() -> Any:
            while True:
                yield b"data: tick\n\n"
                await trio.sleep(0.05)

        response = Response(lines(), content_type="text/event-stream")
        response.timeout = None  # a live stream lasts (as the core's SSE routes)
        return response

    return app


async def _serving(nursery: trio.Nursery, app: LeanQuart, admission: Admission, stop: trio.Event) -> str:
    port = reserved_port()
    await nursery.start(lambda task_status: serve_app(
        app, Address("127.0.0.1", port), shutdown_trigger=stop.wait, graceful_timeout=1, access_log=False,
        admission=admission, task_status=task_status))
    return f"http://127.0.0.1:{port}"


async def test_a_request_waits_while_the_places_are_taken_and_is_answered_after():
    release, stop = trio.Event(), trio.Event()
    admission = Admission(1, hold_s=3600)
    answers: list[str] = []
    async with trio.open_nursery() as nursery:
        base = await _serving(nursery, _app(release), admission, stop)
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:

            async def get(path: str) -> None:
                answers.append((await client.get(path)).text)

            async with trio.open_nursery() as requests:
                requests.start_soon(get, "/hold")
                await wait_until(lambda: admission.running == 1, what="the holding handler runs")
                requests.start_soon(get, "/quick")
                await wait_until(lambda: admission.waiting == 1, what="the quick request waits its turn")
                assert answers == []
                release.set()
        stop.set()
    assert answers == ["held", "quick"]
    assert admission.stats == {"at_once": 1, "waited": 1, "gave_up": 0, "expired": 0, "aside": 0}


async def test_a_client_that_leaves_while_waiting_is_taken_out_of_the_line():
    release, stop = trio.Event(), trio.Event()
    admission = Admission(1, hold_s=3600)
    async with trio.open_nursery() as nursery:
        base = await _serving(nursery, _app(release), admission, stop)
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            async with trio.open_nursery() as requests:
                requests.start_soon(client.get, "/hold")
                await wait_until(lambda: admission.running == 1, what="the holding handler runs")
                leaving = trio.CancelScope()
                requests.start_soon(_get_in, leaving, base, "/quick")
                await wait_until(lambda: admission.waiting == 1, what="the quick request waits")
                leaving.cancel()
                await wait_until(lambda: admission.waiting == 0, what="the leaver is out of the line")
                assert admission.stats["gave_up"] == 1
                release.set()
            assert (await client.get("/quick")).text == "quick"
        stop.set()


async def _get_in(scope: trio.CancelScope, base: str, path: str) -> None:
    with scope:
        async with httpx.AsyncClient(base_url=base, timeout=20) as own:  # its own connection, closed on leaving
            await own.get(path)


async def test_a_stuck_handler_holds_its_place_only_for_the_hold_time():
    release, stop = trio.Event(), trio.Event()
    admission = Admission(1, hold_s=0.2)
    async with trio.open_nursery() as nursery:
        base = await _serving(nursery, _app(release), admission, stop)
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            async with trio.open_nursery() as requests:
                requests.start_soon(client.get, "/hold")
                await wait_until(lambda: admission.running == 1, what="the stuck handler runs")
                assert (await client.get("/quick")).text == "quick"
                assert admission.stats["expired"] == 1
                release.set()
        stop.set()


async def test_a_live_stream_holds_no_place_while_it_lasts():
    release, stop = trio.Event(), trio.Event()
    admission = Admission(1, hold_s=3600)
    async with trio.open_nursery() as nursery:
        base = await _serving(nursery, _app(release), admission, stop)
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            async with client.stream("GET", "/stream") as stream:
                lines = stream.aiter_lines()
                assert await lines.__anext__() == "data: tick"
                assert admission.running == 0
                assert (await client.get("/quick")).text == "quick"
                assert admission.stats["waited"] == 0
        stop.set()


async def test_a_body_still_coming_is_not_held_up_by_full_places():
    # Only a request whose body is in waits for a place (its handler would only wait on its
    # client otherwise): an upload sent slowly is answered while every place is taken.
    release, stop = trio.Event(), trio.Event()
    admission = Admission(1, hold_s=3600)
    async with trio.open_nursery() as nursery:
        base = await _serving(nursery, _app(release), admission, stop)
        port = int(base.rsplit(":", 1)[1])
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            async with trio.open_nursery() as requests:
                requests.start_soon(client.get, "/hold")
                await wait_until(lambda: admission.running == 1, what="the holding handler runs")
                answer = await trio.to_thread.run_sync(_slow_upload, port)
                assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"0123456789")
                assert admission.stats["waited"] == 0 and admission.running == 1
                release.set()
        stop.set()


def _slow_upload(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n01234")
        import time
        time.sleep(0.3)  # the head and half the body first: the handler starts before the rest
        s.sendall(b"56789")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    return answer


async def test_a_wait_elsewhere_gives_the_place_on_and_takes_one_again_before_new_requests(autojump_clock):
    admission = Admission(1, hold_s=100)
    order: list[str] = []
    step_aside()  # outside a handler: nothing
    await step_back()

    async def handler(name: str, wait: trio.Event | None = None) -> None:
        seat = Seat(admission, await admission.enter(), trio.lowlevel.current_task())
        held = current.set(seat)
        try:
            order.append(f"{name} in")
            if wait is not None:
                # a thread sees the context (as trio.to_thread's do): it cannot touch trio. Joined
                # here, not awaited: the virtual clock would jump while the thread runs
                thread = threading.Thread(target=contextvars.copy_context().run, args=(step_aside,))
                thread.start()
                thread.join()
                assert seat.place is not None
                async with waiting_elsewhere():
                    assert seat.place is None and admission.running == 0  # free for the next one
                    await wait.wait()
                order.append(f"{name} back")
            await trio.sleep(1)
        finally:
            current.reset(held)
            seat.leave()
            order.append(f"{name} out")

    device = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler, "slow", device)
        await trio.sleep(0.1)
        nursery.start_soon(handler, "second")
        await trio.sleep(0.1)
        nursery.start_soon(handler, "third")  # waits: "second" has the place
        await trio.sleep(0.1)
        device.set()  # "slow" is back, and goes before "third"
    assert order == ["slow in", "second in", "second out", "slow back", "slow out", "third in", "third out"]
    assert admission.stats == {"at_once": 2, "waited": 1, "gave_up": 0, "expired": 0, "aside": 1}
    assert admission.running == admission.waiting == 0


async def _async_step_aside() -> None:
    step_aside()


async def test_only_the_handlers_own_task_and_a_place_it_holds_step_aside(autojump_clock):
    admission = Admission(1, hold_s=0.5)
    seat = Seat(admission, await admission.enter(), trio.lowlevel.current_task())
    held = current.set(seat)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_async_step_aside)  # a task the handler started: not the handler
        assert seat.place is not None and admission.stats["aside"] == 0
        await trio.sleep(1)
        other = await admission.enter()  # the handler overran: its place went on to this one
        step_aside()  # it has none to give: it runs on uncounted and does not come back in line
        await step_back()
        assert seat.place is None and admission.running == 1 and admission.stats["aside"] == 0
        admission.leave(other)
    finally:
        current.reset(held)
        seat.leave()
    assert admission.running == 0


@pytest.mark.parametrize("kind", ["write", "read"])
async def test_a_handler_waiting_on_the_database_gives_its_place_to_the_next_request(tmp_path, kind):
    storage = Storage(tmp_path / "gatewayd.sqlite3")
    writer_busy, release, stop = threading.Event(), trio.Event(), trio.Event()
    app = _app(release)

    @app.get("/database")
    async def database() -> str:
        await getattr(storage, kind)(writer_busy.wait, 20)  # the writer (or a reader) held up
        return "done"

    admission = Admission(1, hold_s=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        base = await _serving(nursery, app, admission, stop)
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            async with trio.open_nursery() as requests:
                requests.start_soon(client.get, "/database")
                await wait_until(lambda: admission.stats["aside"] == 1, what="the handler waits on the database")
                # with its one place held for an hour, this would wait that long
                assert (await client.get("/quick")).text == "quick"
                writer_busy.set()
            assert admission.stats == {"at_once": 2, "waited": 0, "gave_up": 0, "expired": 0, "aside": 1}
            assert admission.running == 0  # the handler took a place again after its wait, and left it
        stop.set()
        nursery.cancel_scope.cancel()


# -- the [http] keys and the gateway's wiring ----------------------------------------------------


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as e:
        load_config(None, [], {}, text=text)
    return [str(x) for x in e.value.errors]


def test_the_keys_default_to_32_handlers_held_half_a_second_and_are_checked():
    http = load_config(None, [], {}, text="").http
    assert (http.max_handlers, http.handler_hold_s) == (32, 0.5)
    http = load_config(None, [], {}, text="[http]\nmax_handlers = 0\nhandler_hold_s = 2\n").http
    assert (http.max_handlers, http.handler_hold_s) == (0, 2)
    assert _errors("[http]\nmax_handlers = -1\n") == [
        "http.max_handlers: must be 0 (no limit) .. 100000 handlers, got -1"]
    assert _errors("[http]\nmax_handlers = 'many'\n") == [
        "http.max_handlers: expected an integer, got 'many' (string)"]
    assert _errors("[http]\nhandler_hold_s = 0\n") == ["http.handler_hold_s: must be 0.001 .. 3600 seconds, got 0.0"]
    assert _errors("[http]\nhandler_hold_s = nan\n") == [
        "http.handler_hold_s: expected a finite number, got nan"]


async def test_the_gateway_admits_with_its_config_and_counts_in_its_metrics(gateway_factory):
    async with gateway_factory(settings=["http.max_handlers=3", "http.handler_hold_s=1.5"]) as gw:
        assert gw.app.admission is gw.admission
        assert (gw.admission.limit, gw.admission.hold_s) == (3, 1.5)
        async with gw_client(gw) as client:
            for _ in range(3):
                assert (await client.get("/health")).status_code == 200
            metrics = (await client.get("/metrics")).text
    assert 'gatewayd_http_handlers{state="waiting"} 0' in metrics
    # /metrics itself is running as it reports; the three /health before it were let in at once
    assert 'gatewayd_http_handlers{state="running"} 1' in metrics
    assert 'gatewayd_http_admission_total{outcome="at_once"} 4' in metrics
    assert 'gatewayd_http_admission_total{outcome="waited"} 0' in metrics
    assert 'gatewayd_http_places_given_back_total{why="overran"} 0' in metrics


async def test_no_limit_when_max_handlers_is_0(gateway_factory):
    async with gateway_factory(settings=["http.max_handlers=0"]) as gw:
        assert gw.admission is None and gw.app.admission is None
        async with gw_client(gw) as client:
            assert (await client.get("/health")).status_code == 200
            assert "gatewayd_http_handlers" not in (await client.get("/metrics")).text
