"""The pure parts: window statistics against closed forms, the backpressure policy, the
profile and its ETag, the options' checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sentinel_testbed import PLUGIN

from gatewayd_edgesentinel.batch import BatchError, parse_batch, record_hash
from gatewayd_edgesentinel.config import Backpressure, DeviceSettings, EdgesentinelConfig, Team, Webhook
from gatewayd_edgesentinel.pressure import Degrade, judge, over_budget
from gatewayd_edgesentinel.profiles import effective, etag, matches
from gatewayd_edgesentinel.windows import pack, unpack, window_stats
from gatewayd_edgesentinel.workflows import rules, team_actions

BANDS = {"vibration": [[10.0, 100.0], [100.0, 500.0]]}


def sine(amplitude: float, hz: float, rate: float = 1000.0, n: int = 2048, phase: float = 0.0) -> list[float]:
    t = np.arange(n) / rate
    return (amplitude * np.sin(2 * math.pi * hz * t + phase)).tolist()


@pytest.mark.parametrize("amplitude, hz", [(1.0, 50.0), (3.0, 250.0), (0.5, 80.0)])
def test_a_pure_sine_has_its_closed_form_statistics(amplitude, hz):
    [stats] = window_stats([(0.0, "vibration", 1000.0, sine(amplitude, hz))], BANDS)
    assert stats["rms"] == pytest.approx(amplitude / math.sqrt(2), rel=1e-3)
    assert stats["std"] == pytest.approx(amplitude / math.sqrt(2), rel=1e-3)
    assert stats["max"] == pytest.approx(amplitude, rel=1e-2)
    inside, outside = ("10-100", "100-500") if hz < 100 else ("100-500", "10-100")
    assert stats["bandpower"][inside] == pytest.approx(amplitude**2 / 2, rel=0.05)  # a sine's power: A²/2
    assert stats["bandpower"][outside] < 1e-3 * amplitude**2


def test_the_statistics_of_a_batch_are_each_waveforms_own():
    # Grouped by (metric, rate, length) and vectorised: the answer must not mix rows.
    waves = [(0.0, "vibration", 1000.0, sine(1.0, 50.0)), (0.0, "current", 500.0, sine(2.0, 50.0, 500.0, 512)),
             (0.0, "vibration", 1000.0, sine(2.0, 200.0)), (0.0, "vibration", 1000.0, [0.5] * 2048)]
    stats = window_stats(waves, BANDS)
    assert [s["rms"] for s in stats] == pytest.approx([1 / math.sqrt(2), 2 / math.sqrt(2), 2 / math.sqrt(2), 0.5],
                                                      rel=3e-3)  # 512 samples: not a whole number of cycles
    assert stats[3]["std"] == pytest.approx(0.0, abs=1e-12)
    assert stats[1]["bandpower"] == {"0-250": pytest.approx(2.0, rel=0.05)}  # no bands: the whole band
    assert [s["samples"] for s in stats] == [2048, 512, 2048, 2048]


def test_raw_samples_round_trip_as_float32():
    samples = sine(1.0, 50.0, n=64)
    assert unpack(pack(samples)) == pytest.approx(samples, abs=1e-6)
    assert len(pack(samples)) == 4 * 64


def test_the_backpressure_policy():
    policy = Backpressure()
    assert judge(0.5, 0, 0, policy).hint is None
    assert judge(0.7, 0, 0, policy).hint == "backoff_ms: 5000"
    assert judge(0.8, 0, 0, policy).hint == "backoff_ms: 15000"
    assert judge(0.9, 0, 0, policy).level == "reject" and judge(0.9, 0, 0, policy).backoff_ms == 25000
    assert judge(1.0, 0, 0, policy).backoff_ms == 300_000  # capped at max_backoff_ms
    assert judge(0.0, 0, 4, policy).level == "reject" and "4 batches" in judge(0.0, 0, 4, policy).reason
    assert judge(0.0, 200, 0, policy).level == "reject"
    degrade = Degrade(Backpressure(degrade_after_s=60))
    degrade.observe("elevated", "outbox 80% full", 100.0)
    assert degrade.factor(150.0) == 1.0 and degrade.factor(160.0) == 0.5
    degrade.observe("normal", "", 170.0)
    assert degrade.factor(1000.0) == 1.0


def test_the_memory_budget_of_batches_in_flight():
    policy = Backpressure(max_inflight_bytes=10 << 20, backoff_ms=700)
    assert over_budget(0, 16 << 20, policy) is None  # alone, a batch always fits (it is under the cap)
    assert over_budget(4 << 20, 6 << 20, policy) is None  # exactly the budget
    verdict = over_budget(4 << 20, (6 << 20) + 1, policy)
    assert verdict is not None and (verdict.level, verdict.hint) == ("reject", "backoff_ms: 700")
    assert verdict.reason == f"memory budget: {4 << 20} inflated bytes being stored"


def test_the_profile_merges_the_devices_overrides_and_its_etag_follows():
    config = EdgesentinelConfig()
    config.devices = {"es-9": DeviceSettings(sampling_hz={"vibration": 2000.0})}
    plain = effective(config, "es-1", "ES-100", "http://gw:8080/edgesentinel")
    tuned = effective(config, "es-9", "ES-100", "http://gw:8080/edgesentinel")
    assert plain["sampling_hz"]["vibration"] == 1000.0 and tuned["sampling_hz"]["vibration"] == 2000.0
    assert tuned["endpoints"]["telemetry"] == "http://gw:8080/edgesentinel/api/iot/v1/telemetry/batch"
    assert etag(plain) == etag(effective(config, "es-1", "ES-100", "http://gw:8080/edgesentinel"))
    assert etag(plain) != etag(effective(config, "es-1", "ES-100", "http://gw:8080/edgesentinel", 0.5, "busy"))
    assert matches(f'W/{etag(plain)}, "x"', etag(plain)) and matches("*", etag(plain)) and not matches("", "x")


def test_a_record_hash_ignores_key_order_and_nothing_else():
    a = record_hash("d", {"ts": 1, "type": "cycle_open", "door_id": "d1"})
    assert a == record_hash("d", {"door_id": "d1", "type": "cycle_open", "ts": 1})
    assert a != record_hash("d", {"door_id": "d2", "type": "cycle_open", "ts": 1})


def test_restamping_needs_the_nodes_clock():
    with pytest.raises(BatchError, match="restamp needs sent_at"):
        parse_batch({"restamp": True}, device_id="n", idempotency_key="k", max_records=10, max_samples=100)
    batch = parse_batch({"restamp": True, "sent_at": 1_767_225_600, "points": [
        {"ts": 1_767_225_590, "metric": "t", "value": 1}]}, device_id="n", idempotency_key="k", max_records=10,
        max_samples=100)
    batch.shift(30.0)
    assert batch.points[0][0] == 1_767_225_620


@pytest.mark.parametrize("setting, message", [
    ("plugins.edgesentinel.backpressure.elevated_fill=0.95", "plugins.edgesentinel.backpressure.elevated_fill: "),
    ("plugins.edgesentinel.windows.bands_hz.vibration=[[100.0, 10.0]]",
     "plugins.edgesentinel.windows.bands_hz.vibration[0]: expected [low, high]"),
    ("plugins.edgesentinel.profiles.default.window_s=0", "plugins.edgesentinel.profiles.default.window_s: "),
    ("plugins.edgesentinel.operating_hours='7-19'", "plugins.edgesentinel.operating_hours: expected 'HH:MM-HH:MM'"),
    ("plugins.edgesentinel.dedup_dayz=30", "dedup_dayz"),
    ("plugins.edgesentinel.devices.es-1.profile='nope'", "plugins.edgesentinel.devices.es-1.profile: no profile"),
    ("plugins.edgesentinel.backpressure.max_inflight_bytes=10",
     "plugins.edgesentinel.backpressure.max_inflight_bytes: must be at least 1024, got 10"),
    ("plugins.edgesentinel.teams.it.slack=['hooks.slack.com/x']",
     "plugins.edgesentinel.teams.it.slack[0]: expected an http"),
    ("plugins.edgesentinel.teams.it.email=['it@localhost']",
     "plugins.edgesentinel.teams.it.email[0]: expected an e-mail address, got 'it@localhost'"),
])
async def test_a_bad_option_is_named(gateway_factory, setting, message):
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
        async with gateway_factory(plugins=PLUGIN, settings=[setting]):
            pass


def test_a_team_hears_by_email_slack_teams_and_webhook():
    config = EdgesentinelConfig(teams={"safety": Team(
        email=["safety@site.example"], slack=["https://hooks.slack.com/services/T/B/X"],
        msteams=["https://prod.logic.azure.com/workflows/1"], webhooks=[Webhook("https://relay.example/h", "S")])})
    assert team_actions(config, "safety") == [
        {"kind": "email", "to": ["safety@site.example"]},
        {"kind": "slack", "url": "https://hooks.slack.com/services/T/B/X"},
        {"kind": "teams", "url": "https://prod.logic.azure.com/workflows/1"},
        {"kind": "webhook", "url": "https://relay.example/h", "to": ["safety", "safety@site.example"],
         "secret_env": "S"}]
    assert team_actions(config, "it") == []
    (stop,) = [r for r in rules("edgesentinel", config) if r["name"] == "edgesentinel-emergency-stop"]
    assert [a["kind"] for a in stop["actions"]] == ["upstream", "log", "email", "slack", "teams", "webhook"]


# -- the fast path answers exactly as the full one --------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gatewayd_edgesentinel.batch import open_body  # noqa: E402
from gatewayd_edgesentinel.fastpath import GiveUp, fast_batch, read_batch  # noqa: E402

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                    st.text(max_size=5))
metrics = st.one_of(st.sampled_from(["temp_c", "rh", "a.b:c-d", "x" * 64, "x" * 65, "", "a\n", "é", " a"]),
                    st.text(max_size=8))
times = st.one_of(st.floats(9e8, 8e9), st.integers(9 * 10**8, 8 * 10**9), st.just("2026-01-01T00:00:00Z"),
                  st.just(True))
point = st.fixed_dictionaries({"ts": times, "metric": metrics, "value": st.one_of(st.floats(-1e9, 1e9), scalars)},
                              optional={"unit": st.one_of(st.text(max_size=20), scalars),
                                        "meta": st.one_of(st.none(), st.dictionaries(st.text(max_size=4), scalars,
                                                                                     max_size=3),
                                                          st.just({"nested": {"a": 1}}), st.just([1])),
                                        "extra": scalars})
others = st.fixed_dictionaries({}, optional={
    "batch_id": st.one_of(st.just("f-1"), st.just(""), scalars), "restamp": st.booleans(),
    "sent_at": st.just(1_767_225_600), "diagnostics": st.just({"retry_count": 2}),
    "door_events": st.lists(st.fixed_dictionaries({"ts": times, "type": st.sampled_from(["cycle_open", "bad"])}),
                            max_size=2),
    "system_events": st.lists(st.fixed_dictionaries({"ts": times, "event_type": metrics}), max_size=2)})


def outcome(read, raw: bytes):
    try:
        batch = read(raw)
    except BatchError as e:
        return ("error", e.status, e.code, e.message)
    return ("batch", batch)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(points_=st.lists(point, max_size=6), rest=others, as_text=st.booleans())
def test_the_fast_path_answers_as_the_full_one(points_, rest, as_text):
    doc = {**rest, "points": points_}
    try:
        raw = json.dumps(doc, ensure_ascii=not as_text).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        return
    kwargs = dict(device_id="es-1", idempotency_key="k", max_records=8, max_samples=100)

    def full(raw: bytes):
        return parse_batch(open_body(raw), **kwargs)

    expected = outcome(full, raw)
    assert outcome(lambda r: read_batch(r, **kwargs), raw) == expected
    try:
        fast = fast_batch(raw, **kwargs)
    except (GiveUp, BatchError):
        return
    assert ("batch", fast) == expected  # when it answers, it answers the same


def test_the_fast_path_takes_the_common_batch_and_gives_up_on_the_odd_one():
    kwargs = dict(device_id="es-1", idempotency_key="k", max_records=100, max_samples=100)
    common = json.dumps({"points": [{"ts": 1_767_225_600, "metric": "t", "value": 1, "meta": {"a": 1}}]}).encode()
    assert fast_batch(common, **kwargs).valid == 1
    for odd in ([{"ts": "2026-01-01T00:00:00Z", "metric": "t", "value": 1}],
                [{"ts": 1_767_225_600, "metric": "t", "value": 10**30}],
                [{"ts": 1_767_225_600, "metric": "t", "value": 1, "meta": {"a": {"b": 1}}}]):
        with pytest.raises(GiveUp):
            fast_batch(json.dumps({"points": odd}).encode(), **kwargs)
    with pytest.raises(GiveUp):
        fast_batch(b'{"points": [{"ts": 1767225600, "metric": "t", "value": NaN}]}', **kwargs)
