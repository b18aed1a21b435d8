"""What devices and apps send, the security rules and the state it makes: pure, no gateway."""

import json
from datetime import datetime, timezone

import pytest

from gatewayd.plugins.api import BadJSON, convert, parse_json
from gatewayd_thingsnxt.config import KeyRules, Security
from gatewayd_thingsnxt.telemetry import (
    BulkIn,
    DeviceState,
    TelemetryIn,
    Limits,
    iso,
    latest_answer,
    legacy_answer,
    parse_app_values,
    parse_bulk,
    parse_telemetry,
    policy_for,
    same,
    v2_answer,
)

LIMITS = Limits(max_keys=4, max_data_bytes=200, max_bulk=3)
NOW = datetime(2026, 2, 12, 16, 0, tzinfo=timezone.utc).timestamp()


def telemetry(doc):
    """What the route does: the declared body (converted as the route's declaration does), then checked."""
    return parse_telemetry(convert(doc, TelemetryIn), LIMITS)


def bulk(doc):
    return parse_bulk(convert(doc, BulkIn), LIMITS, NOW)


def test_the_specifications_request_parses():
    doc = parse_json(b'{"device_token": "abc123", "data": {"v0": 1, "v1": 0, "temperature": 25.5}}')
    t = telemetry(doc)
    assert t.token == "abc123"
    [reading] = t.readings
    assert reading.data == {"v0": 1, "v1": 0, "temperature": 25.5} and reading.ts is None


def test_no_data_is_a_sign_of_life_and_other_fields_are_ignored():
    [reading] = telemetry({"device_token": "t", "device_id": "x"}).readings
    assert reading.data == {}


@pytest.mark.parametrize("doc, message", [
    ({"data": {}}, "device_token: required"),
    ({"device_token": 5}, "device_token: expected a string, got 5"),
    ({"device_token": ""}, "device_token: expected a string of length >= 1"),
    ({"device_token": "t" * 257}, "device_token: expected a string of length <= 256"),
    ({"device_token": "t", "data": [1]}, "data: expected an object, got [1]"),
    ({"device_token": "t", "data": None}, "data: expected an object, got null"),
    ({"device_token": "t", "data": {"a b": 1}}, "data: key 'a b': expected 1-64 of letters, digits and _ . : -"),
    ({"device_token": "t", "data": {"k" * 65: 1}}, "data: key 'kkkk"),
    ({"device_token": "t", "data": dict.fromkeys("abcde", 1)}, "data: at most 4 keys, got 5"),
    ({"device_token": "t", "data": {"a": "x" * 200}}, "data: at most 200 bytes as JSON, got 208"),
])
def test_bad_telemetry_is_refused_naming_the_field(doc, message):
    with pytest.raises(BadJSON) as e:
        telemetry(doc)
    assert str(e.value).startswith(message), str(e.value)


def test_a_bulk_request_is_sorted_oldest_first():
    doc = {"device_token": "t", "readings": [
        {"timestamp": "2026-02-12T15:59:00Z", "data": {"t": 2}},
        {"timestamp": NOW - 120, "data": {"t": 1}},
        {"timestamp": "2026-02-12T15:59:00+00:00", "data": {"t": 3}},
    ]}
    t = bulk(doc)
    assert [(r.ts, r.data["t"]) for r in t.readings] == [(NOW - 120, 1), (NOW - 60, 2), (NOW - 60, 3)]


@pytest.mark.parametrize("readings, message", [
    (None, "readings: expected an array, got null"),
    ([], "readings: expected an array of length >= 1"),
    ([{"timestamp": NOW}] * 4, "readings: at most 3 in one request, got 4"),
    ([5], "readings[0]: expected an object"),
    ([{"data": {}}], "readings[0].timestamp: required"),
    ([{"timestamp": True}], "readings[0].timestamp: expected a number or a string, got true"),
    ([{"timestamp": "yesterday"}], "readings[0].timestamp: expected an ISO 8601 time (2026-01-02T03:04:05Z)"),
    ([{"timestamp": NOW * 1000}], "readings[0].timestamp: 1770912000000.0 is not a plausible time"),
    ([{"timestamp": NOW + 3600}], "readings[0].timestamp: 2026-02-12T17:00:00.000Z is in the future"),
    ([{"timestamp": NOW, "data": {"x": [1]}}, {"timestamp": NOW, "data": 3}], "readings[1].data: expected an object"),
])
def test_bad_bulk_requests_are_refused_naming_the_reading(readings, message):
    with pytest.raises(BadJSON) as e:
        bulk({"device_token": "t", "readings": readings})
    assert str(e.value).startswith(message), str(e.value)


