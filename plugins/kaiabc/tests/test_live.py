"""The live fleet's streams: columnar batches on the hub, the spec's frames on the socket."""

import json

import numpy as np

from gatewayd_kaiabc.live import BATCH_BYTES, PWM_COLUMNS, STATE_COLUMNS, Fleet, batches
from gatewayd_kaiabc.ws import frames


async def fleet_of(ids):
    fleet = Fleet()
    await fleet.prepare()
    for node_id in ids:
        fleet.add(node_id)
    fleet.y[:, :len(ids)] = fleet.cycle.state_at(np.linspace(0, 1, len(ids), endpoint=False))
    return fleet


async def test_every_nodes_state_in_batches_under_the_hubs_event_size():
    ids = [f"site.{i:05d}." + "x" * 100 for i in range(3000)]  # long ids: several batches
    fleet = await fleet_of(ids)
    states, pwm = fleet.live_events(0.0, "2026-01-01T00:00:00Z")
    assert len(states) > 3 and len(pwm) > 3
    for found, names in ((states, STATE_COLUMNS), (pwm, PWM_COLUMNS)):
        assert all(len(json.dumps(b, separators=(",", ":"))) < BATCH_BYTES for b in found)
        assert [n for b in found for n in b["node_id"]] == ids  # the first call: every duty is new
        assert all(len(b[k]) == len(b["node_id"]) for b in found for k in names)
    assert fleet.live_events(0.0, "2026-01-01T00:00:00Z")[1] == []  # no duty changed since
    fleet.overrides[ids[7]] = (255, 10.0, "ovr_1")
    (changed,) = fleet.live_events(1.0, "2026-01-01T00:00:01Z")[1]
    assert changed == {"timestamp": "2026-01-01T00:00:01Z", "node_id": [ids[7]], "duty_cycle": [255],
                       "koa_source": [states[0]["koa_metric"][7]], "manual_override": [True]}


async def test_frames_are_the_specs_events_for_the_watched_nodes_only():
    fleet = await fleet_of(["pico_001", "pico.002", "elm_003"])
    (states,), (pwm,) = fleet.live_events(0.0, "2026-01-01T00:00:00Z")
    got = [json.loads(f) for f in frames("oscillator_state", states, {"pico_002", "elm_003"})]
    assert [f["node_id"] for f in got] == ["pico.002", "elm_003"]  # dots as the hub writes them
    assert got[1] == {"event": "oscillator.state", "node_id": "elm_003", "timestamp": "2026-01-01T00:00:00Z",
                      "data": {"circadian_time": states["circadian_time"][2], "phase": states["phase"][2],
                               "state_variables": {"C_ST": states["C_ST"][2], "A_free": states["A_free"][2]},
                               "koa_metric": states["koa_metric"][2]}}
    assert abs(got[1]["data"]["circadian_time"] - 16.0) < 0.05  # placed two thirds round its cycle: CT 16
    assert len(frames("oscillator_state", states, {"*"})) == 3 and frames("oscillator_state", states, set()) == []
    (one,) = [json.loads(f) for f in frames("output_pwm", pwm, {"pico_001"})]
    duty = pwm["duty_cycle"][0]
    assert one == {"event": "output.pwm", "node_id": "pico_001", "timestamp": "2026-01-01T00:00:00Z", "data": {
        "duty_cycle": duty, "duty_cycle_percent": round(100 * duty / 255, 1), "koa_source": pwm["koa_source"][0],
        "manual_override": False}}
    assert 0 <= duty <= 255


def test_batches_lose_nothing_at_the_edges():
    ids = ["n" * 128] * 1000
    cols = {k: list(range(1000)) for k in STATE_COLUMNS}
    found = batches(ids, "t", cols, STATE_COLUMNS)
    assert len(found) > 1 and sum(len(b["node_id"]) for b in found) == 1000
    assert [v for b in found for v in b["phase"]] == list(range(1000))
    assert len(batches(["a"], "t", {k: [1] for k in STATE_COLUMNS}, STATE_COLUMNS)) == 1
