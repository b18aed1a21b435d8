"""The live fleet's state stream: columnar batches on the hub, the spec's frames on the socket."""

import json

import numpy as np

from gatewayd_kaiabc.live import BATCH_BYTES, STATE_COLUMNS, Fleet, state_batches
from gatewayd_kaiabc.ws import state_frames


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
    batches, pwm = fleet.live_events(0.0, "2026-01-01T00:00:00Z")
    assert len(batches) > 3
    assert all(len(json.dumps(b, separators=(",", ":"))) < BATCH_BYTES for b in batches)
    assert [n for b in batches for n in b["node_id"]] == ids
    for b in batches:
        assert all(len(b[k]) == len(b["node_id"]) for k in STATE_COLUMNS)
    assert sorted(node for node, _ in pwm) == sorted(ids)  # the first call: every duty is new
    assert fleet.live_events(0.0, "2026-01-01T00:00:00Z")[1] == []  # nothing changed since


async def test_frames_are_the_specs_event_for_the_watched_nodes_only():
    fleet = await fleet_of(["pico_001", "pico.002", "elm_003"])
    (batch,), _ = fleet.live_events(0.0, "2026-01-01T00:00:00Z")
    frames = [json.loads(f) for f in state_frames(batch, {"pico_002", "elm_003"})]
    assert [f["node_id"] for f in frames] == ["pico.002", "elm_003"]  # dots as the hub writes them
    one = frames[1]
    assert one == {"event": "oscillator.state", "node_id": "elm_003", "timestamp": "2026-01-01T00:00:00Z",
                   "data": {"circadian_time": batch["circadian_time"][2], "phase": batch["phase"][2],
                            "state_variables": {"C_ST": batch["C_ST"][2], "A_free": batch["A_free"][2]},
                            "koa_metric": batch["koa_metric"][2]}}
    assert abs(one["data"]["circadian_time"] - 16.0) < 0.05  # placed two thirds round its cycle: CT 16
    assert len(state_frames(batch, {"*"})) == 3 and state_frames(batch, set()) == []


def test_one_batch_for_a_small_site_and_none_lost_at_the_edges():
    ids = ["n" * 128] * 1000
    cols = {k: list(range(1000)) for k in STATE_COLUMNS}
    batches = state_batches(ids, "t", cols)
    assert sum(len(b["node_id"]) for b in batches) == 1000
    assert [v for b in batches for v in b["phase"]] == list(range(1000))
    assert len(state_batches(["a"], "t", {k: [1] for k in STATE_COLUMNS})) == 1
