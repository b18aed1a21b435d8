"""`gatewayd ...`: run the daemon, check the config, list plugins, back up, and more.

Every command takes `--config PATH` (default ./gatewayd.toml when present) and any
number of `--set dotted.key=value` overrides. Configuration errors exit with status 2
and name the key; `gatewayd run` exits 3 when a schema migration (or the copy before it)
failed, which the service unit does not restart on.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .. import __version__
from ..core.config import ConfigErrors
from ..core.logs import get_logger, setup_logging
from ..core.storage import MigrationError, StorageError, UnusableDatabase, backup_database, unusable_from
from ..plugins.manager import PluginLoadError, PluginManager, build_plugin_manager
from .context import CliContext, add_common_options, config_path, load
from .devices import cmd_devices, setup_devices
from .doctor_options import setup_doctor
from .events import cmd_alerts, cmd_events, setup_alerts, setup_events
from .firmware import cmd_firmware, setup_firmware
from .maintenance import cmd_maintenance, setup_maintenance
from .outbox import cmd_outbox, setup_outbox
from .plugin import cmd_plugin, setup_plugin
from .tls import cmd_tls, setup_tls
from .tokens import cmd_tokens, setup_tokens

#: `gatewayd run`: a schema migration, or the copy of the database before it, failed; or
#: the database is unusable (corrupt, or a newer release's schema).
EXIT_MIGRATION = 3

EPILOG = """\
examples:
  gatewayd run                               start with ./gatewayd.toml
  gatewayd run --set http.listen=0.0.0.0:8080
  gatewayd check-config --config /etc/gatewayd.toml
  gatewayd plugins --json
  gatewayd backup /srv/backups/

