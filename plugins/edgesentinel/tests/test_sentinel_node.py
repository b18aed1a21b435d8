"""The reference node (firmware/edgesentinel/node.py) as a subprocess against a real
gateway and the reference upstream receiver: everything arrives once; a node killed
mid-upload resumes without loss or duplicates; maintenance mode and backpressure (429
while the upstream is away and the outbox fills) are honoured without loss; a tamper
the node reports fires its workflow's webhook and e-mail; a node gone silent is mailed
to maintenance, then escalated to L2 and L3."""

from __future__ import annotations

import functools
import json
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio
from sentinel_testbed import OPEN, PLUGIN, MailSink

from gatewayd.plugins.api import MaintenanceState
from gatewayd.testing import UpstreamReceiver, gw_client, provision, wait_until

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
            code, out = await run_node(client, node, tmp_path / "es-1", "--sample", "600", "--breaker", "2",
                                       "--breaker-cooldown-s", "0.5")
        assert code == 0 and "drained" in out, out
        assert "refused 503 maintenance" in out and "waiting" in out and "breaker: open" in out, out
        records = await upstream_receiver.wait_for(600)
        assert len(records) == 600


class LateReceiver(UpstreamReceiver):
    """The reference receiver behind an address where nothing listens yet: the gateway's
    upstream is away (its outbox fills) until `reachable()` opens a TCP relay there."""

    def __init__(self, receiver: UpstreamReceiver) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        super().__init__(receiver.db, f"http://127.0.0.1:{self.port}", receiver.secret_env)
        self.target = int(receiver.url.rsplit(":", 1)[1].split("/")[0])

    def config_text(self, name: str = "cloud", **options: Any) -> str:
        return super().config_text(name, breaker_threshold=1000, **options)

    @staticmethod
    async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def reachable(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        pump = self.pump

        async def relay(client: trio.SocketStream) -> None:
            try:
                far = await trio.open_tcp_stream("127.0.0.1", self.target)
            except OSError:
                return
            async with client, far, trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, far)
                nursery.start_soon(pump, far, client)

        await trio.serve_tcp(relay, self.port, host="127.0.0.1", task_status=task_status)


class TimedRelay:
    """A TCP relay in front of the gateway that notes when each connection came: the node
    opens one per request (urllib), so its waits are measured on the wire, not read
    from what the node prints."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.arrivals: list[float] = []

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async def relay(client: trio.SocketStream) -> None:
            self.arrivals.append(trio.current_time())
            far = await trio.open_tcp_stream("127.0.0.1", self.target)
            async with client, far, trio.open_nursery() as nursery:
                nursery.start_soon(LateReceiver.pump, client, far)
                nursery.start_soon(LateReceiver.pump, far, client)

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(relay, listeners)


async def test_backpressure_429_is_honoured_and_nothing_is_lost(gateway_factory, upstream_receiver, tmp_path):
    late = LateReceiver(upstream_receiver)
    # 1000 outbox rows: 200 with a hint from 700, 429 from 900; batches of 100 never overflow it.
    settings = [*OPEN, "outbox.max_rows=1000", "plugins.edgesentinel.backpressure.backoff_ms=300",
                "plugins.edgesentinel.backpressure.max_backoff_ms=2500"]
    async with gateway_factory(plugins=PLUGIN, settings=settings, upstream=late) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        log = tmp_path / "es-1.log"
        async with trio.open_nursery() as nursery:
            async def upstream_back_after_refusals() -> None:
                await wait_until(lambda: log.exists() and log.read_text().count("refused 429") >= 3,
                                 what="three 429 answers", timeout=30)
                await nursery.start(late.reachable)

            nursery.start_soon(upstream_back_after_refusals)
            timed = TimedRelay(client.base_url.port)
            port = await nursery.start(timed.serve)
            through = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")
            code, out = await run_node(through, node, tmp_path / "es-1", "--sample", "1500", "--batch", "100")
            assert code == 0 and "drained" in out, out
            records = await upstream_receiver.wait_for(1500, timeout=60)
            nursery.cancel_scope.cancel()
    assert len(records) == 1500 and max(seqs(records).values()) == 1  # nothing lost, nothing twice
    lines = out.splitlines()
    refusals = [(i, int(m[1])) for i, line in enumerate(lines)
                if (m := re.search(r"refused 429 backpressure .*next_hint (\d+) ms", line))]
    assert len(refusals) >= 3, out
    for i, hint in refusals:  # each refusal's hint waited out before the next request
        wait = lines[i + 2] if lines[i + 1].startswith("breaker") else lines[i + 1]
        waited = int(re.fullmatch(r"waiting (\d+) ms", wait)[1])  # type: ignore[index]
        assert waited >= hint, (lines[i], wait)
    assert any(line.startswith("uploaded") and "next_hint" in line for line in lines), out  # elevated: 200 + hint
    # On the wire: the request after an answer with a hint (429, or 200 when elevated)
    # came at least that long after the one answered (its connection came before the answer).
    answers = [line for line in lines if line.startswith(("uploaded", "refused"))]
    assert len(answers) == len(timed.arrivals), (len(answers), len(timed.arrivals))
    hinted = [(k, int(m[1])) for k, line in enumerate(answers) if (m := re.search(r"next_hint (\d+) ms", line))]
    assert len(hinted) >= 4 and hinted[-1][0] < len(answers) - 1, hinted
    for k, hint in hinted:
        if k + 1 < len(answers):
            gap = timed.arrivals[k + 1] - timed.arrivals[k]
            assert gap >= hint / 1000, (answers[k], f"next request {gap * 1000:.0f} ms later")


class Hooks:
    """A local webhook endpoint: what it received."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.app = QuartTrio("hooks")
        self.app.add_url_rule("/hook/<team>", "hook", self.hook, methods=["POST"])

    async def hook(self, team: str) -> Any:
        self.received.append({"team": team, **json.loads(await request.get_data())})
        return {"ok": True}


