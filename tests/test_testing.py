"""gatewayd.testing itself: the per-test timeout, wait_until, and the gateway fixtures a
plugin's tests are built on (each shown to fail when what it checks is not so)."""

import socket
import textwrap
import threading
import time

import pytest
import trio

from gatewayd.testing import (
    MQTTLogin,
    deliveries,
    device_mqtt,
    gw_client,
    gw_mqtt_address,
    provision,
    rejected_messages,
    reserved_port,
    storage_failing,
    storage_full,
    wait_handled,
    wait_until,
)
from tests import plugin_devices, plugin_everything, plugin_ingest
from tests.test_auth import sign

pytest_plugins = ["pytester"]

# -- the per-test timeout -------------------------------------------------------------

HANGING = '''
import time
import pytest
import trio

@pytest.mark.timeout(0.5)
async def test_trio_waits_for_ever():
    await trio.sleep_forever()

@pytest.mark.timeout(0.5)
async def test_trio_waits_for_a_thread_under_autojump(autojump_clock):
    await trio.to_thread.run_sync(time.sleep, 1.5)  # not cancellable: fails once it returns

@pytest.fixture
async def stuck_teardown():
    yield
    await trio.sleep_forever()

@pytest.mark.timeout(0.5)
async def test_trio_fixture_teardown_hangs(stuck_teardown):
    pass

@pytest.mark.timeout(0.5)
def test_plain_sleeps():
    time.sleep(5)

@pytest.mark.timeout(3)
async def test_the_marker_gives_more_time():
    await trio.sleep(1)

async def test_virtual_time_is_not_counted(autojump_clock):
    await trio.sleep(10_000)

async def test_within_the_limit():
    await trio.sleep(0.1)

async def test_past_the_limit():
    await trio.sleep(5)
'''


def test_every_test_fails_at_its_timeout_and_says_where_it_waited(pytester, monkeypatch):
    pytester.makepyfile(test_hanging=HANGING)
    pytester.makeini("[pytest]\ntrio_mode = true\ntimeout = 100\n")
    monkeypatch.setenv("PYTEST_TIMEOUT", "0.6")  # a slow machine's setting wins over the ini
    monkeypatch.setenv("COLUMNS", "300")  # whole lines in the summary
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=5)
    trio_timeout = "Failed: Timeout: the test ran for more than {} s and trio cancelled it*"
    result.stdout.fnmatch_lines_random([
        "FAILED *::test_trio_waits_for_ever - " + trio_timeout.format(0.5),
        "FAILED *::test_trio_waits_for_a_thread_under_autojump - " + trio_timeout.format(0.5),
        "FAILED *::test_trio_fixture_teardown_hangs - " + trio_timeout.format(0.5),
        "FAILED *::test_past_the_limit - " + trio_timeout.format(0.6),
        "FAILED *::test_plain_sleeps - Failed: Timeout (>0.5s) from pytest-timeout.",
    ])
    assert "in stuck_teardown" in result.stdout.str()  # the traceback shows where it waited


def test_a_trio_test_that_ignores_cancellation_ends_the_session_at_the_backstop(pytester, monkeypatch):
    monkeypatch.delenv("PYTEST_TIMEOUT", raising=False)
    pytester.makeconftest("import gatewayd.testing.timeouts as t\nt.BACKSTOP_S = 1\n")
    pytester.makepyfile(test_blocking=textwrap.dedent('''
        import time
        import pytest

        @pytest.mark.timeout(1)
        async def test_blocks_the_trio_thread():
            time.sleep(60)
    '''))
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0 and time.monotonic() - started < 50
    result.stdout.fnmatch_lines(["timeout: 60.0s", "*Timeout*", "*time.sleep(60)*"])  # 60 s: the default


# -- wait_until -----------------------------------------------------------------------


async def test_wait_until_returns_the_first_truthy_value_of_a_sync_or_async_predicate():
    box = []

    async def later():
        await trio.sleep(0.05)
        box.append("x")

    async def async_predicate():
        return len(box) >= 2 and list(box)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        assert await wait_until(lambda: box and box[0]) == "x"
        nursery.start_soon(later)
        assert await wait_until(async_predicate) == ["x", "x"]


async def test_wait_until_fails_naming_what_it_waited_for_and_the_last_value():
    with pytest.raises(pytest.fail.Exception, match=r"waited 0.2 s until .*lambda: \[\]\[:0\].*test_testing.py.*"
                                                    r"the last value was \[\]"):
        await wait_until(lambda: [][:0], timeout=0.2)
    with pytest.raises(pytest.fail.Exception, match="until the moon is out; the last value was 0"):
        await wait_until(lambda: 0, timeout=0.1, what="the moon is out")
    with pytest.raises(ZeroDivisionError):  # a broken predicate is not a "not yet"
        await wait_until(lambda: 1 / 0)


async def test_wait_until_counts_real_time_under_an_autojump_clock(autojump_clock):
    # A thread's work takes real time while the virtual clock races on: a timeout on
    # trio's clock would run out at once.
    done = threading.Event()
    threading.Timer(0.3, done.set).start()
    assert await wait_until(done.is_set, timeout=10)


# -- a gateway, its devices, its broker and the upstream receiver ------------------------


