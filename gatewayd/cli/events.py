"""`gatewayd events list` and `gatewayd alerts list`: what happened and what was sent.

Both read the gateway database directly (safe while the daemon runs: WAL).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..core.alerts.events import EVENTS_SCHEMA, EventQuery, parse_time, query_events
from ..core.alerts.notify import NOTIFY_SCHEMA, STATES, list_notifications
from ..core.alerts.rules import SEVERITIES
from ..core.storage import Storage
from .context import add_common_options, load

if TYPE_CHECKING:
    from ..core.config import Config
    from ..plugins.manager import PluginManager

__all__ = ["setup_events", "cmd_events", "setup_alerts", "cmd_alerts"]


def _with_storage(config: Config, fn: Callable[[], Any]) -> Any:
    storage = Storage(config.data_dir / "gatewayd.sqlite3", synchronous=config.storage.synchronous)
    storage.open()
    try:
        storage.install(EVENTS_SCHEMA)  # a fresh data_dir has no tables yet; listing is still fine
        storage.install(NOTIFY_SCHEMA)
        return storage.run_blocking(fn)
    finally:
        storage.close()


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _subcommand(parser: argparse.ArgumentParser, dest: str, help: str) -> argparse.ArgumentParser:

    sub = parser.add_subparsers(dest=dest, metavar="COMMAND", required=True)
    p = sub.add_parser("list", help=help, description=help)
    add_common_options(p, sub=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def setup_events(parser: argparse.ArgumentParser) -> None:
    """`gatewayd events list [--family F] [--device D] [--type T] [--severity S] [--since ISO] ...`"""
    p = _subcommand(parser, "events_command", "list stored events, newest first")
    p.add_argument("--family", help="only this family (plugin)")
    p.add_argument("--device", help="only this device id")
    p.add_argument("--type", action="append", default=[], help="only this event type (repeatable)")
    p.add_argument("--severity", action="append", default=[], choices=SEVERITIES, help="only this severity")
    p.add_argument("--since", metavar="ISO", help="from this time (ISO 8601 or epoch seconds)")
    p.add_argument("--until", metavar="ISO", help="before this time")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N events (1-1000, default 50)")
    p.add_argument("--cursor", help="the next_cursor of a previous --json page")


def cmd_events(args: argparse.Namespace, manager: PluginManager) -> int:

    config = load(args, manager)
    try:
        q = EventQuery(family=args.family, device=args.device, types=args.type, severities=args.severity,
                       limit=args.limit, cursor=args.cursor)
        q.since = parse_time(args.since) if args.since else None
        q.until = parse_time(args.until) if args.until else None
        q.validate()
    except ValueError as e:
        print(f"gatewayd: {e}", file=sys.stderr)
        return 2
    rows, cursor = _with_storage(config, lambda: query_events(q))
    if args.json:
        print(json.dumps({"events": rows, "next_cursor": cursor}, indent=2))
        return 0
    if not rows:
        print("no events")
        return 0
    print(f"{'ID':>6} {'TIME':<20} {'FAMILY':<13} {'DEVICE':<16} {'TYPE':<24} {'SEVERITY':<8} DATA")
    for r in rows:
        data = json.dumps(r["data"], separators=(",", ":"))
        print(f"{r['id']:>6} {_when(r['ts']):<20} {r['family']:<13} {(r['device_id'] or '-'):<16} "
              f"{r['type']:<24} {r['severity']:<8} {data[:60]}")
    if cursor:
        print(f"(more: --cursor {cursor})")
    return 0


def setup_alerts(parser: argparse.ArgumentParser) -> None:
    """`gatewayd alerts list [--state pending|sent|failed] [--json]`"""
    p = _subcommand(parser, "alerts_command", "list alert notifications (the delivery queue), newest first")
    p.add_argument("--state", choices=STATES, help="only notifications in this state")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N (default 50)")


def cmd_alerts(args: argparse.Namespace, manager: PluginManager) -> int:

    config = load(args, manager)
    if not 1 <= args.limit <= 1000:
        print("gatewayd: --limit: expected 1-1000", file=sys.stderr)
        return 2
    rows = _with_storage(config, lambda: list_notifications(args.state, args.limit))
    if args.json:
        print(json.dumps({"alerts": rows}, indent=2))
        return 0
    if not rows:
        print("no alerts" + (f" in state {args.state}" if args.state else ""))
        return 0
    print(f"{'ID':>6} {'CREATED':<20} {'RULE':<24} {'LEVEL':<10} {'ACTION':<8} {'STATE':<8} {'TRIES':>5}  DETAIL")
    for r in rows:
        detail = r["last_error"] or r["target"]
        print(f"{r['id']:>6} {_when(r['created_at']):<20} {r['rule'][:24]:<24} {r['level']:<10} {r['action']:<8} "
              f"{r['state']:<8} {r['attempts']:>5}  {detail[:70]}")
    return 0
