"""Opaque page cursors for list APIs ("newest first, then the next page"). Pure.

A cursor is the position the next page starts after: a few numbers (a row id, a
timestamp), as base64url of a JSON array. Whatever comes back from a client is
checked strictly: anything not made by `encode_cursor` is a ValueError with one
message, never a database error (an id past SQLite's range, a NaN, deep nesting).
"""

from __future__ import annotations

import base64
import binascii
import math

from .strict_json import INT_MAX, INT_MIN, BadJSON, parse_json

__all__ = ["decode_cursor", "encode_cursor"]

_NOT_OURS = "cursor: not a cursor returned by this API"


def encode_cursor(*position: int | float) -> str:
    """The cursor for a page that continues after `position` (ints and finite floats)."""
    text = "[" + ",".join(repr(p) if isinstance(p, float) else str(int(p)) for p in position) + "]"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, shape: tuple[type, ...]) -> tuple[int | float, ...]:
    """The position in `cursor`, one value per type in `shape` (`int`: a signed 64-bit
    integer; `float`: a finite number). ValueError for anything else."""
    try:
        doc = parse_json(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)), max_depth=2)
    except (binascii.Error, ValueError, BadJSON):
        raise ValueError(_NOT_OURS) from None
    if not isinstance(doc, list) or len(doc) != len(shape):
        raise ValueError(_NOT_OURS)
    out: list[int | float] = []
    for value, kind in zip(doc, shape):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(_NOT_OURS)
        if kind is int:
            if not isinstance(value, int) or not INT_MIN <= value <= INT_MAX:
                raise ValueError(_NOT_OURS)
            out.append(value)
        else:
            if not math.isfinite(value):
                raise ValueError(_NOT_OURS)
            out.append(float(value))
    return tuple(out)
