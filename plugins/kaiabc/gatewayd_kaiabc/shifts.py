"""Phase shifts applied to live oscillators (`POST /entrainment/phase-shift`).

A shift is a temperature step of `delta_k` for `duration_h` simulated hours, given when
the node's circadian time reaches the chosen CT (the PRC's best for the request). From
the pulse's start an unpulsed twin of the node runs beside it in the same batch; once
the pulse ended and `settle_h` more simulated hours passed, the measured shift is the
node's phase minus the twin's (in hours, + = advance), and the shift is complete.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from .engine import LimitCycle


@dataclass
class Shift:
    shift_id: str
    node_id: str
    shift_type: str  # advance | delay
    target_hours: float  # signed
    delta_k: float
    duration_h: float
    start_ct: float  # when the pulse is given
    expected_hours: float  # the PRC's prediction at start_ct
    settle_h: float
    requested_at: float
    stage: str = "waiting"  # waiting, pulsing, settling, complete
    pulse_start_h: float = 0.0  # the node's simulated clock at the pulse's start
    twin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    actual_hours: float | None = None
    completed_at: float | None = None

    def to_doc(self) -> dict[str, Any]:
        """As JSON, for the node's persisted settings (a restart resumes a shift under way)."""
        return {**asdict(self), "twin": [float(v) for v in self.twin]}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Shift:
        return cls(**{**doc, "twin": np.asarray(doc["twin"], dtype=float)})

    def summary(self, iso: Any) -> dict[str, Any]:
        """The spec's `recent_shifts` item (GET /analytics/entrainment-efficiency)."""
        efficiency = None if self.actual_hours is None else round(self.actual_hours / self.target_hours, 3)
        return {"shift_id": self.shift_id, "node_id": self.node_id, "timestamp": iso(self.requested_at),
                "type": self.shift_type,
                "target_shift_hours": abs(self.target_hours),
                "actual_shift_hours": None if self.actual_hours is None else round(abs(self.actual_hours), 3)
                if self.actual_hours * self.target_hours > 0 else round(self.actual_hours, 3),
                "efficiency": efficiency, "stage": self.stage,
                "settling_time_hours": self.duration_h + self.settle_h, "temperature_delta_applied": self.delta_k,
                "expected_phase_change": round(self.expected_hours, 3), "start_circadian_time": self.start_ct}


def ct_reached(ct_before: float, ct_after: float, target: float) -> bool:
    """Whether the circadian time passed `target` going from `ct_before` to `ct_after` (mod 24)."""
    span = (ct_after - ct_before) % 24.0
    if span > 12.0:  # the geometric phase stepped back a little: not a pass
        return False
    return (target - ct_before) % 24.0 <= span


def measured(cycle: LimitCycle, node: np.ndarray, twin: np.ndarray) -> float:
    """The node's phase lead over its twin, in hours, wrapped to (-P/2, P/2]."""
    d = float((cycle.phase_of(node)[0] - cycle.phase_of(twin)[0]) % 1.0) * cycle.period
    return d - cycle.period if d > cycle.period / 2 else d
