"""The outbox's tables (`core_outbox*`, `core_dead_letter`): peewee models for the schema.

The hot paths (ingest, batch selection, delivery) run prepared statements over these
tables through the database's own connection; the models define the schema, its
indexes and migrations, and serve the operator's slow paths.
"""

from __future__ import annotations

import peewee

from ..storage import SchemaSpec

__all__ = ["OutboxRecord", "OutboxCount", "OutboxSink", "OutboxBatch", "DeadLetter", "MODELS", "SCHEMA"]


class OutboxRecord(peewee.Model):
    # Ids come from the high-water mark `seq:outbox` in core_outbox_count, never from
    # SQLite's max(rowid)+1: an id is never reused, even after the newest row left, and
    # ids are the upstream dedup key (a reused one would be dropped as a duplicate).
    # (AUTOINCREMENT does the same at ~30 % of the insert rate.)
    id = peewee.IntegerField(primary_key=True)
    prio = peewee.SmallIntegerField()
    pending = peewee.BigIntegerField()  # bit mask of the sinks that still have to deliver it
    created = peewee.FloatField()
    ts = peewee.FloatField()
    family = peewee.TextField()
    device = peewee.TextField()
    kind = peewee.TextField()
    size = peewee.IntegerField()
    data = peewee.TextField()  # compact JSON, serialised once at ingest and sent as it is

    class Meta:
        table_name = "core_outbox"
        indexes = ((("prio", "id", "pending"), False),)


class OutboxCount(peewee.Model):
    key = peewee.TextField(primary_key=True)  # "class:<name>", "sink:<name>", "seq:outbox" (last id)
    rows = peewee.BigIntegerField(default=0)
    bytes = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "core_outbox_count"


class OutboxSink(peewee.Model):
    name = peewee.TextField(primary_key=True)
    bit = peewee.IntegerField(unique=True)
    delivered = peewee.BigIntegerField(default=0)
    batches = peewee.BigIntegerField(default=0)
    last_success = peewee.FloatField(null=True)
    last_error = peewee.TextField(null=True)
    last_error_at = peewee.FloatField(null=True)

    class Meta:
        table_name = "core_outbox_sink"


class OutboxBatch(peewee.Model):
    batch_id = peewee.TextField(primary_key=True)
    sink = peewee.TextField(index=True)
    created = peewee.FloatField()
    record_ids = peewee.BlobField()  # array('q') bytes, in sending order

    class Meta:
        table_name = "core_outbox_batch"


class DeadLetter(peewee.Model):
    id = peewee.AutoField()
    sink = peewee.TextField()
    batch_id = peewee.TextField()
    status = peewee.IntegerField()
    reason = peewee.TextField()
    created = peewee.FloatField()
    count = peewee.IntegerField()
    records = peewee.TextField()  # JSON: [[id, prio, created, ts, family, device, kind, size, data], ...]

    class Meta:
        table_name = "core_dead_letter"


MODELS = [OutboxRecord, OutboxCount, OutboxSink, OutboxBatch, DeadLetter]
SCHEMA = SchemaSpec("outbox", MODELS, 1)
