"""Inbound MQTT delivery for :class:`gatewayd.core.mqtt.MQTTClient`: handlers, acks, rejects.

Kept apart from the connection code: this is the delivery policy, the part that carries
"nothing acknowledged before it is committed".

- Every message goes to every matching router handler, run by a fixed pool of tasks
  (``max_in_flight``) so that many handlers wait on the storage layer's group commit
  together. The pool costs less per message than a task per message; it is fed by a
  deque and wakes an idle worker directly (a memory channel costs twice as much), and a
  worker that finishes a message takes the next one in the same scheduler step.
- All handlers returned: PUBACK. A handler raised :class:`Rejected`: PUBACK too (a
  poison message must not come back forever), after ``record_rejected`` stored it.
  Anything else: no PUBACK, counted, logged (one traceback per 10 s), and
  ``on_failure`` asks the client for a reconnect so the broker redelivers.
- A PUBACK only goes out on the connection its message came on (``generation``):
  packet ids are reused per connection. Acks due at the same moment go out in one write.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import MessageType

if TYPE_CHECKING:
    from .mqtt import MessageHandler, MQTTStats, RecordRejected
    from .topics import TopicRouter

__all__ = ["InboundDispatcher"]

_PUBACK = struct.Struct("!BBH")  # fixed header 0x40, remaining length 2, packet id


class InboundDispatcher:
    """Runs the handlers of inbound messages and collects the PUBACKs they earn."""

    def __init__(
        self,
        client: paho.Client,
        router: TopicRouter[MessageHandler],
        stats: MQTTStats,
        log: logging.Logger,
        *,
        max_in_flight: int,
        record_rejected: RecordRejected | None,
        on_failure: Callable[[], None],
    ) -> None:
        self._client = client
        self._router = router
        self._stats = stats
        self._log = log
        self._max_in_flight = max_in_flight
        self._record_rejected = record_rejected
        self._on_failure = on_failure
        self._pending: deque[tuple[paho.MQTTMessage, int]] = deque()
        self._idle: list[trio.lowlevel.Task] = []  # workers waiting for a message
        self._running = False
        self._generation: int | None = None  # the live connection's, None when down
        self._acks: list[int] = []
        self._acks_due = trio.Event()
        self._slot_freed = trio.Event()
        self.in_flight = 0
        self.paused = False  # new arrivals stay unacknowledged (redelivered later)
        self._error_log_at = 0.0
        self._errors_unlogged = 0

    # --- wiring with the connection ----------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The handler pool; runs as long as the client. The pending deque is bounded by
        the reader, which stops reading at ``max_in_flight`` (see :meth:`full`)."""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self._max_in_flight):
                    nursery.start_soon(self._worker)
                self._running = True
                task_status.started()
        finally:
            self._running = False

    def connection_up(self, generation: int) -> None:
        self._generation = generation

    def connection_down(self) -> None:
        self._generation = None
        self._stats.stale_acks += len(self._acks)  # their messages come back on reconnect
        self._acks.clear()

    def submit(self, msg: paho.MQTTMessage, generation: int) -> None:
        """Called from paho's on_message (on the trio thread)."""
        if self.paused or not self._running:
            self._stats.deferred += 1  # not acked: the broker gives it back after reconnect
            return
        self.in_flight += 1
        self._pending.append((msg, generation))
        if self._idle:
            trio.lowlevel.reschedule(self._idle.pop())

    @property
    def full(self) -> bool:
        return self.in_flight >= self._max_in_flight

    async def wait_slot(self) -> None:
        """Wait until some handler finished."""
        self._slot_freed = trio.Event()
        await self._slot_freed.wait()

    async def drain(self) -> None:
        """Wait until no handler is running (bound it with a cancel scope)."""
        while self.in_flight:
            await self.wait_slot()

    async def acks_due(self) -> None:
        """Wait until PUBACKs are due. The client's sender then calls :meth:`send_acks`:
        handlers woken by one group commit all finish in the same scheduler pass, and the
        sender runs in the next one, so their PUBACKs go out in one write, not one each."""
        await self._acks_due.wait()
        self._acks_due = trio.Event()

    def send_acks(self) -> None:
        mids, self._acks = self._acks, []
        if not mids:
            return
        queue = getattr(self._client, "_packet_queue", None)
        if queue is not None:
            # paho's own PUBACK is exactly this packet; ack() would queue them one by one.
            queue(MessageType.PUBACK, b"".join(_PUBACK.pack(0x40, 2, mid) for mid in mids), 0, 1)
        else:  # a paho without that private queue: one ack() each
            for mid in mids:
                self._client.ack(mid, 1)
        self._stats.acked += len(mids)

    # --- per message -------------------------------------------------------------------

    async def _next(self) -> tuple[paho.MQTTMessage, int]:
        # A woken worker may find the deque empty (a busy worker took the message on
        # its way round): it just waits again.
        while not self._pending:
            task = trio.lowlevel.current_task()
            self._idle.append(task)

            def abort(_: object) -> trio.lowlevel.Abort:
                self._idle.remove(task)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self._pending.popleft()

    async def _worker(self) -> None:
        from .mqtt import InboundMessage, Rejected  # the public types live with the client

        while True:
            msg, generation = await self._next()
            topic = "?"
            try:
                try:
                    topic = msg.topic
                except UnicodeDecodeError:
                    await self._reject(repr(msg._topic), msg.payload, "topic is not valid UTF-8")
                    self._ack(msg, generation)
                    continue
                handlers = self._router.handlers_for(topic)
                if not handlers:
                    self._stats.unrouted += 1
                    self._ack(msg, generation)
                    continue
                message = InboundMessage(topic, msg.payload, msg.qos, bool(msg.retain), bool(msg.dup))
                reason = None
                for handler in handlers:
                    try:
                        await handler(message)
                    except Rejected as exc:
                        reason = exc.reason
                if reason is not None:
                    await self._reject(topic, msg.payload, reason)
                self._ack(msg, generation)
            except Exception as exc:  # noqa: BLE001 - any failure means: do not ack
                self._stats.handler_errors += 1
                self._stats.last_error = f"handler for {topic!r} failed: {exc!r}"
                self._log_failure(topic, exc)
                self._on_failure()
            finally:
                self.in_flight -= 1
                self._slot_freed.set()

    async def _reject(self, topic: str, payload: bytes, reason: str) -> None:
        if self._record_rejected is not None:
            await self._record_rejected(topic, payload, reason)  # raising here: not acked
        self._stats.rejected += 1
        self._log.info("rejected MQTT message on %r: %s", topic, reason)

    def _ack(self, msg: paho.MQTTMessage, generation: int) -> None:
        if msg.qos == 0:
            return
        if generation != self._generation:
            self._stats.stale_acks += 1  # its connection is gone; the broker redelivers it
            return
        self._acks.append(msg.mid)
        self._acks_due.set()

    def _log_failure(self, topic: str, exc: Exception) -> None:
        # With storage down every message fails: one traceback per 10 s, not 10k/s.
        now = time.monotonic()
        if now - self._error_log_at >= 10:
            extra = f" ({self._errors_unlogged} more since the last report)" if self._errors_unlogged else ""
            self._log.error("MQTT handler for %r failed; message left unacknowledged%s", topic, extra, exc_info=exc)
            self._error_log_at = now
            self._errors_unlogged = 0
        else:
            self._errors_unlogged += 1

    def __repr__(self) -> str:
        return f"<InboundDispatcher in_flight={self.in_flight} acks_due={len(self._acks)}>"
