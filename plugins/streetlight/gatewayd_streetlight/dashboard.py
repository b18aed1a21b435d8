"""The plugin's panel on the dashboard's overview (`gatewayd_dashboard_panels`): what a
street-light operator wants at a glance. The lights by indicator colour (the colour of
`assess`, as on the health route and in the devices table), on / off, the lights gone
quiet, the commands not yet executed, and the energy the lights used today.

Drawn on every redraw of the overview (at most once a second while events arrive): it
reads what the plugin keeps in memory, the command queue's waiting commands, and the
energy table by its index, two rows per light; the energy is read at most once a minute.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from gatewayd.plugins.api import Markup, PluginContext

from . import commands, models
from .config import StreetlightConfig

if TYPE_CHECKING:
    from .lights import Streetlight

    Ctx = PluginContext[StreetlightConfig, Streetlight]

COLOURS = ("green", "yellow", "red", "gray")
SHOWN = 20  # quiet lights listed by name; the rest counted
ENERGY_EVERY_S = 60.0
MAX_COMMANDS = 1000


class Panel:
    """`render()` is the panel's body; built once per plugin."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self._energy: tuple[float, float, tuple[float, int]] | None = None  # (read at, since, (kWh, lights))

    async def render(self) -> Markup:
        state, now = self.ctx.state, self.ctx.now()
        colours: collections.Counter[str] = collections.Counter()
        power: collections.Counter[str] = collections.Counter()
        quiet: list[tuple[float, str, str]] = []
        waiting_approval = 0
        for device in await self.ctx.devices.list():
            if device.status == "disabled":
                waiting_approval += device.metadata.get("enrollment") == "pending"
                continue
            colours[state.assess(device).indicator] += 1
            latest = state.latest.get(device.id) or {}
            power[latest.get("power_state") or "unknown"] += 1
            silent = state.silent_s(device)
            if silent is not None and silent > self.ctx.config.health.offline_after_s:
                quiet.append((silent, device.id, state.light_of.get(device.id, "")))
        pending = await self.ctx.commands.list(status="pending", limit=MAX_COMMANDS)
        handed = await self.ctx.commands.list(status="delivered", limit=MAX_COMMANDS)
        kwh, metered = await self._energy_today(now)
        parts = [
            Markup('<p class="lights">Lights: <b>{}</b>: {}</p>').format(
                sum(colours.values()),
                Markup(", ").join(Markup('<span class="dot {}"></span> <span data-colour="{}">{}</span> {}').format(
                    c, c, colours[c], c) for c in COLOURS)),
            Markup('<p class="power">Lamps <b data-power="on">{}</b> on, <b data-power="off">{}</b> off, '
                   '<b data-power="error">{}</b> in error, <b data-power="unknown">{}</b> not reported yet.</p>').format(
                power["on"], power["off"], power["error"], power["unknown"]),
            self._commands(pending, handed),
            Markup('<p class="energy">Energy today (since {} local): <b data-energy-kwh="{:.3f}">{:.1f} kWh</b> '
                   'over {} metered lights.</p>').format(time.strftime("%H:%M", time.localtime(self._midnight(now))),
                                                         kwh, kwh, metered),
            self._quiet(sorted(quiet, reverse=True)),
        ]
        if waiting_approval:
            parts.append(Markup('<p class="approval">Waiting for approval: <b>{}</b> (approve with <code>gatewayd '
                                'devices enable --family {} ID</code>).</p>').format(waiting_approval, self.ctx.name))
        return Markup("\n").join(parts)

    def _commands(self, pending: list[Any], handed: list[Any]) -> Markup:
        high = sum(commands.priority_of(c) == "high" for c in pending + handed)
        more = "+" if len(pending) >= MAX_COMMANDS or len(handed) >= MAX_COMMANDS else ""
        return Markup('<p class="commands">Commands: <b data-commands="pending">{}{}</b> waiting for their light, '
                      '<b data-commands="delivered">{}{}</b> handed out and not acknowledged yet '
                      '({} of high priority).</p>').format(len(pending), more, len(handed), more, high)

    def _quiet(self, quiet: list[tuple[float, str, str]]) -> Markup:
        if not quiet:
            return Markup('<p class="quiet">Every light that reported is online.</p>')
        rows = Markup("").join(
            Markup('<tr data-light="{}"><td><a href="/dashboard/devices/{}?family={}">{}</a></td><td>{}</td>'
                   '<td class="num">{}</td></tr>').format(
                device, quote(device, safe=""), quote(self.ctx.name), device, light, _ago(silent))
            for silent, device, light in quiet[:SHOWN])
        rest = len(quiet) - SHOWN
        tail = Markup('<p class="muted">and {} more.</p>').format(rest) if rest > 0 else Markup("")
        return Markup('<h3>Offline <span class="muted">no status for more than {} s</span></h3>'
                      '<table class="quiet"><thead><tr><th>Light</th><th>Id</th><th class="num">Last heard</th></tr>'
                      '</thead><tbody>{}</tbody></table>{}').format(
            int(self.ctx.config.health.offline_after_s), rows, tail)

    async def _energy_today(self, now: float) -> tuple[float, int]:
        since = self._midnight(now)
        cached = self._energy
        if cached is None or cached[1] != since or now - cached[0] >= ENERGY_EVERY_S or now < cached[0]:
            cached = self._energy = (now, since, await self.ctx.storage.read(models.energy_since, since))
        return cached[2]

    @staticmethod
    def _midnight(now: float) -> float:
        """The last local midnight (the site's day)."""
        t = time.localtime(now)
        return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"
