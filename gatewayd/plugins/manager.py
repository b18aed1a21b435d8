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
from typing import Any

import pluggy

from ..core.logs import get_logger
from ..core.mqtt.service import TopicRegistry
from . import hookspecs
from .api import CommandRegistry, ModelRegistry, SerialRegistry, TaskRegistry

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

    def register(self, plugin: object, name: str, *, version: str = "", source: str = "") -> None:
        _check_names(name, plugin)
        self.pm.register(plugin, name=name)
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

    def _call(self, name: str, hook: str, **kwargs: Any) -> Any:
        """Call plugin `name`'s implementation of `hook` (None if it has none)."""
        result = None
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin_name == name:
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
        return result

    def implements(self, name: str, hook: str) -> bool:
        return any(i.plugin_name == name for i in getattr(self.pm.hook, hook).get_hookimpls())

    # -- one method per hook -------------------------------------------------------

    def config_schema(self, name: str) -> type | None:
        return self._call(name, "gatewayd_config_schema")

    def config_schemas(self) -> dict[str, type | None]:
        return {n: self.config_schema(n) if self.is_loaded(n) else None for n in self.names}

    def storage_models(self, name: str) -> ModelRegistry:
        registry = ModelRegistry(name)
        self._call(name, "gatewayd_storage_models", models=registry)
        return registry

    def http_routes(self, name: str, ctx: Any) -> Any:
        return self._call(name, "gatewayd_http_routes", ctx=ctx)

    def mqtt_topics(self, name: str, ctx: Any) -> TopicRegistry:
        registry = TopicRegistry(name)
        self._call(name, "gatewayd_mqtt_topics", topics=registry, ctx=ctx)
        return registry

    def serial_links(self, name: str, ctx: Any) -> SerialRegistry:
        registry = SerialRegistry(name)
        self._call(name, "gatewayd_serial_links", links=registry, ctx=ctx)
        return registry

    async def startup(self, name: str, ctx: Any) -> None:
        await await_me_maybe(self._call(name, "gatewayd_startup", ctx=ctx))

    def background_tasks(self, name: str, ctx: Any) -> TaskRegistry:
        registry = TaskRegistry()
        self._call(name, "gatewayd_background_tasks", tasks=registry, ctx=ctx)
        return registry

    async def shutdown(self, name: str, ctx: Any) -> None:
        await await_me_maybe(self._call(name, "gatewayd_shutdown", ctx=ctx))

    def alert_rules(self, name: str, ctx: Any) -> list[dict[str, Any]]:
        return list(self._call(name, "gatewayd_alert_rules", ctx=ctx) or [])

    def cli_commands(self, name: str) -> CommandRegistry:
        registry = CommandRegistry(name)
        self._call(name, "gatewayd_cli_commands", commands=registry)
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