def test_an_app_sets_scalars():
    assert parse_app_values({"data": {"v0": 1, "label": "on", "v1": False}}, LIMITS) == \
        {"v0": 1, "label": "on", "v1": False}
    for doc, message in (({}, "data: expected an object"), ({"data": {}}, "data: expected at least one key"),
                         ({"data": {"v0": None}}, "data.v0: expected a number, a string or true/false, got null"),
                         ({"data": {"v0": [1]}}, "data.v0: expected a number, a string or true/false, got an array")):
        with pytest.raises(BadJSON, match=message.replace("(", r"\(")):
            parse_app_values(doc, LIMITS)


def test_the_security_rules_come_from_the_device_then_its_model_then_the_default():
    security = Security(device_writes=["*"], app_sets=["v*"],
                        models={"relay": KeyRules(device_writes=["temperature", "v9"])},
                        devices={"esp-7": KeyRules(app_sets=["v0"])})
    default = policy_for(security, "esp-1", "")
    assert default.device_refused({"anything": 1}) == [] and default.app_refused({"v3": 1, "led": 1}) == ["led"]
    relay = policy_for(security, "esp-2", "relay")
    assert relay.device_refused({"temperature": 1, "v0": 1, "v9": 0}) == ["v0"]
    assert relay.app_refused({"v3": 1}) == []  # the default's app_sets: the model gave none
    seven = policy_for(security, "esp-7", "relay")
    assert seven.app_refused({"v0": 1, "v1": 1}) == ["v1"] and seven.device_refused({"v0": 1}) == ["v0"]
    nothing = policy_for(Security(app_sets=[]), "esp-1", "")
    assert nothing.app_refused({"v0": 1}) == ["v0"]


def test_the_device_writes_its_keys_and_reads_the_whole_state():
    state, changed = DeviceState().with_device({"v0": 1, "temperature": 25.5}, NOW)
    assert state.data == {"v0": 1, "temperature": 25.5} and changed == state.data and state.ts == NOW
    state, changed = state.with_device({"temperature": 25.5, "humidity": 40}, NOW + 10)
    assert changed == {"humidity": 40}  # the same temperature is no change
    assert state.data == {"v0": 1, "temperature": 25.5, "humidity": 40}
    assert state.stamps == {"v0": NOW, "temperature": NOW + 10, "humidity": NOW + 10}


def test_a_value_an_app_set_waits_for_the_device_to_report_it():
    state, _ = DeviceState().with_device({"v0": 0, "v1": 0}, NOW)
    state = state.with_app({"v0": 1}, NOW + 1)
    assert state.data["v0"] == 1 and state.pending == {"v0": 1}
    # The device had not polled yet: it reports its old LED; the app's value stands.
    state, changed = state.with_device({"v0": 0, "v1": 0}, NOW + 2)
    assert state.data == {"v0": 1, "v1": 0} and changed == {} and state.pending == {"v0": 1}
    # It synced its LED from the answer and reports it: confirmed.
    state, changed = state.with_device({"v0": 1}, NOW + 3)
    assert state.pending == {} and changed == {}
    # From now on the device's own changes count again (a button on the board).
    state, changed = state.with_device({"v0": 0}, NOW + 4)
    assert state.data["v0"] == 0 and changed == {"v0": 0}


