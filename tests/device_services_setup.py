"""A real DeviceServices on a real SQLite file, for the device tests (no HTTP)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

import trio

from gatewayd.core.config import load_config
from gatewayd.core.devices.services import DeviceServices
from gatewayd.core.metrics import Metrics
from gatewayd.core.storage import Storage


class FakeClock:
    """A wall clock the test moves by hand (JWT expiry, grace periods, timestamps)."""

    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def open_services(data_dir: Path, *, clock=None, settings=()):
    config = load_config(None, [f"gateway.data_dir='{data_dir}'", *settings], {})
    storage = Storage(data_dir / "gatewayd.sqlite3")
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        services = DeviceServices(config, storage, Metrics(), **({"clock": clock} if clock else {}))
        await trio.to_thread.run_sync(services.install)
        try:
            yield services
        finally:
            nursery.cancel_scope.cancel()
