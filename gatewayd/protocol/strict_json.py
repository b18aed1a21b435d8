"""Strict JSON for what devices and operators send: pure, no I/O.

`parse_json` refuses what a lenient parser would let through and something downstream
would then choke on: bytes that are not UTF-8, nesting deep enough to exhaust the
stack, NaN/Infinity and numbers beyond a double (they would come back out as
non-standard JSON), integers outside SQLite's signed 64-bit range, lone surrogates.
`BadJSON` names what was wrong and where (`metadata.a[1]: NaN is not a JSON number`).
The HTTP layer answers it with a 400; MQTT handlers turn it into `Rejected`.

Most documents are parsed by msgspec (in C, UTF-8 checked, NaN and Infinity refused);
one it refuses, or whose text might hold what only this module refuses, is parsed
again by the json module with hooks and walked, so every refusal names its place.
"""

from __future__ import annotations

import json
import math
import re
import threading
from typing import Any

import msgspec

__all__ = ["BadJSON", "INT_MAX", "INT_MIN", "MAX_JSON_DEPTH", "field_path", "parse_json", "json_kind"]

# No admin or device document nests anywhere near this; json's C parser recurses (a
# RecursionError near 1,000 levels), and everything downstream that walks a document
# recurses too, so the limit sits far below either.
MAX_JSON_DEPTH = 64
# SQLite stores integers as signed 64-bit; a larger one raises OverflowError on insert.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # UTF-8 cannot encode them: SQLite refuses the string
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The one way to a lone surrogate in a parsed document: a \ud800-\udfff escape.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# 19 digits in a row: perhaps an integer beyond SQLite's range (msgspec keeps it as a
# Python int); such a document takes the careful path, which refuses it by name.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_LONG_DIGITS_STR = re.compile(r"[0-9]{19}")
_fast_decode = msgspec.json.Decoder().decode


_local = threading.local()


class BadJSON(ValueError):
    """A request body (or a field of it) the route refuses; the message names the field
    and what was wrong. Core routes answer 400 in the core shape; plugins catch it (or
    register an error handler on their Blueprint) to answer in their own."""


class _Refused:
    """What `NaN`, `Infinity`, `-Infinity`, a float beyond a double and an integer too
    long for SQLite parse to: kept as text so the walk can say what was where. (A huge
    integer is never converted: that costs quadratic time, and Python refuses more than
    4,300 digits.)"""

    def __init__(self, text: str, why: str):
        self.text, self.why = text, why
        _local.refused = True  # the document needs the walk, to say where this is


def _parse_constant(text: str) -> _Refused:
    return _Refused(text, "is not a JSON number (only finite numbers are)")


def _parse_int(text: str) -> Any:
    if len(text) <= 18:  # within the signed 64-bit range whatever the digits
        return int(text)
    if len(text) <= 20:  # 19 digits and a sign
        value = int(text)
        if INT_MIN <= value <= INT_MAX:
            return value
    return _Refused(text, f"is outside the signed 64-bit range {INT_MIN}..{INT_MAX}")


def _parse_float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _Refused(text, "is out of range for a 64-bit float")


def field_path(parts: tuple[Any, ...]) -> str:
    """`metadata.a[3]["odd key"]`: where a value sits in a document (`body` is the top)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _NAME.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part[:40] + ('...' if len(part) > 40 else ''))}]"
    return out if out[:1].isalpha() or out[:1] == "_" else f"body{out}"


def _shorten(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _check(doc: Any, max_depth: int) -> None:
    """Walk the parsed document without recursion; BadJSON at the first value a strict
    parser, SQLite or a UTF-8 encoder would refuse, naming its path."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(doc, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                raise BadJSON(f"{field_path(path)}: a lone surrogate (\\ud800-\\udfff) is not a Unicode character")
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if not INT_MIN <= value <= INT_MAX:
                raise BadJSON(f"{field_path(path)}: {value} is outside the signed 64-bit range {INT_MIN}..{INT_MAX}")
        elif isinstance(value, float):
            pass
        elif isinstance(value, _Refused):
            raise BadJSON(f"{field_path(path)}: {_shorten(value.text)} {value.why}")
        else:
            if len(path) >= max_depth:
                raise BadJSON(f"body: nested deeper than {max_depth} levels (at {field_path(path)})")
            if isinstance(value, dict):
                for key, item in value.items():
                    if _LONE_SURROGATE.search(key):
                        raise BadJSON(f"{field_path(path)}: a key with a lone surrogate (\\ud800-\\udfff)")
                    stack.append((item, (*path, key)))
            else:
                stack.extend((item, (*path, i)) for i, item in enumerate(value))


