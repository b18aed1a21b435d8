"""Strict JSON (gatewayd.protocol.strict_json): what it refuses, with the path, and that its
fast path (no walk of the document when the text shows nothing to refuse) answers exactly
as the full walk does."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.protocol import strict_json
from gatewayd.protocol.strict_json import BadJSON, parse_json


@pytest.mark.parametrize("raw, message", [
    (b'{"a": NaN}', "a: NaN is not a JSON number (only finite numbers are)"),
    (b'{"a": [1, -Infinity]}', "a[1]: -Infinity is not a JSON number (only finite numbers are)"),
    (b'{"a": [1, 1e999]}', "a[1]: 1e999 is out of range for a 64-bit float"),
    (b'{"a": 9223372036854775808}', "a: 9223372036854775808 is outside the signed 64-bit range"),
    (b'{"a": {"b": -9223372036854775809}}', "a.b: -9223372036854775809 is outside the signed 64-bit range"),
    (b'{"a": 1' + b"0" * 5000 + b"}", "a: 10000000000000000000...(5001 characters) is outside"),
    (b'{"a": "\\ud800"}', "a: a lone surrogate"),
    (b'{"a": ["x", "\\uDC00y"]}', "a[1]: a lone surrogate"),
    (b"[" * 65 + b"]" * 65, "body: nested deeper than 64 levels"),
    (b'{"a": 1, "a": 2}', None),  # duplicate keys are the HTTP reader's business, not this one's
    (b"\xff{}", "body: not UTF-8 (byte 0xff at offset 0)"),
    (b"{", "body: not JSON"),
])
def test_what_it_refuses_and_where(raw, message):
    if message is None:
        assert parse_json(raw) == {"a": 2}
        return
    with pytest.raises(BadJSON) as refused:
        parse_json(raw)
    assert str(refused.value).startswith(message)


def test_what_it_takes():
    assert parse_json(b'{"x": -9223372036854775808, "y": 9223372036854775807}') == {
        "x": -(2**63), "y": 2**63 - 1}
    assert parse_json('{"s": "\\u00e9\\ud83d\\ude00"}') == {"s": "é😀"}  # a surrogate pair is one character
    assert parse_json(b"[" * 64 + b"]" * 64) is not None  # 64 levels: the deepest allowed
    assert parse_json(b'"[[[["') == "[[[["  # brackets in a string are not nesting
    assert parse_json(b"12", name="payload") == 12


def test_the_name_says_what_was_parsed():
    with pytest.raises(BadJSON, match=r"^payload: NaN"):
        parse_json(b"NaN", name="payload")
    with pytest.raises(BadJSON, match=r"^payload\[0\]: NaN"):
        parse_json(b"[NaN]", name="payload")


def _full_walk(raw: str) -> object:
    """What parse_json answered before its fast path: parse, then always walk."""
    strict_json._local.refused = False
    doc = strict_json._decoder().decode(raw)
    strict_json._check(doc, strict_json.MAX_JSON_DEPTH)
    return doc


class _Raw(str):
    """JSON text put into a document as it is (a generated str is rendered with json.dumps)."""


_scalars = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**70), max_value=2**70), st.text(max_size=8),
    st.sampled_from(["NaN", "Infinity", "1e999", '"\\ud800"', '"\\udfff x"', '"\\ud83d\\ude00"']).map(_Raw),
)


def _render(value: object) -> str:
    if isinstance(value, _Raw):
        return value  # raw JSON text
    if isinstance(value, list):
        return "[" + ",".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_render(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


_documents = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=4), inner, max_size=4), max_leaves=40)


@settings(max_examples=400, deadline=None)
@given(_documents, st.integers(min_value=0, max_value=70), st.booleans())
def test_the_fast_path_answers_as_the_full_walk(value, depth, as_bytes):
    raw = "[" * depth + _render(value) + "]" * depth
    try:
        expected: object = _full_walk(raw)
    except BadJSON as e:
        expected = e
    try:
        got: object = parse_json(raw.encode("utf-8", "surrogatepass") if as_bytes else raw)
    except BadJSON as e:
        got = e
    if isinstance(expected, BadJSON):
        assert isinstance(got, BadJSON) and str(got) == str(expected)
    else:
        assert repr(got) == repr(expected)  # the same types too: 1 is not 1.0, -0.0 is not 0


@pytest.mark.parametrize("raw", [
    b'{"seq": 1, "temp_c": 21.5, "hum": 40, "ok": true, "n": null, "s": "\\u00e9"}',
    '{"a": [-0.0, 0, -0, 1E5, 2.5e-324, 1e-400, 1.000000000000000001]}',
    b'{"a": 1, "a": 2.0}', b' \t{"a": "x"}\n', b'"\\u0000"', "[" * 63 + "]" * 63,
])
def test_msgspec_path_gives_what_the_json_module_gives(raw):
    # The msgspec path (most payloads) against the json module's parse, type for type.
    fast = strict_json._fast(raw, strict_json.MAX_JSON_DEPTH)
    assert fast is not strict_json._SLOW
    assert repr(fast) == repr(_full_walk(raw.decode() if isinstance(raw, bytes) else raw))


@pytest.mark.parametrize("raw, message", [
    (b'{"a": 12345678901234567890}', "a: 12345678901234567890 is outside the signed 64-bit range"),
    (b'{"a": 1e400}', "a: 1e400 is out of range for a 64-bit float"),
    (b'"\xed\xa0\x80"', "body: not UTF-8"),  # a surrogate's UTF-8 (CESU) bytes
])
def test_what_msgspec_passes_on_is_refused_by_name(raw, message):
    with pytest.raises(BadJSON) as refused:
        parse_json(raw)
    assert str(refused.value).startswith(message)
