"""The kaiabc CLI commands, driven through a fake of the core's command registry."""

import argparse
import json

import pytest

from gatewayd_kaiabc.commands import add_commands


class FakeRegistry:
    """Records ``add`` calls the way the core registry would receive them."""

    def __init__(self):
        self.commands = {}

    def add(self, name, help, setup, run):
        self.commands[name] = (help, setup, run)


@pytest.fixture(scope="module")
def registry():
    reg = FakeRegistry()
    add_commands(reg)
    return reg


def run(registry, argv):
    _, setup, runner = registry.commands[argv[0]]
    parser = argparse.ArgumentParser(prog=f"gatewayd kaiabc {argv[0]}")
    setup(parser)
    return runner(parser.parse_args(argv[1:]))


def test_registers_four_commands(registry):
    assert set(registry.commands) == {"simulate", "q10", "prc", "entrain"}
    assert all(help for help, _, _ in registry.commands.values())


def test_simulate_json(registry, capsys):
    assert run(registry, ["simulate", "--hours", "100", "--nodes", "50", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert 20.0 < body["period_hours"] < 22.0
    assert 0 < body["phosphorylated_fraction_min"] < body["phosphorylated_fraction_max"] < 1
    assert body["amplitude"] == pytest.approx(
        0.5 * (body["phosphorylated_fraction_max"] - body["phosphorylated_fraction_min"]))
    assert body["nodes"] == 50 and body["wall_time_s"] > 0


def test_simulate_text(registry, capsys):
    assert run(registry, ["simulate", "--hours", "60"]) == 0
    out = capsys.readouterr().out
    assert "period" in out and "wall time" in out


def test_simulate_too_short_for_a_period_prints_the_state_and_says_so(registry, capsys):
    assert run(registry, ["simulate", "--hours", "24", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["period_hours"] is None and "48" in body["note"]
    assert 0 < body["phosphorylated_fraction_final"] < 1
    assert run(registry, ["simulate", "--hours", "24"]) == 0
    assert "needs at least 48 simulated hours" in capsys.readouterr().out


def test_entrain_json(registry, capsys):
    assert run(registry, ["entrain", "--low-k", "298.15", "--high-k", "308.15", "--days", "20", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["locked"] is True and abs(body["period_hours"] - 24.0) <= 0.1
    assert 0 <= body["phase_angle_hours"] < 24
    assert run(registry, ["entrain", "--low-k", "302.65", "--high-k", "303.65", "--days", "12"]) == 0
    assert "locked            no" in capsys.readouterr().out


def test_q10_json(registry, capsys):
    assert run(registry, ["q10", "--preset", "case_ii_mutant", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["q10"] > 1.3


def test_prc_json(registry, capsys):
    assert run(registry, ["prc", "--resolution", "6", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert len(body["data"]) == 6 and body["data"][1]["circadian_time"] == 4.0


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--preset", "nope"], "unknown temperature preset"),
    (["simulate", "--hours", "1e9"], "--hours"),
    (["simulate", "--hours", "nan"], "--hours"),
    (["simulate", "--temperature-k", "nan"], "--temperature-k"),
    (["simulate", "--temperature-k", "inf"], "--temperature-k"),
    (["simulate", "--temperature-k", "400"], "--temperature-k"),
    (["entrain", "--low-k", "nan", "--high-k", "300"], "--low-k"),
    (["entrain", "--low-k", "305", "--high-k", "300"], "low_k must be below high_k"),
    (["q10", "--preset", "wild_type"], "unknown temperature preset"),
    (["prc", "--resolution", "1"], "--resolution"),
])
def test_errors_are_one_line_and_exit_2(registry, capsys, argv, message):
    assert run(registry, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and captured.err.count("\n") == 1


@pytest.mark.parametrize("settings, message", [
    (["plugins.kaiabc.history_coarse_s=30"], "plugins.kaiabc.history_coarse_s: must be at least history_every_s"),
    (["plugins.kaiabc.history_full_days=40"], "plugins.kaiabc.history_full_days: must be at most history_days"),
    (["plugins.kaiabc.history_coars_s=600"], "history_coars_s"),
    (["plugins.kaiabc.readings_retention_days=0"], "plugins.kaiabc.readings_retention_days: must be a finite number > 0"),
    (["plugins.kaiabc.readings_retention_days=1e6"], "plugins.kaiabc.readings_retention_days: must be at most 36500"),
])
async def test_history_settings_errors_name_the_toml_key(gateway_factory, settings, message):
    from gatewayd.testing import ConfigErrors
    from kaiabc_testbed import KAIABC

    with pytest.raises(ConfigErrors) as info:
        async with gateway_factory(plugins=KAIABC, settings=settings):
            pass
    assert any(message in str(e) for e in info.value.errors), [str(e) for e in info.value.errors]


@pytest.mark.parametrize("argv, message", [
    (["prc", "--resolution", "2", "--duration-min", "inf"], "--duration-min"),
    (["prc", "--resolution", "2", "--delta-k", "30"], "--delta-k"),
    (["prc", "--resolution", "2", "--delta-k", "inf"], "--delta-k"),
    (["prc", "--resolution", "2", "--delta-k", "nan"], "--delta-k"),
    (["prc", "--resolution", "2", "--duration-min", "1e9"], "--duration-min"),
    (["prc", "--resolution", "2", "--duration-min", "0"], "--duration-min"),
])
def test_prc_pulse_bounds_are_the_apis(registry, capsys, argv, message):
    assert run(registry, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and captured.err.count("\n") == 1
