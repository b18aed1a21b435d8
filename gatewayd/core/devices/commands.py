"""A durable command queue per device: pending -> delivered -> executed / failed, or expired.

Commands (from the admin API, the CLI, or a plugin) are committed to `core_command`
before anyone is told they exist, so they survive restarts. A device gets them either
by polling (`next_for`: highest priority first, oldest first; marks them delivered)
or pushed over MQTT (`push`: published through the injected `publish(topic, payload)`,
marked delivered once the broker acknowledged). The device's answer is recorded with
`ack(command_id, ok, result)`. A sweep marks commands past their expiry `expired`;
an expired command is never handed out again.

Which commands are open (pending or delivered) is also kept in memory, per device
(`open_for`): a device that polls every few seconds with nothing queued costs no query.
It is loaded at start (`run`), kept by every change made here (enqueue, hand-out, push,
ack, expiry), and another process's commands (`gatewayd devices command`) are read in
by `refresh`, which DeviceServices' change watch calls.
"""

from __future__ import annotations

import inspect
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import peewee
import trio

from ..logs import get_logger
from ..storage import SchemaSpec
from .registry import check_seconds

if TYPE_CHECKING:
    from ..storage import Storage

__all__ = ["Command", "CommandQueue", "FamilyCommands", "COMMAND_SCHEMA", "COMMAND_STATUSES"]

log = get_logger("gatewayd.commands")
COMMAND_STATUSES = ("pending", "delivered", "executed", "failed", "expired")
_OPEN = ("pending", "delivered")
# Characters of a command's JSON: a device gets it in one MQTT message or poll answer
# (paku takes 64 KiB payloads); a bigger "command" is a file, and OTA is for those.
MAX_PAYLOAD = 65536
# SQLite stores integers as signed 64-bit.
_INT64 = (-(2**63), 2**63 - 1)


class CommandRow(peewee.Model):
    command_id = peewee.CharField(unique=True)
    family = peewee.CharField()
    device_id = peewee.CharField()
    payload = peewee.TextField()
    priority = peewee.IntegerField(default=0)
    status = peewee.CharField(default="pending")
    created_at = peewee.FloatField()
    expires_at = peewee.FloatField(null=True)
    delivered_at = peewee.FloatField(null=True)
    completed_at = peewee.FloatField(null=True)
    attempts = peewee.IntegerField(default=0)
    result = peewee.TextField(null=True)

    class Meta:
        table_name = "core_command"
        indexes = ((("family", "device_id", "status"), False),)


COMMAND_SCHEMA = SchemaSpec("core_commands", [CommandRow], version=1)


@dataclass
class Command:
    id: str
    family: str
    device_id: str
    payload: Any
    priority: int
    status: str
    created_at: float
    expires_at: float | None
    delivered_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    result: Any = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, r: CommandRow) -> "Command":
        return cls(
            r.command_id, r.family, r.device_id, json.loads(r.payload), r.priority, r.status, r.created_at,
            r.expires_at, r.delivered_at, r.completed_at, r.attempts, None if r.result is None else json.loads(r.result),
        )


def default_render(command: Command) -> bytes:
    """`{"command_id": ..., **payload}` as JSON (payloads that aren't objects go under "payload")."""
    body = command.payload if isinstance(command.payload, dict) else {"payload": command.payload}
    # allow_nan=False: `{"v":NaN}` is not JSON; a device's strict parser would drop the command.
    return json.dumps({"command_id": command.id, **body}, separators=(",", ":"), allow_nan=False).encode()