async def test_provisioned_credentials_work_over_http_and_mqtt(gateway_factory):
    plugins = [("meter", plugin_devices), ("everything", plugin_everything)]
    async with gateway_factory(plugins=plugins, mqtt=True) as gw, gw_client(gw) as client:
        meter = await provision(gw, "meter", "m1")
        assert (meter.family, meter.device_id) == ("meter", "m1")
        r = await client.post("/meter/ingest", headers={"X-API-Key": meter.key})
        assert r.status_code == 200 and r.json()["device"] == "m1"
        body, stamp = b"{}", str(int(gw.clock()))
        r = await client.post("/meter/signed/m1", content=body, headers={
            "X-Device-Signature": sign(meter.signing_secret, body, stamp.encode() + b"."), "X-Timestamp": stamp})
        assert r.status_code == 200, r.text

        dev1 = await provision(gw, "everything", "dev1")
        assert dev1.mqtt == MQTTLogin(*gw_mqtt_address(gw), "dev1", dev1.key)
        async with device_mqtt(dev1) as dev:  # right after provisioning: retried until mosquitto reloaded
            await dev.publish("everything/dev1/reading", b"not json")
            await dev.publish("everything/dev1/reading", b'{"value": 7.25}')
        [rejected] = await wait_handled(gw, "everything/+/reading", verdict="rejected")
        [handled] = await wait_handled(gw, "everything/dev1/#")
        assert (rejected.payload, rejected.sender) == (b"not json", "dev1")
        assert (handled.payload, handled.sender) == (b'{"value": 7.25}', "dev1")
        assert [d.verdict for d in deliveries(gw)] == ["rejected", "handled"]
        [(topic, reason, sender, payload)] = await rejected_messages(gw)
        assert (topic, sender, payload) == ("everything/dev1/reading", "dev1", b"not json")
        assert reason.startswith("expected")

        with pytest.raises(pytest.fail.Exception, match=r"2 message\(s\) on 'everything/dev1/reading' delivered"):
            await wait_handled(gw, "everything/dev1/reading", n=2, timeout=0.3)
        wrong = MQTTLogin(*gw_mqtt_address(gw), "dev1", "not-the-key")
        with pytest.raises(pytest.fail.Exception, match=r"accepts 'dev1'; the last value was 'refused: Not autho"):
            async with device_mqtt(wrong, timeout=0.5):
                pass


async def test_without_mqtt_credentials_have_no_login(gateway_factory):
    async with gateway_factory(plugins=[("meter", plugin_devices)]) as gw:
        creds = await provision(gw, "meter", "m1")
        assert creds.mqtt is None and gw_mqtt_address(gw) is None
        with pytest.raises(pytest.fail.Exception, match="no MQTT login"):
            async with device_mqtt(creds):
                pass


async def test_the_upstream_receiver_gets_what_the_gateway_stored(gateway_factory, upstream_receiver):
    assert upstream_receiver.records() == []
    async with gateway_factory(plugins=[("ingest", plugin_ingest)], upstream=upstream_receiver) as gw:
        async with gw_client(gw) as client:
            for seq in (1, 2):
                r = await client.post("/ingest/records", json={"device": "d1", "seq": seq, "value": 0.5})
                assert r.status_code == 201, r.text
        records = await upstream_receiver.wait_for(2)
        assert sorted((r["family"], r["device"], r["kind"], r["data"]["seq"]) for r in records) == \
            [("ingest", "d1", "reading", 1), ("ingest", "d1", "reading", 2)]  # in batches of any order
        assert {r["gateway_id"] for r in records} == {"test-gateway"}
        with pytest.raises(pytest.fail.Exception, match=r"the upstream receiver has 3 record\(s\)"):
            await upstream_receiver.wait_for(3, timeout=0.3)


async def test_storage_full_and_failing_are_undone_when_the_block_ends(gateway_factory):
    async with gateway_factory(plugins=[("ingest", plugin_ingest)]) as gw, gw_client(gw) as client:

        async def post(seq, pad=0):
            r = await client.post("/ingest/records", json={"device": "d" * max(1, pad), "seq": seq})
            return r.status_code

        async with storage_full(gw):
            statuses = [await post(seq, pad=200) for seq in range(50)]  # new pages are needed soon
            assert 507 in statuses
        async with storage_failing(gw):
            assert await post(100) == 503
        assert await post(101) == 201  # writable again


async def test_storage_full_ends_while_a_statement_of_the_writer_is_still_active(gateway_factory):
    # A write's cursor someone still holds keeps its statement active on the writer's
    # connection: DROP TABLE is refused then ("database table is locked"); the block ends anyway.
    async with gateway_factory(plugins=[("ingest", plugin_ingest)]) as gw, gw_client(gw) as client:
        database = gw.storage.database
        async with storage_full(gw):
            held = await gw.storage.write(lambda: database.execute_sql("PRAGMA max_page_count"))
        r = await client.post("/ingest/records", json={"device": "d" * 200, "seq": 1})
        assert r.status_code == 201, r.text
        assert await gw.storage.write(lambda: database.execute_sql("PRAGMA max_page_count").fetchone()[0]) > 10**6
        del held


# -- reserved_port ------------------------------------------------------------------------


def test_a_reserved_port_is_taken_by_the_tests_server_and_by_no_one_else():
    ports = [reserved_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)  # never handed out twice
    for port in ports[:3]:
        with socket.socket() as other:  # no SO_REUSEADDR: any other program's bind
            with pytest.raises(OSError):
                other.bind(("127.0.0.1", port))
        with socket.socket() as server:  # as mosquitto, trio and hypercorn bind
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1", port))
            server.listen(1)
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