def _depth_within(doc: Any, max_depth: int) -> bool:
    """No container nested `max_depth` deep (containers only, no paths: cheap)."""
    stack: list[tuple[Any, int]] = [(doc, 0)] if isinstance(doc, (dict, list)) else []
    while stack:
        value, depth = stack.pop()
        if depth >= max_depth:
            return False
        items = value.values() if isinstance(value, dict) else value
        stack.extend((item, depth + 1) for item in items if isinstance(item, (dict, list)))
    return True


def parse_json(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH, name: str = "body") -> Any:
    """Parse a request body (or an MQTT payload: `name="payload"`) strictly, or raise
    BadJSON saying what and where.

    Refused: bytes that are not UTF-8; anything that is not JSON; nesting deeper than
    `max_depth`; `NaN`, `Infinity`, `-Infinity` and numbers too large for a double
    (they would come back out as non-standard JSON); integers outside SQLite's signed
    64-bit range; strings with lone surrogates (no UTF-8 for them, so SQLite refuses).
    """
    doc = _fast(raw, max_depth)
    if doc is not _SLOW:
        return doc
    # A str may hold lone surrogates as they are, not escaped (argv's undecodable bytes,
    # under surrogateescape): msgspec refused it (no UTF-8 for them), the walk names them.
    raw_surrogate = isinstance(raw, str) and _LONE_SURROGATE.search(raw) is not None
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadJSON(f"{name}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    _local.refused = False
    try:
        doc = _decoder().decode(raw)
    except RecursionError:
        raise BadJSON(f"{name}: nested deeper than {max_depth} levels") from None
    except ValueError as e:
        raise BadJSON(f"{name}: not JSON ({e})") from None
    if not _local.refused and not raw_surrogate and ("\\u" not in raw or not _SURROGATE_ESCAPE.search(raw)) and (
            raw.count("{") + raw.count("[") < max_depth or _depth_within(doc, max_depth)):
        # Nothing the walk could refuse: most documents. A C-speed scan of the text (and
        # of the containers' depth when there are many) instead of a walk of every value.
        return doc
    try:
        _check(doc, max_depth)
    except BadJSON as e:
        text = str(e)
        raise BadJSON(name + text[4:] if name != "body" and text.startswith("body") else text) from None
    return doc


_SLOW = object()


def _fast(raw: bytes | bytearray | str, max_depth: int) -> Any:
    """The document, parsed by msgspec (strict JSON, UTF-8 checked, in C: a tenth of the
    careful path's cost on a small payload), when nothing in it needs the careful path;
    else `_SLOW`. msgspec refuses NaN, Infinity, floats beyond a double, invalid UTF-8
    and lone surrogates itself; what it lets through and this module refuses (integers
    beyond 64 bits, deep nesting) is screened from the text. Every refusal, and every
    document that might hold one, goes the careful way, which names the fault."""
    if isinstance(raw, str):
        if _LONG_DIGITS_STR.search(raw) is not None:
            return _SLOW
        brackets = raw.count("{") + raw.count("[")
    else:
        if _LONG_DIGITS.search(raw) is not None:
            return _SLOW
        brackets = raw.count(b"{") + raw.count(b"[")
    if brackets >= max_depth:
        return _SLOW
    try:
        return _fast_decode(raw)
    except (ValueError, RecursionError):  # DecodeError; UnicodeEncodeError for a str holding a lone surrogate
        return _SLOW


def _decoder() -> json.JSONDecoder:
    # One per thread (HTTP bodies parse on the trio thread, big ones on workers): building
    # a decoder per call costs about as much as parsing a small payload.
    decoder: json.JSONDecoder | None = getattr(_local, "decoder", None)
    if decoder is None:
        decoder = _local.decoder = json.JSONDecoder(
            parse_constant=_parse_constant, parse_int=_parse_int, parse_float=_parse_float)
    return decoder


_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def json_kind(value: Any) -> str:
    """`an object`, `an array`, `a string`, ... for error messages."""
    return _KINDS.get(type(value), "a number")