def _json_text(name: str, value: Any, limit: int | None = None) -> str:
    """Strict JSON text of `value` (no NaN/Infinity), or ValueError naming `name`."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{name}: not storable as strict JSON ({e})") from None
    if limit is not None and len(text) > limit:
        raise ValueError(f"{name}: {len(text)} characters of JSON, more than {limit}")
    return text


class CommandQueue:
    """All families' command queues in one table."""

    def __init__(
        self,
        storage: Storage,
        *,
        clock: Callable[[], float] = time.time,
        default_ttl_s: float = 86400.0,
        sweep_s: float = 30.0,
        publish: Callable[[str, bytes], Awaitable[Any]] | None = None,
        check: Callable[[str, Any], Any] | None = None,
    ):
        self.storage = storage
        self.clock = clock
        self.default_ttl_s = default_ttl_s
        self.sweep_s = sweep_s
        self.publish = publish  # MQTT, for push(); None: no MQTT (push raises)
        # check(family, payload) -> the payload to store; ValueError refuses it (the
        # family plugin's gatewayd_check_command). None: every payload is stored as given.
        self.check = check
        self.listeners: dict[str, Callable[[Command], Any]] = {}
        # (family, device) -> command id -> the open command; None until `load` ran.
        self._open: dict[tuple[str, str], dict[str, Command]] | None = None
        self._seen_row = 0  # the highest row id `load` / `refresh` read: newer rows are another process's

    # -- the open commands, in memory -------------------------------------------------

    async def load(self) -> None:
        """Read every open command into memory (at start: the queue survives restarts)."""

        def read() -> tuple[list[Command], int]:
            rows = CommandRow.select().where(CommandRow.status.in_(_OPEN)).order_by(CommandRow.id)
            return [Command.from_row(r) for r in rows], CommandRow.select(peewee.fn.MAX(CommandRow.id)).scalar() or 0

        commands, self._seen_row = await self.storage.read(read)
        index: dict[tuple[str, str], dict[str, Command]] = {}
        for c in commands:
            index.setdefault((c.family, c.device_id), {})[c.id] = c
        self._open = index

    async def refresh(self) -> int:
        """Read in commands another process queued (the CLI) and tell their family's
        listener (a push); returns how many."""
        if self._open is None:
            return 0
        since = self._seen_row

        def read() -> list[tuple[int, Command]]:
            rows = CommandRow.select().where(CommandRow.id > since).order_by(CommandRow.id)
            return [(r.id, Command.from_row(r)) for r in rows]

        new = []
        for row_id, c in await self.storage.read(read):
            self._seen_row = max(self._seen_row, row_id)
            known = self._open.get((c.family, c.device_id), {})
            # This process's own commands are known already; only another's are news.
            if c.status in _OPEN and c.id not in known:
                self._open.setdefault((c.family, c.device_id), known)[c.id] = c
                new.append(c)
        for c in new:
            await self._tell(c)
        return len(new)

    async def open_for(self, family: str, device_id: str) -> list[Command]:
        """The device's open commands (pending, or delivered and not acknowledged), oldest
        first, without a query once `load` ran. Expired ones may show until the sweep:
        look at `expires_at`."""
        if self._open is None:
            return list(reversed(await self.list(family, device_id, status=_OPEN, limit=1_000_000)))
        held = self._open.get((family, device_id))
        if not held:
            return []  # the usual poll: nothing waits
        return sorted(held.values(), key=lambda c: c.created_at)

    def _keep(self, family: str, device_id: str, open_now: list[Command]) -> None:
        """The device's open commands as read inside a write: memory follows the database."""
        if self._open is None:
            return
        if open_now:
            self._open[(family, device_id)] = {c.id: c for c in open_now}
        else:
            self._open.pop((family, device_id), None)

    @staticmethod
    def _open_rows(family: str, device_id: str) -> list[Command]:
        rows = CommandRow.select().where((CommandRow.family == family) & (CommandRow.device_id == device_id)
                                         & CommandRow.status.in_(_OPEN)).order_by(CommandRow.id)
        return [Command.from_row(r) for r in rows]

    async def enqueue(
        self, family: str, device_id: str, payload: Any, *, ttl_s: float | None = None, priority: int = 0,
        command_id: str | None = None,
    ) -> Command:
        """Store a command (returns after COMMIT), then tell the family's listener.

        ValueError names a bad argument: a payload that is not strict JSON or is over
        MAX_PAYLOAD characters, or that the family refuses (`check`), a `ttl_s` that is
        not a finite number of seconds up to ten years, a `priority` that is not an
        integer SQLite can hold.
        """
        if self.check is not None:
            payload = self.check(family, payload)
        text = _json_text("payload", payload, MAX_PAYLOAD)
        ttl = check_seconds("ttl_s", self.default_ttl_s if ttl_s is None else ttl_s)
        if isinstance(priority, bool) or not isinstance(priority, int) or not _INT64[0] <= priority <= _INT64[1]:
            raise ValueError(f"priority: expected an integer {_INT64[0]}..{_INT64[1]}, got {priority!r:.60}")
        if command_id is not None and (not isinstance(command_id, str) or not 0 < len(command_id) <= 128):
            raise ValueError(f"command_id: expected a string of 1-128 characters, got {command_id!r:.60}")
        now = self.clock()
        cid = command_id or uuid.uuid4().hex

        def insert() -> Command:
            row = CommandRow.create(
                command_id=cid, family=family, device_id=device_id, payload=text, priority=int(priority),
                created_at=now, expires_at=now + ttl,
            )
            return Command.from_row(row)

        command = await self.storage.write(insert)
        if self._open is not None:
            self._open.setdefault((family, device_id), {})[command.id] = command
        await self._tell(command)
        return command

    async def _tell(self, command: Command) -> None:
        listener = self.listeners.get(command.family)
        if listener is not None:
            try:
                result = listener(command)
                if inspect.isawaitable(result):
                    await result
            except Exception as e:
                # The command is stored; the device still gets it by poll or the next push.
                log.error("command listener failed", family=command.family, device=command.device_id, error=repr(e))

    async def next_for(
        self, family: str, device_id: str, *, limit: int = 1, redeliver_after_s: float | None = None
    ) -> list[Command]:
        """Hand out up to `limit` commands (marked delivered), best priority first.

        With `redeliver_after_s`, delivered commands never acknowledged within that
        time are handed out again (a device that rebooted before acking).
        """
        now = self.clock()

        def take() -> tuple[list[Command], list[Command]]:
            due = CommandRow.status == "pending"
            if redeliver_after_s is not None:
                due |= (CommandRow.status == "delivered") & (CommandRow.delivered_at <= now - redeliver_after_s)
            rows = list(
                CommandRow.select()
                .where((CommandRow.family == family) & (CommandRow.device_id == device_id) & due
                       & (CommandRow.expires_at.is_null() | (CommandRow.expires_at > now)))
                .order_by(CommandRow.priority.desc(), CommandRow.id)
                .limit(limit)
            )
            for row in rows:
                row.status, row.delivered_at, row.attempts = "delivered", now, row.attempts + 1
                row.save()
            return [Command.from_row(r) for r in rows], self._open_rows(family, device_id)

        taken, open_now = await self.storage.write(take)
        self._keep(family, device_id, open_now)
        return taken

    async def push(
        self, family: str, device_id: str, topic: str, *, render: Callable[[Command], bytes] = default_render,
        limit: int = 100,
    ) -> int:
        """Publish the device's pending commands to `topic`; each is marked delivered once published."""
        if self.publish is None:
            raise RuntimeError("no MQTT publisher is attached to the command queue")
        now = self.clock()

        def pending() -> list[Command]:
            rows = (
                CommandRow.select()
                .where((CommandRow.family == family) & (CommandRow.device_id == device_id)
                       & (CommandRow.status == "pending")
                       & (CommandRow.expires_at.is_null() | (CommandRow.expires_at > now)))
                .order_by(CommandRow.priority.desc(), CommandRow.id)
                .limit(limit)
            )
            return [Command.from_row(r) for r in rows]

        sent = 0
        for command in await self.storage.read(pending):
            await self.publish(topic, render(command))
            at = self.clock()
            marked = await self.storage.write(
                lambda c=command: CommandRow.update(status="delivered", delivered_at=at, attempts=CommandRow.attempts + 1)
                .where((CommandRow.command_id == c.id) & (CommandRow.status == "pending"))
                .execute()
            )
            known = None if self._open is None else self._open.get((family, device_id), {})
            if marked and known is not None and command.id in known:
                known[command.id] = replace(command, status="delivered", delivered_at=at, attempts=command.attempts + 1)
            sent += 1
        return sent

    async def ack(
        self, command_id: str, ok: bool, result: Any = None, *, family: str | None = None, device_id: str | None = None
    ) -> Command | None:
        """Record the device's answer. Returns the command, or None if unknown (or not
        that device's). A repeated ack, or one after expiry, changes nothing."""
        now = self.clock()
        text = _json_text("result", result)

        def update() -> tuple[Command, list[Command]] | None:
            row = CommandRow.get_or_none(command_id=command_id)
            if row is None or (family and row.family != family) or (device_id and row.device_id != device_id):
                return None
            if row.status in _OPEN:
                row.status = "executed" if ok else "failed"
                row.completed_at, row.result = now, text
                row.save()
            return Command.from_row(row), self._open_rows(row.family, row.device_id)

        done = await self.storage.write(update)
        if done is None:
            return None
        command, open_now = done
        self._keep(command.family, command.device_id, open_now)
        return command

    async def expire(self) -> int:
        """Mark open commands past their expiry `expired`; returns how many."""
        now = self.clock()
        expired: int = await self.storage.write(
            lambda: CommandRow.update(status="expired", completed_at=now)
            .where(CommandRow.status.in_(_OPEN) & CommandRow.expires_at.is_null(False) & (CommandRow.expires_at <= now))
            .execute()
        )
        if expired and self._open is not None:
            for key, known in list(self._open.items()):
                for cid in [cid for cid, c in known.items() if c.expires_at is not None and c.expires_at <= now]:
                    del known[cid]
                if not known:
                    del self._open[key]
        return expired

    async def get(self, command_id: str) -> Command | None:
        def read() -> Command | None:
            row = CommandRow.get_or_none(command_id=command_id)
            return None if row is None else Command.from_row(row)

        return await self.storage.read(read)

    async def list(
        self, family: str | None = None, device_id: str | None = None, *, status: str | tuple[str, ...] | None = None,
        limit: int = 100,
    ) -> list[Command]:
        """Newest first; `status` one state or a tuple of them (`("pending", "delivered")`: not acknowledged)."""

        def read() -> list[Command]:
            q = CommandRow.select().order_by(CommandRow.id.desc()).limit(limit)
            if family:
                q = q.where(CommandRow.family == family)
            if device_id:
                q = q.where(CommandRow.device_id == device_id)
            if isinstance(status, tuple):
                q = q.where(CommandRow.status.in_(status))
            elif status:
                q = q.where(CommandRow.status == status)
            return [Command.from_row(r) for r in q]

        return await self.storage.read(read)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The open commands into memory, then the expiry sweep every `sweep_s`."""
        await self.load()
        task_status.started(self)
        while True:
            try:
                expired = await self.expire()
                if expired:
                    log.info("commands expired", count=expired)
            except Exception as e:
                log.error("command expiry sweep failed", error=repr(e))
            await trio.sleep(self.sweep_s)


class FamilyCommands:
    """`ctx.commands`: the queue bound to one family."""

    def __init__(self, queue: CommandQueue, family: str):
        self._queue = queue
        self.family = family

    def on_enqueue(self, fn: Callable[[Command], Any]) -> None:
        """Call `fn(command)` (sync or async) after each new command is committed, e.g. to push it."""
        self._queue.listeners[self.family] = fn

    async def enqueue(self, device_id: str, payload: Any, *, ttl_s: float | None = None, priority: int = 0,
                      command_id: str | None = None) -> Command:
        return await self._queue.enqueue(self.family, device_id, payload, ttl_s=ttl_s, priority=priority,
                                         command_id=command_id)

    async def open_for(self, device_id: str) -> list[Command]:
        """The device's open commands (pending, or delivered and not acknowledged), oldest
        first, from memory: a poll with nothing queued costs no query. Expired ones may
        show until the queue's sweep: look at `expires_at`."""
        return await self._queue.open_for(self.family, device_id)

    async def next_for(self, device_id: str, *, limit: int = 1, redeliver_after_s: float | None = None) -> list[Command]:
        return await self._queue.next_for(self.family, device_id, limit=limit, redeliver_after_s=redeliver_after_s)

    async def push(self, device_id: str, topic: str, *, render: Callable[[Command], bytes] = default_render) -> int:
        return await self._queue.push(self.family, device_id, topic, render=render)

    async def ack(self, command_id: str, ok: bool, result: Any = None, *, device_id: str | None = None) -> Command | None:
        return await self._queue.ack(command_id, ok, result, family=self.family, device_id=device_id)

    async def get(self, command_id: str) -> Command | None:
        command = await self._queue.get(command_id)
        return command if command is not None and command.family == self.family else None

    async def list(self, device_id: str | None = None, *, status: str | tuple[str, ...] | None = None,
                   limit: int = 100) -> list[Command]:
        return await self._queue.list(self.family, device_id, status=status, limit=limit)
