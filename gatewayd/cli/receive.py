"""``gatewayd receive``: run the reference receiver, or export what it stored.

The lead's CLI wires :func:`add_receive_arguments` and :func:`run_receive` in as a
sub-command; ``python -m gatewayd.cli.receive`` runs it stand-alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import sys
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

from ..core.upstream.receiver import create_receiver_app, export_records

__all__ = ["DEFAULT_SECRET_ENV", "add_receive_arguments", "main", "parse_listen", "run_receive"]

DEFAULT_SECRET_ENV = "GATEWAYD_UPSTREAM_SECRET"


def add_receive_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``receive`` options to ``parser``."""
    add = parser.add_argument
    add("--listen", default="127.0.0.1:9000", metavar="HOST:PORT",
        help="address to serve on; port 0 picks a free port (default %(default)s)")
    add("--db", required=True, metavar="PATH", help="SQLite file to store records in")
    add("--secret-env", default=DEFAULT_SECRET_ENV, metavar="VAR",
        help="environment variable holding the shared HMAC secret (default %(default)s)")
    add("--gateway-id", metavar="ID",
        help="accept only this gateway id (default: any id, with the one secret)")
    add("--export", action="store_true",
        help="print every stored record as one JSON line, then exit")
    add("--fail-rate", type=float, default=0.0, metavar="FRACTION",
        help="answer this fraction of batches 503 + Retry-After: 1 (fault injection)")
    add("--status", type=int, metavar="CODE",
        help="answer every batch with this status, storing nothing (fault injection)")
    add("--delay-ms", type=int, default=0, metavar="MS",
        help="delay every batch answer by this many milliseconds")

def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` -> (host, port); ValueError if malformed."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen must be HOST:PORT, got {value!r}")
    return host, int(port)


def run_receive(args: argparse.Namespace) -> int:
    """Run ``gatewayd receive``; returns the process exit code.

    0 after a clean stop (SIGINT/SIGTERM) or an export, 2 for bad arguments,
    1 when the address cannot be bound.
    """
    if args.export:
        return _export(args.db)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        return _usage(str(exc))
    secret = os.environ.get(args.secret_env or "")
    if not secret:
        return _usage(f"environment variable {args.secret_env} (the HMAC secret) is not set")
    if not 0.0 <= args.fail_rate <= 1.0:
        return _usage("--fail-rate must be within 0..1")
    if args.status is not None and not 100 <= args.status <= 599:
        return _usage("--status must be an HTTP status code (100..599)")
    if args.delay_ms < 0:
        return _usage("--delay-ms must not be negative")

    app = create_receiver_app(
        args.db,
        {args.gateway_id or "*": secret.encode("utf-8")},
        fail_rate=args.fail_rate,
        status=args.status,
        delay_ms=args.delay_ms,
    )
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = 5.0
    # Through our logging rather than hypercorn's own stderr handler (no double lines).
    config.errorlog = logging.getLogger("gatewayd.receiver.http")
    try:
        trio.run(_serve, app, config)
    except (OSError, BaseExceptionGroup) as exc:
        # A bind failure surfaces from inside hypercorn's nurseries, possibly grouped.
        error = _first_os_error(exc)
        if error is None:
            raise
        print(f"gatewayd receive: cannot serve on {args.listen}: {error}", file=sys.stderr)
        return 1
    return 0


def _first_os_error(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _first_os_error(inner)) is not None:
                return found
    return None


async def _serve(app: QuartTrio, config: Config) -> None:
    # Capturing the signals (rather than letting SIGINT raise KeyboardInterrupt)
    # turns both into hypercorn's graceful shutdown, and the exit code into 0.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def shutdown_trigger() -> None:
            async for signum in signals:
                name = signal.Signals(signum).name
                logging.getLogger("gatewayd.receiver").info("%s: shutting down", name)
                return

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(serve, app, config, shutdown_trigger=shutdown_trigger)
            )
            print(f"gatewayd receive: listening on {' '.join(binds)}", flush=True)


def _export(db: str) -> int:
    if not Path(db).is_file():
        return _usage(f"no database at {db}")
    out = sys.stdout
    try:
        for record in export_records(db):
            out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
    except sqlite3.Error as exc:
        print(f"gatewayd receive: cannot export {db}: {exc}", file=sys.stderr)
        return 1
    out.flush()
    return 0


def _usage(message: str) -> int:
    print(f"gatewayd receive: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m gatewayd.cli.receive``."""
    parser = argparse.ArgumentParser(prog="gatewayd receive", description=__doc__.splitlines()[0])
    add_receive_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_receive(args)


if __name__ == "__main__":
    sys.exit(main())
