"""The reference receiver of the upstream batch protocol (``gatewayd receive``).

A small QuartTrio app that does what a cloud endpoint must do: verify, decompress,
deduplicate by Idempotency-Key and by (gateway id, record id), store, and answer the
counts. It backs the sync tests and demos, and shows integrators the semantics in
running code. SQLite (stdlib ``sqlite3``, WAL) is used from worker threads only.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ...protocol.batch import DecodedBatch, ProtocolError, compact_json_encoder, decode_batch, rfc3339_utc

__all__ = ["ReceiverStore", "create_receiver_app", "export_records"]

log = logging.getLogger("gatewayd.receiver")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_DECOMPRESSED_BYTES = 64 * 1024 * 1024

# record_id has no declared type on purpose: no column affinity, so 7 and "7" stay
# distinct ids and come back out with the JSON type they went in with.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    gateway_id  TEXT NOT NULL,
    record_id   NOT NULL,
    family      TEXT NOT NULL,
    device      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    "class"     TEXT NOT NULL,
    ts          TEXT NOT NULL,
    data        TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (gateway_id, record_id)
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id     TEXT PRIMARY KEY,
    gateway_id   TEXT NOT NULL,
    accepted     INTEGER NOT NULL,
    duplicates   INTEGER NOT NULL,
    rejected     INTEGER NOT NULL,
    rejections   TEXT NOT NULL DEFAULT '[]',
    received_at  TEXT NOT NULL
);
"""


