"""gatewayd.toml -> typed, validated config, with `--set dotted.key=value` overrides.

Every key has a default, so an empty file is a working gateway. Secrets never live in
the file: keys ending in `_env` name an environment variable that holds the secret.
"""

from __future__ import annotations

import socket
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .alerts.channels import SmtpSection
from .alerts.rules import Rule, load_rules
from .schema import Address, ConfigError, ConfigErrors, load_section
from .backup import BackupSection
from .profile import apply_profile
from .tls import TlsSection

__all__ = [
    "Config",
    "ConfigError",
    "ConfigErrors",
    "PluginSettings",
    "apply_override",
    "load_config",
]


@dataclass
class GatewaySection:
    id: str = field(default_factory=socket.gethostname)
    data_dir: str = "var"
    shutdown_grace_s: float = 3.0
    #: "default", or "small" for a 512 MB board (core/profile.py; keys set here win).
    profile: Literal["default", "small"] = "default"

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
    #: The base URL devices use to reach the main listener (OTA download URLs are built
    #: on it); "" = derived from `listen` (see ota.http.PublicUrl).
    public_url: str = ""
    max_body_bytes: int = 8 * 1024 * 1024
    admin_token_env: str = "GATEWAYD_ADMIN_TOKEN"
    access_log: bool = True
    #: The listen queue: connections the kernel completes before the gateway accepts them.
    #: A site's lights reconnect together after a power cut; a SYN the full queue drops is
    #: sent again after 1, 3, 7 s (hypercorn's default, 100, drops most of 1,000 at once).
    #: Linux caps it at net.core.somaxconn (4096 since 5.4).
    backlog: int = 1024
    #: Request handlers running at once; the rest wait their turn, first come first served
    #: (core/admission.py: 1,000 lights at once answered in order, not all at the end).
    #: 0 = no limit.
    max_handlers: int = 32
    #: How long a handler counts against `max_handlers`: one that waits longer (on a device,
    #: a plugin's startup) runs on uncounted, so that slow handlers cannot stop the rest.
    handler_hold_s: float = 0.5

    def validate(self) -> None:
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes", f"must be at least 1024, got {self.max_body_bytes}")
        if not 1 <= self.backlog <= 65535:
            raise ConfigError("backlog", f"must be 1 .. 65535 connections, got {self.backlog}")
        if not 0 <= self.max_handlers <= 100_000:
            raise ConfigError("max_handlers", f"must be 0 (no limit) .. 100000 handlers, got {self.max_handlers}")
        if not 0.001 <= self.handler_hold_s <= 3600:
            raise ConfigError("handler_hold_s", f"must be 0.001 .. 3600 seconds, got {self.handler_hold_s}")
        if self.public_url:
            self.public_url = _base_url(self.public_url)


def _base_url(text: str) -> str:
    """`http(s)://host[:port][/path]` without a trailing slash; ConfigError otherwise."""
    from urllib.parse import urlsplit

    expected = f"expected http(s)://HOST[:PORT][/PATH] as devices reach the gateway, got {text!r}"
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ConfigError("public_url", expected)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise ConfigError("public_url", expected) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or parts.username is not None or text.endswith(("?", "#")):
        raise ConfigError("public_url", expected)
    return text.rstrip("/")


@dataclass
class StorageSection:
    synchronous: Literal["normal", "full"] = "normal"
    group_commit_ms: float = 0.0
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
    broker_port: int = 0
    max_packet_bytes: int = 1048576
    stall_timeout_s: float = 60.0

    def validate(self) -> None:
        if not 0 <= self.broker_port < 65536:
            raise ConfigError("broker_port", f"must be a TCP port (0: a unix socket in the data directory), got {self.broker_port}")
        if not 1024 <= self.max_packet_bytes <= 268435455:
            raise ConfigError("max_packet_bytes", f"must be 1024 .. 268435455 (MQTT's limit), got {self.max_packet_bytes}")
        if not 1 <= self.stall_timeout_s <= 3600:  # NaN fails this too
            raise ConfigError("stall_timeout_s", f"must be 1 .. 3600 (seconds a device may read nothing of what "
                              f"waits for it before it is closed), got {self.stall_timeout_s}")


_MAX_TTL_S = 10 * 365 * 86400.0  # = devices.MAX_TTL_S (config does not import the registry)


