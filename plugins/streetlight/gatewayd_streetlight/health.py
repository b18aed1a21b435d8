"""A light's health: each metric of the specification's section 9 against its threshold,
and the dashboard indicator (green / yellow / red / gray). Pure: the health route, the
dashboard hook and the tests all call `assess`, so a light has one colour everywhere.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from .config import Health


class Metric(NamedTuple):
    metric: str
    value: float | None
    threshold: float
    alert: bool  # past its threshold
    severity: str  # what it means when it is: "red" or "yellow"


class Assessment(NamedTuple):
    indicator: Literal["green", "yellow", "red", "gray"]
    reason: str
    metrics: list[Metric]

    def as_json(self) -> dict[str, Any]:
        return {"indicator": self.indicator, "reason": self.reason,
                "metrics": [{"metric": m.metric, "value": m.value, "threshold": m.threshold,
                             "state": "alert" if m.alert else "ok"} for m in self.metrics]}


def assess(latest: dict[str, Any] | None, silent_s: float | None, errors_last_hour: int, h: Health) -> Assessment:
    """`latest`: the light's newest status (models.latest_status), None if it never sent
    one; `silent_s`: seconds since the gateway last heard from it (None: never)."""
    if latest is None or silent_s is None:
        return Assessment("gray", "never reported a status", [])
    battery, temp, signal = latest.get("battery"), latest.get("temperature"), latest.get("gsm_signal")
    metrics = [
        Metric("last_status_seconds", round(silent_s, 1), h.offline_after_s, silent_s > h.offline_after_s, "yellow"),
        Metric("battery_percentage", battery, h.battery_critical_pct,
               battery is not None and battery < h.battery_critical_pct, "red"),
        Metric("temperature_celsius", temp, h.temperature_max_c, temp is not None and temp > h.temperature_max_c,
               "red"),
        Metric("gsm_signal_strength", signal, h.gsm_signal_min, signal is not None and signal < h.gsm_signal_min,
               "yellow"),
        Metric("errors_last_hour", errors_last_hour, h.errors_per_hour_max, errors_last_hour > h.errors_per_hour_max,
               "red"),
    ]
    reasons = {"last_status_seconds": "offline", "battery_percentage": f"battery critical ({battery} %)",
               "temperature_celsius": f"overheating ({temp} °C)", "gsm_signal_strength": f"poor signal ({signal})",
               "errors_last_hour": f"malfunction ({errors_last_hour} errors in the last hour)"}
    if metrics[0].alert:  # offline: what it said last may no longer hold
        return Assessment("yellow", "offline", metrics)
    red = [reasons[m.metric] for m in metrics if m.alert and m.severity == "red"]
    if latest.get("power_state") == "error":
        red.insert(0, "the light reports an error")
    if red:
        return Assessment("red", "; ".join(red), metrics)
    yellow = [reasons[m.metric] for m in metrics if m.alert]
    if battery is not None and battery < h.battery_low_pct:
        yellow.append(f"battery low ({battery} %)")
    if yellow:
        return Assessment("yellow", "; ".join(yellow), metrics)
    return Assessment("green", "online, all metrics normal", metrics)


def next_update_seconds(latest: dict[str, Any], h: Health) -> int:
    """The status cadence (section 2): fast while hot or low on battery."""
    temp, battery = latest.get("temperature"), latest.get("battery")
    if (temp is not None and temp > h.temperature_high_c) or (battery is not None and battery < h.battery_low_pct):
        return h.fast_status_s
    return h.status_s


def poll_seconds(latest: dict[str, Any] | None, priority_waiting: bool, h: Health) -> int:
    """The command poll interval (section 3): 2 s while a high-priority command waits for
    its ack, 60 s on a low battery, else 10 s."""
    if priority_waiting:
        return h.poll_priority_s
    battery = None if latest is None else latest.get("battery")
    return h.poll_low_battery_s if battery is not None and battery < h.battery_low_pct else h.poll_s
