"""Retention after the clock was set back (a board without an RTC booting with a time in
the future, then corrected by NTP): the ledger rows stamped in the future must not stop
every older row behind them from expiring."""

from __future__ import annotations

from sentinel_testbed import API, OPEN, PLUGIN, T0, compress, points, upload

from gatewayd.testing import gw_client, provision


async def count(gw, table: str) -> int:
    def read() -> int:
        return int(gw.storage.database.execute_sql(f'SELECT count(*) FROM "edgesentinel_{table}"').fetchone()[0])

    return await gw.storage.read(read)


async def test_ledger_rows_stamped_in_the_future_do_not_stall_retention(gateway_factory):
    now = [T0 + 400 * 86400]  # booted with a clock a year ahead
    settings = [*OPEN, "plugins.edgesentinel.dedup_days=30", "plugins.edgesentinel.retention_days=0",
                "plugins.edgesentinel.windows.raw_retention_days=0"]
    async with gateway_factory(plugins=PLUGIN, settings=settings, clock=lambda: now[0]) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress({"batch_id": "early", "points": points(2)})))
        assert r.json()["accepted"] == 2
        now[0] = T0 + 3600  # NTP sets the clock right
        for i in range(3):
            r = await client.post(f"{API}/telemetry/batch",
                                  **upload(node, compress({"batch_id": f"b{i}", "points": points(2, start=T0 + 10 * i + 10)})))
            assert r.json()["accepted"] == 2, r.text
        now[0] = T0 + 31 * 86400  # the three good batches' keys are past dedup_days
        state = gw.contexts["edgesentinel"].state
        await state.expire()
        assert await count(gw, "packet") == 1  # the future-stamped one waits for its own time
        assert await count(gw, "seen") == 2
