"""Temperature presets: compensation, the uncompensated mutant, and the ETF parameter mapping."""

import numpy as np
import pytest

from gatewayd_kaiabc.engine import (
    COMPENSATION_RATIO,
    RUST_2007,
    EtfMappingError,
    from_etf,
    limit_cycle,
    preset,
    simulated_q10,
)
from gatewayd_kaiabc.engine.temperature import GAS_CONSTANT, TemperatureModel


def test_compensated_q10_within_bounds():
    res = simulated_q10(preset("compensated"))
    assert 0.9 <= res.q10 <= 1.1
    # The period is not monotonic in T, so check both half-ranges too.
    mid = limit_cycle(RUST_2007, preset("compensated"), 303.15).period
    assert 0.9 <= (res.period_low_hours / mid) ** 2 <= 1.1
    assert 0.9 <= (mid / res.period_high_hours) ** 2 <= 1.1


def test_case_ii_mutant_is_uncompensated_and_arrhenius():
    res = simulated_q10(preset("case_ii_mutant"))
    assert res.q10 > 1.3
    # All steps share one Ea, so time is just rescaled: Q10 equals the Arrhenius factor.
    expected = np.exp(40e3 / GAS_CONSTANT * (1 / 298.15 - 1 / 308.15))
    assert res.q10 == pytest.approx(expected, rel=2e-3)


def test_control_coefficients_sum_to_minus_one_and_balance():
    # Rates-only model: scaling every rate by s scales the period by 1/s, so
    # sum_i C_i = -1.  The compensated Ea vector nearly nulls sum_i C_i E_i.
    base = limit_cycle(RUST_2007, TemperatureModel("flat", (0.0,) * 8), 303.15).period
    coeffs = []
    for i in range(8):
        p = []
        for f in (1.01, 1 / 1.01):
            scale = [f if j == i else 1.0 for j in range(8)]
            params = RUST_2007.with_overrides(k0=tuple(np.multiply(RUST_2007.k0, scale)),
                                              ka=tuple(np.multiply(RUST_2007.ka, scale)))
            p.append(limit_cycle(params, TemperatureModel("flat", (0.0,) * 8), 303.15).period)
        coeffs.append((np.log(p[0]) - np.log(p[1])) / (2 * np.log(1.01)))
    coeffs = np.array(coeffs)
    assert coeffs.sum() == pytest.approx(-1.0, abs=5e-3)
    ea = np.array(preset("compensated").activation_energies)
    assert abs(coeffs @ ea) < 0.05 * np.abs(coeffs) @ ea
    assert base > 0


def test_published_rates_apply_at_reference_temperature():
    for name in ("compensated", "case_ii_mutant"):
        r = preset(name).node_rates(RUST_2007, [303.15])
        np.testing.assert_allclose(r.k0[:, 0], RUST_2007.k0)
        np.testing.assert_allclose(r.ka[:, 0], RUST_2007.ka)


def test_compensated_preset_structure():
    ea = preset("compensated", activation_energy_kj_mol=50).activation_energies
    assert ea[:4] == (50e3,) * 4
    assert ea[4:] == pytest.approx((50e3 * COMPENSATION_RATIO,) * 4)


@pytest.mark.parametrize("body, field", [
    ({"arrhenius_scaling": {"activation_energy_kJ_mol": 40, "pre_exponential_factor": 1.5e8}},
     "pre_exponential_factor"),
    ({"atpase_constraint": {"baseline_f_hyd": 0.5}}, "baseline_f_hyd"),
    ({"atpase_constraint": {"temperature_dependence": "case_ii_mutant", "coupling_strength": 0.9}},
     "coupling_strength"),
    ({"atpase_constraint": {"temperature_dependence": "wild"}}, "wild"),
    ({"structural_coupling": {"modulation_function": "cubic"}}, "modulation_function"),
    ({"structural_coupling": {"baseline_d_i": 0}}, "baseline_d_i"),
    ({"arrhenius_scaling": {"activation_energy": 40}}, "activation_energy"),
    ({"optics": {}}, "optics"),
])
def test_unmappable_etf_parameters_rejected(body, field):
    with pytest.raises(EtfMappingError, match=field):
        from_etf(body)


def test_structural_coupling_and_coupling_strength_take_effect():
    plain = from_etf({})
    weaker = from_etf({"structural_coupling": {"baseline_d_i": 0.85, "modulation_function": "nonlinear_sigmoid",
                                               "sensitivity": 1.2}})
    p_plain = limit_cycle(RUST_2007, plain, 303.15).period
    p_weak = limit_cycle(RUST_2007, weaker, 303.15).period
    assert abs(p_weak - p_plain) > 0.05  # accepted means it acts on the model
    seq = weaker.node_rates(RUST_2007, [303.15, 313.15]).sequestration
    assert seq[0] == pytest.approx(2 * 0.85) and seq[1] > seq[0]
    half = from_etf({"atpase_constraint": {"temperature_dependence": "compensated", "coupling_strength": 0.5}})
    assert half.activation_energies[4] > plain.activation_energies[4]


def test_reference_temperature_override():
    tm = from_etf({}, reference_temperature_k=298.15)
    r = tm.node_rates(RUST_2007, [298.15])
    np.testing.assert_allclose(r.ka[:, 0], RUST_2007.ka)