async def test_a_tamper_the_node_reports_fires_a_webhook_and_an_email(gateway_factory, upstream_receiver, tmp_path):
    hooks = Hooks()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    async with MailSink() as mail, trio.open_nursery() as nursery:
        (url,) = await nursery.start(functools.partial(serve, hooks.app, config, shutdown_trigger=stop.wait))
        settings = [*OPEN, *mail.settings(), f"plugins.edgesentinel.teams.security.webhooks=[{{url='{url}/hook/sec'}}]",
                    "plugins.edgesentinel.teams.security.email=['security@site.example']"]
        async with gateway_factory(plugins=PLUGIN, settings=settings, upstream=upstream_receiver) as gw, \
                gw_client(gw) as client:
            node = await provision(gw, "edgesentinel", "es-1")
            code, out = await run_node(client, node, tmp_path / "es-1", "--sample", "20",
                                       "--event", "tamper_detected:critical")
            assert code == 0 and "drained" in out, out
            await wait_until(lambda: hooks.received and mail.messages, what="the webhook and the e-mail")
            # Waited for while the gateway runs: its sender forwards the alert record on
            # its own schedule, and a stopped gateway forwards nothing more.
            records = await upstream_receiver.wait_for(22)
        stop.set()
    (hook,) = hooks.received
    (message,) = mail.messages
    assert (hook["team"], hook["rule"], hook["device_id"], hook["severity"]) == (
        "sec", "edgesentinel-tamper", "es-1", "critical")
    assert hook["to"] == ["security", "security@site.example"]
    assert message["To"] == "security@site.example" and message["From"] == "gw@site.example"
    assert message["Subject"] == f"[{gw.config.gateway.id}] CRITICAL edgesentinel-tamper: {hook['message']}"
    assert "Device: es-1" in message.get_content()
    kinds = Counter(r["kind"] for r in records)
    assert kinds["alert"] == 1 and kinds["system_event"] == 1, kinds  # the alert record went upstream too


