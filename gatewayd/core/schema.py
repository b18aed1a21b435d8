"""Typed config sections: dataclasses checked against raw TOML tables.

A section is a plain dataclass. Field types may be str, int, float, bool, Literal[...],
list[T], dict[str, T], T | None, another section dataclass, or any class with a
`from_config(value)` classmethod (e.g. `Address`). A section may define
`validate(self)` raising `ConfigError("key", "reason")` for cross-field checks.
Plugins describe their `[plugins.<name>]` keys the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from typing import Any, Literal

__all__ = ["Address", "ConfigError", "ConfigErrors", "load_section", "join_key"]


class ConfigError(Exception):
    """One problem in the configuration, with the dotted key it concerns."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}" if key else reason)

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(join_key(prefix, self.key), self.reason)


class ConfigErrors(Exception):
    """Every problem found in one pass, so an operator fixes them all at once."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def join_key(prefix: str, key: str) -> str:
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


@dataclasses.dataclass(frozen=True)
class Address:
    """A `HOST:PORT` listen or connect address (`[::1]:8080` for IPv6)."""

    host: str
    port: int

    @classmethod
    def from_config(cls, value: Any) -> "Address":
        if not isinstance(value, str):
            raise ValueError(f"expected HOST:PORT, got {_describe(value)}")
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", value)
        if not m:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4))
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535, got {port}")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_TOML_TYPE = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _describe(value: Any) -> str:
    kind = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "table"}
    return f"{value!r} ({kind.get(type(value), type(value).__name__)})"


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported config type {tp}")
        return _convert(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(key, f"expected one of {choices}, got {_describe(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected an array, got {_describe(value)}")
        out, errors = [], []
        for i, item in enumerate(value):
            try:
                out.append(_convert(args[0], item, f"{key}[{i}]"))
            except ConfigError as e:
                errors.append(e)
            except ConfigErrors as e:
                errors.extend(e.errors)
        if errors:
            raise ConfigErrors(errors)
        return out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {_describe(value)}")
        return {k: _convert(args[1], v, join_key(key, k)) for k, v in value.items()}
    if hasattr(tp, "from_config"):
        try:
            return tp.from_config(value)
        except ValueError as e:
            raise ConfigError(key, str(e)) from None
    if dataclasses.is_dataclass(tp):
        return load_section(tp, value, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML has inf and nan; no setting means them
                raise ConfigError(key, f"expected a finite number, got {value}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    elif tp is Any:
        return value
    else:
        raise TypeError(f"unsupported config type {tp}")
    raise ConfigError(key, f"expected {_TOML_TYPE[tp]}, got {_describe(value)}")


def _unknown(key: str, name: str, known: list[str]) -> ConfigError:
    if not name.endswith("_env") and f"{name}_env" in known:
        return ConfigError(
            join_key(key, name),
            f"secrets are never written in the file; set {name}_env to the name of an "
            "environment variable that holds it",
        )
    hint = difflib.get_close_matches(name, known, n=1)
    suffix = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(sorted(known))})"
    return ConfigError(join_key(key, name), f"unknown key{suffix}")


def load_section(cls: type, raw: Any, key: str = "") -> Any:
    """Check `raw` (a TOML table) against the dataclass `cls` and build it.

    Raises ConfigErrors listing every problem, each with its full dotted key.
    """
    if not isinstance(raw, dict):
        raise ConfigErrors([ConfigError(key, f"expected a table, got {_describe(raw)}")])
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    errors: list[ConfigError] = []
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in fields:
            errors.append(_unknown(key, name, list(fields)))
            continue
        sub = join_key(key, name)
        try:
            kwargs[name] = _convert(hints[name], value, sub)
            if name.endswith("_env") and kwargs[name] and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", kwargs[name]):
                errors.append(ConfigError(sub, f"expected an environment variable name, got {value!r}"))
        except ConfigError as e:
            errors.append(e)
        except ConfigErrors as e:
            errors.extend(e.errors)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(ConfigError(join_key(key, name), "required key is missing"))
    if errors:
        # The keys that did parse are still checked (`validate`), so one unknown or
        # mistyped key does not hide the section's other errors; what `validate` says
        # about a key already named is left out (it saw the default in its place).
        named = {e.key for e in errors}
        try:
            partial = cls(**kwargs)
        except (TypeError, ValueError):
            raise ConfigErrors(errors) from None
        try:
            errors += [e for e in _validate(partial, key) if e.key not in named]
        except Exception:  # noqa: BLE001 - a validate() that needs the missing values: the errors found stand
            pass
        raise ConfigErrors(errors)
    try:
        obj = cls(**kwargs)
    except ValueError as e:
        # Sections that check themselves on construction (e.g. SerialSettings) name the
        # offending field in `e.field`; turn that into the full TOML key.
        name = getattr(e, "field", None)
        if name is None:
            raise
        raise ConfigErrors([ConfigError(join_key(key, name), str(e).removeprefix(f"{name}: "))]) from None
    if problems := _validate(obj, key):
        raise ConfigErrors(problems)
    return obj


def _validate(obj: Any, key: str) -> list[ConfigError]:
    """What the section's `validate()` finds: one ConfigError, or ConfigErrors for several."""
    validate = getattr(obj, "validate", None)
    if validate is None:
        return []
    try:
        validate()
    except ConfigError as e:
        return [e.under(key)]
    except ConfigErrors as e:
        return [x.under(key) for x in e.errors]
    return []


def read_secret(env_name: str) -> str | None:
    """The secret held by the environment variable an `*_env` key names, or None."""
    if not env_name:
        return None
    value = os.environ.get(env_name)
    return value or None
