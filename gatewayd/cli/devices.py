"""`gatewayd devices ...`: provision, list, show, disable, rotate, command, claim codes.

These open the gateway database directly (safe while the daemon runs: WAL, and the
writer waits on SQLite's busy timeout). A running daemon notices new or changed MQTT
credentials within `devices.presence_flush_s` and updates its managed broker.
Secrets are printed once, here, and stored only as hashes or encrypted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from ..core.devices.registry import STATUSES, ClaimError, Device, DeviceExists, UnknownDevice
from ..core.devices.services import DeviceServices
from ..core.metrics import Metrics
from ..core.storage import Storage
from ..protocol.strict_json import BadJSON, parse_json
from .context import add_common_options, load

if TYPE_CHECKING:
    from ..core.config import Config
    from ..plugins.manager import PluginManager

__all__ = ["setup_devices", "cmd_devices"]


class CliError(Exception):
    """Printed as `gatewayd: <message>`, exit status 1."""


def _with_services(config: Config, fn: Callable[[DeviceServices], Awaitable[Any]],
                   check_command: Callable[[str, Any], Any] | None = None) -> Any:
    storage = Storage(config.data_dir / "gatewayd.sqlite3", synchronous=config.storage.synchronous)
    storage.open()
    try:
        services = DeviceServices(config, storage, Metrics(), check_command=check_command)
        services.install()
        return trio.run(fn, services)
    finally:
        storage.close()


async def _one(services: DeviceServices, device_id: str, family: str | None) -> Device:
    found = await services.registry.find(device_id, family)
    if not found:
        raise CliError(f"no device {device_id!r}" + (f" in family {family!r}" if family else ""))
    if len(found) > 1:
        raise CliError(f"device id {device_id!r} exists in several families "
                       f"({', '.join(d.family for d in found)}); add --family")
    return found[0]


def _family(args: argparse.Namespace) -> str:
    """--family, if a plugin of that name is enabled (a device of no plugin can't talk)."""
    if args.family not in args.enabled_families:
        raise CliError(f"--family: no enabled plugin {args.family!r} "
                       f"(enabled: {', '.join(args.enabled_families) or 'none'})")
    return args.family


def _json_arg(option: str, text: str) -> Any:
    """A JSON argument, parsed as strictly as the admin API parses bodies."""
    try:
        return parse_json(text)
    except BadJSON as e:
        raise CliError(f"{option} is not valid JSON: {e}") from None


def _env_secret(name: str | None) -> str | None:
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise CliError(f"environment variable {name} is not set")
    return value


def _print_device(d: Device) -> None:
    print(f"family      {d.family}\nid          {d.id}\nstatus      {d.status}\nname        {d.name or '-'}")
    print(f"model       {d.model or '-'}\nfirmware    {d.firmware or '-'}")
    print(f"first seen  {_when(d.first_seen)}\nlast seen   {_when(d.last_seen)}")
    if d.metadata:
        print(f"metadata    {json.dumps(d.metadata)}")


def _when(ts: float | None) -> str:
    import time

    return "never" if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _print_credentials(creds: dict[str, str]) -> None:
    print("credentials (shown once; the gateway keeps only hashes / encrypted copies):")
    print(f"  key             {creds['key']}")
    print(f"  signing_secret  {creds['signing_secret']}")
    print(f"  mqtt_username   {creds['mqtt_username']}")


# -- the subcommands ---------------------------------------------------------------


async def _add(args: argparse.Namespace, s: DeviceServices) -> int:
    metadata = _json_arg("--metadata", args.metadata) if args.metadata else {}
    try:
        device, creds = await s.registry.provision(
            _family(args), args.id, name=args.name, model=args.model, firmware=args.firmware, metadata=metadata,
            key=_env_secret(args.key_env), signing_secret=_env_secret(args.signing_secret_env),
        )
    except (DeviceExists, ValueError) as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps({"device": device.as_json(), "credentials": creds.as_json()}, indent=2))
    else:
        print(f"device {device.family}/{device.id} provisioned")
        _print_credentials(creds.as_json())
    return 0


async def _list(args: argparse.Namespace, s: DeviceServices) -> int:
    devices = await s.registry.list(args.family, status=args.status)
    if args.json:
        print(json.dumps({"devices": [d.as_json() for d in devices]}, indent=2))
        return 0
    if not devices:
        print("no devices" + (f" in family {args.family}" if args.family else ""))
        return 0
    print(f"{'FAMILY':<14} {'ID':<28} {'STATUS':<12} {'MODEL':<16} LAST SEEN")
    for d in devices:
        print(f"{d.family:<14} {d.id:<28} {d.status:<12} {d.model or '-':<16} {_when(d.last_seen)}")
    return 0


async def _show(args: argparse.Namespace, s: DeviceServices) -> int:
    device = await _one(s, args.device_id, args.family)
    if args.json:
        print(json.dumps({"device": device.as_json()}, indent=2))
    else:
        _print_device(device)
    return 0


async def _disable(args: argparse.Namespace, s: DeviceServices) -> int:
    device = await _one(s, args.device_id, args.family)
    await s.registry.set_status(device.family, device.id, "disabled")
    print(f"device {device.family}/{device.id} disabled")
    return 0


