"""Delivery marks: how a redelivered MQTT message that was already committed is recognised.

A QoS 1 message is acknowledged after its records are committed. If the gateway dies
between the COMMIT and the PUBACK, the sender (a device through the edge, or mosquitto)
sends the message again with the DUP flag, and without a mark its records would be
stored twice under new record ids, which the cloud cannot tell apart.

So the delivery that runs a message's handlers sets a mark for it (the sender, the
packet id, a digest of topic and payload), and each ``ctx.ingest`` call writes the mark
in the same transaction as its records (``outbox.ingest.delivery_scope``), with the keys
of every call of the delivery committed so far (``outbox.ingest.call_key``): the mark
says which of the message's records are stored. Once every handler returned the mark is
made final (its ``calls`` NULL); a rejected message's mark is final from the start. A
DUP message whose mark is final is acknowledged without running the handlers again; one
whose mark lists calls (the gateway stopped, or crashed, after some of a handler's
ingest calls committed and before the others did, or before the mark was made final)
has its handlers run again, each call that stores what a listed call stored answered
without storing anything, the others stored. (A handler whose records come out
different on its second run, say with a time taken in its data, has them stored again
then.)

Making a mark final is not on the acknowledgement's path: the message is acknowledged
once its records are committed (what the acknowledgement promises), and :meth:`finish`
only notes the mark as final in memory; the marks noted are written together a few
milliseconds later (``flush_s``, one write for all of them), and on a graceful stop.
Until then the memory answers: a DUP that comes in that window finds the mark final
here and is a duplicate, its handlers not run. A crash in that window loses the note,
not the records: a device that did not get its acknowledgement sends the message again
after the restart, its mark lists every call as committed, so its handlers run again
and every ingest call is answered with what it stored (nothing stored twice), exactly
as after a crash between the commit and the acknowledgement.

What a mark cannot tell apart: a sender that reuses a packet id for a message with
the same topic and payload as the previous message under that id, whose records were
NOT committed before a crash, is taken for a duplicate. That needs a crash in the few
milliseconds between a message's arrival and its commit, and a byte-identical payload
under the same packet id; a device that puts a timestamp or a sequence number in its
payloads (every in-tree family does) never meets it.

Marks only matter until the sender has its PUBACK, which after a crash is when it
reconnects. They are kept in two tables used in turn: marks go to the current one, and
every ``window_s`` the other one is emptied and becomes current, so a mark lives at
least ``window_s`` and at most twice that, and pruning is one cheap DELETE. The first
rotation waits until the gateway has run ``window_s``, so the last marks of a run that
crashed survive however long the gateway was down.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, NamedTuple

import trio

from ..storage import StorageError, core_statements

if TYPE_CHECKING:
    from ..storage import Storage

__all__ = ["DeliveryMarks", "Mark", "Seen", "digest"]

log = logging.getLogger("gatewayd.mqtt")

_TABLES = ("core_mqtt_marks_a", "core_mqtt_marks_b")
# calls: the keys (16 bytes each) of the delivery's ingest calls committed; NULL when final.
_SCHEMA = ("CREATE TABLE IF NOT EXISTS {} (source TEXT NOT NULL, packet_id INTEGER NOT NULL, "
           "digest BLOB NOT NULL, calls BLOB, PRIMARY KEY (source, packet_id)) WITHOUT ROWID")
KEY_SIZE = 16


def digest(topic: str, payload: bytes) -> bytes:
    """What identifies a message's content: 16 bytes of BLAKE2b over topic and payload."""
    # One call (the same bytes hashed as three updates would): this runs per message.
    return hashlib.blake2b(b"%s\0%s" % (topic.encode("utf-8", "surrogatepass"), payload), digest_size=16).digest()


class Seen(NamedTuple):
    """A mark found: ``calls`` are the keys of the ingest calls committed, None when final."""

    calls: list[bytes] | None


class Mark:
    """One delivery's mark; ``write()`` runs on the writer thread, inside a transaction."""

    __slots__ = ("marks", "source", "packet_id", "digest")

    def __init__(self, marks: DeliveryMarks, source: str, packet_id: int, digest: bytes) -> None:
        self.marks, self.source, self.packet_id, self.digest = marks, source, packet_id, digest

    def write(self, calls: bytes | None = None) -> None:
        """With the keys of the ingest calls committed (an ingest call), or final (None)."""
        self.marks._write(self, calls)


