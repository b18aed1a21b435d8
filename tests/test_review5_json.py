"""Review of the msgspec fast path of strict JSON (commit 64ba250), differentially.

What parse_json answered before msgspec came in is the same function with `_fast` saying
`_SLOW` for every document (the rest of parse_json did not change): each input here is
parsed both ways, as bytes and as str, and the two must give the same document (the
same types, float signs, key order) or the same BadJSON message."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.protocol import strict_json
from gatewayd.protocol.strict_json import BadJSON, parse_json


def _outcome(raw: bytes | str, *, slow: bool) -> tuple[str, object]:
    fast = strict_json._fast
    if slow:
        strict_json._fast = lambda raw, max_depth: strict_json._SLOW
    try:
        return "ok", _shape(parse_json(raw))
    except BadJSON as e:
        return "bad", str(e)
    finally:
        strict_json._fast = fast


def _shape(value: object) -> object:
    """The document with its types made visible (1 and 1.0 and True differ, -0.0 and 0.0 too)."""
    if isinstance(value, dict):
        return ("dict", [(k, _shape(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [_shape(v) for v in value])
    if isinstance(value, float):
        return ("float", value.hex() if math.isfinite(value) else repr(value))
    return (type(value).__name__, value)


def _same(raw: bytes | str) -> None:
    assert _outcome(raw, slow=False) == _outcome(raw, slow=True), raw


EDGES = [
    b'{"a":1,"a":2}', b'{"a":{"b":1},"a":[2],"b":0,"a":3}',
    b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808", b"-9223372036854775809",
    b"18446744073709551615", b"18446744073709551616", b"-0", b"-0.0", b"0e10000", b"-0.0e-999",
    b"1e308", b"1e309", b"1E400", b"-1E400", b"5e-324", b"2e-324", b"1e-400", b"2.2250738585072011e-308",
    b"1.7976931348623157e308", b"1.7976931348623158e308", b"1.7976931348623159e308",
    b"123456789012345678", b"1234567890123456789", b"12345678901234567890e-5", b"0.1234567890123456789",
    b'"1234567890123456789012"', b'{"id":"12345678901234567890123","v":1}',
    b'"\\ud800"', b'"\\uDBFF\\uDFFF"', b'"\\udc00\\ud800"', b'"\\ud83d\\u0041"', b'{"\\udfff":1}',
    b'"\xed\xa0\x80"', b'"\xc0\x80"', b'"\xf4\x90\x80\x80"', b'"\xef\xbf\xbf"', b'"\xff"',
    b"\xef\xbb\xbf{}", b"\xef\xbb\xbf", b'"\x00"', b"\x00", b"{}\x00", b'"\\u0000"', b'"\x7f"', b'"\x1f"',
    b"\x0c1", b"\x0b1", b"\xc2\xa01", b"\t\r\n 1 \t\r\n", b"", b" ", b"1", b'"x"', b"null", b"true", b"false",
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"01", b"-01", b"1.", b".5", b"+1", b"1e", b"1e+",
    b"[1,]", b'{"a":1,}', b"[1] [2]", b"'a'", b'"\\x"', b'"\\U0041"', b'"\\u00e9"', b'"\\/"',
    b"[" * 63 + b"]" * 63, b"[" * 64 + b"]" * 64, b"[" * 65 + b"]" * 65, b'{"a":' * 64 + b"1" + b"}" * 64,
    b"[" * 200 + b"]" * 200, b'"' + b"x" * 1_000_000 + b'"', b"[" + b"1," * 100_000 + b"1]",
    b"TRUE", b"True", b"nulll", b"[1 2]", b'{"a" 1}', b'{1:2}',
]


@pytest.mark.parametrize("raw", EDGES, ids=range(len(EDGES)))
def test_edges_answer_as_before(raw):
    _same(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    _same(text)


# -- the fuzzer: JSON-ish text from a grammar, then bytes changed here and there ------------

_numbers = st.one_of(
    st.integers(min_value=-(2**66), max_value=2**66).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.from_regex(r"\A-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,22})?([eE][+-]?[0-9]{1,4})?\Z"),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "-0", "1E400", "5e-324", "1e309", "2e-400"]),
)
_escapes = st.sampled_from(["\\ud800", "\\udfff", "\\uD83D\\uDE00", "\\ud83d", "\\u0000", "\\n", "\\/",
                            "\\\\", '\\"', "\\u00e9", "\\uffff", "\\ude00\\ud83d", "\\u12", "\\q"])
_strings = st.lists(st.one_of(st.text(max_size=6), _escapes, st.from_regex(r"\A[0-9]{17,22}\Z")),
                    max_size=4).map(lambda parts: '"' + "".join(p.replace('"', "") for p in parts) + '"')
_ws = st.sampled_from(["", " ", "\t", "\n", "\r", "\x0c", "\x0b", "\u00a0", "\ufeff", "\x00"])
_json = st.recursive(
    st.one_of(_numbers, _strings, st.sampled_from(["true", "false", "null"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(_strings, inner), max_size=4).map(
            lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}"),
    ),
    max_leaves=12,
)


@st.composite
def _documents(draw) -> bytes:
    text = draw(_ws) + draw(_json) + draw(_ws)
    raw = bytearray(text.encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.integers(0, 2))):  # a few bytes changed: invalid UTF-8, stray bytes
        if raw:
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.sampled_from([0x00, 0x1F, 0x22, 0x5C, 0x5B, 0x7B, 0x30, 0x80, 0xC0, 0xED, 0xFF]))
    return bytes(raw)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(_documents())
def test_fuzzed_documents_answer_as_before(raw):
    _same(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    _same(text)
    _same(bytearray(raw))


# -- json_encoder (commit 7375306): json.dumps's text, or its error, for every option set -----

_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
              st.text(max_size=6), st.sampled_from(["\ud800", "é", "日本", "\x00", "\u2028"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-3, 3), st.booleans(), st.none(),
                                  st.floats(allow_nan=False)), inner, max_size=4)),
    max_leaves=10,
)
_options = st.fixed_dictionaries({
    "separators": st.sampled_from([(", ", ": "), (",", ":")]), "ensure_ascii": st.booleans(),
    "allow_nan": st.booleans(), "sort_keys": st.booleans(),
})


def _dumps(fn, value):
    try:
        return "ok", fn(value)
    except (TypeError, ValueError) as e:
        return "error", type(e).__name__


@settings(max_examples=400, deadline=None)
@given(_values, _options)
def test_json_encoder_is_json_dumps(value, options):
    from gatewayd.protocol.json_encoders import json_encoder

    encode = json_encoder(**options)
    want = _dumps(lambda v: json.dumps(v, **options), value)
    assert _dumps(encode, value) == want
    assert _dumps(encode, value) == want  # and again: nothing left behind by the first (markers)


def test_json_encoder_after_a_circular_document_and_with_a_default():
    from gatewayd.protocol.json_encoders import json_encoder

    loop: list = []
    loop.append(loop)
    encode = json_encoder(separators=(",", ":"), allow_nan=False)
    with pytest.raises(ValueError, match="Circular reference"):
        encode({"a": loop})
    shared = [1]
    assert encode([shared, shared, {"x": shared}]) == "[[1],[1],{\"x\":[1]}]"  # a value twice is no loop
    with pytest.raises(ValueError):
        encode([float("nan")])
    assert encode({"a": [1.5, -0.0, 1e300]}) == json.dumps({"a": [1.5, -0.0, 1e300]}, separators=(",", ":"))
    as_text = json_encoder(default=str)
    assert as_text({"when": b"x"}) == json.dumps({"when": b"x"}, default=str)


# -- a defect found on the way, older than the msgspec path (both paths answered alike): a str
# holding a raw lone surrogate (argv under surrogateescape: `gatewayd devices --metadata`) was taken


@pytest.mark.parametrize("text, where", [('"\udcff"', "body"), ('{"a": ["x\ud800"]}', r"a\[0\]"),
                                         ('{"\udcff": 1}', "body")])
def test_a_str_with_a_raw_lone_surrogate_is_refused_with_its_place(text, where):
    with pytest.raises(BadJSON, match=rf"^{where}: a (key with a )?lone surrogate"):
        parse_json(text)