docs: README.md, docs/configuration.md, docs/plugins.md
"""


def _print_config_errors(e: ConfigErrors, path: Path | None) -> None:
    where = f" in {path}" if path else ""
    print(f"gatewayd: configuration error{where}:", file=sys.stderr)
    for error in e.errors:
        print(f"  {error}", file=sys.stderr)


# -- commands ----------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace, manager: PluginManager) -> int:
    from .doctor import cmd_doctor as doctor  # imported when asked: its checks are nothing `run` needs

    return doctor(args, manager)


def cmd_run(args: argparse.Namespace, manager: PluginManager) -> int:
    from ..core.runtime import (Gateway, ListenError, find_exception, raise_open_files_limit, run_until_signalled,
                                tune_gc_for)

    config = load(args, manager)
    setup_logging(config.log.level, config.log.format)
    log = get_logger("gatewayd")
    path = config_path(args)
    log.info("starting gatewayd", version=__version__, config=str(path) if path else "built-in defaults",
             data_dir=str(config.data_dir), profile=config.gateway.profile)
    for name, settings in config.plugins.items():
        if not settings.enabled:
            manager.block(name)
    gateway = Gateway(config, manager)
    tune_gc_for(config.gateway.profile)
    before, limit = raise_open_files_limit()
    if limit < 4096:  # the hard limit: ours to read, the administrator's to raise
        log.warning("few open files allowed: raise LimitNOFILE= in the service unit", open_files=limit,
                    mqtt_devices_at_most=max(limit // 2 - 64, 0))
    elif limit != before:
        log.debug("open files limit raised", before=before, after=limit)
    try:
        trio.run(run_until_signalled, gateway)
    except BaseException as e:
        error = (find_exception(e, ListenError) or find_exception(e, MigrationError)
                 or unusable_from(e, config.data_dir / "gatewayd.sqlite3"))
        if error is None:
            raise
        log.error("cannot start", error=str(error))
        print(f"gatewayd: {error}", file=sys.stderr)
        # A migration that failed (or could not be preceded by its copy), a database that
        # is corrupt or a newer release's, fail the same way at every start (a migration
        # taking a copy of the database first each time): the unit does not restart on
        # this status (RestartPreventExitStatus), an operator acts.
        return EXIT_MIGRATION if isinstance(error, (MigrationError, UnusableDatabase)) else 1
    return 0


def cmd_check_config(args: argparse.Namespace, manager: PluginManager) -> int:
    config = load(args, manager)
    path = config_path(args)
    enabled = [n for n, s in config.plugins.items() if s.enabled]
    print(f"configuration ok: {path or 'built-in defaults'}")
    print(f"  gateway.id       {config.gateway.id}")
    print(f"  data_dir         {config.data_dir}")
    print(f"  http.listen      {config.http.listen}")
    print(f"  mqtt.broker      {config.mqtt.broker}")
    print(f"  plugins enabled  {', '.join(enabled) or 'none'}")
    return 0


def cmd_plugins(args: argparse.Namespace, manager: PluginManager) -> int:
    config = load(args, manager)
    rows = []
    for name in manager.names:
        info = manager.infos[name]
        settings = config.plugins.get(name)
        rows.append({
            "name": name,
            "version": info.version,
            "enabled": bool(settings and settings.enabled),
            "state": "failed" if info.load_error else ("enabled" if settings and settings.enabled else "disabled"),
            "reason": info.load_error,
            "mount": settings.mount if settings else None,
            "source": info.source,
        })
    if args.json:
        print(json.dumps({"plugins": rows}, indent=2))
        return 0
    if not rows:
        print("no plugins installed (see docs/plugins.md)")
        return 0
    print(f"{'NAME':<14} {'VERSION':<10} {'ENABLED':<8} {'STATE':<9} MOUNT")
    for r in rows:
        print(f"{r['name']:<14} {r['version']:<10} {str(r['enabled']).lower():<8} {r['state']:<9} {r['mount'] or '-'}"
              + (f"  ({r['reason']})" if r["reason"] else ""))
    return 0


def cmd_backup(args: argparse.Namespace, manager: PluginManager) -> int:
    config = load(args, manager)
    source = config.data_dir / "gatewayd.sqlite3"
    if Path(args.dest).exists() and not Path(args.dest).is_dir():
        # Not over a file: it could be the master key, or the live database itself.
        print(f"gatewayd: backup refused: {args.dest} exists already (give a new file or a folder)", file=sys.stderr)
        return 1
    try:
        dest = backup_database(source, args.dest)
    except (StorageError, OSError) as e:
        print(f"gatewayd: backup failed: {e}", file=sys.stderr)
        return 1
    print(f"backup written: {dest} (integrity_check ok)")
    return 0


def _receive_arguments(parser: argparse.ArgumentParser) -> None:
    from .receive import add_receive_arguments

    add_receive_arguments(parser)


def _cmd_receive(args: argparse.Namespace, manager: PluginManager) -> int:
    import logging

    from ..core.runtime import tune_gc
    from .receive import run_receive

    tune_gc()  # a long-running server too, like `run`
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_receive(args)


def setup_serial(parser: argparse.ArgumentParser) -> None:
    from ..core.serial.probe import add_probe_arguments

    sub = parser.add_subparsers(dest="serial_command", metavar="COMMAND", required=True)
    probe = sub.add_parser(
        "probe", help="open a serial line and print every decoded frame (and framing errors)",
        description="The first thing to run when a device 'doesn't talk': prints each frame as it "
        "arrives; exit 0 after --count frames, 1 on timeout with a hint, 2 if the port can't be opened.",
    )
    add_probe_arguments(probe)


def cmd_serial(args: argparse.Namespace, manager: PluginManager) -> int:
    from ..core.serial.probe import run_probe

    return run_probe(args)


CORE_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]] = [
    ("run", "run the gateway daemon (SIGTERM/SIGINT stop it gracefully)", lambda p: None, cmd_run),
    ("check-config", "validate the configuration and exit (status 2 on errors)", lambda p: None, cmd_check_config),
    ("plugins", "list installed plugins: name, version, enabled, state",
     lambda p: p.add_argument("--json", action="store_true", help="machine-readable output"), cmd_plugins),
    ("backup", "write a consistent copy of the database (safe while the daemon runs)",
     lambda p: p.add_argument("dest", metavar="DEST", help="a file path, or a folder for a timestamped file"),
     cmd_backup),
    ("doctor", "check this box: config, ports, disk, mosquitto, clock, master key, TLS, upstream, serial "
     "(exit 1 on a real problem)", setup_doctor, cmd_doctor),
    ("serial", "serial-line tools for installers: serial probe URL [--framing jsonl|slip|cobs|length]",
     setup_serial, cmd_serial),
    ("devices", "provision and manage devices: add, list, show, disable, rotate, command, claim-code",
     setup_devices, cmd_devices),
    ("events", "list stored events: events list [--family F] [--device D] [--type T] [--since ISO]",
     setup_events, cmd_events),
    ("alerts", "list alert notifications and their delivery state: alerts list [--state S]",
     setup_alerts, cmd_alerts),
    ("firmware", "the OTA firmware store: add, list, rollout, verify, keygen, site-key", setup_firmware,
     cmd_firmware),
    ("outbox", "the upstream outbox: status [--json], dead-letters [--json], retry-dead [--id N], forget-sink NAME",
     setup_outbox, cmd_outbox),
    ("maintenance", "maintenance mode: on [--reason TEXT] [--retry-after S], off, status (devices are told to come back)",
     setup_maintenance, cmd_maintenance),
    ("tokens", "scoped read-only API tokens for apps: add NAME --scope live:<family> [--ttl 30d], list, revoke NAME",
     setup_tokens, cmd_tokens),
    ("tls", "TLS on the LAN: tls init (site CA + server certificate), tls show, tls client NAME --out DIR",
     setup_tls, cmd_tls),
    ("receive", "run the reference upstream receiver (docs/upstream-protocol.md), or --export what it stored",
     _receive_arguments, _cmd_receive),
    ("plugin", "write a new plugin: plugin new NAME [--http] [--mqtt] [--serial]", setup_plugin, cmd_plugin),
]


def _plugin_runner(run: Callable[..., Any]) -> Callable[[argparse.Namespace, PluginManager], int]:
    wants_cli = len(inspect.signature(run).parameters) >= 2

    def runner(args: argparse.Namespace, manager: PluginManager) -> int:
        result = run(args, CliContext(args, manager)) if wants_cli else run(args)
        return int(result or 0)

    return runner


def build_parser(manager: PluginManager, wanted: set[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; plugin subcommands only for the plugins in `wanted`.

    A plugin's commands are built only when its name is on the command line, so
    `gatewayd run` never imports what a plugin needs only for its commands (numpy and
    scipy for kaiabc: seconds of start-up and tens of MB).
    """
    parser = argparse.ArgumentParser(
        prog="gatewayd",
        description="gatewayd: the site gateway. Devices talk to it over HTTP, MQTT and serial; "
        "it stores everything durably and forwards it upstream.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    add_common_options(parser, sub=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help, setup, fn in CORE_COMMANDS:
        sub = commands.add_parser(name, help=help, description=help)
        add_common_options(sub, sub=True)
        setup(sub)
        sub.set_defaults(handler=fn)
    for plugin in manager.names:
        if not manager.is_loaded(plugin) or not manager.implements(plugin, "gatewayd_cli_commands"):
            continue
        group = commands.add_parser(plugin, help=f"commands of the {plugin} plugin")
        group_sub = group.add_subparsers(dest="plugin_command", metavar="COMMAND", required=True)
        if wanted is not None and plugin not in wanted:
            continue
        try:
            registry = manager.cli_commands(plugin)
        except Exception as e:  # one broken plugin must not take the whole CLI down
            print(f"gatewayd: plugin {plugin!r}: its commands are unavailable: {e!r}", file=sys.stderr)
            continue
        for command in registry.commands:
            sub = group_sub.add_parser(command.name, help=command.help, description=command.help)
            add_common_options(sub, sub=True)
            command.setup(sub)
            sub.set_defaults(handler=_plugin_runner(command.run))
    return parser


def _merge(args: argparse.Namespace) -> None:
    args.set = (args.set or []) + (getattr(args, "set_sub", None) or [])
    args.plugin = (args.plugin or []) + (getattr(args, "plugin_sub", None) or [])


def _preparse_plugins(argv: list[str]) -> list[str]:
    """`-p MODULE` must be known before the parser is built (it may add commands)."""
    modules = []
    for i, arg in enumerate(argv):
        if arg in ("-p", "--plugin") and i + 1 < len(argv):
            modules.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            modules.append(arg.split("=", 1)[1])
    return modules


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    modules = _preparse_plugins(argv)
    if modules and "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # `-p tests.my_plugin` from the project folder, as python -m does
    try:
        manager = build_plugin_manager(modules=modules)
    except (PluginLoadError, ImportError) as e:
        print(f"gatewayd: plugin error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # pluggy's PluginValidationError: a misspelled hook
        print(f"gatewayd: plugin error: {e}", file=sys.stderr)
        return 2
    parser = build_parser(manager, wanted=set(argv) & set(manager.names))
    args = parser.parse_args(argv)
    _merge(args)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args, manager)
    except ConfigErrors as e:
        _print_config_errors(e, config_path(args))
        return 2


if __name__ == "__main__":
    sys.exit(main())
