"""Alert rules: parsing and precise errors, each matcher, cooldown/grouping, escalation.

The engine is pure (time passed in); the last tests run it inside a real EventBus
over real SQLite with a mock clock, so timers fire through `EventBus.run`.
"""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from gatewayd.core.alerts.engine import RuleEngine
from gatewayd.core.alerts.events import Event, EventBus, parse_time
from gatewayd.core.alerts.notify import CoreNotification, Notifier, list_notifications
from gatewayd.core.alerts.rules import parse_condition, rule_from_dict
from tests.core_schemas import install_schemas
from gatewayd.core.config import load_config
from gatewayd.core.schema import ConfigErrors
from gatewayd.core.storage import Storage

T0 = parse_time("2026-03-02T12:00:00Z")
LOG = [{"kind": "log"}]


def rule(**fields):
    return rule_from_dict({"name": "r", "actions": LOG, **fields}, "rules[0]")


def event(t=T0, type="x", data=None, **kw):
    return Event(kw.pop("family", "fam"), kw.pop("device", "d1"), type, kw.pop("severity", "info"), data or {},
                 ts=t, **kw)


def config_errors(text):
    with pytest.raises(ConfigErrors) as info:
        load_config(None, [], {}, text=text)
    return [str(e) for e in info.value.errors]


# -- parsing ------------------------------------------------------------------------


@pytest.mark.parametrize("text,data,expected", [
    ("battery < 10", {"battery": 9.5}, True),
    ("battery < 10", {"battery": 10}, False),
    ("battery < 10", {}, False),
    ("battery < 10", {"battery": "low"}, False),
    ("battery < 10", {"battery": True}, False),
    ("temperature >= 65", {"temperature": 65}, True),
    ("voltage < 80% of rated_voltage", {"voltage": 9.5, "rated_voltage": 12}, True),
    ("voltage < 80% of rated_voltage", {"voltage": 9.7, "rated_voltage": 12}, False),
    ("voltage < 80% of 12", {"voltage": 9.5}, True),
    ("energy.voltage > 250", {"energy": {"voltage": 251.0}}, True),
    ("door == 'open'", {"door": "open"}, True),
    ('door != "open"', {"door": "open"}, False),
    ("armed == true", {"armed": True}, True),
])
def test_conditions(text, data, expected):
    assert parse_condition(text).check(event(data=data)) is expected


@pytest.mark.parametrize("text", ["battery", "battery << 10", "battery < ten", "door < 'open'", "10 < battery"])
def test_bad_conditions_are_refused(text):
    with pytest.raises(ValueError):
        parse_condition(text)


def test_config_errors_name_the_rule_and_key():
    errors = config_errors("""
[[rules]]
name = "a"
when = ["battery <"]
actions = [{ kind = "log" }]

[[rules]]
name = "b"
outside_hours = "7-19"
more_than = 5
actions = [{ kind = "webhook", url = "ftp://x" }, { kind = "mqtt", topic = "a/#" }]

[[rules]]
name = "a"
severity = "urgent"
actions = []
""")
    assert errors == [
        "rules[0].when[0]: expected 'FIELD OP NUMBER', 'FIELD OP PCT% of FIELD' or 'FIELD ==|!= \"TEXT\"', "
        "got 'battery <'",
        "rules[1].actions[0].url: a webhook needs an http(s) URL, got 'ftp://x'",
        "rules[1].actions[1].topic: an mqtt action needs a topic without wildcards, got 'a/#'",
        # The rule's own checks run past its actions' errors (a section's errors at once).
        "rules[1].within_s: more_than and within_s go together ('more than N events within S seconds')",
        "rules[2].severity: expected info, warning or critical, got 'urgent'",
    ]


def test_more_than_needs_within_and_unknown_keys_get_a_hint():
    assert config_errors("[[rules]]\nname='a'\nmore_than=5\nactions=[{kind='log'}]\n") == [
        "rules[0].within_s: more_than and within_s go together ('more than N events within S seconds')"]
    assert config_errors("[[rules]]\nname='a'\nmore_than=1\nwithin_s=9\nmin_duration_s=5\nactions=[{kind='log'}]\n") \
        == ["rules[0].min_duration_s: a rule counts events (more_than) or times one (min_duration_s), not both; "
            "write two rules"]
    assert config_errors("[[rules]]\nname='a'\nwhen_=['a > 1']\nactions=[{kind='log'}]\n") == [
        "rules[0].when_: unknown key (did you mean 'when'?)"]
    assert config_errors("[[rules]]\nname='a'\nactions=[{kind='log'}]\n[[rules]]\nname='a'\nactions=[{kind='log'}]\n") \
        == ["rules[1].name: duplicate rule name 'a'"]