def test_an_older_reading_does_not_replace_a_newer_value():
    state, _ = DeviceState().with_device({"t": 20}, NOW)
    state, changed = state.with_device({"t": 10, "h": 5}, NOW - 60)  # cached while offline
    assert state.data == {"t": 20, "h": 5} and changed == {"h": 5} and state.ts == NOW


def test_pin_values_compare_as_json():
    assert same(1, 1.0) and not same(1, True) and not same(0, False) and same(True, True) and not same("1", 1)


def test_the_state_round_trips_through_json():
    state = DeviceState().with_app({"v0": 1}, NOW)
    back = DeviceState.from_json(state.to_json(), state.ts)
    assert back == state and json.loads(state.to_json())["pending"] == {"v0": 1}


def test_the_answers_have_the_specifications_shapes():
    state, _ = DeviceState().with_device({"v0": 1, "v1": 0, "temperature": 25.5}, NOW)
    assert v2_answer("6123456", state, NOW) == {"message": "ok", "device_id": "6123456",
                                                "data": {"v0": 1, "v1": 0, "temperature": 25.5},
                                                "timestamp": "2026-02-12T16:00:00.000Z"}
    legacy = legacy_answer("6123456", state, NOW + 0.25)
    assert legacy["led"] == 1 and legacy["updated_data"] == state.data and legacy["timestamp"].endswith(":00.250Z")
    assert legacy_answer("d", DeviceState(), NOW)["led"] == 0
    assert legacy_answer("d", DeviceState().with_app({"led": 0, "v0": 1}, NOW), NOW)["led"] == 0
    assert latest_answer("d", DeviceState()) == {"device_id": "d", "data": {}, "timestamp": None}
    assert latest_answer("d", state)["timestamp"] == "2026-02-12T16:00:00.000Z"


def test_iso_is_utc_with_milliseconds():
    assert iso(0) == "1970-01-01T00:00:00.000Z" and iso(NOW + 0.9999) == "2026-02-12T16:00:00.999Z"


def test_iso_of_times_in_one_second_and_across_seconds_reads_as_datetime_does():
    """iso keeps the last second's text: each time still reads as datetime formats it,
    at a second's edges too (where its rounding to microseconds carries)."""
    def datetime_iso(ts):
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"

    times = [NOW + s + f for s in (0, 1, 1, 0, 59, 3600) for f in (0.0, 0.0004, 0.5, 0.998, 0.9989, 0.999, 0.9999995)]
    assert [iso(ts) for ts in times] == [datetime_iso(ts) for ts in times]
    assert iso(NOW + 0.5) == "2026-02-12T16:00:00.500Z" and iso(NOW + 1.25) == "2026-02-12T16:00:01.250Z"


def test_the_state_text_is_the_whole_states_json_whatever_its_parts_kept():
    """to_json reuses the text of parts a state took over unchanged: it must read exactly as
    the whole encoded at once, through values that compare equal but are written otherwise."""
    from gatewayd_thingsnxt.telemetry import compact

    def whole(state):
        return compact({"data": state.data, "stamps": state.stamps, "pending": state.pending})

    steps = [("device", {"v0": 1, "t": 0.0}), ("device", {"v0": 1, "t": 0.0}), ("device", {"t": -0.0}),
             ("device", {"v0": 1.0}), ("device", {"v0": True}), ("device", {"v0": 1}), ("app", {"v1": "on"}),
             ("device", {"v1": "off"}), ("device", {"v1": "on"}), ("device", {"l": [1, 2]}), ("device", {"l": [1, 2.0]}),
             ("device", {"n": None}), ("device", {"n": None}), ("device", {"o": {"a": 1}}), ("device", {"o": {"a": 1.0}}),
             ("device", {"s": "é"}), ("device", {"s": "é", "t": 2.5})]
    state = DeviceState()
    for i, (who, values) in enumerate(steps):
        if who == "app":
            state = state.with_app(values, NOW + i)
        else:
            state, _ = state.with_device(values, NOW + i)
        assert state.to_json() == whole(state), (i, values)
        assert state.to_json() == whole(state)  # the second call reads its own kept parts
        assert DeviceState.from_json(state.to_json(), state.ts) == state
