"""Live fan-out: device messages through the MQTT edge, each one published to the live hub
after its commit, delivered over WebSocket and SSE to N = 0, 1, 10, 100 subscribers.

    .venv/bin/python bench/live_bench.py [--devices 4] [--messages 3000] [--runs 3]

Devices (paho, QoS 1, 100 in flight) and subscribers (raw sockets: every other one a
WebSocket, the others Server-Sent Events) run in processes of their own. Figures per N, medians of the runs: the ingest rate (messages
acknowledged, i.e. stored, per second), events delivered to subscribers per second, and
the hub latency (a subscriber's receive time minus the event's publish time, same clock),
p50 and p99, and the gateway's own CPU time per message (user + system; this process's, all its threads:
on 2 cores the subscribers' process takes CPU from the gateway, which the ingest ratio
mixes in; the CPU figure is the gateway's fan-out cost alone; the subscribers' process's CPU per
message is printed too, to see what the clients take). The baseline is N = 0 in the same run. Goals (issue 16): ingest with 100
subscribers >= 90% of ingest without any; p99 latency at 10 subscribers < 50 ms.

    .venv/bin/python bench/live_bench.py --direct 4000 [--messages 3000] [--runs 3]

publishes on the hub itself at that rate (events/s, no devices, no storage): the gateway's CPU
per event is then the fan-out's alone (N = 0: publish only), from the first publish until every
subscriber has read every event; steadier than the ingest figures on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edge_bench import BenchPlugin, publishers  # noqa: E402  (the same devices and handler)

from gatewayd.core.runtime import tune_gc  # noqa: E402
from gatewayd.plugins.api import InboundMessage, PluginContext, hookimpl  # noqa: E402
from gatewayd.testing import free_port, gw_url, start_gateway, wait_until  # noqa: E402

TOKEN = "live-bench-token"
_INSERT = "INSERT INTO bench_reading (device, payload) VALUES (?, ?)"


class LivePlugin(BenchPlugin):
    """edge_bench's handler, then the reading on the live hub (after the commit)."""

    @hookimpl
    def gatewayd_mqtt_topics(self, topics: Any, ctx: PluginContext[Any, Any]) -> None:
        db = ctx.storage.database

        async def on_data(msg: InboundMessage) -> None:
            device = msg.topic.split("/")[1]
            text = msg.payload.decode()
            await ctx.ingest.record(device, "data", {"raw": text},
                                    family_rows=lambda: db.connection().execute(_INSERT, (device, text)))
            ctx.live.publish("reading", device, {"raw": text})

        topics.subscribe("bench/+/data", on_data)
        topics.acl("bench/%u/data", "write")


# -- the subscribers (a process of their own) ---------------------------------------------