# -- matchers -----------------------------------------------------------------------


def fired(engine, *steps):
    out = []
    for step in steps:
        if isinstance(step, Event):
            out += engine.on_event(step, step.ts)
        else:
            out += engine.due(step)
    return out


def test_family_type_device_and_severity_matchers():
    engine = RuleEngine([rule(family="edge*", type=["door_*", "tamper"], device="gate-?", min_severity="warning")])
    assert fired(engine, event(family="edgesentinel", device="gate-1", type="door_forced", severity="critical"))
    assert not fired(engine, event(family="paku", device="gate-1", type="tamper", severity="critical"))
    assert not fired(engine, event(family="edgesentinel", device="gate-12", type="tamper", severity="critical"))
    assert not fired(engine, event(family="edgesentinel", device="gate-2", type="tamper", severity="info"))
    assert not fired(engine, event(family="edgesentinel", device="gate-2", type="window", severity="critical"))


@pytest.mark.parametrize("hours,offset,utc,inside", [
    ("07:00-19:00", "+00:00", "2026-03-02T06:59:00Z", False),
    ("07:00-19:00", "+00:00", "2026-03-02T07:00:00Z", True),
    ("07:00-19:00", "+05:30", "2026-03-02T01:30:00Z", True),    # 07:00 local
    ("07:00-19:00", "-08:00", "2026-03-02T12:00:00Z", False),   # 04:00 local
    ("22:00-06:00", "+00:00", "2026-03-02T23:00:00Z", True),    # overnight range
    ("22:00-06:00", "+00:00", "2026-03-02T12:00:00Z", False),
])
def test_time_of_day_with_offset(hours, offset, utc, inside):
    inside_rule = RuleEngine([rule(inside_hours=hours, utc_offset=offset)])
    outside_rule = RuleEngine([rule(outside_hours=hours, utc_offset=offset)])
    t = parse_time(utc)
    assert bool(fired(inside_rule, event(t))) is inside
    assert bool(fired(outside_rule, event(t))) is not inside


def test_count_window_fires_on_the_one_past_the_threshold():
    engine = RuleEngine([rule(type="error", more_than=5, within_s=3600, cooldown_s=0)])
    out = fired(engine, *[event(T0 + i * 60, "error") for i in range(5)])
    assert out == []
    out = fired(engine, event(T0 + 300, "error"))
    assert [f.reason for f in out] == ["6 error events within 3600 s (more than 5)"]
    # an hour after the first five, the window has only the recent ones
    assert fired(engine, event(T0 + 3700, "error")) == []


def test_windows_are_per_device():
    engine = RuleEngine([rule(type="error", more_than=1, within_s=60)])
    assert not fired(engine, event(type="error", device="a"), event(type="error", device="b"))
    assert fired(engine, event(T0 + 1, type="error", device="a"))


def test_open_event_fires_when_not_resolved_in_time():
    engine = RuleEngine([rule(type="offline", min_duration_s=300, resolved_by=["online"])])
    assert fired(engine, event(type="offline", resolved=False)) == []
    assert engine.next_deadline() == T0 + 300
    assert fired(engine, T0 + 299) == []
    (f,) = fired(engine, T0 + 300)
    assert f.reason == "offline not resolved within 300 s"
    assert engine.active() == [("r", "fam", "d1", "offline")]
    fired(engine, event(T0 + 400, "online"))
    assert engine.active() == []


def test_resolved_event_of_the_same_type_closes_it():
    engine = RuleEngine([rule(type="door_open", min_duration_s=60)])
    assert fired(engine, event(type="door_open"), event(T0 + 30, "door_open", resolved=True), T0 + 100) == []


def test_silence_rule_fires_once_then_rearms_on_the_next_report():
    engine = RuleEngine([rule(type="status", absent_for_s=120, cooldown_s=0)])
    out = fired(engine, event(type="status"), T0 + 119, T0 + 120, T0 + 1000)
    assert [f.reason for f in out] == ["no status from the device for 120 s"]
    assert fired(engine, event(T0 + 1100, "status"), T0 + 1221)


