"""gatewayd.testing itself: the per-test timeout and wait_until (each shown to fail when
what it checks is not so)."""

import textwrap
import threading
import time

import pytest
import trio

from gatewayd.testing import wait_until

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