async def subscribers_main(url: str, n: int, expect: int, sse_share: bool = True) -> None:
    """N clients, WebSocket and SSE by turns, that read their streams as raw bytes (server frames
    are not masked) and look only at the last whole event of each read: its id (the hub numbers
    events 1, 2, ... and nothing but the bench publishes, so the last id is how many arrived; what
    the hub dropped for a slow reader is its own count, printed with the results) and, every 10th
    read, its timestamp for the latency. Decoding, or even scanning, every byte in Python would
    spend the CPU the gateway shares with them (2 cores): they read 100 times what is published."""
    import base64
    import re
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    latencies: list[float] = []
    counts = [0] * n
    ready = trio.Semaphore(0)
    done = trio.Event()
    event_head = re.compile(rb'\{"id":(\d+),"stream":"[^"]*","ts":([0-9.]+),')

    async def one(i: int) -> None:
        # Every other subscriber reads Server-Sent Events, the others a WebSocket.
        sse = sse_share and i % 2 == 1
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
        if sse:
            await stream.send_all((f"GET {parts.path}/events?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                                   f"Accept: text/event-stream\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode())
        else:
            key = base64.b64encode(os.urandom(16)).decode()
            await stream.send_all((f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                                   f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                   f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        assert head.startswith(b"HTTP/1.1 200" if sse else b"HTTP/1.1 101"), head[:100]
        ready.release()
        chunks = 0
        while counts[i] < expect:
            data = await stream.receive_some(262144)
            if not data:
                break
            end = len(data)
            while (end := data.rfind(b'{"id":', 0, end)) >= 0:
                if found := event_head.match(data, end):  # the last whole one in the read
                    counts[i] = int(found[1])
                    chunks += 1
                    if chunks % 10 == 1:
                        latencies.append(time.time() - float(found[2]))
                    break
        if all(c >= expect for c in counts):
            done.set()

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
        for _ in range(n):
            await ready.acquire()
        print("ready", flush=True)
        began, cpu = time.perf_counter(), _cpu_s()
        with trio.move_on_after(300):
            await done.wait()
        elapsed, cpu = time.perf_counter() - began, _cpu_s() - cpu
        nursery.cancel_scope.cancel()
    latencies.sort()
    pct = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan"))
    print(json.dumps({"delivered": sum(counts), "elapsed": elapsed, "p50": pct(0.5), "p99": pct(0.99),
                      "fewest": min(counts), "cpu_s": cpu}), flush=True)


def _cpu_s() -> float:
    """This process's CPU time so far (user + system), seconds."""
    used = os.times()
    return used.user + used.system


# -- one run ------------------------------------------------------------------------------


async def _publish_directly(gw: Any, total: int, rate: float) -> float:
    """`total` events on the hub at `rate` per second, in bursts of 10 (events/s reached)."""
    began = trio.current_time()
    for i in range(total):
        gw.live.publish(f"bench.reading.d{i % 4}", {"raw": json.dumps({"seq": i, "temp_c": 21.5})})
        if i % 10 == 9:
            await trio.sleep_until(began + (i + 1) / rate)
    return total / (trio.current_time() - began)


async def run(devices: int, messages: int, n: int, extra: tuple[str, ...] = (), direct: float = 0) -> dict[str, float]:
    port = free_port()
    os.environ["GATEWAYD_ADMIN_TOKEN"] = TOKEN
    with tempfile.TemporaryDirectory() as tmp:
        settings = ["mqtt.broker='managed'", f"mqtt.listen='127.0.0.1:{port}'", "log.level='warning'",
                    f"live.max_subscribers={max(n, 1) + 5}", f"live.per_token={max(n, 1) + 5}",
                    "live.queue_size=100000", *extra]
        async with start_gateway(Path(tmp), plugins=[("bench", LivePlugin())], settings=settings) as gw:
            creds = {}
            for d in range(devices):
                _, c = await gw.devices.registry.provision("bench", f"d{d}")
                creds[f"d{d}"] = c.key
            await trio.sleep(1.5)  # the broker reloads its accounts
            result: dict[str, float] = {}
            async with trio.open_nursery() as nursery:
                proc = None
                if n:
                    url = gw_url(gw).replace("http://", "ws://") + "/api/gateway/live?streams=bench.%23"
                    proc = await nursery.start(_spawn_subscribers, url, n, devices * messages)
                    await wait_until(lambda: gw.live.subscribers == n, timeout=60)
                cpu = os.times()  # this process is the gateway: devices and subscribers are not
                if direct:
                    result["ingest"] = await _publish_directly(gw, devices * messages, direct)
                    out_line = await _last_line(proc) if proc is not None else ""  # all delivered: the CPU since
                else:
                    result["ingest"] = await publishers(port, messages, creds)
                used = os.times()
                result["cpu_us"] = (used.user + used.system - cpu.user - cpu.system) / (devices * messages) * 1e6
                result["sys_us"] = (used.system - cpu.system) / (devices * messages) * 1e6
                if proc is not None:
                    out = json.loads(out_line if direct else await _last_line(proc))
                    result.update(delivered_per_s=out["delivered"] / out["elapsed"], p50_ms=out["p50"] * 1000,
                                  p99_ms=out["p99"] * 1000, fewest=out["fewest"],
                                  client_us=out["cpu_s"] / (devices * messages) * 1e6)
            result["dropped"] = gw.live.stats["dropped"]
    return result


async def _spawn_subscribers(url: str, n: int, expect: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    proc = await trio.lowlevel.open_process([sys.executable, __file__, "--child-subscribers", url, str(n), str(expect)],
                                            stdout=-1)
    assert proc.stdout is not None
    buf = b""
    while b"ready\n" not in buf:
        buf += await proc.stdout.receive_some(4096)
    proc.buffered = buf.split(b"ready\n", 1)[1]  # type: ignore[attr-defined]
    task_status.started(proc)
    await proc.wait()


async def _last_line(proc: Any) -> str:
    buf = proc.buffered
    while b"\n" not in buf:
        chunk = await proc.stdout.receive_some(4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode().strip().splitlines()[-1]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child-subscribers":
        trio.run(subscribers_main, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--publishers":
        from edge_bench import publishers_main

        publishers_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--messages", type=int, default=3000, help="per device")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--subscribers", type=int, nargs="*", default=[0, 1, 10, 100])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a gateway setting for every run, e.g. live.batch_ms=50")
    parser.add_argument("--direct", type=float, default=0, metavar="EVENTS_PER_S",
                        help="publish on the hub at this rate instead of through devices (the fan-out alone)")
    args = parser.parse_args()
    tune_gc()
    results: dict[int, list[dict[str, float]]] = {n: [] for n in args.subscribers}
    for r in range(args.runs):
        for n in args.subscribers:
            results[n].append(trio.run(run, args.devices, args.messages, n, tuple(args.set), args.direct))
            got = results[n][-1]
            extra = (f"   delivered {got['delivered_per_s']:8.0f}/s   p50 {got['p50_ms']:6.1f} ms   "
                     f"p99 {got['p99_ms']:6.1f} ms   dropped {got['dropped']:.0f}"
                     f"   fewest {got['fewest']:.0f}/{args.devices * args.messages}"
                     f"   subscribers' process CPU {got['client_us']:4.0f} us/msg") if n else ""
            print(f"run {r + 1}, {n:3d} subscribers: ingest {got['ingest']:7.0f} msg/s   gateway CPU "
                  f"{got['cpu_us']:5.0f} us/msg (system {got['sys_us']:4.0f}){extra}", flush=True)
    base = statistics.median(x["ingest"] for x in results[args.subscribers[0]])
    base_cpu = statistics.median(x["cpu_us"] for x in results[args.subscribers[0]])
    print(f"\n{args.devices * args.messages} events published on the hub at {args.direct:.0f}/s" if args.direct else
          f"\n{args.devices} devices x {args.messages} messages through the edge; each stored, then published live")
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (2 cores, shared)")
    for n in args.subscribers:
        ingest = statistics.median(x["ingest"] for x in results[n])
        cpu = statistics.median(x["cpu_us"] for x in results[n])
        line = (f"{n:3d} subscribers: ingest {ingest:7.0f} msg/s ({ingest / base:6.1%} of {args.subscribers[0]})"
                f"   gateway CPU {cpu:5.0f} us/msg ({cpu / base_cpu:4.2f}x)")
        if n:
            med = {k: statistics.median(x[k] for x in results[n])
                   for k in ("delivered_per_s", "p50_ms", "p99_ms", "client_us")}
            line += (f"   delivered {med['delivered_per_s']:8.0f} events/s   p50 {med['p50_ms']:6.1f} ms"
                     f"   p99 {med['p99_ms']:6.1f} ms   subscribers' CPU {med['client_us']:4.0f} us/msg")
        print(line)


if __name__ == "__main__":
    main()