async def _enable(args: argparse.Namespace, s: DeviceServices) -> int:
    device = await _one(s, args.device_id, args.family)
    await s.registry.set_status(device.family, device.id, "active")
    print(f"device {device.family}/{device.id} enabled")
    return 0


async def _rotate(args: argparse.Namespace, s: DeviceServices) -> int:
    device = await _one(s, args.device_id, args.family)
    try:
        creds = await s.registry.rotate(device.family, device.id, grace_s=args.grace)
    except ValueError as e:
        raise CliError(f"--grace: {e}") from None
    if args.json:
        print(json.dumps({"device": device.as_json(), "credentials": creds.as_json()}, indent=2))
    else:
        when = f"in {args.grace:g} s" if args.grace else "now"
        print(f"device {device.family}/{device.id}: new credentials issued; the old ones stop working {when}")
        _print_credentials(creds.as_json())
    return 0


async def _command(args: argparse.Namespace, s: DeviceServices) -> int:
    payload = _json_arg("the command", args.payload)
    device = await _one(s, args.device_id, args.family)
    try:
        command = await s.commands.enqueue(device.family, device.id, payload, ttl_s=args.ttl, priority=args.priority)
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps({"command": command.as_json()}, indent=2))
    else:
        print(f"command {command.id} queued for {device.family}/{device.id}")
    return 0


async def _claim_code(args: argparse.Namespace, s: DeviceServices) -> int:
    ttl = s.config.devices.claim_code_ttl_s if args.ttl is None else args.ttl
    try:
        code = await s.registry.create_claim_code(_family(args), ttl_s=ttl, device_id=args.device)
    except (UnknownDevice, ClaimError, ValueError) as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps({"claim_code": code.as_json()}, indent=2))
    else:
        target = f"device {args.device}" if args.device else "a new device"
        print(f"claim code {code.code} (family {args.family}, {target}, valid until {_when(code.expires_at)})")
    return 0


def setup_devices(parser: argparse.ArgumentParser) -> None:
    """Add the `devices` subcommands to the `devices` parser."""

    sub = parser.add_subparsers(dest="devices_command", metavar="COMMAND", required=True)

    def command(name: str, help: str, run: Callable, *, device: bool = False, json_flag: bool = True):
        p = sub.add_parser(name, help=help, description=help)
        add_common_options(p, sub=True)
        if device:
            p.add_argument("device_id", metavar="ID", help="the device id")
            p.add_argument("--family", help="the device's family (needed if the id exists in several)")
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(devices_run=run)
        return p

    p = command("add", "provision a device and print its credentials once", _add)
    p.add_argument("--family", required=True, help="the device family (plugin name)")
    p.add_argument("--id", help="the device id (default: generated)")
    p.add_argument("--name", default="")
    p.add_argument("--model", default="")
    p.add_argument("--firmware", default="")
    p.add_argument("--metadata", help="a JSON object")
    p.add_argument("--key-env", metavar="VAR", help="import the key already in the firmware from this env var")
    p.add_argument("--signing-secret-env", metavar="VAR", help="import the signing secret from this env var")
    p = command("list", "list devices", _list)
    p.add_argument("--family")
    p.add_argument("--status", choices=STATUSES)
    command("show", "show one device", _show, device=True)
    command("disable", "refuse a device (403) until enabled", _disable, device=True, json_flag=False)
    command("enable", "accept a disabled device again", _enable, device=True, json_flag=False)
    p = command("rotate", "issue new credentials; the old ones are revoked", _rotate, device=True)
    p.add_argument("--grace", type=float, default=0.0, metavar="S", help="keep the old ones valid for S seconds")
    p = command("command", "queue a command (JSON) for a device", _command, device=True)
    p.add_argument("payload", metavar="JSON", help='the command, e.g. \'{"action": "on"}\'')
    p.add_argument("--ttl", type=float, default=None, metavar="S", help="expire after S seconds")
    p.add_argument("--priority", type=int, default=0, metavar="N", help="higher goes first")
    p = command("claim-code", "make a one-time claim code", _claim_code)
    p.add_argument("--family", required=True)
    p.add_argument("--ttl", type=float, default=None, metavar="S", help="valid for S seconds")
    p.add_argument("--device", metavar="ID", help="the device it claims (default: registers a new one)")


def cmd_devices(args: argparse.Namespace, manager: PluginManager) -> int:
    """Run the chosen `devices` subcommand against the gateway database."""

    config = load(args, manager)
    # As the daemon decides (Gateway.enabled_plugins): installed, loaded and enabled.
    args.enabled_families = [
        n for n in manager.names
        if manager.is_loaded(n) and config.plugins.get(n) is not None and config.plugins[n].enabled
    ]
    def check_command(family: str, payload: Any) -> Any:
        # As the daemon does: the family's plugin checks what is queued for its devices.
        return manager.check_command(family, payload) if family in args.enabled_families else payload

    try:
        return _with_services(config, lambda s: args.devices_run(args, s), check_command)
    except CliError as e:
        print(f"gatewayd: {e}", file=sys.stderr)
        return 1