# -- cooldown, grouping, escalation -------------------------------------------------


def test_cooldown_groups_a_flapping_device():
    engine = RuleEngine([rule(type="flap", cooldown_s=600)])
    out = fired(engine, *[event(T0 + i * 10, "flap") for i in range(20)])
    assert len(out) == 1 and out[0].grouped == 0
    assert engine.stats.suppressed == 19
    (later,) = fired(engine, event(T0 + 700, "flap"))
    assert later.grouped == 19  # the summary: what was held back since the last alert
    assert later.payload("gw")["grouped"] == 19


def test_cooldown_is_per_device_and_type():
    engine = RuleEngine([rule(type=["a", "b"], cooldown_s=600)])
    out = fired(engine, event(type="a"), event(type="b"), event(type="a", device="d2"), event(T0 + 1, "a"))
    assert [(f.key[2], f.key[3]) for f in out] == [("d1", "a"), ("d1", "b"), ("d2", "a")]


def test_escalation_after_the_episode_began_unless_resolved():
    esc = {"after_s": 1800, "actions": [{"kind": "webhook", "url": "http://l2.example/"}]}
    engine = RuleEngine([rule(type="offline", min_duration_s=300, resolved_by=["online"], escalate=esc)])
    fired(engine, event(type="offline", resolved=False))
    assert [f.level for f in fired(engine, T0 + 300)] == ["alert"]
    assert engine.next_deadline() == T0 + 1800
    (f,) = fired(engine, T0 + 1800)
    assert (f.level, f.actions[0].url) == ("escalation", "http://l2.example/")
    # resolved in time: no escalation
    engine = RuleEngine([rule(type="offline", min_duration_s=300, resolved_by=["online"], escalate=esc)])
    out = fired(engine, event(type="offline", resolved=False), T0 + 300, event(T0 + 1000, "online"), T0 + 5000)
    assert [f.level for f in out] == ["alert"]


def test_plugin_rules_are_replaced_by_config_rules_of_the_same_name():
    from gatewayd.core.alerts.rules import merge_rules

    plugin = [rule_from_dict({"name": "hot", "type": "t", "actions": LOG}, "p", source="plugin:x", family="x")]
    assert plugin[0].family == "x"
    config = load_config(None, [], {}, text="[[rules]]\nname = 'hot'\nenabled = false\n").rules
    merged = merge_rules(plugin, config)
    assert [(r.name, r.enabled, r.source) for r in merged] == [("hot", False, "config")]
    assert RuleEngine(merged).rules == []


# -- the same, through a real EventBus and the notification queue --------------------


@pytest.fixture
def patient_clock():
    # Jump only after 20 ms of real idleness, so SQLite commits (another thread) land first.
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_escalation_and_cooldown_through_the_bus(tmp_path, patient_clock):
    storage = Storage(tmp_path / "gw.sqlite3")
    clock = lambda: T0 + trio.current_time()  # noqa: E731 - the wall clock follows the mock clock
    rules = load_config(None, [], {}, text="""
[[rules]]
name = "offline"
type = "connectivity_lost"
min_duration_s = 300
resolved_by = ["connectivity_restored"]
cooldown_s = 900
actions = [{ kind = "log" }]
[rules.escalate]
after_s = 1800
actions = [{ kind = "log", level = "error" }]
""").rules
    async with trio.open_nursery() as nursery:
        # Set-up first, outside the deadline: with no timer pending the mock clock has
        # nothing to jump to while the SQLite threads work.
        await nursery.start(storage.run)
        await trio.to_thread.run_sync(install_schemas, storage)
        notifier = Notifier(storage, gateway_id="gw", clock=clock)
        bus = EventBus(storage, rules=rules, notifier=notifier, clock=clock)
        await nursery.start(notifier.run)
        await nursery.start(bus.run)

        async def rows():
            return [(r["level"], r["state"]) for r in await storage.read(list_notifications, None, 100)]

        with trio.fail_after(7200):
            await bus.emit("edgesentinel", "door-1", "connectivity_lost", resolved=False)
            await trio.sleep(400)
            assert await rows() == [("alert", "sent")]
            await trio.sleep(1800)
            assert await rows() == [("escalation", "sent"), ("alert", "sent")]
            # Flapping: three short outages reported after the fact. The first alerts (the
            # cooldown since the first alert is over), the other two are held back...
            for _ in range(3):
                await bus.emit("edgesentinel", "door-1", "connectivity_restored")
                await bus.emit("edgesentinel", "door-1", "connectivity_lost", duration_s=400.0, resolved=True)
            assert len(await rows()) == 3
            assert bus.engine.stats.suppressed == 2
            # ... and counted in the next alert once the cooldown has passed.
            await trio.sleep(900)
            await bus.emit("edgesentinel", "door-1", "connectivity_lost", duration_s=400.0, resolved=True)
            await trio.sleep(1)
            newest = await storage.read(
                lambda: json.loads(CoreNotification.select().order_by(CoreNotification.id.desc()).first().payload))
            assert (newest["level"], newest["grouped"]) == ("alert", 2)
            assert await rows() == [("alert", "sent")] * 2 + [("escalation", "sent"), ("alert", "sent")]
        nursery.cancel_scope.cancel()


