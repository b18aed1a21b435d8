"""Kalman filter for a node's sensor stream: temperature (K), humidity (%), pressure (Pa).

Each channel is modelled as a random walk: between readings its variance
grows by ``process_noise * dt`` (units^2 per second), so irregular
timestamps are handled exactly; a reading may carry any subset of channels
and only those rows are updated.  The model is linear, so this is a plain
(not extended) Kalman filter and reports ``filter_type = "kalman"``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

CHANNELS: tuple[str, ...] = ("temperature", "humidity", "pressure")
STATE_KEYS: tuple[str, ...] = ("temperature_kelvin", "humidity_percent", "pressure_pa")
# The spec's configuration template (GET /config/templates).
DEFAULT_PROCESS_NOISE = {"temperature": 0.01, "humidity": 0.02, "pressure": 0.05}
DEFAULT_MEASUREMENT_NOISE = {"temperature": 0.05, "humidity": 0.1, "pressure": 0.2}


def _noise(values: Mapping[str, float], what: str) -> dict[str, float]:
    unknown = set(values) - set(CHANNELS)
    if unknown:
        raise ValueError(f"unknown {what} channels: {sorted(unknown)}; use {CHANNELS}")
    out = {}
    for k, v in values.items():
        v = float(v)
        if not np.isfinite(v) or v < 0 or (what == "measurement_noise" and v == 0):
            raise ValueError(f"{what}.{k} must be finite and {'> 0' if what == 'measurement_noise' else '>= 0'}")
        out[k] = v
    return out


class SensorKalmanFilter:
    """Three independent-by-default random-walk channels with a full 3x3 covariance.

    ``process_noise`` (units^2/s) and ``measurement_noise`` (units^2) are
    variances keyed by channel name.  A channel's first reading initialises
    it (estimate = reading, variance = measurement noise); until then its
    estimate is None.
    """

    def __init__(self, process_noise: Mapping[str, float] | None = None,
                 measurement_noise: Mapping[str, float] | None = None) -> None:
        self._q = dict(DEFAULT_PROCESS_NOISE)
        self._r = dict(DEFAULT_MEASUREMENT_NOISE)
        self.set_parameters(process_noise, measurement_noise)
        self.reset()

    def set_parameters(self, process_noise: Mapping[str, float] | None = None,
                       measurement_noise: Mapping[str, float] | None = None) -> None:
        """Change some noise levels in place; the current estimate is kept (no reset)."""
        q = _noise(process_noise or {}, "process_noise")
        r = _noise(measurement_noise or {}, "measurement_noise")
        self._q.update(q)
        self._r.update(r)

    @property
    def process_noise(self) -> dict[str, float]:
        return dict(self._q)

    @property
    def measurement_noise(self) -> dict[str, float]:
        return dict(self._r)

    def reset(self) -> None:
        """Forget every estimate and the measurement count; noise settings are kept."""
        self._x = np.zeros(3)
        self._p = np.zeros((3, 3))
        self._known = np.zeros(3, dtype=bool)
        self._innovation = np.full(3, np.nan)
        self._t: float | None = None
        self.measurement_count = 0

    def predict(self, timestamp_s: float) -> None:
        """Propagate to ``timestamp_s`` (seconds, any epoch); time may not go backwards."""
        if self._t is not None:
            dt = float(timestamp_s) - self._t
            if dt < 0:
                raise ValueError(f"reading at {timestamp_s} is older than the last one ({self._t})")
            q = np.array([self._q[c] for c in CHANNELS]) * dt
            self._p += np.diag(np.where(self._known, q, 0.0))
        self._t = float(timestamp_s)

    def update(self, timestamp_s: float, reading: Mapping[str, float | None]) -> dict:
        """Fuse one reading (keys from STATE_KEYS or CHANNELS; missing/None = not measured)."""
        z = np.full(3, np.nan)
        for key, value in reading.items():
            name = key.split("_")[0] if key in STATE_KEYS else key
            if name not in CHANNELS:
                raise ValueError(f"unknown sensor channel {key!r}")
            if value is not None:
                if not np.isfinite(float(value)):
                    raise ValueError(f"{key} is not a finite number")
                z[CHANNELS.index(name)] = float(value)
        self.predict(timestamp_s)
        seen = ~np.isnan(z)
        if not seen.any():
            return self.state()
        r = np.array([self._r[c] for c in CHANNELS])
        fresh = seen & ~self._known
        self._x[fresh] = z[fresh]
        self._p[fresh, :] = 0.0
        self._p[:, fresh] = 0.0
        self._p[fresh, fresh] = r[fresh]
        self._known |= fresh
        self._innovation[fresh] = 0.0
        rows = np.nonzero(seen & ~fresh)[0]
        if rows.size:
            h = np.eye(3)[rows]
            innov = z[rows] - self._x[rows]
            s = h @ self._p @ h.T + np.diag(r[rows])
            gain = self._p @ h.T @ np.linalg.inv(s)
            self._x = self._x + gain @ innov
            ikh = np.eye(3) - gain @ h
            # Joseph form keeps the covariance symmetric positive semi-definite.
            self._p = ikh @ self._p @ ikh.T + gain @ np.diag(r[rows]) @ gain.T
            self._innovation[rows] = innov
        self.measurement_count += 1
        return self.state()

    def to_doc(self) -> dict:
        """Everything the filter is (estimate, covariance, which channels it knows, the last
        innovation, time, count, noise levels) as JSON, for `from_doc`."""
        return {"x": self._x.tolist(), "p": self._p.tolist(), "known": self._known.tolist(),
                "innovation": [None if np.isnan(v) else float(v) for v in self._innovation], "t": self._t,
                "count": self.measurement_count, "process_noise": self.process_noise,
                "measurement_noise": self.measurement_noise}

    @classmethod
    def from_doc(cls, doc: Mapping) -> SensorKalmanFilter:
        """The filter `to_doc` described, exactly (a restart resumes its estimate and covariance)."""
        fil = cls(doc.get("process_noise"), doc.get("measurement_noise"))
        x, p, known = np.asarray(doc["x"], float), np.asarray(doc["p"], float), np.asarray(doc["known"], bool)
        if x.shape != (3,) or p.shape != (3, 3) or known.shape != (3,) or not (np.isfinite(x).all()
                                                                              and np.isfinite(p).all()):
            raise ValueError("a filter document needs x (3), p (3x3) and known (3), finite")
        fil._x, fil._p, fil._known = x, p, known
        fil._innovation = np.array([np.nan if v is None else float(v) for v in doc.get("innovation", [None] * 3)])
        fil._t = None if doc.get("t") is None else float(doc["t"])
        fil.measurement_count = int(doc.get("count", 0))
        return fil

    def estimate(self) -> dict[str, float | None]:
        return {k: (float(v) if known else None) for k, v, known in zip(STATE_KEYS, self._x, self._known)}

    def state(self) -> dict:
        """The spec's ``GET /filter/state`` body (without node_id)."""
        return {
            "filter_type": "kalman",
            "state_estimate": self.estimate(),
            "covariance_matrix": self._p.tolist(),
            "innovation": {c: (None if np.isnan(v) else float(v)) for c, v in zip(CHANNELS, self._innovation)},
            "measurement_count": self.measurement_count,
        }
