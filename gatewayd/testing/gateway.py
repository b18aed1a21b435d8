"""A real gateway in the test's trio run, and what a test does to it from outside.

The gateway is the one ``gatewayd run`` starts, built from the same configuration,
with real SQLite under ``tmp_path``, hypercorn on a free port and, with ``mqtt=True``,
its own managed mosquitto behind its MQTT edge on a free port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ..core.config import load_config
from ..core.mqtt.broker import find_mosquitto
from ..core.runtime import Gateway
from ..core.storage import Storage, StorageError, StorageFull
from ..plugins.manager import build_plugin_manager
from .mqtt import MQTTLogin, free_port, record_deliveries
from .receiver import UpstreamReceiver
from .waiting import wait_until

__all__ = [
    "DeviceCredentials",
    "add_firmware",
    "gateway_factory",
    "gw_client",
    "gw_mqtt_address",
    "gw_url",
    "provision",
    "start_gateway",
    "storage_failing",
    "storage_full",
]


@asynccontextmanager
async def start_gateway(
    data_dir: Path,
    *,
    plugins: Iterable[tuple[str, object]] = (),
    settings: Iterable[str] = (),
    config_text: str = "",
    clock: Callable[[], float] | None = None,
    mqtt: bool = False,
    upstream: UpstreamReceiver | None = None,
) -> AsyncIterator[Gateway]:
    """Run a Gateway in this trio run until the block ends (then a graceful shutdown).

    ``plugins`` are ``(name, module)`` pairs; ``settings`` are ``--set`` style
    overrides (``"plugins.hello.greeting='hi'"``), applied after ours. ``mqtt=True``:
    the managed mosquitto, devices connect to ``mqtt.listen`` on a free port (fails if
    mosquitto is not installed); the block starts once the gateway's own client is
    subscribed. ``upstream``: forward the outbox to that receiver.
    """
    manager = build_plugin_manager(entry_points=False, plugins=plugins)
    overrides = [
        f"gateway.data_dir='{data_dir}'",
        "gateway.id='test-gateway'",
        "http.listen='127.0.0.1:0'",
        "http.access_log=false",
        "mqtt.broker='off'",
        "gateway.shutdown_grace_s=1.0",
    ]
    if mqtt:
        if find_mosquitto() is None:
            # Fail, not skip: a suite that silently skips every MQTT test would look green.
            pytest.fail("mosquitto is not installed: apt-get install mosquitto (scripts/test does it as root)")
        overrides += ["mqtt.broker='managed'", f"mqtt.listen='127.0.0.1:{free_port()}'"]
    if upstream is not None:
        config_text += "\n" + upstream.config_text()
    config = load_config(None, [*overrides, *settings], manager.config_schemas(), text=config_text)
    for name, plugin_settings in config.plugins.items():
        if not plugin_settings.enabled:
            manager.block(name)
    gateway = Gateway(config, manager, **({"clock": clock} if clock else {}))
    record_deliveries(gateway)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        try:
            if mqtt:
                await wait_until(lambda: gateway.mqtt.client is not None and gateway.mqtt.client.ready,
                                 what="the gateway's own MQTT client is subscribed")
            yield gateway
        finally:
            gateway.request_shutdown()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Callable[..., Any]:
    """``async with gateway_factory(plugins=[...], mqtt=True, upstream=...) as gw:`` in a
    test: :func:`start_gateway` with its data under ``tmp_path``."""

    def factory(**kwargs: Any) -> Any:
        return start_gateway(tmp_path / "var", **kwargs)

    return factory


def gw_url(gateway: Gateway, listener: str = "main") -> str:
    """The base URL of one of the gateway's listeners (``main`` or a plugin name)."""
    return gateway.http_urls[listener][0]


def gw_mqtt_address(gateway: Gateway) -> tuple[str, int] | None:
    """(host, port) where devices reach the gateway by MQTT: its edge (``mqtt.listen``)
    or the external broker; None when MQTT is off."""
    m = gateway.config.mqtt
    if m.broker == "off":
        return None
    host, port = (m.listen.host, m.listen.port) if m.broker == "managed" else (m.host, m.port)
    return ("127.0.0.1" if host in ("", "0.0.0.0") else host), port


