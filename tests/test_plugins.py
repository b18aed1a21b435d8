"""The plugin contract: each hook through a real gateway, isolation, supervision."""

import json
import re
import subprocess
import sys
import types

import pytest
import trio

from gatewayd.plugins.api import hookimpl
from gatewayd.plugins.manager import PluginLoadError, build_plugin_manager
from gatewayd.testing import device_mqtt, gw_client, provision, rejected_messages, wait_handled, wait_until
from tests import plugin_everything

EVERYTHING = ("everything", plugin_everything)


def plugin_module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    return module


async def test_hook_config_schema(gateway_factory):
    async with gateway_factory(plugins=[EVERYTHING], settings=["plugins.everything.greeting='moi'"]) as gw:
        assert gw.contexts["everything"].config.greeting == "moi"
        async with gw_client(gw) as client:
            assert (await client.get("/everything/hello")).json() == {"greeting": "moi"}


async def test_hook_storage_models(gateway_factory):
    async with gateway_factory(plugins=[EVERYTHING]) as gw:
        assert gw.storage.schema_version("everything") == 2
        async with gw_client(gw) as client:
            r = await client.post("/everything/readings", json={"device": "d1", "value": 1.5})
            assert r.status_code == 201
            assert (await client.get("/everything/readings")).json() == {"count": 1}
            r = await client.post("/everything/readings/prepared", json={"device": "d2", "value": 2.5})
            assert r.status_code == 201
            row = await gw.storage.read(lambda: plugin_everything.Reading.get_by_id(r.json()["id"]))
            assert (row.device, row.value) == ("d2", 2.5)


def test_model_tables_must_carry_the_plugin_prefix():
    import peewee

    class Bad(peewee.Model):
        class Meta:
            table_name = "readings"

    manager = build_plugin_manager(
        entry_points=False, plugins=[("bad", plugin_module("bad", gatewayd_storage_models=lambda models: models.add(Bad)))]
    )
    with pytest.raises(ValueError, match="plugin tables must be named 'bad_...'"):
        manager.storage_models("bad")


async def test_hook_http_routes(gateway_factory):
    async with gateway_factory(plugins=[EVERYTHING], settings=["plugins.everything.mount='/e'"]) as gw:
        async with gw_client(gw) as client:
            assert (await client.get("/e/hello")).status_code == 200
            assert (await client.get("/everything/hello")).status_code == 404


async def test_hook_setup(gateway_factory):
    """gatewayd_setup runs once, before the hooks that take ctx; its result is ctx.state."""
    plugin_everything.calls.clear()
    async with gateway_factory(plugins=[EVERYTHING]) as gw:
        state = gw.contexts["everything"].state
        assert isinstance(state, plugin_everything.Everything) and state.name == "everything"
        assert plugin_everything.calls.index("setup") < plugin_everything.calls.index("http_routes")
        assert plugin_everything.calls.count("setup") == 1
        async with gw_client(gw) as client:
            await client.get("/everything/greeted")
            assert (await client.get("/everything/greeted")).json()["greeted"] == 2  # one state, shared


async def test_a_plugin_without_setup_has_no_state(gateway_factory):
    async with gateway_factory(plugins=[("bare", types.SimpleNamespace())]) as gw:
        with pytest.raises(RuntimeError, match="ctx.state is unset"):
            gw.contexts["bare"].state


async def test_hooks_run_through_pluggy_so_its_ordering_and_wrappers_apply(gateway_factory):
    """The manager calls a per-plugin subset of pm.hook: a wrapper of the plugin's own
    sees its http_routes result (calling impl.function directly skipped wrappers)."""
    seen = []

    class Wrapped:
        @hookimpl(wrapper=True)
        def gatewayd_alert_rules(self, ctx):
            results = yield  # one list of rules per implementation
            seen.append(results)
            return [*results, [{"name": "added-by-wrapper", "type": "x", "actions": [{"kind": "log"}]}]]

        @hookimpl(specname="gatewayd_alert_rules")
        def base_rules(self, ctx):  # a second impl of the same hook (datasette's specname=)
            return [{"name": "base", "type": "y", "actions": [{"kind": "log"}]}]

    async with gateway_factory(plugins=[("wrapped", Wrapped())]) as gw:
        assert not gw.failed, gw.failed
        assert [r.name for r in gw.events.engine.rules] == ["base", "added-by-wrapper"]
        assert len(seen) == 1


