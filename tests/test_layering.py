"""The architecture, enforced: packages depend downward only, and plugins only on the API.

A node of the graph is a package under gatewayd/ (gatewayd.core.mqtt, gatewayd.protocol,
gatewayd.cli, ...) or a top-level module of gatewayd.core (config, storage, runtime...).
An edge is any import, including those under TYPE_CHECKING and inside functions: a
cycle hidden in a function body is still a cycle. See ARCHITECTURE.md ("Packages
depend downward only").
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gatewayd"


def _node(module: str) -> str:
    """The graph node a module belongs to."""
    parts = module.split(".")
    if parts[:2] == ["gatewayd", "core"] and len(parts) >= 3:
        sub = PACKAGE / "core" / parts[2]
        return ".".join(parts[:3]) if sub.is_dir() or len(parts) == 3 else ".".join(parts[:3])
    return ".".join(parts[:2])


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gatewayd"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("gatewayd"):
                continue
            # `from gatewayd.core import mqtt` imports the submodule gatewayd.core.mqtt
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                as_path = ROOT / Path(*candidate.split("."))
                found.add(candidate if as_path.is_dir() or as_path.with_suffix(".py").exists() else target)
    return found


def dependency_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = _node(_module_name(path))
        for target in _imports(path):
            dest = _node(target)
            if dest != source and dest != "gatewayd" and source != "gatewayd":
                graph.setdefault(source, set()).add(dest)
        graph.setdefault(source, set())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_packages():
    found = cycles(dependency_graph())
    assert not found, "import cycles between packages:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_protocol_depends_on_nothing_of_ours():
    assert dependency_graph().get("gatewayd.protocol", set()) == set()


def test_plugins_import_only_the_plugin_api():
    offenders = []
    for path in (ROOT / "plugins").rglob("*.py"):
        for target in _imports(path):
            if target.startswith("gatewayd.core") or target.startswith("gatewayd.cli"):
                offenders.append(f"{path.relative_to(ROOT)}: {target}")
    assert not offenders, "plugins talk to the core only through gatewayd.plugins.api:\n" + "\n".join(offenders)


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
