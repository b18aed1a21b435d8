"""The context reference of docs/plugins.md, read from `PluginContext` itself.

Every public member a plugin can reach through `ctx`: the context's fields, properties
and methods, and those of each service on it (`ctx.devices`, `ctx.auth`, ...), with
their signatures as a plugin calls them (`await ` for a coroutine, no annotations).
tests/test_docs.py checks docs/plugins.md's table against this, both ways::

    python -m gatewayd.plugins.docgen          # the table's first column, as it must read
    python -m gatewayd.plugins.docgen --rows   # whole rows, with each member's first docstring line
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

from .context import PluginContext

__all__ = ["Member", "context_members", "signature_text"]


@dataclass(frozen=True)
class Member:
    """One thing `ctx.<path>` names."""

    path: str  # "devices.get"
    call: str  # "await ctx.devices.get(device_id, *, max_age_s=0.0)", or "ctx.name" for a value
    doc: str  # the first line of its docstring ("" if none)


def signature_text(fn: Any) -> str:
    """`(a, b=1, *, c=None)`: the parameters a caller passes, without self or annotations."""
    parts = []
    star_done = False
    for p in list(inspect.signature(fn).parameters.values())[1 if _is_method(fn) else 0:]:
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        elif p.kind is p.VAR_POSITIONAL:
            star_done = True
            parts.append(f"*{p.name}")
            continue
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
            continue
        default = p.default
        if default is p.empty:
            parts.append(p.name)
        else:
            shown = getattr(default, "__name__", None) if callable(default) else None
            parts.append(f"{p.name}={shown or repr(default)}")
    return f"({', '.join(parts)})"


def _is_method(fn: Any) -> bool:
    params = list(inspect.signature(fn).parameters)
    return bool(params) and params[0] == "self"


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def _instance_attributes(cls: type) -> list[str]:
    """Public attributes `__init__` sets (`self.family = family`)."""
    init = cls.__dict__.get("__init__")
    if init is None or dataclasses.is_dataclass(cls):  # a dataclass's fields are read as fields
        return []
    tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    names = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self" \
                    and not target.attr.startswith("_") and target.attr not in names:
                names.append(target.attr)
    return names


def _members_of(cls: type, prefix: str) -> list[Member]:
    """`cls`'s public methods, properties and instance attributes, in source order."""
    found = []
    for name in _instance_attributes(cls):
        found.append(Member(f"{prefix}{name}", f"ctx.{prefix}{name}", ""))
    for name, value in vars(cls).items():
        if name.startswith("_") or isinstance(value, dataclasses.Field):
            continue
        if isinstance(value, property):
            found.append(Member(f"{prefix}{name}", f"ctx.{prefix}{name}", _first_line(value)))
        elif inspect.isfunction(value):
            awaited = "await " if inspect.iscoroutinefunction(value) else ""
            found.append(Member(f"{prefix}{name}", f"{awaited}ctx.{prefix}{name}{signature_text(value)}",
                                _first_line(value)))
    return found


def _is_service(tp: Any) -> bool:
    """A class of ours on the context: its members are documented one by one."""
    return inspect.isclass(tp) and tp.__module__.startswith("gatewayd.")


def context_members() -> list[Member]:
    """Everything `ctx.` reaches, in the context's field order (each service after its field)."""
    hints = typing.get_type_hints(PluginContext)
    members = []
    for f in dataclasses.fields(PluginContext):
        if f.name.startswith("_"):
            continue
        members.append(Member(f.name, f"ctx.{f.name}", _attribute_doc(f.name)))
        if _is_service(hints[f.name]):
            members += _members_of(hints[f.name], f"{f.name}.")
    members += _members_of(PluginContext, "")
    return members


def _attribute_doc(name: str) -> str:
    """The docstring under a dataclass field (`name: str` then `\"\"\"...\"\"\"`)."""
    node = ast.parse(inspect.getsource(PluginContext)).body[0]
    assert isinstance(node, ast.ClassDef)
    body = node.body
    for stmt, after in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name \
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            return str(after.value.value).strip().split("\n\n")[0].replace("\n", " ")
    return ""


def main(argv: list[str] | None = None) -> int:
    rows = "--rows" in (sys.argv[1:] if argv is None else argv)
    for m in context_members():
        print(f"| `{m.call}` | {m.doc} |" if rows else m.call)
    return 0


if __name__ == "__main__":
    sys.exit(main())
