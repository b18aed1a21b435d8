"""`gatewayd tokens add|list|revoke`: scoped read-only API tokens (core/http/tokens.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..core.http.tokens import TOKEN_SCHEMA, TokenStore, parse_ttl
from .context import CliContext

__all__ = ["setup_tokens", "cmd_tokens"]


def setup_tokens(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["add", "list", "revoke"],
                        help="add: issue a token (printed once); list: every token; revoke NAME")
    parser.add_argument("name", nargs="?", help="the token's name (what it is for: lobby-screen, grafana...)")
    parser.add_argument("--scope", action="append", metavar="SCOPE",
                        help="live:<family> or live:* (repeatable)")
    parser.add_argument("--ttl", default="30d", help="lifetime: 30d, 12h, 90m, 3600s (default 30d)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_tokens(args: argparse.Namespace, manager: Any) -> int:
    cli = CliContext(args, manager)
    storage = cli.open_storage()
    try:
        storage.install(TOKEN_SCHEMA)
        store = TokenStore(storage)
        if args.action == "list":
            rows = store.list_blocking()
            print(json.dumps({"tokens": rows}, indent=2) if args.json else _table(rows))
            return 0
        if not args.name:
            print(f"gatewayd tokens {args.action}: name the token", file=sys.stderr)
            return 2
        if args.action == "revoke":
            if not store.revoke_blocking(args.name):
                print(f"gatewayd tokens revoke: no live token named {args.name!r}", file=sys.stderr)
                return 1
            print(f"token {args.name!r} revoked")
            return 0
        try:
            token = store.add_blocking(args.name, args.scope or [], parse_ttl(args.ttl))
        except ValueError as e:
            print(f"gatewayd tokens add: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps({"name": args.name, "token": token}))
        else:
            print(f"token {args.name!r} ({' '.join(args.scope)}), valid {args.ttl}; shown once, keep it now:\n{token}")
        return 0
    finally:
        storage.close()


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no tokens (gatewayd tokens add NAME --scope live:<family>)"
    now = time.time()
    lines = [f"{'name':<24} {'scopes':<28} {'expires':<20} state"]
    for r in rows:
        state = "revoked" if r["revoked"] else ("expired" if r["expires_at"] <= now else "valid")
        expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["expires_at"]))
        lines.append(f"{r['name']:<24} {' '.join(r['scopes']):<28} {expires:<20} {state}")
    return "\n".join(lines)
