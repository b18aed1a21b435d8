"""Period stability, Q10 and temperature correlation."""

import numpy as np
import pytest

from gatewayd_kaiabc.engine import (
    RUST_2007,
    OscillatorBatch,
    crossing_times,
    period_stability,
    phosphorylated_fraction,
    preset,
    q10_from_periods,
    temperature_correlation,
)


def test_period_stability_statistics():
    s = period_stability([24.0, 24.2, 23.8, 24.1])
    assert s.mean_period_hours == pytest.approx(24.025)
    assert s.std_deviation_hours == pytest.approx(np.std([24.0, 24.2, 23.8, 24.1], ddof=1))
    assert (s.min_period_hours, s.max_period_hours) == (23.8, 24.2)
    assert s.coefficient_variation == pytest.approx(s.std_deviation_hours / s.mean_period_hours)
    assert s.quality_assessment == "excellent"
    with pytest.raises(ValueError):
        period_stability([24.0])


def test_q10_definition():
    assert q10_from_periods(24.0, 298.15, 12.0, 308.15) == pytest.approx(2.0)
    assert q10_from_periods(24.0, 298.15, 24.0, 303.15) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        q10_from_periods(24.0, 300.0, 20.0, 300.0)


def test_temperature_correlation_reflects_compensation():
    # Cycle-by-cycle periods of nodes held at different temperatures:
    # uncompensated periods fall with temperature, compensated ones barely move.
    temps = np.linspace(298.15, 308.15, 6)
    results = {}
    for name in ("case_ii_mutant", "compensated"):
        bank = OscillatorBatch(temps.size, temperature_model=preset(name), temperatures=temps)
        bank.advance(100.0)
        t = np.arange(0.0, 100.0, 0.05)
        samples = []
        for _ in t:
            samples.append(phosphorylated_fraction(bank.advance(0.05), RUST_2007.kaic_total))
        p = np.array(samples).T
        periods = [np.diff(crossing_times(t, row, 0.5 * (row.max() + row.min()))).mean() for row in p]
        results[name] = (temperature_correlation(periods, temps), period_stability(periods))
    mutant, comp = results["case_ii_mutant"], results["compensated"]
    assert mutant[0].pearson_r < -0.95 and mutant[0].p_value < 0.01
    assert comp[1].coefficient_variation < 0.03 < mutant[1].coefficient_variation


def test_correlation_input_checks():
    with pytest.raises(ValueError):
        temperature_correlation([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        temperature_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
