"""Delivery marks: how a redelivered MQTT message that was already committed is recognised.

A QoS 1 message is acknowledged after its records are committed. If the gateway dies
between the COMMIT and the PUBACK, the sender (a device through the edge, or mosquitto)
sends the message again with the DUP flag, and without a mark its records would be
stored twice under new record ids, which the cloud cannot tell apart.

So the delivery that runs a message's handlers sets a mark for it (the sender, the
packet id, a digest of topic and payload), and each ``ctx.ingest`` call writes the mark
in the same transaction as its records (``outbox.ingest.delivery_scope``), with the keys
of every call of the delivery committed so far (``outbox.ingest.call_key``): the mark
says which of the message's records are stored. Once every handler returned, and before
the message is acknowledged, the mark is made final (its ``calls`` NULL); a rejected
message's mark is final from the start. A DUP message whose mark is final is
acknowledged without running the handlers again; one whose mark lists calls (the
gateway stopped, or crashed, after some of a handler's ingest calls committed and
before the others did, or before the mark was made final) has its handlers run again,
each call that stores what a listed call stored answered without storing anything, the
others stored. (A handler whose records come out different on its second run, say with
a time taken in its data, has them stored again then.)

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
from typing import TYPE_CHECKING, NamedTuple

import trio

from ..storage import StorageError

if TYPE_CHECKING:
    from ..storage import Storage

__all__ = ["DeliveryMarks", "Mark", "Seen", "digest"]

_TABLES = ("core_mqtt_marks_a", "core_mqtt_marks_b")
# calls: the keys (16 bytes each) of the delivery's ingest calls committed; NULL when final.
_SCHEMA = ("CREATE TABLE IF NOT EXISTS {} (source TEXT NOT NULL, packet_id INTEGER NOT NULL, "
           "digest BLOB NOT NULL, calls BLOB, PRIMARY KEY (source, packet_id)) WITHOUT ROWID")
KEY_SIZE = 16


def digest(topic: str, payload: bytes) -> bytes:
    """What identifies a message's content: 16 bytes of BLAKE2b over topic and payload."""
    h = hashlib.blake2b(topic.encode("utf-8", "surrogatepass"), digest_size=16)
    h.update(b"\0")
    h.update(payload)
    return h.digest()


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


class _Finishing:
    """Marks made final by one write: every delivery that finishes while it waits joins it."""

    __slots__ = ("marks", "done", "error")

    def __init__(self) -> None:
        self.marks: list[Mark] = []
        self.done = trio.Event()
        self.error: BaseException | None = None


class DeliveryMarks:
    """The marks table pair for one database."""

    def __init__(self, storage: Storage, *, window_s: float = 600.0):
        self.storage = storage
        self.window_s = window_s
        self._current = 0  # read and changed on the writer thread only
        self._finishing: _Finishing | None = None  # marks waiting to be made final together

    async def finish(self, mark: Mark) -> None:
        """Make ``mark`` final; return once that is committed (raises StorageError if not).

        Marks finished together share one write: the first one waits a scheduler pass
        for the others (a group commit wakes many deliveries at once), then writes them
        all; those finished while it waits for the writer go in the next write."""
        batch = self._finishing
        if batch is not None:
            batch.marks.append(mark)
            await batch.done.wait()
            if batch.error is not None:
                raise StorageError(f"delivery marks not made final: {batch.error!r}")
            return
        batch = self._finishing = _Finishing()
        batch.marks.append(mark)
        try:
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._finishing = None
            await self.storage.write(self._finish, batch.marks)
        except BaseException as exc:
            batch.error = exc
            raise
        finally:
            if self._finishing is batch:
                self._finishing = None
            batch.done.set()

    def _finish(self, marks: list[Mark]) -> None:
        self.storage.database.connection().executemany(
            f"INSERT OR REPLACE INTO {_TABLES[self._current]} (source, packet_id, digest, calls) VALUES (?, ?, ?, NULL)",
            [(m.source, m.packet_id, m.digest) for m in marks])

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
        self.storage.database.connection().execute(
            f"INSERT OR REPLACE INTO {_TABLES[self._current]} (source, packet_id, digest, calls) VALUES (?, ?, ?, ?)",
            (mark.source, mark.packet_id, mark.digest, calls))

    def _rotate(self) -> None:
        # On the writer thread: marks queued before this job went to the old table,
        # marks queued after it go to the emptied one.
        other = 1 - self._current
        self.storage.database.connection().execute(f"DELETE FROM {_TABLES[other]}")
        self._current = other

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Rotate the tables every ``window_s`` (the first time after ``window_s`` of uptime)."""
        task_status.started()
        while True:
            await trio.sleep(self.window_s)
            await self.storage.write(self._rotate)
