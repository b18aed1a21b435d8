"""What family plugins add to the dashboard: device health, telemetry, panels.

The core knows nothing about a family (what "unhealthy" means for a streetlight, where
paku keeps its readings): it asks the family's plugin through three hooks
(`gatewayd_device_health`, `gatewayd_device_telemetry`, `gatewayd_dashboard_panels`,
see hookspecs.py) and checks every answer here, so a plugin's mistake shows as gray,
"no telemetry" or an error line in its own panel, never as a broken page. Each
distinct mistake is logged once, not on every redraw.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from ..logs import get_logger

if TYPE_CHECKING:
    from ...plugins.context import PluginContext
    from ...plugins.manager import PluginManager
    from ..devices.registry import Device

__all__ = ["COLOURS", "Indicator", "Panel", "PluginViews", "Reading", "describe"]

log = get_logger("gatewayd.dashboard")

COLOURS = ("green", "yellow", "red", "gray")
MAX_SERIES = 12  # charts per device page: more is a plugin handing over everything it has
MAX_NAME = 64
MAX_REASON = 200

Reading = tuple[float, dict[str, float]]


@dataclass(frozen=True)
class Indicator:
    """A device's health as its family's plugin judges it."""

    colour: str = "gray"
    reason: str = ""


@dataclass(frozen=True)
class Panel:
    plugin: str
    title: str
    render: Callable[[], Awaitable[Any]]


class PluginViews:
    """Asks the running plugins, checks their answers."""

    def __init__(self, manager: PluginManager, contexts: Mapping[str, PluginContext[Any, Any]],
                 running: Callable[[], Iterable[str]]) -> None:
        self.manager = manager
        self.contexts = contexts  # filled by the runtime before the first page is drawn
        self.running = running  # enabled plugins that have not failed, now
        self._panels: list[Panel] | None = None
        self._told: set[tuple[str, str]] = set()

    def _ctx(self, family: str) -> PluginContext[Any, Any] | None:
        return self.contexts.get(family) if family in set(self.running()) else None

    def _complain(self, plugin: str, what: str, **details: Any) -> None:
        if (plugin, what) not in self._told:
            self._told.add((plugin, what))
            log.error(f"dashboard: {what} (logged once)", plugin=plugin, **details)

    async def health(self, device: Device) -> Indicator:
        ctx = self._ctx(device.family)
        if ctx is None:
            return Indicator()
        try:
            answer = await self.manager.device_health(device.family, ctx, device)
        except Exception as e:
            self._complain(device.family, "gatewayd_device_health raised", error=repr(e))
            return Indicator()
        if answer is None:
            return Indicator()
        colour, reason = (answer if isinstance(answer, tuple) and len(answer) == 2 else (answer, ""))
        if colour not in COLOURS or not isinstance(reason, str):
            self._complain(device.family, "gatewayd_device_health answered something else than a colour "
                           "or (colour, reason)", answer=repr(answer)[:100])
            return Indicator()
        return Indicator(colour, reason[:MAX_REASON])

    async def telemetry(self, device: Device, limit: int) -> list[Reading]:
        """At most `limit` readings, oldest first; only finite numbers, at most MAX_SERIES series."""
        ctx = self._ctx(device.family)
        if ctx is None:
            return []
        try:
            answer = await self.manager.device_telemetry(device.family, ctx, device, limit)
        except Exception as e:
            self._complain(device.family, "gatewayd_device_telemetry raised", error=repr(e))
            return []
        readings: list[Reading] = []
        series: set[str] = set()
        for item in answer:
            try:
                ts, values = item
                if not _finite(ts) or not isinstance(values, Mapping):
                    raise TypeError
            except (TypeError, ValueError):
                self._complain(device.family, "gatewayd_device_telemetry answered an item that is not "
                               "(ts, {name: number})", item=repr(item)[:100])
                continue
            kept = {}
            for name, value in values.items():
                if isinstance(name, str) and 0 < len(name) <= MAX_NAME and _finite(value):
                    if name in series or len(series) < MAX_SERIES:
                        series.add(name)
                        kept[name] = float(value)
            readings.append((float(ts), kept))
        readings.sort(key=lambda r: r[0])
        return readings[-limit:] if limit > 0 else []

    def panels(self) -> list[Panel]:
        """Every running plugin's panels (asked at the first call, when the dashboard is built;
        a plugin failed since is left out)."""
        if self._panels is None:
            self._panels = []
            for name in self.running():
                ctx = self.contexts.get(name)
                if ctx is None:
                    continue
                try:
                    answer = self.manager.dashboard_panels(name, ctx)
                except Exception as e:
                    self._complain(name, "gatewayd_dashboard_panels raised", error=repr(e))
                    continue
                for item in answer:
                    if (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                            and callable(item[1])):
                        self._panels.append(Panel(name, item[0], item[1]))
                    else:
                        self._complain(name, "gatewayd_dashboard_panels answered an item that is not "
                                       "(title, async render)", item=repr(item)[:100])
        running = set(self.running())
        return [p for p in self._panels if p.plugin in running]

    async def render(self, panel: Panel) -> Markup:
        """The panel's body: its Markup as it is, anything else as escaped text."""
        try:
            body = await panel.render()
        except Exception as e:
            self._complain(panel.plugin, f"the panel {panel.title!r} raised", error=repr(e))
            return Markup('<p class="problem">This panel failed: {}</p>').format(f"{type(e).__name__}: {e}")
        if isinstance(body, Markup):
            return body
        return Markup("<p>{}</p>").format(body) if body else Markup("")


def _finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond a double
        return False


def describe(reading: Reading | None) -> str:
    """A reading in a line: `temp_c 21.5 · rssi -61`."""
    if reading is None or not reading[1]:
        return ""
    return " · ".join(f"{name} {_number(value)}" for name, value in reading[1].items())


def _number(value: float) -> str:
    return f"{value:.6g}"


