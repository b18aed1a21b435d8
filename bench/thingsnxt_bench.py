"""thingsnxt telemetry through the full path: `POST /thingsnxt/devices/{id}/telemetry` on the
real daemon (`gatewayd run`, the thingsnxt plugin: parse, token check, the state read and
written, history + per-key rows in one transaction, the live broadcast, the rules; no
`[[upstream]]` is configured, so no upstream record is written: with one, each request
also writes its outbox row and counts in that transaction), with 0 and 10 WebSocket subscribers on `/thingsnxt/ws` (and 10
Server-Sent Events subscribers on `/thingsnxt/sse`), against a bare QuartTrio hello-world
in the same run, and each server's CPU time per request (what the gateway's path costs
whatever else runs on the machine). `GET /thingsnxt/health` (no body, no storage, no auth)
shows what the gateway's HTTP stack alone costs next to the hello-world's.

    .venv/bin/python bench/thingsnxt_bench.py [--duration 10] [--connections 32] [--repeats 3]
        [--gateway-root PATH] [--no-subscribers]

wrk drives each target in turn, repeats interleaved, medians reported (machines here are
noisy). The subscribers are raw WebSocket clients in a process of their own that count the
messages in the bytes (no decoding: they share the 2 cores). Goal (issue 19): the telemetry
path >= 70% of the hello-world's req/s with no subscriber, >= 60% with 10.

`--gateway-root PATH` runs the gateway from another checkout (a worktree of main: the
"before" of a before/after in the same sitting, with the same bench and client);
`--no-subscribers` leaves out the two subscriber rows (a quicker round of an A/B).
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
PLAIN = "GET /thingsnxt/health"  # the plugin's plainest route: what the gateway's HTTP stack costs before any telemetry
SUBSCRIBERS = 10
POST_LUA = """
wrk.method = "POST"
wrk.body = '{"device_token": "%s", "data": {"v0": 1, "v1": 0, "temperature": 25.5}}'
wrk.headers["Content-Type"] = "application/json"
"""


def subscribers_main(host: str, port: int, path: str, n: int) -> None:
    """N WebSocket (or SSE, for a path with /sse) clients reading until SIGTERM; then print
    how many messages each got."""
    import trio

    counts = [0] * n
    missed = [0] * n  # what the hub dropped for a client too slow, as its {"type": "gap", "missed": n} said
    gap = re.compile(rb'"missed": ?(\d+)')

    async def one(i: int, ready: trio.Semaphore) -> None:
        stream = await trio.open_tcp_stream(host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        upgrade = (f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   "Sec-WebSocket-Version: 13\r\n") if "/ws" in path else ""
        await stream.send_all((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{upgrade}"
                               f"Authorization: Bearer {TOKEN}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        assert head.startswith(b"HTTP/1.1 101" if upgrade else b"HTTP/1.1 200"), head[:100]
        counts[i] += head.count(b'"telemetry_update"')
        tail = b""
        ready.release()
        while data := await stream.receive_some(262144):
            counts[i] += data.count(b'"telemetry_update"')
            # A gap message cut between two reads is counted once it is whole.
            text, cut = tail + data, max(0, len(tail + data) - 64)
            missed[i] += sum(int(m.group(1)) for m in gap.finditer(text) if m.end() > len(tail))
            tail = text[cut:]

    async def main() -> None:
        ready = trio.Semaphore(0)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i, ready)
                for _ in range(n):
                    await ready.acquire()
                print("ready", flush=True)
                began = os.times()
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
        ended = os.times()
        cpu = ended.user + ended.system - began.user - began.system
        print(json.dumps({"counts": counts, "missed": missed, "cpu_s": cpu}), flush=True)

    trio.run(main)


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def _cpu_s(pid: int) -> float:
    """A process's CPU time so far (user + system, all threads), seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_gateway(tmp: Path, port: int, queue_size: int, root: Path = ROOT,
                  python: str | None = None) -> subprocess.Popen[bytes]:
    """The daemon of checkout `root` (mqtt off, no rate limit) on 127.0.0.1:`port`; with
    `python` that interpreter (the checkout's own venv), else this one with `root` first on
    the path."""
    env = {**os.environ, "GATEWAYD_ADMIN_TOKEN": TOKEN}
    if root != ROOT and python is None:  # that checkout's gateway and plugin, this bench's venv
        env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "plugins" / "thingsnxt")])
    return subprocess.Popen(
        [python or sys.executable, "-m", "gatewayd", "run", "--set", f"http.listen=127.0.0.1:{port}",
         "--set", f"gateway.data_dir='{tmp}'", "--set", "http.access_log=false", "--set", "mqtt.broker=off",
         "--set", "log.level=warning", "--set", "plugins.thingsnxt.rate_limit=0",
         "--set", f"live.per_token={SUBSCRIBERS + 5}",
         "--set", f"live.queue_size={queue_size}"], cwd=root, env=env)


