"""Local retention: the plugin's status and energy rows are kept `retention_days` (30 by
default), and none is removed before the cloud has its record."""

from __future__ import annotations

import sqlite3
import time

from gatewayd_streetlight import models
from gatewayd_streetlight.config import StreetlightConfig
from streetlight_testbed import BASE, IMEI, PLUGIN, bearer, configure, status_report

from gatewayd.testing import gw_client, provision, reserved_port, wait_until

DAY = 86400.0


def test_thirty_days_by_default():
    assert StreetlightConfig().retention_days == 30


async def rows(gw):
    def read():
        return ([r.received_at for r in models.StatusRow.select().order_by(models.StatusRow.id)],
                models.EnergyParameters.select().count())
    return await gw.contexts["streetlight"].storage.read(read)


async def test_only_rows_older_than_retention_and_delivered_upstream_are_purged(gateway_factory, upstream_receiver):
    settings = ["plugins.streetlight.retention_days=10", f"plugins.streetlight.token_ttl_s={60 * DAY}"]
    t0 = time.time()
    now = [t0]
    # First run: the cloud is there; status A is delivered.
    async with gateway_factory(plugins=PLUGIN, settings=settings, clock=lambda: now[0],
                               upstream=upstream_receiver) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        assert (await client.post(f"{BASE}/{IMEI}/status", json=status_report(), headers=auth)).status_code == 200
        ingest = gw.contexts["streetlight"].ingest
        await upstream_receiver.wait_for(2)  # configure and status A
        await wait_until(lambda: _none(ingest.oldest_pending()), what="nothing waits in the outbox")
    # Second run: the cloud cannot be reached; status B (an hour later) and C (5 days later) wait in the outbox.
    dead = upstream_receiver.config_text(url=f"http://127.0.0.1:{reserved_port()}/upstream")
    now[0] = t0 + 3600
    async with gateway_factory(plugins=PLUGIN, settings=settings, clock=lambda: now[0], config_text=dead) as gw, \
            gw_client(gw) as client:
        auth = bearer((await configure(client))["device_token"])
        assert (await client.post(f"{BASE}/{IMEI}/status", json=status_report(), headers=auth)).status_code == 200
        now[0] = t0 + 5 * DAY
        assert (await client.post(f"{BASE}/{IMEI}/status", json=status_report(), headers=auth)).status_code == 200
        state = gw.contexts["streetlight"].state
        assert await rows(gw) == ([t0, t0 + 3600, t0 + 5 * DAY], 3)
        now[0] = t0 + 9 * DAY  # A is 9 days old: kept
        assert await state.purge_once() == (0, 0)
        now[0] = t0 + 11 * DAY  # A (delivered) goes; B is as old but the cloud does not have it
        assert await state.purge_once() == (1, 1)
        assert await rows(gw) == ([t0 + 3600, t0 + 5 * DAY], 2)
        now[0] = t0 + 100 * DAY
        assert await state.purge_once() == (0, 0)
        assert await rows(gw) == ([t0 + 3600, t0 + 5 * DAY], 2)


async def _none(pending):
    return await pending is None


async def test_a_version_one_database_is_migrated(gateway_factory, tmp_path):
    async with gateway_factory(plugins=PLUGIN):
        pass
    db = tmp_path / "var" / "gatewayd.sqlite3"
    with sqlite3.connect(db) as c:  # as version 1 left it, with a reading
        for table in ("streetlight_status", "streetlight_energy_parameters"):
            c.execute(f'DROP INDEX "{table}_received_at"')
        c.execute('ALTER TABLE "streetlight_energy_parameters" DROP COLUMN "received_at"')
        c.execute("INSERT INTO streetlight_energy_parameters (device, ts, voltage) VALUES ('x', 1.8e9, 230)")
        c.execute("UPDATE core_schema SET version = 1 WHERE component = 'streetlight'")
    async with gateway_factory(plugins=PLUGIN):
        pass
    with sqlite3.connect(db) as c:
        indexes = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        version = c.execute("SELECT version FROM core_schema WHERE component = 'streetlight'").fetchone()
        energy = c.execute("SELECT ts, received_at FROM streetlight_energy_parameters").fetchall()
    assert {"streetlight_status_received_at", "streetlight_energy_parameters_received_at"} <= indexes
    assert version == (2,) and energy == [(1.8e9, 1.8e9)]