@dataclass
class DevicesSection:
    offline_after_s: float = 300.0
    presence_flush_s: float = 5.0
    command_ttl_s: float = 86400.0
    command_sweep_s: float = 30.0
    claim_code_ttl_s: float = 86400.0

    def validate(self) -> None:
        for name in ("offline_after_s", "presence_flush_s", "command_ttl_s", "command_sweep_s", "claim_code_ttl_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("command_ttl_s", "claim_code_ttl_s"):  # the registry's own limit on a lifetime
            if getattr(self, name) > _MAX_TTL_S:
                raise ConfigError(name, f"must be at most {_MAX_TTL_S:.0f} (10 years), got {getattr(self, name)}")


@dataclass
class AuthSection:
    max_failures: int = 10
    failure_window_s: float = 60.0
    lockout_s: float = 300.0
    jwt_ttl_s: float = 7 * 86400.0
    signature_max_skew_s: float = 300.0
    master_key_env: str = "GATEWAYD_MASTER_KEY"
    key_cache_s: float = 300.0

    def validate(self) -> None:
        if self.max_failures < 1:
            raise ConfigError("max_failures", f"must be >= 1, got {self.max_failures}")
        if not 0 <= self.key_cache_s <= 3600:
            raise ConfigError("key_cache_s", f"must be 0 .. 3600 (0: check every key against its hash), "
                                             f"got {self.key_cache_s}")
        for name in ("failure_window_s", "lockout_s", "jwt_ttl_s", "signature_max_skew_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")


@dataclass
class OutboxClassSection:
    """`[outbox.classes.<class>]`: one class's own capacity and time-to-live."""

    max_rows: int = 0
    max_bytes: int = 0
    ttl_s: float | None = None

    def validate(self) -> None:
        for name in ("max_rows", "max_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0 (0: no limit of its own)")
        if self.ttl_s is not None and self.ttl_s < 0:
            raise ConfigError("ttl_s", "must be >= 0 (0: never expires)")


@dataclass
class OutboxSection:
    policy: Literal["drop_oldest", "reject"] = "drop_oldest"
    max_rows: int = 10_000_000
    max_bytes: int = 1 << 30
    ttl_s: float = 30 * 86400.0
    maintenance_s: float = 30.0
    classes: dict[str, OutboxClassSection] = field(default_factory=dict)

    def validate(self) -> None:
        from ..protocol.batch import CLASSES

        for name in self.classes:
            if name not in CLASSES:
                raise ConfigError(f"classes.{name}", f"unknown class; expected one of {', '.join(CLASSES)}")
        if self.max_rows < 1 or self.max_bytes < 1:
            raise ConfigError("max_rows" if self.max_rows < 1 else "max_bytes", "must be >= 1")
        if self.ttl_s < 0 or self.maintenance_s <= 0:
            raise ConfigError("ttl_s" if self.ttl_s < 0 else "maintenance_s", "must be >= 0 / > 0")


@dataclass
class UpstreamSection:
    """One `[[upstream]]` sink: where the outbox is forwarded to."""

    name: str
    url: str
    kind: Literal["http", "mqtt"] = "http"
    secret_env: str = "GATEWAYD_UPSTREAM_SECRET"
    compression: Literal["zstd", "gzip", "identity"] = "zstd"
    max_records: int = 5000
    max_bytes: int = 1 << 20
    timeout_s: float = 30.0
    linger_s: float = 0.5
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 60.0
    path: str = "/v1/batch"
    tls_verify: bool = True
    topic: str = ""
    client_id: str = ""
    username: str = ""
    password_env: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    enabled: bool = True

    def validate(self) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", self.name):
            raise ConfigError("name", f"expected 1-32 of [A-Za-z0-9_-], got {self.name!r}")
        schemes = ("http://", "https://") if self.kind == "http" else ("mqtt://", "mqtts://")
        if not self.url.startswith(schemes):
            raise ConfigError("url", f"a {self.kind} upstream needs a {' or '.join(schemes)} URL, got {self.url!r}")
        if not 1 <= self.max_records <= 100_000:
            raise ConfigError("max_records", f"must be 1-100000, got {self.max_records}")
        if not 1024 <= self.max_bytes <= 64 << 20:
            raise ConfigError("max_bytes", f"must be 1024-67108864, got {self.max_bytes}")
        for name in ("timeout_s", "breaker_cooldown_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be > 0")
        if self.linger_s < 0 or self.breaker_threshold < 1:
            raise ConfigError("linger_s" if self.linger_s < 0 else "breaker_threshold", "out of range")


def _load_upstream(raw: Any) -> list[UpstreamSection]:
    if not isinstance(raw, list):
        raise ConfigErrors([ConfigError("upstream", "expected [[upstream]] tables (an array of tables)")])
    errors: list[ConfigError] = []
    out: list[UpstreamSection] = []
    for i, table in enumerate(raw):
        try:
            out.append(load_section(UpstreamSection, table, f"upstream[{i}]"))
        except ConfigErrors as e:
            errors.extend(e.errors)
    names = [u.name for u in out]
    errors += [ConfigError("upstream", f"two upstreams are named {n!r}") for n in sorted({n for n in names if names.count(n) > 1})]
    if errors:
        raise ConfigErrors(errors)
    return out


@dataclass
class NotificationsSection:
    """`[notifications]`: delivery of alert actions (core/notify.py)."""

    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    timeout_s: float = 10.0
    smtp: SmtpSection = field(default_factory=SmtpSection)

    def validate(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("max_attempts", f"must be >= 1, got {self.max_attempts}")
        for name in ("backoff_base_s", "backoff_max_s", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")


@dataclass
class OtaSection:
    """`[ota]`: the firmware store (core/ota.py)."""

    trusted_keys: list[str] = field(default_factory=list)
    require_signed: bool = False
    #: Sign images added without a key or signature of their own with the site key
    #: (`<data_dir>/firmware-signing.pem`, made on first use).
    sign_with_site_key: bool = True
    rollout: dict[str, float] = field(default_factory=lambda: {"stable": 100.0, "beta": 100.0})

    def validate(self) -> None:
        for channel, percent in self.rollout.items():
            if channel not in ("stable", "beta"):
                raise ConfigError(f"rollout.{channel}", "unknown channel; expected stable or beta")
            if not 0 <= percent <= 100:
                raise ConfigError(f"rollout.{channel}", f"must be a percentage 0-100, got {percent}")


@dataclass
class LiveSection:
    """`[live]`: the live-event hub (core/live/hub.py) and its WebSocket/SSE endpoints."""

    heartbeat_s: float = 15.0
    batch_ms: float = 20.0
    writes_per_s: int = 500
    per_token: int = 5
    max_subscribers: int = 200
    queue_size: int = 256
    ring_size: int = 1000

    def validate(self) -> None:
        if not 1 <= self.heartbeat_s <= 300:
            raise ConfigError("heartbeat_s", f"must be 1 .. 300 seconds, got {self.heartbeat_s}")
        if not 0 <= self.batch_ms <= 1000:
            raise ConfigError("batch_ms", f"must be 0 .. 1000 ms, got {self.batch_ms}")
        for name, low, high in (("per_token", 1, 1000), ("max_subscribers", 1, 100_000), ("writes_per_s", 10, 1_000_000),
                                ("queue_size", 16, 100_000), ("ring_size", 0, 1_000_000)):
            if not low <= getattr(self, name) <= high:
                raise ConfigError(name, f"must be {low} .. {high}, got {getattr(self, name)}")


@dataclass
class PluginSettings:
    """The keys every `[plugins.<name>]` table has, plus the plugin's own `options`."""

    name: str
    enabled: bool = True
    mount: str = ""
    listen: Address | None = None
    public_docs: bool = False  # its OpenAPI document and page readable without the admin token
    options: Any = None


@dataclass
class Config:
    gateway: GatewaySection = field(default_factory=GatewaySection)
    log: LogSection = field(default_factory=LogSection)
    http: HttpSection = field(default_factory=HttpSection)
    storage: StorageSection = field(default_factory=StorageSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    devices: DevicesSection = field(default_factory=DevicesSection)
    auth: AuthSection = field(default_factory=AuthSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    upstream: list[UpstreamSection] = field(default_factory=list)
    notifications: NotificationsSection = field(default_factory=NotificationsSection)
    ota: OtaSection = field(default_factory=OtaSection)
    live: LiveSection = field(default_factory=LiveSection)
    tls: TlsSection = field(default_factory=TlsSection)
    backup: BackupSection = field(default_factory=BackupSection)
    rules: list[Rule] = field(default_factory=list)
    plugins: dict[str, PluginSettings] = field(default_factory=dict)
    source: Path | None = None

    @property
    def data_dir(self) -> Path:
        """`gateway.data_dir`, relative paths taken from the config file's folder."""
        path = Path(self.gateway.data_dir)
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path


_SECTIONS = {k: v for k, v in typing.get_type_hints(Config).items() if k not in ("plugins", "source", "upstream", "rules")}


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
        common = {k: table[k] for k in ("enabled", "mount", "listen", "public_docs") if k in table}
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


def _email_without_smtp(rules: list[Rule]) -> list[ConfigError]:
    """An `email` action of a [[rules]] table needs `[notifications.smtp] host`."""
    errors = []
    for i, rule in enumerate(rules):
        chains = [("actions", rule.actions)] + ([("escalate.actions", rule.escalate.actions)] if rule.escalate else [])
        for where, actions in chains:
            errors += [ConfigError(f"rules[{i}].{where}[{j}]", "an email action needs [notifications.smtp] host")
                       for j, action in enumerate(actions) if action.kind == "email"]
    return errors


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
    apply_profile(raw)  # gateway.profile's defaults, under what the file and --set say
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "plugins":
            continue
        if name in ("upstream", "rules"):
            try:
                sections[name] = _load_upstream(value) if name == "upstream" else load_rules(value)
            except ConfigErrors as e:
                errors.extend(e.errors)
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
    notifications = sections.get("notifications")
    if not (notifications.smtp.host if isinstance(notifications, NotificationsSection) else ""):
        errors += _email_without_smtp(sections.get("rules", []))
    plugins: dict[str, PluginSettings] = {}
    try:
        plugins = _load_plugins(raw.get("plugins", {}), plugin_schemas or {})
    except ConfigErrors as e:
        errors.extend(e.errors)
    if errors:
        raise ConfigErrors(errors)
    return Config(**sections, plugins=plugins, source=source)
