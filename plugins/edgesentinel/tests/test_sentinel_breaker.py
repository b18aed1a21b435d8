"""The reference node's circuit breaker (issue 18 item 6) against a real gateway: after
`--breaker` consecutive failures of the gateway it sends no batch, only a half-open
probe (a handshake) after each cool-down; the first probe answered closes it and the
uploads resume, nothing lost or doubled. What reached the gateway is read on the wire
(a relay in front of it notes each request line), not from what the node prints."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import trio
from sentinel_testbed import OPEN, PLUGIN
from test_sentinel_node import LateReceiver, run_node, seqs

from gatewayd.plugins.api import MaintenanceState
from gatewayd.testing import gw_client, provision, wait_until

BREAKER = ["--breaker", "3", "--breaker-cooldown-s", "0.2", "--max-wait-s", "1"]


class WireLog:
    """A TCP relay to the gateway on a port chosen now, listening only once `serve` runs
    (before: connection refused, as a stopped gateway): each request is noted as
    "B" (a batch) or "H" (a handshake) in arrival order."""

    def __init__(self, target: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.target = target
        self.requests = ""

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async def relay(client: trio.SocketStream) -> None:
            first = await client.receive_some(65536)
            line = first.split(b"\r\n", 1)[0].decode()
            self.requests += "B" if "/telemetry/batch" in line else "H" if "/auth/handshake" in line else "?"
            far = await trio.open_tcp_stream("127.0.0.1", self.target)
            async with client, far, trio.open_nursery() as nursery:
                await far.send_all(first)
                nursery.start_soon(LateReceiver.pump, client, far)
                nursery.start_soon(LateReceiver.pump, far, client)

        await trio.serve_tcp(relay, self.port, host="127.0.0.1", task_status=task_status)


async def test_the_breaker_opens_under_maintenance_probes_and_closes_when_it_ends(gateway_factory,
                                                                               upstream_receiver, tmp_path):
    settings = [*OPEN, "plugins.edgesentinel.retry_alert_after=2"]
    async with gateway_factory(plugins=PLUGIN, settings=settings, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        await gw.maintenance.set(MaintenanceState(True, "switch swap", None, 1))
        log = tmp_path / "es-1.log"
        wire = WireLog(client.base_url.port)
        async with trio.open_nursery() as nursery:
            await nursery.start(wire.serve)

            async def end_maintenance_after_two_failed_probes() -> None:
                await wait_until(lambda: log.exists() and log.read_text().count("breaker: open again") >= 2,
                                 what="two probes refused", timeout=60)
                await gw.maintenance.set(MaintenanceState(False, "", None, 300))

            nursery.start_soon(end_maintenance_after_two_failed_probes)
            through = httpx.AsyncClient(base_url=f"http://127.0.0.1:{wire.port}")
            code, out = await run_node(through, node, tmp_path / "es-1", "--sample", "600", *BREAKER)
            nursery.cancel_scope.cancel()
        assert code == 0 and "drained" in out, out
        records = await upstream_receiver.wait_for(601)
    # The outage is reported with the first new batch after it (retry_count 3 > 2): the
    # resent batch could not say it, its body is the one first sent.
    (alert,) = [r for r in records if r["kind"] == "alert"]
    assert "server-unreachable" in json.dumps(alert["data"]), alert
    records = [r for r in records if r["kind"] != "alert"]
    assert len(records) == 600 and max(seqs(records).values()) == 1
    assert out.count("refused 503 maintenance") == 3 and "breaker: open after 3 failures" in out, out
    probes = out.count("breaker: half-open")
    assert probes >= 3 and out.count("breaker: open again") == probes - 1 and out.count("breaker: closed") == 1, out
    # Three batches refused, then only probes while open (refused, then one answered), then the batches.
    assert wire.requests == "BBB" + "H" * probes + "BB", wire.requests


async def test_the_breaker_opens_while_the_gateway_is_down_and_closes_when_it_is_back(gateway_factory,
                                                                                  upstream_receiver, tmp_path):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        log = tmp_path / "es-1.log"
        wire = WireLog(client.base_url.port)  # nothing listens there yet: the gateway is "down"
        async with trio.open_nursery() as nursery:
            async def back_after_a_failed_probe() -> None:
                await wait_until(lambda: log.exists() and "breaker: open again (probe: 0 network" in log.read_text(),
                                 what="a probe refused by a stopped gateway", timeout=60)
                await nursery.start(wire.serve)

            nursery.start_soon(back_after_a_failed_probe)
            through = httpx.AsyncClient(base_url=f"http://127.0.0.1:{wire.port}")
            code, out = await run_node(through, node, tmp_path / "es-1", "--sample", "600", *BREAKER)
            nursery.cancel_scope.cancel()
        assert code == 0 and "drained" in out, out
        records = await upstream_receiver.wait_for(600)
    assert len(records) == 600 and max(seqs(records).values()) == 1
    assert out.count("refused 0 network") == 3 and "breaker: open after 3 failures" in out, out
    assert "breaker: closed" in out, out
    # Once back, the first request it saw was the probe, then the batches.
    assert wire.requests == "HBB", wire.requests
