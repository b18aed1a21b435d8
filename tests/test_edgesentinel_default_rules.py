"""edgesentinel's default rules (plugins/edgesentinel/gatewayd_edgesentinel/workflows.py),
row by row of the specification's workflow table (seeds/000), in the core rule engine as
the gateway loads them: each row fires in its scenario and stays quiet in another; the
silence escalates L1 -> L2 -> L3; a sensor fault mutes the threshold rules; related
events are grouped. (tests/test_rules_reference.py checks docs/rules-example.toml, a
separate copy of the table; these are the rules a site gets without writing any.)"""

from __future__ import annotations

import pytest
from gatewayd_edgesentinel.config import EdgesentinelConfig
from gatewayd_edgesentinel.workflows import rules as default_rules

from gatewayd.core.alerts.engine import RuleEngine
from gatewayd.core.alerts.events import Event, parse_time
from gatewayd.core.alerts.rules import rule_from_dict

T0 = parse_time("2026-03-02T12:00:00Z")  # inside the default operating hours, 07:00-19:00 UTC
NIGHT = parse_time("2026-03-02T22:30:00Z")
ES = "edgesentinel"


def engine() -> RuleEngine:
    raw = default_rules(ES, EdgesentinelConfig())
    return RuleEngine([rule_from_dict(r, f"plugins.{ES}.alert_rules[{i}]", source=f"plugin:{ES}", family=ES)
                       for i, r in enumerate(raw)])


def ev(t, type, data=None, **kw):
    return ("event", t, Event(ES, kw.pop("device", "es-1"), type, kw.pop("severity", "info"), data or {}, ts=t, **kw))


def tick(t):
    return ("tick", t, None)


def run(steps, rules=None):
    rules = rules or engine()
    fired = []
    for kind, t, event in steps:
        out = rules.on_event(event, t) if kind == "event" else rules.due(t)
        fired += [(f.rule.name.removeprefix(f"{ES}-"), f.level, f.grouped) for f in out]
    return fired


CASES = [
    ("connectivity-lost", "connectivity_lost: silent > 5 min (device_offline after silence_s, 120 s)",
     [ev(T0, "device_offline", resolved=False), tick(T0 + 181)],
     [ev(T0, "device_offline", resolved=False), ev(T0 + 170, "device_online"), tick(T0 + 400)]),
    ("power-outage", "power_outage: severity = critical",
     [ev(T0, "power_outage", severity="critical")], [ev(T0, "power_outage", severity="warning")]),
    ("safe-shutdown", "safe_shutdown_initiated: any occurrence",
     [ev(T0, "safe_shutdown_initiated")], [ev(T0, "safe_shutdown_completed")]),
    ("supercap-low", "supercap_low: voltage < 80% rated",
     [ev(T0, "supercap_low", {"voltage": 9.0, "rated_voltage": 12.0})],
     [ev(T0, "supercap_low", {"voltage": 10.0, "rated_voltage": 12.0})]),
    ("supercap-low-pct", "supercap_low: voltage_pct < 80",
     [ev(T0, "supercap_low", {"voltage_pct": 76})], [ev(T0, "supercap_low", {"voltage_pct": 81})]),
    ("safety-edge", "safety_edge_triggered: more than 3 in 10 min",
     [ev(T0 + i * 60, "safety_edge_triggered") for i in range(4)],
     [ev(T0 + i * 300, "safety_edge_triggered") for i in range(4)]),
    ("emergency-stop", "emergency_stop_activated: any activation",
     [ev(T0, "emergency_stop_activated")], [ev(T0, "emergency_stop_released")]),
    ("light-curtain", "light_curtain_breach: only outside operating hours",
     [ev(NIGHT, "light_curtain_breach")], [ev(T0, "light_curtain_breach")]),
    ("server-unreachable", "server_unreachable: retry count > 5",
     [ev(T0, "server_unreachable", {"retry_count": 6})], [ev(T0, "server_unreachable", {"retry_count": 5})]),
    ("server-unreachable", "a batch's diagnostics.retry_count > 5",
     [ev(T0, "upload_diagnostics", {"retry_count": 6})], [ev(T0, "upload_diagnostics", {"retry_count": 5})]),
    ("sensor-fault", "sensor_fault: any sensor failure",
     [ev(T0, "sensor_fault", {"sensor": "voltage"})], [ev(T0, "sensor_ok", {"sensor": "voltage"})]),
    ("tamper", "tamper_detected: security event",
     [ev(T0, "tamper_detected", severity="critical")], [ev(T0, "door_opened")]),
    ("sd-error", "sd_error: storage failure", [ev(T0, "sd_error", severity="critical")], [ev(T0, "sd_ok")]),
]


@pytest.mark.parametrize("name, row, firing, quiet", CASES, ids=[c[1] for c in CASES])
def test_each_row_fires_in_its_scenario_and_stays_quiet_in_another(name, row, firing, quiet):
    assert (name, "alert") in [(n, level) for n, level, _ in run(firing)], row
    assert name not in [n for n, *_ in run(quiet)], row


def test_the_eleven_rows_each_have_a_default_rule():
    names = {r["name"].removeprefix(f"{ES}-") for r in default_rules(ES, EdgesentinelConfig())}
    assert {c[0] for c in CASES} <= names


def test_silence_escalates_l1_l2_l3_by_time():
    steps = [ev(T0, "device_offline", resolved=False), tick(T0 + 181), tick(T0 + 1679), tick(T0 + 1681),
             tick(T0 + 3479), tick(T0 + 3481)]
    assert [(n, level) for n, level, _ in run(steps)] == [
        ("connectivity-lost", "alert"), ("connectivity-lost", "escalation"), ("connectivity-lost-l3", "alert")]
    back = [ev(T0, "device_offline", resolved=False), tick(T0 + 181), ev(T0 + 600, "device_online"),
            tick(T0 + 4000)]
    assert [(n, level) for n, level, _ in run(back)] == [("connectivity-lost", "alert")]  # back: no L2, no L3


def test_a_sensor_fault_mutes_the_threshold_rules_of_its_device():
    steps = [ev(T0, "sensor_fault", {"sensor": "voltage"}), ev(T0 + 10, "supercap_low", {"voltage_pct": 50}),
             ev(T0 + 10, "supercap_low", {"voltage_pct": 50}, device="es-2")]
    fired = run(steps)
    assert [n for n, *_ in fired] == ["sensor-fault", "supercap-low-pct"], fired  # es-2's only


def test_related_events_are_grouped_against_alert_fatigue():
    steps = [ev(T0 + i * 30, "over_torque", {"value": 45.0}) for i in range(5)] + [ev(T0 + 400, "over_torque")]
    fired = run(steps)
    assert fired == [("over-torque", "alert", 0), ("over-torque", "alert", 4)], fired  # 4 grouped into the next
