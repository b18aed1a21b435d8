"""Is a paku device online? It is once it speaks, and it is not once it says so
(`offline` on its state topic, or its last will), without waiting for `offline_after_s`;
saying goodbye is not a sign of life (`lastSeenAt` stays when it last spoke)."""

import socket
import time

import trio
from paku_testbed import AUTH, PAKU, device_view

from gatewayd.testing import DeviceClient, device_mqtt, gw_client, provision, wait_handled


class Clock:
    """The gateway's wall clock, moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def online(client, device_id: str) -> tuple[bool, bool]:
    """(the device view's "online", the device list's "online"), once the core's own
    device API has said the same."""
    listed = (await client.get("/paku/devices", headers=AUTH)).json()["devices"]
    view, listing = (await device_view(client, device_id))["online"], {d["id"]: d["online"] for d in listed}[device_id]
    core = (await client.get(f"/api/gateway/devices/{device_id}?family=paku", headers=AUTH)).json()["device"]
    assert core["online"] == view, "the core and paku disagree about whether the device is online"
    return view, listing


async def test_a_device_that_says_offline_is_offline_at_once(gateway_factory):
    clock = Clock()
    async with gateway_factory(plugins=PAKU, mqtt=True, clock=clock) as gw, gw_client(gw) as client:
        async with device_mqtt(await provision(gw, "paku", "pk-1")) as dev:
            await dev.publish("paku/pk-1/state", b'{"status": "online"}', retain=True)
            await dev.publish("paku/pk-1/telemetry", b'{"temp_c": 21.5}')
            await wait_handled(gw, "paku/pk-1/#", n=2)
            spoke = clock.now
            assert await online(client, "pk-1") == (True, True)

            clock.now += 60
            await dev.publish("paku/pk-1/state", b'{"status": "offline"}', retain=True)
            await wait_handled(gw, "paku/pk-1/state", n=2)
            assert await online(client, "pk-1") == (False, False)
            view = await device_view(client, "pk-1")
            assert view["lastSeenAt"] == spoke and view["state"]["online"] is False

            clock.now += 60
            await dev.publish("paku/pk-1/telemetry", b'{"temp_c": 21.0}')  # back
            await wait_handled(gw, "paku/pk-1/telemetry", n=2)
            assert await online(client, "pk-1") == (True, True)
            assert (await device_view(client, "pk-1"))["lastSeenAt"] == clock.now


async def test_a_last_will_puts_the_device_offline_without_moving_last_seen(gateway_factory):
    clock = Clock()
    async with gateway_factory(plugins=PAKU, mqtt=True, clock=clock) as gw, gw_client(gw) as client:
        creds = await provision(gw, "paku", "pk-1")
        async with device_mqtt(creds, client_id="probe"):
            pass  # the broker has loaded the new account
        dev = DeviceClient(*creds.mqtt, client_id="pk-1")
        dev.client.will_set("paku/pk-1/state", b"offline", qos=1, retain=True)
        try:
            assert not (await dev.connect()).is_failure
            await dev.publish("paku/pk-1/telemetry", b'{"temp_c": 21.5}')
            await wait_handled(gw, "paku/pk-1/telemetry")
            spoke = clock.now
            assert await online(client, "pk-1") == (True, True)

            clock.now += 60
            # The device loses power: its connection ends without a DISCONNECT, and
            # mosquitto publishes its will.
            await trio.to_thread.run_sync(dev.client.socket().shutdown, socket.SHUT_RDWR)
            await wait_handled(gw, "paku/pk-1/state")
        finally:
            await trio.to_thread.run_sync(dev.close)
        assert await online(client, "pk-1") == (False, False)
        view = await device_view(client, "pk-1")
        assert view["lastSeenAt"] == spoke and view["state"]["online"] is False
