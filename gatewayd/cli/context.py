"""What every command shares: the common options, loading the config, opening the database."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from ..core.config import Config, load_config
from ..core.devices.commands import FamilyCommands
from ..core.devices.services import DeviceServices, FamilyDevices
from ..core.metrics import Metrics
from ..core.storage import Storage
from ..plugins.manager import PluginManager

__all__ = ["DEFAULT_CONFIG", "CliContext", "add_common_options", "config_path", "load"]

DEFAULT_CONFIG = "gatewayd.toml"

T = TypeVar("T")


class CliContext:
    """What a plugin command gets besides its arguments: the config, the database."""

    def __init__(self, args: argparse.Namespace, manager: PluginManager):
        self._args = args
        self._manager = manager
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load(self._args, self._manager)
        return self._config

    def open_storage(self) -> Storage:
        """Open the gateway database (also while the daemon runs: WAL allows it)."""
        storage = Storage(self.config.data_dir / "gatewayd.sqlite3", synchronous=self.config.storage.synchronous)
        storage.open()
        return storage

    def with_devices(self, family: str, fn: Callable[[FamilyDevices, FamilyCommands], Awaitable[T]]) -> T:
        """`await fn(devices, commands)` in a trio run of its own: the family's devices and
        command queue, the same services as a plugin's `ctx.devices` and `ctx.commands`
        (commands checked by the family's `gatewayd_check_command`), on the gateway
        database (also while the daemon runs). Returns what `fn` returns."""
        storage = self.open_storage()
        try:
            def check_command(name: str, payload: Any) -> Any:
                return self._manager.check_command(name, payload)

            services = DeviceServices(self.config, storage, Metrics(), check_command=check_command)
            services.install()
            fields = services.context_fields(family)
            return trio.run(fn, fields["devices"], fields["commands"])
        finally:
            storage.close()


def add_common_options(parser: argparse.ArgumentParser, *, sub: bool) -> None:
    # On subcommands the defaults are suppressed so they don't overwrite what was given
    # before the subcommand name (`gatewayd --config x run` and `gatewayd run --config x`).
    default = argparse.SUPPRESS if sub else None
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "-c", "--config", metavar="PATH", default=default,
        help=f"configuration file (default: ./{DEFAULT_CONFIG} if it exists, else built-in defaults)",
    )
    group.add_argument(
        "--set", metavar="KEY=VALUE", action="append", dest="set_sub" if sub else "set", default=default,
        help="override one key, e.g. --set http.listen=0.0.0.0:8080 (repeatable; value parsed as TOML)",
    )
    group.add_argument(
        "-p", "--plugin", metavar="MODULE", action="append", dest="plugin_sub" if sub else "plugin",
        default=default, help="also load a plugin from a Python module (development)",
    )


def config_path(args: argparse.Namespace) -> Path | None:
    if args.config:
        return Path(args.config)
    return Path(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).exists() else None


def load(args: argparse.Namespace, manager: PluginManager) -> Config:
    return load_config(config_path(args), args.set or [], manager.config_schemas())
