"""Sensor Kalman filter: convergence, step tracking, missing channels, irregular timestamps."""

import json

import numpy as np
import pytest

from gatewayd_kaiabc.engine import SensorKalmanFilter


def _feed(kf, rng, times, temp, hum=45.0, pres=101325.0, sd=(0.2, 0.3, 0.5)):
    for t in times:
        kf.update(t, {"temperature_kelvin": temp(t) + rng.normal(0, sd[0]),
                      "humidity_percent": hum + rng.normal(0, sd[1]),
                      "pressure_pa": pres + rng.normal(0, sd[2])})


def test_converges_on_noisy_constant():
    rng = np.random.default_rng(11)
    kf = SensorKalmanFilter(process_noise={"temperature": 1e-6, "humidity": 1e-6, "pressure": 1e-6},
                            measurement_noise={"temperature": 0.04, "humidity": 0.09, "pressure": 0.25})
    _feed(kf, rng, np.arange(500) * 5.0, lambda t: 298.6)
    est = kf.estimate()
    p = np.array(kf.state()["covariance_matrix"])
    assert abs(est["temperature_kelvin"] - 298.6) < 0.05
    assert abs(est["humidity_percent"] - 45.0) < 0.08
    assert abs(est["pressure_pa"] - 101325.0) < 0.12
    assert p[0, 0] < 0.04 / 50  # far below a single reading's variance
    assert kf.measurement_count == 500
    np.testing.assert_allclose(p, p.T)


def test_tracks_a_step():
    rng = np.random.default_rng(5)
    kf = SensorKalmanFilter()  # spec template noise levels
    _feed(kf, rng, np.arange(100) * 5.0, lambda t: 298.0)
    assert abs(kf.estimate()["temperature_kelvin"] - 298.0) < 0.3
    history = []
    for t in 500.0 + np.arange(100) * 5.0:
        kf.update(t, {"temperature_kelvin": 300.0 + rng.normal(0, 0.2)})
        history.append(kf.estimate()["temperature_kelvin"])
    # Process noise 0.01 K^2/s at 5 s cadence gives a steady gain near 0.6:
    # the estimate should be at the new level within a handful of readings.
    assert abs(history[10] - 300.0) < 0.3
    assert abs(np.mean(history[20:]) - 300.0) < 0.05


def test_missing_channels_and_irregular_timestamps():
    kf = SensorKalmanFilter()
    kf.update(0.0, {"temperature_kelvin": 300.0, "pressure_pa": 101000.0})
    assert kf.estimate()["humidity_percent"] is None
    st = kf.state()
    assert st["innovation"]["humidity"] is None
    p0 = np.array(st["covariance_matrix"])[2, 2]
    kf.update(3600.0, {"temperature_kelvin": 300.1})  # pressure missing for an hour
    p1 = np.array(kf.state()["covariance_matrix"])[2, 2]
    assert p1 == pytest.approx(p0 + 0.05 * 3600.0)
    kf.update(3601.0, {"humidity": 40.0, "pressure": None})
    assert kf.estimate()["humidity_percent"] == 40.0
    with pytest.raises(ValueError, match="older"):
        kf.update(10.0, {"temperature": 300.0})
    with pytest.raises(ValueError, match="unknown"):
        kf.update(4000.0, {"light_lux": 5.0})


def test_innovation_reset_and_parameters():
    kf = SensorKalmanFilter()
    kf.update(0.0, {"temperature": 300.0})
    kf.update(1.0, {"temperature": 301.0})
    assert kf.state()["innovation"]["temperature"] == pytest.approx(1.0)
    kf.set_parameters(process_noise={"temperature": 0.5})
    assert kf.process_noise["temperature"] == 0.5 and kf.measurement_count == 2
    kf.reset()
    assert kf.measurement_count == 0 and kf.estimate()["temperature_kelvin"] is None
    assert kf.process_noise["temperature"] == 0.5
    with pytest.raises(ValueError):
        kf.set_parameters(measurement_noise={"temperature": 0.0})
    with pytest.raises(ValueError):
        kf.set_parameters(process_noise={"light": 1.0})


def test_to_doc_and_from_doc_resume_the_filter_exactly():
    rng = np.random.default_rng(3)
    kf = SensorKalmanFilter(process_noise={"temperature": 0.003})
    _feed(kf, rng, np.arange(0, 600, 7.0), lambda t: 300.0)
    kf.update(700.0, {"temperature_kelvin": 300.4})  # humidity and pressure not measured this time
    back = SensorKalmanFilter.from_doc(json.loads(json.dumps(kf.to_doc())))
    assert back.state() == kf.state()
    assert back.process_noise == kf.process_noise and back._t == kf._t
    assert back._p[0, 0] < kf.measurement_noise["temperature"]  # converged: not restarted at the noise
    assert back.update(710.0, {"temperature_kelvin": 300.1}) == kf.update(710.0, {"temperature_kelvin": 300.1})


def test_from_doc_refuses_a_damaged_document():
    doc = SensorKalmanFilter().to_doc()
    with pytest.raises(ValueError):
        SensorKalmanFilter.from_doc({**doc, "p": [[1.0, 0.0], [0.0, 1.0]]})
    with pytest.raises(ValueError):
        SensorKalmanFilter.from_doc({**doc, "x": [float("nan"), 0.0, 0.0]})
