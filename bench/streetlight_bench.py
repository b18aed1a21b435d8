"""streetlight: status updates through the full path, and a fleet of lights at 10x cadence.

    .venv/bin/python bench/streetlight_bench.py [--duration 10] [--repeats 3] [--lights 1000] [--fleet-s 30]
        [--target gateway|hello] [--generator python|wrk] [--gateway-root PATH] [--skip-status-path]
        [--no-upstream]

1. Status path: `POST /streetlight/device/<id>/status` with section 2's example body and
   the light's bearer token (JWT check, body declaration and checks, the status and
   energy rows and the upstream record committed together, the alert rules), driven by
   wrk against the real daemon (`gatewayd run`, its config, mqtt off, and one
   `[[upstream]]` on a closed local port, a site whose link is down: the upstream record
   is written to the outbox in each request's transaction, its delivery costs next to
   nothing: bench/run.py's `upstream_args` says why; `--no-upstream`: none, no upstream
   record, the measure before 2026-12-03). Baseline in the
   same run: the bare QuartTrio hello-world (bench/hello_app.py). Repeats interleaved,
   medians; goal: >= 70 % of the hello-world's req/s. The fleet's other request, a
   command poll with nothing waiting, is measured the same way; each row has the CPU
   time its server process spent per request.
2. Fleet: `--lights` lights (provisioned and configured through the API), each sending
   its status every 3 s and polling its commands every 1 s (the specification's 30 s
   and 10 s, ten times faster) for `--fleet-s` seconds. The client is cheap: one trio
   process, one keep-alive connection per light (opened before the clock starts),
   requests written and answers parsed by hand. A light waits for its answer, as the
   firmware does, up to the specification's 5 s timeout. Printed apart: the gateway's
   answers (200 or not), the client's own failures (timeouts of the generator,
   connections lost), p50/p99 latency, how late the generator sent (its lag: a loaded
   client shows here, not as the gateway's errors), and the CPU seconds per request of
   the gateway's process and of the client (process CPU time: robust to a loaded
   machine), with the load average. Goal: zero errors.

   `--target hello` points the same fleet at the bare hello-world (`hello_app.py
   --any-path`, which answers every path): what the stack alone does under that load.
   `--generator wrk` drives the fleet with wrk (Debian's `wrk`, apt-get install wrk) and
   a Lua script instead of the Python client: one connection per light, the same 1:3 mix
   of status reports and polls over every light, each connection waiting a random 0-1.5 s
   (0.75 s on average: the offered rate) after each answer. wrk is closed-loop: a slow
   server shows as fewer answers per second than offered, and as latency; its
   timeouts (`--timeout`) are the lights' errors. Its CPU time is measured too (the
   child's rusage): a client that eats a core shared with the server is part of the result.

`--gateway-root PATH` runs the gateway from another checkout (a worktree of main: the
"before" of a before/after in the same sitting, with the same bench and client).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
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

from bench.run import _ms, free_port, upstream_args, upstream_note, wait_ready, wrk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token"
STATUS = {"device_id": "{id}", "light_id": "SL001", "timestamp": "2025-12-17T10:30:35Z",
          "status": {"power_state": "on", "brightness": 85, "temperature_celsius": 42.5, "battery_percentage": 95,
                     "gsm_signal_strength": 82, "uptime_seconds": 864000, "error_flags": []},
          "energy": {"voltage": 230.5, "current": 0.26, "power_watts": 60, "frequency": 50, "cumulative_kwh": 1245.67}}


def start_gateway(tmp: Path, port: int, root: Path = ROOT, upstream: bool = True) -> subprocess.Popen[bytes]:
    """The daemon, with an offline `[[upstream]]` unless `upstream` is False (bench/run.py's `upstream_args`)."""
    sink_args, sink_env = upstream_args(tmp, root, enabled=upstream)
    env = {**os.environ, "GATEWAYD_ADMIN_TOKEN": TOKEN, **sink_env}
    if root != ROOT:  # that checkout's gateway and plugin, this bench's venv
        env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "plugins" / "streetlight")])
    return subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", *sink_args, "--set", f"http.listen=127.0.0.1:{port}",
         "--set", f"gateway.data_dir='{tmp}'", "--set", "http.access_log=false", "--set", "mqtt.broker=off",
         "--set", "log.level=warning", "--set", "plugins.streetlight.requests_per_minute=100000",
         # 1,000 lights configure from this one address within a minute (the bench, not a site)
         "--set", "plugins.streetlight.configure_per_address_per_minute=100000"],
        cwd=root, env=env)


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


