"""paku's message parsing, without a broker: topics, JSON objects, timestamps, state, acks."""

import pytest

from gatewayd.plugins.api import Rejected
from gatewayd_paku.messages import (
    Ack,
    Topic,
    decode_object,
    is_alert,
    message_ts,
    parse_ack,
    parse_state,
    parse_topic,
    render_command,
)


def reason(fn, *args, **kwargs) -> str:
    with pytest.raises(Rejected) as e:
        fn(*args, **kwargs)
    return e.value.reason


def test_topics():
    assert parse_topic("paku/pk-1/telemetry", "paku") == Topic("pk-1", "telemetry")
    assert parse_topic("paku/pk-1/state", "paku") == Topic("pk-1", "state")
    assert parse_topic("paku/pk-1/event/button", "paku") == Topic("pk-1", "event", "button")
    assert reason(parse_topic, "paku/pk-1/event", "paku").startswith("event name ''")
    assert reason(parse_topic, "paku/pk-1/event/a/b", "paku").startswith("event name 'a/b'")
    assert reason(parse_topic, "paku/pk-1/cmd", "paku").startswith("unexpected topic")
    assert reason(parse_topic, "other/pk-1/telemetry", "paku").startswith("unexpected topic")


def test_json_objects():
    assert decode_object(b'{"a": 1}', 100) == {"a": 1}
    assert decode_object(b"  ", 100, empty_ok=True) == {}
    assert reason(decode_object, b"", 100) == "payload: not JSON (Expecting value: line 1 column 1 (char 0))"
    assert reason(decode_object, b'{"a": 1,}', 100).startswith("payload: not JSON (Expecting property name")
    assert reason(decode_object, b'"x"', 100) == "expected a JSON object, got a string"
    assert reason(decode_object, b'{"a": Infinity}', 100) == "a: Infinity is not a JSON number (only finite numbers are)"
    assert reason(decode_object, b"\xc3\x28", 100) == "payload: not UTF-8 (byte 0xc3 at offset 0)"
    assert reason(decode_object, b"{}" * 60, 100) == "payload of 120 bytes is over the limit of 100"
    # What wedged ingest (issue 14): 1,001-deep nesting, integers no column can hold.
    assert reason(decode_object, b"[" * 1001 + b"]" * 1001, 5000) == "payload: nested deeper than 64 levels"
    assert reason(decode_object, b'{"a":' * 5000 + b"1" + b"}" * 5000, 50000) == "payload: nested deeper than 64 levels"
    assert reason(decode_object, b'{"n": 99999999999999999999999}', 100).startswith("n: 99999999999999999999999 is outside")


def test_rssi_must_fit_a_signal_strength():
    assert parse_state(b'{"rssi": -61.5}', 1000).rssi == -61
    assert reason(parse_state, b'{"rssi": 1e300}', 1000).startswith("rssi: expected a signal strength in dBm")
    assert reason(parse_state, b'{"rssi": 99999999999999999999999}', 1000).startswith("rssi: 99999999999999999999999 is outside")


def test_timestamps():
    now = 1_767_225_600.0
    assert message_ts({}, now) == now
    assert message_ts({"ts": 1_767_225_601}, now) == 1_767_225_601.0
    assert message_ts({"ts": "2026-01-01T00:00:02Z"}, now) == now + 2
    assert message_ts({"ts": "2026-01-01T01:00:02+01:00"}, now) == now + 2
    assert reason(message_ts, {"ts": "yesterday"}, now).startswith("ts: expected epoch seconds")
    assert reason(message_ts, {"ts": True}, now) == "ts: expected epoch seconds or an ISO 8601 time, got a boolean"
    assert "milliseconds" in reason(message_ts, {"ts": now * 1000}, now)


def test_state():
    s = parse_state(b'{"status": "online", "rssi": -70.4, "fwVersion": "1.2.0"}', 1000)
    assert (s.online, s.rssi, s.fw_version, s.ack) == (True, -70, "1.2.0", None)
    assert parse_state(b"offline", 1000).online is False  # a bare last will
    assert parse_state(b'{"online": true, "cmdAck": "c1"}', 1000).ack == Ack("c1", True)
    assert parse_state(b'{"rssi": -50}', 1000).online is None
    assert reason(parse_state, b'{"status": "asleep"}', 1000).startswith("status: expected 'online' or 'offline'")
    assert reason(parse_state, b'{"status": "online", "online": false}', 1000).startswith("status 'online' contradicts")
    assert reason(parse_state, b'{"fwVersion": 2}', 1000).startswith("fwVersion: expected a version string")
    assert reason(parse_state, b'{"online": "yes"}', 1000) == "online: expected true or false, got 'yes'"


def test_acks():
    assert parse_ack({"id": "c1", "ok": False, "result": {"err": 3}}) == Ack("c1", False, {"err": 3})
    assert parse_ack({"id": "c1"}) == Ack("c1", True)
    assert reason(parse_ack, {"ok": True}).startswith("ack: 'id' must be")
    assert reason(parse_ack, {"id": "c1", "ok": "yes"}) == "ack: 'ok' must be true or false, got 'yes'"
    assert reason(parse_ack, [1]).startswith("ack: expected")


def test_alerts_and_commands():
    patterns = ["error*", "*error", "alarm*", "panic"]
    assert is_alert("error", patterns) and is_alert("sensor_error", patterns) and is_alert("Alarm_high", patterns)
    assert not is_alert("button", patterns) and not is_alert("panicked", patterns)

    class Cmd:
        id, payload = "c9", {"action": "blink", "id": "spoofed"}

    assert render_command(Cmd) == b'{"action":"blink","id":"c9"}'
