"""The HTTP listener's queue: `[http] backlog` reaches the listening socket.

A site's lights reconnect together after a power cut; with hypercorn's default queue (100)
the kernel dropped most of 1,000 connections made at once, each sent again only 1, 3, 7 s
later (bench/streetlight_bench.py's fleet). The queue's length of a listening socket is what
`ss -lnt` shows as its Send-Q (the kernel's sk_max_ack_backlog, through inet_diag).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import trio
from quart_trio import QuartTrio

from gatewayd.core.config import load_config
from gatewayd.core.http.serve import serve_app
from gatewayd.core.schema import Address
from gatewayd.testing.ports import reserved_port

pytestmark = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2, in the machine image)")


def _listen_queue(port: int) -> int:
    """The listening socket's queue length on 127.0.0.1:`port` (ss's Send-Q for a listener)."""
    out = subprocess.run(["ss", "-Hlnt", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    fields = out.split()
    assert fields and fields[0] == "LISTEN", out
    return int(fields[2])


async def _served_queue(**kwargs) -> int:
    port = reserved_port()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_app(
            QuartTrio("listen"), Address("127.0.0.1", port), shutdown_trigger=stop.wait, graceful_timeout=1,
            access_log=False, task_status=task_status, **kwargs))
        queue = await trio.to_thread.run_sync(_listen_queue, port)
        stop.set()
    return queue


async def test_the_listener_queue_is_the_configured_backlog():
    assert await _served_queue(backlog=777) == 777


async def test_the_default_queue_holds_a_thousand_lights_not_hypercorns_hundred():
    config = load_config(None, [], {}, text="")
    assert config.http.backlog == 1024
    assert await _served_queue(backlog=config.http.backlog) == 1024
    assert await _served_queue() == 1024  # serve_app's own default, for callers without a config
