"""paku end to end: devices publish telemetry to the gateway's MQTT edge; the paku plugin
stores each message (family row + outbox row) and the device gets its PUBACK after the
commit. The outbox row is written because the gateway has one `[[upstream]]`, on a closed
local port (a site whose link is down: bench/run.py's `upstream_args` says why);
`--no-upstream`: none, no outbox row (the measure before 2026-12-03).

    .venv/bin/python bench/paku_bench.py [--devices 4] [--messages 5000] [--runs 3] [--no-upstream]

The devices are paho clients (one thread each, QoS 1, 100 in flight) in a process of
their own, as real devices would be. Baseline in the same run: the same publishers
against a bare mosquitto (no gateway, nothing consuming): how fast a broker alone
acknowledges them. Figure: the rate at which the gateway acknowledged them, i.e. stored
them (the edge acknowledges after the commit); every message is checked to be in the
table at the end. The gateway is built and run as `gatewayd run` does (its config, its
plugin manager, tune_gc), without the test helpers' delivery recorder. Each run measures
the bare broker then the gateway; printed: both medians, their ratio, and the median of
each run's own ratio (the two agree when the machine's load holds still).

Next to the rates, the CPU time per stored message (bench/cpu.py): the gateway's
process (all its threads), its trio thread alone, and mosquitto's (the bare broker's in
the baseline), and the publishers' own process in both runs (the same publishers, QoS
and payloads either side; their CPU per message shows they do the same work). On a
loaded machine the rates say how much CPU the bench got; the CPU per message is what
the gateway costs, and what to optimise.

    --profile FILE   run the gateway once under py-spy (if installed) and write FILE
                     (speedscope JSON; collapsed stacks per thread if FILE ends in .txt)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gatewayd_paku  # noqa: E402
from gatewayd.core.config import load_config  # noqa: E402
from gatewayd.core.mqtt.broker import AclTemplate, BrokerAccount, ManagedBroker, hash_password  # noqa: E402
from gatewayd.core.runtime import Gateway, tune_gc  # noqa: E402
from gatewayd.plugins.manager import build_plugin_manager  # noqa: E402
from gatewayd.testing import gw_client, wait_until  # noqa: E402

from bench.cpu import Cpu, CpuMeter, median_cpu, process_cpu  # noqa: E402
from bench.run import upstream_args  # noqa: E402

TOKEN = "bench-admin-token"
UPSTREAM = True  # main's --no-upstream clears it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def publish_all(port: int, device: str, password: str, count: int, out: dict) -> None:
    """One device: `count` telemetry messages at QoS 1, as fast as they are acknowledged."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=device)
    c.username_pw_set(device, password)
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port)
    c.loop_start()
    began = time.perf_counter()
    info = None
    for i in range(count):
        info = c.publish(f"paku/{device}/telemetry", json.dumps({"seq": i, "temp_c": 21.5, "hum": 40}), qos=1)
    info.wait_for_publish(300)
    out[device] = (began, time.perf_counter())
    c.loop_stop()
    c.disconnect()


def publishers_main(port: int, count: int, creds: list[str]) -> None:
    """The devices' process: prints the acknowledged rate of all of them together."""
    times: dict = {}
    threads = [threading.Thread(target=publish_all, args=(port, dev, pw, count, times))
               for dev, pw in (c.split("=", 1) for c in creds)]
    cpu = process_cpu()  # from here: the interpreter's start and imports are not the publishers' work
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = min(b for b, _ in times.values())
    last = max(e for _, e in times.values())
    print(len(threads) * count / (last - first), process_cpu() - cpu)


async def publishers(port: int, count: int, creds: dict[str, str]) -> tuple[float, float]:
    """The publishers' acknowledged rate (msg/s), and the CPU time their process used (s)."""
    args = [sys.executable, __file__, "--publishers", str(port), str(count), *(f"{d}={p}" for d, p in creds.items())]
    done = await trio.run_process(args, capture_stdout=True)
    rate, cpu = done.stdout.decode().split()
    return float(rate), float(cpu)


async def run_bare(devices: int, messages: int) -> tuple[float, Cpu, float]:
    """The same publishers against a bare mosquitto: how fast a broker alone acknowledges."""
    creds = {f"pk-{d}": f"password-{d}" for d in range(devices)}
    with tempfile.TemporaryDirectory() as tmp:
        broker = ManagedBroker(Path(tmp) / "mosquitto", port=free_port(),
                               accounts=[BrokerAccount(d, hash_password(p)) for d, p in creds.items()],
                               acl_templates=[AclTemplate("paku/%u/#", "write")])
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run)
            meter = CpuMeter(broker.pid)
            rate, pub_cpu = await publishers(broker.port, messages, creds)
            cpu = meter.stop()
            nursery.cancel_scope.cancel()
    return rate, cpu, pub_cpu


