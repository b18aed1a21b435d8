"""What `/health` reports: one entry per component and per plugin.

A component that is not healthy either stops the gateway doing its job (the default:
/health answers 503, `status: "degraded"`, and a load balancer or a watchdog script
should act), or is a **warning** (`critical=False`: /health still answers 200, with
`status: "warning"` and the component's own state, reason and `"severity": "warning"`,
for a technician or an alert rule): a certificate that expires in 20 days, a backup
that failed or is old. The gateway still takes, stores and forwards device data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Health", "ComponentState"]

# States that count as healthy; anything else turns /health into a 503.
HEALTHY = frozenset({"ok", "disabled", "off"})


@dataclass
class ComponentState:
    state: str
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    #: False: a state outside HEALTHY is a warning (200), not a failure (503).
    critical: bool = True

    @property
    def warning(self) -> bool:
        return self.state not in HEALTHY and not self.critical

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"state": self.state}
        if self.reason:
            doc["reason"] = self.reason
        if self.warning:
            doc["severity"] = "warning"
        doc.update(self.details)
        return doc


class Health:
    """Component states, set by the runtime or read from a component at request time."""

    def __init__(self) -> None:
        self.components: dict[str, ComponentState] = {}
        self.plugins: dict[str, ComponentState] = {}
        self._probes: dict[str, Callable[[], ComponentState]] = {}

    def set(self, component: str, state: str, reason: str | None = None, **details: Any) -> None:
        self.components[component] = ComponentState(state, reason, details)

    def set_plugin(self, plugin: str, state: str, reason: str | None = None) -> None:
        self.plugins[plugin] = ComponentState(state, reason)

    def probe(self, component: str, read: Callable[[], ComponentState]) -> None:
        """Register a component whose state is read live (e.g. the MQTT connection).
        `read` returns `ComponentState(..., critical=False)` for a state that is a warning."""
        self._probes[component] = read

    def snapshot(self) -> tuple[bool, dict[str, Any]]:
        components = dict(self.components)
        for name, read in self._probes.items():
            try:
                components[name] = read()
            except Exception as e:  # a broken probe is itself a health problem
                components[name] = ComponentState("failed", f"health probe raised {e!r}")
        every = [*components.values(), *self.plugins.values()]
        ok = all(c.state in HEALTHY or c.warning for c in every)
        warned = any(c.warning for c in every)
        return ok, {
            "status": "degraded" if not ok else "warning" if warned else "ok",
            "components": {k: v.as_json() for k, v in sorted(components.items())},
            "plugins": {k: v.as_json() for k, v in sorted(self.plugins.items())},
        }
