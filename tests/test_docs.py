"""Every hook is documented in docs/plugins.md and has a test (datasette's model)."""

import json
import re
import types
from pathlib import Path

import pytest

from gatewayd.plugins import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("gatewayd_"))


def documented_hooks() -> set[str]:
    text = (ROOT / "docs" / "plugins.md").read_text()
    return set(re.findall(r"^### (gatewayd_\w+)\(", text, re.MULTILINE))


def hooks_with_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        names |= {"gatewayd_" + m for m in re.findall(r"^(?:async )?def test_hook_(\w+)\(", path.read_text(), re.M)}
    return names


def test_there_are_hooks():
    assert len(HOOKS) >= 7


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_are_documented(hook):
    assert hook in documented_hooks(), f"{hook} has no '### {hook}(...)' section in docs/plugins.md"


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_tests(hook):
    name = hook.removeprefix("gatewayd_")
    assert hook in hooks_with_tests(), f"{hook} has no test named test_hook_{name} under tests/"


@pytest.mark.parametrize("hook", HOOKS)
def test_hookspecs_have_docstrings(hook):
    doc = getattr(hookspecs, hook).__doc__ or ""
    assert len(doc.strip()) > 80, f"{hook}: the hookspec docstring must state its contract"


def test_no_documented_hook_is_missing_from_hookspecs():
    assert documented_hooks() <= set(HOOKS)


# -- the context reference ---------------------------------------------------------

SERVICES = {"storage", "metrics", "http", "mqtt", "devices", "auth", "ratelimit", "commands", "ingest", "events", "ota"}


