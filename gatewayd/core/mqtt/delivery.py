"""What happens to one inbound MQTT message: the delivery policy, and the pool that runs it.

Wherever a message comes from (a device through the edge, :mod:`.edge`, or the
broker through the gateway's own client, :mod:`.client`), it is delivered the same way,
and the answer decides its acknowledgement:

- ``HANDLED``: every matching handler returned. Acknowledge.
- ``REJECTED``: a handler raised :class:`Rejected` (bad input), or any other exception
  (a bug, a RecursionError on a hostile payload, a number SQLite cannot hold, SQL of its
  own that SQLite refuses whatever the disk's state: ``StatementError`` such as "no such
  column", a syntax error, a constraint of its own table). The
  message is recorded in ``core_mqtt_rejected`` with the reason, counted, and
  acknowledged: one device's bad message must never come back to block the others.
- ``DUPLICATE``: a redelivery (DUP flag) of a message whose records were committed
  already (its final mark was found, see :mod:`.marks`), or that is being delivered now
  (the sender reconnected and sent it again while the first copy waited for storage):
  it is answered when the first copy is, and stored once. Acknowledge, store nothing.
  A redelivery whose mark lists only some calls (the gateway stopped after a handler's
  first ingest call committed, before its second) runs the handlers again, the calls
  that committed answered without storing: ``HANDLED`` if that stored anything new.
- ``UNROUTED``: no handler for the topic. Acknowledge.

A group handler (``GroupHandler``, ``TopicRegistry.subscribe_group``) gets the messages
the edge read from one device together (:meth:`DeliveryPool.submit_group`): one verdict
each, HANDLED or REJECTED (that message alone), and its one ingest call commits every
message's mark, final, with the records (``outbox.ingest.GroupScope``). Resends (DUP) and
QoS 2 are delivered one by one, a group of one.

The one failure that must not be acknowledged is storage that cannot take the write
(a ``StorageError`` other than ``StatementError``: disk full, database closed,
read-only, locked by another process, an I/O error): the delivery waits and tries again (0.5 s doubling to
30 s) while the message keeps its slot, so the sender's window fills and it stops
sending. The handlers then run again from the start: what their ``ctx.ingest`` calls
committed before the failure is not stored again (``outbox.ingest.DeliveryScope``: a
call is recognised by the records it stores, not by its position);
other writes of theirs that committed run again, so a handler keeps its own writes
idempotent or inside its ingest call's ``family_rows``. Cancellation (shutdown) leaves a message unacknowledged: it comes again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Awaitable, Callable, NamedTuple

import peewee
import trio

from ...protocol.topics import TopicRouter
from ..logs import QuietLog
from ..outbox.ingest import DeliveryScope, GroupScope, delivery_scope
from ..storage import StatementError, Storage, StorageError, StorageFull, StorageUnavailable
from .marks import DeliveryMarks, Mark, Seen

__all__ = [
    "Delivery",
    "DeliveryPool",
    "GroupHandler",
    "GroupReply",
    "DeliveryStats",
    "InboundMessage",
    "MessageHandler",
    "Rejected",
    "RejectedMessage",
    "Verdict",
    "HANDLED",
    "REJECTED",
    "DUPLICATE",
    "UNROUTED",
]

HANDLED, REJECTED, DUPLICATE, UNROUTED = "handled", "rejected", "duplicate", "unrouted"
Verdict = str
"""One of HANDLED, REJECTED, DUPLICATE, UNROUTED: every one of them is acknowledged."""

# A rejected message is kept for the operator to look at, not for ever in full.
_KEEP_PAYLOAD = 4096
_KEEP_REJECTED = 10_000
_RETRY_MIN, _RETRY_MAX = 0.5, 30.0


class Rejected(Exception):
    """Raised by a handler for input that will never be acceptable.

    The message is acknowledged (so it does not come back), counted, and recorded with
    ``reason`` in ``core_mqtt_rejected``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InboundMessage(NamedTuple):
    """What a handler receives. ``sender`` is the device's MQTT username when the message
    came through the gateway's edge (its ACL was checked), None when the broker relayed it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    sender: str | None = None


MessageHandler = Callable[[InboundMessage], Awaitable[None]]


class GroupHandler:
    """A handler that takes several messages at once (``TopicRegistry.subscribe_group``).

    ``await group(messages)`` gets the messages of one topic filter that the edge read
    from one device together, in order, and returns one outcome per message: None
    (handled) or a ``Rejected`` (that message alone is rejected, with its reason). It
    stores what it keeps with one ``ctx.ingest`` call for the whole group; the messages'
    delivery marks commit with it. Called as a plain :data:`MessageHandler` (a message
    from the broker's client, a resend, QoS 2) it gets a group of one.
    """

    __slots__ = ("group",)

    def __init__(self, group: Callable[[Sequence[InboundMessage]], Awaitable[Sequence[Rejected | None]]]) -> None:
        self.group = group

    async def __call__(self, msg: InboundMessage) -> None:
        outcome = _checked(await self.group([msg]), 1)[0]
        if outcome is not None:
            raise outcome


def _checked(outcomes: Sequence[Rejected | None], n: int) -> Sequence[Rejected | None]:
    if len(outcomes) != n or not all(o is None or isinstance(o, Rejected) for o in outcomes):
        raise TypeError(f"a group handler returns one outcome (None or a Rejected) per message: {n} messages, "
                        f"got {outcomes!r:.200}")
    return outcomes


class RejectedMessage(peewee.Model):
    """A message that was rejected, with the reason. Unbound: the core binds it."""

    topic = peewee.TextField()
    payload = peewee.BlobField()  # the first 4 KiB
    reason = peewee.TextField()
    received_at = peewee.FloatField(default=time.time, index=True)  # unix seconds
    sender = peewee.TextField(null=True)
    size = peewee.IntegerField(default=0)  # the whole payload's length

    class Meta:
        table_name = "core_mqtt_rejected"
        database = None


@dataclass
class DeliveryStats:
    """Counters for /metrics; the latest handler error for /health."""

    handled: int = 0
    rejected: int = 0
    handler_errors: int = 0  # rejected because a handler raised something else than Rejected
    statement_errors: int = 0  # of which: SQL the database refuses (no such column, a constraint)
    duplicates: int = 0
    unrouted: int = 0
    storage_waits: int = 0  # deliveries that waited for storage and tried again
    last_handler_error: str | None = None
    last_handler_error_at: float | None = None  # trio.current_time()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Delivery:
    """Runs the handlers of one message and returns its verdict (see the module docstring)."""

    def __init__(
        self,
        router: TopicRouter[MessageHandler],
        storage: Storage,
        *,
        marks: DeliveryMarks | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.router = router
        self.storage = storage
        self.marks = marks
        self.stats = DeliveryStats()
        self.log = log or logging.getLogger("gatewayd.mqtt")
        self._quiet = QuietLog(self.log)
        self._error_log_at = -1e9
        self._errors_unlogged = 0
        self._rejected_since_prune = 0
        self._watchers: list[Callable[[InboundMessage, Verdict], None]] = []
        # Deliveries running now, by (sender, packet id, digest): a resend waits for the first.
        self._running: dict[tuple[str, int, bytes], _Running] = {}

    def watch(self, callback: Callable[[InboundMessage, Verdict], None]) -> None:
        """Call `callback(message, verdict)` after every delivery (tests, diagnostics).
        It runs on the trio thread and must not raise or block."""
        self._watchers.append(callback)

    async def deliver(self, msg: InboundMessage, source: str, packet_id: int | None) -> Verdict:
        """Deliver ``msg`` (sent by ``source`` under ``packet_id``, None for QoS 0)."""
        verdict = await self._deliver(msg, source, packet_id)
        for watcher in self._watchers:
            watcher(msg, verdict)
        return verdict

    async def _deliver(self, msg: InboundMessage, source: str, packet_id: int | None) -> Verdict:
        handlers = self.router.handlers_for(msg.topic)
        if not handlers:
            self.stats.unrouted += 1
            return UNROUTED
        if packet_id is None or self.marks is None:
            return await self._handle(handlers, msg, source, None)
        mark = self.marks.mark(source, packet_id, msg.topic, msg.payload)
        key = (source, packet_id, mark.digest)
        committed: list[bytes] = []
        if msg.dup:
            first = self._running.get(key)
            if first is not None:  # sent again while the first copy is being delivered
                verdict = await first.decided(key)
                if verdict is not None:
                    self.stats.duplicates += 1
                    return DUPLICATE if verdict == HANDLED else verdict
            else:
                seen = await self._seen(mark)
                if seen is not None:
                    if seen.calls is None:  # final: every handler had returned
                        self.stats.duplicates += 1
                        return DUPLICATE
                    committed = seen.calls  # some calls committed, maybe not all: run the rest
        running = self._running[key] = _Running()
        self.marks.forget(source, packet_id)  # an older message's final mark under this id is moot
        try:
            running.verdict = await self._handle(handlers, msg, source, mark, committed)
            return running.verdict
        finally:
            running.done.set()
            if self._running.get(key) is running:
                del self._running[key]

    async def deliver_group(self, handler: GroupHandler, msgs: list[InboundMessage], source: str,
                            packet_ids: list[int | None]) -> list[Verdict]:
        """Deliver messages that one read of ``source`` brought for one group handler
        (none of them a resend: those go through :meth:`deliver`); one verdict each.

        Each message gets its own mark, written final in the transaction of the group's
        ingest call: a resend after a crash is a duplicate (its records committed) or
        is delivered anew (they did not), whichever group it then comes in. A message
        the handler rejects is rejected alone, with its reason; the rest are handled."""
        marks: list[Mark | None] = [None] * len(msgs)
        keys: list[tuple[int, tuple[str, int, bytes]]] = []
        group = _Running()  # one for the group: a resend meanwhile waits for its message's verdict
        if self.marks is not None:
            make, running = self.marks.mark, self._running
            # Nothing noted in memory (the usual case: group marks are written with their
            # records): no older final mark to forget. The loop does not wait: none comes meanwhile.
            forget = self.marks.forget if self.marks.unwritten else None
            for i, (msg, pid) in enumerate(zip(msgs, packet_ids)):
                if pid is not None:
                    mark = marks[i] = make(source, pid, msg.topic, msg.payload)
                    key = (source, pid, mark.digest)
                    running[key] = group
                    keys.append((i, key))
                    if forget is not None:
                        forget(source, pid)  # an older message's final mark under this id is moot
        try:
            written = [m for m in marks if m is not None]
            scope = GroupScope(partial(self.marks.write_final, written) if self.marks is not None and written else None)
            reasons = await self._run_group(handler, msgs, scope)
            rejected = [(msg, reason, mark) for msg, reason, mark in zip(msgs, reasons, marks) if reason is not None]
            if rejected:
                await self._reject_all(rejected, source)
            verdicts = [HANDLED if reason is None else REJECTED for reason in reasons]
            self.stats.handled += len(msgs) - len(rejected)
            group.verdicts = {key: verdicts[i] for i, key in keys}
            if self._watchers:
                for msg, verdict in zip(msgs, verdicts):
                    for watcher in self._watchers:
                        watcher(msg, verdict)
            return verdicts
        finally:
            group.done.set()
            running = self._running
            for _, key in keys:
                if running.get(key) is group:
                    del running[key]

    async def _run_group(self, handler: GroupHandler, msgs: list[InboundMessage],
                         scope: GroupScope) -> list[str | None]:
        """Each message's rejection reason, or None when handled."""
        delay = _RETRY_MIN
        while True:
            scope.again()
            token = delivery_scope.set(scope)
            try:
                outcomes = _checked(await handler.group(msgs), len(msgs))
                return [None if o is None else o.reason for o in outcomes]
            except Rejected as exc:  # the whole group
                return [exc.reason] * len(msgs)
            except StatementError as exc:
                return [self._handler_error(msgs[0], exc, handler)] * len(msgs)
            except StorageError as exc:  # not acknowledged: tried again (a committed ingest call is answered)
                await self._storage_wait(exc, delay)
                delay = min(delay * 2, _RETRY_MAX)
            except Exception as exc:  # noqa: BLE001 - whatever it is, it must not come back
                return [self._handler_error(msgs[0], exc, handler)] * len(msgs)
            finally:
                delivery_scope.reset(token)

    async def _handle(self, handlers: list[MessageHandler], msg: InboundMessage, source: str,
                      mark: Mark | None, committed: list[bytes] | None = None) -> Verdict:
        scope = DeliveryScope(mark.write if mark is not None else None, committed or ())
        reason = await self._run(handlers, msg, scope)
        if reason is None:
            if mark is not None and scope.committed:
                # Every handler returned: a redelivery is a duplicate, not a delivery cut
                # short. Noted now, written a few ms later with others (marks.py): the
                # acknowledgement waits for the records' commit, not for this one.
                mark.marks.finish(mark)
            if committed and len(scope.committed) == len(committed):  # a redelivery: nothing new stored
                self.stats.duplicates += 1
                return DUPLICATE
            self.stats.handled += 1
            return HANDLED
        try:
            await self._retrying(self.storage.write, self._record_rejected, msg, reason, mark)
        except Exception as exc:  # noqa: BLE001 - not kept, but still refused: it must not come back
            self.log.error("could not record a rejected MQTT message: %r", exc)
        self.stats.rejected += 1
        # One line per sender per 10 s: a device sending nothing but bad messages must
        # not fill the log (each is counted, and kept in core_mqtt_rejected).
        sender = msg.sender or source
        self._quiet("rejected:" + sender, logging.INFO, "rejected MQTT message on %r from %s: %s", msg.topic,
                    sender, reason)
        return REJECTED

    async def _seen(self, mark: Mark) -> Seen | None:
        assert self.marks is not None
        try:
            return await self._retrying(self.marks.seen, mark)  # type: ignore[no-any-return]
        except Exception as exc:  # noqa: BLE001 - unreadable marks: deliver it (a duplicate at worst)
            self.log.error("could not read delivery marks: %r", exc)
            return None

    async def _run(self, handlers: list[MessageHandler], msg: InboundMessage, scope: DeliveryScope) -> str | None:
        """The rejection reason, or None when every handler returned."""
        delay = _RETRY_MIN
        while True:
            scope.again()
            token = delivery_scope.set(scope)
            try:
                reason = None
                for handler in handlers:
                    try:
                        await handler(msg)
                    except Rejected as exc:
                        reason = exc.reason
                return reason
            except StatementError as exc:  # the handler's own SQL: it fails the same way every time
                return self._handler_error(msg, exc, handler)
            except StorageError as exc:  # nothing of the failed write was committed: never acknowledged
                await self._storage_wait(exc, delay)
                delay = min(delay * 2, _RETRY_MAX)
            except Exception as exc:  # noqa: BLE001 - whatever it is, it must not come back
                return self._handler_error(msg, exc, handler)
            finally:
                delivery_scope.reset(token)

    async def _retrying(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        delay = _RETRY_MIN
        while True:
            try:
                return await fn(*args)
            except (StorageFull, StorageUnavailable) as exc:
                await self._storage_wait(exc, delay)
                delay = min(delay * 2, _RETRY_MAX)

    async def _storage_wait(self, exc: Exception, delay: float) -> None:
        self.stats.storage_waits += 1
        self._log_error("storage cannot take an MQTT message (%s); it stays unacknowledged, retrying",
                        exc, traceback=False)
        await trio.sleep(delay)

    def _handler_error(self, msg: InboundMessage, exc: Exception, handler: MessageHandler) -> str:
        try:
            text = f"{type(exc).__name__}: {exc}"
        except Exception:  # noqa: BLE001 - a hostile __str__ must not take us down
            text = type(exc).__name__
        plugin = next((str(s.owner) for s in self.router.subscriptions() if s.handler is handler), "?")
        reason = f"handler error ({plugin}): {text[:300]}"
        self.stats.handler_errors += 1
        if isinstance(exc, (StatementError, peewee.IntegrityError, peewee.ProgrammingError, peewee.InterfaceError,
                            peewee.DataError)):
            self.stats.statement_errors += 1  # the handler's SQL: a plugin bug, not the storage
        self.stats.last_handler_error = f"{msg.topic}: {reason}"
        self.stats.last_handler_error_at = trio.current_time()
        self._log_error("MQTT handler of plugin %s for %r failed; the message is rejected", plugin, msg.topic,
                        exc=exc)
        return reason

    def _record_rejected(self, msg: InboundMessage, reason: str, mark: Mark | None) -> None:
        # On the writer thread. The mark (final) commits with the record, so a redelivery
        # of a rejected message is recognised too (and not recorded twice).
        if mark is not None:
            mark.write(None)
        RejectedMessage.insert(topic=msg.topic, payload=msg.payload[:_KEEP_PAYLOAD], reason=reason,
                               received_at=time.time(), sender=msg.sender, size=len(msg.payload)).execute()
        self._rejected_since_prune += 1
        if self._rejected_since_prune >= 1000:  # keep the newest _KEEP_REJECTED
            self._rejected_since_prune = 0
            newest = RejectedMessage.select(RejectedMessage.id).order_by(RejectedMessage.id.desc())
            edge = newest.offset(_KEEP_REJECTED).limit(1).scalar()
            if edge is not None:
                RejectedMessage.delete().where(RejectedMessage.id <= edge).execute()

    async def _reject_all(self, rejected: list[tuple[InboundMessage, str, Mark | None]], source: str) -> None:
        """A group's rejected messages: recorded in one write, counted, logged (quietly)."""
        try:
            await self._retrying(self.storage.write, self._record_all_rejected, rejected)
        except Exception as exc:  # noqa: BLE001 - not kept, but still refused: it must not come back
            self.log.error("could not record rejected MQTT messages: %r", exc)
        self.stats.rejected += len(rejected)
        for msg, reason, _ in rejected:
            sender = msg.sender or source
            self._quiet("rejected:" + sender, logging.INFO, "rejected MQTT message on %r from %s: %s", msg.topic,
                        sender, reason)

    def _record_all_rejected(self, rejected: list[tuple[InboundMessage, str, Mark | None]]) -> None:
        for msg, reason, mark in rejected:  # on the writer thread: one transaction for them all
            self._record_rejected(msg, reason, mark)

    def _log_error(self, text: str, *args: Any, exc: BaseException | None = None, traceback: bool = True) -> None:
        # A flood of failures logs one line per 10 s, not one per message.
        now = time.monotonic()
        if now - self._error_log_at < 10:
            self._errors_unlogged += 1
            return
        extra = f" ({self._errors_unlogged} more since the last report)" if self._errors_unlogged else ""
        self.log.error(text + extra, *args, exc_info=exc if traceback else None)
        self._error_log_at = now
        self._errors_unlogged = 0


class _Running:
    """A delivery running now: of one message (``verdict``), or of a group (``verdicts``)."""

    __slots__ = ("done", "verdict", "verdicts")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.verdict: Verdict | None = None
        self.verdicts: dict[tuple[str, int, bytes], Verdict] | None = None

    async def decided(self, key: tuple[str, int, bytes]) -> Verdict | None:
        """The first copy's verdict; None if it ended without one (cancelled)."""
        await self.done.wait()
        return self.verdict if self.verdicts is None else self.verdicts.get(key)


Reply = Callable[[int | None, Verdict], None]
GroupReply = Callable[[list[int | None], list[Verdict]], None]


class _Group(NamedTuple):
    """A group delivery waiting in the pool."""

    handler: GroupHandler
    msgs: list[InboundMessage]
    packet_ids: list[int | None]

    @property
    def topic(self) -> str:
        return self.msgs[0].topic


class DeliveryPool:
    """A fixed pool of tasks running deliveries, fed by :meth:`submit`.

    Cheaper per message than a task per message: a deque, and an idle worker woken
    directly (a memory channel costs twice as much); a worker that finishes a message
    takes the next one in the same scheduler step. The feeders bound it: they stop
    reading while :attr:`full` and wait in :meth:`wait_slot`.
    """

    def __init__(self, delivery: Delivery, size: int) -> None:
        self.delivery = delivery
        self.size = size
        self.in_flight = 0
        self._pending: deque[tuple[InboundMessage | _Group, str, int | None, Any]] = deque()
        self._idle: list[trio.lowlevel.Task] = []
        self._slot_freed = trio.Event()
        self.running = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.size):
                    nursery.start_soon(self._worker)
                self.running = True
                task_status.started()
        finally:
            self.running = False

    def submit(self, msg: InboundMessage, source: str, packet_id: int | None, reply: Reply) -> None:
        """Queue a delivery; ``reply(packet_id, verdict)`` is called when it is decided."""
        self.in_flight += 1
        self._pending.append((msg, source, packet_id, reply))
        if self._idle:
            trio.lowlevel.reschedule(self._idle.pop())

    def submit_group(self, handler: GroupHandler, msgs: list[InboundMessage], source: str,
                     packet_ids: list[int | None], reply: GroupReply) -> None:
        """Queue the delivery of a group (:meth:`Delivery.deliver_group`), one slot for all
        of it; ``reply(packet_ids, verdicts)`` is called once, each message's verdict in
        order (one call: the acknowledgements of a group are built and queued together)."""
        self.in_flight += 1
        self._pending.append((_Group(handler, msgs, packet_ids), source, None, reply))
        if self._idle:
            trio.lowlevel.reschedule(self._idle.pop())

    @property
    def full(self) -> bool:
        return self.in_flight >= self.size

    async def wait_slot(self) -> None:
        """Wait until some delivery finished."""
        if self._slot_freed.is_set():
            self._slot_freed = trio.Event()
        await self._slot_freed.wait()

    async def drain(self) -> None:
        """Wait until no delivery is running (bound it with a cancel scope)."""
        while self.in_flight:
            await self.wait_slot()

    async def _next(self) -> tuple[InboundMessage | _Group, str, int | None, Any]:
        # A woken worker may find the deque empty (a busy worker took the message on
        # its way round): it waits again.
        while not self._pending:
            task = trio.lowlevel.current_task()
            self._idle.append(task)

            def abort(_: object) -> trio.lowlevel.Abort:
                self._idle.remove(task)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self._pending.popleft()

    async def _worker(self) -> None:
        deliver = self.delivery.deliver
        while True:
            msg, source, packet_id, reply = await self._next()
            try:
                if type(msg) is _Group:
                    verdicts = await self.delivery.deliver_group(msg.handler, msg.msgs, source, msg.packet_ids)
                    reply(msg.packet_ids, verdicts)
                else:
                    verdict = await deliver(msg, source, packet_id)
                    reply(packet_id, verdict)
            except Exception:  # a bug here must not take the pool down; unacked, it comes again
                self.delivery.log.exception("MQTT delivery failed on %r", msg.topic)
            finally:
                self.in_flight -= 1
                self._slot_freed.set()
