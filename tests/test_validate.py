"""protocol.validate: declared types refuse what does not fit, naming the field and saying what
was wrong, in BadJSON's words; query strings are read per field type, strictly."""

from typing import Annotated, Any, Literal

import pytest
from msgspec import Meta, Struct

from gatewayd.protocol.strict_json import BadJSON
from gatewayd.protocol.validate import InvalidInput, PathParser, QueryParser, convert


class Inner(Struct):
    x: int


class Doc(Struct, forbid_unknown_fields=True):
    family: Annotated[str, Meta(min_length=1, max_length=4)] = "a"
    id: Annotated[str, Meta(pattern="^[a-z]+$", description="lower-case letters")] | None = None
    value: Annotated[float, Meta(ge=0, le=1000)] = 0.0
    items: list[Annotated[int, Meta(ge=0)]] = []
    kind: Literal["a", "b"] = "a"
    inner: Inner | None = None
    secret: Annotated[str, Meta(min_length=16)] | None = None
    extra: dict[str, Any] = {}


@pytest.mark.parametrize("doc,message", [
    ({"value": "high"}, "value: expected a number, got a string"),
    ({"value": 5000}, "value: expected a number 0-1000, got 5000"),
    ({"value": True}, "value: expected a number, got true"),
    ({"id": 5}, "id: expected a string or null, got 5"),
    ({"id": "A B"}, "id: expected a string of lower-case letters"),
    ({"family": "abcdefgh"}, "family: expected a string of length <= 4, got 8 characters"),
    ({"items": [1, -1]}, "items[1]: expected an integer >= 0, got -1"),
    ({"kind": "c"}, "kind: expected one of a, b, got 'c'"),
    ({"inner": {}}, "inner.x: required"),
    ({"inner": {"x": "1"}}, "inner.x: expected an integer, got a string"),
    ({"grace": 1}, "grace: unknown field (expected family, id, value, items, kind, inner, secret, extra)"),
    ([1], "body: expected a JSON object, got an array"),
])
def test_a_refusal_names_the_field_and_what_was_wrong(doc, message):
    with pytest.raises(InvalidInput) as e:
        convert(doc, Doc)
    assert str(e.value) == message
    assert isinstance(e.value, BadJSON) and e.value.location == "body"
    assert message == f"{e.value.field}: {e.value.reason}"


def test_a_string_that_does_not_fit_is_not_repeated_back():
    """It may be a secret (a key of the wrong length): its length is shown, not its text."""
    with pytest.raises(InvalidInput) as e:
        convert({"secret": "hunter2"}, Doc)
    assert "hunter2" not in str(e.value) and str(e.value) == "secret: expected a string of length >= 16, got 7 " \
                                                              "characters"


def test_what_fits_converts():
    doc = convert({"value": 3, "items": [1], "inner": {"x": 2}, "extra": {"a": [1]}}, Doc)
    assert (doc.value, doc.items, doc.inner, doc.extra) == (3.0, [1], Inner(2), {"a": [1]})
    assert convert({"x": 1}, Inner, location="payload") == Inner(1)
    with pytest.raises(InvalidInput) as e:
        convert("x", Inner, location="payload")
    assert str(e.value) == "payload: expected a JSON object, got a string" and e.value.location == "payload"


class Query(Struct):
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    since: float | None = None
    flag: bool = False
    name: str = ""


@pytest.mark.parametrize("args,message", [
    ({"limit": "1e3"}, "limit: expected an integer 1-1000, got '1e3'"),
    ({"limit": "²"}, "limit: expected an integer 1-1000, got '²'"),
    ({"limit": " 5"}, "limit: expected an integer 1-1000, got ' 5'"),
    ({"limit": "9" * 5000}, "limit: expected an integer 1-1000, got '99999999999999999999"),
    ({"limit": "0"}, "limit: expected an integer 1-1000, got 0"),
    ({"since": "nan"}, "since: expected a finite number, got 'nan'"),
    ({"since": "1e999"}, "since: expected a finite number, got '1e999'"),
    ({"flag": "yes"}, "flag: expected true or false, got 'yes'"),
])
def test_query_values_are_read_as_their_fields_type(args, message):
    with pytest.raises(InvalidInput) as e:
        QueryParser(Query)(args)
    assert str(e.value).startswith(message) and e.value.location == "query"


