"""A test plugin for durable ingest (tests and bench load it with `-p tests.plugin_ingest`).

`POST /ingest/records {"device", "seq", "value"?, "cls"?}` stores one reading (a row
of its own table plus the outbox record) and answers 201 only after
`ctx.ingest.record` returned, i.e. after COMMIT; 507 when storage is full, 503 when
the commit failed, 400 for bad input. `POST /ingest/bulk {"device", "start",
"count", "cls"?}` stores `count` readings in one call through `ctx.ingest.records`
with the family rows inserted by one prepared statement.
"""

from __future__ import annotations

import peewee
from quart import Blueprint, request

from gatewayd.plugins.api import (
    IngestError,
    ModelRegistry,
    PluginContext,
    Record,
    StorageError,
    StorageFull,
    hookimpl,
)

PLUGIN_NAME = "ingest"


class Reading(peewee.Model):
    device = peewee.TextField()
    seq = peewee.IntegerField()
    value = peewee.FloatField()

    class Meta:
        table_name = "ingest_reading"


@hookimpl
def gatewayd_storage_models(models: ModelRegistry):
    models.add(Reading)


def _bad(message: str, status: int = 400):
    return {"error": message}, status


@hookimpl
def gatewayd_http_routes(ctx: PluginContext):
    bp = Blueprint("ingest", __name__)

    @bp.post("/records")
    async def one():
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("seq"), int) or not body.get("device"):
            return _bad('expected {"device": str, "seq": int}')
        device, seq, value = str(body["device"]), body["seq"], float(body.get("value", 0.0))
        try:
            stored = await ctx.ingest.record(
                device, "reading", {"seq": seq, "value": value}, cls=body.get("cls", "history"),
                family_rows=lambda: Reading.insert(device=device, seq=seq, value=value).execute(),
            )
        except IngestError as e:
            return _bad(str(e))
        except StorageFull as e:
            return _bad(f"storage full: {e}", 507)
        except StorageError as e:
            return _bad(f"storage unavailable: {e}", 503)
        return {"id": stored.ids[0] if stored.ids else None, "row": stored.result}, 201

    @bp.post("/bulk")
    async def bulk():
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("start"), int) or not isinstance(body.get("count"), int):
            return _bad('expected {"device": str, "start": int, "count": int}')
        device, start, count = str(body.get("device", "d")), body["start"], body["count"]
        cls = body.get("cls", "history")
        seqs = range(start, start + count)
        rows = [(device, s, float(s)) for s in seqs]

        def family_rows():
            ctx.storage.database.connection().executemany(
                "INSERT INTO ingest_reading (device, seq, value) VALUES (?, ?, ?)", rows
            )

        try:
            stored = await ctx.ingest.records(
                [Record(device, "reading", {"seq": s, "value": float(s)}, None, cls) for s in seqs],
                family_rows=family_rows,
            )
        except IngestError as e:
            return _bad(str(e))
        except StorageFull as e:
            return _bad(f"storage full: {e}", 507)
        except StorageError as e:
            return _bad(f"storage unavailable: {e}", 503)
        return {"ids": [stored.ids.start, stored.ids.stop]}, 201

    @bp.get("/count")
    async def count():
        return {"count": await ctx.storage.read(lambda: Reading.select().count())}

    return bp
