"""Typed input from parsed JSON and query strings, through msgspec: pure, no I/O.

`convert(doc, Type)` turns a document `parse_json` accepted into `Type` (a msgspec
`Struct`, a `list[...]`, an `Annotated[int, Meta(ge=0)]`, ...) or raises `InvalidInput`
naming the field and what was wrong with it, in the words of `BadJSON`
(`value: expected a number <= 1000.0, got 5000`). `QueryParser(Type)` does the same for a
query string, whose values are all text: each is read as its field's type first
(`limit=1e3` is no integer), then converted.

Decided: where an integer is declared, a JSON number with no fractional part is one,
`864000.0` as well as `864000` (JSON Schema's `integer`, which the OpenAPI documents say;
firmware that formats every number as a double sends these). A fraction is refused as
`expected an integer, got 1.5`; beyond 2**53 a float is no exact integer and is refused too.
Query strings stay digits only. Only a refused document pays for this (converted again).

The JSON Schema of the same types (`msgspec.json.schema_components`) is what the OpenAPI
documents show, so what is refused and what is documented cannot drift apart.
"""

from __future__ import annotations

import functools
import math
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi

from .strict_json import BadJSON, json_kind

__all__ = ["InvalidInput", "PathParser", "QueryParser", "convert"]

T = TypeVar("T")


class InvalidInput(BadJSON):
    """Input that parsed as JSON (or as a query string) but is not what the route
    declared. A `BadJSON`, so one handler answers both in the family's shape.

    `location` is `body`, `query`, `path` or `payload`; `field` where in it
    (`metadata.a[1]`, `limit`; `body` for the whole document); `reason` what was wrong.
    `str(e)` is `"<field>: <reason>"`.
    """

    def __init__(self, location: str, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.location, self.field, self.reason = location, field, reason


_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean", "object": "an object",
          "array": "an array", "null": "null", "bytes": "base64 text", "datetime": "an RFC 3339 date-time",
          "uuid": "a UUID", "any": "any value"}
_EXPECTED = re.compile(r"Expected `([^`]+)`(?:, got `([^`]+)`|(.*))$", re.DOTALL)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")


def _kinds(text: str) -> str:
    names = [_KINDS.get(t.strip(), f"`{t.strip()}`") for t in text.split("|")]
    return " or ".join(names)


def _walk(doc: Any, path: str) -> tuple[str, Any, bool]:
    """(`metadata.a[1]`, the value there, whether it was found) for msgspec's `$.metadata.a[1]`.
    msgspec writes a key of a dict as `[...]`: shown so, its value unknown."""
    shown, value, found = "", doc, True
    for m in _PATH_PART.finditer(path[1:]):
        name, index = m.group(1), m.group(2)
        if name is not None:
            shown += f".{name}" if shown else name
            found = found and isinstance(value, dict) and name in value
            value = value[name] if found else None
        elif index is not None:
            shown += f"[{index}]"
            found = found and isinstance(value, list) and int(index) < len(value)
            value = value[int(index)] if found else None
        else:
            shown += "[...]"
            value, found = None, False
    return shown, value, found


