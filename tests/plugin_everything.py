"""A test plugin that implements every hook (tests and bench load it with `-p`).

It records what the core called so tests can assert on it, offers a durable write
route (one committed row per request) for the bench, and can be told to misbehave.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import peewee
from quart import Blueprint, request

from gatewayd.plugins.api import (
    CommandRegistry,
    ConfigError,
    ModelRegistry,
    PluginContext,
    Rejected,
    SerialRegistry,
    TopicRegistry,
    SerialSettings,
    TaskRegistry,
    hookimpl,
    read_json_object,
)

PLUGIN_NAME = "everything"
calls: list[str] = []


@dataclass
class EverythingConfig:
    greeting: str = "hello"
    fail_startup: bool = False
    crash_task: bool = False
    threshold: int = 10
    serial: SerialSettings | None = None

    def validate(self) -> None:
        if self.threshold < 0:
            raise ConfigError("threshold", f"must be >= 0, got {self.threshold}")


class Reading(peewee.Model):
    device = peewee.CharField()
    value = peewee.FloatField()
    note = peewee.CharField(default="")

    class Meta:
        table_name = "everything_reading"


def insert_prepared(database, device: str, value: float) -> int:
    sql = "INSERT INTO everything_reading (device, value, note) VALUES (?, ?, '')"
    return database.connection().execute(sql, (device, value)).lastrowid


@hookimpl
def gatewayd_config_schema():
    calls.append("config_schema")
    return EverythingConfig


@hookimpl
def gatewayd_storage_models(models: ModelRegistry):
    calls.append("storage_models")
    models.add(Reading)
    models.version = 2

    @models.migration(2)
    def add_note(migrator, db):
        from playhouse.migrate import migrate

        migrate(migrator.add_column("everything_reading", "note", peewee.CharField(default="")))


class Everything:
    """The plugin's own state (`ctx.state`), built once by gatewayd_setup."""

    def __init__(self, ctx: PluginContext) -> None:
        self.name = ctx.name
        self.greeted = 0


@hookimpl
def gatewayd_setup(ctx: PluginContext) -> Everything:
    calls.append("setup")
    return Everything(ctx)


@hookimpl
def gatewayd_http_routes(ctx: PluginContext):
    calls.append("http_routes")
    bp = Blueprint("everything", __name__)
    written = ctx.metrics.counter("readings_total", "Readings stored")

    @bp.get("/hello")
    async def hello():
        return {"greeting": ctx.config.greeting}

    @bp.get("/greeted")
    async def greeted():
        ctx.state.greeted += 1
        return {"greeted": ctx.state.greeted}

    @bp.post("/readings")
    async def write_reading():
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("value"), (int, float)):
            return {"error": "expected {\"device\": str, \"value\": number}"}, 400
        row_id = await ctx.storage.write(
            lambda: Reading.insert(device=str(body.get("device", "")), value=float(body["value"])).execute()
        )
        written.inc()
        return {"id": row_id}, 201

    @bp.post("/readings/prepared")
    async def write_reading_prepared():
        # The same durable write as above through a prepared statement on the writer's
        # connection: what hot paths do (peewee's query building costs ~30x the insert).
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("value"), (int, float)):
            return {"error": "expected {\"device\": str, \"value\": number}"}, 400
        row_id = await ctx.storage.write(insert_prepared, ctx.storage.database, str(body.get("device", "")),
                                         float(body["value"]))
        written.inc()
        return {"id": row_id}, 201

    slow_under_way = [0]  # slow requests that arrived and are not answered yet

    @bp.post("/slow")
    async def slow_write():
        import trio

        slow_under_way[0] += 1
        try:
            await trio.sleep(float(request.args.get("s", "0.5")))
            row_id = await ctx.storage.write(lambda: Reading.insert(device="slow", value=0.0).execute())
        finally:
            slow_under_way[0] -= 1
        return {"id": row_id}, 201

    @bp.get("/slow")
    async def slow_requests():
        """How many slow writes are under way: a test waits for its own to arrive."""
        return {"under_way": slow_under_way[0]}

    @bp.post("/inflated")
    async def inflated():
        # A body that may come compressed (gzip, zstd), at most 1 KiB once inflated.
        return {"keys": sorted(await read_json_object(max_inflated=1024))}

    @bp.get("/readings")
    async def count_readings():
        return {"count": await ctx.storage.read(lambda: Reading.select().count())}

    return bp


