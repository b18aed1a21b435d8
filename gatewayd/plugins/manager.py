"""Plugin discovery and a typed facade over pluggy.

Build it with `build_plugin_manager()` (never at import time). Plugins come from the
`gatewayd.plugins` entry-point group, from modules named on the command line
(`gatewayd -p tests.plugin_everything ...`) and from objects passed by tests.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from ..core.logs import get_logger
from . import hookspecs
from .registries import CommandRegistry, ModelRegistry, SerialRegistry, TaskRegistry, TopicRegistry

if TYPE_CHECKING:
    from quart import Blueprint

    from ..core.devices.registry import Device
    from .context import PluginContext

__all__ = ["PluginManager", "PluginInfo", "PluginLoadError", "build_plugin_manager", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "gatewayd.plugins"
log = get_logger("gatewayd.plugins")


class PluginLoadError(Exception):
    """A plugin declares something that is not a hook (a misspelling, usually)."""


@dataclass
class PluginInfo:
    name: str
    version: str
    source: str
    load_error: str | None = None


def _hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("gatewayd_")]


def _check_names(name: str, plugin: object) -> None:
    known = _hook_names()
    for attr in dir(plugin):
        if attr.startswith("gatewayd_") and attr not in known and callable(getattr(plugin, attr)):
            hint = difflib.get_close_matches(attr, known, n=1)
            raise PluginLoadError(
                f"plugin {name!r}: {attr} is not a gatewayd hook"
                + (f" (did you mean {hint[0]}?)" if hint else "")
            )


async def await_me_maybe(value: Any) -> Any:
    """Await `value` if a hook returned an awaitable (async impls are allowed)."""
    if inspect.isawaitable(value):
        return await value
    return value


class PluginManager:
    """One method per hook, each calling one named plugin's implementation."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._callers: dict[tuple[str, str], pluggy.HookCaller] = {}

    def register(self, plugin: object, name: str, *, version: str = "", source: str = "") -> None:
        _check_names(name, plugin)
        self.pm.register(plugin, name=name)
        self._callers.clear()  # the per-plugin subsets are made from who is registered
        self.infos[name] = PluginInfo(name, version or getattr(plugin, "__version__", "") or "0", source)

    def record_failure(self, name: str, version: str, source: str, error: str) -> None:
        """A plugin that could not even be imported is listed (failed), not fatal."""
        self.infos[name] = PluginInfo(name, version, source, load_error=error)

    @property
    def names(self) -> list[str]:
        """Every known plugin, loaded or not, in registration order."""
        return list(self.infos)

    def is_loaded(self, name: str) -> bool:
        return self.pm.get_plugin(name) is not None

    def block(self, name: str) -> None:
        """Disable a plugin (config `enabled = false`): none of its hooks are called."""
        if self.pm.get_plugin(name) is not None:
            self.pm.set_blocked(name)
            self._callers.clear()

    def _hook(self, name: str, hook: str) -> pluggy.HookCaller:
        """Plugin `name`'s part of `hook`: pluggy's own caller, with every other plugin
        removed, so tryfirst/trylast, wrappers and firstresult work as pluggy says."""
        caller = self._callers.get((name, hook))
        if caller is None:
            others = [plugin for other, plugin in self.pm.list_name_plugin() if other != name]
            caller = self.pm.subset_hook_caller(hook, remove_plugins=others)
            self._callers[(name, hook)] = caller
        return caller

    def implements(self, name: str, hook: str) -> bool:
        return any(i.plugin_name == name for i in getattr(self.pm.hook, hook).get_hookimpls())

    # -- one method per hook -------------------------------------------------------

    def config_schema(self, name: str) -> type | None:
        schema: type | None = self._hook(name, "gatewayd_config_schema")()
        return schema

    def config_schemas(self) -> dict[str, type | None]:
        return {n: self.config_schema(n) if self.is_loaded(n) else None for n in self.names}

    def storage_models(self, name: str) -> ModelRegistry:
        registry = ModelRegistry(name)
        self._hook(name, "gatewayd_storage_models")(models=registry)
        return registry

    def setup(self, name: str, ctx: PluginContext[Any, Any]) -> Any:
        return self._hook(name, "gatewayd_setup")(ctx=ctx)

    def http_routes(self, name: str, ctx: PluginContext[Any, Any]) -> Blueprint | None:
        blueprint: Blueprint | None = self._hook(name, "gatewayd_http_routes")(ctx=ctx)
        return blueprint

    def mqtt_topics(self, name: str, ctx: PluginContext[Any, Any]) -> TopicRegistry:
        registry = TopicRegistry(name)
        self._hook(name, "gatewayd_mqtt_topics")(topics=registry, ctx=ctx)
        return registry

    def serial_links(self, name: str, ctx: PluginContext[Any, Any]) -> SerialRegistry:
        registry = SerialRegistry(name)
        self._hook(name, "gatewayd_serial_links")(links=registry, ctx=ctx)
        return registry

    async def startup(self, name: str, ctx: PluginContext[Any, Any]) -> None:
        for result in self._hook(name, "gatewayd_startup")(ctx=ctx):
            await await_me_maybe(result)

    def background_tasks(self, name: str, ctx: PluginContext[Any, Any]) -> TaskRegistry:
        registry = TaskRegistry()
        self._hook(name, "gatewayd_background_tasks")(tasks=registry, ctx=ctx)
        return registry

    async def shutdown(self, name: str, ctx: PluginContext[Any, Any]) -> None:
        for result in self._hook(name, "gatewayd_shutdown")(ctx=ctx):
            await await_me_maybe(result)

    def alert_rules(self, name: str, ctx: PluginContext[Any, Any]) -> list[dict[str, Any]]:
        rules: list[dict[str, Any]] = []
        for result in self._hook(name, "gatewayd_alert_rules")(ctx=ctx):
            rules += list(result or [])
        return rules

    async def device_health(self, name: str, ctx: PluginContext[Any, Any], device: Device) -> Any:
        """The first answer of the plugin's gatewayd_device_health that is not None, or None."""
        for result in self._hook(name, "gatewayd_device_health")(ctx=ctx, device=device):
            answer = await await_me_maybe(result)
            if answer is not None:
                return answer
        return None

    async def device_telemetry(self, name: str, ctx: PluginContext[Any, Any], device: Device,
                               limit: int) -> list[Any]:
        readings: list[Any] = []
        for result in self._hook(name, "gatewayd_device_telemetry")(ctx=ctx, device=device, limit=limit):
            readings += list(await await_me_maybe(result) or [])
        return readings

    def check_command(self, name: str, payload: Any) -> Any:
        """The payload plugin `name` stores for a command of its family (ValueError: refused)."""
        checked = self._hook(name, "gatewayd_check_command")(payload=payload)
        return payload if checked is None else checked

    def dashboard_panels(self, name: str, ctx: PluginContext[Any, Any]) -> list[Any]:
        panels: list[Any] = []
        for result in self._hook(name, "gatewayd_dashboard_panels")(ctx=ctx):
            panels += list(result or [])
        return panels

    def cli_commands(self, name: str) -> CommandRegistry:
        registry = CommandRegistry(name)
        self._hook(name, "gatewayd_cli_commands")(commands=registry)
        return registry


def build_plugin_manager(
    *,
    entry_points: bool = True,
    modules: Iterable[str] = (),
    plugins: Iterable[tuple[str, object]] = (),
) -> PluginManager:
    """Discover and register plugins, then check every hook implementation.

    A plugin that fails to import is recorded (shown failed) and the rest load. A
    misspelled hook is an error (PluginLoadError / pluggy's PluginValidationError).
    """
    manager = PluginManager()
    if entry_points:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            version = ep.dist.version if ep.dist else ""
            try:
                plugin = ep.load()
            except Exception as e:
                log.error("plugin failed to load", plugin=ep.name, error=repr(e))
                manager.record_failure(ep.name, version, ep.value, f"import failed: {e!r}")
                continue
            manager.register(plugin, ep.name, version=version, source=ep.value)
    for module_name in modules:
        module = importlib.import_module(module_name)
        name = getattr(module, "PLUGIN_NAME", module_name.rpartition(".")[2])
        manager.register(module, name, source=module_name)
    for name, plugin in plugins:
        manager.register(plugin, name, source=repr(plugin))
    manager.pm.check_pending()
    return manager
