"""`gatewayd plugin new NAME [--http] [--mqtt] [--serial] [--dir plugins]`: a new family plugin.

Writes `plugins/NAME/`: `pyproject.toml` (the `gatewayd.plugins` entry point),
`gatewayd_NAME/__init__.py` (the hooks in the canonical order: a config dataclass, a
model, the plugin's state, then a device route, a topic with its ACL, a serial line as
asked, and an alert rule), `README.md` (its routes and topics) and `tests/test_NAME.py`
(on `gatewayd.testing` only), which pass as written.

The files come from `templates/plugin/*.tmpl`, rendered with `string.Template`
(`$name`, `$Name`). A line ending in `#[mqtt]` is kept only with `--mqtt`; lines
between `#[http]` and `#[end]` only with `--http`; `#[http|mqtt]` with either,
`#[!serial]` without `--serial`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import keyword
import re
import string
import sys
from collections.abc import Iterable, Mapping
from importlib.resources import files
from pathlib import Path

from ..plugins.manager import ENTRY_POINT_GROUP, PluginManager

__all__ = ["FEATURES", "PluginNameError", "check_name", "cmd_plugin", "render", "render_plugin", "setup_plugin"]

FEATURES = ("http", "mqtt", "serial")
TEMPLATES = {  # template -> where it goes in the plugin's folder
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "plugin.py.tmpl": "gatewayd_{name}/__init__.py",
    "test_plugin.py.tmpl": "tests/test_{name}.py",
}
# Names a plugin cannot take: the core's table prefix (core_*) and the first segments of
# its URL paths (a plugin is mounted at /<name>); the names of the core's commands are
# checked too (a plugin's own commands are `gatewayd <name> ...`).
RESERVED = frozenset({"core", "api", "health", "metrics", "dashboard", "docs", "openapi"})  # the core's tables and top-level paths
MAX_NAME = 64  # a device family's longest name (docs/devices.md)

_MARK = re.compile(r"#\[(!?)([a-z|]+)\]$")


class PluginNameError(ValueError):
    """NAME cannot be a new plugin; the message says why."""


def check_name(name: str, directory: Path, installed: Mapping[str, str], reserved: Iterable[str] = ()) -> None:
    """Refuse a NAME that is not a lowercase Python identifier, is taken, or whose folder exists.

    `installed`: the installed plugins' names, each with its distribution's name ("" unknown).
    """
    if not (name.isascii() and name.isidentifier() and name == name.lower()) or keyword.iskeyword(name):
        raise PluginNameError(
            f"{name!r} is not a valid plugin name: use a lowercase Python identifier "
            "(letters a-z, digits and _, not starting with a digit), e.g. 'meter' or 'door_sensor'"
        )
    if len(name) > MAX_NAME:
        raise PluginNameError(f"{name!r} is too long: a plugin name (its device family) has at most {MAX_NAME} characters")
    if name in RESERVED or name in set(reserved):
        raise PluginNameError(f"{name!r} is reserved by gatewayd (a command, the core's table prefix or one of its paths): choose another")
    if name in installed:
        dist = installed[name]
        raise PluginNameError(
            f"a plugin named {name!r} is already installed (`gatewayd plugins` lists it): choose another name"
            + (f", or uninstall it first if its folder is gone: .venv/bin/pip uninstall {dist}" if dist else "")
        )
    if importlib.util.find_spec(f"gatewayd_{name}") is not None:
        raise PluginNameError(f"a Python package gatewayd_{name} is already installed: choose another name")
    target = directory / name
    if target.exists():
        raise PluginNameError(f"{target} already exists: choose another name or remove it")


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_")) or "Plugin"


def _wanted(negate: str, condition: str, features: set[str]) -> bool:
    return bool(features & set(condition.split("|"))) != bool(negate)


def render(template: str, name: str, features: Iterable[str], *, max_blank: int = 2) -> str:
    """Keep the lines `features` select (see the module docstring), then substitute."""
    chosen = set(features)
    lines: list[str] = []
    block: bool | None = None  # inside a #[...] block: keep its lines?
    for number, line in enumerate(template.splitlines(), 1):
        mark = _MARK.search(line)
        if mark is None:
            if block is not False:
                lines.append(line)
        elif line.strip() == "#[end]":
            if block is None:
                raise ValueError(f"line {number}: #[end] without a block")
            block = None
        elif line.strip() == mark[0]:
            if block is not None:
                raise ValueError(f"line {number}: blocks do not nest")
            block = _wanted(mark[1], mark[2], chosen)
        elif block is not False and _wanted(mark[1], mark[2], chosen):
            lines.append(line[: mark.start()].rstrip())
    if block is not None:
        raise ValueError("a #[...] block is not closed with #[end]")
    text = re.sub(r"\n{%d,}" % (max_blank + 2), "\n" * (max_blank + 1), "\n".join(lines).strip("\n") + "\n")
    return string.Template(text).substitute(name=name, Name=_camel(name))


def render_plugin(name: str, features: Iterable[str]) -> dict[str, str]:
    """The new plugin's files: relative path -> text."""
    features = set(features)
    unknown = features - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown features: {', '.join(sorted(unknown))}")
    folder = files(__package__).joinpath("templates", "plugin")
    return {
        path.format(name=name): render(folder.joinpath(template).read_text(encoding="utf-8"), name, features,
                                       max_blank=2 if template.endswith(".py.tmpl") else 1)
        for template, path in TEMPLATES.items()
    }


