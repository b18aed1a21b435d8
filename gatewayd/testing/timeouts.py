"""One per-test timeout for every test, trio or plain, and a cancel scope in wall-clock time.

pytest-timeout keeps the settings: a test's limit is ``@pytest.mark.timeout(N)``, else
``--timeout N``, else ``PYTEST_TIMEOUT=N``, else the ``timeout`` ini key, else
:data:`DEFAULT_TIMEOUT_S` (``--timeout 0`` turns it off). A plain test is stopped by
pytest-timeout's signal method: it fails with every thread's stack. A trio test is not
(a SIGALRM handler raising inside trio's run loop can leave that run broken): trio
cancels it at its limit, its trio fixtures with it, and it fails with the traceback of
where it was waiting (a Hypothesis test under trio, a trio run per example, is left to
pytest-timeout). Should cancellation not end it (a blocking call on the trio
thread, a shielded wait), pytest-timeout's thread method ends the session
:data:`BACKSTOP_S` later, printing every thread's stack.

The limit counts wall-clock seconds, whatever the trio clock: under ``autojump_clock``
a deadline on trio's clock would be reached as soon as the test waits for a thread.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio

__all__ = ["BACKSTOP_S", "DEFAULT_TIMEOUT_S", "TimeBudget", "time_left", "wall_clock_limit"]

DEFAULT_TIMEOUT_S = 60.0
BACKSTOP_S = 30.0

_DEADLINE = pytest.StashKey[tuple[float, float]]()  # (timeout, time.monotonic() deadline)


@contextmanager
def wall_clock_limit(seconds: float) -> Iterator[trio.CancelScope]:
    """A cancel scope cancelled after ``seconds`` of real time (check ``cancel_called``)."""
    token = trio.lowlevel.current_trio_token()
    scope = trio.CancelScope()

    def expire() -> None:
        try:
            token.run_sync_soon(scope.cancel)
        except trio.RunFinishedError:
            pass

    timer = threading.Timer(max(seconds, 0.0), expire)
    timer.daemon = True
    with scope:
        timer.start()
        try:
            yield scope
        finally:
            timer.cancel()


def time_left(item: pytest.Item) -> float | None:
    """Wall-clock seconds before ``item``'s timeout (``request.node`` in a test), or None
    when it has none."""
    if _DEADLINE not in item.stash:
        return None
    return item.stash[_DEADLINE][1] - time.monotonic()


class TimeBudget:
    """A long test's own time limit, short of its timeout: the test checks ``spent()``
    before each piece of work, stops starting new ones once it is, and reports what it
    covered, instead of being cut off by its timeout with nothing to show (a search, a
    fuzzer). ``TimeBudget.of_test(request.node)``: the test's time left, less
    ``margin_s`` to finish the piece under way and tear down, or ``GATEWAYD_TIME_BUDGET_S``
    when that is shorter (to see what a slow machine would do)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    @classmethod
    def of_test(cls, item: pytest.Item, *, margin_s: float = 60.0) -> TimeBudget:
        left = time_left(item)
        seconds = math.inf if left is None else max(left - margin_s, 0.0)
        return cls(min(seconds, float(os.environ.get("GATEWAYD_TIME_BUDGET_S") or math.inf)))

    def spent(self) -> bool:
        return time.monotonic() >= self.deadline


# -- the pytest side ---------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Before pytest-timeout reads its settings: fill in the default only where nothing
    # (command line, environment, ini) chose a limit, so a plugin's suite has one too.
    if not config.pluginmanager.hasplugin("timeout"):
        return
    if config.getoption("timeout", None) is None and not os.environ.get("PYTEST_TIMEOUT") \
            and not config.getini("timeout"):
        config.option.timeout = DEFAULT_TIMEOUT_S


def pytest_report_header(config: pytest.Config) -> str | None:
    if not config.pluginmanager.hasplugin("timeout"):
        return "gatewayd.testing: pytest-timeout is not installed, tests have no time limit"
    return f"gatewayd.testing: trio tests are cancelled by trio at their timeout (backstop: +{BACKSTOP_S:g} s)"


def _is_trio(item: pytest.Item) -> bool:
    # A Hypothesis test under trio runs one trio.run per example, inside Hypothesis:
    # there is no run of the whole test to wrap, so pytest-timeout's method applies.
    return item.get_closest_marker("trio") is not None and not hasattr(getattr(item, "obj", None), "hypothesis")


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """pytest-timeout's hook: note the deadline; for a trio test, arm only the backstop."""
    if settings.timeout and settings.timeout > 0:
        item.stash[_DEADLINE] = (settings.timeout, time.monotonic() + settings.timeout)
    if not _is_trio(item):
        return None  # pytest-timeout's own method
    import pytest_timeout

    backstop = settings._replace(method="thread", timeout=settings.timeout + BACKSTOP_S)
    return bool(pytest_timeout.pytest_timeout_set_timer(item=item, settings=backstop))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    # Before pytest-trio turns the test into a trio.run: the trio marker's `run` (which
    # pytest-trio calls) becomes ours, so the limit holds for the test and its trio fixtures.
    if _is_trio(item) and _DEADLINE in item.stash:
        item.add_marker(pytest.mark.trio(run=functools.partial(_limited_run, item, _trio_run(item))), append=False)
    yield


def _trio_run(item: pytest.Item) -> Callable[..., Any]:
    for marker in item.iter_markers("trio"):
        run = marker.kwargs.get("run")
        if isinstance(run, functools.partial) and run.func is _limited_run:
            return run.args[1]  # ours, from an earlier run of this item (a rerun)
        if run is not None:
            return run
    from pytest_trio.plugin import choose_run  # the `trio_run` ini key: trio or qtrio

    return choose_run(item.config)


def _limited_run(item: pytest.Item, run: Callable[..., Any], afn: Callable[[], Awaitable[Any]], **kwargs: Any) -> Any:
    return run(functools.partial(_within_limit, item, afn), **kwargs)


async def _within_limit(item: pytest.Item, afn: Callable[[], Awaitable[Any]]) -> Any:
    __tracebackhide__ = True
    timeout, deadline = item.stash[_DEADLINE]
    error: BaseException | None = None
    with wall_clock_limit(deadline - time.monotonic()) as scope:
        try:
            result = await afn()
        except BaseException as exc:
            if not scope.cancel_called:
                raise
            error = exc
    if not scope.cancel_called:
        return result
    # Also when it returned: a wait that cannot be cancelled (a thread) outlasted the limit.
    raise pytest.fail.Exception(
        f"Timeout: the test ran for more than {timeout:g} s and trio cancelled it (the exception above shows "
        "where it was waiting). A test that needs longer: @pytest.mark.timeout(SECONDS); a slow machine: "
        "PYTEST_TIMEOUT=SECONDS."
    ) from error
