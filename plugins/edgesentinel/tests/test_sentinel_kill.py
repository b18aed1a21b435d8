"""Issue 18 item 7, kill -9 mid-upload, automated: the reference node, or the gateway
(`gatewayd run`, a process of its own), is SIGKILLed at the worst moment of a batch
(the gateway has committed it and answered; the answer has not reached the node), then
started again; every record reaches the upstream reference receiver exactly once.

A relay in front of the gateway places the kill: on the Nth batch it forwards the
request, waits for the gateway's first answer bytes, kills, and drops the connection."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
from test_sentinel_breaker import WireLog
from test_sentinel_node import NODE, LateReceiver, run_node, seqs

from gatewayd.testing import gw_client, provision, reserved_port, wait_until

from sentinel_testbed import OPEN, PLUGIN  # isort: skip

KILL_ON_BATCH = 6  # five acknowledged, the sixth committed and unanswered
ROOT = Path(__file__).resolve().parents[3]


class KillingRelay(WireLog):
    """The wire log's relay; the `nth` batch's answer is held back and `kill` runs instead."""

    def __init__(self, target: int, nth: int, kill: Callable[[], None]) -> None:
        super().__init__(target)
        self.nth = nth
        self.kill = kill
        self.killed = trio.Event()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async def relay(client: trio.SocketStream) -> None:
            first = await client.receive_some(65536)
            line = first.split(b"\r\n", 1)[0].decode()
            self.requests += "B" if "/telemetry/batch" in line else "H" if "/auth/handshake" in line else "?"
            try:
                far = await trio.open_tcp_stream("127.0.0.1", self.target)
            except OSError:
                await client.aclose()  # the gateway is down: the node sees the connection dropped
                return
            async with client, far, trio.open_nursery() as nursery:
                await far.send_all(first)
                nursery.start_soon(LateReceiver.pump, client, far)
                if self.requests.count("B") == self.nth and not self.killed.is_set():
                    await far.receive_some(65536)  # the answer: the batch is committed
                    self.kill()
                    self.killed.set()
                    nursery.cancel_scope.cancel()  # the node never sees it
                else:
                    nursery.start_soon(LateReceiver.pump, far, client)

        await trio.serve_tcp(relay, self.port, host="127.0.0.1", task_status=task_status)


async def test_the_node_sigkilled_mid_upload_resumes_with_every_record_once(gateway_factory, upstream_receiver,
                                                                           tmp_path):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        state = tmp_path / "es-1"
        processes: list[trio.Process] = []
        relay = KillingRelay(client.base_url.port, KILL_ON_BATCH, lambda: processes[0].send_signal(signal.SIGKILL))
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)
            base = f"http://127.0.0.1:{relay.port}/edgesentinel"
            argv = [sys.executable, "-u", str(NODE), "--base", base, "--id", node.device_id, "--key", node.key,
                    "--state-dir", str(state), "--seed", "1", "--max-s", "60", "--sample", "2000", "--batch", "200"]
            with (tmp_path / "killed.log").open("ab") as out:
                processes.append(await nursery.start(partial(trio.run_process, argv, check=False, stdout=out,
                                                             stderr=subprocess.STDOUT)))
                await processes[0].wait()
            assert processes[0].returncode == -signal.SIGKILL
            killed = (tmp_path / "killed.log").read_text()
            assert killed.count("uploaded") == KILL_ON_BATCH - 1, killed
            through = httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.port}")
            code, out = await run_node(through, node, state, "--batch", "200")
            nursery.cancel_scope.cancel()
        assert code == 0 and "drained" in out, out
        # The unanswered batch was sent again under its key (answered from the ledger), then the rest.
        assert out.count("uploaded") == 2000 // 200 - (KILL_ON_BATCH - 1), out
        await wait_until(partial(backlog_empty, str(client.base_url)), what="the outbox forwarded")
    records = upstream_receiver.records()
    assert len(records) == 2000 and max(seqs(records).values()) == 1, len(records)


async def backlog_empty(base: str) -> bool:
    """The gateway's outbox holds nothing more for the upstream (its metric)."""
    async with httpx.AsyncClient(timeout=2) as client:
        text = (await client.get(base.rstrip("/") + "/metrics")).text
    lines = [line for line in text.splitlines() if line.startswith("gatewayd_sync_backlog_records{")]
    assert lines, "no backlog metric"
    return all(float(line.split()[-1]) == 0 for line in lines)


class Daemon:
    """`python -m gatewayd run` with the edgesentinel plugin, its own process (kill -9-able)."""

    def __init__(self, tmp_path: Path, upstream: Any) -> None:
        self.port = reserved_port()
        self.config = tmp_path / "gatewayd.toml"
        self.config.write_text(
            f"[gateway]\nid = 'site-1'\ndata_dir = '{tmp_path / 'var'}'\nshutdown_grace_s = 1.0\n"
            f"[http]\nlisten = '127.0.0.1:{self.port}'\naccess_log = false\n[mqtt]\nbroker = 'off'\n"
            "[plugins.edgesentinel]\nrequire_claim = false\n" + upstream.config_text())
        self.log = tmp_path / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def gatewayd(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run([sys.executable, "-m", "gatewayd", *args, "--config", str(self.config)], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, **(env or {})})
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gatewayd", "run", "--config", str(self.config)],
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        proc = self.proc

        async def healthy() -> bool:
            assert proc.poll() is None, self.log.read_text()[-3000:]
            try:
                async with httpx.AsyncClient(timeout=1) as client:
                    return (await client.get(f"http://127.0.0.1:{self.port}/health")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(healthy, timeout=120, step=0.05, what="the gateway answers /health")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.mark.timeout(300)  # two starts of a gateway process; a loaded machine starts it slower
async def test_the_gateway_killed_mid_upload_and_restarted_loses_and_doubles_nothing(upstream_receiver, tmp_path):
    daemon = Daemon(tmp_path, upstream_receiver)
    key = "k" * 32
    daemon.gatewayd("devices", "add", "--family", "edgesentinel", "--id", "es-1", "--key-env", "ES_KEY",
                    env={"ES_KEY": key})
    await daemon.start()
    relay = KillingRelay(daemon.port, KILL_ON_BATCH, daemon.kill)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)

            async def restart_after_the_kill() -> None:
                await relay.killed.wait()
                await daemon.start()

            nursery.start_soon(restart_after_the_kill)
            creds = SimpleNamespace(device_id="es-1", key=key)
            through = httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.port}")
            code, out = await run_node(through, creds, tmp_path / "es-1", "--sample", "2000", "--batch", "200",
                                       "--breaker-cooldown-s", "0.2", "--max-wait-s", "1", "--max-s", "120")
            nursery.cancel_scope.cancel()
        assert relay.killed.is_set() and code == 0 and "drained" in out, out
        lines = out.splitlines()
        assert sum(line.startswith("uploaded") for line in lines) == 2000 // 200, out  # each batch once acknowledged
        await wait_until(partial(backlog_empty, f"http://127.0.0.1:{daemon.port}"), timeout=60,
                         what="the outbox forwarded")
        records = upstream_receiver.records()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            assert daemon.stop() == 0
    assert len(records) == 2000 and max(seqs(records).values()) == 1, len(records)
    assert (tmp_path / "daemon.log").read_text().count("gateway started") == 2
