"""JSON carried with its text: a document encoded once, then stored and sent as that text. Pure.

A reading is encoded when it is checked (its size), again for its outbox record and again
inside each live event, three times the same text on the busiest thread. An `Encoded`
holds the value and that text; `ctx.ingest` stores the text as it is and the live hub
writes it into the event, instead of encoding the value again. `encoded_object` makes an
object around such parts (a live message around a reading) without encoding them again.

The text is compact (`separators=(",", ":")`), non-ASCII as is (`ensure_ascii=False`),
NaN and Infinity refused: `json.dumps(value, separators=(",", ":"), ensure_ascii=False,
allow_nan=False)`, the outbox's own encoding. Make them with these functions only: an
`Encoded` is trusted, its text not checked again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any, NamedTuple

from .json_encoders import json_encoder

__all__ = ["Encoded", "encoded", "encoded_object"]


class Encoded(NamedTuple):
    """A JSON value and its compact text (see the module docstring): what is stored and
    sent is the text. Make it with `encoded` or `encoded_object`."""

    value: Any
    text: str


def _encode(value: Any) -> str:
    return json_encoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)(value)


def encoded(value: Any) -> Encoded:
    """`value` with its text; TypeError or ValueError as `json.dumps` (not JSON, NaN)."""
    return Encoded(value, _encode(value))


def encoded_object(fields: Mapping[str, Any]) -> Encoded:
    """The object of `fields`, whose values may be `Encoded` (their text is taken as it is):
    the same text as `encoded` of the object of their values, which is the `value`."""
    value: dict[str, Any] = {}
    parts: list[str] = []
    for key, item in fields.items():
        head = _heads.get(key) if type(key) is str else None
        if head is None:
            if type(key) is not str:  # json.dumps turns other keys into strings: its text, not ours
                return encoded({k: v.value if type(v) is Encoded else v for k, v in fields.items()})
            if len(_heads) >= 1000:  # bounded: the keys are a message shape's few
                _heads.clear()
            head = _heads[key] = f"{encode_basestring(key)}:"
        kind = type(item)
        if kind is Encoded:
            value[key], text = item.value, item.text
        else:
            value[key] = item
            if kind is str:
                text = encode_basestring(item)
            elif kind is int:
                text = int.__repr__(item)
            elif kind is float and math.isfinite(item):
                text = float.__repr__(item)  # what the encoder writes for a float
            else:  # containers, True/False/None, subclasses, NaN (the encoder refuses it)
                text = _encode(item)
        parts.append(head + text)
    return Encoded(value, "{" + ",".join(parts) + "}")


_heads: dict[str, str] = {}
"""Each key's `"key":`, encoded once."""