@hookimpl
def gatewayd_mqtt_topics(topics: TopicRegistry, ctx: PluginContext):
    calls.append("mqtt_topics")

    async def on_reading(msg):
        import json

        device = msg.topic.split("/")[1]
        try:
            value = float(json.loads(msg.payload)["value"])
        except (ValueError, KeyError, TypeError) as e:
            raise Rejected(f"expected {{\"value\": number}}: {e!r}") from None
        await ctx.storage.write(lambda: Reading.insert(device=device, value=value).execute())

    topics.subscribe("everything/+/reading", on_reading, qos=1)
    topics.acl("everything/%u/#", "write")


@hookimpl
def gatewayd_serial_links(links: SerialRegistry, ctx: PluginContext):
    calls.append("serial_links")
    if ctx.config.serial is None:
        return

    async def on_frame(frame: bytes, link):
        import json

        try:
            body = json.loads(frame)
            value = float(body["value"])
        except (ValueError, KeyError, TypeError):
            await link.send(b'{"error": "expected {\\"value\\": number}"}')
            return
        row_id = await ctx.storage.write(lambda: Reading.insert(device="serial", value=value).execute())
        await link.send(json.dumps({"ok": row_id}).encode())  # ACK only after the commit

    links.add("console", ctx.config.serial, on_frame)


@hookimpl
async def gatewayd_startup(ctx: PluginContext):
    calls.append("startup")
    if ctx.config.fail_startup:
        raise RuntimeError("told to fail")


@hookimpl
def gatewayd_background_tasks(tasks: TaskRegistry, ctx: PluginContext):
    calls.append("background_tasks")
    runs = ctx.metrics.counter("task_runs_total", "Times the test task started")

    async def ticker():
        runs.inc()
        if ctx.config.crash_task:
            raise RuntimeError("task crashed on purpose")
        import trio

        await trio.sleep_forever()

    tasks.add("ticker", ticker)


@hookimpl
def gatewayd_alert_rules(ctx: PluginContext):
    calls.append("alert_rules")
    return [{
        "name": "everything-high-reading",
        "type": "reading",
        "when": [f"value > {ctx.config.threshold}"],
        "actions": [{"kind": "log"}],
    }]


@hookimpl
def gatewayd_check_command(payload):
    # A command with a "level" must give it as an integer 0-10; what is stored is marked.
    if isinstance(payload, dict) and "level" in payload:
        level = payload["level"]
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 10:
            raise ValueError(f"level: expected an integer 0-10, got {level!r}")
        return {**payload, "checked": True}
    return None


@hookimpl
async def gatewayd_shutdown(ctx: PluginContext):
    calls.append("shutdown")


@hookimpl
def gatewayd_cli_commands(commands: CommandRegistry):
    def setup(parser: argparse.ArgumentParser):
        parser.add_argument("--name", default="world")

    def run(args, cli):
        print(f"hello {args.name} from {cli.config.gateway.id}")
        return 0

    commands.add("hello", "say hello", setup, run)

    def setup_label(parser: argparse.ArgumentParser):
        parser.add_argument("device_id")
        parser.add_argument("label")

    def run_label(args, cli):
        # The family's devices and command queue, as the daemon's ctx.devices / ctx.commands.
        async def label(devices, commands):
            device = await devices.get(args.device_id)
            if device is None:
                print(f"no device {args.device_id}")
                return 1
            await devices.update(device.id, metadata={"label": args.label})
            try:
                command = await commands.enqueue(device.id, {"level": len(args.label)})
            except ValueError as e:
                print(f"everything label: {e}", file=sys.stderr)
                return 1
            print(f"{device.family}/{device.id} labelled; command {command.id}: {command.payload}")
            return 0

        return cli.with_devices("everything", label)

    commands.add("label", "label a device and queue a command", setup_label, run_label)
