"""The site's data: the data explorer with its streamed CSV export, and the door cycle
counters with their daily and weekly histograms (admin token)."""

from __future__ import annotations

import csv
import io

import pytest
from sentinel_testbed import API, OPEN, PLUGIN, T0, compress, points, upload

from gatewayd.testing import gw_client, provision

TOKEN = "es-explorer-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


async def test_the_explorer_streams_a_series_filtered_as_csv(gateway_factory, monkeypatch):
    monkeypatch.setattr("gatewayd_edgesentinel.explorer.PAGE", 7)  # many pages: the keyset paging is exercised
    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        for device in ("es-1", "es-2"):
            node = await provision(gw, "edgesentinel", device)
            doc = {"points": [*points(30), *points(20, metric="rh_pct")]}
            assert (await client.post(f"{API}/telemetry/batch", **upload(node, compress(doc)))).status_code == 200
        assert (await client.get("/edgesentinel/data")).status_code == 401
        r = await client.get("/edgesentinel/data", headers=ADMIN, params={"device": "es-2", "metric": "temp_c",
                                                                          "since": T0 + 5, "until": "2026-01-01T00:00:25Z"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(r.text)))
        assert rows[0] == ["ts", "device_id", "metric", "value", "unit", "meta", "id"]
        assert [float(row[0]) for row in rows[1:]] == [T0 + i for i in range(5, 25)]
        assert {row[1] for row in rows[1:]} == {"es-2"} and {row[2] for row in rows[1:]} == {"temp_c"}
        r = await client.get("/edgesentinel/data", headers=ADMIN, params={"limit": 45})
        *lines, more = list(csv.reader(io.StringIO(r.text)))[1:]
        stamps = [float(row[0]) for row in lines]
        assert len(stamps) == 45 and stamps[0] == T0 and stamps == sorted(stamps)
        assert more == [f"#more after={stamps[-1]!r}:{lines[-1][-1]} limit=45"]  # cut: it says so
        r = await client.get("/edgesentinel/data", headers=ADMIN, params={"since": "yesterday"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("since: ")
        r = await client.get("/edgesentinel/data", headers=ADMIN, params={"series": "waveforms"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("series: ")


async def test_door_cycles_per_day_and_week(gateway_factory):
    day = 86400
    now = T0 + 10 * day
    async with gateway_factory(plugins=PLUGIN, settings=OPEN, clock=lambda: now) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        events = [{"ts": T0 + d * day + i * 60, "door_id": door, "type": kind}
                  for d, n in ((0, 3), (1, 2), (6, 4)) for i in range(n)
                  for door, kind in (("dock-1", "cycle_open"), ("dock-1", "cycle_close"), ("dock-2", "cycle_open"))]
        r = await client.post(f"{API}/telemetry/batch", **upload(node, compress({"door_events": events})))
        assert r.json()["accepted"] == len(events)
        r = await client.get("/edgesentinel/doors", headers=ADMIN, params={"days": 30})
        [one, two] = r.json()["doors"]
        assert one == {"device": "es-1", "door_id": "dock-1", "cycles": 9,
                       "daily": {"2026-01-01": 3, "2026-01-02": 2, "2026-01-07": 4},
                       "weekly": {"2026-W01": 5, "2026-W02": 4}}  # ISO weeks: 2026-01-01 is a Thursday
        assert two["door_id"] == "dock-2" and two["cycles"] == 9
        r = await client.get("/edgesentinel/doors", headers=ADMIN, params={"days": 5})
        assert r.json()["doors"][0]["daily"] == {"2026-01-07": 4}


def export(text: str) -> tuple[list[list[str]], str | None]:
    """An export's rows (without the header line) and its `after` cursor if it was cut."""
    rows = list(csv.reader(io.StringIO(text)))[1:]
    if rows and rows[-1][0].startswith("#more "):
        (line,) = rows.pop()
        return rows, line.split()[1].removeprefix("after=")
    return rows, None


@pytest.mark.parametrize("device", ["", "es-2"])  # merged across devices; through one device's index
async def test_an_export_cut_at_its_limit_says_so_and_continues_from_there(gateway_factory, monkeypatch, device):
    """The audit's doubt: an export stopped at `limit` and nothing in the CSV said so.
    Now its last line is `#more after=<ts>:<id>` and the same query with `after` goes on,
    nothing twice, nothing skipped; an export that ends on its own has no such line."""
    monkeypatch.setattr("gatewayd_edgesentinel.explorer.PAGE", 7)
    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        for name in ("es-1", "es-2", "es-3"):
            node = await provision(gw, "edgesentinel", name)
            doc = {"points": [*points(20), *points(20, metric="rh_pct")]}  # the same ts across devices: ties
            assert (await client.post(f"{API}/telemetry/batch", **upload(node, compress(doc)))).status_code == 200
        query = {"device": device} if device else {}
        whole = await client.get("/edgesentinel/data", headers=ADMIN, params=query)
        everything, cursor = export(whole.text)
        assert cursor is None and len(everything) == (40 if device else 120)
        assert whole.headers["X-Export-Limit"] == "1000000"
        parts: list[list[str]] = []
        cursor = ""
        for _ in range(20):
            r = await client.get("/edgesentinel/data", headers=ADMIN, params={**query, "limit": 13, "after": cursor})
            assert r.status_code == 200 and r.headers["X-Export-Limit"] == "13"
            rows, cursor = export(r.text)
            parts += rows
            if cursor is None:
                break
        assert parts == everything  # the same rows in the same order: nothing twice, nothing skipped
        # A limit that is exactly the end: no "#more" line (the gateway looked).
        rows, cursor = export((await client.get("/edgesentinel/data", headers=ADMIN,
                                                params={**query, "limit": len(everything)})).text)
        assert rows == everything and cursor is None
        r = await client.get("/edgesentinel/data", headers=ADMIN, params={"after": "nan:3"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("after: ")
