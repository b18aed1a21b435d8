"""KOA and the KOA -> PWM mappings, including the spec's test values."""

import numpy as np
import pytest

from gatewayd_kaiabc.engine import PwmMapping, koa, koa_normalized, koa_trend, limit_cycle

SPEC = dict(pwm_min=0, pwm_max=255, koa_threshold_low=0.1, koa_threshold_high=0.9)


def test_koa_in_unit_interval_and_oscillates_on_cycle():
    cyc = limit_cycle()
    k = koa(cyc.samples.T, cyc.kaic_total)
    assert k.min() >= 0 and k.max() <= 1
    assert np.ptp(k) > 0.1  # the S431-phosphorylated share swings over the cycle
    np.testing.assert_allclose(k, (cyc.samples[:, 1] + cyc.samples[:, 2]) / 3.4)


def test_koa_bounds_at_extremes():
    assert koa(np.array([0.0, 0.0, 0.0]), 3.4) == 0.0
    assert koa(np.array([0.0, 3.4, 0.0]), 3.4) == 1.0
    assert koa(np.array([3.4, 0.0, 0.0]), 3.4) == 0.0  # T-only KaiC contributes nothing


@pytest.mark.parametrize("function, extra", [("linear", {}), ("sigmoid", {}),
                                              ("custom", {"custom_points": ((0.1, 0.0), (0.9, 1.0))})])
def test_spec_test_values(function, extra):
    m = PwmMapping(function, **SPEC, **extra)
    assert m.test_values() == {"koa_0.0": {"pwm": 0}, "koa_0.5": {"pwm": 128}, "koa_1.0": {"pwm": 255}}


def test_invert_and_range():
    m = PwmMapping("linear", **{**SPEC, "invert": True})
    assert [int(m.pwm(v)) for v in (0.0, 0.5, 1.0)] == [255, 128, 0]
    m = PwmMapping("linear", pwm_min=20, pwm_max=200)
    assert [int(m.pwm(v)) for v in (0.0, 1.0)] == [20, 200]


def test_thresholds_clip_and_sigmoid_is_monotonic():
    m = PwmMapping("linear", **SPEC)
    assert int(m.pwm(0.05)) == 0 and int(m.pwm(0.95)) == 255
    s = PwmMapping("sigmoid", **SPEC)
    x = np.linspace(0, 1, 101)
    assert np.all(np.diff(s.level(x)) >= 0)
    assert s.level(0.3) < m.level(0.3)  # sigmoid is flatter near the low threshold


def test_custom_curve_interpolates():
    m = PwmMapping("custom", custom_points=((0.0, 0.0), (0.5, 0.8), (1.0, 1.0)))
    assert int(m.pwm(0.25)) == round(255 * 0.4)


@pytest.mark.parametrize("kwargs", [dict(mapping_function="cubic"), dict(pwm_min=200, pwm_max=100),
                                    dict(koa_threshold_low=0.9, koa_threshold_high=0.1),
                                    dict(mapping_function="custom", custom_points=((0.5, 0.0), (0.2, 1.0)))])
def test_invalid_mappings_rejected(kwargs):
    with pytest.raises(ValueError):
        PwmMapping(**kwargs)


def test_normalized_and_trend():
    assert koa_normalized(0.45, 0.3, 0.6) == pytest.approx(0.5)
    assert koa_normalized(0.9, 0.3, 0.6) == 1.0
    assert koa_trend(0.4, 0.5) == "ascending" and koa_trend(0.5, 0.4) == "descending"
