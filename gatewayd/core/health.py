"""What `/health` reports: one entry per component and per plugin."""

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

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"state": self.state}
        if self.reason:
            doc["reason"] = self.reason
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
        """Register a component whose state is read live (e.g. the MQTT connection)."""
        self._probes[component] = read

    def snapshot(self) -> tuple[bool, dict[str, Any]]:
        components = dict(self.components)
        for name, read in self._probes.items():
            try:
                components[name] = read()
            except Exception as e:  # a broken probe is itself a health problem
                components[name] = ComponentState("failed", f"health probe raised {e!r}")
        ok = all(c.state in HEALTHY for c in [*components.values(), *self.plugins.values()])
        return ok, {
            "status": "ok" if ok else "degraded",
            "components": {k: v.as_json() for k, v in sorted(components.items())},
            "plugins": {k: v.as_json() for k, v in sorted(self.plugins.items())},
        }