def context_table() -> list[str]:
    """The first column of docs/plugins.md's context reference, one code span per row."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text.split("\n## The context\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE)


def test_the_context_reference_lists_every_member_as_called():
    from gatewayd.plugins.docgen import context_members

    documented = context_table()
    expected = [m.call for m in context_members()]
    missing = [call for call in expected if call not in documented]
    unknown = [call for call in documented if call not in expected]
    assert not missing, "docs/plugins.md's context table lacks (python -m gatewayd.plugins.docgen --rows):\n" + \
        "\n".join(missing)
    assert not unknown, "docs/plugins.md's context table names what PluginContext has not (or not so):\n" + \
        "\n".join(unknown)
    assert len(documented) == len(set(documented)), "a member is documented twice"


def test_the_context_reference_covers_every_service():
    from gatewayd.plugins.docgen import context_members

    paths = {m.path for m in context_members()}
    assert {p.split(".")[0] for p in paths if "." in p} >= SERVICES
    assert {"devices.get", "auth.api_key", "ratelimit.check", "commands.enqueue", "mqtt.publish", "mqtt.connected",
            "ingest.record", "events.emit", "ota.newest_for", "storage.write", "metrics.counter", "http.url",
            "http.mount", "state", "now"} <= paths


def test_docgen_reads_signatures_as_a_plugin_calls_them():
    from gatewayd.plugins.docgen import _members_of, signature_text

    class Service:
        def __init__(self) -> None:
            self.family = "x"
            self._hidden = 1

        @property
        def ready(self) -> bool:
            return True

        async def fetch(self, key: str, *, limit: int = 10, mode: str = "a", render=len) -> None: ...

        def tally(self, *names: str, **labels: str) -> None: ...

        def _private(self) -> None: ...

    assert signature_text(Service.fetch) == "(key, *, limit=10, mode='a', render=len)"
    assert [m.call for m in _members_of(Service, "svc.")] == [
        "ctx.svc.family", "ctx.svc.ready", "await ctx.svc.fetch(key, *, limit=10, mode='a', render=len)",
        "ctx.svc.tally(*names, **labels)",
    ]


# -- the tutorial ------------------------------------------------------------------


def test_the_tutorial_quotes_the_code_plugin_new_writes():
    from gatewayd.cli.plugin import render_plugin

    text = (ROOT / "docs" / "plugins.md").read_text()
    tutorial = text.split("\n## Tutorial", 1)[1].split("\n## ", 1)[0]
    code = render_plugin("meter", {"http", "mqtt"})["gatewayd_meter/__init__.py"]
    quotes = re.findall(r"```python\n# gatewayd_meter/__init__.py\n(.*?)```", tutorial, re.DOTALL)
    assert len(quotes) >= 3
    for quote in quotes:
        assert quote in code, f"the tutorial quotes code that gatewayd plugin new no longer writes:\n{quote}"


def test_one_way_to_install_a_plugin():
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = path.read_text()
        assert not re.search(r"pip install[^\n`]*(-e|plugins/)", text), f"{path.name}: an install other than bootstrap"
    assert "## Installing a plugin" in (ROOT / "docs" / "plugins.md").read_text()


# -- events.md's examples ----------------------------------------------------------


def _doc_json(after: str) -> dict:
    text = (ROOT / "docs" / "events.md").read_text()
    block = text.split(after, 1)[1].split("\n", 1)[1].split("```", 1)[0]  # from the next line
    return json.loads(block)


def _shape(doc):
    """The keys of a JSON document, all the way down (lists: their first item's)."""
    if isinstance(doc, dict):
        return {k: _shape(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_shape(doc[0])] if doc else []
    return None


async def test_events_md_shows_what_the_api_returns(gateway_factory, upstream_receiver, monkeypatch):
    from gatewayd.plugins.api import hookimpl
    from gatewayd.testing import gw_client, provision

    # events.md's example: a plugin "meter" with its rule, a rule in the configuration,
    # an event emitted, a device's reading that fires the plugin's rule.
    @hookimpl
    def gatewayd_alert_rules(ctx):
        return [{"name": "meter-value-high", "type": "reading", "when": ["value > 50"], "alert_severity": "warning",
                 "actions": [{"kind": "upstream"}, {"kind": "log", "level": "warning"}]}]

    rules = ('[[rules]]\nname = "meter-tamper"\nfamily = "meter"\ntype = "tamper_detected"\n'
             'actions = [{ kind = "upstream" }, { kind = "log", level = "error" }]\n')
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", "docs-example-token")
    meter = types.ModuleType("meter")
    meter.gatewayd_alert_rules = gatewayd_alert_rules
    async with gateway_factory(plugins=[("meter", meter)], config_text=rules, upstream=upstream_receiver) as gw, \
            gw_client(gw, headers={"Authorization": "Bearer docs-example-token"}) as client:
        await provision(gw, "meter", "m-1")
        ctx = gw.contexts["meter"]
        await ctx.events.emit("m-1", "tamper_detected", {"lid": "open"}, severity="critical")
        await ctx.events.observe("m-1", "reading", {"value": 72.5})
        records = await upstream_receiver.wait_for(2)
        events = (await client.get("/api/gateway/events")).json()
        alerts = (await client.get("/api/gateway/alerts")).json()
    assert _shape(events) == _shape(_doc_json("$ curl -s localhost:8080/api/gateway/events"))
    documented = _doc_json("$ curl -s localhost:8080/api/gateway/alerts")
    assert _shape(alerts) == _shape(documented)
    assert len(alerts["alerts"]) == len(documented["alerts"]) == 4  # one row per action of each firing
    assert sorted(alerts["active"]) == sorted(documented["active"])
    [record] = [r for r in records if r["data"]["rule"] == "meter-tamper"]
    assert _shape(record) == _shape(_doc_json("`gatewayd receive --export`):\n\n```json"))
    assert record["data"]["event"]["data"] == {"lid": "open"}


def test_every_ctx_call_in_the_docs_exists():
    from gatewayd.plugins.docgen import context_members

    members = {m.path: m.call.endswith(")") for m in context_members()}  # path -> is a method
    wrong = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in set(re.findall(r"\bctx\.(\w+(?:\.\w+)*)", path.read_text())):
            parts = name.split(".")
            known = [".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in members]
            # Beyond a member: the plugin's own (ctx.config.x, ctx.state.x) or a value's attributes.
            if not known or (known[0] != name and members[known[0]]):
                wrong.append(f"{path.name}: ctx.{name}")
    assert not wrong, "the docs call what PluginContext does not have:\n" + "\n".join(sorted(wrong))
