"""The memory budget against concurrent uploads: a batch's body is read (up to
`http.max_body_bytes`, 8 MiB) before the device's lock and before any backpressure
check, and `max_inflight_bytes` counts only inflated batches past the lock. Requests of
one node queued on its lock each held their body, uncounted: now the body as sent is
in the budget from the moment it is read."""

from __future__ import annotations

import trio
from sentinel_testbed import API, OPEN, PLUGIN, T0, compress, points, upload

from gatewayd.testing import gw_client, provision, wait_until


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
