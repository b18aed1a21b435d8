"""pytest fixtures and helpers for testing gatewayd and its plugins against a real gateway.

A pytest plugin (entry point ``pytest11``): a plugin's own test suite gets the fixtures
and the per-test timeout just by having ``gatewayd[test]`` installed. Plugin tests
import from here and from ``gatewayd.plugins.api``, never from ``gatewayd.core``.

Quick start (``hello`` subscribes ``hello/+/reading`` and stores it with ``ctx.ingest``)::

    import gatewayd_hello
    from gatewayd.testing import device_mqtt, provision, wait_handled

    HELLO = [("hello", gatewayd_hello)]

    async def test_a_reading_goes_upstream(gateway_factory, upstream_receiver):
        async with gateway_factory(plugins=HELLO, mqtt=True, upstream=upstream_receiver) as gw:
            creds = await provision(gw, "hello", "dev1")
            async with device_mqtt(creds) as dev:
                await dev.publish("hello/dev1/reading", b'{"value": 7}')
            await wait_handled(gw, "hello/dev1/reading")
            [record] = await upstream_receiver.wait_for(1)
            assert record["device"] == "dev1"

What there is:

- ``gateway_factory`` (fixture) / :func:`start_gateway`: a real gateway in the test's
  trio run; ``mqtt=True`` adds its managed mosquitto behind its MQTT edge,
  ``upstream=`` points its outbox at a receiver. :func:`gw_client`, :func:`gw_url`.
- ``upstream_receiver`` (fixture): the reference upstream receiver on a free port;
  ``.records()``, ``await .wait_for(n)``.
- :func:`provision`: a device of a family with working credentials (API key, signing
  secret, MQTT login); :func:`device_mqtt`: that device connected, once the broker
  has its account.
- :func:`wait_handled`, :func:`deliveries`, :func:`rejected_messages`: what the gateway
  did with inbound MQTT messages.
- :func:`wait_until`: the one way to wait for something.
- :func:`reserved_port`: a TCP port for a server of the test that no one else takes
  before it binds (``free_port`` is the same).
- :func:`add_firmware`, :func:`storage_full`, :func:`storage_failing`.
- For tests of the MQTT layer itself: ``mqtt_broker``, ``mqtt_storage``,
  :func:`device_client`, :func:`add_device_account` (see :mod:`.mqtt`).
- Every test, trio or plain, fails after 60 s unless marked
  ``@pytest.mark.timeout(SECONDS)``; ``PYTEST_TIMEOUT=SECONDS`` for a slow machine
  (see :mod:`.timeouts`). A long search stops at its own :class:`TimeBudget`, short of
  its timeout, and says what it covered.
"""

from __future__ import annotations

from .gateway import (
    DeviceCredentials,
    add_firmware,
    gateway_factory,
    gw_client,
    gw_mqtt_address,
    gw_url,
    provision,
    start_gateway,
    storage_failing,
    storage_full,
)
from .mqtt import (
    TEST_ACL_TEMPLATES,
    AclTemplate,
    Delivered,
    DeviceClient,
    MQTTLogin,
    Rejection,
    add_device_account,
    deliveries,
    device_client,
    device_mqtt,
    external_broker_settings,
    free_port,
    gateway_client,
    gateway_mqtt_settings,
    mqtt_broker,
    mqtt_storage,
    rejected_messages,
    start_managed_broker,
    wait_handled,
)
from .ports import reserved_port
from ..core.config import ConfigErrors
from .receiver import UpstreamReceiver, start_upstream_receiver, upstream_receiver
from .timeouts import (
    TimeBudget,
    pytest_configure,
    pytest_report_header,
    pytest_runtest_call,
    pytest_timeout_set_timer,
    time_left,
)
from .sse import sse_data_lines
from .waiting import wait_until

__all__ = [
    # a gateway
    "ConfigErrors", "gateway_factory", "start_gateway", "gw_client", "gw_url", "gw_mqtt_address",
    "upstream_receiver", "start_upstream_receiver", "UpstreamReceiver",
    # devices
    "provision", "DeviceCredentials", "device_mqtt", "MQTTLogin", "DeviceClient",
    # what the gateway did
    "wait_until", "sse_data_lines", "reserved_port", "wait_handled", "deliveries", "Delivered", "rejected_messages", "Rejection",
    "add_firmware", "storage_full", "storage_failing",
    # the MQTT layer alone
    "mqtt_broker", "mqtt_storage", "start_managed_broker", "add_device_account", "device_client",
    "gateway_client", "gateway_mqtt_settings", "external_broker_settings", "free_port", "AclTemplate",
    "TEST_ACL_TEMPLATES",
    # time
    "TimeBudget", "time_left",
    # pytest hooks (the per-test timeout), found here by pytest
    "pytest_configure", "pytest_report_header", "pytest_runtest_call", "pytest_timeout_set_timer",
]
