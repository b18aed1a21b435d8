"""The pure parts: the indicator and cadence rules (section 9, section 2), commands' checks."""

from __future__ import annotations

import pytest

from gatewayd_streetlight import commands
from gatewayd_streetlight.config import Health
from gatewayd_streetlight.health import assess, next_update_seconds, poll_seconds
from gatewayd_streetlight.messages import Invalid, read_status

from gatewayd.plugins.api import BadJSON

H = Health()
NORMAL = {"power_state": "on", "battery": 95.0, "temperature": 40.0, "gsm_signal": 80.0}


@pytest.mark.parametrize(("latest", "silent", "errors", "colour", "reason"), [
    (None, None, 0, "gray", "never reported a status"),
    (NORMAL, 5.0, 0, "green", "online, all metrics normal"),
    (NORMAL, 121.0, 0, "yellow", "offline"),
    ({**NORMAL, "battery": 15.0}, 5.0, 0, "yellow", "battery low (15.0 %)"),
    ({**NORMAL, "gsm_signal": 9.0}, 5.0, 0, "yellow", "poor signal (9.0)"),
    ({**NORMAL, "battery": 9.0}, 5.0, 0, "red", "battery critical (9.0 %)"),
    ({**NORMAL, "temperature": 65.5}, 5.0, 0, "red", "overheating (65.5 °C)"),
    (NORMAL, 5.0, 6, "red", "malfunction (6 errors in the last hour)"),
    (NORMAL, 5.0, 5, "green", "online, all metrics normal"),
    ({**NORMAL, "power_state": "error"}, 5.0, 0, "red", "the light reports an error"),
    ({**NORMAL, "battery": 9.0}, 500.0, 0, "yellow", "offline"),
])
def test_the_indicator(latest, silent, errors, colour, reason):
    result = assess(latest, silent, errors, H)
    assert (result.indicator, result.reason) == (colour, reason)


def test_thresholds_come_from_the_config():
    strict = Health(battery_critical_pct=50, battery_low_pct=60)
    assert assess({**NORMAL, "battery": 45.0}, 1.0, 0, strict).indicator == "red"


def test_cadence_and_poll_interval():
    assert next_update_seconds(NORMAL, H) == 30
    assert next_update_seconds({**NORMAL, "temperature": 60.5}, H) == 10
    assert next_update_seconds({**NORMAL, "battery": 19.0}, H) == 10
    assert poll_seconds(NORMAL, False, H) == 10
    assert poll_seconds({**NORMAL, "battery": 19.0}, False, H) == 60
    assert poll_seconds({**NORMAL, "battery": 19.0}, True, H) == 2
    assert poll_seconds(None, False, H) == 10


def test_commands_are_normalised_with_the_specifications_priorities():
    assert commands.check({"command_type": "power_control", "action": "on"}) == {
        "command_type": "power_control", "action": "on", "priority": "high"}
    assert commands.check({"command_type": "brightness_control", "brightness_level": 75})["priority"] == "normal"
    schedule = {"command_type": "schedule_update", "schedule": {"enabled": False}}
    assert commands.check(schedule)["priority"] == "low"
    assert commands.check({**schedule, "priority": "high"})["priority"] == "high"
    for bad, message in (([], "expected a JSON object"),
                         ({"command_type": "power_control", "action": "dim"}, "action:"),
                         ({"command_type": "brightness_control", "brightness_level": 101}, "brightness_level:"),
                         ({"command_type": "brightness_control", "brightness_level": True}, "brightness_level:"),
                         ({"command_type": "schedule_update"}, "schedule: required"),
                         ({"command_type": "schedule_update", "schedule": {"when": 1}}, "schedule.when: unknown"),
                         ({"command_type": "power_control", "action": "on", "priority": "urgent"}, "priority:")):
        with pytest.raises(ValueError, match=message):
            commands.check(bad)


def test_both_status_forms():
    full = read_status({"status": {"power_state": "on", "battery_percentage": 95, "error_flags": ["a", "a"]}})
    compact = read_status({"status": "on", "battery": 95, "temperature_celsius": 61})
    assert (full.power_state, full.battery, full.error_flags) == ("on", 95.0, ("a",))
    assert (compact.power_state, compact.battery, compact.temperature) == ("on", 95.0, 61.0)


@pytest.mark.parametrize(("doc", "message"), [
    ({"brightness": 3}, "status: required"),  # the declaration's, as on the HTTP route
    ({"status": "dim"}, "status: expected"),
    ({"status": {"battery_percentage": 140}}, "status.battery_percentage: expected"),
    ({"status": "on", "timestamp": "1970-01-01T00:00:00Z"}, "timestamp: '1970-01-01T00:00:00Z' is not between"),
    ({"status": "on", "timestamp": "yesterday"}, "timestamp: expected an ISO 8601 time"),
])
def test_an_mqtt_status_is_checked_as_the_route_checks_it(doc, message):
    with pytest.raises((BadJSON, Invalid), match=message):
        read_status(doc)