def status_path(base: str, hello: str, token: str, device: str, tmp: Path, args: argparse.Namespace,
                pids: dict[str, int]) -> None:
    body = json.dumps(STATUS).replace("{id}", device)
    script = tmp / "status.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    poll = tmp / "poll.lua"
    poll.write_text(f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    targets = {"hello-world (bare QuartTrio)": (hello, None),
               "POST .../status (full path)": (f"{base}/streetlight/device/{device}/status", str(script)),
               "GET .../commands (a poll)": (f"{base}/streetlight/device/{device}/commands", str(poll))}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for _ in range(args.repeats):
        for name, (url, lua) in targets.items():
            cpu = cpu_s(pids[name])
            run = wrk(url, args.duration, args.connections, lua)
            run["cpu_ms"] = (cpu_s(pids[name]) - cpu) / max(run["rps"] * args.duration, 1) * 1000
            results[name].append(run)
    hello_rps = statistics.median(r["rps"] for r in results["hello-world (bare QuartTrio)"])
    print(f"\n1. status path: wrk -t1 -c{args.connections} -d{args.duration}s, {args.repeats} repeats, medians "
          f"({os.cpu_count()} cores, {load()})")
    print(f"{'target':<32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs hello':>9} {'non-2xx':>8} {'CPU ms/req':>11}")
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        print(f"{name:<32} {rps:>9.0f} {statistics.median(r['p50'] for r in runs):>8.2f} "
              f"{statistics.median(r['p99'] for r in runs):>8.2f} {rps / hello_rps:>8.0%} "
              f"{sum(r['non2xx'] for r in runs):>8} {statistics.median(r['cpu_ms'] for r in runs):>11.3f}")
    print("goal (the status path): >= 70% of the hello-world's req/s")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


class Answer(Exception):
    """The connection broke or answered something that is not HTTP/1.1."""


async def exchange(stream: trio.SocketStream, buf: bytearray, request: bytes) -> tuple[int, bool]:
    """Send one request on a keep-alive connection, read its answer: (status, keep the connection)."""
    await stream.send_all(request)
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(65536)
        if not data:
            raise Answer("connection closed by the gateway")
        buf += data
    head = bytes(buf[:end]).lower()
    if not head.startswith(b"http/1.1 "):
        raise Answer(f"not an HTTP/1.1 answer: {head[:40]!r}")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line.startswith(b"content-length:"):
            length = int(line[15:])
        elif line.startswith(b"transfer-encoding:"):
            raise Answer("chunked answer")
    need = end + 4 + length
    while len(buf) < need:
        data = await stream.receive_some(65536)
        if not data:
            raise Answer("connection closed mid-answer")
        buf += data
    del buf[:need]
    return int(head[9:12]), b"connection: close" not in head


class Fleet:
    """What the lights saw."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.answers: dict[int, int] = {}
        self.client_errors: dict[str, int] = {}

    def failed(self, why: str) -> None:
        self.client_errors[why] = self.client_errors.get(why, 0) + 1


async def fleet(port: int, tokens: dict[str, str], seconds: float, gateway_pid: int, timeout: float) -> None:
    stats = Fleet()
    host = f"127.0.0.1:{port}".encode()

    async def light(device: str, token: str, stream: trio.SocketStream, start: float, end: float) -> None:
        body = json.dumps(STATUS).replace("{id}", device).encode()
        auth = f"Authorization: Bearer {token}\r\n".encode()
        poll = b"GET /streetlight/device/%s/commands HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (device.encode(), host, auth)
        status = (b"POST /streetlight/device/%s/status HTTP/1.1\r\nHost: %s\r\n%sContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (device.encode(), host, auth, len(body), body))
        buf = bytearray()
        next_poll, next_status = start, start + random.uniform(0, 3)
        while (due := min(next_poll, next_status)) < end:
            await trio.sleep_until(due)
            if next_status <= next_poll:
                request, next_status = status, max(next_status + 3, trio.current_time())
            else:
                request, next_poll = poll, max(next_poll + 1, trio.current_time())
            began = trio.current_time()
            stats.lags.append(began - due)
            try:
                with trio.fail_after(timeout):
                    if stream is None:
                        stream = await trio.open_tcp_stream("127.0.0.1", port)
                        buf.clear()
                    code, keep = await exchange(stream, buf, request)
            except trio.TooSlowError:
                stats.failed(f"no answer within {timeout:g} s")
                stream = None  # a late answer must not be taken for the next one's
                continue
            except (OSError, trio.BrokenResourceError, Answer) as e:
                stats.failed(type(e).__name__ if not isinstance(e, Answer) else str(e))
                stream = None
                continue
            stats.latencies.append(trio.current_time() - began)
            stats.answers[code] = stats.answers.get(code, 0) + 1
            if not keep:
                await stream.aclose()
                stream = None

    # Every light's connection first, outside the clock (hypercorn's listen backlog is 100).
    streams: list[trio.SocketStream] = []
    for _ in tokens:
        streams.append(await trio.open_tcp_stream("127.0.0.1", port))
    gw_cpu, my_cpu, wall = cpu_s(gateway_pid), time.process_time(), time.perf_counter()
    start = trio.current_time() + 0.5
    end = start + seconds
    async with trio.open_nursery() as nursery:
        for (device, token), stream in zip(tokens.items(), streams):
            nursery.start_soon(light, device, token, stream, start + random.uniform(0, 1), end)
    wall = time.perf_counter() - wall
    gw_cpu, my_cpu = cpu_s(gateway_pid) - gw_cpu, time.process_time() - my_cpu
    for stream in streams:
        with trio.move_on_after(0.1):
            await stream.aclose()
    lat, lags = sorted(stats.latencies), sorted(stats.lags)
    n, answers = len(lat), sum(stats.answers.values())
    not_ok = {code: k for code, k in stats.answers.items() if code != 200}

    def pct(xs: list[float], q: float) -> str:
        return f"{xs[min(len(xs) - 1, int(len(xs) * q))] * 1000:.1f}" if xs else "-"

    offered = len(tokens) * (1 + 1 / 3)
    print(f"\n2. fleet: {len(tokens)} lights, status every 3 s and a poll every 1 s (10x the specification's "
          f"cadence: {offered:.0f} req/s offered) for {seconds:.0f} s, one keep-alive connection each "
          f"({os.cpu_count()} cores, {load()})")
    print(f"server answers {answers} ({answers / wall:.0f}/s): 200 {stats.answers.get(200, 0)}, "
          f"other {sum(not_ok.values())} {not_ok or ''}")
    print(f"client errors {sum(stats.client_errors.values())} {stats.client_errors or ''} "
          f"(timeout {timeout:g} s, the specification's)")
    print(f"latency p50 {pct(lat, 0.5)} ms, p99 {pct(lat, 0.99)} ms, max {pct(lat, 1.0)} ms; "
          f"generator lag p50 {pct(lags, 0.5)} ms, p99 {pct(lags, 0.99)} ms")
    print(f"CPU per request: server {gw_cpu / max(n, 1) * 1000:.2f} ms ({gw_cpu / wall:.0%} of a core), "
          f"client {my_cpu / max(n, 1) * 1000:.2f} ms ({my_cpu / wall:.0%} of a core)")
    print("goal: zero errors (gateway answers other than 200, and client errors)")


FLEET_LUA = """
-- 1,000 lights' requests over as many connections: statuses and polls 1:3, each kind
-- round-robin over every light; a random 0-2x think time (mean: the offered rate).
local lights = {lights}
local think_ms = {think_ms}
local statuses, polls = {{}}, {{}}
local s, p, i = 0, 0, 0

function init(args)
   for k, light in ipairs(lights) do
      local auth = {{["Authorization"] = "Bearer " .. light[2], ["Host"] = "{host}"}}
      polls[k] = wrk.format("GET", "/streetlight/device/" .. light[1] .. "/commands", auth)
      local body = string.gsub({body}, "{{id}}", light[1])
      statuses[k] = wrk.format("POST", "/streetlight/device/" .. light[1] .. "/status",
         {{["Authorization"] = auth["Authorization"], ["Host"] = "{host}",
          ["Content-Type"] = "application/json"}}, body)
   end
   math.randomseed(os.time())
end

function request()
   i = i + 1
   if i % 4 == 0 then
      s = s % #lights + 1
      return statuses[s]
   end
   p = p % #lights + 1
   return polls[p]
end

function delay()
   return math.random(0, 2 * think_ms)
end
"""


def wrk_fleet(port: int, tokens: dict[str, str], seconds: float, server_pid: int, timeout: float,
              tmp: Path, target: str) -> None:
    """The fleet, driven by wrk (see the module docstring)."""
    offered = len(tokens) * (1 + 1 / 3)
    think_ms = round(len(tokens) / offered * 1000)
    lights = "{" + ",".join(f'{{"{d}","{t}"}}' for d, t in tokens.items()) + "}"
    script = tmp / "fleet.lua"
    script.write_text(FLEET_LUA.format(lights=lights, think_ms=think_ms, host=f"127.0.0.1:{port}",
                                       body=json.dumps(json.dumps(STATUS))))
    cmd = ["wrk", "-t1", f"-c{len(tokens)}", f"-d{seconds:.0f}s", f"--timeout={timeout:g}s", "--latency",
           "-s", str(script), f"http://127.0.0.1:{port}/"]
    before, server_cpu, wall = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_s(server_pid), time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after, server_cpu, wall = (resource.getrusage(resource.RUSAGE_CHILDREN), cpu_s(server_pid) - server_cpu,
                               time.perf_counter() - wall)
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    answers = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sockets.groups()))) if sockets else {}
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
    print(f"\n2. fleet ({target}, wrk): {len(tokens)} lights, statuses and polls 1:3, one connection each, "
          f"{offered:.0f} req/s offered for {seconds:.0f} s ({os.cpu_count()} cores, {load()})")
    print(f"answers {answers} ({answers / wall:.0f}/s, {answers / wall / offered:.0%} of offered), "
          f"non-2xx {int(non2xx.group(1)) if non2xx else 0}")
    print(f"client errors {sum(errors.values())} {errors or ''} (timeout {timeout:g} s, the specification's)")
    print(f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"CPU per request: server {server_cpu / max(answers, 1) * 1000:.2f} ms ({server_cpu / wall:.0%} of a core), "
          f"client (wrk) {client_cpu / max(answers, 1) * 1000:.2f} ms ({client_cpu / wall:.0%} of a core)")
    print("goal: zero errors (non-2xx answers and client errors), every offered request answered")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lights", type=int, default=1000)
    parser.add_argument("--fleet-s", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=5.0, help="a light's wait for an answer (the spec's 5 s)")
    parser.add_argument("--skip-status-path", action="store_true", help="only the fleet")
    parser.add_argument("--target", choices=("gateway", "hello"), default="gateway",
                        help="the fleet's server: the gateway, or the bare hello-world answering every path")
    parser.add_argument("--generator", choices=("python", "wrk"), default="python", help="the fleet's client")
    parser.add_argument("--gateway-root", type=Path, default=ROOT,
                        help="run the gateway from this checkout (a worktree of main, for a before/after)")
    parser.add_argument("--skip-fleet", action="store_true", help="only the status path")
    parser.add_argument("--no-upstream", action="store_true",
                        help="no [[upstream]]: no upstream record per request (the old measure)")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("bench: wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gatewayd-streetlight-bench-"))
    hello_port, gw_port = free_port(), free_port()
    hello = subprocess.Popen([sys.executable, str(ROOT / "bench" / "hello_app.py"), f"127.0.0.1:{hello_port}",
                              "--any-path"])
    gateway = start_gateway(tmp, gw_port, args.gateway_root.resolve(), not args.no_upstream)
    base = f"http://127.0.0.1:{gw_port}"
    try:
        wait_ready(f"{base}/health")
        wait_ready(f"http://127.0.0.1:{hello_port}/")
        print(f"gateway from {args.gateway_root.resolve()}")
        ids = light_ids(args.lights)
        began = time.monotonic()
        # The hello-world takes any token: only the status path needs a real light then.
        tokens = provision(base, ids if args.target == "gateway" and not args.skip_fleet else ids[:1])
        print(f"{len(tokens)} lights registered and configured in {time.monotonic() - began:.1f} s")
        if not args.skip_status_path:
            status_path(base, f"http://127.0.0.1:{hello_port}/", tokens[ids[0]], ids[0], tmp, args,
                        {"hello-world (bare QuartTrio)": hello.pid, "POST .../status (full path)": gateway.pid,
                         "GET .../commands (a poll)": gateway.pid})
        if not args.skip_fleet:
            port, pid = (gw_port, gateway.pid) if args.target == "gateway" else (hello_port, hello.pid)
            if args.target == "hello":
                tokens = {device: "hello-takes-any-token" for device in ids}
            if args.generator == "wrk":
                wrk_fleet(port, tokens, args.fleet_s, pid, args.timeout, tmp, args.target)
            else:
                trio.run(fleet, port, tokens, args.fleet_s, pid, args.timeout)
        print(upstream_note(base))
    finally:
        gateway.send_signal(signal.SIGTERM)
        hello.terminate()
        gateway.wait(timeout=20)
        hello.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
