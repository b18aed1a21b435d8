"""The site's panels on the dashboard's overview (docs/dashboard.md): what a technician
at the site wants at a glance.

- **Doors**: per door, its cycles (a `cycle_open`) today and this ISO week, site time
  (`utc_offset`), from the same query as the `/doors` route.
- **Door nodes**: maintenance mode (on: why, since when), the workflow alerts firing now,
  the nodes claimed and waiting to be claimed, and each node's status and last batch
  (when, accepted / duplicates / rejected).

Every value goes through `Markup.format`, which escapes it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from markupsafe import Markup

from gatewayd.plugins.api import PluginContext

from . import models

if TYPE_CHECKING:
    from .config import EdgesentinelConfig
    from .state import Sentinel

Render = Callable[[], Awaitable[Markup]]
CLAIMED = ("claimed", "active")


def panels(ctx: PluginContext[EdgesentinelConfig, Sentinel]) -> list[tuple[str, Render]]:
    async def doors() -> Markup:
        offset = ctx.config.offset_s()
        today = dt.datetime.fromtimestamp(ctx.now() + offset, dt.UTC).date()
        monday = today - dt.timedelta(days=today.weekday())
        since = dt.datetime.combine(monday, dt.time(), dt.UTC).timestamp() - offset
        counts = await ctx.storage.read(models.door_cycles, "", since, offset)
        if not counts:
            return Markup("<p>No door cycles this week.</p>")
        rows = Markup("").join(
            Markup("<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>").format(
                device, door, daily.get(today.isoformat(), 0), sum(daily.values()))
            for (device, door), daily in sorted(counts.items()))
        return Markup("<table><thead><tr><th>node</th><th>door</th><th>cycles today</th><th>this week</th></tr>"
                      "</thead><tbody>{}</tbody></table>").format(rows)

    async def nodes() -> Markup:
        state = ctx.maintenance.state
        if state.active:
            since = _when(state.since) if state.since else "?"
            maintenance = Markup("<p><b>Maintenance mode: on</b> since {} ({}): nodes are told to retry "
                                 "in {} s.</p>").format(since, state.reason or "no reason given", state.retry_after_s)
        else:
            maintenance = Markup("<p>Maintenance mode: off.</p>")
        active = ctx.events.active()
        alerts = Markup("").join(Markup("<li>{} <i>{}</i> on {}</li>").format(rule, etype or "", device or "the site")
                                 for rule, device, etype in active)
        alerts = (Markup("<p>Workflow alerts firing: {}</p><ul>{}</ul>").format(len(active), alerts) if active
                  else Markup("<p>No workflow alert is firing.</p>"))
        devices = sorted(await ctx.devices.list(), key=lambda d: d.id)
        last = await ctx.storage.read(models.last_batches, [d.id for d in devices])
        claimed = sum(d.status in CLAIMED for d in devices)
        waiting = sum(d.status == "provisioned" for d in devices)
        rows = Markup("").join(
            Markup("<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>").format(
                d.id, d.status, _when(last[d.id][0]) if d.id in last else "none yet",
                "{} / {} / {}".format(*last[d.id][1:]) if d.id in last else "")
            for d in devices)
        table = Markup("<table><thead><tr><th>node</th><th>status</th><th>last batch</th>"
                       "<th>accepted / duplicates / rejected</th></tr></thead><tbody>{}</tbody></table>").format(rows)
        counts = Markup("<p>{} claimed, {} waiting to be claimed.</p>").format(claimed, waiting)
        return maintenance + alerts + counts + table

    return [("Doors", doors), ("Door nodes", nodes)]


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
