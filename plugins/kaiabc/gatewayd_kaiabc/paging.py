"""The spec's cursor pagination ("Pagination"): `limit`, `cursor`, `sort` (`field:asc|desc`)
in; `has_next`, `has_prev`, `next_cursor`, `prev_cursor`, `total_count`, `limit` out.

A cursor is opaque to the caller (URL-safe base64 of a small JSON document) and holds a key
of the list's order, not an offset: items added or removed elsewhere in the list do not make
a page repeat or skip one. It also holds the sort it was made for (another sort refuses it)
and a side: the items strictly after the key (`next_cursor`), strictly before it
(`prev_cursor`), or up to and including it (the way back from an empty page past the end).
Walking forward then back gives the same pages."""

from __future__ import annotations

import base64
import binascii
import bisect
import json
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Sequence, TypeVar

from msgspec import Meta

from .errors import invalid

# The query parameters, as a route's query struct declares them (and so the OpenAPI document).
CursorParam = Annotated[str, Meta(max_length=400, pattern=r"^[A-Za-z0-9_-]+$",
                             description="a page's next_cursor or prev_cursor, as given")] | None
SortParam = Annotated[str, Meta(max_length=64, pattern=r"^[a-z_]+(:(asc|desc))?$",
                           description="field:asc or field:desc (e.g. timestamp:desc)")] | None
Side = Literal["after", "before", "through"]
T = TypeVar("T")


@dataclass(frozen=True)
class Sort:
    """A list's order: one of the fields a route offers, ascending or descending."""

    field: str
    descending: bool

    def __str__(self) -> str:
        return f"{self.field}:{'desc' if self.descending else 'asc'}"


@dataclass(frozen=True)
class Cursor:
    """Where a page starts: the items on `side` of `key`, in the order `sort`."""

    key: Any
    side: Side
    sort: str


def parse_sort(text: str | None, fields: Sequence[str], default: str) -> Sort:
    """`field[:asc|:desc]` (ascending when no direction is given), `field` one of `fields`;
    else 400 INVALID_PARAMETER naming `sort`."""
    field, _, direction = (text if text is not None else default).partition(":")
    if field not in fields:
        raise invalid("sort", f"cannot sort by {field!r}; sort by one of {list(fields)}, as field:asc or "
                      "field:desc", text, allowed=[f"{f}:{d}" for f in fields for d in ("asc", "desc")])
    if direction not in ("", "asc", "desc"):
        raise invalid("sort", f"the direction of {field!r} is asc or desc, not {direction!r}", text)
    return Sort(field, direction == "desc")


def encode(key: Any, side: Side, sort: Sort) -> str:
    doc = json.dumps({"k": key, "s": side, "o": str(sort)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(doc.encode()).decode().rstrip("=")


def decode(text: str | None, sort: Sort) -> Cursor | None:
    """The cursor a page of this route gave, for the same sort; else 400 naming `cursor`."""
    if text is None:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError):
        raise invalid("cursor", "not a cursor this route gave", text) from None
    if not isinstance(doc, dict) or doc.get("s") not in ("after", "before", "through") or "k" not in doc:
        raise invalid("cursor", "not a cursor this route gave", text)
    if doc.get("o") != str(sort):
        raise invalid("cursor", f"this cursor was given for sort={doc.get('o')}, not sort={sort}: keep the sort "
                      "while paging, or start again without a cursor", text)
    return Cursor(doc["k"], doc["s"], str(sort))


def pagination(keys: Sequence[Any], start: int, total: int, limit: int, sort: Sort,
               cursor: Cursor | None = None) -> dict[str, Any]:
    """The spec's `pagination` object of a page starting at position `start` of `total` (in the
    sort's order); `keys` are the page's keys, first to last; `cursor` the one it was asked with.
    An empty page past the end points back to the last page."""
    count = len(keys)
    has_prev, has_next = start > 0, start + count < total
    prev_cursor = None
    if has_prev and count:
        prev_cursor = encode(keys[0], "before", sort)
    elif has_prev and cursor is not None:
        prev_cursor = encode(cursor.key, "through", sort)
    return {"has_next": has_next, "has_prev": has_prev,
            "next_cursor": encode(keys[-1], "after", sort) if has_next and count else None,
            "prev_cursor": prev_cursor, "total_count": total, "limit": limit}


def page_of(items: Sequence[T], key: Callable[[T], Any], sort: Sort, cursor: Cursor | None,
            limit: int) -> tuple[list[T], dict[str, Any]]:
    """One page of `items` (in memory, any order; keys unique and comparable), and its
    `pagination`."""
    ordered = sorted(items, key=key, reverse=sort.descending)
    keys = [_rank(key(item), sort) for item in ordered]  # ascending whatever the direction
    start = 0
    if cursor is not None:
        k = _rank(_key(cursor.key), sort)
        try:
            if cursor.side == "after":
                start = bisect.bisect_right(keys, k)
            else:
                end = bisect.bisect_left(keys, k) if cursor.side == "before" else bisect.bisect_right(keys, k)
        except TypeError:  # a key of another type: a cursor made up, not given
            raise invalid("cursor", "not a cursor this route gave", encode(cursor.key, cursor.side, sort)) from None
        if cursor.side != "after":
            start = max(end - limit, 0)
            page = ordered[start:end]
            return page, pagination([key(i) for i in page], start, len(ordered), limit, sort, cursor)
    page = ordered[start:start + limit]
    return page, pagination([key(i) for i in page], start, len(ordered), limit, sort, cursor)


def _key(value: Any) -> Any:
    """A key as JSON gave it back: lists (tuples in the list's key) to tuples."""
    return tuple(_key(v) for v in value) if isinstance(value, list) else value


class _Desc:
    """A key in reverse order, so one ascending bisect serves both directions."""

    __slots__ = ("v",)

    def __init__(self, v: Any) -> None:
        self.v = v

    def __lt__(self, other: _Desc) -> bool:
        return bool(other.v < self.v)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and bool(self.v == other.v)


def _rank(value: Any, sort: Sort) -> Any:
    return _Desc(value) if sort.descending else value