async def run_gateway(devices: int, messages: int) -> tuple[float, Cpu, float, float]:
    """The gateway as `gatewayd run` builds it, with the paku plugin and its managed broker;
    its rate, CPU, and messages stored per COMMIT (every transaction of the writer while
    the devices published: group commits, and the delivery marks' own writes), and the
    publishers' own CPU time (s)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        manager = build_plugin_manager(entry_points=False, plugins=[("paku", gatewayd_paku)])
        settings = [f"gateway.data_dir='{tmp}'", "http.listen='127.0.0.1:0'", "http.access_log=false",
                    "mqtt.broker='managed'", f"mqtt.listen='127.0.0.1:{port}'", "log.level='warning'"]
        sink_args, sink_env = upstream_args(Path(tmp), None, enabled=UPSTREAM)
        os.environ.update(sink_env)
        config = Path(sink_args[1]) if sink_args else None
        gw = Gateway(load_config(config, settings, manager.config_schemas()), manager)
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.run)
            await wait_until(lambda: gw.mqtt.client is not None and gw.mqtt.client.ready)
            creds = {}
            async with gw_client(gw) as client:
                for d in range(devices):
                    r = await client.post("/paku/devices", headers={"Authorization": f"Bearer {TOKEN}"},
                                          json={"id": f"pk-{d}"})
                    creds[f"pk-{d}"] = r.json()["mqtt"]["password"]
            await trio.sleep(1.5)  # the broker reloads its accounts
            commits = gw.storage.stats["commits"]
            meter = CpuMeter(gw.mqtt.broker.pid)
            rate, pub_cpu = await publishers(port, messages, creds)
            cpu = meter.stop()  # every message acknowledged: every one stored
            commits = gw.storage.stats["commits"] - commits  # the writer's transactions meanwhile

            def stored() -> int:
                return gw.storage.database.execute_sql("SELECT COUNT(*) FROM paku_measurement").fetchone()[0]

            count = await gw.storage.read(stored)
            assert count == devices * messages, f"acknowledged {devices * messages}, stored {count}"
            if UPSTREAM:  # each message's upstream record is in the outbox (the sink is offline)
                queued = await gw.storage.read(
                    lambda: gw.storage.database.execute_sql("SELECT COUNT(*) FROM core_outbox").fetchone()[0])
                assert queued >= devices * messages, f"stored {count}, outbox rows {queued}"
            gw.request_shutdown()
    return rate, cpu, devices * messages / max(commits, 1), pub_cpu


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--publishers":
        publishers_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--messages", type=int, default=5000, help="per device")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", metavar="FILE", help="one gateway run under py-spy (speedscope JSON in FILE)")
    parser.add_argument("--no-upstream", action="store_true",
                        help="no [[upstream]]: no outbox row per message (the old measure)")
    args = parser.parse_args()
    global UPSTREAM
    UPSTREAM = not args.no_upstream
    os.environ["GATEWAYD_ADMIN_TOKEN"] = TOKEN
    tune_gc()  # as `gatewayd run`
    if args.profile:
        profile(args)
        return
    n = args.devices * args.messages
    bare, gateway, bare_cpu, gateway_cpu, per_commit = [], [], [], [], []
    pub_bare, pub_gateway = [], []  # the publishers' own CPU per message (µs), each side
    for r in range(args.runs):
        rate, cpu, pub_cpu = trio.run(run_bare, args.devices, args.messages)
        bare.append(rate)
        bare_cpu.append(cpu)
        pub_bare.append(pub_cpu / n * 1e6)
        rate, cpu, msgs_per_commit, pub_cpu = trio.run(run_gateway, args.devices, args.messages)
        gateway.append(rate)
        gateway_cpu.append(cpu)
        per_commit.append(msgs_per_commit)
        pub_gateway.append(pub_cpu / n * 1e6)
        print(f"run {r + 1}: bare broker {bare[-1]:8.0f} msg/s   gateway (stored) {gateway[-1]:8.0f} msg/s   "
              f"{gateway[-1] / bare[-1]:6.1%}   {msgs_per_commit:5.1f} msgs/COMMIT   "
              f"{gateway_cpu[-1].per_message(n)}   "
              f"(bare mosquitto {bare_cpu[-1].per_message(n).split('mosquitto')[1].strip()})   "
              f"publishers {pub_bare[-1]:5.1f} / {pub_gateway[-1]:5.1f} µs/msg (bare / gateway)", flush=True)
    b, g = statistics.median(bare), statistics.median(gateway)
    paired = statistics.median(gw / br for gw, br in zip(gateway, bare))
    print(f"\n{args.devices} devices x {args.messages} telemetry messages, QoS 1, 100 in flight per device")
    print(f"publishers alone, bare mosquitto acks  : {b:8.0f} msg/s (median of {args.runs})")
    print(f"gateway edge, ack after paku's commit  : {g:8.0f} msg/s (median of {args.runs})")
    print(f"ratio                                  : {g / b:8.1%}")
    print(f"median of the runs' own ratios         : {paired:8.1%}")
    print(f"messages per COMMIT (median)           : {statistics.median(per_commit):8.1f}")
    print(f"CPU per stored message (medians)       : {median_cpu(gateway_cpu).per_message(n)}")
    print(f"CPU per message, bare mosquitto        : {median_cpu(bare_cpu).per_message(n).split('mosquitto')[1].strip()}")
    print(f"publishers' own CPU per message        : {statistics.median(pub_bare):5.1f} µs against the bare broker, "
          f"{statistics.median(pub_gateway):5.1f} µs against the gateway (medians)")
    print(f"load average (1, 5, 15 min)            : {' '.join(f'{x:.2f}' for x in os.getloadavg())}")



def profile(args: argparse.Namespace) -> None:
    """One gateway run with py-spy sampling this process (the trio thread, idle frames left out)."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    fmt = "raw" if args.profile.endswith(".txt") else "speedscope"  # raw: collapsed stacks, per thread
    rec = subprocess.Popen([spy, "record", "--pid", str(os.getpid()), "--rate", "500", "--format", fmt, "--threads",
                            "--output", args.profile, "--nonblocking", *os.environ.get("PYSPY_EXTRA", "").split()])
    time.sleep(1)
    rate, cpu, _, _ = trio.run(run_gateway, args.devices, args.messages)
    rec.send_signal(2)
    rec.wait()
    print(f"profiled run: {rate:8.0f} msg/s  {cpu.per_message(args.devices * args.messages)}  -> {args.profile}")


if __name__ == "__main__":
    main()