class DeliveryMarks:
    """The marks table pair for one database, and the marks made final not yet written."""

    def __init__(self, storage: Storage, *, window_s: float = 600.0, flush_s: float = 0.005):
        self.storage = storage
        self.window_s = window_s
        self.flush_s = flush_s  # how long a final mark waits in memory for others to share its write
        self._current = 0  # read and changed on the writer thread only
        # Marks made final and not written yet, by (sender, packet id): they answer redeliveries.
        self._final: dict[tuple[str, int], Mark] = {}
        self._due = trio.Event()  # set when _final holds a mark to write

    def finish(self, mark: Mark) -> None:
        """Note ``mark`` as final (every handler returned); it is written within ``flush_s``
        (:meth:`run`), and answers a redelivery (:meth:`seen`) from now on."""
        self._final[(mark.source, mark.packet_id)] = mark
        self._due.set()

    def forget(self, source: str, packet_id: int) -> None:
        """A new delivery under this packet id: the older message's final mark (its sender
        had its acknowledgement, or it would not reuse the id) must not overwrite the new one's."""
        self._final.pop((source, packet_id), None)

    @property
    def unwritten(self) -> int:
        """Marks made final, not written yet."""
        return len(self._final)

    async def flush(self) -> None:
        """Write the marks made final so far; return once committed (raises StorageError if
        not: they stay noted, and the next flush tries again)."""
        if not self._final:
            return
        batch = list(self._final.items())
        await self.storage.write(self._finish, [mark for _, mark in batch])
        for key, mark in batch:  # the memory answered until now; the table answers from here
            if self._final.get(key) is mark:
                del self._final[key]

    def _finish(self, marks: list[Mark]) -> None:
        self.storage.database.connection().executemany(
            f"INSERT OR REPLACE INTO {_TABLES[self._current]} (source, packet_id, digest, calls) VALUES (?, ?, ?, NULL)",
            [(m.source, m.packet_id, m.digest) for m in marks])

    def write_final(self, marks: list[Mark]) -> None:
        """Write ``marks`` final, on the writer thread inside the transaction of the records
        they cover (a group's ingest call): no later write, nothing noted in memory."""
        with core_statements():  # refused: our schema, not the handler's SQL (never acknowledged)
            self._finish(marks)

    def install(self) -> None:
        """Create both tables (blocking: call from a thread)."""
        db = self.storage.database
        with db.connection_context():
            for table in _TABLES:
                db.execute_sql(_SCHEMA.format(table))
                if "calls" not in [row[1] for row in db.execute_sql(f"PRAGMA table_info({table})")]:
                    db.execute_sql(f"ALTER TABLE {table} ADD COLUMN calls BLOB")  # marks of an older version: final

    def mark(self, source: str, packet_id: int, topic: str, payload: bytes) -> Mark:
        return Mark(self, source, packet_id, digest(topic, payload))

    async def seen(self, mark: Mark) -> Seen | None:
        """What was committed of a message with this sender, packet id and content; None: nothing."""
        noted = self._final.get((mark.source, mark.packet_id))
        if noted is not None and noted.digest == mark.digest:
            return Seen(None)  # final, not written yet
        return await self.storage.read(self._seen, mark)

    def _seen(self, mark: Mark) -> Seen | None:
        conn = self.storage.database.connection()
        seen = None
        for table in _TABLES:  # a mark made final after a rotation is in both: the final one counts
            row = conn.execute(f"SELECT digest, calls FROM {table} WHERE source = ? AND packet_id = ?",
                               (mark.source, mark.packet_id)).fetchone()
            if row is not None and bytes(row[0]) == mark.digest:
                if row[1] is None:
                    return Seen(None)
                calls = bytes(row[1])
                seen = Seen([calls[i:i + KEY_SIZE] for i in range(0, len(calls), KEY_SIZE)])
        return seen

    def _write(self, mark: Mark, calls: bytes | None) -> None:
        with core_statements():  # refused: our schema, not the handler's SQL (never acknowledged)
            self.storage.database.connection().execute(
                f"INSERT OR REPLACE INTO {_TABLES[self._current]} (source, packet_id, digest, calls) "
                "VALUES (?, ?, ?, ?)", (mark.source, mark.packet_id, mark.digest, calls))

    def _rotate(self) -> None:
        # On the writer thread: marks queued before this job went to the old table,
        # marks queued after it go to the emptied one.
        other = 1 - self._current
        self.storage.database.connection().execute(f"DELETE FROM {_TABLES[other]}")
        self._current = other

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write final marks within ``flush_s`` of their finish; rotate the tables every
        ``window_s`` (the first time after ``window_s`` of uptime). Cancelled, it writes
        what is noted (a graceful stop: the restart then knows those messages are done)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._rotating)
            nursery.start_soon(self._flushing)
            task_status.started()

    async def _rotating(self) -> None:
        while True:
            await trio.sleep(self.window_s)
            try:
                await self.storage.write(self._rotate)
            except Exception as exc:  # noqa: BLE001 - a full disk, read-only: the marks stay, try next time
                log.warning("could not rotate the delivery marks (tried again in %.0f s): %s", self.window_s, exc)

    async def _flushing(self) -> None:
        backoff = 0.0  # after a failed write
        try:
            while True:
                await self._due.wait()
                await trio.sleep(backoff or self.flush_s)  # the marks finished meanwhile share the write
                self._due = trio.Event()
                try:
                    await self.flush()
                    backoff = 0.0
                except Exception as exc:  # noqa: BLE001 - noted still, and answering: try again, less often
                    log.warning("could not write final delivery marks (%d noted): %s", len(self._final), exc)
                    self._due.set()
                    backoff = min(max(backoff * 2, 0.5), 30.0)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.flush()
                except Exception as exc:  # noqa: BLE001 - the stop goes on
                    log.warning("could not write final delivery marks at the stop (%d noted: their "
                                "redeliveries will run the handlers again, storing nothing twice): %s",
                                len(self._final), exc)
