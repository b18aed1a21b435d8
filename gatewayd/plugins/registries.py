"""What a plugin's hooks register into: one registry per kind, each made per plugin.

A hook receives its registry and calls its `add`-style methods (tox's register
objects): `gatewayd_storage_models(models)`, `gatewayd_mqtt_topics(topics, ctx)`,
`gatewayd_serial_links(links, ctx)`, `gatewayd_background_tasks(tasks, ctx)`,
`gatewayd_cli_commands(commands)`. The runtime reads them back and hands the core
plain data: the core never imports the plugin contract.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import peewee

from ..core.mqtt.broker import AclTemplate
from ..core.mqtt.delivery import GroupHandler, InboundMessage, MessageHandler, Rejected
from ..core.serial.link import FrameHandler, SerialSettings
from ..protocol.topics import validate_filter

__all__ = ["CommandRegistry", "ModelRegistry", "SerialRegistry", "TaskRegistry", "TopicRegistry"]

#: A schema upgrade step: `fn(migrator, database)` (playhouse.migrate's SqliteMigrator).
Migration = Callable[[Any, peewee.Database], None]


class ModelRegistry:
    """Collects a plugin's models, schema version and migrations."""

    def __init__(self, plugin: str):
        self.plugin = plugin
        self.models: list[type[peewee.Model]] = []
        self.version = 1
        self.migrations: dict[int, Migration] = {}

    def add(self, *models: type[peewee.Model]) -> None:
        """Register models; each `Meta.table_name` must start with `<plugin>_`."""
        for model in models:
            table = model._meta.table_name
            if not table.startswith(f"{self.plugin}_"):
                raise ValueError(
                    f"plugin {self.plugin!r}: model {model.__name__} has table {table!r}; "
                    f"plugin tables must be named '{self.plugin}_...' (set Meta.table_name)"
                )
            self.models.append(model)

    def migration(self, version: int) -> Callable[[Migration], Migration]:
        """Decorator: `fn(migrator, database)` upgrades schema `version - 1` to `version`."""

        def register(fn: Migration) -> Migration:
            self.migrations[version] = fn
            return fn

        return register


@dataclass
class _Task:
    name: str
    fn: Callable[..., Awaitable[Any]]
    args: tuple[Any, ...]


class TaskRegistry:
    """Collects a plugin's supervised background tasks."""

    def __init__(self) -> None:
        self.tasks: list[_Task] = []

    def add(self, name: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `await fn(*args)` for the life of the gateway, restarted if it crashes."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"task {name!r}: expected an async function, got {fn!r}")
        self.tasks.append(_Task(name, fn, args))


@dataclass
class _Link:
    name: str
    settings: SerialSettings
    handler: FrameHandler


class SerialRegistry:
    """Collects a plugin's serial lines."""

    def __init__(self, plugin: str):
        self.plugin = plugin
        self.links: list[_Link] = []

    def add(self, name: str, settings: SerialSettings, handler: FrameHandler) -> None:
        """Open `settings.port` and call `await handler(frame, link)` for every frame."""
        if not isinstance(settings, SerialSettings):
            raise TypeError(f"serial link {name!r}: expected SerialSettings, got {type(settings).__name__}")
        if any(link.name == name for link in self.links):
            raise ValueError(f"serial link {name!r} declared twice")
        self.links.append(_Link(name, settings, handler))


@dataclass
class _Command:
    name: str
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[..., int | None]


class CommandRegistry:
    """Collects a plugin's `gatewayd <plugin> <command>` subcommands."""

    def __init__(self, plugin: str):
        self.plugin = plugin
        self.commands: list[_Command] = []

    def add(
        self,
        name: str,
        help: str,
        setup: Callable[[argparse.ArgumentParser], None],
        run: Callable[..., int | None],
    ) -> None:
        """Register `gatewayd <plugin> <name>`.

        `setup(parser)` adds arguments. `run(args)` or `run(args, cli)` does the work
        and returns an exit status; `cli.config` is the loaded gateway config,
        `cli.open_storage()` opens the database for commands that need it, and
        `cli.with_devices(family, fn)` runs `await fn(devices, commands)`, the family's
        registry and command queue (as `ctx.devices`, `ctx.commands`).
        """
        self.commands.append(_Command(name, help, setup, run))


@dataclass(frozen=True)
class Subscription:
    """One topic filter of a plugin, and what handles it."""

    filter: str
    handler: MessageHandler
    qos: int


@dataclass
class TopicRegistry:
    """Collects a plugin's MQTT subscriptions and the ACL patterns its devices get."""

    plugin: str
    subscriptions: list[Subscription] = field(default_factory=list)
    acls: list[AclTemplate] = field(default_factory=list)

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Route messages matching `topic_filter` (`+`, `#` wildcards) to `await handler(msg)`.

        The message is acknowledged (PUBACK) when the handler returns, i.e. after what
        it wrote was committed. Raise `Rejected(reason)` for bad input: acknowledged,
        counted, kept in core_mqtt_rejected with the reason. Any other exception is
        treated the same way (and logged as a handler error), except `StorageFull` /
        `StorageUnavailable`: the message then stays unacknowledged and is tried again.
        """
        validate_filter(topic_filter)
        if qos not in (0, 1):
            raise ValueError(f"{topic_filter}: qos must be 0 or 1")
        self.subscriptions.append(Subscription(topic_filter, handler, qos))

    def subscribe_group(
        self,
        topic_filter: str,
        handler: Callable[[Sequence[InboundMessage]], Awaitable[Sequence[Rejected | None]]],
        qos: int = 1,
    ) -> None:
        """Like `subscribe`, for a handler that takes messages together: `await
        handler(messages)` gets the messages matching `topic_filter` that the gateway's
        edge read from one device at once (in order; one, when they come one by one, or
        through a broker), and returns one outcome per message: None (stored) or a
        `Rejected(reason)` (that message alone is rejected with its reason; the others
        are not). It stores them with ONE `ctx.ingest.records(...)` call for the group
        (a second call raises RuntimeError): the messages' delivery marks commit with
        it, and each is acknowledged after it. Raising `Rejected` rejects the whole
        group; `StorageFull`/`StorageUnavailable` leave the group unacknowledged and it
        runs again. The topic's only handler: with another plugin's on the same topic,
        each message is delivered alone.
        """
        validate_filter(topic_filter)
        if qos not in (0, 1):
            raise ValueError(f"{topic_filter}: qos must be 0 or 1")
        self.subscriptions.append(Subscription(topic_filter, GroupHandler(handler), qos))

    def acl(self, pattern: str, access: str) -> None:
        """A mosquitto ACL pattern for this family's device accounts (`%u` = the device's
        username, its id): `acl("paku/%u/telemetry", "write")`. Access: read, write,
        readwrite or deny."""
        self.acls.append(AclTemplate(pattern, access))  # type: ignore[arg-type]