class ReceiverStore:
    """The receiver's SQLite file. Blocking: call it from a worker thread, one
    call at a time (the app serialises through a ``CapacityLimiter(1)``)."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path)
        self._conn: sqlite3.Connection | None = None

    def connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # check_same_thread=False: trio's worker threads vary, the limiter
            # guarantees only one of them uses the connection at a time.
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def store_batch(self, batch: DecodedBatch, received_at: str) -> tuple[int, dict[str, Any]]:
        """Store one verified batch in one transaction; returns (status, counts).

        200 for a new batch; 409 with the original counts for a batch id this
        gateway already delivered; 400 for a batch id another gateway used.
        """
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            seen = conn.execute(
                "SELECT gateway_id, accepted, duplicates, rejected, rejections"
                " FROM batches WHERE batch_id = ?",
                (batch.batch_id,),
            ).fetchone()
            if seen is not None:
                conn.execute("ROLLBACK")
                if seen[0] != batch.gateway_id:
                    return 400, _error_body(400, "batch_id_conflict", "batch id used by another gateway")
                return 409, _counts(seen[1], seen[2], seen[3], json.loads(seen[4]))
            gateway_id, encode = batch.gateway_id, compact_json_encoder()  # decode refused NaN
            rows = [
                (gateway_id, r["id"], r["family"], r["device"], r["kind"], r["class"], r["ts"], encode(r["data"]),
                 received_at)
                for r in batch.records
            ]
            cursor = conn.executemany(
                "INSERT OR IGNORE INTO records (gateway_id, record_id, family, device, kind,"
                ' "class", ts, data, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
                rows,
            )
            accepted = cursor.rowcount if rows else 0
            rejections = [
                {"index": r.index, "id": r.id, "reason": r.reason} for r in batch.rejected
            ]
            counts = _counts(accepted, len(rows) - accepted, len(rejections), rejections)
            conn.execute(
                "INSERT INTO batches (batch_id, gateway_id, accepted, duplicates, rejected,"
                " rejections, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    batch.batch_id,
                    batch.gateway_id,
                    counts["accepted"],
                    counts["duplicates"],
                    counts["rejected"],
                    json.dumps(rejections),
                    received_at,
                ),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return 200, counts

    def stats(self) -> dict[str, Any]:
        conn = self.connection()
        (batches,) = conn.execute("SELECT COUNT(*) FROM batches").fetchone()
        (records,) = conn.execute("SELECT COUNT(*) FROM records").fetchone()
        per_gateway = conn.execute("SELECT gateway_id, COUNT(*) FROM records GROUP BY gateway_id")
        per_class = conn.execute('SELECT "class", COUNT(*) FROM records GROUP BY "class"')
        return {
            "batches": batches,
            "records": records,
            "gateways": dict(per_gateway.fetchall()),
            "classes": dict(per_class.fetchall()),
        }


def export_records(db_path: str | Path) -> Iterator[dict[str, Any]]:
    """Every stored record, in arrival order, as the dict ``--export`` prints."""
    conn = sqlite3.connect(Path(db_path).resolve().as_uri() + "?mode=ro", uri=True)
    try:
        cursor = conn.execute(
            'SELECT gateway_id, record_id, family, device, kind, "class", ts, data'
            " FROM records ORDER BY rowid"
        )
        for gateway_id, record_id, family, device, kind, cls, ts, data in cursor:
            yield {
                "gateway_id": gateway_id,
                "record_id": record_id,
                "family": family,
                "device": device,
                "kind": kind,
                "class": cls,
                "ts": ts,
                "data": json.loads(data),
            }
    finally:
        conn.close()


def create_receiver_app(
    db_path: str | Path,
    secrets: Mapping[str, bytes],
    *,
    fail_rate: float = 0.0,
    status: int | None = None,
    delay_ms: int = 0,
    rng: random.Random | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES,
    max_skew_s: float = 300,
    clock: Callable[[], float] = time.time,
) -> QuartTrio:
    """Build the receiver app: ``POST /v1/batch``, ``GET /v1/health``, ``GET /v1/stats``.

    ``secrets`` maps gateway id to its HMAC secret; the key ``"*"`` is a secret
    for any gateway id not listed. Fault injection, for tests and demos:
    ``status`` answers every batch with that code and stores nothing;
    ``fail_rate`` answers that fraction of batches 503 with ``Retry-After: 1``
    before storing anything (drawn from ``rng``); ``delay_ms`` delays every
    answer. ``clock`` is the wall clock the signature timestamp is checked against.
    """
    if not 0.0 <= fail_rate <= 1.0:
        raise ValueError("fail_rate must be within [0, 1]")
    if status is not None and not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status code")
    app = QuartTrio("gatewayd.receiver")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    store = ReceiverStore(db_path)
    # One SQLite connection, one user at a time; also orders concurrent duplicates.
    db_limiter = trio.CapacityLimiter(1)
    # Each decode may hold max_decompressed_bytes in memory: bound how many run at once.
    decode_limiter = trio.CapacityLimiter(4)
    draw = rng if rng is not None else random.Random()

    def secret_for(gateway_id: str) -> bytes | None:
        return secrets.get(gateway_id, secrets.get("*"))

    async def in_db(fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=db_limiter)

    @app.after_serving
    async def close_store() -> None:
        await in_db(store.close)

    @app.errorhandler(RequestEntityTooLarge)
    async def too_large(_: Exception) -> Response:
        return _error(413, "too_large", f"body larger than {max_body_bytes} bytes")

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        return _error(exc.code or 500, code, exc.description or "")

    @app.get("/v1/health")
    async def health() -> Response:
        return _json(200, {"status": "ok"})

    @app.get("/v1/stats")
    async def stats() -> Response:
        return _json(200, await in_db(store.stats))

    @app.post("/v1/batch")
    async def post_batch() -> Response:
        body = await request.get_data(cache=False)
        if delay_ms:
            await trio.sleep(delay_ms / 1000)
        if status is not None:
            return _injected(status)
        if fail_rate and draw.random() < fail_rate:
            return _injected(503)
        try:
            # Decompression and JSON parsing of a few MB is CPU work: off the trio thread.
            batch = await trio.to_thread.run_sync(
                partial(
                    decode_batch,
                    body,
                    dict(request.headers.items()),
                    secret_for=secret_for,
                    now=clock(),
                    max_skew_s=max_skew_s,
                    max_decompressed_bytes=max_decompressed_bytes,
                ),
                limiter=decode_limiter,
            )
        except ProtocolError as exc:
            log.warning(
                "refused batch %s from %s: %s %s",
                request.headers.get("Idempotency-Key", "-"),
                request.headers.get("X-Gateway-Id", "-"),
                exc.status,
                exc.message,
            )
            return _error(exc.status, exc.code, exc.message)
        code, answer = await in_db(store.store_batch, batch, rfc3339_utc(clock()))
        log.info(
            "batch %s from %s: %s accepted=%s duplicates=%s rejected=%s",
            batch.batch_id,
            batch.gateway_id,
            code,
            answer.get("accepted"),
            answer.get("duplicates"),
            answer.get("rejected"),
        )
        for rejection in batch.rejected if code == 200 else ():
            log.warning(
                "batch %s record #%d rejected: %s", batch.batch_id, rejection.index, rejection.reason
            )
        return _json(code, answer)

    return app


def _counts(
    accepted: int, duplicates: int, rejected: int, rejections: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "accepted": accepted,
        "duplicates": duplicates,
        "rejected": rejected,
        "rejected_ids": [r["id"] for r in rejections],
        "rejections": rejections,
        "next_hint": None,
    }


def _error_body(status: int, code: str, message: str) -> dict[str, Any]:
    # The core's error shape (gatewayd.core.http.app), so one client parser fits both.
    return {"error": {"status": status, "code": code, "message": message}}


def _json(status: int, doc: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(doc, allow_nan=False), status=status, headers=headers, content_type="application/json"
    )


def _error(status: int, code: str, message: str) -> Response:
    return _json(status, _error_body(status, code, message))


def _injected(status: int) -> Response:
    if status < 400:
        return _json(status, _counts(0, 0, 0, []))
    doc = _error_body(status, "injected_fault", f"fault injection: answering {status}")
    headers = None
    if status in (429, 503):
        headers = {"Retry-After": "1"}
        doc["next_hint"] = "backoff_ms: 1000"
    return _json(status, doc, headers)
