"""paku end to end: devices publish telemetry to the gateway's managed mosquitto; the
paku plugin stores each message (family row + outbox row, ack after commit).

    .venv/bin/python bench/paku_bench.py [--devices 4] [--messages 5000]

Baseline in the same run: the publishers alone, i.e. the rate at which mosquitto
acknowledged their QoS 1 publishes. Figure: the rate at which paku stored them, from
the first publish to the last row committed; ratio = stored / published (100 %:
paku keeps up with what the devices can send).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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

from gatewayd.core.runtime import tune_gc  # noqa: E402
from gatewayd.testing import gw_client, start_gateway  # noqa: E402

TOKEN = "bench-admin-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def publish_all(port: int, device: str, password: str, count: int, out: dict) -> None:
    """One device: `count` telemetry messages at QoS 1, as fast as the broker acks them."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=device)
    c.username_pw_set(device, password)
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port)
    c.loop_start()
    began = time.perf_counter()
    info = None
    for i in range(count):
        info = c.publish(f"paku/{device}/telemetry", json.dumps({"seq": i, "temp_c": 21.5, "hum": 40}), qos=1)
    info.wait_for_publish(120)
    out[device] = (began, time.perf_counter())
    c.loop_stop()
    c.disconnect()


async def run(devices: int, messages: int) -> tuple[float, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        settings = ["mqtt.broker='managed'", f"mqtt.listen='127.0.0.1:{port}'", "log.level='warning'"]
        async with start_gateway(Path(tmp), plugins=[("paku", gatewayd_paku)], settings=settings) as gw:
            creds = {}
            async with gw_client(gw) as client:
                for d in range(devices):
                    r = await client.post("/paku/devices", headers={"Authorization": f"Bearer {TOKEN}"},
                                          json={"id": f"pk-{d}"})
                    creds[f"pk-{d}"] = r.json()["mqtt"]["password"]
            await trio.sleep(1.5)  # the broker reloads its accounts
            times: dict = {}
            threads = [threading.Thread(target=publish_all, args=(port, dev, pw, messages, times))
                       for dev, pw in creds.items()]
            for t in threads:
                t.start()
            total = devices * messages

            def stored() -> int:
                return gw.storage.database.execute_sql("SELECT COUNT(*) FROM paku_measurement").fetchone()[0]

            with trio.fail_after(300):
                while await gw.storage.read(stored) < total:
                    await trio.sleep(0.02)
            done = time.perf_counter()
            await trio.to_thread.run_sync(lambda: [t.join() for t in threads])
    first = min(b for b, _ in times.values())
    last_ack = max(e for _, e in times.values())
    return total / (last_ack - first), total / (done - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--messages", type=int, default=5000, help="per device")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ["GATEWAYD_ADMIN_TOKEN"] = TOKEN
    tune_gc()  # as `gatewayd run`
    results = []
    for r in range(args.runs):
        published, stored = trio.run(run, args.devices, args.messages)
        results.append((published, stored))
        print(f"run {r + 1}: published {published:8.0f} msg/s   stored by paku {stored:8.0f} msg/s", flush=True)
    results.sort(key=lambda x: x[1])
    published, stored = results[len(results) // 2]
    print(f"\n{args.devices} devices x {args.messages} telemetry messages, QoS 1, managed mosquitto")
    print(f"publishers alone (broker acks) : {published:8.0f} msg/s")
    print(f"paku stored (ack after commit) : {stored:8.0f} msg/s   (median run)")
    print(f"ratio                          : {stored / published:8.1%}")


if __name__ == "__main__":
    main()