async def test_dedicated_listener_serves_routes_at_root(gateway_factory):
    async with gateway_factory(plugins=[EVERYTHING], settings=["plugins.everything.listen='127.0.0.1:0'"]) as gw:
        async with gw_client(gw, "everything") as client:
            assert (await client.get("/hello")).json() == {"greeting": "hello"}
        async with gw_client(gw) as client:
            assert (await client.get("/everything/hello")).status_code == 200


async def test_hook_startup(gateway_factory):
    plugin_everything.calls.clear()
    async with gateway_factory(plugins=[EVERYTHING]):
        assert plugin_everything.calls.index("startup") > plugin_everything.calls.index("http_routes")


async def test_failed_startup_is_isolated(gateway_factory, monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", "admin-token")
    other = plugin_module("other", gatewayd_http_routes=lambda ctx: _ok_blueprint())
    async with gateway_factory(
        plugins=[EVERYTHING, ("other", other)], settings=["plugins.everything.fail_startup=true"]
    ) as gw:
        async with gw_client(gw) as client:
            health = await client.get("/health")
            assert health.status_code == 503
            doc = health.json()
            assert doc["plugins"]["everything"] == {"state": "failed", "reason": "startup: told to fail"}
            assert doc["plugins"]["other"] == {"state": "ok"}
            assert (await client.get("/other/ok")).status_code == 200
            failed_route = await client.get("/everything/hello")
            assert failed_route.status_code == 503
            assert "told to fail" in failed_route.json()["error"]["message"]
            r = await client.get("/api/gateway/plugins", headers={"Authorization": "Bearer admin-token"})
            plugins = r.json()["plugins"]
            assert {p["name"]: p["state"] for p in plugins} == {"everything": "failed", "other": "ok"}


def _ok_blueprint():
    from quart import Blueprint

    bp = Blueprint("other", __name__)

    @bp.get("/ok")
    async def ok():
        return {"ok": True}

    return bp


async def test_hook_background_tasks(gateway_factory):
    async with gateway_factory(plugins=[EVERYTHING]) as gw:
        runs = gw.metrics.counter("gatewayd_everything_task_runs_total", "")
        await wait_until(lambda: runs.value() >= 1)
        assert runs.value() == 1


async def test_crashing_task_restarts_with_backoff(gateway_factory, autojump_clock):
    async with gateway_factory(plugins=[EVERYTHING], settings=["plugins.everything.crash_task=true"]) as gw:
        await trio.sleep(100)  # virtual seconds: backoff 1+2+4+8+16+32 = 63 s, then 64 s
        restarts = gw.metrics.counter("gatewayd_plugin_task_restarts_total", "", ("plugin", "task"))
        count = restarts.value(plugin="everything", task="ticker")
        # Without backoff this would be in the thousands; with it, 6 or 7 crashes in 100 s.
        assert 5 <= count <= 7, count
        assert gw.health.plugins["everything"].state == "ok"  # a crashing task doesn't fail the plugin


async def test_hook_shutdown(gateway_factory):
    plugin_everything.calls.clear()
    async with gateway_factory(plugins=[EVERYTHING]):
        assert "shutdown" not in plugin_everything.calls
    assert plugin_everything.calls[-1] == "shutdown"


def test_hook_cli_commands(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd", "-p", "tests.plugin_everything", "everything", "hello", "--name", "ada",
         "--set", "gateway.id=site-9"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello ada from site-9"


async def test_hook_check_command(gateway_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", "test-admin-token")
    auth = {"Authorization": "Bearer test-admin-token"}
    async with gateway_factory(plugins=[EVERYTHING]) as gw, gw_client(gw) as client:
        await provision(gw, "everything", "e1")
        url = "/api/gateway/devices/e1/commands"
        r = await client.post(url, headers=auth, json={"payload": {"level": 11}})
        assert r.status_code == 400 and r.json()["error"]["message"] == "level: expected an integer 0-10, got 11"
        r = await client.post(url, headers=auth, json={"payload": {"level": 3}})
        assert r.status_code == 201 and r.json()["command"]["payload"] == {"level": 3, "checked": True}
        r = await client.post(url, headers=auth, json={"payload": "reboot"})  # None from the hook: as given
        assert r.status_code == 201 and r.json()["command"]["payload"] == "reboot"
        with pytest.raises(ValueError, match="level: expected"):  # the plugin's own enqueue is checked too
            await gw.contexts["everything"].commands.enqueue("e1", {"level": "high"})
        stored = await gw.contexts["everything"].commands.list("e1")
        assert [c.payload for c in stored] == ["reboot", {"level": 3, "checked": True}]
    data_dir = tmp_path / "var"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gatewayd", "-p", "tests.plugin_everything", "devices", "command",
                               "--set", f"gateway.data_dir='{data_dir}'", *args], capture_output=True, text=True,
                              timeout=60)

    refused = cli("e1", '{"level": -1}')
    assert refused.returncode == 1 and refused.stderr.strip() == "gatewayd: level: expected an integer 0-10, got -1"
    queued = cli("e1", '{"level": 10}', "--json")
    assert queued.returncode == 0, queued.stderr
    assert json.loads(queued.stdout)["command"]["payload"] == {"level": 10, "checked": True}


async def test_a_plugin_command_uses_its_familys_devices_and_commands(gateway_factory, tmp_path):
    async with gateway_factory(plugins=[EVERYTHING]) as gw:
        await provision(gw, "everything", "e1")
    data_dir = tmp_path / "var"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gatewayd", "-p", "tests.plugin_everything", "everything", "label",
                               "--set", f"gateway.data_dir='{data_dir}'", *args], capture_output=True, text=True,
                              timeout=60)

    done = cli("e1", "boiler")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"everything/e1 labelled; command \S+: \{'level': 6, 'checked': True\}\n", done.stdout)
    assert cli("e2", "x").stdout == "no device e2\n"
    refused = cli("e1", "a label of more than ten")  # the family's check_command holds here too
    assert refused.returncode == 1 and refused.stderr == "everything label: level: expected an integer 0-10, got 24\n"
    async with gateway_factory(plugins=[EVERYTHING]) as gw:
        device = await gw.contexts["everything"].devices.get("e1")
        assert device is not None and device.metadata == {"label": "a label of more than ten"}
        assert [c.payload for c in await gw.contexts["everything"].commands.list("e1")] == [
            {"level": 6, "checked": True}]


