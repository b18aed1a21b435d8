"""The live-event hub, and its WebSocket and SSE endpoints on a real gateway."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from quart import Blueprint, Response, request, websocket
from trio_websocket import ConnectionClosed, open_websocket_url

from gatewayd.core.live.hub import FamilyLive, Gap, LiveHub, LiveLimit, matches, overlaps, validate_pattern
from gatewayd.plugins.api import LiveDenied, hookimpl
from gatewayd.testing import gw_client, gw_url, wait_until

TOKEN = "live-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


# -- the hub -------------------------------------------------------------------------


def test_patterns():
    assert matches("paku.#", "paku.telemetry.pk-1") and matches("paku.*.pk-1", "paku.state.pk-1")
    assert matches("*.*.pk-1", "kaiabc.oscillator.pk-1") and not matches("paku.*", "paku.telemetry.pk-1")
    assert not matches("paku.telemetry.pk-1", "paku.telemetry.pk-10") and matches("#", "a.b")
    for bad in ("", "a..b", "a.#.b", "a*.b", "x" * 300):
        with pytest.raises(ValueError):
            validate_pattern(bad)


async def test_a_slow_subscriber_loses_its_oldest_events_and_sees_a_gap():
    hub = LiveHub(queue_size=16)
    slow = hub.subscribe(["paku.#"], owner="a")
    other = hub.subscribe(["kaiabc.#"], owner="b")
    for i in range(100):  # never waits, however far behind the subscriber is
        hub.publish("paku.telemetry.pk-1", {"i": i})
    batch = await slow.next()
    assert batch[0] == Gap(84) and [e.data["i"] for e in batch[1:]] == list(range(84, 100))
    assert hub.stats["dropped"] == 84 and hub.stats["published"] == 100
    with trio.move_on_after(0.01):
        await other.next()
        pytest.fail("a subscriber got events of a stream it did not ask for")


async def test_limits_per_owner_and_in_all():
    hub = LiveHub(per_owner=2, max_subscribers=3)
    hub.subscribe(["a.#"], owner="x")
    hub.subscribe(["a.#"], owner="x")
    with pytest.raises(LiveLimit, match="2 live connections"):
        hub.subscribe(["a.#"], owner="x")
    last = hub.subscribe(["a.#"], owner="y")
    with pytest.raises(LiveLimit, match="3 live subscribers"):
        hub.subscribe(["a.#"], owner="z")
    last.close()
    hub.subscribe(["a.#"], owner="z")  # a closed one frees its place
    assert hub.stats["refused"] == 2


async def test_resumption_from_the_ring_and_a_gap_when_it_moved_on():
    hub = LiveHub(ring_size=5)
    for i in range(8):
        hub.publish("a.b.c", {"i": i})  # ids 1..8; the ring keeps 4..8
    sub = hub.subscribe(["a.#"], owner="x", last_id=5)
    assert [e.id for e in await sub.next()] == [6, 7, 8]
    late = hub.subscribe(["a.#"], owner="y", last_id=1)
    batch = await late.next()
    assert batch[0] == Gap(2) and [e.id for e in batch[1:]] == [4, 5, 6, 7, 8]


async def test_events_are_strict_json_and_bounded_in_size():
    hub = LiveHub(max_event_bytes=100)
    with pytest.raises(ValueError):
        hub.publish("a.b.c", {"v": float("nan")})
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        hub.publish("a.b.c", {"v": "x" * 200})
    event = hub.publish("a.b.c", {"v": 1})
    assert json.loads(event.json()) == {"id": 1, "stream": "a.b.c", "ts": event.ts, "data": {"v": 1}}
    assert hub.stats["published"] == 1


async def test_close_ends_every_subscription():
    hub = LiveHub()
    sub = hub.subscribe(["#"], owner="x")
    hub.close()
    assert await sub.next() == [] and hub.subscribers == 0
    with pytest.raises(LiveLimit, match="shutting down"):
        hub.subscribe(["#"], owner="x")


async def test_subscribers_of_the_same_patterns_share_one_encoded_batch(autojump_clock):
    hub = LiveHub(batch_s=0.02)
    subs = [hub.subscribe(["paku.#"], owner=str(i)) for i in range(5)]
    calls: list[list[int]] = []

    def encode(batch):
        calls.append([e.id for e in batch])
        return "[" + ",".join(e.json() for e in batch) + "]"

    for i in range(3):
        hub.publish("paku.telemetry.pk-1", {"i": i})
    frames = [await sub.next_encoded(encode) for sub in subs[:3]]
    hub.publish("paku.telemetry.pk-1", {"i": 3})  # after the cut: in the next batch, for all
    frames += [await sub.next_encoded(encode) for sub in subs[3:]]
    assert all(f is frames[0] for f in frames) and calls == [[1, 2, 3]]  # encoded once for five
    assert [e["data"]["i"] for e in json.loads(frames[0])] == [0, 1, 2]
    before = trio.current_time()
    again = [await sub.next_encoded(encode) for sub in subs]
    assert trio.current_time() - before >= 0.02  # the next cut waits out batch_s
    assert all(f is again[0] for f in again) and calls[1:] == [[4]]
    assert len(hub._channels) == 1 and hub.stats["delivered"] == 20


async def test_many_subscribers_are_written_to_less_often_within_the_write_budget(autojump_clock):
    hub = LiveHub(batch_s=0.02, writes_per_s=500)
    subs = [hub.subscribe(["a.#"], owner=str(i)) for i in range(100)]
    assert hub.cut_every_s == pytest.approx(0.2)  # 100 subscribers, 500 writes/s: a batch each 200 ms
    hub.publish("a.b.c", {})
    for sub in subs:
        await sub.next()
    hub.publish("a.b.c", {})
    before = trio.current_time()
    await subs[0].next()
    assert trio.current_time() - before == pytest.approx(0.2, abs=0.001)
    for sub in subs[10:]:
        sub.close()
    assert hub.cut_every_s == 0.02  # 10 subscribers: batch_s


async def test_a_cut_wakes_each_reader_once(autojump_clock):
    """Readers waiting for a batch wake once per cut, on the cut (one timer for the hub), not
    on the first event and again on a timer of their own: with 100 subscribers those wake-ups
    were most of the fan-out's CPU (bench/live_bench.py)."""
    hub = LiveHub(batch_s=0.02, writes_per_s=500)
    got = [0] * 100
    steps: dict[object, int] = {}

    class CountSteps(trio.abc.Instrument):
        def before_task_step(self, task: object) -> None:
            steps[task] = steps.get(task, 0) + 1

    async def reader(i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with hub.subscribe(["a.#"], owner=str(i)) as sub:
            task_status.started(trio.lowlevel.current_task())
            while batch := await sub.next():
                got[i] += len(batch)

    async with trio.open_nursery() as nursery:
        tasks = [await nursery.start(reader, i) for i in range(100)]
        hub.publish("a.b.c", {})
        await trio.sleep(1)
        assert got == [1] * 100
        trio.lowlevel.add_instrument(counter := CountSteps())
        for _ in range(10):  # the first after a quiet spell is cut at once, the nine others 200 ms later
            hub.publish("a.b.c", {})
            await trio.sleep(0.01)
        await trio.sleep(1)
        trio.lowlevel.remove_instrument(counter)
        assert got == [11] * 100
        assert [steps.get(task, 0) for task in tasks] == [2] * 100  # two cuts: two wake-ups each
        hub.close()


async def test_an_event_after_a_quiet_spell_reaches_a_waiting_reader_in_the_next_round(autojump_clock):
    """Not a round later through the hub's timer task: a dashboard watching a quiet stream
    sees each event at once."""
    hub = LiveHub(batch_s=0.02)
    trail: list[str] = []
    got: list[int] = []

    class Trail(trio.abc.Instrument):
        def before_io_wait(self, timeout: float) -> None:
            trail.append("round")

        def before_task_step(self, task: object) -> None:
            if task is reader_task:
                trail.append("reader")

    async def reader(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with hub.subscribe(["a.#"], owner="x") as sub:
            task_status.started(trio.lowlevel.current_task())
            while batch := await sub.next():
                got.extend(e.id for e in batch)

    async with trio.open_nursery() as nursery:
        reader_task = await nursery.start(reader)
        for i in range(3):
            await trio.sleep(1)  # quiet
            trio.lowlevel.add_instrument(instrument := Trail())
            hub.publish("a.b.c", {})
            await trio.sleep(0.5)
            trio.lowlevel.remove_instrument(instrument)
            assert got == list(range(1, i + 2))
            assert trail[:2] == ["round", "reader"], trail
            trail.clear()
        hub.close()


async def test_few_subscribers_run_in_the_round_their_cut_falls_due(autojump_clock):
    """With few subscribers (the write budget does not bind) each reader keeps a timer for its
    cut: it runs in the round the cut falls due, not a round after the hub's timer task (under
    load a round is long: the p99 latency at 10 subscribers)."""
    hub = LiveHub(batch_s=0.02)
    trail: list[object] = []
    got: list[int] = []

    class Trail(trio.abc.Instrument):
        def after_io_wait(self, timeout: float) -> None:
            trail.append(trio.current_time())

        def before_task_step(self, task: object) -> None:
            if task is reader_task:
                trail.append("reader")

    async def reader(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with hub.subscribe(["a.#"], owner="x") as sub:
            task_status.started(trio.lowlevel.current_task())
            while batch := await sub.next():
                got.extend(e.id for e in batch)

    async with trio.open_nursery() as nursery:
        reader_task = await nursery.start(reader)
        hub.publish("a.b.c", {})  # cut at once (quiet before)
        await trio.sleep(0.005)
        assert got == [1]
        due = hub._channels[frozenset({"a.#"})].cut_at + 0.02
        trio.lowlevel.add_instrument(instrument := Trail())
        hub.publish("a.b.c", {})  # the next cut is due 20 ms after the first
        await trio.sleep(0.1)
        trio.lowlevel.remove_instrument(instrument)
        assert got == [1, 2]
        first = next(i for i, x in enumerate(trail) if x != "reader" and x >= due)
        assert trail[first + 1] == "reader", trail
        hub.close()


async def test_a_lagging_reader_gets_its_own_batch_then_shares_again(autojump_clock):
    hub = LiveHub(batch_s=0.02, queue_size=16)
    fast, slow = hub.subscribe(["a.#"], owner="x"), hub.subscribe(["a.#"], owner="y")
    hub.publish("a.b.c", {"i": 0})
    assert [e.id for e in await fast.next()] == [1]
    for i in range(1, 4):
        hub.publish("a.b.c", {"i": i})
    assert [e.id for e in await fast.next()] == [2, 3, 4]
    assert [e.id for e in await slow.next()] == [1, 2, 3, 4]  # from its own cursor, nothing lost
    for i in range(40):  # slow reads nothing meanwhile: past the ring's 16, it sees a gap
        hub.publish("a.b.c", {"i": i})
        assert (await fast.next())[-1].id == 5 + i
    assert await slow.next_encoded(list) == [Gap(24)] + [e for e in hub._ring][-16:]
    assert hub.stats["dropped"] == 24 and hub.stats["gaps"] == 1
    hub.publish("a.b.c", {"i": 99})
    assert await fast.next_encoded(list) is await slow.next_encoded(list)  # in step again


def _ids(batch):
    """A batch as a test's `encode` makes it: event ids, and ("gap", n) for a gap."""
    return tuple(("gap", item.dropped) if isinstance(item, Gap) else item.id for item in batch)


async def test_with_many_subscribers_the_hub_writes_each_cut_itself_and_readers_sleep_on(autojump_clock):
    """Where the write budget binds, a reader that passes `direct` is not woken per batch: the
    hub hands each cut, encoded once, to every reader's `direct` from its own task, in order."""
    hub = LiveHub(batch_s=0.02, writes_per_s=500)  # 20 subscribers: a cut every 40 ms, not 20
    n = 20
    written: list[list[object]] = [[] for _ in range(n)]
    encodes: list[int] = []
    returned: list[object] = []
    steps: dict[object, int] = {}

    def encode(batch):
        encodes.append(len(batch))
        return _ids(batch)

    class CountSteps(trio.abc.Instrument):
        def before_task_step(self, task: object) -> None:
            steps[task] = steps.get(task, 0) + 1

    async def reader(i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        def direct(encoded):
            assert trio.lowlevel.current_task() is not me  # the hub's, not this reader's
            written[i].extend(encoded)
            return True

        with hub.subscribe(["a.#"], owner=str(i)) as sub:
            me = trio.lowlevel.current_task()
            task_status.started(me)
            while (got := await sub.next_encoded(encode, direct=direct)) is not None:
                returned.append(got)

    async with trio.open_nursery() as nursery:
        tasks = [await nursery.start(reader, i) for i in range(n)]
        await trio.sleep(1)
        assert hub.cut_every_s > hub.batch_s
        trio.lowlevel.add_instrument(counter := CountSteps())
        for _ in range(100):
            hub.publish("a.b.c", {})
            await trio.sleep(0.003)
        await trio.sleep(1)
        trio.lowlevel.remove_instrument(counter)
        assert written == [list(range(1, 101))] * n and returned == []
        assert [steps.get(task, 0) for task in tasks] == [0] * n  # not one wake-up
        assert sum(encodes) == 100 and len(encodes) < 20  # each cut encoded once, for all
        assert all(sub.written_at > 0 for sub in hub._subs)
        hub.close()
    assert hub.subscribers == 0


async def test_a_batch_the_hub_cannot_write_or_finish_goes_to_the_readers_own_task(autojump_clock):
    """`direct` refused (False): next_encoded returns the batch; begun (a function): the reader's
    task awaits it and sleeps on; behind the ring: the reader's own batch, a gap first."""
    hub = LiveHub(batch_s=0.02, writes_per_s=500, queue_size=16)
    others = [hub.subscribe(["a.#"], owner=str(i)) for i in range(20)]  # the budget binds
    mode = ["whole"]
    written: list[object] = []
    finished_by: list[object] = []
    returned: list[object] = []

    def direct(encoded):
        if mode[0] == "refuse":
            return False
        if mode[0] == "begin":
            async def finish() -> None:
                finished_by.append(trio.lowlevel.current_task())
                await trio.sleep(0.001)
                written.extend(encoded)
            return finish
        written.extend(encoded)
        return True

    async def reader(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with hub.subscribe(["a.#"], owner="me") as sub:
            task_status.started(trio.lowlevel.current_task())
            while (got := await sub.next_encoded(_ids, direct=direct)) is not None:
                returned.append(got)
                written.extend(got)

    async with trio.open_nursery() as nursery:
        me = await nursery.start(reader)
        for step in ("whole", "begin", "refuse", "whole"):
            mode[0] = step
            hub.publish("a.b.c", {})
            await trio.sleep(0.5)
        assert written == [1, 2, 3, 4] and finished_by == [me] and returned == [(3,)]
        for _ in range(40):  # past the ring's 16 before the next cut: the reader is woken for its gap
            hub.publish("a.b.c", {})
        await trio.sleep(0.5)
        assert returned[1] == (("gap", 24), *range(29, 45))
        hub.publish("a.b.c", {})
        await trio.sleep(0.5)
        assert written[-1] == 45 and len(returned) == 2  # straight again
        hub.close()
    for sub in others:
        assert sub.closed


async def test_the_rest_of_a_write_begun_for_a_reader_is_sent_though_it_is_cancelled(autojump_clock):
    hub = LiveHub(batch_s=0.02, writes_per_s=500)
    others = [hub.subscribe(["a.#"], owner=str(i)) for i in range(20)]
    sent: list[object] = []

    async def reader(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with hub.subscribe(["a.#"], owner="me") as sub:
            with trio.CancelScope() as scope:
                def direct(encoded):
                    scope.cancel()  # e.g. the connection's nursery ends meanwhile

                    async def finish() -> None:
                        await trio.sleep(0.01)
                        sent.extend(encoded)
                    return finish

                task_status.started()
                await sub.next_encoded(_ids, direct=direct)
            assert scope.cancelled_caught

    async with trio.open_nursery() as nursery:
        await nursery.start(reader)
        hub.publish("a.b.c", {})
        await trio.sleep(1)
    assert sent == [1] and hub.subscribers == len(others)


async def test_a_heartbeat_is_due_after_nothing_went_out_for_heartbeat_s(autojump_clock):
    """Nor while the hub writes to the connection itself (`written_at`): its task keeps no
    timer per batch, and looks once per heartbeat_s."""
    from gatewayd.core.live.http import _Heartbeat

    hub = LiveHub()
    sub = hub.subscribe(["a.#"], owner="x")
    beat = _Heartbeat(sub, 15)
    await trio.sleep_until(beat.due)
    assert beat.idle() and beat.due == trio.current_time() + 15  # nothing for 15 s: one now
    await trio.sleep(10)
    sub.written_at = trio.current_time()  # the hub wrote a batch
    await trio.sleep_until(beat.due)
    assert not beat.idle() and beat.due == sub.written_at + 15
    await trio.sleep_until(beat.due)
    assert beat.idle()
    beat.sent()  # its own task sent a batch
    assert beat.due == trio.current_time() + 15


async def test_idle_connections_get_heartbeats(gateway_factory):
    async with gateway_factory(settings=["live.heartbeat_s=1"]) as gw, gw_client(gw) as client:
        url = gw_url(gw).replace("http://", "ws://") + "/api/gateway/live?streams=paku.%23"
        async with open_websocket_url(url, extra_headers=[("Authorization", f"Bearer {TOKEN}")]) as ws, \
                client.stream("GET", "/api/gateway/live/events", params={"streams": "paku.#"}, headers=ADMIN) as r:
            with trio.fail_after(30):
                assert "heartbeat" in json.loads(await ws.get_message())
                async for line in r.aiter_lines():
                    if line == ": heartbeat":
                        break


async def test_changing_patterns_keeps_what_was_not_read_yet():
    hub = LiveHub()
    sub = hub.subscribe(["a.#"], owner="x")
    other = hub.subscribe(["a.#"], owner="y")
    hub.publish("a.b.c", {"i": 1})
    sub.add(["b.#"])  # another channel now; the unread event comes first
    hub.publish("b.x.y", {"i": 2})
    hub.publish("c.x.y", {"i": 3})
    assert [e.data["i"] for e in await sub.next()] == [1, 2]
    sub.remove(["a.#", "b.#"])
    hub.publish("a.b.c", {"i": 4})
    assert [e.data["i"] for e in await other.next()] == [1, 4]
    with trio.move_on_after(0.05):
        await sub.next()
        pytest.fail("a subscriber with no patterns got an event")
    sub.close()
    other.close()
    assert hub._channels == {} and hub.subscribers == 0  # nothing held for nobody


async def test_a_subscriber_that_goes_without_reading_counts_what_it_lost():
    hub = LiveHub(queue_size=16)
    sub = hub.subscribe(["a.#"], owner="x")
    for i in range(20):
        hub.publish("a.b.c", {"i": i})
    sub.close()
    assert hub.stats["dropped"] == 4


def test_has_subscribers_names_what_is_watched():
    hub = LiveHub()
    assert not hub.has_subscribers("kaiabc.#")
    sub = hub.subscribe(["kaiabc.phase_shift_complete.*"], owner="x")
    assert hub.has_subscribers("kaiabc.#") and hub.has_subscribers("kaiabc.phase_shift_complete.n1")
    assert not hub.has_subscribers("kaiabc.oscillator_state.*") and not hub.has_subscribers("paku.#")
    sub.add(["*.*.n7"])
    assert hub.has_subscribers("kaiabc.oscillator_state.n7") and not hub.has_subscribers("kaiabc.oscillator_state.n8")
    sub.close()
    assert not hub.has_subscribers("kaiabc.#")
    with pytest.raises(ValueError):
        hub.has_subscribers("a..b")
    assert overlaps("a.#", "a") and overlaps("*.b.c", "a.*.c") and not overlaps("a.b", "a.b.c")
    family = FamilyLive(hub, "kaiabc", access=None)  # type: ignore[arg-type]  (ctx.live, as a plugin sees it)
    with hub.subscribe(["kaiabc.oscillator_state.pico_1"], owner="x"):
        assert family.has_subscribers() and family.has_subscribers("oscillator_state")
        assert family.has_subscribers("oscillator_state", "pico_1") and not family.has_subscribers("output_pwm")
    assert not family.has_subscribers()


async def test_readers_that_keep_up_lose_nothing_however_publishes_interleave(autojump_clock):
    """No wake-up lost, no batch dropped: bursts of up to 16 events every few ms (at most 64
    between two cuts of 20 ms, under the 256 a ring holds): every reader gets every event of
    its streams, once, in order, and never a gap."""
    import random

    rand = random.Random(16)
    hub = LiveHub(batch_s=0.02)
    got: dict[str, list[int]] = {}

    async def reader(name: str, patterns: list[str], encoded: bool) -> None:
        with hub.subscribe(patterns, owner=name) as sub:
            got[name] = []
            while True:
                batch = await (sub.next_encoded(list) if encoded else sub.next())
                if not batch:
                    return
                got[name] += [-1 if isinstance(e, Gap) else e.id for e in batch]
                await trio.sleep(rand.random() * 0.01)  # a send of its own, as long as it takes

    published: dict[str, list[int]] = {"a": [], "b": []}
    async with trio.open_nursery() as nursery:
        for name, patterns, encoded in (("a1", ["a.#"], True), ("a2", ["a.#"], True), ("a3", ["a.#"], False),
                                        ("b1", ["b.*.*"], True), ("ab", ["a.#", "b.#"], False)):
            nursery.start_soon(reader, name, patterns, encoded)
        await trio.sleep(0.001)
        for _ in range(400):
            for _ in range(rand.randint(1, 16)):
                family = rand.choice("ab")
                published[family].append(hub.publish(f"{family}.x.d{rand.randint(1, 3)}", {}).id)
            await trio.sleep(rand.random() * 0.01)
        await trio.sleep(0.1)
        hub.close()
    assert len(published["a"]) > 1000 and len(published["b"]) > 1000
    assert got["a1"] == got["a2"] == got["a3"] == published["a"] and got["b1"] == published["b"]
    assert got["ab"] == sorted(published["a"] + published["b"])
    assert hub.stats["dropped"] == 0 and hub.stats["gaps"] == 0


async def test_a_reader_that_spends_a_round_per_event_falls_behind_a_busy_publisher():
    """Why a subscriber that sends one frame per event (thingsnxt's WebSocket shape) can see
    gaps on a busy gateway though its client reads at once: each send is a scheduler round,
    in which the request handlers publish several events. By design (ingest never waits):
    the bound is live.queue_size events of lag; one frame per batch keeps up."""
    hub = LiveHub(queue_size=256)
    counts = {"per_batch": 0, "per_event": 0}
    gaps = dict.fromkeys(counts, 0)

    async def reader(name: str) -> None:
        with hub.subscribe(["a.#"], owner=name) as sub:
            while batch := await sub.next():
                for item in batch:
                    if isinstance(item, Gap):
                        gaps[name] += 1
                    else:
                        counts[name] += 1
                    if name == "per_event":
                        await trio.lowlevel.checkpoint()  # a frame of its own
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "per_batch")
        nursery.start_soon(reader, "per_event")
        await trio.sleep(0.01)
        for _ in range(500):  # 4 handlers each publish one event per round
            for _ in range(4):
                hub.publish("a.b.c", {})
            await trio.lowlevel.checkpoint()
        await trio.sleep(0.01)
        hub.close()
    assert counts["per_batch"] == 2000 and gaps["per_batch"] == 0
    assert gaps["per_event"] > 0 and counts["per_event"] < 2000
    assert counts["per_event"] + hub.stats["dropped"] == 2000  # every event delivered or counted


# -- over HTTP -----------------------------------------------------------------------


async def read_sse(response: httpx.Response, n: int) -> list[dict]:
    """The first n events (`id`, `event`, `data` fields) of an SSE stream."""
    events, fields = [], {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in fields:
                events.append({**fields, "data": json.loads(fields["data"])})
                if len(events) == n:
                    return events
            fields = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            fields[key] = value
    return events


async def test_sse_streams_what_matches_and_resumes_with_last_event_id(gateway_factory):
    async with gateway_factory() as gw, gw_client(gw) as client:
        async with client.stream("GET", "/api/gateway/live/events", params={"streams": "paku.telemetry.*"},
                                 headers=ADMIN) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            await wait_until(lambda: gw.live.subscribers == 1)
            gw.live.publish("paku.telemetry.pk-1", {"t": 1})
            gw.live.publish("paku.state.pk-1", {"online": True})  # not asked for
            gw.live.publish("paku.telemetry.pk-2", {"t": 2})
            first, second = await read_sse(r, 2)
        assert (first["event"], first["data"]["data"]) == ("paku.telemetry.pk-1", {"t": 1})
        assert second["data"]["stream"] == "paku.telemetry.pk-2"
        gw.live.publish("paku.telemetry.pk-3", {"t": 3})  # while the client was away
        async with client.stream("GET", "/api/gateway/live/events", params={"streams": "paku.#"},
                                 headers={**ADMIN, "Last-Event-ID": second["id"]}) as r:
            [missed] = await read_sse(r, 1)
        assert missed["data"]["data"] == {"t": 3}


async def test_who_may_watch_what(gateway_factory):
    async with gateway_factory() as gw, gw_client(gw) as client:
        token = await trio.to_thread.run_sync(gw.tokens.add_blocking, "screen", ["live:paku"], 3600.0)
        url = "/api/gateway/live/events"
        r = await client.get(url, params={"streams": "paku.#"})
        assert r.status_code == 401
        r = await client.get(url, params={"streams": "paku.#", "token": TOKEN})
        assert r.status_code == 401 and "never goes in a URL" in r.json()["error"]["message"]
        r = await client.get(url, params={"streams": "kaiabc.#", "token": token})
        assert r.status_code == 403 and "may not watch 'kaiabc.#'" in r.json()["error"]["message"]
        r = await client.get(url, params={"streams": "#", "token": token})
        assert r.status_code == 403
        r = await client.get(url, params={"streams": "a..b"}, headers=ADMIN)
        assert r.status_code == 400
        async with client.stream("GET", url, params={"streams": "paku.#", "token": token}) as r:
            assert r.status_code == 200
            await wait_until(lambda: gw.live.subscribers == 1)
            gw.live.publish("paku.state.pk-1", {"online": True})
            [event] = await read_sse(r, 1)
        assert event["data"]["data"] == {"online": True}
        await trio.to_thread.run_sync(gw.tokens.revoke_blocking, "screen")
        assert (await client.get(url, params={"streams": "paku.#", "token": token})).status_code == 401


async def test_websocket_subscribes_by_message_and_is_limited_per_token(gateway_factory):
    async with gateway_factory(settings=["live.per_token=2"]) as gw:
        base = gw_url(gw).replace("http://", "ws://")
        async with open_websocket_url(f"{base}/api/gateway/live", extra_headers=[("Authorization", f"Bearer {TOKEN}")]) as ws:
            await ws.send_message(json.dumps({"subscribe": ["paku.telemetry.*"]}))
            assert json.loads(await ws.get_message()) == {"ok": ["paku.telemetry.*"]}
            gw.live.publish("paku.telemetry.pk-1", {"t": 1})
            [event] = json.loads(await ws.get_message())  # an array: the events ready together
            assert event["data"] == {"t": 1}
            await ws.send_message(json.dumps({"subscribe": ["a..b"]}))
            assert "error" in json.loads(await ws.get_message())
            await ws.send_message("not json")
            assert "error" in json.loads(await ws.get_message())
            async with open_websocket_url(f"{base}/api/gateway/live?streams=x.%23",
                                          extra_headers=[("Authorization", f"Bearer {TOKEN}")]):
                async with open_websocket_url(f"{base}/api/gateway/live?streams=x.%23",
                                              extra_headers=[("Authorization", f"Bearer {TOKEN}")]) as third:
                    with pytest.raises(ConnectionClosed) as closed:
                        await third.get_message()
                    assert closed.value.reason.code == 4429
            await ws.send_message(json.dumps({"unsubscribe": ["paku.telemetry.*"]}))
            assert json.loads(await ws.get_message()) == {"ok": []}


async def test_websocket_and_sse_subscribers_of_the_same_streams_get_one_encoding(gateway_factory, monkeypatch):
    import gatewayd.core.live.http as live_http

    encoded = {"ws": 0, "sse": 0}
    ws_frame, sse_chunk = live_http._ws_frame, live_http._sse_chunk

    def counting(kind, encode):
        def wrapper(batch):
            encoded[kind] += 1
            return encode(batch)
        return wrapper

    monkeypatch.setattr(live_http, "_ws_frame", counting("ws", ws_frame))
    monkeypatch.setattr(live_http, "_sse_chunk", counting("sse", sse_chunk))
    async with gateway_factory(settings=["live.batch_ms=200"]) as gw, gw_client(gw) as client:
        url = gw_url(gw).replace("http://", "ws://") + "/api/gateway/live?streams=paku.%23"
        headers = [("Authorization", f"Bearer {TOKEN}")]
        async with open_websocket_url(url, extra_headers=headers) as a, \
                open_websocket_url(url, extra_headers=headers) as b, \
                client.stream("GET", "/api/gateway/live/events", params={"streams": "paku.#"}, headers=ADMIN) as r:
            await wait_until(lambda: gw.live.subscribers == 3)
            got: dict[str, list[int]] = {"a": [], "b": []}
            for i in range(5):
                gw.live.publish("paku.telemetry.pk-1", {"i": i})
            sse = [e["data"]["data"]["i"] for e in await read_sse(r, 5)]
            for name, ws in (("a", a), ("b", b)):
                while len(got[name]) < 5:
                    got[name] += [e["data"]["i"] for e in json.loads(await ws.get_message())]
        assert got["a"] == got["b"] == sse == [0, 1, 2, 3, 4]
        assert encoded == {"ws": 1, "sse": 1}  # one batch: encoded once for each shape, not per subscriber


async def test_shutdown_closes_live_connections_within_the_grace(gateway_factory):
    closed: list[int] = []
    async with gateway_factory(settings=["gateway.shutdown_grace_s=2"]) as gw:
        url = gw_url(gw).replace("http://", "ws://") + "/api/gateway/live?streams=paku.%23"

        async def watcher() -> None:
            async with open_websocket_url(url, extra_headers=[("Authorization", f"Bearer {TOKEN}")]) as ws:
                try:
                    await ws.get_message()
                except ConnectionClosed as e:
                    closed.append(e.reason.code)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher)
                await wait_until(lambda: gw.live.subscribers == 1)
                gw.request_shutdown()
    assert closed == [1001]


class Watcher:
    """A family plugin: a reading route that publishes after storing, and a stream of its
    own in the family's shape (plain JSON lines), as thingsnxt and kaiabc will."""

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint("watch", __name__)

        @bp.post("/reading/<device>")
        async def reading(device: str):
            ctx.live.publish("reading", device, {"value": 1})
            return {"ok": True}

        @bp.get("/stream")
        async def stream():
            sub = ctx.live.subscribe(["reading.*"], owner=request.remote_addr or "-")
            return Response(lines(sub), content_type="application/x-ndjson")

        @bp.get("/watched")
        async def watched():
            # Who may watch, as the core's endpoints decide: the family's own answer shape.
            try:
                owner = await ctx.live.authorize(request.headers, request.args)
            except LiveDenied as e:
                return {"refused": e.reason}, e.status
            sub = ctx.live.subscribe(["reading.*"], owner=owner)
            return Response(lines(sub), content_type="application/x-ndjson")

        async def lines(sub):
            with sub:
                for item in await sub.next():
                    yield (item.json() + "\n").encode()

        return bp


async def test_a_plugin_publishes_its_own_streams_and_serves_them_in_its_shape(gateway_factory):
    async with gateway_factory(plugins=[("watch", Watcher())]) as gw, gw_client(gw) as client:
        async with client.stream("GET", "/watch/stream") as r:
            await wait_until(lambda: gw.live.subscribers == 1)
            assert (await client.post("/watch/reading/d1")).status_code == 200
            line = json.loads(await r.aiter_lines().__anext__())
        assert (line["stream"], line["data"]) == ("watch.reading.d1", {"value": 1})
        # and the core's own endpoint sees the family's streams under its name
        assert matches("watch.#", line["stream"])


class Socket:
    """A plugin's own WebSocket route guarded by the admin token (kaiabc's /v1/ws)."""

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint("sock", __name__)

        @bp.websocket("/ws")
        async def ws():
            denied = ctx.http.require_admin()
            await websocket.accept()
            await websocket.send("denied" if denied is not None else "admin")

        return bp


async def test_require_admin_on_a_plugin_websocket_handshake(gateway_factory):
    async with gateway_factory(plugins=[("sock", Socket())]) as gw:
        url = gw_url(gw).replace("http://", "ws://") + "/sock/ws"
        async with open_websocket_url(url, extra_headers=[("Authorization", f"Bearer {TOKEN}")]) as ws:
            assert await ws.get_message() == "admin"
        for headers in ([], [("Authorization", "Bearer wrong")]):
            async with open_websocket_url(url, extra_headers=headers) as ws:
                assert await ws.get_message() == "denied"


class Crashing:
    """A plugin WebSocket route that raises before its handshake."""

    @hookimpl
    def gatewayd_http_routes(self, ctx):
        bp = Blueprint("crash", __name__)

        @bp.websocket("/ws")
        async def ws():
            raise RuntimeError("boom in a websocket route")

        return bp


async def test_an_error_in_a_plugin_websocket_route_is_logged_as_itself(gateway_factory, caplog):
    async with gateway_factory(plugins=[("crash", Crashing())]) as gw:
        url = gw_url(gw).replace("http://", "ws://") + "/crash/ws"
        with pytest.raises(Exception):
            async with open_websocket_url(url) as ws:
                await ws.get_message()
    logged = [r for r in caplog.records if "unhandled error in request" in r.getMessage()]
    assert logged and "boom in a websocket route" in (logged[0].exc_text or "")


async def test_a_plugins_stream_admits_whom_the_cores_endpoints_admit(gateway_factory):
    async with gateway_factory(plugins=[("watch", Watcher())]) as gw, gw_client(gw) as client:
        mine = await trio.to_thread.run_sync(gw.tokens.add_blocking, "app", ["live:watch"], 3600.0)
        other = await trio.to_thread.run_sync(gw.tokens.add_blocking, "lobby", ["live:paku"], 3600.0)
        refusals = [(await client.get("/watch/watched", **kwargs)) for kwargs in (
            {}, {"params": {"token": "gwt_nope"}}, {"params": {"token": other}}, {"params": {"token": TOKEN}})]
        expected = [(401, "missing, expired or wrong token"), (401, "missing, expired or wrong token"),
                    (403, "this token may not watch watch's streams"), (401, "the admin token never goes in a URL")]
        assert [(r.status_code, r.json()["refused"][:len(start)]) for r, (_, start) in zip(refusals, expected)] \
            == expected
        for kwargs in ({"params": {"token": mine}}, {"headers": {"Authorization": f"Bearer {mine}"}},
                       {"headers": ADMIN}):
            async with client.stream("GET", "/watch/watched", **kwargs) as r:
                assert r.status_code == 200
                await wait_until(lambda: gw.live.subscribers == 1)
                assert (await client.post("/watch/reading/d1")).status_code == 200
                assert json.loads(await r.aiter_lines().__anext__())["stream"] == "watch.reading.d1"
            await wait_until(lambda: gw.live.subscribers == 0)
