"""The reference node (firmware/edgesentinel/node.py) as a subprocess against a real
gateway and the reference upstream receiver: everything arrives once; a node killed
mid-upload resumes without loss or duplicates; maintenance mode and backpressure hints
are honoured."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import trio
from sentinel_testbed import OPEN, PLUGIN

from gatewayd.plugins.api import MaintenanceState
from gatewayd.testing import gw_client, provision

NODE = Path(__file__).resolve().parents[3] / "firmware" / "edgesentinel" / "node.py"


async def run_node(client, creds, state_dir: Path, *args: str) -> tuple[int, str]:
    argv = [sys.executable, "-u", str(NODE), "--base", str(client.base_url).rstrip("/") + "/edgesentinel",
            "--id", creds.device_id, "--key", creds.key, "--state-dir", str(state_dir), "--seed", "1",
            "--max-s", "60", *args]
    log = state_dir.parent / f"{state_dir.name}.log"
    with log.open("ab") as out:
        done = await trio.run_process(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    return done.returncode, log.read_text()


def seqs(records: list[dict]) -> Counter:
    """Each sampled record once: points by their meta seq, door events by their time."""
    return Counter(r["data"]["meta"]["seq"] if r["kind"] == "point" else ("door", r["ts"]) for r in records)


async def test_a_node_uploads_everything_once(gateway_factory, upstream_receiver, tmp_path):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        code, out = await run_node(client, node, tmp_path / "es-1", "--sample", "2500")
        assert code == 0 and "drained" in out, out
        # Newest data first: the last file (records 2000-2499) went before the backlog.
        assert out.index("buffer-000002.jsonl@0") < out.index("buffer-000000.jsonl@0"), out
        records = await upstream_receiver.wait_for(2500)
        counts = seqs(records)
        assert len(records) == 2500 and max(counts.values()) == 1


async def test_a_node_killed_mid_upload_resumes_without_loss_or_duplicates(gateway_factory, upstream_receiver,
                                                                          tmp_path):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        state = tmp_path / "es-1"
        code, out = await run_node(client, node, state, "--sample", "2000", "--crash-after", "3")
        assert code == 3 and "crash: after sending batch 3" in out, out
        code, out = await run_node(client, node, state)
        assert code == 0 and "drained" in out, out
        # The batch the gateway had but the node did not know of was sent again: answered
        # from the ledger, nothing stored twice.
        records = await upstream_receiver.wait_for(2000)
        await trio.sleep(0.5)
        records = upstream_receiver.records()
        assert len(records) == 2000 and max(seqs(records).values()) == 1


async def test_maintenance_mode_and_backpressure_hints_are_honoured(gateway_factory, upstream_receiver, tmp_path):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        await gw.maintenance.set(MaintenanceState(True, "switch swap", None, 1))

        async def end_maintenance() -> None:
            await trio.sleep(3)
            await gw.maintenance.set(MaintenanceState(False, "", None, 300))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(end_maintenance)
            code, out = await run_node(client, node, tmp_path / "es-1", "--sample", "600", "--breaker", "2")
        assert code == 0 and "drained" in out, out
        assert "refused 503 maintenance" in out and "waiting" in out and "breaker: open" in out, out
        records = await upstream_receiver.wait_for(600)
        assert len(records) == 600
