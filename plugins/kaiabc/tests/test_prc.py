"""Phase response curves to temperature pulses, and phase-shift planning."""

import numpy as np
import pytest

from gatewayd_kaiabc.engine import RUST_2007, compute_prc, limit_cycle, plan_phase_shift, preset
from gatewayd_kaiabc.engine.temperature import GAS_CONSTANT


@pytest.fixture(scope="module")
def cycle():
    return limit_cycle(RUST_2007, preset("compensated"), 303.15)


@pytest.fixture(scope="module")
def warm(cycle):
    return compute_prc(delta_k=5.0, duration_h=4.0, resolution=24, cycle=cycle)


def test_prc_has_advance_and_delay_regions(warm):
    # A type-1 PRC to a warm pulse in a compensated clock: the pulse speeds
    # some steps more than others, so its effect depends on phase.
    assert warm.shift_hours.max() > 0.5
    assert warm.shift_hours.min() < -0.5
    assert np.all(np.abs(warm.shift_hours) < warm.period / 2)


def test_zero_pulse_gives_no_shift(cycle):
    prc = compute_prc(delta_k=0.0, duration_h=1.0, resolution=6, cycle=cycle)
    assert np.abs(prc.shift_hours).max() < 1e-3


def test_uniform_activation_energy_shifts_by_time_rescaling():
    # case_ii_mutant scales every rate by s during the pulse, which only
    # rescales time: every phase advances by (s - 1) * duration.
    tm = preset("case_ii_mutant")
    cyc = limit_cycle(RUST_2007, tm, 303.15)
    prc = compute_prc(delta_k=3.0, duration_h=0.5, resolution=6, temperature_model=tm, cycle=cyc)
    s = np.exp(40e3 / GAS_CONSTANT * (1 / 303.15 - 1 / 306.15))
    np.testing.assert_allclose(prc.shift_hours, (s - 1) * 0.5, atol=2e-3)


def test_cold_pulse_mirrors_warm_sign(cycle):
    cold = compute_prc(delta_k=-3.0, duration_h=0.5, resolution=8, cycle=cycle)
    warm = compute_prc(delta_k=3.0, duration_h=0.5, resolution=8, cycle=cycle)
    big = np.abs(warm.shift_hours) > 0.05
    assert big.any() and np.all(np.sign(cold.shift_hours[big]) == -np.sign(warm.shift_hours[big]))


@pytest.mark.parametrize("shift_type, sign", [("advance", 1), ("delay", -1)])
def test_plan_phase_shift(warm, cycle, shift_type, sign):
    plan = plan_phase_shift(shift_type, 1.0, [warm], cycle=cycle)
    assert sign * plan.predicted_hours > 0
    assert sign * plan.actual_hours > 0
    assert plan.actual_hours == pytest.approx(plan.predicted_hours, abs=0.05)
    assert plan.efficiency == pytest.approx(plan.actual_hours / plan.target_hours)
    lo, hi = (float(v) for v in plan.optimal_ct_window.split("-"))
    assert lo <= plan.circadian_time < hi or (lo > hi and (plan.circadian_time >= lo or plan.circadian_time < hi))


def test_plan_from_off_cycle_state_waits_for_the_window(warm, cycle):
    start = cycle.state_at(0.37) * 1.02  # slightly off the cycle, at some other phase
    plan = plan_phase_shift("advance", 1.0, [warm], cycle=cycle, current_state=start)
    assert plan.actual_hours > 0.5 * plan.predicted_hours


def test_plan_rejects_impossible_requests(cycle):
    only_advance = compute_prc(delta_k=3.0, duration_h=0.5, resolution=4, cycle=cycle,
                               temperature_model=preset("case_ii_mutant"))
    with pytest.raises(ValueError, match="delay"):
        plan_phase_shift("delay", 1.0, [only_advance], cycle=cycle)
    with pytest.raises(ValueError):
        plan_phase_shift("sideways", 1.0, [only_advance], cycle=cycle)


def test_the_specs_pulse_acts_differently_by_phase(cycle):
    # +3 K for 30 min (the spec's example): the phosphorylation and the T432
    # dephosphorylation phases answer differently, so the curve has advance and
    # delay regions, and it is not flat while KaiA is sequestered (CT 12-19) as a
    # pure rescaling of time would make it ((s - 1) * duration everywhere).
    prc = compute_prc(delta_k=3.0, duration_h=0.5, resolution=24, cycle=cycle)
    assert prc.shift_hours.max() > 0.1 and prc.shift_hours.min() < -0.2
    sequestered = prc.shift_hours[(prc.circadian_time >= 12) & (prc.circadian_time <= 19)]
    assert np.ptp(sequestered) > 0.04
    rescaling = (np.exp(40e3 / GAS_CONSTANT * (1 / 303.15 - 1 / 306.15)) - 1) * 0.5
    assert np.abs(prc.shift_hours - rescaling).max() > 0.2
