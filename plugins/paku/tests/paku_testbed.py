"""What the paku end-to-end tests share: a gateway with its managed mosquitto, devices
provisioned over HTTP, device MQTT clients, the reference upstream receiver."""

from __future__ import annotations

import json
import sqlite3
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

import gatewayd_paku
from gatewayd.core.mqtt.broker import find_mosquitto
from gatewayd.core.upstream.receiver import create_receiver_app
from gatewayd.testing.mqtt import DeviceClient, free_port

TOKEN = "paku-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UPSTREAM_SECRET = "paku-upstream-secret"
PAKU = [("paku", gatewayd_paku)]


def managed_settings(port: int) -> list[str]:
    """The gateway runs its own mosquitto on `port` and tells devices so."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: apt-get install mosquitto (scripts/test does it as root)")
    return ["mqtt.broker='managed'", f"mqtt.listen='127.0.0.1:{port}'"]


async def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, step: float = 0.05) -> Any:
    """Poll a (sync or async) predicate until it is truthy; fail after `timeout`."""
    with trio.fail_after(timeout):
        while True:
            value = predicate()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(step)


async def provision(client, device_id: str, **fields: Any) -> dict:
    r = await client.post("/paku/devices", headers=AUTH, json={"id": device_id, **fields})
    assert r.status_code == 201, r.text
    return r.json()


@asynccontextmanager
async def device(creds: dict, *, client_id: str | None = None, will: bool = False):
    """A connected device (a plain paho client in its own thread), logged in with `creds`.

    The broker picks up a new account on a reload that runs right after provisioning;
    until then the login is refused, so refusals are retried for a while.
    """
    m = creds["mqtt"]
    with trio.fail_after(15):
        while True:
            dev = DeviceClient(m["host"], m["port"], m["username"], m["password"], client_id or m["username"])
            if will:
                dev.client.will_set(f"paku/{m['username']}/state", b"offline", qos=1, retain=True)
            reason = await dev.connect()
            if reason is not None and not reason.is_failure:
                break
            await trio.to_thread.run_sync(dev.close)
            await trio.sleep(0.1)
    try:
        yield dev
    finally:
        await trio.to_thread.run_sync(dev.close)


async def device_view(client, device_id: str) -> dict:
    r = await client.get(f"/paku/devices/{device_id}", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


# -- the reference upstream receiver ------------------------------------------------------


@asynccontextmanager
async def receiver(db: Path):
    """The reference receiver of the upstream protocol on a free port; yields its URL."""
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    stop = trio.Event()
    app = create_receiver_app(db, {"*": UPSTREAM_SECRET.encode()})
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        try:
            yield binds[0]
        finally:
            stop.set()


def upstream_config(url: str) -> str:
    return f'[[upstream]]\nname = "cloud"\nurl = "{url}"\nlinger_s = 0.05\n'


def received(db: Path) -> list[dict]:
    """What the receiver stored: class, kind, device and data of each record."""
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute('SELECT "class", kind, device, data FROM records ORDER BY rowid').fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()
    return [{"class": c, "kind": k, "device": d, "data": json.loads(data)} for c, k, d, data in rows]


__all__ = ["AUTH", "PAKU", "TOKEN", "UPSTREAM_SECRET", "device", "device_view", "free_port", "managed_settings",
           "provision", "received", "receiver", "upstream_config", "wait_for"]
