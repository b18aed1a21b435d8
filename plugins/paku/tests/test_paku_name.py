"""A copy of paku under another name works as it is: its routes, topics, tables, metrics
and rules are named after the plugin, never after "paku"."""

import ast
import json
from pathlib import Path

import gatewayd_paku
from paku_testbed import AUTH

from gatewayd.testing import device_mqtt, gw_client, provision, wait_handled, wait_until

ACME = [("acme", gatewayd_paku)]


def test_the_code_names_no_family():
    """String literals (docstrings, comments and names may tell the story of paku)."""
    found = []
    for path in sorted(Path(gatewayd_paku.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        docs = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        docs |= {id(name) for node in ast.walk(tree) if isinstance(node, ast.Assign)  # __all__: identifiers
                 and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__all__"]
                 for name in ast.walk(node.value)}
        found += [f"{path.name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                  and "paku" in node.value.lower()]
    assert found == []


async def test_the_plugin_under_another_name(gateway_factory):
    async with gateway_factory(plugins=ACME, mqtt=True) as gw, gw_client(gw) as client:
        r = await client.post("/acme/devices", headers=AUTH, json={"id": "ac-1"})
        assert r.status_code == 201, r.text
        assert r.json()["topics"]["telemetry"] == "acme/ac-1/telemetry" and r.json()["model"] == "acme"
        async with device_mqtt(await provision(gw, "acme", "ac-2")) as dev:
            await dev.subscribe("acme/ac-2/cmd")
            await dev.publish("acme/ac-2/state", b'{"status": "online"}', retain=True)
            await dev.publish("acme/ac-2/telemetry", json.dumps({"temp_c": 21.5}))
            await dev.publish("acme/ac-2/event/button", b"{}")
            await wait_handled(gw, "acme/ac-2/#", n=3)
            r = await client.post("/api/gateway/devices/ac-2/commands", headers=AUTH, json={"payload": {"a": 1}})
            await wait_until(lambda: dev.received)
            assert dev.received[0].topic == "acme/ac-2/cmd"

        view = (await client.get("/acme/devices/ac-2", headers=AUTH)).json()
        assert view["telemetry"]["payload"] == {"temp_c": 21.5} and view["state"]["online"] is True
        tables = await gw.contexts["acme"].storage.read(gw.contexts["acme"].storage.database.get_tables)
        assert {"acme_measurement", "acme_event", "acme_state"} <= set(tables)
        assert not any(t.startswith("paku") for t in tables)
        metrics = (await client.get("/metrics")).text
        assert 'gatewayd_acme_messages_total{kind="telemetry",outcome="stored"} 1' in metrics
        assert (await client.get("/paku/health")).status_code == 404


def indexes(ctx) -> set[tuple[str, str]]:
    rows = ctx.storage.database.execute_sql("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'")
    return {(name, table) for name, table in rows if not name.startswith("sqlite_")}


async def test_a_copy_beside_paku_gets_indexes_of_its_own(gateway_factory):
    """SQLite's index names are per database: a copy's must not be paku's."""
    async with gateway_factory(plugins=[("paku", gatewayd_paku)]) as gw:
        ctx = gw.contexts["paku"]
        assert {("paku_measurement_device_ts", "paku_measurement"),
                ("paku_event_device_ts", "paku_event")} <= await ctx.storage.read(indexes, ctx)
    async with gateway_factory(plugins=ACME) as gw:  # the same database
        ctx = gw.contexts["acme"]
        assert {("acme_measurement_device_ts", "acme_measurement"),
                ("acme_event_device_ts", "acme_event")} <= await ctx.storage.read(indexes, ctx)


async def test_schema_1_indexes_are_renamed(gateway_factory):
    async with gateway_factory(plugins=[("paku", gatewayd_paku)]) as gw:
        ctx = gw.contexts["paku"]

        def schema_1() -> None:
            for table in ("measurement", "event"):
                ctx.storage.database.execute_sql(f'DROP INDEX "paku_{table}_device_ts"')
                ctx.storage.database.execute_sql(f'CREATE INDEX "{table}_device_ts" ON "paku_{table}" (device, ts)')
            ctx.storage.database.execute_sql("UPDATE core_schema SET version = 1 WHERE component = 'paku'")

        await ctx.storage.write(schema_1)
    async with gateway_factory(plugins=[("paku", gatewayd_paku)]) as gw:
        ctx = gw.contexts["paku"]
        found = {name for name, table in await ctx.storage.read(indexes, ctx) if table.startswith("paku_")}
        assert found == {"paku_measurement_device_ts", "paku_event_device_ts"}