def test_a_query_that_fits_and_keys_not_declared():
    assert QueryParser(Query)({"limit": "5", "since": "-1.5", "flag": "true", "name": "x", "_": "1"}) == \
        Query(5, -1.5, True, "x")
    assert QueryParser(Query)({}) == Query()


class Required(Struct, forbid_unknown_fields=True):
    since: float


class Listed(Struct):
    tags: list[str] = []


def test_an_empty_query_is_a_fresh_struct_of_defaults_or_refused_as_before():
    parse = QueryParser(Query)
    first, second = parse({}), parse({})
    assert first == second == Query() and first is not second
    first.limit = 7
    assert parse({}) == Query()
    with pytest.raises(InvalidInput) as e:
        QueryParser(Required)({})
    assert str(e.value) == "since: required" and e.value.location == "query"
    listed = QueryParser(Listed)
    listed({}).tags.append("x")  # a mutable default is not shared between requests
    assert listed({}) == Listed()


def test_a_query_key_missing_from_a_werkzeug_multidict():
    from werkzeug.datastructures import ImmutableMultiDict
    assert QueryParser(Query)(ImmutableMultiDict([("flag", "1")])) == Query(flag=True)
    assert QueryParser(Query)(ImmutableMultiDict()) == Query()


DeviceId = Annotated[str, Meta(pattern=r"^[a-z0-9-]{1,16}$")]


def test_a_path_parameter_that_passed_is_remembered_and_one_that_failed_is_refused_each_time():
    parse = PathParser(DeviceId, size=2)
    assert parse("light-1") == "light-1" and parse("light-1") == "light-1"
    for _ in range(2):
        with pytest.raises(InvalidInput) as e:
            parse("Bad!")
        assert e.value.location == "path" and str(e.value) == str(_refusal("Bad!"))
    parse("light-2")
    parse("light-3")  # the oldest is forgotten: at most `size` kept
    assert list(parse._passed) == ["light-2", "light-3"]
    assert PathParser(Annotated[int, Meta(ge=1)])(5) == 5  # a converter's int: converted, not kept
    with pytest.raises(InvalidInput):
        PathParser(Annotated[int, Meta(ge=1)])(0)


def _refusal(value):
    try:
        convert(value, DeviceId, location="path")
    except InvalidInput as e:
        return e
    raise AssertionError("no refusal")


class Counts(Struct):
    uptime_seconds: Annotated[int, Meta(ge=0, le=2**40)] | None = None
    value: float = 0.0
    items: list[Annotated[int, Meta(ge=0)]] = []
    inner: Inner | None = None
    extra: dict[str, Any] = {}


def test_an_integer_written_with_a_fraction_of_zero_is_an_integer():
    """JSON Schema's `integer` (what the OpenAPI documents declare) is any number with no
    fractional part: 864000.0 is accepted where an integer is declared, and a float field
    or a free-form one keeps its float."""
    doc = convert({"uptime_seconds": 864000.0, "value": 2.0, "items": [1.0, 2], "inner": {"x": -3.0},
                   "extra": {"t": 20.0}}, Counts)
    assert doc == Counts(864000, 2.0, [1, 2], Inner(-3), {"t": 20.0})
    assert type(doc.uptime_seconds) is int and type(doc.items[0]) is int and type(doc.extra["t"]) is float


@pytest.mark.parametrize("doc,message", [
    ({"uptime_seconds": 1.5}, "uptime_seconds: expected an integer or null, got 1.5"),
    ({"items": [1.0, 2.5]}, "items[1]: expected an integer, got 2.5"),
    ({"inner": {"x": 0.1}}, "inner.x: expected an integer, got 0.1"),
    ({"uptime_seconds": 2.0 ** 41}, "uptime_seconds: expected an integer 0-1099511627776, got 2199023255552"),
    ({"uptime_seconds": 2.0 ** 60}, "uptime_seconds: expected an integer or null, got 1.152921504606847e+18"),
    ({"uptime_seconds": -1.0}, "uptime_seconds: expected an integer 0-1099511627776, got -1"),
])
def test_a_fraction_where_an_integer_is_declared_says_expected_an_integer(doc, message):
    with pytest.raises(InvalidInput) as e:
        convert(doc, Counts)
    assert str(e.value) == message and "multiple" not in message
