"""gatewayd.toml -> typed, validated config, with `--set dotted.key=value` overrides.

Every key has a default, so an empty file is a working gateway. Secrets never live in
the file: keys ending in `_env` name an environment variable that holds the secret.
"""

from __future__ import annotations

import os
import socket
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .schema import Address, ConfigError, ConfigErrors, load_section

__all__ = [
    "Config",
    "ConfigError",
    "ConfigErrors",
    "PluginSettings",
    "apply_override",
    "load_config",
    "read_secret",
]


@dataclass
class GatewaySection:
    id: str = field(default_factory=socket.gethostname)
    data_dir: str = "var"
    shutdown_grace_s: float = 3.0

    def validate(self) -> None:
        if not self.id or any(c in self.id for c in "/#+ "):
            raise ConfigError("id", f"expected a non-empty name without '/', '#', '+' or spaces, got {self.id!r}")
        if self.shutdown_grace_s < 0:
            raise ConfigError("shutdown_grace_s", "must be >= 0")


@dataclass
class LogSection:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["kv", "json"] = "kv"


@dataclass
class HttpSection:
    listen: Address = field(default_factory=lambda: Address("127.0.0.1", 8080))
    max_body_bytes: int = 8 * 1024 * 1024
    admin_token_env: str = "GATEWAYD_ADMIN_TOKEN"
    access_log: bool = True

    def validate(self) -> None:
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes", f"must be at least 1024, got {self.max_body_bytes}")


@dataclass
class StorageSection:
    synchronous: Literal["normal", "full"] = "normal"
    group_commit_ms: float = 1.0
    group_commit_max: int = 1000
    readers: int = 4

    def validate(self) -> None:
        if not 0 <= self.group_commit_ms <= 100:
            raise ConfigError("group_commit_ms", f"must be between 0 and 100, got {self.group_commit_ms}")
        if self.group_commit_max < 1:
            raise ConfigError("group_commit_max", "must be >= 1")
        if self.readers < 1:
            raise ConfigError("readers", "must be >= 1")


@dataclass
class MqttSection:
    broker: Literal["managed", "external", "off"] = "managed"
    listen: Address = field(default_factory=lambda: Address("127.0.0.1", 1883))
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password_env: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    client_id: str = ""
    keepalive_s: int = 30
    mosquitto: str = "mosquitto"


@dataclass
class PluginSettings:
    """The keys every `[plugins.<name>]` table has, plus the plugin's own `options`."""

    name: str
    enabled: bool = True
    mount: str = ""
    listen: Address | None = None
    options: Any = None


@dataclass
class Config:
    gateway: GatewaySection = field(default_factory=GatewaySection)
    log: LogSection = field(default_factory=LogSection)
    http: HttpSection = field(default_factory=HttpSection)
    storage: StorageSection = field(default_factory=StorageSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    plugins: dict[str, PluginSettings] = field(default_factory=dict)
    source: Path | None = None

    @property
    def data_dir(self) -> Path:
        """`gateway.data_dir`, relative paths taken from the config file's folder."""
        path = Path(self.gateway.data_dir)
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path


_SECTIONS = {k: v for k, v in typing.get_type_hints(Config).items() if k not in ("plugins", "source")}


def read_secret(env_name: str) -> str | None:
    """The secret held by the environment variable an `*_env` key names, or None."""
    if not env_name:
        return None
    value = os.environ.get(env_name)
    return value or None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: take it as a string, as a shell user means it


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set dotted.key=value` to the raw TOML dict (value parsed as TOML)."""
    key, sep, value = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", f"expected dotted.key=value, got {assignment!r}")
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a table; cannot set a key under it")
        node = child
    node[parts[-1]] = _parse_value(value.strip())


def _load_plugins(raw: Any, schemas: dict[str, type | None]) -> dict[str, PluginSettings]:
    if not isinstance(raw, dict):
        raise ConfigErrors([ConfigError("plugins", "expected a table of [plugins.<name>] tables")])
    errors: list[ConfigError] = []
    out: dict[str, PluginSettings] = {}
    for name in list(raw) + [n for n in schemas if n not in raw]:
        table = raw.get(name, {})
        key = f"plugins.{name}"
        if name not in schemas:
            import difflib

            hint = difflib.get_close_matches(name, list(schemas), n=1)
            installed = ", ".join(sorted(schemas)) or "none"
            reason = f"no plugin named {name!r} is installed"
            reason += f" (did you mean {hint[0]!r}?)" if hint else f" (installed: {installed})"
            errors.append(ConfigError(key, reason))
            continue
        if not isinstance(table, dict):
            errors.append(ConfigError(key, "expected a table"))
            continue
        common = {k: table[k] for k in ("enabled", "mount", "listen") if k in table}
        rest = {k: v for k, v in table.items() if k not in common}
        try:
            settings = load_section(PluginSettings, {"name": name, **common}, key)
        except ConfigErrors as e:
            errors.extend(ConfigError(x.key, x.reason) for x in e.errors if not x.key.endswith(".name"))
            continue
        settings.mount = settings.mount or f"/{name}"
        if not settings.mount.startswith("/") or (settings.mount.endswith("/") and settings.mount != "/"):
            errors.append(ConfigError(f"{key}.mount", f"expected a path like '/{name}', got {settings.mount!r}"))
        schema = schemas[name]
        if schema is None:
            if rest:
                errors.extend(ConfigError(f"{key}.{k}", "unknown key (this plugin has no options)") for k in rest)
        else:
            try:
                settings.options = load_section(schema, rest, key)
            except ConfigErrors as e:
                errors.extend(e.errors)
        out[name] = settings
    if errors:
        raise ConfigErrors(errors)
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] = (),
    plugin_schemas: dict[str, type | None] | None = None,
    *,
    text: str | None = None,
) -> Config:
    """Read, override and validate the configuration.

    `plugin_schemas` maps each installed plugin name to its options dataclass (or None);
    a `[plugins.<name>]` table for a plugin that is not installed is an error.
    Raises ConfigErrors naming every bad key.
    """
    source = Path(path).resolve() if path is not None else None
    if text is None and source is not None:
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigErrors([ConfigError("", f"cannot read {path}: {e.strerror}")]) from None
    try:
        raw = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as e:
        raise ConfigErrors([ConfigError("", f"{path or 'config'}: invalid TOML: {e}")]) from None
    errors: list[ConfigError] = []
    for assignment in overrides:
        try:
            apply_override(raw, assignment)
        except ConfigError as e:
            errors.append(e)
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "plugins":
            continue
        if name not in _SECTIONS:
            import difflib

            hint = difflib.get_close_matches(name, [*_SECTIONS, "plugins"], n=1)
            errors.append(ConfigError(name, "unknown section" + (f" (did you mean {hint[0]!r}?)" if hint else "")))
            continue
        try:
            sections[name] = load_section(_SECTIONS[name], value, name)
        except ConfigErrors as e:
            errors.extend(e.errors)
    plugins: dict[str, PluginSettings] = {}
    try:
        plugins = _load_plugins(raw.get("plugins", {}), plugin_schemas or {})
    except ConfigErrors as e:
        errors.extend(e.errors)
    if errors:
        raise ConfigErrors(errors)
    return Config(**sections, plugins=plugins, source=source)
