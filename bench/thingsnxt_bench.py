"""thingsnxt telemetry through the full path: `POST /thingsnxt/devices/{id}/telemetry` on the
real daemon (`gatewayd run`, the thingsnxt plugin: parse, token check, the state read and
written, history + per-key rows + the upstream record in one transaction, the live
broadcast, the rules), with 0 and 10 WebSocket subscribers on `/thingsnxt/ws`, against a
bare QuartTrio hello-world in the same run.

    .venv/bin/python bench/thingsnxt_bench.py [--duration 10] [--connections 32] [--repeats 3]

wrk drives each target in turn, repeats interleaved, medians reported (machines here are
noisy). The subscribers are raw WebSocket clients in a process of their own that count the
messages in the bytes (no decoding: they share the 2 cores). Goal (issue 19): the telemetry
path >= 70% of the hello-world's req/s with no subscriber, >= 60% with 10.

Each subscriber should get every message: the bench prints, per run, the fewest one got
of those the hub published, the gap markers they saw and the hub's drops (/metrics). A
subscriber may lag `live.queue_size` events before it loses the oldest (by design: ingest
never waits for it). thingsnxt's WebSocket sends one frame per event, so a subscriber's
drain is one scheduler round per event while wrk's 32 connections publish several events
a round: at the default 256 a subscriber lost a third to three quarters of ~2,000 under
wrk (tests/test_live.py shows the mechanism); the bench sets 4096 (--queue-size).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import free_port, wait_ready, wrk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "thingsnxt-bench-token"
SUBSCRIBERS = 10
POST_LUA = """
wrk.method = "POST"
wrk.body = '{"device_token": "%s", "data": {"v0": 1, "v1": 0, "temperature": 25.5}}'
wrk.headers["Content-Type"] = "application/json"
"""


def subscribers_main(host: str, port: int, path: str, n: int) -> None:
    """N WebSocket clients reading until SIGTERM; then print how many messages each got, and
    how many gap markers (the hub dropped events for it)."""
    import trio

    counts = [0] * n
    gaps = [0] * n
    reading = [trio.CancelScope() for _ in range(n)]
    stopping = False

    async def one(i: int, ready: trio.Semaphore) -> None:
        stream = await trio.open_tcp_stream(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                               f"Authorization: Bearer {TOKEN}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        assert head.startswith(b"HTTP/1.1 101"), head[:100]
        ready.release()
        last = b""
        with reading[i]:
            while data := await stream.receive_some(262144):
                seen = last[-17:] + data  # a marker split between two reads is counted once
                counts[i] += seen.count(b'"telemetry_update"')
                gaps[i] += seen.count(b'"type": "gap"') - last[-17:].count(b'"type": "gap"')
                last = data
                if stopping:
                    reading[i].deadline = trio.current_time() + 1.0

    async def main() -> None:
        nonlocal stopping
        ready = trio.Semaphore(0)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i, ready)
                for _ in range(n):
                    await ready.acquire()
                print("ready", flush=True)
                async for _ in signals:
                    break
                # Stop once each has read nothing for a second: what is on its way still counts
                # (on a busy machine this process may read seconds behind the gateway's sends).
                stopping = True
                for scope in reading:
                    scope.deadline = trio.current_time() + 1.0
        print(json.dumps({"counts": counts, "gaps": gaps}), flush=True)

    trio.run(main)


def live_counters(base: str) -> dict[str, float]:
    """The hub's counters (gatewayd_live_events_total) from /metrics."""
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^gatewayd_live_events_total\{what="(\w+)"\} (\S+)', text, re.M)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queue-size", type=int, default=4096,
                        help="live.queue_size: how many events a subscriber may lag before it loses some")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="thingsnxt-bench-"))
    hello_port, gw_port = free_port(), free_port()
    env = {**os.environ, "GATEWAYD_ADMIN_TOKEN": TOKEN}
    hello = subprocess.Popen([sys.executable, str(ROOT / "bench" / "hello_app.py"), f"127.0.0.1:{hello_port}"])
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "--set", f"http.listen=127.0.0.1:{gw_port}",
         "--set", f"gateway.data_dir='{tmp}'", "--set", "http.access_log=false", "--set", "mqtt.broker=off",
         "--set", "log.level=warning", "--set", "plugins.thingsnxt.rate_limit=0",
         "--set", f"live.per_token={SUBSCRIBERS + 5}", "--set", f"live.queue_size={args.queue_size}"],
        cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{gw_port}"
    results: dict[str, list[dict[str, float]]] = {}
    delivered: list[str] = []
    try:
        wait_ready(f"{base}/health")
        wait_ready(f"http://127.0.0.1:{hello_port}/")
        r = httpx.post(f"{base}/thingsnxt/devices", json={"device_id": "bench-1"},
                       headers={"Authorization": f"Bearer {TOKEN}"})
        r.raise_for_status()
        script = tmp / "post.lua"
        script.write_text(POST_LUA % r.json()["device_token"])
        url = f"{base}/thingsnxt/devices/bench-1/telemetry"
        for _ in range(args.repeats):
            runs = [("hello-world (bare QuartTrio)", f"http://127.0.0.1:{hello_port}/", None, 0),
                    ("telemetry, 0 subscribers", url, str(script), 0),
                    (f"telemetry, {SUBSCRIBERS} subscribers", url, str(script), SUBSCRIBERS)]
            for name, target, lua, n in runs:
                subs = None
                if n:
                    subs = subprocess.Popen([sys.executable, __file__, "--subscribers", str(gw_port), str(n)],
                                            stdout=subprocess.PIPE, text=True)
                    assert subs.stdout is not None and subs.stdout.readline().strip() == "ready"
                before = live_counters(base)
                results.setdefault(name, []).append(wrk(target, args.duration, args.connections, lua))
                if subs is not None:
                    subs.send_signal(signal.SIGTERM)  # they stop once they have read everything
                    out, _ = subs.communicate(timeout=120)
                    got = json.loads(out.strip().splitlines()[-1])
                    after = live_counters(base)
                    delivered.append(f"{min(got['counts'])}/{after['published'] - before['published']:.0f}"
                                     f" (gaps {sum(got['gaps'])}, dropped {after['dropped'] - before['dropped']:.0f})")
        time.sleep(0.5)
    finally:
        gateway.send_signal(signal.SIGTERM)
        hello.terminate()
        gateway.wait(timeout=15)
        hello.wait(timeout=10)

    hello_rps = statistics.median(r["rps"] for r in results["hello-world (bare QuartTrio)"])
    goals = {"telemetry, 0 subscribers": 0.70, f"telemetry, {SUBSCRIBERS} subscribers": 0.60}
    print(f"\nthingsnxt bench: wrk -t1 -c{args.connections} -d{args.duration}s, {args.repeats} repeats, medians "
          f"({os.cpu_count()} cores)")
    print(f"{'target':<30} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs hello':>9} {'goal':>6} {'non-2xx':>8}")
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        goal = f"{goals[name]:.0%}" if name in goals else ""
        print(f"{name:<30} {rps:>8.0f} {statistics.median(r['p50'] for r in runs):>8.2f} "
              f"{statistics.median(r['p99'] for r in runs):>8.2f} {rps / hello_rps:>8.0%} {goal:>6} "
              f"{sum(r['non2xx'] for r in runs):>8}")
    print(f"live.queue_size={args.queue_size}; messages the slowest of the {SUBSCRIBERS} subscribers got of those "
          f"published, per run: {delivered}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--subscribers"]:
        subscribers_main("127.0.0.1", int(sys.argv[2]), "/thingsnxt/ws", int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
