"""`gatewayd streetlight config ID [--brightness N] [--schedule ...] [--auto-dimming on|off]`:
an operator's config for one light, over the site's `[plugins.streetlight.light]`.

The overrides are kept in the light's metadata (`config`), where configure reads them;
the light applies brightness and schedule at once, by the commands this queues
(`brightness_control`, `schedule_update`, as an operator would), and the rest at its next
configure. `--reset` drops the light's overrides (the site's config again), `--no-command`
only stores. Without options it shows the light's config. Works while the daemon runs.
Exit status 0 when done, 1 for a light the gateway does not know, 2 for a bad option
(its message names it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from gatewayd.plugins.api import CommandRegistry

from .config import LightDefaults, StreetlightConfig

CLOCK = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?")
SCHEDULE_KEYS = ("schedule_enabled", "sunrise_time", "sunset_time")


def add_commands(commands: CommandRegistry) -> None:
    plugin = commands.plugin  # its [plugins.<name>] table and family: a copy under another name works

    def run_config(args: argparse.Namespace, cli: Any) -> int:
        return run(args, cli, plugin)

    commands.add("config", "show or change one light's config (over the site's defaults) and send it to the light",
                 setup, run_config)


def setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device_id", metavar="ID", help="the light's device id (IMEI:351234567890123)")
    parser.add_argument("--brightness", metavar="N", help="brightness_level, percent 0-100")
    parser.add_argument("--schedule", metavar="ON-OFF",
                        help="lamp on at ON, off at OFF (site time, 18:30-06:00 or 18:30:00-06:00:00); "
                             "or 'off' (no schedule), 'on' (the schedule's times as they are)")
    parser.add_argument("--auto-dimming", metavar="on|off", help="auto_dimming (applied at the next configure)")
    parser.add_argument("--reset", action="store_true", help="drop this light's overrides: the site's config")
    parser.add_argument("--no-command", action="store_true",
                        help="only store: the light gets its config at its next configure")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options as config keys; ValueError naming the option."""
    out: dict[str, Any] = {}
    if args.brightness is not None:
        text = args.brightness.strip()
        if not (text.isdigit() and 0 <= int(text) <= 100):
            raise ValueError(f"--brightness: expected an integer 0-100, got {args.brightness!r}")
        out["brightness_level"] = int(text)
    if args.schedule is not None:
        out.update(_schedule(args.schedule.strip()))
    if args.auto_dimming is not None:
        if args.auto_dimming not in ("on", "off"):
            raise ValueError(f"--auto-dimming: expected on or off, got {args.auto_dimming!r}")
        out["auto_dimming"] = args.auto_dimming == "on"
    if args.reset and out:
        raise ValueError(f"--reset: drops every override; give it alone, not with --{_option(next(iter(out)))}")
    return out


def _schedule(text: str) -> dict[str, Any]:
    if text in ("on", "off"):
        return {"schedule_enabled": text == "on"}
    on, sep, off = text.partition("-")
    times = [CLOCK.fullmatch(t.strip()) for t in (on, off)]
    if not sep or not all(times):
        raise ValueError(f"--schedule: expected ON-OFF times such as 18:30-06:00, or on / off, got {text!r}")
    sunset, sunrise = (f"{int(m[1]):02d}:{m[2]}:{m[3] or '00'}" for m in times if m)
    if sunset == sunrise:
        raise ValueError(f"--schedule: the lamp cannot go on and off at the same time ({sunset})")
    return {"schedule_enabled": True, "sunset_time": sunset, "sunrise_time": sunrise}


def _option(key: str) -> str:
    return {"brightness_level": "brightness", "auto_dimming": "auto-dimming"}.get(key, "schedule")


def light_commands(keys: set[str], config: dict[str, Any]) -> list[dict[str, Any]]:
    """What the light applies at once, in the specification's command shapes."""
    out: list[dict[str, Any]] = []
    if "brightness_level" in keys:
        out.append({"command_type": "brightness_control", "brightness_level": config["brightness_level"]})
    if keys & set(SCHEDULE_KEYS):
        out.append({"command_type": "schedule_update", "schedule": {
            "enabled": config["schedule_enabled"], "sunrise_time": config["sunrise_time"],
            "sunset_time": config["sunset_time"]}})
    return out


def run(args: argparse.Namespace, cli: Any, plugin: str) -> int:
    try:
        changes = overrides(args)
    except ValueError as e:
        print(f"{plugin} config: {e}", file=sys.stderr)
        return 2
    options = getattr(cli.config.plugins.get(plugin), "options", None)
    site = options.light if isinstance(options, StreetlightConfig) else LightDefaults()

    async def apply(devices: Any, commands: Any) -> dict[str, Any] | str:
        device = await devices.get(args.device_id)
        if device is None:
            return (f"no light {args.device_id!r} on this gateway (gatewayd devices add --family {plugin} "
                    f"--id {args.device_id})")
        old = device.metadata.get("config")
        old = old if isinstance(old, dict) else {}
        new = {} if args.reset else {**old, **changes}
        if new != old:
            await devices.update(device.id, metadata={"config": new})
        config, ignored = site.merged(new)
        changed = set(old if args.reset else changes)
        queued = [] if args.no_command else [await commands.enqueue(device.id, payload)
                                            for payload in light_commands(changed, config)]
        return {"device_id": device.id, "light_id": device.metadata.get("light_id"), "overrides": new,
                "ignored": ignored, "config": config,
                "commands": [{"command_id": c.id, **c.payload} for c in queued]}

    try:
        done = cli.with_devices(plugin, apply)
    except ValueError as e:  # the registry's own checks (metadata too large)
        print(f"{plugin} config: {e}", file=sys.stderr)
        return 1
    if isinstance(done, str):
        print(f"{plugin} config: {done}", file=sys.stderr)
        return 1
    print(json.dumps(done, indent=2) if args.json else _text(done))
    return 0


def _text(done: dict[str, Any]) -> str:
    lines = [f"light {done['device_id']}" + (f" ({done['light_id']})" if done["light_id"] else " (not configured yet)")]
    for key, value in done["config"].items():
        origin = "ignored override: " + done["ignored"][key] if key in done["ignored"] else \
            "this light's" if key in done["overrides"] else "site default"
        lines.append(f"  {key:<17} {json.dumps(value):<11} {origin}")
    for c in done["commands"]:
        lines.append(f"queued {c['command_type']} {c['command_id']}")
    if done["commands"]:
        lines.append("the light applies them at its next poll (over MQTT: once it next reports its status), the rest at its next configure")
    return "\n".join(lines)
