"""Review of the rule-match memory (commit b4631ef): the rules an event matches, remembered
per (family, device, type), must be what the globs say every time, with glob characters in
the event's own names, across rule sets replaced at run time and past the memory's bound."""

from __future__ import annotations

import fnmatch

from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.core.alerts import engine as engine_module
from gatewayd.core.alerts.engine import RuleEngine
from gatewayd.core.alerts.events import Event
from gatewayd.core.alerts.rules import rule_from_dict

_names = st.sampled_from(["", "a", "b", "ab", "*", "?", "[a]", "[!a]", "a*", "a?b", "[", "]", "\\", "gate-1", "A"])
_globs = st.sampled_from(["a", "*", "?", "a*", "[ab]", "[!a]*", "\\*", "[*]", "[[]", "gate-?", "A"])


def _rule(i: int, family: str | None, device: str | None, types: list[str]) -> object:
    fields: dict = {"name": f"r{i}", "actions": [{"kind": "log"}], "cooldown_s": 0}
    if family:
        fields["family"] = family
    if device:
        fields["device"] = device
    if types:
        fields["type"] = types
    return rule_from_dict(fields, f"rules[{i}]")


_rules = st.lists(st.builds(lambda f, d, t: (f, d, t), st.none() | _globs, st.none() | _globs,
                            st.lists(_globs, max_size=2)), max_size=5)


def _expected(rules, family, device, type_):
    by_source = [r for r in rules if (not r.family or fnmatch.fnmatchcase(family or "", r.family))
                 and (not r.device or fnmatch.fnmatchcase(device or "", r.device))]
    return by_source, [r for r in by_source if not r.types or any(fnmatch.fnmatchcase(type_, t) for t in r.types)]


@settings(max_examples=300, deadline=None)
@given(st.lists(_rules, min_size=1, max_size=3),
       st.lists(st.tuples(_names | st.none(), _names | st.none(), _names), min_size=1, max_size=30))
def test_remembered_matches_are_the_globs_answers_across_rule_sets(rule_sets, events):
    engine = RuleEngine([])
    for specs in rule_sets:
        rules = [_rule(i, *spec) for i, spec in enumerate(specs)]
        engine.set_rules(rules)
        for _ in range(2):  # the second pass answers from memory
            for family, device, type_ in events:
                ev = Event(family, device, type_, "info", {}, ts=0.0)
                got = engine._matching_rules(ev)
                want = _expected(rules, family, device, type_)
                assert (list(got[0]), list(got[1])) == want, (family, device, type_)


def test_the_memory_stays_bounded_under_many_devices(monkeypatch):
    monkeypatch.setattr(engine_module, "_MATCHING_MAX", 100)
    engine = RuleEngine([_rule(0, None, "d-*", [])])
    for i in range(1000):
        matched = engine._matching_rules(Event("fam", f"d-{i}", "t", "info", {}, ts=0.0))[1]
        assert [r.name for r in matched] == ["r0"]
        assert len(engine._matching) <= 100
