"""The memory budget against concurrent uploads: a batch's body is read (up to
`http.max_body_bytes`, 8 MiB) before the device's lock and before any backpressure
check, and `max_inflight_bytes` counts only inflated batches past the lock. Requests of
one node queued on its lock each held their body, uncounted: now the body as sent is
in the budget from the moment it is read."""

from __future__ import annotations

import trio
from sentinel_testbed import API, OPEN, PLUGIN, T0, compress, points, upload

from gatewayd.testing import gw_client, provision, wait_until

KEY = "5f0e3c1a-8b7d-4e2f-9a6c-1d2e3f4a5b6c"


async def test_bodies_waiting_for_the_device_lock_count_against_the_memory_budget(gateway_factory):
    settings = [*OPEN, "plugins.edgesentinel.backpressure.max_inflight_bytes=65536"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        state = gw.contexts["edgesentinel"].state
        bodies = [compress({"batch_id": f"b{i}", "points": points(600, start=T0 + 1000 * i)}, "identity")
                  for i in range(8)]
        assert all(len(b) > 40_000 for b in bodies)  # 8 x 40 KB held against a 64 KiB budget
        statuses: list[int] = []

        async def post(body: bytes) -> None:
            r = await client.post(f"{API}/telemetry/batch", **upload(node, body, encoding="identity"))
            statuses.append(r.status_code)

        lock = state.lock("es-1")
        async with trio.open_nursery() as nursery:
            async with lock:  # a slow store holding the node's lock
                for body in bodies:
                    nursery.start_soon(post, body)
                await wait_until(lambda: lock.statistics().tasks_waiting + len(statuses) == len(bodies),
                                 what="every upload queued on the lock or answered")
        assert sorted(statuses) == [200] + [429] * 7  # one body in the budget; the rest told to come back


async def test_a_replayed_batch_gets_its_answer_over_the_memory_budget(gateway_factory):
    """Issue 18 audit doubt: the budget check came before the ledger lookup, so a node
    retrying an acknowledged batch (it missed the answer) got a 429 while bodies were in
    flight. Its original answer is cheap: one indexed read, nothing inflated."""
    settings = [*OPEN, "plugins.edgesentinel.backpressure.max_inflight_bytes=65536"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        state = gw.contexts["edgesentinel"].state
        done = compress({"batch_id": "done", "points": points(600)}, "identity")
        first = await client.post(f"{API}/telemetry/batch", **upload(node, done, key=KEY, encoding="identity"))
        assert first.status_code == 200 and first.json()["accepted"] == 600
        big = compress({"batch_id": "big", "points": points(1200, start=T0 + 10_000)}, "identity")
        assert len(big) > 65536 // 2 and len(done) > 65536 // 2  # big + a body more is over the budget
        answers: list[int] = []

        async def post_big() -> None:
            r = await client.post(f"{API}/telemetry/batch", **upload(node, big, encoding="identity"))
            answers.append(r.status_code)

        lock = state.lock("es-1")
        async with trio.open_nursery() as nursery:
            async with lock:  # a slow store: the big body waits for the lock, counted in flight
                nursery.start_soon(post_big)
                await wait_until(lambda: lock.statistics().tasks_waiting == 1, what="the big batch queued")
                replay = await client.post(f"{API}/telemetry/batch", **upload(node, done, key=KEY, encoding="identity"))
                other = await client.post(f"{API}/telemetry/batch", **upload(
                    node, compress({"batch_id": "new", "points": points(600, start=T0 + 50_000)}, "identity"),
                    encoding="identity"))
                conflict = await client.post(f"{API}/telemetry/batch", **upload(node, big, key=KEY,
                                                                                  encoding="identity"))
        assert replay.status_code == 200 and replay.json() == first.json(), replay.text
        assert replay.headers["Idempotency-Replayed"] == "true"
        assert other.status_code == 429, other.text  # new work still waits
        assert conflict.status_code == 409, conflict.text  # the same key for another body is still refused
        assert answers == [200]  # the queued batch went through once the lock was free