def test_misspelled_hook_is_refused():
    bad = types.ModuleType("bad")
    bad.gatewayd_startupp = lambda ctx: None
    with pytest.raises(PluginLoadError, match="gatewayd_startupp is not a gatewayd hook \\(did you mean gatewayd_startup\\?\\)"):
        build_plugin_manager(entry_points=False, plugins=[("bad", bad)])


def test_decorated_unknown_hook_is_refused_by_check_pending():
    from pluggy import PluginValidationError

    class Bad:
        @hookimpl
        def not_a_hook(self):
            pass

    with pytest.raises(PluginValidationError):
        build_plugin_manager(entry_points=False, plugins=[("bad", Bad())])


async def test_disabled_plugin_is_not_started(gateway_factory):
    plugin_everything.calls.clear()
    async with gateway_factory(plugins=[EVERYTHING], settings=["plugins.everything.enabled=false"]) as gw:
        async with gw_client(gw) as client:
            assert (await client.get("/everything/hello")).status_code == 404
            assert (await client.get("/health")).json()["plugins"]["everything"] == {"state": "disabled"}
    assert "startup" not in plugin_everything.calls


async def test_hook_serial_links(gateway_factory):
    import json
    import os

    device, port = os.openpty()  # our end plays the device; the gateway opens the tty
    os.set_blocking(device, False)
    path = os.ttyname(port)

    async def read_line() -> bytes:
        buf = b""
        while not buf.endswith(b"\n"):
            await trio.lowlevel.wait_readable(device)
            buf += os.read(device, 4096)
        return buf

    try:
        async with gateway_factory(plugins=[EVERYTHING], settings=[f"plugins.everything.serial.port='{path}'"]) as gw:
            with trio.fail_after(10):
                link = gw.serial.links["everything.console"]
                await link.wait_open()
                os.write(device, b"line noise\xff\n" + json.dumps({"value": 4.5}).encode() + b"\n")
                replies = b""
                while b'"ok"' not in replies:
                    replies += await read_line()
            assert b'"error"' in replies  # the noise got the family's error, the link survived
            ok = json.loads(replies.splitlines()[-1])
            assert await gw.storage.read(lambda: plugin_everything.Reading.get_by_id(ok["ok"]).value) == 4.5
            async with gw_client(gw) as client:
                health = (await client.get("/health")).json()
                assert health["components"]["serial.everything.console"]["state"] == "ok"
                assert 'gatewayd_serial_frames_total{direction="in",link="everything.console"} 2' in (
                    await client.get("/metrics")).text
    finally:
        os.close(device)
        os.close(port)


