"""`gatewayd outbox status|dead-letters|retry-dead|forget-sink`: the operator's view of the outbox.

They open the database directly (safe while the daemon runs: WAL), so they work when
the daemon is down too. `status` also asks a running daemon's `/health` for what
only it knows (circuit breakers, the error of the last attempt).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx

from ..core.outbox.store import Outbox
from .context import CliContext

__all__ = ["setup_outbox", "cmd_outbox"]


def setup_outbox(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["status", "dead-letters", "retry-dead", "forget-sink"],
                        help="status: per class and per sink; dead-letters: batches set aside; "
                             "retry-dead: put dead-lettered records back in the outbox; "
                             "forget-sink NAME: drop the backlog kept for a sink removed from [[upstream]]")
    parser.add_argument("sink", nargs="?", help="forget-sink: the removed sink's name")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--id", type=int, action="append", metavar="N",
                        help="retry-dead: only this dead letter (repeatable; default: all)")


def cmd_outbox(args: argparse.Namespace, manager: Any) -> int:

    cli = CliContext(args, manager)
    config = cli.config
    storage = cli.open_storage()
    try:
        outbox = Outbox.from_config(storage, config)
        outbox.install()
        if args.action == "status":
            doc = storage.run_blocking(outbox.status)
            _merge_live(doc, config)
            print(json.dumps(doc, indent=2) if args.json else _status_text(doc))
        elif args.action == "dead-letters":
            rows = storage.run_blocking(outbox.dead_letters)
            print(json.dumps({"dead_letters": rows}, indent=2) if args.json else _dead_text(rows))
        elif args.action == "forget-sink":
            if not args.sink:
                print("gatewayd outbox forget-sink: name the sink (see 'gatewayd outbox status')", file=sys.stderr)
                return 2
            try:
                owed = storage.run_blocking(outbox.forget_sink, args.sink)
            except ValueError as e:
                print(f"gatewayd outbox forget-sink: {e}", file=sys.stderr)
                return 2
            print(json.dumps({"sink": args.sink, "records": owed}) if args.json else
                  f"sink {args.sink!r} forgotten: {owed} records it had not delivered are no longer kept for it")
        else:
            batches, records = storage.run_blocking(outbox.retry_dead, args.id)
            doc = {"batches": batches, "records": records}
            print(json.dumps(doc) if args.json else f"{records} records of {batches} dead-lettered batches "
                  "are back in the outbox (same record ids; they go out in new batches)")
    finally:
        storage.close()
    return 0


def _merge_live(doc: dict[str, Any], config: Any) -> None:
    """Add what only the running daemon knows; say so when it is not reachable."""
    listen = config.http.listen
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "::") else listen.host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{listen.port}/health"
    try:
        components = httpx.get(url, timeout=1.0).json().get("components", {})
    except (httpx.HTTPError, ValueError):
        doc["daemon"] = "not reachable (breaker states unknown)"
        return
    doc["daemon"] = "running"
    for name, sink in doc["sinks"].items():
        live = components.get(f"upstream.{name}", {})
        sink["state"] = live.get("state", "not running")
        sink["breaker"] = live.get("breaker")
        if live.get("reason"):
            sink["reason"] = live["reason"]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _when(epoch: float | None) -> str:
    return "never" if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _status_text(doc: dict[str, Any]) -> str:
    lines = [f"{'CLASS':<12} {'RECORDS':>10} {'BYTES':>12} {'OLDEST':>8}"]
    for name, c in doc["classes"].items():
        lines.append(f"{name:<12} {c['rows']:>10} {c['bytes']:>12} {_age(c['oldest_age_s']):>8}")
    lines.append("")
    if not doc["sinks"]:
        lines.append("no upstream configured ([[upstream]] in the config): records are not queued")
    for name, s in doc["sinks"].items():
        state = s.get("state", "-") + (f", breaker {s['breaker']}" if s.get("breaker") else "")
        lines.append(f"sink {name}{'' if s['configured'] else ' (no longer configured)'}: {state}")
        lines.append(f"  backlog       {s['backlog']} records, {s['backlog_bytes']} bytes, "
                     f"{s['open_batches']} open batches")
        lines.append(f"  delivered     {s['delivered']} records in {s['batches']} batches; "
                     f"last success {_when(s['last_success'])}")
        if s["last_error"]:
            lines.append(f"  last error    {_when(s['last_error_at'])}: {s['last_error']}")
    d = doc["dead_letters"]
    lines.append(f"\ndead letters: {d['batches']} batches, {d['records']} records"
                 + (" (gatewayd outbox dead-letters)" if d["batches"] else ""))
    if "daemon" in doc:
        lines.append(f"daemon: {doc['daemon']}")
    return "\n".join(lines)


def _dead_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no dead letters"
    lines = [f"{'ID':>5} {'SINK':<12} {'STATUS':>6} {'RECORDS':>8} {'WHEN':<21} REASON"]
    for r in rows:
        lines.append(f"{r['id']:>5} {r['sink']:<12} {r['status']:>6} {r['records']:>8} {_when(r['created']):<21} "
                     f"{r['reason']}")
    lines.append("\nretry with: gatewayd outbox retry-dead [--id N]")
    return "\n".join(lines)
