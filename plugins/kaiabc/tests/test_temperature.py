"""Temperature presets: compensation, the uncompensated mutant, and the ETF parameter mapping."""

from dataclasses import replace

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
from gatewayd_kaiabc.engine.params import STEP_NAMES
from gatewayd_kaiabc.engine.temperature import GAS_CONSTANT, EtfParameters, ModelStack, TemperatureModel


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
    # Kinase and S431 steps carry E; the ATPase-coupled T432 dephosphorylation (TU, DS) the compensating share.
    ea = dict(zip(STEP_NAMES, preset("compensated", activation_energy_kj_mol=50).activation_energies))
    for step in ("UT", "TD", "SD", "US", "DT", "SU"):
        assert ea[step] == 50e3
    assert ea["TU"] == ea["DS"] == pytest.approx(50e3 * COMPENSATION_RATIO)


SPEC_GET_BODY = {  # GET /entrainment/parameters in the specification, as written
    "arrhenius_scaling": {"activation_energy_kJ_mol": 40.0, "pre_exponential_factor": 1.5e8},
    "structural_coupling": {"baseline_d_i": 0.85, "modulation_function": "nonlinear_sigmoid", "sensitivity": 1.2},
    "atpase_constraint": {"baseline_f_hyd": 0.5, "temperature_dependence": "case_ii_mutant", "coupling_strength": 0.9},
}


def test_the_specs_body_is_accepted_as_written_and_acts_on_the_model():
    etf = EtfParameters().merge(SPEC_GET_BODY)
    assert etf.document() == SPEC_GET_BODY
    tm = etf.model()
    assert tm.name == "case_ii_mutant" and tm.structural is not None
    assert limit_cycle(RUST_2007, tm, 303.15).period != pytest.approx(limit_cycle(RUST_2007).period, abs=0.05)


def test_a_partial_patch_merges_and_null_restores_the_default():
    etf = EtfParameters().merge(SPEC_GET_BODY)
    patched = etf.merge({"structural_coupling": {"sensitivity": 1.5}})
    assert patched.sensitivity == 1.5
    assert patched.baseline_d_i == 0.85 and patched.temperature_dependence == "case_ii_mutant"  # the rest kept
    assert patched.merge({"structural_coupling": {"baseline_d_i": None}}).baseline_d_i == 1.0
    assert patched.merge({"atpase_constraint": None}) == replace(patched, baseline_f_hyd=0.5,
                                                                 temperature_dependence="compensated",
                                                                 coupling_strength=1.0)
    assert EtfParameters(**patched.as_dict()) == patched


def test_prefactor_and_hydrolysis_fraction_scale_rates():
    tm = EtfParameters().merge({"arrhenius_scaling": {"pre_exponential_factor": 3e8}}).model()
    r = tm.node_rates(RUST_2007, [303.15])
    np.testing.assert_allclose(r.ka[:, 0], 2 * np.asarray(RUST_2007.ka))
    assert limit_cycle(RUST_2007, tm).period == pytest.approx(limit_cycle(RUST_2007).period / 2, rel=1e-3)
    tm = EtfParameters().merge({"atpase_constraint": {"baseline_f_hyd": 0.6}}).model()
    r = tm.node_rates(RUST_2007, [303.15])
    scale = dict(zip(STEP_NAMES, r.k0[:, 0] / np.where(RUST_2007.k0_array() == 0, 1, RUST_2007.k0_array())))
    assert scale["DS"] == pytest.approx(1.2) and scale["SU"] == pytest.approx(1.0)


@pytest.mark.parametrize("body, field", [
    ({"atpase_constraint": {"temperature_dependence": "wild"}}, "atpase_constraint.temperature_dependence"),
    ({"structural_coupling": {"modulation_function": "cubic"}}, "structural_coupling.modulation_function"),
    ({"structural_coupling": {"baseline_d_i": 0}}, "structural_coupling.baseline_d_i"),
    ({"arrhenius_scaling": {"activation_energy": 40}}, "arrhenius_scaling.activation_energy"),
    ({"arrhenius_scaling": {"activation_energy_kJ_mol": True}}, "arrhenius_scaling.activation_energy_kJ_mol"),
    ({"arrhenius_scaling": {"activation_energy_kJ_mol": "40"}}, "arrhenius_scaling.activation_energy_kJ_mol"),
    ({"arrhenius_scaling": {"pre_exponential_factor": 0}}, "arrhenius_scaling.pre_exponential_factor"),
    ({"atpase_constraint": {"baseline_f_hyd": 1.0}}, "atpase_constraint.baseline_f_hyd"),
    ({"atpase_constraint": {"coupling_strength": 1.5}}, "atpase_constraint.coupling_strength"),
    ({"atpase_constraint": [1]}, "atpase_constraint"),
    ({"reference_temperature_kelvin": 400.0}, "reference_temperature_kelvin"),
    ({"optics": {}}, "optics"),
])
def test_unmappable_etf_parameters_rejected(body, field):
    with pytest.raises(EtfMappingError, match=field) as caught:
        from_etf(body)
    assert caught.value.field == field


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
    assert half.activation_energies[STEP_NAMES.index("DS")] > plain.activation_energies[STEP_NAMES.index("DS")]


def test_reference_temperature_override():
    tm = from_etf({}, reference_temperature_k=298.15)
    r = tm.node_rates(RUST_2007, [298.15])
    np.testing.assert_allclose(r.ka[:, 0], RUST_2007.ka)


def test_a_stack_of_models_gives_each_node_its_own_rates():
    models = [from_etf({}), from_etf({"structural_coupling": {"sensitivity": 1.0}}), preset("case_ii_mutant")]
    temps = np.array([300.0, 306.0, 310.0])
    stacked = ModelStack(models).node_rates(RUST_2007, temps)
    for i, (tm, temp) in enumerate(zip(models, temps)):
        one = tm.node_rates(RUST_2007, [temp])
        np.testing.assert_allclose(stacked.k0[:, i], one.k0[:, 0])
        np.testing.assert_allclose(stacked.ka[:, i], one.ka[:, 0])
        assert stacked.sequestration[i] == pytest.approx(one.sequestration[0])
