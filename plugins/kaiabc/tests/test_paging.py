"""The spec's "Pagination" (limit, cursor, sort; has_next/has_prev, next_cursor/prev_cursor,
total_count, limit) on the list routes, against a real gateway; the paging rules themselves
over every page size of a list."""

import base64
import json

import pytest
from kaiabc_testbed import AUTH, FAST, KAIABC, V1, register

from gatewayd.testing import gw_client, wait_until
from gatewayd_kaiabc import paging


def error(r, status, code, parameter):
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code and body["details"]["parameter"] == parameter, body
    return body


async def walk(client, path, items, params, headers=AUTH):
    """Every page forward by next_cursor, then back by prev_cursor: (pages forward, pages back,
    the paginations forward)."""
    forward, docs, cursor = [], [], None
    while True:
        r = await client.get(path, headers=headers, params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        doc = r.json()
        forward.append(items(doc))
        docs.append(doc["pagination"])
        assert len(forward) < 50, "no end"
        if not doc["pagination"]["has_next"]:
            break
        cursor = doc["pagination"]["next_cursor"]
    back, pagination = [forward[-1]], docs[-1]
    while pagination["has_prev"]:
        assert pagination["prev_cursor"] is not None
        r = await client.get(path, headers=headers, params={**params, "cursor": pagination["prev_cursor"]})
        assert r.status_code == 200, r.text
        back.append(items(r.json()))
        pagination = r.json()["pagination"]
        assert len(back) < 50, "no start"
    assert pagination["prev_cursor"] is None
    return forward, back[::-1], docs


def node_ids(doc):
    return [n["node_id"] for n in doc["nodes"]]


async def test_nodes_walk_forward_and_back_sorted_either_way(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        order = ["pico_003", "elm11_001", "pico_001", "elm11_002", "pico_002"]  # registration order
        for n in order:
            await register(client, n)
        path = f"{V1}/sensors/nodes"
        doc = (await client.get(path, headers=AUTH)).json()
        assert node_ids(doc) == sorted(order)
        assert doc["pagination"] == {"has_next": False, "has_prev": False, "next_cursor": None, "prev_cursor": None,
                                     "total_count": 5, "limit": 50}
        for sort, expected in ((None, sorted(order)), ("node_id:asc", sorted(order)),
                               ("node_id:desc", sorted(order, reverse=True)), ("registered_at", order),
                               ("registered_at:desc", order[::-1])):
            params = {"limit": 2, **({"sort": sort} if sort else {})}
            forward, back, docs = await walk(client, path, node_ids, params)
            assert forward == [expected[0:2], expected[2:4], expected[4:]], sort
            assert back == forward, sort
            assert [d["total_count"] for d in docs] == [5, 5, 5] and {d["limit"] for d in docs} == {2}
            assert [(d["has_prev"], d["has_next"]) for d in docs] == [(False, True), (True, True), (True, False)]
        # a node registered while paging: no page repeats or skips one already seen
        first = (await client.get(path, headers=AUTH, params={"limit": 2})).json()
        await register(client, "aaa_first")
        second = (await client.get(path, headers=AUTH, params={"limit": 2,
                                                                "cursor": first["pagination"]["next_cursor"]})).json()
        assert node_ids(first) + node_ids(second) == sorted(order)[:4]
        assert second["pagination"]["total_count"] == 6


async def test_sort_limit_and_cursor_refusals_name_the_parameter(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        await register(client)
        path = f"{V1}/sensors/nodes"
        body = error(await client.get(path, headers=AUTH, params={"sort": "name:asc"}), 400, "INVALID_PARAMETER",
                     "sort")
        assert "name" in body["message"] and "registered_at:desc" in body["details"]["allowed"]
        error(await client.get(path, headers=AUTH, params={"sort": "node_id:up"}), 400, "INVALID_PARAMETER", "sort")
        error(await client.get(path, headers=AUTH, params={"limit": 1001}), 400, "INVALID_PARAMETER", "limit")
        error(await client.get(path, headers=AUTH, params={"limit": 0}), 400, "INVALID_PARAMETER", "limit")
        assert (await client.get(path, headers=AUTH, params={"limit": 1000})).status_code == 200
        for made_up in ("not-a-cursor", base64.urlsafe_b64encode(b'{"k": [1], "s": "sideways"}').decode().rstrip("="),
                        "x" * 401):
            error(await client.get(path, headers=AUTH, params={"cursor": made_up}), 400, "INVALID_PARAMETER",
                  "cursor")
        # a cursor of one sort under another: refused, not a wrong page
        await register(client, "pico_002")
        given = (await client.get(path, headers=AUTH, params={"limit": 1, "sort": "registered_at:desc"})).json()
        body = error(await client.get(path, headers=AUTH, params={"limit": 1, "sort": "node_id:asc",
                                                                  "cursor": given["pagination"]["next_cursor"]}),
                     400, "INVALID_PARAMETER", "cursor")
        assert "registered_at:desc" in body["message"]
        # a cursor whose key is of another type than the sort's
        forged = base64.urlsafe_b64encode(json.dumps({"k": 5, "s": "after", "o": "node_id:asc"}).encode())
        error(await client.get(path, headers=AUTH, params={"cursor": forged.decode().rstrip("=")}), 400,
              "INVALID_PARAMETER", "cursor")
        for route in ("/oscillator/history", "/diagnostics/logs"):
            error(await client.get(f"{V1}{route}", headers=AUTH, params={"node_id": "pico_001",
                                                                          "sort": "temperature:desc"}),
                  400, "INVALID_PARAMETER", "sort")


async def test_history_pages_by_timestamp_both_ways(gateway_factory):
    settings = FAST + ["plugins.kaiabc.history_every_s=0.1"]
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        await register(client)
        path = f"{V1}/oscillator/history"

        async def five_buckets():
            r = await client.get(path, headers=AUTH, params={"node_id": "pico_001", "resolution": "1s"})
            return r.json() if r.json()["data_points"] >= 6 else None

        stamps = (await wait_until(five_buckets, what="six seconds of history"))["series"]["timestamp"]
        params = {"node_id": "pico_001", "resolution": "1s", "variables": "C_ST", "end_time": stamps[5], "limit": 2}
        everything = stamps[:5]  # end_time is exclusive: a closed range, however long the test takes

        def timestamps(doc):
            return doc["series"]["timestamp"]

        for sort, expected in ((None, everything), ("timestamp:asc", everything), ("timestamp:desc", everything[::-1])):
            forward, back, docs = await walk(client, path, timestamps, {**params, **({"sort": sort} if sort else {})})
            assert forward == [expected[0:2], expected[2:4], expected[4:]], sort
            assert back == forward, sort
            assert [d["total_count"] for d in docs] == [5, 5, 5] and {d["limit"] for d in docs} == {2}
        default = (await client.get(path, headers=AUTH, params={"node_id": "pico_001"})).json()["pagination"]
        assert default["limit"] == 50  # the spec's "Pagination"
        error(await client.get(path, headers=AUTH, params={**params, "cursor": "MTcwMDAwMDAwMC4w"}), 400,
              "INVALID_PARAMETER", "cursor")  # base64 of the old cursor (a bare number), not one of ours


async def test_logs_walk_forward_and_back(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        for n in ("pico_001", "pico_002", "pico_003"):
            await register(client, n)
        path = f"{V1}/diagnostics/logs"
        newest_first = [e["node_id"] for e in (await client.get(path, headers=AUTH)).json()["logs"]
                        if e["message"] == "node registered"]
        assert newest_first == ["pico_003", "pico_002", "pico_001"]
        params = {"limit": 1}

        def messages(doc):
            assert all("seq" not in e for e in doc["logs"])
            return [(e["message"], e["node_id"]) for e in doc["logs"]]

        assert (await client.get(path, headers=AUTH)).json()["pagination"]["limit"] == 100  # the logs' section
        forward, back, docs = await walk(client, path, messages, params)
        assert back == forward and len(forward) == docs[0]["total_count"] >= 3
        up, _, _ = await walk(client, path, messages, {**params, "sort": "timestamp:asc"})
        assert up == forward[::-1]


@pytest.mark.parametrize("descending", [False, True])
def test_every_page_size_walks_the_same_pages_back(descending):
    sort = paging.Sort("n", descending)
    items = [3, 1, 4, 15, 9, 2, 6, 5, 35, 8]
    for limit in range(1, 12):
        pages, cursor = [], None
        while True:
            page, doc = paging.page_of(items, lambda i: i, sort, cursor, limit)
            pages.append(page)
            if not doc["has_next"]:
                break
            cursor = paging.decode(doc["next_cursor"], sort)
        assert sum(pages, []) == sorted(items, reverse=descending)
        back = [pages[-1]]
        while doc["has_prev"]:
            page, doc = paging.page_of(items, lambda i: i, sort, paging.decode(doc["prev_cursor"], sort), limit)
            back.append(page)
        assert back[::-1] == pages, limit
    # an empty page past the end (its items removed since) points back to the last page
    cursor = paging.decode(paging.encode(40 if not descending else 0, "after", sort), sort)
    page, doc = paging.page_of(items, lambda i: i, sort, cursor, 3)
    assert page == [] and doc["has_prev"] and not doc["has_next"]
    page, _ = paging.page_of(items, lambda i: i, sort, paging.decode(doc["prev_cursor"], sort), 3)
    assert page == sorted(items, reverse=descending)[-3:]
