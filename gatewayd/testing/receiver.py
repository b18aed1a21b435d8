"""The reference upstream receiver (``gatewayd receive``'s app) on a free port, for tests
that follow records all the way to the cloud::

    async def test_forwarded(gateway_factory, upstream_receiver):
        async with gateway_factory(plugins=PLUGINS, upstream=upstream_receiver) as gw:
            ...
            [record] = await upstream_receiver.wait_for(1)
            assert record["kind"] == "telemetry"
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ..core.upstream.receiver import create_receiver_app, export_records
from .waiting import wait_until

__all__ = ["UpstreamReceiver", "start_upstream_receiver", "upstream_receiver"]


class UpstreamReceiver:
    """A running receiver: its ``url``, what it stored, and the config that points a gateway at it."""

    def __init__(self, db: Path, url: str, secret_env: str) -> None:
        self.db = db
        self.url = url
        self.secret_env = secret_env

    def config_text(self, name: str = "cloud", **options: Any) -> str:
        """An ``[[upstream]]`` section for gatewayd.toml (``options`` are more of its keys)."""
        keys = {"name": name, "url": self.url, "secret_env": self.secret_env, "linger_s": 0.05, **options}
        return "[[upstream]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())

    def records(self) -> list[dict[str, Any]]:
        """Every record received so far, in arrival order: gateway_id, record_id, family,
        device, kind, class, ts and data (decoded)."""
        if not self.db.exists():
            return []
        try:
            return list(export_records(self.db))
        except sqlite3.OperationalError:  # created, its tables not yet
            return []

    async def wait_for(self, n: int, *, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Wait until at least ``n`` records were received; return them all."""
        return await wait_until(lambda: len(got := self.records()) >= n and got, timeout=timeout,
                                what=f"the upstream receiver has {n} record(s)")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@asynccontextmanager
async def start_upstream_receiver(db: Path) -> AsyncIterator[UpstreamReceiver]:
    """Serve the reference receiver (storing into ``db``) on a free port until the block ends.

    Its HMAC secret is made up here and put in the environment variable its
    ``config_text()`` names, where the gateway reads it; removed again at the end.
    """
    env = f"GATEWAYD_TEST_RECEIVER_SECRET_{secrets.token_hex(4).upper()}"
    secret = secrets.token_urlsafe(24)
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    stop = trio.Event()
    app = create_receiver_app(db, {"*": secret.encode()})
    os.environ[env] = secret
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
            try:
                yield UpstreamReceiver(db, binds[0], env)
            finally:
                stop.set()
    finally:
        os.environ.pop(env, None)


@pytest.fixture
async def upstream_receiver(tmp_path: Path) -> AsyncIterator[UpstreamReceiver]:
    """The reference upstream receiver for this test; pass it as ``gateway_factory(upstream=...)``."""
    async with start_upstream_receiver(tmp_path / "upstream.sqlite3") as receiver:
        yield receiver