def test_serial_settings_errors_name_the_toml_key():
    from gatewayd.core.config import ConfigErrors, load_config

    with pytest.raises(ConfigErrors) as info:
        load_config(None, ["plugins.everything.serial.port='/dev/ttyUSB0'", "plugins.everything.serial.parity='X'"],
                    {"everything": plugin_everything.EverythingConfig}, text="")
    assert [str(e) for e in info.value.errors] == [
        "plugins.everything.serial.parity: expected one of N, E, O, M, S, got 'X'"
    ]


async def test_hook_mqtt_topics(gateway_factory):
    async with gateway_factory(plugins=[EVERYTHING], mqtt=True) as gw:
        async with device_mqtt(await provision(gw, "everything", "dev1")) as dev:
            await dev.publish("everything/dev1/reading", b"not json")
            await dev.publish("everything/dev1/reading", b'{"value": 7.25}')
            await dev.publish("everything/dev2/reading", b'{"value": 99}')  # not its topic: ACL drops it
        await wait_handled(gw, "everything/+/reading")
        await wait_handled(gw, "everything/+/reading", verdict="rejected")
        rows = await gw.storage.read(lambda: [(r.device, r.value) for r in plugin_everything.Reading.select()])
        assert rows == [("dev1", 7.25)]
        rejected = [(r.topic, r.payload) for r in await rejected_messages(gw)]
        assert rejected == [("everything/dev1/reading", b"not json")]
        async with gw_client(gw) as client:
            health = (await client.get("/health")).json()
            assert health["components"]["mqtt"]["state"] == "ok"
            assert health["components"]["mqtt_broker"]["state"] == "ok"
            metrics = (await client.get("/metrics")).text
            assert 'gatewayd_mqtt_messages_total{outcome="rejected"} 1' in metrics


async def test_mqtt_off_leaves_the_rest_running(gateway_factory):
    async with gateway_factory(plugins=[EVERYTHING]) as gw:  # the fixtures default to mqtt.broker = "off"
        with pytest.raises(Exception, match="MQTT is unavailable"):
            await gw.contexts["everything"].mqtt.publish("x/y", b"1")
        async with gw_client(gw) as client:
            health = await client.get("/health")
            assert health.status_code == 200
            assert health.json()["components"]["mqtt"] == {"state": "off"}


async def test_a_failed_plugins_503_in_the_familys_shape_before_its_own_code(gateway_factory):
    """The guard raises PluginUnavailable before the Blueprint's own before_request; a
    Blueprint that handles it answers in its shape."""
    from quart import Blueprint

    from gatewayd.plugins.api import PluginUnavailable

    ran = []

    def routes(ctx):
        bp = Blueprint("shaped", __name__)

        @bp.before_request
        async def own():
            ran.append("before_request")

        @bp.get("/ok")
        async def ok():
            return {"ok": True}

        @bp.errorhandler(PluginUnavailable)
        async def unavailable(e):
            return {"fault": {"plugin": e.plugin, "why": e.reason}}, 503

        return bp

    async def startup(ctx):
        raise RuntimeError("told to fail")

    shaped = plugin_module("shaped", gatewayd_http_routes=routes, gatewayd_startup=startup)
    async with gateway_factory(plugins=[("shaped", shaped)]) as gw, gw_client(gw) as client:
        assert "shaped" in gw.failed
        r = await client.get("/shaped/ok")
        assert r.status_code == 503 and r.json() == {"fault": {"plugin": "shaped", "why": gw.failed["shaped"]}}
        assert ran == []