@asynccontextmanager
async def gw_client(gateway: Gateway, listener: str = "main", **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client for the gateway's real HTTP listener."""
    async with httpx.AsyncClient(base_url=gw_url(gateway, listener), timeout=10, **kwargs) as client:
        yield client


# -- devices -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCredentials:
    """What a device of ``family`` is given at provisioning, and where its broker is."""

    family: str
    device_id: str
    key: str  #: its API key (HTTP) and MQTT password
    signing_secret: str  #: its HMAC signing secret
    mqtt: MQTTLogin | None  #: its login on the gateway's MQTT edge; None when MQTT is off


async def provision(gateway: Gateway, family: str, device_id: str | None = None, **fields: Any) -> DeviceCredentials:
    """Register a device of ``family`` (``fields``: name, model, firmware, metadata,
    status) and return its working credentials.

    Its MQTT account reaches mosquitto by a reload just after: log in with
    :func:`~gatewayd.testing.device_mqtt`, which waits for it.
    """
    _, creds = await gateway.devices.registry.provision(family, device_id, **fields)
    address = gw_mqtt_address(gateway)
    login = MQTTLogin(*address, creds.mqtt_username, creds.key) if address else None
    return DeviceCredentials(family, creds.device_id, creds.key, creds.signing_secret, login)


# -- firmware and storage ------------------------------------------------------------


async def add_firmware(gateway: Gateway, image: Path, *, family: str, model: str, version: str, **options: Any) -> Any:
    """Put ``image`` in the gateway's OTA store, as ``gatewayd firmware add`` does
    (``options``: channel, rollout_percent, ...); returns the stored firmware."""
    return await trio.to_thread.run_sync(
        lambda: gateway.ota.add_blocking(image, family=family, model=model, version=version, **options)
    )


@asynccontextmanager
async def storage_full(gateway: Gateway) -> AsyncIterator[None]:
    """While the block runs, the gateway's database is full, as on a full disk: it cannot
    grow (SQLite's own size cap), and its free pages are taken by a filler table, so any
    write that stores something new fails with ``StorageFull``. (A write may still fit in
    the last few bytes of a page its table already has: rare, and as on a real disk.)"""
    storage = gateway.storage
    await storage.write(_sql, storage, f"CREATE TABLE IF NOT EXISTS {_FILLER} (b BLOB)")
    [(pages,)] = await storage.write(_sql, storage, "PRAGMA page_count")
    [(page_size,)] = await storage.write(_sql, storage, "PRAGMA page_size")
    await storage.write(_sql, storage, f"PRAGMA max_page_count = {pages}")
    size = page_size * 64
    while size >= 16:  # fill what is left, big pieces first
        try:
            await storage.write(_sql, storage, f"INSERT INTO {_FILLER} VALUES (zeroblob(?))", size)
        except StorageFull:
            size //= 2
    try:
        yield
    finally:
        # DELETE gives the pages back whatever else the writer's connection has under way.
        # DROP TABLE does not while another statement of that connection is active ("database
        # table is locked"): a cursor a write returned that someone still holds (a PRAGMA that
        # answers a row is active until closed; `_sql` closes its own). Then the empty table
        # stays, for the next storage_full.
        await storage.write(_sql, storage, f"DELETE FROM {_FILLER}")
        await storage.write(_sql, storage, "PRAGMA max_page_count = 1073741823")
        await _drop_filler(storage)


def _sql(storage: Storage, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """On the writer's thread: `sql`'s rows, its cursor closed (no statement left active)."""
    cursor = storage.database.execute_sql(sql, params)
    try:
        return list(cursor.fetchall())
    finally:
        cursor.close()


async def _drop_filler(storage: Storage) -> None:
    try:
        await storage.write(_sql, storage, f"DROP TABLE IF EXISTS {_FILLER}")
    except StorageError as e:
        if "locked" not in str(e):
            raise


_FILLER = "gatewayd_testing_storage_full_filler"


@asynccontextmanager
async def storage_failing(gateway: Gateway) -> AsyncIterator[None]:
    """While the block runs, the gateway's database refuses every write (``StorageError``,
    not ``StorageFull``)."""
    storage = gateway.storage
    await storage.write(_sql, storage, "PRAGMA query_only = 1")
    try:
        yield
    finally:
        await storage.write(_sql, storage, "PRAGMA query_only = 0")
