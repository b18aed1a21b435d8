"""Vectorized integrator against scipy's LSODA at rtol 1e-10."""

import numpy as np
import pytest

from gatewayd_kaiabc.engine import (
    RUST_2007,
    OscillatorBatch,
    SolverConfig,
    StepSizeError,
    estimate_period,
    integrate_batch,
    lomb_scargle_period,
    phosphorylated_fraction,
    preset,
    solve_reference,
)

T = np.arange(0.0, 400.0, 0.02)


@pytest.fixture(scope="module")
def reference_period():
    rates = preset("compensated").node_rates(RUST_2007, [303.15])
    y = solve_reference(rates, np.zeros(3), (0.0, 400.0), t_eval=T, method="LSODA", rtol=1e-10, atol=1e-12).y
    return estimate_period(T, phosphorylated_fraction(y, 3.4), discard_fraction=0.5).period


@pytest.mark.parametrize("solver", ["RKF45", "DOPRI5"])
def test_batch_period_matches_lsoda(reference_period, solver):
    rates = preset("compensated").node_rates(RUST_2007, [303.15])
    res = integrate_batch(np.zeros((3, 1)), (0.0, 400.0), rates, SolverConfig(solver_type=solver), t_eval=T)
    period = estimate_period(T, phosphorylated_fraction(res.y[:, :, 0].T, 3.4), discard_fraction=0.5).period
    assert period == pytest.approx(reference_period, rel=1e-3)


def test_per_node_temperatures_match_individual_solves():
    temps = np.array([293.15, 298.15, 303.15, 308.15, 313.15])
    tm = preset("case_ii_mutant")
    rates = tm.node_rates(RUST_2007, temps)
    y0 = np.tile(np.array([[0.3], [0.6], [0.4]]), (1, temps.size))
    res = integrate_batch(y0, (0.0, 30.0), rates, SolverConfig(absolute_tolerance=1e-9, relative_tolerance=1e-8))
    for i in range(temps.size):
        ref = solve_reference(rates.node(i), y0[:, i], (0.0, 30.0)).y[:, -1]
        # Tolerances bound the local error; 30 h of steps accumulate ~100x that globally.
        np.testing.assert_allclose(res.y_final[:, i], ref, atol=1e-5)
    # Different temperatures really give different trajectories under the mutant preset.
    assert np.ptp(res.y_final[0]) > 0.05


def test_error_control_covers_every_node():
    # One badly scaled node must not be hidden by the others: tolerances are met node by node.
    temps = np.r_[np.full(50, 303.15), 330.0]
    rates = preset("case_ii_mutant").node_rates(RUST_2007, temps)
    cfg = SolverConfig(max_step_size=1.0)
    res = integrate_batch(np.zeros((3, 51)), (0.0, 24.0), rates, cfg)
    ref = solve_reference(rates.node(50), np.zeros(3), (0.0, 24.0)).y[:, -1]
    assert np.abs(res.y_final[:, 50] - ref).max() < 1e-3


def test_max_step_is_honoured():
    rates = preset("compensated").node_rates(RUST_2007, [303.15])
    res = integrate_batch(np.zeros((3, 1)), (0.0, 10.0), rates, SolverConfig(max_step_size=0.05))
    assert res.stats.accepted >= 200


def test_min_step_violation_raises():
    rates = preset("compensated").node_rates(RUST_2007, [303.15])
    cfg = SolverConfig(absolute_tolerance=1e-15, relative_tolerance=1e-15, min_step_size=0.05, max_step_size=0.1)
    with pytest.raises(StepSizeError):
        integrate_batch(np.zeros((3, 1)), (0.0, 5.0), rates, cfg)


def test_spec_config_round_trip_and_rejections():
    cfg = SolverConfig.from_spec({"solver_type": "RKF45", "tolerance": {"absolute": 1e-7, "relative": 1e-6},
                                  "max_step_size": 0.05, "min_step_size": 1e-6, "integration_method": "adaptive"})
    assert cfg.to_spec()["tolerance"] == {"absolute": 1e-7, "relative": 1e-6}
    assert SolverConfig.from_spec({"max_step_size": 0.2}, base=cfg).absolute_tolerance == 1e-7
    with pytest.raises(ValueError):
        SolverConfig.from_spec({"solver_type": "Euler"})
    with pytest.raises(ValueError):
        SolverConfig.from_spec({"integration_method": "fixed"})
    with pytest.raises(ValueError):
        SolverConfig.from_spec({"step": 1})


def test_advance_in_pieces_matches_reference():
    cfg = SolverConfig(absolute_tolerance=1e-10, relative_tolerance=1e-9)
    bank = OscillatorBatch(3, temperatures=[298.15, 303.15, 308.15], config=cfg)
    for _ in range(48):
        bank.advance(0.5)
    assert bank.time == pytest.approx(24.0)
    rates = bank.temperature_model.node_rates(RUST_2007, bank.temperatures)
    for i in range(3):
        ref = solve_reference(rates.node(i), np.zeros(3), (0.0, 24.0)).y[:, -1]
        # Local tolerance 1e-9; the A = max(0, ...) kink makes the global error larger.
        np.testing.assert_allclose(bank.state[:, i], ref, atol=5e-7)
    m = bank.metrics
    assert m.iterations == 48 and 0 < m.stability_index <= 1 and m.accepted_steps > 0
    assert set(m.to_spec()) == {"average_steps_per_second", "average_iteration_time_ms", "stability_index"}


def test_advance_changes_temperature_and_resets():
    bank = OscillatorBatch(2)
    bank.advance(5.0, temperatures=[290.0, 310.0])
    assert list(bank.temperatures) == [290.0, 310.0]
    bank.reset(nodes=[0])
    assert np.all(bank.state[:, 0] == 0) and np.any(bank.state[:, 1] > 0)
    with pytest.raises(ValueError):
        bank.advance(1.0, temperatures=[-1.0, 300.0])


def test_lomb_scargle_on_noisy_uneven_samples(reference_period):
    rates = preset("compensated").node_rates(RUST_2007, [303.15])
    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(150.0, 400.0, 600))
    y = solve_reference(rates, np.zeros(3), (0.0, 400.0), t_eval=t).y
    x = phosphorylated_fraction(y, 3.4) + rng.normal(0, 0.03, t.size)
    est = lomb_scargle_period(t, x)
    assert est.period == pytest.approx(reference_period, rel=0.01)
