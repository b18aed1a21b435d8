"""Data for the site (admin token): the data explorer with its CSV export, streamed a
page at a time so a month of data never sits in memory, and the door cycle counters
with their daily and weekly histograms. Queries use the `(device, ts)` and
`(metric, ts)` indexes; pages are keyed on `(ts, id)`; without a device or an indexed
name, each device's rows are read through its index and merged (`_merged`).
"""

from __future__ import annotations

import csv
import datetime as dt
import heapq
import io
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

from msgspec import Meta, Struct
from quart import Blueprint, Response

from gatewayd.plugins.api import ADMIN_TOKEN, BadJSON, PluginContext, Raw, Routes, parse_time

from . import models

if TYPE_CHECKING:
    from .config import EdgesentinelConfig
    from .state import Sentinel

PAGE = 5000
SERIES = ("points", "windows", "door_events", "system_events")


class DataQuery(Struct, forbid_unknown_fields=True):
    series: Annotated[str, Meta(pattern="^(" + "|".join(SERIES) + ")$")] = "points"
    device: Annotated[str, Meta(max_length=128)] = ""
    metric: Annotated[str, Meta(max_length=64, description="points and windows: the metric; events: the type")] = ""
    since: Annotated[str, Meta(description="ISO 8601 or epoch seconds")] = ""
    until: Annotated[str, Meta(description="before this time")] = ""
    limit: Annotated[int, Meta(ge=1, le=10_000_000)] = 1_000_000
    after: Annotated[str, Meta(max_length=64, pattern=r"^([0-9.eE+-]+:[0-9]+)?$",
                               description="continue an export cut at its limit: the `after=<ts>:<id>` "
                                           "of its last line")] = ""


class DoorsQuery(Struct, forbid_unknown_fields=True):
    device: Annotated[str, Meta(max_length=128)] = ""
    days: Annotated[int, Meta(ge=1, le=366)] = 28


class DoorCount(Struct):
    device: str
    door_id: str
    cycles: int
    daily: Annotated[dict[str, int], Meta(description="YYYY-MM-DD (site time) -> cycles")]
    weekly: Annotated[dict[str, int], Meta(description="ISO week YYYY-Www -> cycles")]


class Doors(Struct):
    doors: list[DoorCount]


def add_routes(ctx: PluginContext[EdgesentinelConfig, Sentinel], bp: Blueprint) -> None:
    routes = Routes(bp, tag=ctx.name, auth=ADMIN_TOKEN)

    @routes.get("/data", query=DataQuery, responses={200: Raw("text/csv", "a header line, then the rows; cut at "
                                                                       "`limit` with rows left: a last line "
                                                                       "`#more after=<ts>:<id>`")})
    async def data(query: DataQuery) -> Any:
        """The data explorer: one series filtered by device, metric and time, oldest first, streamed as CSV.

        At most `limit` rows (`X-Export-Limit`); an export cut there with rows left ends
        with the line `#more after=<ts>:<id> limit=<limit>`: the same query with that
        `after` continues it, in the same `(ts, id)` order, nothing twice or skipped."""
        if denied := ctx.http.require_admin():
            return denied
        since, until = _time(query.since, "since"), _time(query.until, "until")
        start = _cursor(query.after)
        cut = Cut(start)

        async def read(device: str, after: tuple[float, int] | None, n: int) -> list[tuple[Any, ...]]:
            return await ctx.storage.read(models.explore, query.series, device, query.metric, since, until, after, n)

        async def rows() -> AsyncIterator[bytes]:
            yield _csv([models.COLUMNS[query.series]])
            indexed = query.device or (query.metric and query.series in models.INDEXED_NAME)
            pages = _pages(read, query.device, query.limit, cut) if indexed else \
                _merged(read, await ctx.storage.read(models.devices_of, query.series), query.limit, cut)
            async for page in pages:
                yield _csv(page)
            if cut.more and cut.last is not None:
                yield f"#more after={cut.last[0]!r}:{cut.last[1]} limit={query.limit}\n".encode()

        response = Response(rows(), content_type="text/csv; charset=utf-8", headers={"X-Export-Limit": str(query.limit)})
        # A month of data takes minutes: quart's RESPONSE_TIMEOUT (60 s) would cut it off
        # mid-body. Nothing is held between pages; a client that stops reading is the
        # core's business at stop (as for the live streams).
        response.timeout = None
        return response

    @routes.get("/doors", query=DoorsQuery, responses={200: Doors})
    async def doors(query: DoorsQuery) -> Any:
        """Door cycle counters (a cycle: one cycle_open) and their daily and weekly histograms."""
        if denied := ctx.http.require_admin():
            return denied
        since = ctx.now() - query.days * 86400
        counts = await ctx.storage.read(models.door_cycles, query.device, since, ctx.config.offset_s())
        return Doors([DoorCount(device, door, sum(daily.values()), daily, _weekly(daily))
                      for (device, door), daily in sorted(counts.items())])


