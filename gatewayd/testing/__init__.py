"""pytest fixtures for testing gatewayd and gatewayd plugins against a real gateway.

Installed as a pytest plugin (entry point `pytest11`), so a plugin's own test suite
gets these fixtures just by having gatewayd installed::

    async def test_my_route(gateway_factory):
        async with gateway_factory(plugins=[("hello", gatewayd_hello)]) as gw:
            async with gw_client(gw) as client:
                r = await client.get("/hello/")
                assert r.status_code == 200

The gateway runs in the test's own trio run: real SQLite under `tmp_path`, hypercorn
on a free port, MQTT off unless a test turns it on.

:func:`wait_until` is the one way to wait for something. Every test, trio or plain,
fails after 60 s unless marked ``@pytest.mark.timeout(SECONDS)``; ``PYTEST_TIMEOUT``
for a slow machine (see :mod:`.timeouts`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ..core.config import load_config
from ..core.runtime import Gateway
from ..plugins.manager import build_plugin_manager

from .mqtt import *  # noqa: F403  (the MQTT fixtures: mqtt_broker, device_client, ...)
from .mqtt import __all__ as _mqtt_all
from .timeouts import pytest_configure, pytest_report_header, pytest_runtest_call, pytest_timeout_set_timer
from .waiting import wait_until

__all__ = [
    "start_gateway", "gw_client", "gateway_factory", "wait_until", *_mqtt_all,
    # the per-test timeout (see .timeouts): pytest finds these hooks here
    "pytest_configure", "pytest_report_header", "pytest_runtest_call", "pytest_timeout_set_timer",
]


@asynccontextmanager
async def start_gateway(
    data_dir: Path,
    *,
    plugins: Iterable[tuple[str, object]] = (),
    settings: Iterable[str] = (),
    config_text: str = "",
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Gateway]:
    """Run a Gateway in this trio run until the block ends (then a graceful shutdown).

    `settings` are `--set` style overrides (`"plugins.hello.greeting='hi'"`).
    """
    manager = build_plugin_manager(entry_points=False, plugins=plugins)
    overrides = [
        f"gateway.data_dir='{data_dir}'",
        "gateway.id='test-gateway'",
        "http.listen='127.0.0.1:0'",
        "http.access_log=false",
        "mqtt.broker='off'",
        "gateway.shutdown_grace_s=1.0",
        *settings,
    ]
    config = load_config(None, overrides, manager.config_schemas(), text=config_text)
    for name, plugin_settings in config.plugins.items():
        if not plugin_settings.enabled:
            manager.block(name)
    gateway = Gateway(config, manager, **({"clock": clock} if clock else {}))
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        try:
            yield gateway
        finally:
            gateway.request_shutdown()


def gw_url(gateway: Gateway, listener: str = "main") -> str:
    """The base URL of one of the gateway's listeners (`main` or a plugin name)."""
    return gateway.http_urls[listener][0]


@asynccontextmanager
async def gw_client(gateway: Gateway, listener: str = "main", **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client for the gateway's real HTTP listener."""
    async with httpx.AsyncClient(base_url=gw_url(gateway, listener), timeout=10, **kwargs) as client:
        yield client


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Callable[..., Any]:
    """`async with gateway_factory(plugins=[...], settings=[...]) as gw:` in a test."""

    def factory(**kwargs: Any):
        return start_gateway(tmp_path / "var", **kwargs)

    return factory
