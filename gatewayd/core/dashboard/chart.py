"""Telemetry charts drawn on the server as inline SVG: no chart library, no script.

One small chart per series (a temperature and a signal strength share no scale), each
with its name, its newest value, its lowest and highest, and the time axis in "ago"
terms (the server does not know the browser's time zone, and "5 min ago" needs none).
Points are drawn as dots as well as a line, so a device's first reading shows.
Pure functions: readings in, escaped markup out.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup

from .plugin_views import Reading
from .timefmt import ago

__all__ = ["series_of", "svg_chart"]

WIDTH, HEIGHT = 640, 150
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 14, 26
DOTS_UP_TO = 80  # more points than this: the line alone reads better


def series_of(readings: Sequence[Reading]) -> dict[str, list[tuple[float, float]]]:
    """Series name -> [(ts, value)] oldest first, in the order names first appear."""
    out: dict[str, list[tuple[float, float]]] = {}
    for ts, values in readings:
        for name, value in values.items():
            out.setdefault(name, []).append((ts, value))
    return out


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _span(low: float, high: float, pad: float) -> tuple[float, float]:
    if high == low:  # one value: centre it
        half = abs(low) * 0.1 or 1.0
        return low - half, high + half
    margin = (high - low) * pad
    return low - margin, high + margin


def svg_chart(name: str, points: Sequence[tuple[float, float]], *, now: float) -> Markup:
    """One series as an SVG chart (`points` oldest first, at least one)."""
    times = [t for t, _ in points]
    values = [v for _, v in points]
    low, high = min(values), max(values)
    y0, y1 = _span(low, high, 0.08)
    t0, t1 = (times[0], times[-1]) if times[-1] > times[0] else (times[0] - 30, times[0] + 30)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + (t - t0) / (t1 - t0) * plot_w

    def y(v: float) -> float:
        return TOP + (y1 - v) / (y1 - y0) * plot_h

    parts = [Markup(
        '<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="{label}" data-series="{name}">'
        "<title>{label}</title>"
    ).format(w=WIDTH, h=HEIGHT, name=name,
             label=f"{name}: {len(points)} readings, newest {_fmt(values[-1])}, from {_fmt(low)} to {_fmt(high)}")]
    for v in (high, (high + low) / 2, low) if high != low else (low,):
        parts.append(Markup('<line class="grid" x1="{x1}" x2="{x2}" y1="{y}" y2="{y}"/>'
                            '<text class="ylabel" x="{tx}" y="{ty}">{v}</text>')
                     .format(x1=LEFT, x2=WIDTH - RIGHT, y=f"{y(v):.1f}", tx=LEFT - 6, ty=f"{y(v) + 4:.1f}", v=_fmt(v)))
    parts.append(Markup('<text class="xlabel start" x="{x}" y="{y}">{t}</text>'
                        '<text class="xlabel end" x="{x2}" y="{y}">{t2}</text>')
                 .format(x=LEFT, x2=WIDTH - RIGHT, y=HEIGHT - 6, t=ago(times[0], now), t2=ago(times[-1], now)))
    coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
    if len(points) > 1:
        parts.append(Markup('<polyline class="line" points="{}"/>').format(coords))
    if len(points) <= DOTS_UP_TO:
        for t, v in points:
            parts.append(Markup('<circle class="dot" cx="{x}" cy="{y}" r="3"><title>{v} · {when}</title></circle>')
                         .format(x=f"{x(t):.1f}", y=f"{y(v):.1f}", v=_fmt(v), when=ago(t, now)))
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)
