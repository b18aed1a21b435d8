"""KaiABC oscillator compute library: pure numpy/scipy, no I/O.

The model is the four-phosphoform KaiC model of Rust et al., Science
318:809 (2007), with the published parameters as default; see
``plugins/kaiabc/docs/model.md`` for units, sources, the phase reference,
the KOA definition and the temperature presets.

Quick start::

    from gatewayd_kaiabc.engine import OscillatorBatch, preset
    bank = OscillatorBatch(1000, temperature_model=preset("compensated"))
    bank.advance(0.5, temperatures=303.15)        # half an hour for 1000 nodes
    bank.metrics.to_spec()                        # performance_metrics block
"""

from .analytics import (Correlation, PeriodStability, Q10Result, period_stability, q10_from_periods,
                        simulated_q10, temperature_correlation)
from .batch import OscillatorBatch, PerformanceMetrics
from .integrate import (BatchResult, SolverConfig, StepSizeError, StepStats, integrate_batch,
                        solve_reference)
from .kalman import CHANNELS, SensorKalmanFilter
from .model import (SPEC_VARIABLES, STATE_NAMES, NodeRates, make_scalar_rhs, phosphorylated_fraction,
                    rhs_batch, state_from_variables, state_variables)
from .output import MAPPING_FUNCTIONS, PwmMapping, koa, koa_normalized, koa_trend
from .params import RUST_2007, RUST_2007_TEMPERATURE_K, STEP_NAMES, KaiParameters
from .prc import PhaseResponseCurve, PhaseShiftPlan, compute_prc, plan_phase_shift
from .entrain import EntrainmentResult, entrain
from .temperature import (COMPENSATION_RATIO, NAMED_SETS, PRESETS, STRONG_COUPLING, TEMPERATURE_RANGE_K,
                          EtfMappingError, EtfParameters, ModelStack, StructuralCoupling, TemperatureModel, from_etf,
                          named_set, preset)
from .timebase import (LimitCycle, PeriodEstimate, circadian_time, crossing_times, estimate_period,
                       limit_cycle, lomb_scargle_period)

__all__ = [
    "BatchResult", "CHANNELS", "COMPENSATION_RATIO", "Correlation", "EntrainmentResult", "EtfMappingError",
    "EtfParameters", "KaiParameters", "ModelStack", "TEMPERATURE_RANGE_K",
    "LimitCycle", "MAPPING_FUNCTIONS", "NAMED_SETS", "NodeRates", "OscillatorBatch", "PRESETS", "PerformanceMetrics",
    "PeriodEstimate", "PeriodStability", "PhaseResponseCurve", "PhaseShiftPlan", "PwmMapping", "Q10Result",
    "RUST_2007", "RUST_2007_TEMPERATURE_K", "SPEC_VARIABLES", "STATE_NAMES", "STEP_NAMES",
    "STRONG_COUPLING", "SensorKalmanFilter", "SolverConfig", "StepSizeError", "StepStats", "StructuralCoupling",
    "TemperatureModel", "circadian_time", "compute_prc", "crossing_times", "entrain", "estimate_period", "from_etf",
    "integrate_batch", "koa", "koa_normalized", "koa_trend", "limit_cycle", "lomb_scargle_period",
    "make_scalar_rhs", "named_set", "period_stability", "phosphorylated_fraction", "plan_phase_shift", "preset",
    "q10_from_periods", "rhs_batch", "simulated_q10", "solve_reference", "state_from_variables",
    "state_variables", "temperature_correlation",
]