def _shown(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


@functools.lru_cache(maxsize=512)
def _schema(tp: Any) -> dict[str, Any]:
    return msgspec.json.schema(tp)  # type: ignore[no-any-return]


def _schema_at(tp: Any, path: str) -> dict[str, Any]:
    """The JSON Schema of what sits at msgspec's `path` in a `tp` (for its description
    and its allowed values); {} when the walk gets lost."""
    try:
        root = _schema(tp)
    except (TypeError, ValueError):
        return {}
    defs = root.get("$defs", {})

    def resolve(schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
        for option in schema.get("anyOf", ()):
            if option.get("type") != "null":
                return resolve(option)
        return schema

    schema = resolve(root)
    for m in _PATH_PART.finditer(path[1:]):
        if m.group(1) is not None:
            schema = resolve(schema.get("properties", {}).get(m.group(1), {}))
        elif m.group(2) is not None:
            schema = resolve(schema.get("items", {}))
        else:
            extra = schema.get("additionalProperties", {})
            schema = resolve(extra if isinstance(extra, dict) else {})
    return schema


def _reason(message: str, value: Any, found: bool, known: Callable[[], list[str]],
            at: Callable[[], dict[str, Any]]) -> tuple[str | None, str]:
    """(a field to name instead of the path, the reason) for one msgspec message."""
    if m := re.fullmatch(r"Object missing required field `(.+)`", message):
        return m.group(1), "required"
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", message):
        names = known()
        return m.group(1)[:40], "unknown field" + (f" (expected {', '.join(names)})" if names else "")
    if m := re.fullmatch(r"Invalid enum value (.+)", message, re.DOTALL):
        allowed = at().get("enum")
        return None, (f"expected one of {', '.join(map(str, allowed))}, got {m.group(1)[:60]}" if allowed
                      else f"{m.group(1)[:60]} is not one of the allowed values")
    if m := _EXPECTED.match(message):
        expected, got, rule = m.group(1), m.group(2), (m.group(3) or "").strip()
        if rule.startswith("matching regex") and (described := at().get("description")):
            rule = f"of {described}"  # what the pattern means, not the pattern
        elif rule[:1] in ("<", ">") and {"minimum", "maximum"} <= at().keys():
            rule = f"{at()['minimum']}-{at()['maximum']}"  # both bounds, not the one crossed
        reason = f"expected {_kinds(expected)}" + (f" {rule}" if rule else "")
        if got is not None:
            # A string that fails a type check is shown as its kind: it may be a secret.
            reason += f", got {_kinds(got)}" if isinstance(value, str) or not found else f", got {_shown(value)}"
        elif found and not isinstance(value, str):  # a range: the number is no secret
            reason += f", got {_shown(value)}"
        elif found and isinstance(value, str) and "length" in rule:
            reason += f", got {len(value)} characters"
        return None, reason
    return None, message[:1].lower() + message[1:]


def _fields_of(tp: Any) -> list[str]:
    try:
        info = mi.type_info(tp)
    except (TypeError, ValueError):
        return []
    return [f.encode_name for f in info.fields] if isinstance(info, mi.StructType) else []


def _invalid(e: msgspec.ValidationError, doc: Any, tp: Any, location: str, top: str) -> InvalidInput:
    message, _, where = str(e).partition(" - at `")
    where = where.rstrip("`") or "$"
    shown, value, found = _walk(doc, where)
    field, reason = _reason(message, value, found, lambda: _fields_of(tp) if where == "$" else [],
                            lambda: _schema_at(tp, where))
    if field is not None:
        shown = f"{shown}.{field}" if shown else field
    return InvalidInput(location, shown or top, reason)


def convert(doc: Any, tp: type[T] | Any, *, location: str = "body") -> T:
    """`doc` (what `parse_json` returned) as `tp`, or InvalidInput naming the field.

    Strict: no string is read as a number, no number as a boolean. A `Struct` body that
    is not an object is refused as `read_json_object` refuses it."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct) and not isinstance(doc, dict):
        raise InvalidInput(location, location, f"expected a JSON object, got {json_kind(doc)}")
    try:
        return msgspec.convert(doc, tp)  # type: ignore[no-any-return]
    except msgspec.ValidationError as e:
        if not str(e).startswith("Expected `int"):
            raise _invalid(e, doc, tp, location, location) from None
    doc = _integral(doc, _info(tp))  # an integer written as 864000.0: read as the integer it is
    try:
        return msgspec.convert(doc, tp)  # type: ignore[no-any-return]
    except msgspec.ValidationError as e:
        raise _invalid(e, doc, tp, location, location) from None


_PATH_PASSED_MAX = 2048  # values of one parameter: a fleet's device ids
_PATH_VALUE_MAX = 256  # longer values are converted each time: memory (a device id is at most 128)
_KEPT_RESULTS = (str, int, float, bool, uuid.UUID)  # immutable: one result may be handed out again


class PathParser:
    """`convert(value, tp, location="path")` for one declared path parameter, the text
    values that passed remembered with what they became (a bounded number, the oldest
    forgotten first): a device asks with its own id on every request, and msgspec works
    out how to convert to an `Annotated` type again on every call (1.8 us a request).
    A value that fails, or is longer than `_PATH_VALUE_MAX` characters, is converted again
    each time (a path is parsed before any auth: 2,048 URLs of 16 KiB would be 32 MB)."""

    def __init__(self, tp: Any, size: int = _PATH_PASSED_MAX) -> None:
        self.type = tp
        self.size = size
        self._passed: dict[str, Any] = {}

    def __call__(self, value: Any) -> Any:
        if type(value) is str:  # only text keys: 1, 1.0 and True are one dict key
            try:
                return self._passed[value]
            except KeyError:
                pass
        result = convert(value, self.type, location="path")
        if type(value) is str and type(result) in _KEPT_RESULTS and len(value) <= _PATH_VALUE_MAX:
            if len(self._passed) >= self.size:
                del self._passed[next(iter(self._passed))]
            self._passed[value] = result
        return result


@functools.lru_cache(maxsize=512)
def _info(tp: Any) -> mi.Type:
    try:
        return mi.type_info(tp)
    except (TypeError, ValueError):
        return mi.AnyType()


_EXACT = 2.0 ** 53


def _integral(doc: Any, t: mi.Type) -> Any:
    """`doc` with each float that has no fractional part, where `t` declares an integer
    and no float, as an int. Everything else is left as it is (a float field stays float)."""
    if isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(doc, float):
        kinds = t.types if isinstance(t, mi.UnionType) else (t,)
        if (any(isinstance(k, mi.IntType) for k in kinds) and not any(isinstance(k, mi.FloatType) for k in kinds)
                and doc.is_integer() and abs(doc) <= _EXACT):
            return int(doc)
        return doc
    if isinstance(t, mi.UnionType):  # the member that can hold an object or an array
        holders = (mi.StructType, mi.DictType) if isinstance(doc, dict) else (
            mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType, mi.TupleType)
        for member in t.types:
            inner = member.type if isinstance(member, mi.Metadata) else member
            if isinstance(inner, holders):
                return _integral(doc, inner)
        return doc
    if isinstance(doc, dict):
        if isinstance(t, mi.StructType):
            fields = {f.encode_name: f.type for f in t.fields}
            return {k: _integral(v, fields[k]) if k in fields else v for k, v in doc.items()}
        if isinstance(t, mi.DictType):
            return {k: _integral(v, t.value_type) for k, v in doc.items()}
    elif isinstance(doc, list):
        if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
            return [_integral(v, t.item_type) for v in doc]
        if isinstance(t, mi.TupleType):
            return [_integral(v, k) for v, k in zip(doc, t.item_types)] + doc[len(t.item_types):]
    return doc


# -- query strings -------------------------------------------------------------------

_INT = re.compile(r"-?[0-9]{1,19}")
_FLOAT = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _read_int(text: str) -> Any:
    return int(text) if _INT.fullmatch(text) else _NOT


def _read_float(text: str) -> Any:
    if len(text) > 64 or not _FLOAT.fullmatch(text):
        return _NOT
    value = float(text)
    return value if math.isfinite(value) else _NOT


def _read_bool(text: str) -> Any:
    return _BOOLS.get(text, _NOT)


_NOT = object()  # "not of this type"


def _reader(t: mi.Type) -> tuple[Callable[[str], Any], str]:
    """How one query value is read for a field of type `t`, and what it must look like."""
    if isinstance(t, mi.IntType):
        bounds = f" {t.ge}-{t.le}" if t.ge is not None and t.le is not None else ""
        return _read_int, f"an integer{bounds}"
    if isinstance(t, mi.FloatType):
        return _read_float, "a finite number"
    if isinstance(t, mi.BoolType):
        return _read_bool, "true or false"
    if isinstance(t, mi.UnionType):
        readers = [_reader(x) for x in t.types if not isinstance(x, mi.NoneType)]

        def first(text: str) -> Any:
            for read, _ in readers:
                if (value := read(text)) is not _NOT:
                    return value
            return _NOT

        return first, " or ".join(what for _, what in readers)
    return (lambda text: text), "text"


class QueryParser:
    """A query string as the msgspec `Struct` `tp`: each value is read as its field's
    type (integers as digits only, numbers finite, booleans `true`/`false`/`1`/`0`),
    then the Struct's constraints are checked. A key the Struct does not name is
    refused when it says `forbid_unknown_fields=True` (a `famly=` typo must not list
    everything), else ignored; the first of repeated keys wins."""

    def __init__(self, tp: type[T]) -> None:
        info = mi.type_info(tp)
        if not isinstance(info, mi.StructType):
            raise TypeError(f"a query is declared as a msgspec Struct, got {tp!r}")
        self.type = tp
        self.readers = {f.encode_name: _reader(f.type) for f in info.fields}
        self.forbid_unknown = info.forbid_unknown_fields
        try:  # what an empty query string makes, made once (most polls send none)
            self._empty: Any = msgspec.convert({}, tp)
        except msgspec.ValidationError:
            self._empty = None  # a required field: refused below, as any query without it
        if self._empty is not None and not all(
                getattr(self._empty, f.name) is None or type(getattr(self._empty, f.name)) in _KEPT_RESULTS
                for f in info.fields):
            self._empty = None  # a mutable default: a copy would share it

    def __call__(self, args: Mapping[str, str]) -> Any:
        if not args and self._empty is not None:
            return self._empty.__copy__()  # the view's own: it may change it
        if self.forbid_unknown:
            for key in args:
                if key not in self.readers:
                    expected = ", ".join(self.readers) or "none"
                    raise InvalidInput("query", key[:40], f"unknown query parameter (expected {expected})")
        doc: dict[str, Any] = {}
        for name, (read, what) in self.readers.items():
            if name not in args:  # werkzeug's get of a missing key raises and catches an HTTPException
                continue
            text = args.get(name)
            if text is None:
                continue
            value = read(text)
            if value is _NOT:
                raise InvalidInput("query", name, f"expected {what}, got {_shown(text)}")
            doc[name] = value
        try:
            return msgspec.convert(doc, self.type)
        except msgspec.ValidationError as e:
            raise _invalid(e, doc, self.type, "query", "query") from None
