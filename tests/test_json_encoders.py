"""gatewayd.protocol.json_encoders: the per-thread encoders write what json.dumps writes."""

from __future__ import annotations

import datetime
import itertools
import json
import math
import threading
import uuid

import pytest

from gatewayd.protocol.batch import compact_json_encoder
from gatewayd.protocol.json_encoders import json_encoder

DOCS = [{"b": 1, "a": [1.5, -0.0, 1e16, 2**62, None, True, False]}, {"é": "ü\u2028\U0001f600", "x": {"z": {}, "y": []}},
        [], "text", "\u00e9\n\"", 3, 2.5, None, {2: "int key", "1": "str key"}, [[{"deep": [1, {"er": "x"}]}]]]


def _outcome(fn, doc, **options):
    """The text, or the error's type (sorting int and str keys fails both ways)."""
    try:
        return fn(doc, **options)
    except (TypeError, ValueError) as e:
        return type(e)


@pytest.mark.parametrize("separators,ensure_ascii,sort_keys", list(itertools.product(
    [(", ", ": "), (",", ":")], [True, False], [True, False])))
def test_the_same_text_as_json_dumps(separators, ensure_ascii, sort_keys):
    for allow_nan in (True, False):
        encode = json_encoder(separators=separators, ensure_ascii=ensure_ascii, allow_nan=allow_nan, sort_keys=sort_keys)
        for doc in DOCS:
            assert _outcome(encode, doc) == _outcome(json.dumps, doc, separators=separators, ensure_ascii=ensure_ascii,
                                                     allow_nan=allow_nan, sort_keys=sort_keys), doc
    assert json_encoder(separators=separators, ensure_ascii=ensure_ascii, sort_keys=sort_keys)(math.inf) == "Infinity"


def test_errors_like_json_dumps_and_nothing_left_behind():
    encode = json_encoder(separators=(",", ":"), allow_nan=False)
    with pytest.raises(ValueError):
        encode({"x": [math.nan]})
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):
        encode(loop)
    with pytest.raises(TypeError):
        encode({"when": datetime.date(2026, 1, 1)})
    shared = [1]
    assert encode([shared, shared, {"again": shared}]) == "[[1],[1],{\"again\":[1]}]"  # markers cleared after each


def test_default_and_one_encoder_per_thread_and_options():
    def default(o):
        return str(o)

    doc = {"when": datetime.datetime(2026, 2, 12, 16, 0), "id": uuid.UUID(int=7)}
    assert json_encoder(default=default)(doc) == json.dumps(doc, default=default)
    assert json_encoder(sort_keys=True) is json_encoder(sort_keys=True)
    assert json_encoder(sort_keys=True) is not json_encoder(sort_keys=False)
    other = []
    thread = threading.Thread(target=lambda: other.append(json_encoder(sort_keys=True)))
    thread.start()
    thread.join()
    assert other[0] is not json_encoder(sort_keys=True) and other[0]({"b": 1, "a": 2}) == '{"a": 2, "b": 1}'


def test_the_protocols_compact_encoder():
    for doc in DOCS:
        assert compact_json_encoder()(doc) == json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    with pytest.raises(ValueError):
        compact_json_encoder()(math.inf)
