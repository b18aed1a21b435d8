"""Entrainment to daily temperature cycles: the compensated clock locks, the uncompensated one cannot."""

import numpy as np
import pytest

from gatewayd_kaiabc.engine import preset, simulated_q10
from gatewayd_kaiabc.engine.entrain import entrain


@pytest.mark.parametrize("amplitude", [5.0, 3.0])
def test_the_compensated_clock_locks_to_a_24_h_12_12_cycle(amplitude):
    res = entrain(cycle_hours=24.0, low_k=303.15 - amplitude, high_k=303.15 + amplitude, days=30)
    assert res.locked
    assert all(abs(p - 24.0) <= 0.1 for p in res.periods)  # every start, over the last five cycles
    assert res.phase_angle_hours is not None and res.phase_spread_hours < 0.5
    assert res.free_running_period_hours == pytest.approx(20.71, abs=0.01)  # it is not 24 h by itself
    # ... while the free-running period stays temperature compensated
    assert 0.9 <= simulated_q10(preset("compensated")).q10 <= 1.1


def test_a_weak_cycle_does_not_entrain():
    res = entrain(cycle_hours=24.0, low_k=302.15, high_k=304.15, days=30)
    assert not res.locked and res.phase_angle_hours is None
    assert abs(res.period_hours - 24.0) > 0.5


def test_the_uncompensated_mutant_only_rescales_time_and_cannot_entrain():
    res = entrain(cycle_hours=24.0, low_k=298.15, high_k=308.15, days=30,
                  temperature_model=preset("case_ii_mutant"))
    assert not res.locked


def test_bad_arguments():
    for kwargs in ({"low_k": 305.0, "high_k": 300.0}, {"low_k": 300.0, "high_k": 305.0, "days": 3},
                   {"low_k": 300.0, "high_k": 305.0, "cycle_hours": 0.0},
                   {"low_k": 300.0, "high_k": 305.0, "warm_fraction": 1.0}):
        with pytest.raises(ValueError):
            entrain(**kwargs)
    assert np.isfinite(entrain(low_k=300.0, high_k=306.0, days=8).period_hours)


def test_strong_coupling_keeps_the_verified_properties_with_three_times_the_prc():
    from gatewayd_kaiabc.engine import RUST_2007, STRONG_COUPLING, compute_prc, limit_cycle, named_set

    strong, default = named_set("strong_coupling"), named_set("compensated")
    assert strong == STRONG_COUPLING.model()
    assert limit_cycle(RUST_2007, strong).period == pytest.approx(20.71, abs=0.01)  # the published model at 30 degC
    assert 0.9 <= simulated_q10(strong).q10 <= 1.1
    res = entrain(cycle_hours=24.0, low_k=298.15, high_k=308.15, days=30, temperature_model=strong)
    assert res.locked and all(abs(p - 24.0) <= 0.1 for p in res.periods)
    mine, theirs = (compute_prc(temperature_model=m, resolution=24).shift_hours for m in (strong, default))
    assert mine.max() > 0.5 and mine.min() < -0.35  # +0.57 / -0.40 h
    assert mine.max() > 3 * theirs.max() and mine.min() < 1.4 * theirs.min()  # default: +0.13 / -0.25 h
