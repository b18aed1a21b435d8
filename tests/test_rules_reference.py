"""The reference tables as rules: docs/rules-example.toml, checked row by row.

Every row of the edgesentinel workflow table (seeds/000) and of the streetlight health
metrics table (seeds/001) has a rule in the example file, a scenario in which it must
fire and one in which it must stay quiet. The engine is driven with explicit times.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd.core.alerts.engine import RuleEngine
from gatewayd.core.alerts.events import Event, parse_time
from gatewayd.core.config import load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "rules-example.toml"
T0 = parse_time("2026-03-02T12:00:00Z")  # 13:00 at the site (+01:00): operating hours
NIGHT = parse_time("2026-03-02T22:30:00Z")  # 23:30 at the site


def rules():
    return load_config(None, [], {}, text=EXAMPLE.read_text()).rules


def ev(t, family, type, data=None, **kw):
    return ("event", t, Event(family, kw.pop("device", "dev-1"), type, kw.pop("severity", "info"), data or {},
                              ts=t, **kw))


def tick(t):
    return ("tick", t, None)


def run(steps):
    """Feed the steps to a fresh engine; return (rule, level) of every firing in order."""
    engine = RuleEngine(rules())
    fired = []
    for kind, t, event in steps:
        out = engine.on_event(event, t) if kind == "event" else engine.due(t)
        fired += [(f.rule.name, f.level) for f in out]
    return fired


ES, SL = "edgesentinel", "streetlight"

# (rule, table row, scenario that must fire it, scenario that must not)
CASES = [
    ("es-connectivity-lost", "connectivity_lost: duration > 5 min",
     [ev(T0, ES, "connectivity_lost", resolved=False), tick(T0 + 301)],
     [ev(T0, ES, "connectivity_lost", resolved=False), ev(T0 + 200, ES, "connectivity_restored"), tick(T0 + 400)]),
    ("es-connectivity-lost", "connectivity_lost: a reported duration > 5 min",
     [ev(T0, ES, "connectivity_lost", duration_s=420.0, resolved=True)],
     [ev(T0, ES, "connectivity_lost", duration_s=240.0, resolved=True), tick(T0 + 400)]),
    ("es-power-outage", "power_outage: severity = critical",
     [ev(T0, ES, "power_outage", severity="critical")],
     [ev(T0, ES, "power_outage", severity="warning")]),
    ("es-safe-shutdown", "safe_shutdown_initiated: any occurrence",
     [ev(T0, ES, "safe_shutdown_initiated")],
     [ev(T0, ES, "safe_shutdown_completed"), ev(T0, SL, "safe_shutdown_initiated")]),
    ("es-supercap-low", "supercap_low: voltage < 80% rated",
     [ev(T0, ES, "supercap_low", {"voltage": 3.9, "rated_voltage": 5.0})],
     [ev(T0, ES, "supercap_low", {"voltage": 4.1, "rated_voltage": 5.0}),
      ev(T0 + 1, ES, "supercap_low", {"voltage": 3.0})]),  # no rated voltage: cannot judge, no alert
    ("es-safety-edge-frequency", "safety_edge_triggered: frequency > threshold",
     [ev(T0 + i * 60, ES, "safety_edge_triggered") for i in range(4)],
     [ev(T0 + i * 300, ES, "safety_edge_triggered") for i in range(4)]),  # 4 in 15 min: 3 per 10 min
    ("es-emergency-stop", "emergency_stop_activated: any activation",
     [ev(T0, ES, "emergency_stop_activated")],
     [ev(T0, ES, "emergency_stop_released")]),
    ("es-light-curtain-after-hours", "light_curtain_breach: outside operating hours",
     [ev(NIGHT, ES, "light_curtain_breach")],
     [ev(T0, ES, "light_curtain_breach")]),
    ("es-server-unreachable", "server_unreachable: retry count > 5",
     [ev(T0, ES, "server_unreachable", {"retry_count": 6})],
     [ev(T0, ES, "server_unreachable", {"retry_count": 5})]),
    ("es-sensor-fault", "sensor_fault: any sensor failure",
     [ev(T0, ES, "sensor_fault", {"sensor": "voltage"})],
     [ev(T0, ES, "sensor_ok", {"sensor": "voltage"})]),
    ("es-tamper", "tamper_detected: security event",
     [ev(T0, ES, "tamper_detected", severity="critical")],
     [ev(T0, ES, "door_opened")]),
    ("es-sd-error", "sd_error: storage failure",
     [ev(T0, ES, "sd_error", {"errno": 5}, severity="critical")],
     [ev(T0, ES, "sd_ok")]),
    ("sl-device-offline", "last status > 2 min: device offline",
     [ev(T0, SL, "status"), ev(T0 + 30, SL, "status"), tick(T0 + 151)],
     [ev(T0 + i * 30, SL, "status") for i in range(10)] + [tick(T0 + 300)]),
    ("sl-battery-critical", "battery < 10%: critical low",
     [ev(T0, SL, "status", {"battery_percentage": 9})],
     [ev(T0, SL, "status", {"battery_percentage": 10}), ev(T0 + 1, SL, "status", {"battery_percentage": None})]),
    ("sl-overheating", "temperature > 65°C: overheating",
     [ev(T0, SL, "status", {"temperature_celsius": 65.5})],
     [ev(T0, SL, "status", {"temperature_celsius": 65.0})]),
    ("sl-poor-signal", "GSM signal < 10 dBm: poor connectivity",
     [ev(T0, SL, "status", {"gsm_signal_strength": 8})],
     [ev(T0, SL, "status", {"gsm_signal_strength": 82})]),
    ("sl-error-rate", "error rate > 5/hour: device malfunction",
     [ev(T0 + i * 600, SL, "error") for i in range(6)],
     [ev(T0 + i * 900, SL, "error") for i in range(6)]),  # 6 errors over 75 min: at most 5 in any hour
]


def test_the_example_file_loads_and_names_every_rule_once():
    names = [r.name for r in rules()]
    assert len(names) == len(set(names)) == 16
    assert {name for name, *_ in CASES} == set(names)


@pytest.mark.parametrize("name,row,firing,quiet", CASES, ids=[c[1].split(":")[0] + "-" + c[0] for c in CASES])
def test_reference_row_fires(name, row, firing, quiet):
    assert (name, "alert") in run(firing), f"{row}: expected {name} to fire"


@pytest.mark.parametrize("name,row,firing,quiet", CASES, ids=[c[1].split(":")[0] + "-" + c[0] for c in CASES])
def test_reference_row_stays_quiet(name, row, firing, quiet):
    assert (name, "alert") not in run(quiet), f"{row}: {name} fired when it should not"


def test_connectivity_lost_escalates_after_30_minutes_unresolved():
    steps = [ev(T0, ES, "connectivity_lost", resolved=False), tick(T0 + 301), tick(T0 + 1799), tick(T0 + 1800)]
    assert run(steps) == [("es-connectivity-lost", "alert"), ("es-connectivity-lost", "escalation")]


def test_connectivity_restored_before_30_minutes_does_not_escalate():
    steps = [ev(T0, ES, "connectivity_lost", resolved=False), tick(T0 + 301),
             ev(T0 + 900, ES, "connectivity_restored"), tick(T0 + 3600)]
    assert run(steps) == [("es-connectivity-lost", "alert")]


def test_sensor_fault_mutes_the_affected_alerts_until_it_resolves():
    low = {"voltage": 1.0, "rated_voltage": 5.0}
    steps = [
        ev(T0, ES, "sensor_fault", {"sensor": "voltage"}),
        ev(T0 + 10, ES, "supercap_low", low),                      # muted: the sensor is broken
        ev(T0 + 20, ES, "supercap_low", low, device="dev-2"),      # another device: not muted
        ev(T0 + 30, ES, "sensor_fault", {"sensor": "voltage"}, resolved=True),
        ev(T0 + 40, ES, "supercap_low", low),                      # fixed: alerts again
    ]
    assert run(steps) == [("es-sensor-fault", "alert"), ("es-supercap-low", "alert"), ("es-supercap-low", "alert")]


def test_streetlight_offline_fires_once_per_silence_and_rearms():
    steps = [ev(T0, SL, "status"), tick(T0 + 121), tick(T0 + 500), ev(T0 + 600, SL, "status"), tick(T0 + 721)]
    # One alert per silence; the second comes 600 s after the first, past the 300 s cooldown.
    assert run(steps) == [("sl-device-offline", "alert"), ("sl-device-offline", "alert")]
