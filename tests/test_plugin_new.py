"""`gatewayd plugin new`: what it writes, what it refuses, and that the plugin it writes
passes its own tests (run in a subprocess, as a newcomer would run them)."""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import itertools
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gatewayd.cli import main
from gatewayd.cli.plugin import FEATURES, TEMPLATES, render, render_plugin
from gatewayd.plugins.manager import build_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
COMBINATIONS = [set(c) for n in range(1, len(FEATURES) + 1) for c in itertools.combinations(FEATURES, n)]
# The order every plugin reads in (STYLE.md): config, models, state, routes, topics, serial, tasks, events.
CANONICAL = ["gatewayd_config_schema", "gatewayd_storage_models", "gatewayd_setup", "gatewayd_http_routes",
             "gatewayd_mqtt_topics", "gatewayd_serial_links", "gatewayd_startup", "gatewayd_background_tasks",
             "gatewayd_alert_rules", "gatewayd_shutdown"]
HOOK_OF = {"http": "gatewayd_http_routes", "mqtt": "gatewayd_mqtt_topics", "serial": "gatewayd_serial_links"}


def new(*args: str) -> int:
    return main(["plugin", "new", *args])


def unused_imports(source: str) -> set[str]:
    tree = ast.parse(source)
    imported = {(a.asname or a.name).split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", "") != "__future__"
                for a in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    return imported - used


def imported_modules(source: str) -> set[str]:
    tree = ast.parse(source)
    return {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


# -- what it writes ------------------------------------------------------------------


@pytest.mark.parametrize("features", COMBINATIONS, ids=lambda f: "+".join(sorted(f)))
def test_every_combination_is_a_plugin_that_loads(features, tmp_path, monkeypatch):
    name = "scaffold_" + "_".join(sorted(features))
    files = render_plugin(name, features)
    assert sorted(files) == sorted(p.format(name=name) for p in TEMPLATES.values())
    for path, text in files.items():
        assert "#[" not in text and "$" not in text, f"{path}: a template marker or placeholder is left"
        if path.endswith(".py"):
            assert not unused_imports(text), f"{path}: unused imports {unused_imports(text)}"
            assert not {m for m in imported_modules(text) if m.startswith(("gatewayd.core", "gatewayd.cli"))}, path
    code = files[f"gatewayd_{name}/__init__.py"]
    hooks = re.findall(r"^(?:async )?def (gatewayd_\w+)\(", code, re.MULTILINE)
    assert hooks == sorted(hooks, key=CANONICAL.index), "hooks out of the canonical order"
    assert {h for f, h in HOOK_OF.items() if f in features} == set(hooks) & set(HOOK_OF.values())
    for section in ("config", "models", "state", "routes", "topics", "serial", "tasks", "events"):
        assert f"\n# -- {section} " in code, f"no '# -- {section}' section"
    sections = re.findall(r"^# -- (\w+) ", code, re.MULTILINE)
    assert sections == ["config", "models", "state", "routes", "topics", "serial", "tasks", "events"]
    pyproject = tomllib.loads(files["pyproject.toml"])
    assert pyproject["project"]["entry-points"]["gatewayd.plugins"] == {name: f"gatewayd_{name}"}
    readme = files["README.md"]
    assert ("## HTTP routes" in readme) == ("http" in features) and ("## Topics" in readme) == ("mqtt" in features)
    # It imports, and the plugin manager takes it (every hook name is a hook).
    package = tmp_path / f"gatewayd_{name}"
    package.mkdir()
    (package / "__init__.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.find_spec(f"gatewayd_{name}")
    assert spec is not None and spec.origin == str(package / "__init__.py")
    module = importlib.import_module(f"gatewayd_{name}")
    manager = build_plugin_manager(entry_points=False, plugins=[(name, module)])
    assert all(manager.implements(name, hook) for hook in hooks)


def test_the_cli_writes_the_plugin_and_says_what_next(tmp_path, capsys):
    assert new("acme_meter", "--http", "--mqtt", "--dir", str(tmp_path / "plugins")) == 0
    target = tmp_path / "plugins" / "acme_meter"
    written = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert written == ["README.md", "gatewayd_acme_meter/__init__.py", "pyproject.toml", "tests/test_acme_meter.py"]
    assert (target / "gatewayd_acme_meter" / "__init__.py").read_text() == \
        render_plugin("acme_meter", {"http", "mqtt"})["gatewayd_acme_meter/__init__.py"]
    out = capsys.readouterr().out
    assert "./scripts/test plugins/acme_meter" in out


def test_without_a_feature_it_writes_an_http_plugin(tmp_path):
    assert new("acme_meter", "--dir", str(tmp_path)) == 0
    code = (tmp_path / "acme_meter" / "gatewayd_acme_meter" / "__init__.py").read_text()
    assert "def gatewayd_http_routes(" in code and "def gatewayd_mqtt_topics(" not in code


# -- what it refuses -----------------------------------------------------------------


@pytest.mark.parametrize("name, reason", [
    ("Meter", "not a valid plugin name"),
    ("2meter", "not a valid plugin name"),
    ("door-sensor", "not a valid plugin name"),
    ("class", "not a valid plugin name"),
    ("mètre", "not a valid plugin name"),
    ("m" * 65, "too long"),
    ("core", "reserved"),
    ("api", "reserved"),
    ("dashboard", "reserved"),  # a path of the core
    ("devices", "reserved"),  # a core command
    ("plugin", "reserved"),
    ("paku", "already installed"),
])
def test_it_refuses_a_name(name, reason, tmp_path, capsys):
    assert new(name, "--dir", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("gatewayd: plugin new: ") and reason in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_it_refuses_an_existing_folder(tmp_path, capsys):
    (tmp_path / "acme_meter").mkdir()
    (tmp_path / "acme_meter" / "mine.txt").write_text("keep me")
    assert new("acme_meter", "--dir", str(tmp_path)) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "acme_meter").iterdir()] == ["mine.txt"]


def test_template_markers_are_checked():
    assert render("a\n#[http]\nb\n#[end]\nc  #[!http]\n", "x", {"http"}) == "a\nb\n"
    assert render("a\n#[mqtt|serial]\nb\n#[end]\n", "x", {"serial"}) == "a\nb\n"
    with pytest.raises(ValueError, match="not closed"):
        render("#[http]\na\n", "x", set())
    with pytest.raises(ValueError, match="do not nest"):
        render("#[http]\n#[mqtt]\n#[end]\n", "x", set())


def test_the_templates_are_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gatewayd.cli"]
    folder = ROOT / "gatewayd" / "cli"
    templates = [str(p.relative_to(folder)) for p in (folder / "templates").rglob("*") if p.is_file()]
    assert sorted(Path(t).name for t in templates) == sorted(TEMPLATES)
    assert all(any(fnmatch.fnmatch(t, g) for g in globs) for t in templates), (templates, globs)


# -- the plugin it writes passes its tests -------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags", [["--http", "--mqtt"], ["--serial"]], ids=" ".join)
def test_the_written_plugin_passes_its_own_tests(flags, tmp_path):
    # As a newcomer: `gatewayd plugin new`, then pytest on the new folder, not installed
    # (its pyproject puts it on the path; its tests register it with gateway_factory).
    gatewayd = Path(sys.executable).with_name("gatewayd")  # the venv's command
    subprocess.run([str(gatewayd), "plugin", "new", "acme_meter", *flags], cwd=tmp_path, check=True,
                   capture_output=True)
    tests = (tmp_path / "plugins" / "acme_meter" / "tests" / "test_acme_meter.py").read_text()
    expected = len(re.findall(r"^async def test_", tests, re.MULTILINE))
    run = subprocess.run([sys.executable, "-m", "pytest", "plugins/acme_meter", "-q", "-p", "no:cacheprovider"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{expected} passed" in run.stdout, run.stdout
