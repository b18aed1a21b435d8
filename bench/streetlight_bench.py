"""streetlight: status updates through the full path, and a fleet of lights at 10x cadence.

    .venv/bin/python bench/streetlight_bench.py [--duration 10] [--repeats 3] [--lights 1000] [--fleet-s 30]

1. Status path: `POST /streetlight/device/<id>/status` with section 2's example body and
   the light's bearer token (JWT check, body declaration and checks, the status and
   energy rows and the upstream record committed together, the alert rules), driven by
   wrk against the real daemon (`gatewayd run`, its config, mqtt off). Baseline in the
   same run: the bare QuartTrio hello-world (bench/hello_app.py). Repeats interleaved,
   medians; goal: >= 70 % of the hello-world's req/s.
2. Fleet: `--lights` lights (provisioned and configured through the API), each sending
   its status every 3 s and polling its commands every 1 s (the specification's 30 s
   and 10 s, ten times faster), from one trio process with httpx, for `--fleet-s`
   seconds: requests, errors (anything but 200, or no answer), p50/p99 latency.
   Goal: zero errors.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import free_port, wait_ready, wrk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token"
STATUS = {"device_id": "{id}", "light_id": "SL001", "timestamp": "2025-12-17T10:30:35Z",
          "status": {"power_state": "on", "brightness": 85, "temperature_celsius": 42.5, "battery_percentage": 95,
                     "gsm_signal_strength": 82, "uptime_seconds": 864000, "error_flags": []},
          "energy": {"voltage": 230.5, "current": 0.26, "power_watts": 60, "frequency": 50, "cumulative_kwh": 1245.67}}


def start_gateway(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GATEWAYD_ADMIN_TOKEN": TOKEN}
    return subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "--set", f"http.listen=127.0.0.1:{port}",
         "--set", f"gateway.data_dir='{tmp}'", "--set", "http.access_log=false", "--set", "mqtt.broker=off",
         "--set", "log.level=warning", "--set", "plugins.streetlight.requests_per_minute=100000"],
        cwd=ROOT, env=env)


def light_ids(n: int) -> list[str]:
    return [f"IMEI:35123456{i:07d}" for i in range(n)]


def provision(base: str, ids: list[str]) -> dict[str, str]:
    """Register and configure each light; its token."""
    tokens = {}
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, timeout=30) as c:
        for device in ids:
            r = c.post("/api/gateway/devices", headers=admin, json={"family": "streetlight", "id": device})
            assert r.status_code == 201, r.text
            r = c.post(f"/streetlight/device/{device}/configure", json={"latitude": 28.6, "longitude": 77.2})
            assert r.status_code == 200, r.text
            tokens[device] = r.json()["device_token"]
    return tokens


def status_path(base: str, hello: str, token: str, device: str, tmp: Path, args: argparse.Namespace) -> None:
    body = json.dumps(STATUS).replace("{id}", device)
    script = tmp / "status.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    targets = {"hello-world (bare QuartTrio)": (hello, None),
               "POST .../status (full path)": (f"{base}/streetlight/device/{device}/status", str(script))}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for _ in range(args.repeats):
        for name, (url, lua) in targets.items():
            results[name].append(wrk(url, args.duration, args.connections, lua))
    hello_rps = statistics.median(r["rps"] for r in results["hello-world (bare QuartTrio)"])
    print(f"\n1. status path: wrk -t1 -c{args.connections} -d{args.duration}s, {args.repeats} repeats, medians "
          f"({os.cpu_count()} cores)")
    print(f"{'target':<32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs hello':>9} {'non-2xx':>8}")
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        print(f"{name:<32} {rps:>9.0f} {statistics.median(r['p50'] for r in runs):>8.2f} "
              f"{statistics.median(r['p99'] for r in runs):>8.2f} {rps / hello_rps:>8.0%} "
              f"{sum(r['non2xx'] for r in runs):>8}")
    print("goal: >= 70% of the hello-world's req/s")


async def fleet(base: str, tokens: dict[str, str], seconds: float) -> None:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as c:
        end = trio.current_time() + seconds

        async def light(device: str, token: str) -> None:
            auth = {"Authorization": f"Bearer {token}"}
            body = json.dumps(STATUS).replace("{id}", device).encode()
            next_status = trio.current_time() + random.uniform(0, 3)
            await trio.sleep(random.uniform(0, 1))
            while trio.current_time() < end:
                calls = [("GET", f"/streetlight/device/{device}/commands", None)]
                if trio.current_time() >= next_status:
                    calls.append(("POST", f"/streetlight/device/{device}/status", body))
                    next_status += 3
                for method, url, content in calls:
                    began = time.perf_counter()
                    try:
                        r = await c.request(method, url, content=content, headers=auth)
                        if r.status_code != 200:
                            errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    except httpx.HTTPError as e:
                        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    latencies.append(time.perf_counter() - began)
                await trio.sleep(1)

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for device, token in tokens.items():
                nursery.start_soon(light, device, token)
        took = time.perf_counter() - began
    latencies.sort()
    n = len(latencies)
    offered = len(tokens) * (1 + 1 / 3)
    print(f"\n2. fleet: {len(tokens)} lights, status every 3 s and a poll every 1 s (10x the specification's "
          f"cadence: {offered:.0f} req/s offered) for {seconds:.0f} s")
    print(f"requests {n} ({n / took:.0f}/s), errors {sum(errors.values())} {errors or ''}, "
          f"p50 {latencies[n // 2] * 1000:.1f} ms, p99 {latencies[int(n * 0.99)] * 1000:.1f} ms")
    print("goal: zero errors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lights", type=int, default=1000)
    parser.add_argument("--fleet-s", type=float, default=30.0)
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("bench: wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gatewayd-streetlight-bench-"))
    hello_port, gw_port = free_port(), free_port()
    hello = subprocess.Popen([sys.executable, str(ROOT / "bench" / "hello_app.py"), f"127.0.0.1:{hello_port}"])
    gateway = start_gateway(tmp, gw_port)
    base = f"http://127.0.0.1:{gw_port}"
    try:
        wait_ready(f"{base}/health")
        wait_ready(f"http://127.0.0.1:{hello_port}/")
        ids = light_ids(args.lights)
        began = time.monotonic()
        tokens = provision(base, ids)
        print(f"{len(ids)} lights registered and configured in {time.monotonic() - began:.1f} s")
        status_path(base, f"http://127.0.0.1:{hello_port}/", tokens[ids[0]], ids[0], tmp, args)
        trio.run(fleet, base, tokens, args.fleet_s)
    finally:
        gateway.send_signal(signal.SIGTERM)
        hello.terminate()
        gateway.wait(timeout=20)
        hello.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
