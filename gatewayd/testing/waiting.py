"""``wait_until``: the one way a test waits for something to become true."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import trio

from .timeouts import wall_clock_limit

__all__ = ["wait_until"]


async def wait_until(predicate: Callable[[], Any], *, timeout: float = 20.0, step: float = 0.02,
                     what: str | None = None) -> Any:
    """Call ``predicate`` (sync, or async) every ``step`` s until it returns something
    truthy, and return that.

    After ``timeout`` s of real time (an autojump clock does not run it out while a
    thread works) the test fails, naming what it waited for (``what``, by default the
    predicate's source line) and the last value the predicate returned. What the
    predicate raises goes through: it is a bug of the test, not a "not yet".
    """
    __tracebackhide__ = True
    last: Any = None
    with wall_clock_limit(timeout) as scope:
        while True:
            last = predicate()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
            await trio.sleep(step)
    assert scope.cancel_called
    pytest.fail(f"waited {timeout:g} s until {what or _describe(predicate)}; the last value was {last!r}")


def _describe(predicate: Callable[[], Any]) -> str:
    try:
        lines, line = inspect.getsourcelines(predicate)
        where = f" ({inspect.getsourcefile(predicate)}:{line})"
        return " ".join(" ".join(lines).split())[:300] + where
    except (OSError, TypeError):
        return getattr(predicate, "__qualname__", repr(predicate))
