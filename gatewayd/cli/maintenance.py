"""`gatewayd maintenance on|off|status`: the operator's switch (core/maintenance.py).

It writes the database directly, so it works while the daemon runs; the daemon follows
within a second. While it is on, device families that have a maintenance answer give it
(edgesentinel: 503 with `next_hint`); storage, upstream sync and the admin API go on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..core.maintenance import Maintenance, MaintenanceState, check
from .context import CliContext

__all__ = ["setup_maintenance", "cmd_maintenance"]


def setup_maintenance(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["on", "off", "status"], help="switch maintenance mode on or off, or show it")
    parser.add_argument("--reason", default="", help="why (shown in /health, the admin API and the log)")
    parser.add_argument("--retry-after", type=int, default=300, metavar="S",
                        help="what devices are told: come back after S seconds (default 300)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_maintenance(args: argparse.Namespace, manager: Any) -> int:
    cli = CliContext(args, manager)
    storage = cli.open_storage()
    try:
        maintenance = Maintenance(storage)
        maintenance.install()
        if args.action != "status":
            try:
                state = check(args.action == "on", args.reason, args.retry_after)
            except ValueError as e:
                print(f"gatewayd maintenance: {e}", file=sys.stderr)
                return 2
            maintenance.set_blocking(state)
        _show(maintenance.state, args.json)
        return 0
    finally:
        storage.close()


def _show(state: MaintenanceState, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"maintenance": state.as_json()}))
    elif state.active:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.since or 0))
        print(f"maintenance mode ON since {since}" + (f": {state.reason}" if state.reason else "")
              + f" (devices are told to retry after {state.retry_after_s} s)")
    else:
        print("maintenance mode off")
