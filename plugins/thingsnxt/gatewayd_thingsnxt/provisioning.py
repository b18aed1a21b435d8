"""`gatewayd thingsnxt provision PORT --id ID`: the specification's "provision device via
serial". Writes the device's id, token and API base URL to an ESP32 over its serial
console, through the core's serial link (JSON lines, 115200 baud), and waits for the
device's confirmation:

    gateway -> device   {"cmd": "provision", "device_id": "...", "device_token": "...", "api_base_url": "..."}
    device  -> gateway  {"provisioned": true, "device_id": "...", "api_base_url": "..."}
                        {"provisioned": false, "error": "..."}

Other lines the firmware prints on its console (its log) are skipped. The token comes
from an environment variable (`--token-env`, default THINGSNXT_DEVICE_TOKEN), never the
command line, where `ps` would show it: `gatewayd devices add --family thingsnxt --id ID`
or `POST /thingsnxt/devices` gives it. Exit status 0 once the device confirmed; 1 when
it refused, did not answer, or the port cannot be opened; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import trio

from gatewayd.plugins.api import CommandRegistry, SerialLink, SerialSettings

DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
MAX_FIELD = 256  # what the firmware's preferences keep per key


def add_commands(commands: CommandRegistry) -> None:
    plugin = commands.plugin  # its [plugins.<name>] table and mount: a copy under another name works

    def run_provision(args: argparse.Namespace, cli: Any) -> int:
        return run(args, cli, plugin)

    commands.add("provision", "write a device's id, token and API base URL to an ESP32 over serial", setup,
                 run_provision)


def setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("port", metavar="PORT", help="the ESP32's serial port (/dev/ttyUSB0) or a pyserial URL")
    parser.add_argument("--id", required=True, dest="device_id", help="the device's id (as registered)")
    parser.add_argument("--token-env", default="THINGSNXT_DEVICE_TOKEN", metavar="VAR",
                        help="the environment variable holding its token (default THINGSNXT_DEVICE_TOKEN)")
    parser.add_argument("--api-base-url", default="", metavar="URL",
                        help="default: plugins.<name>.api_base_url, else http.public_url + the mount")
    parser.add_argument("--baudrate", type=int, default=115200, metavar="N")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wait for the device this long")


def run(args: argparse.Namespace, cli: Any, plugin: str) -> int:
    try:
        message = _message(args, cli, plugin)
        settings = SerialSettings(port=args.port, baudrate=args.baudrate, framing="jsonl", max_frame=2048)
        if not 0 < args.timeout <= 600:
            raise ValueError(f"--timeout: expected 0 < seconds <= 600, got {args.timeout}")
    except ValueError as e:
        print(f"{plugin} provision: {e}", file=sys.stderr)
        return 2
    answer, problem = trio.run(_provision, settings, message, args.timeout)
    if problem:
        print(f"{plugin} provision: {problem}", file=sys.stderr)
        return 1
    print(json.dumps({"provisioned": True, "device_id": answer["device_id"], "api_base_url": message["api_base_url"],
                      "port": args.port}))
    return 0


def _message(args: argparse.Namespace, cli: Any, plugin: str) -> dict[str, str]:
    if not DEVICE_ID.fullmatch(args.device_id):
        raise ValueError(f"--id: expected 1-128 of letters, digits and _ . : @ -, got {args.device_id!r}")
    token = os.environ.get(args.token_env, "")
    if not token or len(token) > MAX_FIELD:
        raise ValueError(f"{args.token_env}: expected the device's token in this environment variable "
                         f"(gatewayd devices add --family {plugin} prints it)")
    url = args.api_base_url or _configured_url(cli, plugin)
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url) or len(url) > MAX_FIELD:
        raise ValueError(f"--api-base-url: expected an http:// or https:// URL, got {url!r}")
    return {"cmd": "provision", "device_id": args.device_id, "device_token": token, "api_base_url": url}


def _configured_url(cli: Any, plugin: str) -> str:
    """`plugins.<name>.api_base_url`, else `http.public_url` + the plugin's mount, else ""."""
    settings = cli.config.plugins.get(plugin)
    configured = getattr(getattr(settings, "options", None), "api_base_url", "")
    if configured:
        return str(configured)
    public = str(cli.config.http.public_url or "")
    mount = getattr(settings, "mount", "") or f"/{plugin}"
    return public.rstrip("/") + mount if public else ""


async def _provision(settings: SerialSettings, message: dict[str, str],
                     timeout: float) -> tuple[dict[str, Any], str | None]:
    """(the device's answer, None) or ({}, what went wrong)."""
    link = SerialLink("provision", settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        try:
            with trio.fail_after(timeout):
                await link.wait_open()
                frame = await link.request(json.dumps(message).encode(), match=_is_answer, timeout=timeout)
        except trio.TooSlowError:
            nursery.cancel_scope.cancel()
            if link.state != "open":
                return {}, f"cannot open {settings.port} (is it the ESP32's port? is the gateway using it?)"
            return {}, (f"no answer from the device on {settings.port} within {timeout} s: is it running the "
                        "thingsnxt firmware, in provisioning mode, at the same baud rate?")
        nursery.cancel_scope.cancel()
    answer: dict[str, Any] = json.loads(frame)
    if answer.get("provisioned") is not True:
        return {}, f"the device refused: {str(answer.get('error') or 'no reason given')[:200]}"
    if answer.get("device_id") != message["device_id"]:
        return {}, f"the device confirmed another id: {str(answer.get('device_id'))[:130]!r}"
    return answer, None


def _is_answer(frame: bytes) -> bool:
    try:
        doc = json.loads(frame)
    except ValueError:
        return False  # a log line of the firmware
    return isinstance(doc, dict) and "provisioned" in doc