Read = Callable[[str, "tuple[float, int] | None", int], Awaitable[list[tuple[Any, ...]]]]


class Cut:
    """Where an export is: the `(ts, id)` of its last row, and whether the limit left rows."""

    def __init__(self, start: tuple[float, int] | None) -> None:
        self.last = start
        self.more = False


async def _pages(read: Read, device: str, limit: int, cut: Cut) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Pages of one index range (a device's, a metric's), keyed on `(ts, id)`."""
    while limit > 0:
        page = await read(device, cut.last, min(PAGE, limit))
        if not page:
            return
        yield page
        limit -= len(page)
        cut.last = (float(page[-1][0]), int(page[-1][-1]))
    cut.more = bool(await read(device, cut.last, 1))  # one index probe: is the limit the end?


async def _merged(read: Read, devices: list[str], limit: int, cut: Cut) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Pages of every device's rows in `(ts, id)` order: each device read through its
    `(device, ts)` index a share of a page at a time, merged. Without a device or an
    indexed metric no index gives `ts` order, and a page would sort the whole table."""
    share = max(PAGE // max(1, len(devices)), min(PAGE, 100))
    buffers: dict[str, deque[tuple[Any, ...]]] = {}
    after: dict[str, tuple[float, int] | None] = dict.fromkeys(devices, cut.last)  # one order for all: (ts, id)
    more: dict[str, bool] = {}
    heap: list[tuple[float, int, str]] = []

    async def fill(device: str) -> None:
        page = await read(device, after[device], share)
        more[device] = len(page) == share
        if page:
            after[device] = (float(page[-1][0]), int(page[-1][-1]))
        buffers[device] = deque(page)

    def push(device: str) -> None:
        if buffers[device]:
            head = buffers[device][0]
            heapq.heappush(heap, (float(head[0]), int(head[-1]), device))

    for device in devices:
        await fill(device)
        push(device)
    out: list[tuple[Any, ...]] = []
    while heap and limit > 0:
        device = heapq.heappop(heap)[2]
        out.append(buffers[device].popleft())
        limit -= 1
        if len(out) == PAGE:  # sent before the next read
            cut.last = (float(out[-1][0]), int(out[-1][-1]))
            yield out
            out = []
        if not buffers[device] and more[device]:
            await fill(device)
        push(device)
    if out:
        cut.last = (float(out[-1][0]), int(out[-1][-1]))
        yield out
    cut.more = bool(heap)  # a device's next row is waiting: the limit cut the export


def _cursor(text: str) -> tuple[float, int] | None:
    """`after=<ts>:<id>` (the last line of an export cut at its limit)."""
    if not text:
        return None
    ts, _, row_id = text.partition(":")
    try:
        cursor = (float(ts), int(row_id))
    except ValueError:
        raise BadJSON(f"after: {text!r} is not <ts>:<id>") from None
    if not math.isfinite(cursor[0]):
        raise BadJSON(f"after: {text!r} is not <ts>:<id>")
    return cursor


def _time(text: str, name: str) -> float | None:
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError as e:
        raise BadJSON(f"{name}: {e}") from None


def _csv(rows: list[tuple[Any, ...]] | list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def _weekly(daily: dict[str, int]) -> dict[str, int]:
    weeks: dict[str, int] = {}
    for day, n in daily.items():
        year, week, _ = dt.date.fromisoformat(day).isocalendar()
        key = f"{year}-W{week:02d}"
        weeks[key] = weeks.get(key, 0) + n
    return weeks
