"""Every hook is documented in docs/plugins.md and has a test (datasette's model)."""

import re
from pathlib import Path

import pytest

from gatewayd.plugins import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("gatewayd_"))


def documented_hooks() -> set[str]:
    text = (ROOT / "docs" / "plugins.md").read_text()
    return set(re.findall(r"^### (gatewayd_\w+)\(", text, re.MULTILINE))


def hooks_with_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        names |= {"gatewayd_" + m for m in re.findall(r"^(?:async )?def test_hook_(\w+)\(", path.read_text(), re.M)}
    return names


def test_there_are_hooks():
    assert len(HOOKS) >= 7


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_are_documented(hook):
    assert hook in documented_hooks(), f"{hook} has no '### {hook}(...)' section in docs/plugins.md"


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_tests(hook):
    name = hook.removeprefix("gatewayd_")
    assert hook in hooks_with_tests(), f"{hook} has no test named test_hook_{name} under tests/"


@pytest.mark.parametrize("hook", HOOKS)
def test_hookspecs_have_docstrings(hook):
    doc = getattr(hookspecs, hook).__doc__ or ""
    assert len(doc.strip()) > 80, f"{hook}: the hookspec docstring must state its contract"


def test_no_documented_hook_is_missing_from_hookspecs():
    assert documented_hooks() <= set(HOOKS)
