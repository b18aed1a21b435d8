"""JSON encoders kept per thread: what `json.dumps` returns, without its per-call set-up.

`json.dumps` with any option (`separators`, `allow_nan`, ...) builds a JSONEncoder and
its C encoder on every call, which costs more than encoding a small document. An
encoder made here once per thread and per set of options gives the same text. Per
thread because the C encoder's circular-reference markers are per-call state.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from json.encoder import (  # type: ignore[attr-defined]
    c_make_encoder,
    encode_basestring,
    encode_basestring_ascii,
)
from typing import Any

__all__ = ["json_encoder"]

_per_thread = threading.local()


def json_encoder(
    *,
    separators: tuple[str, str] = (", ", ": "),
    ensure_ascii: bool = True,
    allow_nan: bool = True,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> Callable[[Any], str]:
    """This thread's encoder for these options: `encode(obj)` is
    `json.dumps(obj, separators=..., ensure_ascii=..., allow_nan=..., sort_keys=..., default=...)`,
    raising TypeError or ValueError as it does. The options are json.dumps's, with its defaults.
    They are the key of the encoders kept: pass one `default` function, not a new one per call."""
    encoders: dict[tuple[Any, ...], Callable[[Any], str]] | None = getattr(_per_thread, "encoders", None)
    if encoders is None:
        encoders = _per_thread.encoders = {}
    key = (separators, ensure_ascii, allow_nan, sort_keys, default)
    encode = encoders.get(key)
    if encode is None:
        encode = encoders[key] = _make(separators, ensure_ascii, allow_nan, sort_keys, default)
    return encode


def _make(separators: tuple[str, str], ensure_ascii: bool, allow_nan: bool, sort_keys: bool,
          default: Callable[[Any], Any] | None) -> Callable[[Any], str]:
    plain = json.JSONEncoder(separators=separators, ensure_ascii=ensure_ascii, allow_nan=allow_nan,
                             sort_keys=sort_keys, default=default)
    if c_make_encoder is None:  # a Python without the C accelerator
        return plain.encode
    item_separator, key_separator = separators
    markers: dict[int, Any] = {}
    make = c_make_encoder(markers, plain.default, encode_basestring_ascii if ensure_ascii else encode_basestring,
                          None, key_separator, item_separator, sort_keys, False, allow_nan)

    def encode(obj: Any) -> str:
        try:
            return "".join(make(obj, 0))
        finally:
            markers.clear()  # an error leaves entries behind

    return encode
