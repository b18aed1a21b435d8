"""The plugin contract is type-checked: mypy --strict over gatewayd/plugins and the
in-tree plugins ([tool.mypy] in pyproject.toml), and a wrong call on ctx fails it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)  # a cold mypy cache on a Raspberry Pi is slow


def mypy(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=cwd, capture_output=True, text=True)


def test_the_contract_and_the_plugins_type_check():
    done = mypy()  # the files and settings of [tool.mypy]
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_wrong_call_on_ctx_fails_the_check(tmp_path):
    plugin = tmp_path / "gatewayd_wrong.py"
    plugin.write_text(textwrap.dedent('''
        from gatewayd.plugins.api import PluginContext, hookimpl

        @hookimpl
        async def gatewayd_startup(ctx: PluginContext[None, None]) -> None:
            await ctx.events.emit("wrong", "d1", "reading")  # v1 took the family first: data is a dict
            await ctx.ota.newest_for("family", "model", "1.0.0", "stable", "dev")  # one argument too many
            ctx.devices.provision("d1")  # not awaited
    '''))
    done = mypy("--config-file", str(ROOT / "pyproject.toml"), str(plugin))
    out = done.stdout
    assert done.returncode == 1, out
    assert 'Argument 3 to "emit" of "FamilyEvents" has incompatible type "str"' in out
    assert 'Too many arguments for "newest_for" of "FamilyOta"' in out
    assert "must be used  [unused-coroutine]" in out, out


def test_what_plugin_new_writes_type_checks(tmp_path):
    # Every feature at once, strict, with unused `type: ignore`s reported: what an
    # integrator starts from must not teach them to silence the checker.
    from gatewayd.cli import main

    assert main(["plugin", "new", "demo", "--http", "--mqtt", "--serial", "--dir", str(tmp_path)]) == 0
    done = mypy("--config-file", str(ROOT / "pyproject.toml"), "--warn-unused-ignores",
                str(tmp_path / "demo" / "gatewayd_demo"))
    assert done.returncode == 0, done.stdout + done.stderr
