"""`gatewayd streetlight config ID ...`: an operator's per-light config, while the daemon runs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import trio
from gatewayd_streetlight import cli as config_cli
from streetlight_testbed import BASE, IMEI, PLUGIN, bearer, configure, status_report

from gatewayd.testing import gw_client, provision, wait_until


async def gatewayd(data_dir, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The command as an installer runs it: a process of its own, on the daemon's database."""
    return await trio.run_process(
        [sys.executable, "-m", "gatewayd", "streetlight", "config", "--set", f"gateway.data_dir='{data_dir}'", *args],
        capture_stdout=True, capture_stderr=True, check=False)


async def test_a_lights_config_is_stored_sent_to_it_and_reset(gateway_factory, tmp_path):
    data_dir = tmp_path / "var"
    # The daemon reads in another process's commands within devices.presence_flush_s (its
    # change watch): a poll with nothing queued is answered from memory.
    async with gateway_factory(plugins=PLUGIN, settings=["devices.presence_flush_s=0.05"]) as gw, \
            gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])
        done = await gatewayd(data_dir, IMEI, "--brightness", "60", "--schedule", "18:00-6:30", "--json")
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["overrides"] == {"brightness_level": 60, "schedule_enabled": True, "sunset_time": "18:00:00",
                                       "sunrise_time": "06:30:00"}
        assert answer["light_id"] == "SL001" and answer["config"]["auto_dimming"] is True
        # The light gets both at its next poll once the daemon noticed them, in the
        # specification's shapes...
        async def poll() -> list:
            return (await client.get(f"{BASE}/{IMEI}/commands", headers=auth)).json()["commands"]

        polled = await wait_until(poll)
        assert [{k: c[k] for k in c if k not in ("command_id", "requested_at")} for c in polled] == [
            {"command_type": "brightness_control", "brightness_level": 60, "priority": "normal"},
            {"command_type": "schedule_update", "priority": "low",
             "schedule": {"enabled": True, "sunrise_time": "06:30:00", "sunset_time": "18:00:00"}}]
        assert [c["command_id"] for c in polled] == [c["command_id"] for c in answer["commands"]]
        # ... and in its config at its next configure.
        config = (await configure(client))["config"]
        assert (config["brightness_level"], config["sunset_time"], config["sunrise_time"]) == (60, "18:00:00",
                                                                                              "06:30:00")
        # A bad option: named, nothing changed.
        refused = await gatewayd(data_dir, IMEI, "--brightness", "140")
        assert refused.returncode == 2
        assert refused.stderr.decode() == "streetlight config: --brightness: expected an integer 0-100, got '140'\n"
        unknown = await gatewayd(data_dir, "IMEI:000000000000000", "--brightness", "10")
        assert unknown.returncode == 1 and b"no light 'IMEI:000000000000000' on this gateway" in unknown.stderr
        # Back to the site's config, stored only.
        reset = await gatewayd(data_dir, IMEI, "--reset", "--no-command")
        assert reset.returncode == 0, reset.stderr
        assert "brightness_level  100         site default" in reset.stdout.decode()
        assert (await configure(client))["config"]["brightness_level"] == 100
        assert (await client.get(f"{BASE}/{IMEI}/commands", headers=auth)).json()["commands"] == []


def options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config_cli.setup(parser)
    return parser.parse_args([IMEI, *argv])


@pytest.mark.parametrize(("argv", "message"), [
    (["--brightness", "-1"], "--brightness: expected an integer 0-100, got '-1'"),
    (["--brightness", "half"], "--brightness: expected an integer 0-100, got 'half'"),
    (["--schedule", "18:30"], "--schedule: expected ON-OFF times such as 18:30-06:00, or on / off, got '18:30'"),
    (["--schedule", "24:00-06:00"], "--schedule: expected ON-OFF times such as 18:30-06:00, or on / off, "
                                    "got '24:00-06:00'"),
    (["--schedule", "06:00-6:00:00"], "--schedule: the lamp cannot go on and off at the same time (06:00:00)"),
    (["--auto-dimming", "yes"], "--auto-dimming: expected on or off, got 'yes'"),
    (["--reset", "--brightness", "50"], "--reset: drops every override; give it alone, not with --brightness"),
])
def test_a_bad_option_is_named(argv, message):
    with pytest.raises(ValueError) as refused:
        config_cli.overrides(options(*argv))
    assert str(refused.value) == message


def test_options_become_the_configs_keys_and_the_lights_commands():
    changes = config_cli.overrides(options("--schedule", "off", "--auto-dimming", "off", "--brightness", "0"))
    assert changes == {"schedule_enabled": False, "auto_dimming": False, "brightness_level": 0}
    config = {"schedule_enabled": False, "sunrise_time": "06:00:00", "sunset_time": "18:30:00",
              "brightness_level": 0, "auto_dimming": False}
    assert config_cli.light_commands(set(changes), config) == [
        {"command_type": "brightness_control", "brightness_level": 0},
        {"command_type": "schedule_update",
         "schedule": {"enabled": False, "sunrise_time": "06:00:00", "sunset_time": "18:30:00"}}]
    assert config_cli.light_commands({"auto_dimming"}, config) == []


async def test_a_token_revoked_by_another_process_is_refused_promptly(gateway_factory, tmp_path):
    """The daemon holds a light's device row between requests (no read per status); a
    `gatewayd devices rotate` or `disable` from another process still takes effect within
    devices.presence_flush_s (the change watch), not after the row's fallback age."""
    async with gateway_factory(plugins=PLUGIN, settings=["devices.presence_flush_s=0.05"]) as gw, \
            gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])

        async def status() -> int:
            return (await client.post(f"{BASE}/{IMEI}/status", json=status_report(), headers=auth)).status_code

        assert await status() == 200
        cli = [sys.executable, "-m", "gatewayd", "devices", "rotate", IMEI, "--set",
               f"gateway.data_dir='{tmp_path / 'var'}'"]
        done = await trio.run_process(cli, capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr

        async def revoked() -> bool:
            return await status() == 401

        await wait_until(revoked)  # well within the 300 s the row would otherwise be held
        # Configured again: a new token, accepted; then disabled from another process: 403.
        auth.update(bearer((await configure(client))["device_token"]))
        assert await status() == 200
        cli[4] = "disable"
        done = await trio.run_process(cli, capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr

        async def disabled() -> bool:
            return await status() == 403

        await wait_until(disabled)