async def test_a_node_gone_silent_is_mailed_to_maintenance_then_escalated_l2_l3(gateway_factory, tmp_path):
    teams = [f"plugins.edgesentinel.teams.{t}.email=['{t}@site.example']" for t in ("maintenance", "l2", "l3")]
    timing = ["devices.presence_flush_s=0.2", "plugins.edgesentinel.silence_s=0.5",
              "plugins.edgesentinel.connectivity_lost_s=1.5", "plugins.edgesentinel.escalate_l2_s=3",
              "plugins.edgesentinel.escalate_l3_s=4.5"]
    async with MailSink() as mail:
        async with gateway_factory(plugins=PLUGIN, settings=[*OPEN, *mail.settings(), *teams, *timing]) as gw, \
                gw_client(gw) as client:
            node = await provision(gw, "edgesentinel", "es-1")
            code, out = await run_node(client, node, tmp_path / "es-1", "--sample", "20")
            assert code == 0 and "drained" in out, out  # then the node is silent
            await wait_until(lambda: len(mail.messages) >= 3, what="the alert, L2 and L3 mails", timeout=30)
    sent = [(m["To"], m["Subject"].split(": ", 1)[0]) for m in mail.messages]
    gw_id = gw.config.gateway.id
    assert sent == [("maintenance@site.example", f"[{gw_id}] WARNING edgesentinel-connectivity-lost"),
                    ("l2@site.example", f"[{gw_id}] WARNING edgesentinel-connectivity-lost (escalation)"),
                    ("l3@site.example", f"[{gw_id}] CRITICAL edgesentinel-connectivity-lost-l3")], sent


async def test_a_node_pins_the_site_ca_and_sends_its_client_certificate(gateway_factory, upstream_receiver, tmp_path):
    """Issue 21: edgesentinel's mutual-TLS tier with the reference node: HTTPS only, the
    site CA pinned, a client certificate from the site CA required; without one, refused."""
    import ssl

    def gatewayd(*args: str, data_dir: Path) -> None:
        subprocess.run([sys.executable, "-m", "gatewayd", "tls", *args, "--set", f"gateway.data_dir='{data_dir}'"],
                       check=True, capture_output=True)

    gatewayd("init", "--only", "--name", "localhost", "--ip", "127.0.0.1", data_dir=tmp_path / "var")
    gatewayd("client", "es-1", "--out", str(tmp_path / "certs"), data_dir=tmp_path / "var")
    ca = tmp_path / "var" / "tls" / "ca.crt"
    mine = ["--cafile", str(ca), "--cert", str(tmp_path / "certs" / "es-1.crt"),
            "--cert-key", str(tmp_path / "certs" / "es-1.key")]
    settings = [*OPEN, "tls.http=true", "tls.client_auth='required'"]
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(tmp_path / "certs" / "es-1.crt", tmp_path / "certs" / "es-1.key")
    async with gateway_factory(plugins=PLUGIN, settings=settings, upstream=upstream_receiver) as gw, \
            gw_client(gw, verify=ctx) as client:
        assert str(client.base_url).startswith("https://")
        node = await provision(gw, "edgesentinel", "es-1")
        code, out = await run_node(client, node, tmp_path / "bare", "--sample", "20", "--max-s", "3",
                                   "--cafile", str(ca))  # no client certificate: refused at the handshake
        assert code == 1 and "uploaded" not in out, out
        code, out = await run_node(client, node, tmp_path / "es-1", "--sample", "20", *mine)
        assert code == 0 and "drained" in out, out
        assert len(await upstream_receiver.wait_for(20)) == 20


async def test_a_batch_resent_after_a_crash_is_the_one_first_sent(gateway_factory, upstream_receiver, tmp_path):
    """The node crashed with its batch committed but unacknowledged, and its buffer file
    grew before the restart (an event it detected): the resent batch is the one first
    sent (the gateway answers it from its ledger), the new record goes in the next one."""
    async with gateway_factory(plugins=PLUGIN, settings=OPEN, upstream=upstream_receiver) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        state = tmp_path / "es-1"
        code, out = await run_node(client, node, state, "--sample", "20", "--crash-after", "1")
        assert code == 3, out
        code, out = await run_node(client, node, state, "--event", "tamper_detected:critical")
        assert code == 0 and "drained" in out, out
        uploads = [line.split(":")[0] for line in out.splitlines() if line.startswith("uploaded")]
        assert uploads == ["uploaded buffer-000000.jsonl@0+20", "uploaded buffer-000000.jsonl@20+1"], out
        assert "uploaded buffer-000000.jsonl@0+20: accepted 20 duplicates 0" in out, out  # its first answer
        records = await upstream_receiver.wait_for(22)  # 20 + the event + its alert
    assert len([r for r in records if r["kind"] != "alert"]) == 21
