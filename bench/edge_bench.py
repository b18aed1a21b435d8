"""The MQTT edge's own cost: devices -> gateway edge -> a minimal handler -> SQLite.

    .venv/bin/python bench/edge_bench.py [--devices 4] [--messages 5000] [--runs 3]

Devices are paho clients (one thread each, QoS 1, 100 in flight) in a process of their
own. The handler is the smallest durable one: one `ctx.ingest.record` with a prepared
family row, so what is measured is the MQTT path, not a plugin's parsing. Three ways,
in the same run:

- bare:     a bare mosquitto, nothing consuming: how fast a broker alone acknowledges;
- broker:   the same gateway, devices publishing to its private mosquitto directly
            (mosquitto acknowledges at once; the gateway's client consumes behind it):
            the path every MQTT device took before the edge;
- edge:     devices through the gateway's edge, acknowledged after the commit.

Prints msg/s (medians) and the ratios, and the CPU time per message (bench/cpu.py) of
the gateway's process (its trio thread apart) and of mosquitto: on a loaded machine the
rates say how much CPU the bench got, the CPU per message what the path costs. "edge" is the stored rate by construction (a
PUBACK follows the commit); for "broker" the rate is mosquitto's acknowledgement rate,
and the bench waits until the gateway stored everything before the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import peewee
import trio
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatewayd.core.mqtt.broker import AclTemplate, BrokerAccount, ManagedBroker, hash_password  # noqa: E402
from gatewayd.core.runtime import tune_gc  # noqa: E402
from gatewayd.plugins.api import InboundMessage, PluginContext, hookimpl  # noqa: E402
from gatewayd.testing import free_port, start_gateway  # noqa: E402

from bench.cpu import Cpu, CpuMeter, median_cpu  # noqa: E402


class Reading(peewee.Model):
    device = peewee.TextField()
    payload = peewee.TextField()

    class Meta:
        table_name = "bench_reading"


_INSERT = "INSERT INTO bench_reading (device, payload) VALUES (?, ?)"


class BenchPlugin:
    """One topic, one durable row per message (prepared), one outbox record."""

    @hookimpl
    def gatewayd_storage_models(self, models: Any) -> None:
        models.add(Reading)

    @hookimpl
    def gatewayd_mqtt_topics(self, topics: Any, ctx: PluginContext[Any, Any]) -> None:
        db = ctx.storage.database

        async def on_data(msg: InboundMessage) -> None:
            device = msg.topic.split("/")[1]
            text = msg.payload.decode()
            await ctx.ingest.record(device, "data", {"raw": text},
                                    family_rows=lambda: db.connection().execute(_INSERT, (device, text)))

        topics.subscribe("bench/+/data", on_data)
        topics.acl("bench/%u/data", "write")


# -- the devices (a process of their own) ----------------------------------------------


def publish_all(port: int, device: str, password: str, count: int, out: dict[str, tuple[float, float]]) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=device)
    c.username_pw_set(device, password)
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port)
    c.loop_start()
    began = time.perf_counter()
    info = None
    for i in range(count):
        info = c.publish(f"bench/{device}/data", json.dumps({"seq": i, "temp_c": 21.5}), qos=1)
    assert info is not None
    info.wait_for_publish(300)
    out[device] = (began, time.perf_counter())
    c.loop_stop()
    c.disconnect()


def publishers_main(port: int, count: int, creds: list[str]) -> None:
    times: dict[str, tuple[float, float]] = {}
    threads = [threading.Thread(target=publish_all, args=(port, dev, pw, count, times))
               for dev, pw in (c.split("=", 1) for c in creds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(len(threads) * count / (max(e for _, e in times.values()) - min(b for b, _ in times.values())))


async def publishers(port: int, count: int, creds: dict[str, str]) -> float:
    args = [sys.executable, __file__, "--publishers", str(port), str(count), *(f"{d}={p}" for d, p in creds.items())]
    done = await trio.run_process(args, capture_stdout=True)
    return float(done.stdout.decode().strip())


# -- the three ways ---------------------------------------------------------------------


async def run_bare(devices: int, messages: int) -> tuple[float, Cpu]:
    creds = {f"d{d}": f"password-{d}" for d in range(devices)}
    with tempfile.TemporaryDirectory() as tmp:
        broker = ManagedBroker(Path(tmp) / "mosquitto", port=free_port(),
                               accounts=[BrokerAccount(d, hash_password(p)) for d, p in creds.items()],
                               acl_templates=[AclTemplate("bench/%u/data", "write")])
        async with trio.open_nursery() as nursery:
            await nursery.start(broker.run)
            meter = CpuMeter(broker.pid)
            rate = await publishers(broker.port, messages, creds)
            cpu = meter.stop()
            nursery.cancel_scope.cancel()
    return rate, cpu


async def run_gateway(devices: int, messages: int, through_edge: bool) -> tuple[float, Cpu]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        settings = ["mqtt.broker='managed'", f"mqtt.listen='127.0.0.1:{port}'", "log.level='warning'",
                    f"mqtt.broker_port={free_port()}"]  # TCP, for the devices of the old path
        async with start_gateway(Path(tmp), plugins=[("bench", BenchPlugin())], settings=settings) as gw:
            creds = {}
            for d in range(devices):
                _, c = await gw.devices.registry.provision("bench", f"d{d}")
                creds[f"d{d}"] = c.key
            await trio.sleep(1.5)  # the broker reloads its accounts
            target = port if through_edge else gw.mqtt.broker.port
            meter = CpuMeter(gw.mqtt.broker.pid)
            rate = await publishers(target, messages, creds)

            def stored() -> int:
                return int(gw.storage.database.execute_sql("SELECT COUNT(*) FROM bench_reading").fetchone()[0])

            total = devices * messages
            with trio.fail_after(300):
                while (count := await gw.storage.read(stored)) < total:
                    await trio.sleep(0.05)
            cpu = meter.stop()  # everything stored
            assert count == total, f"acknowledged {total}, stored {count}"
    return rate, cpu


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--publishers":
        publishers_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--messages", type=int, default=5000, help="per device")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("GATEWAYD_ADMIN_TOKEN", "bench")
    tune_gc()  # as `gatewayd run`
    n = args.devices * args.messages
    bare: list[float] = []
    broker: list[float] = []
    edge: list[float] = []
    cpu: dict[str, list[Cpu]] = {"bare": [], "broker": [], "edge": []}
    for r in range(args.runs):
        for name, rates, run in (("bare", bare, lambda: trio.run(run_bare, args.devices, args.messages)),
                                 ("broker", broker, lambda: trio.run(run_gateway, args.devices, args.messages, False)),
                                 ("edge", edge, lambda: trio.run(run_gateway, args.devices, args.messages, True))):
            rate, used = run()
            rates.append(rate)
            cpu[name].append(used)
        print(f"run {r + 1}: bare {bare[-1]:7.0f}   through mosquitto {broker[-1]:7.0f}   "
              f"through the edge {edge[-1]:7.0f} msg/s   edge: {cpu['edge'][-1].per_message(n)}", flush=True)
    b, m, e = statistics.median(bare), statistics.median(broker), statistics.median(edge)
    print(f"\n{args.devices} devices x {args.messages} messages, QoS 1, 100 in flight per device; "
          "handler: one ingest.record with a prepared family row")
    print(f"bare mosquitto, nothing consuming       : {b:8.0f} msg/s")
    print(f"gateway, devices on mosquitto (acked by mosquitto, before the commit) : {m:8.0f} msg/s  {m / b:6.1%}")
    print(f"gateway, devices on the edge (acked after the commit)                 : {e:8.0f} msg/s  {e / b:6.1%}")
    print(f"edge / mosquitto path                   : {e / m:8.1%}")
    print("CPU per message (medians):")
    print(f"  {'bare mosquitto':22}: mosquitto {median_cpu(cpu['bare']).per_message(n).split('mosquitto')[1].strip()}")
    for name, label in (("broker", "devices on mosquitto"), ("edge", "devices on the edge")):
        print(f"  {label:22}: {median_cpu(cpu[name]).per_message(n)}")
    print(f"load average (1, 5, 15 min)             : {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