def write_plugin(target: Path, name: str, features: Iterable[str]) -> list[Path]:
    """Write the plugin into `target` (a folder that must not exist yet)."""
    rendered = render_plugin(name, features)
    target.mkdir(parents=True)
    written = []
    for relative, text in rendered.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# -- the command ---------------------------------------------------------------------


def setup_plugin(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plugin_action", metavar="ACTION", required=True)
    new = sub.add_parser(
        "new", help="write a new family plugin: plugins/NAME with its code, README and passing tests",
        description="Write plugins/NAME: a family plugin with a config dataclass, a model, an alert rule, "
        "and the device interfaces asked for (default: --http), with tests on gatewayd.testing that pass "
        "as written. Then: ./scripts/test plugins/NAME (scripts/bootstrap installs it first).",
    )
    new.add_argument("name", metavar="NAME", help="the plugin's name: a lowercase Python identifier (its device family)")
    new.add_argument("--http", action="store_true", help="a device route with per-device auth (X-API-Key)")
    new.add_argument("--mqtt", action="store_true", help="an MQTT topic and the ACL of its device accounts")
    new.add_argument("--serial", action="store_true", help="a serial line of JSON frames")
    new.add_argument("--dir", default="plugins", type=Path, help="where the plugin's folder goes (default: plugins)")


def cmd_plugin(args: argparse.Namespace, manager: PluginManager) -> int:
    from . import CORE_COMMANDS  # the package that imports this module: only once it is built

    features = [f for f in FEATURES if getattr(args, f)] or ["http"]
    installed = dict.fromkeys(manager.names, "")
    installed |= {ep.name: ep.dist.name if ep.dist else "" for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    try:
        check_name(args.name, args.dir, installed, reserved=[c[0] for c in CORE_COMMANDS])
    except PluginNameError as e:
        print(f"gatewayd: plugin new: {e}", file=sys.stderr)
        return 2
    target = args.dir / args.name
    written = write_plugin(target, args.name, features)
    print(f"wrote {target}/, the {args.name} plugin ({', '.join(features)}):")
    for path in written:
        print(f"  {path}")
    # The one way to install a plugin: a folder under plugins/, which scripts/bootstrap
    # (run by scripts/run and scripts/test) installs, editable, with the pinned versions.
    here = args.dir.resolve()
    in_checkout = here.name == "plugins" and (here.parent / "scripts" / "bootstrap").exists()
    steps = [] if in_checkout else [f"move {target} into the plugins/ folder of your gatewayd checkout"]
    steps += [f"./scripts/test plugins/{args.name}    (installs it, then runs its tests)",
              f"read plugins/{args.name}/gatewayd_{args.name}/__init__.py top to bottom "
              "(docs/plugins.md starts with a tutorial on it)"]
    print("next:\n" + "\n".join(f"  {step}" for step in steps))
    return 0
