"""The gateway's serial lines: started per plugin, reported in /health and /metrics."""

from __future__ import annotations

from collections.abc import Iterable

import trio

from ..health import ComponentState, Health
from ..metrics import Metrics, Sample
from .link import FrameHandler, SerialLink, SerialSettings

__all__ = ["SerialLinks"]

_COUNTERS = [
    ("gatewayd_serial_bytes_total", "Bytes through serial lines", "bytes_in", "bytes_out"),
    ("gatewayd_serial_frames_total", "Frames through serial lines", "frames_in", "frames_out"),
]
_SINGLE = [
    ("gatewayd_serial_framing_errors_total", "Undecodable input on serial lines (noise, bad CRC, oversized)",
     "framing_errors"),
    ("gatewayd_serial_handler_errors_total", "Frames whose plugin handler raised", "handler_errors"),
    ("gatewayd_serial_reconnects_total", "Serial lines reopened after being lost", "reconnects"),
]


class SerialLinks:
    """Every plugin's serial lines, each under a cancel scope of its plugin."""

    def __init__(self, metrics: Metrics, health: Health):
        self.links: dict[str, SerialLink] = {}
        self._scopes: dict[str, list[trio.CancelScope]] = {}
        self._health = health
        self._register_metrics(metrics)

    async def start(self, plugin: str, lines: Iterable[tuple[str, SerialSettings, FrameHandler]],
                    nursery: trio.Nursery) -> None:
        """Open the plugin's lines, (name, settings, handler) each; each reports started
        after its first open attempt."""
        for name, settings, handler in lines:
            link = SerialLink(f"{plugin}.{name}", settings, handler)
            scope = trio.CancelScope()
            self._scopes.setdefault(plugin, []).append(scope)

            async def run(link: SerialLink = link, scope: trio.CancelScope = scope, task_status=trio.TASK_STATUS_IGNORED):
                with scope:
                    await link.run(task_status=task_status)

            await nursery.start(run)
            self.links[link.name] = link
            self._health.probe(f"serial.{link.name}", lambda link=link: self._state(link))

    def stop_plugin(self, plugin: str) -> None:
        """Close a failed plugin's lines: nobody would handle their frames."""
        for scope in self._scopes.pop(plugin, []):
            scope.cancel()
        for name in [n for n in self.links if n.startswith(f"{plugin}.")]:
            self._health.probe(f"serial.{name}", lambda: ComponentState("off", "plugin failed"))

    @staticmethod
    def _state(link: SerialLink) -> ComponentState:
        stats = link.stats.as_dict()
        details = {"port": link.settings.port, "framing": link.settings.framing,
                   "frames_in": stats["frames_in"], "reconnects": stats["reconnects"]}
        if link.state == "open":
            return ComponentState("ok", None, details)
        return ComponentState(link.state, stats.get("last_error"), details)

    def _register_metrics(self, metrics: Metrics) -> None:
        for name, help, incoming, outgoing in _COUNTERS:
            metrics.collector(name, "counter", help, lambda name=name, i=incoming, o=outgoing: [
                Sample(name, {"link": ln, "direction": d}, getattr(link.stats, key))
                for ln, link in sorted(self.links.items()) for d, key in (("in", i), ("out", o))
            ])
        for name, help, key in _SINGLE:
            metrics.collector(name, "counter", help, lambda name=name, key=key: [
                Sample(name, {"link": ln}, getattr(link.stats, key)) for ln, link in sorted(self.links.items())
            ])
        metrics.collector("gatewayd_serial_up", "gauge", "1 when a serial line is open", lambda: [
            Sample("gatewayd_serial_up", {"link": ln}, 1.0 if link.state == "open" else 0.0)
            for ln, link in sorted(self.links.items())
        ])