def test_timers_come_due_in_deadline_order_and_a_replaced_one_never_fires():
    engine = RuleEngine([rule(type="status", absent_for_s=120, cooldown_s=0)])
    for i, device in enumerate(("c", "a", "b")):
        engine.on_event(event(type="status", device=device), T0 + i)
    # Each of "c"'s reports re-arms its silence timer: the old deadlines must not fire.
    for t in range(10, 1000, 10):
        engine.on_event(event(type="status", device="c"), T0 + t)
    assert engine.next_deadline() == T0 + 1 + 120  # "a"
    assert [f.key[2] for f in engine.due(T0 + 200)] == ["a", "b"]
    assert engine.next_deadline() == T0 + 990 + 120
    assert engine.due(T0 + 1000) == []
    assert [f.key[2] for f in engine.due(T0 + 1110)] == ["c"]
    assert engine.next_deadline() is None


def test_a_device_re_arming_its_timer_keeps_the_heap_small():
    engine = RuleEngine([rule(type="status", absent_for_s=120, cooldown_s=0)])
    for t in range(20_000):
        engine.on_event(event(type="status", device=f"d{t % 100}"), T0 + t)
    assert len(engine._heap) <= 2 * 100 + 1024 + 1


async def test_a_report_re_arming_a_later_timer_does_not_wake_the_timer_loop(tmp_path):
    storage = Storage(tmp_path / "g.sqlite3")
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        await trio.to_thread.run_sync(install_schemas, storage)
        now = [T0]
        bus = EventBus(storage, rules=[rule(type="status", absent_for_s=120, cooldown_s=0)], clock=lambda: now[0])
        bus._sleep_until = T0 + 60  # the loop sleeps until then
        await bus.observe("fam", "d1", "status", {})  # the first deadline, T0 + 120: later
        assert not bus._wake.is_set()
        bus._sleep_until = T0 + 200
        await bus.observe("fam", "d2", "status", {})  # still T0 + 120, before T0 + 200: wake
        assert bus._wake.is_set()
        nursery.cancel_scope.cancel()


def test_the_matching_rules_remembered_per_source_follow_a_new_rule_set(monkeypatch):
    """The engine remembers which rules match a (family, device, type): the same answers
    as the globs each time, in rule order, forgotten with a new rule set, and bounded."""
    first = rule(type="door_*", device="gate-?", cooldown_s=0)
    second = rule_from_dict({"name": "r2", "actions": LOG, "family": "edge*", "cooldown_s": 0}, "rules[1]")
    engine = RuleEngine([first, second])

    def names(family, device, type, t=T0):
        return [f.rule.name for f in engine.on_event(event(family=family, device=device, type=type), t)]

    for _ in range(2):  # the second time from what was remembered
        assert names("edgesentinel", "gate-1", "door_x") == ["r", "r2"]
        assert names("paku", "gate-1", "door_x") == ["r"]
        assert names("edgesentinel", "gate-12", "door_x") == ["r2"]
        assert names("paku", "gate-12", "door_x") == []
    engine.set_rules([rule(type="window", cooldown_s=0)])  # what was remembered for the old rules is gone
    assert names("edgesentinel", "gate-1", "door_x", T0 + 1) == []
    assert names("edgesentinel", "gate-1", "window", T0 + 1) == ["r"]
    monkeypatch.setattr("gatewayd.core.alerts.engine._MATCHING_MAX", 10)
    for i in range(25):
        assert names("fam", f"d{i}", "window", T0 + 2) == ["r"]
    assert 0 < len(engine._matching) <= 10
