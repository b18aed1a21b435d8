"""Times, durations and sizes as a technician reads them: "5 min ago", "2 h 10 min", "1.2 MB"."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["ago", "duration", "iso", "size"]


def duration(seconds: float) -> str:
    """A non-negative duration, to the two largest units that matter."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min" + (f" {s % 60} s" if s < 600 and s % 60 else "")
    if s < 86400:
        return f"{s // 3600} h" + (f" {s % 3600 // 60} min" if s % 3600 // 60 else "")
    return f"{s // 86400} d" + (f" {s % 86400 // 3600} h" if s % 86400 // 3600 else "")


def ago(ts: float | None, now: float) -> str:
    """`ts` (epoch seconds) from `now`'s point of view: "never", "just now", "3 min ago", "in 2 s"."""
    if ts is None:
        return "never"
    delta = now - ts
    if abs(delta) < 1:
        return "just now"
    return f"{duration(delta)} ago" if delta > 0 else f"in {duration(-delta)}"


def iso(ts: float | None) -> str:
    """UTC, to the second: the title of every "ago", for whoever needs the exact time."""
    if ts is None:
        return ""
    try:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(ts)


def size(n: float) -> str:
    """Bytes: "512 B", "1.2 kB", "3.4 MB" (powers of 1000, like disk makers and df -H)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
