"""The family's panels on the real dashboard's overview: door cycles today and this week,
nodes claimed and waiting, each node's last batch, the workflow alerts firing, and
maintenance mode."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import time

import pytest
from sentinel_testbed import API, PLUGIN, compress, upload

from gatewayd.plugins.api import MaintenanceState
from gatewayd.testing import gw_client, provision, wait_until

TOKEN = "es-dashboard-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


def panel(page: str, title: str) -> str:
    """The text of one panel (tags dropped), from its title to the end of its section."""
    start = page.index(f"<h2>{title} <span")
    text = re.sub(r"<[^>]+>", " ", page[start:page.index("</section>", start)])
    return " ".join(text.split())


async def test_the_panels_show_doors_nodes_alerts_and_maintenance(gateway_factory):
    async with gateway_factory(plugins=PLUGIN) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1", status="claimed")
        await provision(gw, "edgesentinel", "es-2")  # never claimed
        page = (await client.get("/", headers=ADMIN)).text
        assert "No door cycles this week." in panel(page, "Doors")
        assert "es-2 provisioned none yet" in panel(page, "Door nodes")

        now = time.time()
        today = dt.datetime.fromtimestamp(now, dt.UTC)
        start_of_day = dt.datetime.combine(today.date(), dt.time(), dt.UTC).timestamp()
        doc = {"door_events": [
            *({"ts": start_of_day + i, "door_id": "dock-1", "type": "cycle_open"} for i in range(3)),
            {"ts": start_of_day + 5, "door_id": "dock-1", "type": "cycle_close"},  # not a cycle
            {"ts": start_of_day + 5, "door_id": "dock-2", "type": "cycle_open"},
            {"ts": start_of_day - 86400, "door_id": "dock-1", "type": "cycle_open"},  # yesterday
            {"ts": start_of_day - 8 * 86400, "door_id": "dock-1", "type": "cycle_open"}],  # last week
            "system_events": [{"ts": now, "event_type": "tamper_detected", "severity": "critical"}]}
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress(doc)))
        assert r.status_code == 200 and r.json()["accepted"] == 8, r.text
        await wait_until(lambda: gw.contexts["edgesentinel"].events.active(), what="the tamper alert active")
        await gw.maintenance.set(MaintenanceState(True, "door <b>swap</b>", now, 600))

        page = (await client.get("/", headers=ADMIN)).text
        doors = panel(page, "Doors")  # 8 days ago is outside this ISO week; yesterday too on a Monday
        week = 4 if today.weekday() > 0 else 3
        assert f"es-1 dock-1 3 {week}" in doors and "es-1 dock-2 1 1" in doors, doors
        nodes = panel(page, "Door nodes")
        assert "Maintenance mode: on" in nodes and "(door &lt;b&gt;swap&lt;/b&gt;)" in page  # escaped
        assert "retry in 600 s" in nodes
        assert "Workflow alerts firing: 1 edgesentinel-tamper tamper_detected on es-1" in nodes, nodes
        assert "1 claimed, 1 waiting to be claimed." in nodes
        assert re.search(r"es-1 active \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC 8 / 0 / 0", nodes), nodes
        assert "es-2 provisioned none yet" in nodes

        await gw.maintenance.set(MaintenanceState(False, "", None, 300))
        assert "Maintenance mode: off." in panel((await client.get("/", headers=ADMIN)).text, "Door nodes")


async def test_a_version_1_database_gets_the_ledgers_index(gateway_factory, tmp_path):
    """Schema 2 added the ledger's (device, received_at) index the panel's last batch uses."""
    index = "edgesentinel_packet_device_received_at"
    async with gateway_factory(plugins=PLUGIN):
        pass
    db = sqlite3.connect(tmp_path / "var" / "gatewayd.sqlite3")
    with db:  # what a site that ran schema 1 has
        db.execute(f"DROP INDEX {index}")
        assert db.execute("UPDATE core_schema SET version = 1 WHERE component LIKE '%edgesentinel%'").rowcount == 1
    async with gateway_factory(plugins=PLUGIN):
        pass
    assert db.execute("SELECT name FROM sqlite_master WHERE name = ?", (index,)).fetchall() == [(index,)]
    assert db.execute("SELECT version FROM core_schema WHERE component LIKE '%edgesentinel%'").fetchall() == [(2,)]
    plan = db.execute("EXPLAIN QUERY PLAN SELECT received_at FROM edgesentinel_packet WHERE device = 'x' "
                      "ORDER BY received_at DESC LIMIT 1").fetchall()
    assert index in str(plan)
    db.close()
