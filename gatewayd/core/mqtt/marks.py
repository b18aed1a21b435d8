"""Delivery marks: how a redelivered MQTT message that was already committed is recognised.

A QoS 1 message is acknowledged after its records are committed. If the gateway dies
between the COMMIT and the PUBACK, the sender (a device through the edge, or mosquitto)
sends the message again with the DUP flag, and without a mark its records would be
stored twice under new record ids, which the cloud cannot tell apart.

So the delivery that runs a message's handlers sets a mark for it (the sender, the
packet id, a digest of topic and payload), and ``ctx.ingest`` writes the mark in the
same transaction as the records (``outbox.ingest.delivery_scope``): the mark
exists exactly when the records do. A DUP message whose mark is found is acknowledged
without running the handlers again.

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
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ..storage import Storage

__all__ = ["DeliveryMarks", "Mark", "digest"]

_TABLES = ("core_mqtt_marks_a", "core_mqtt_marks_b")
_SCHEMA = ("CREATE TABLE IF NOT EXISTS {} (source TEXT NOT NULL, packet_id INTEGER NOT NULL, "
           "digest BLOB NOT NULL, PRIMARY KEY (source, packet_id)) WITHOUT ROWID")


def digest(topic: str, payload: bytes) -> bytes:
    """What identifies a message's content: 16 bytes of BLAKE2b over topic and payload."""
    h = hashlib.blake2b(topic.encode("utf-8", "surrogatepass"), digest_size=16)
    h.update(b"\0")
    h.update(payload)
    return h.digest()


class Mark:
    """One delivery's mark; ``write()`` runs on the writer thread, inside a transaction."""

    __slots__ = ("marks", "source", "packet_id", "digest")

    def __init__(self, marks: DeliveryMarks, source: str, packet_id: int, digest: bytes) -> None:
        self.marks, self.source, self.packet_id, self.digest = marks, source, packet_id, digest

    def write(self) -> None:
        self.marks._write(self)


class DeliveryMarks:
    """The marks table pair for one database."""

    def __init__(self, storage: Storage, *, window_s: float = 600.0):
        self.storage = storage
        self.window_s = window_s
        self._current = 0  # read and changed on the writer thread only

    def install(self) -> None:
        """Create both tables (blocking: call from a thread)."""
        db = self.storage.database
        with db.connection_context():
            for table in _TABLES:
                db.execute_sql(_SCHEMA.format(table))

    def mark(self, source: str, packet_id: int, topic: str, payload: bytes) -> Mark:
        return Mark(self, source, packet_id, digest(topic, payload))

    async def seen(self, mark: Mark) -> bool:
        """True if a message with this sender, packet id and content was committed."""
        return await self.storage.read(self._seen, mark)

    def _seen(self, mark: Mark) -> bool:
        conn = self.storage.database.connection()
        for table in _TABLES:
            row = conn.execute(f"SELECT digest FROM {table} WHERE source = ? AND packet_id = ?",
                               (mark.source, mark.packet_id)).fetchone()
            if row is not None and bytes(row[0]) == mark.digest:
                return True
        return False

    def _write(self, mark: Mark) -> None:
        self.storage.database.connection().execute(
            f"INSERT OR REPLACE INTO {_TABLES[self._current]} (source, packet_id, digest) VALUES (?, ?, ?)",
            (mark.source, mark.packet_id, mark.digest))

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