def telemetry_script(base: str, tmp: Path) -> Path:
    """Register the device bench-1; wrk's Lua script for its telemetry POST (with its token)."""
    r = httpx.post(f"{base}/thingsnxt/devices", json={"device_id": "bench-1"},
                   headers={"Authorization": f"Bearer {TOKEN}"})
    r.raise_for_status()
    script = tmp / "post.lua"
    script.write_text(POST_LUA % r.json()["device_token"])
    return script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queue-size", type=int, default=4096,
                        help="live.queue_size: how many events a subscriber may lag before it loses some "
                             "(thingsnxt sends one frame per event, so its sockets fall behind wrk's 32 "
                             "connections by more than the default 256; tests/test_live.py shows why)")
    parser.add_argument("--gateway-root", type=Path, default=ROOT,
                        help="the checkout whose gateway and plugin run (default: this one)")
    parser.add_argument("--no-subscribers", action="store_true", help="only the rows without subscribers")
    args = parser.parse_args(argv)
    root = args.gateway_root.resolve()

    load_at_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="thingsnxt-bench-"))
    hello_port, gw_port = free_port(), free_port()
    hello = subprocess.Popen([sys.executable, str(ROOT / "bench" / "hello_app.py"), f"127.0.0.1:{hello_port}"])
    gateway = start_gateway(tmp, gw_port, args.queue_size, root)
    base = f"http://127.0.0.1:{gw_port}"
    results: dict[str, list[dict[str, float]]] = {}
    delivered: dict[str, list[str]] = {}
    try:
        wait_ready(f"{base}/health")
        if root != ROOT:
            print(f"gateway from {root}", flush=True)
        wait_ready(f"http://127.0.0.1:{hello_port}/")
        script = telemetry_script(base, tmp)
        url = f"{base}/thingsnxt/devices/bench-1/telemetry"
        wrk(url, 2, args.connections, str(script))  # warm-up, not counted: the first run paid for it alone
        for _ in range(args.repeats):
            runs = [("hello-world (bare QuartTrio)", f"http://127.0.0.1:{hello_port}/", None, 0, ""),
                    (PLAIN, f"{base}/thingsnxt/health", None, 0, ""),
                    ("telemetry, 0 subscribers", url, str(script), 0, ""),
                    (f"telemetry, {SUBSCRIBERS} subscribers", url, str(script), SUBSCRIBERS, "/thingsnxt/ws"),
                    (f"telemetry, {SUBSCRIBERS} SSE subscribers", url, str(script), SUBSCRIBERS, "/thingsnxt/sse")]
            if args.no_subscribers:
                runs = [run for run in runs if not run[3]]
            for name, target, lua, n, path in runs:
                server = hello.pid if target.startswith(f"http://127.0.0.1:{hello_port}/") else gateway.pid
                subs = None
                if n:
                    subs = subprocess.Popen([sys.executable, __file__, "--child-subscribers", str(gw_port), str(n), path],
                                            stdout=subprocess.PIPE, text=True)
                    assert subs.stdout is not None and subs.stdout.readline().strip() == "ready"
                cpu = _cpu_s(server)
                results.setdefault(name, []).append(run := wrk(target, args.duration, args.connections, lua))
                run["cpu_us"] = (_cpu_s(server) - cpu) / (run["rps"] * args.duration) * 1e6
                if subs is not None:
                    time.sleep(2.0)  # a client behind, not dropped, catches up before it is counted
                    subs.send_signal(signal.SIGTERM)
                    out, _ = subs.communicate(timeout=30)
                    got = json.loads(out.strip().splitlines()[-1])
                    slowest = min(range(SUBSCRIBERS), key=lambda i: got["counts"][i])
                    sent = round(run["rps"] * args.duration)
                    delivered.setdefault(path, []).append(
                        f"{got['counts'][slowest]}/~{sent} (dropped {got['missed'][slowest]}; the subscribers' "
                        f"process used {got['cpu_s'] / (args.duration + 2):.0%} of a core)")
        time.sleep(0.5)
    finally:
        gateway.send_signal(signal.SIGTERM)
        hello.terminate()
        gateway.wait(timeout=15)
        hello.wait(timeout=10)

    hello_rps = statistics.median(r["rps"] for r in results["hello-world (bare QuartTrio)"])
    goals = {"telemetry, 0 subscribers": 0.70, f"telemetry, {SUBSCRIBERS} subscribers": 0.60,
             f"telemetry, {SUBSCRIBERS} SSE subscribers": 0.60}
    print(f"\nthingsnxt bench (gateway from {root}): wrk -t1 -c{args.connections} -d{args.duration}s, {args.repeats} repeats, medians "
          f"({os.cpu_count()} cores; load average 1/5/15 min at the start {_load(load_at_start)}, "
          f"at the end {_load(os.getloadavg())})")
    hello_cpu = statistics.median(r["cpu_us"] for r in results["hello-world (bare QuartTrio)"])
    print(f"{'target':<30} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs hello':>9} {'goal':>6} {'non-2xx':>8}"
          f" {'server CPU us/req':>18} {'hello/that':>11}")
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        cpu = statistics.median(r["cpu_us"] for r in runs)
        goal = f"{goals[name]:.0%}" if name in goals else ""
        print(f"{name:<30} {rps:>8.0f} {statistics.median(r['p50'] for r in runs):>8.2f} "
              f"{statistics.median(r['p99'] for r in runs):>8.2f} {rps / hello_rps:>8.0%} {goal:>6} "
              f"{sum(r['non2xx'] for r in runs):>8} {cpu:>18.0f} {hello_cpu / cpu:>11.0%}")
    print("server CPU: the serving process's user + system time (all its threads) per request; hello/that: "
          "the req/s ratio if CPU alone set it (load-independent: wrk and the subscribers take none of it)")
    for path, counts in delivered.items():
        print(f"{path}: messages the slowest of the {SUBSCRIBERS} subscribers got / requests sent "
              f"(and what the hub dropped for it), per run: "
              f"{', '.join(counts)}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child-subscribers"]:
        subscribers_main("127.0.0.1", int(sys.argv[2]), sys.argv[4], int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
