"""A paired A/B of one HTTP route: the server of two checkouts driven in alternation.

    .venv/bin/python bench/http_pair.py --before PATH --after PATH [--route streetlight|poll|thingsnxt|hello]
        [--rounds 6] [--duration 5] [--connections 32]

Starts the server of each checkout (its own .venv when it has one, else this interpreter
with the checkout first on the path), then for `--rounds` rounds drives each with wrk in
turn (the order swapped every round: before/after, after/before, ...), and prints per
round and as medians the server process's CPU time per request (user + system of its
/proc/PID/stat around the run: the figure a loaded machine moves least), req/s, and the
after/before ratios, with the load average (`uptime`).

Routes:
- streetlight: `POST /streetlight/device/<id>/status` (bench/streetlight_bench.py's light,
  body and token);
- poll: `GET /streetlight/device/<id>/commands` with nothing waiting, the streetlight
  fleet's other request (three of its four);
- thingsnxt: `POST /thingsnxt/devices/bench-1/telemetry`, no subscriber
  (bench/thingsnxt_bench.py's device and body);
- hello: the bare QuartTrio hello-world (bench/hello_app.py, `GET /`): the before's as it
  is, the after's with `--gateway-http` (the gateway's framework patches applied), so the
  pair says what the patches save on the framework alone; with `--patched-before` the
  before's runs with `--gateway-http` too (two versions of the patches).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import streetlight_bench, thingsnxt_bench  # noqa: E402
from bench.run import free_port, python_of, wait_ready, wrk  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


@dataclass
class Server:
    """One side of the pair: its process, the URL and wrk script to drive."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    script: str | None
    runs: list[dict[str, float]] = field(default_factory=list)


def start_light(root: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], str, str, str]:
    """The checkout's gateway with one configured light: the process, its base URL, the light, its token."""
    port = free_port()
    gateway = streetlight_bench.start_gateway(tmp, port, root, python_of(root))
    base = f"http://127.0.0.1:{port}"
    wait_ready(f"{base}/health")
    device = streetlight_bench.light_ids(1)[0]
    return gateway, base, device, streetlight_bench.provision(base, [device])[device]


def start_streetlight(root: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], str, str | None]:
    gateway, base, device, token = start_light(root, tmp)
    script = streetlight_bench.status_script(tmp, token, device)
    return gateway, f"{base}/streetlight/device/{device}/status", str(script)


def start_poll(root: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], str, str | None]:
    gateway, base, device, token = start_light(root, tmp)
    script = tmp / "poll.lua"
    script.write_text(f'wrk.headers["Authorization"] = "Bearer {token}"\n')  # streetlight_bench's poll
    return gateway, f"{base}/streetlight/device/{device}/commands", str(script)


def start_thingsnxt(root: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], str, str | None]:
    port = free_port()
    gateway = thingsnxt_bench.start_gateway(tmp, port, 4096, root, python_of(root))
    base = f"http://127.0.0.1:{port}"
    wait_ready(f"{base}/health")
    script = thingsnxt_bench.telemetry_script(base, tmp)
    return gateway, f"{base}/thingsnxt/devices/bench-1/telemetry", str(script)


def hello_starter(patched: bool) -> Callable[[Path, Path], tuple[subprocess.Popen[bytes], str, str | None]]:
    def start(root: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], str, str | None]:
        port = free_port()
        cmd = [python_of(root) or sys.executable, str(root / "bench" / "hello_app.py"), f"127.0.0.1:{port}"]
        env = {**os.environ}
        if python_of(root) is None:
            env["PYTHONPATH"] = str(root)
        if patched:
            cmd.append("--gateway-http")
        hello = subprocess.Popen(cmd, cwd=root, env=env)
        wait_ready(f"http://127.0.0.1:{port}/")
        return hello, f"http://127.0.0.1:{port}/", None
    return start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the checkout to compare against (main)")
    parser.add_argument("--after", type=Path, required=True, help="the checkout with the change")
    parser.add_argument("--route", choices=("streetlight", "poll", "thingsnxt", "hello"), default="thingsnxt")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--patched-before", action="store_true",
                        help="hello: the before's hello-world with its --gateway-http too")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("http_pair: wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    starters = {"streetlight": (start_streetlight, start_streetlight),
                "poll": (start_poll, start_poll),
                "thingsnxt": (start_thingsnxt, start_thingsnxt),
                "hello": (hello_starter(args.patched_before), hello_starter(True))}[args.route]
    tmp = Path(tempfile.mkdtemp(prefix="http-pair-"))
    servers: list[Server] = []
    print(f"http_pair: route {args.route}, {args.rounds} rounds of wrk -t1 -c{args.connections} -d{args.duration}s\n"
          f"  before {args.before.resolve()}\n  after  {args.after.resolve()}\n  {uptime()}", flush=True)
    try:
        for name, root, start in (("before", args.before.resolve(), starters[0]),
                                  ("after", args.after.resolve(), starters[1])):
            (tmp / name).mkdir()
            servers.append(Server(name, *start(root, tmp / name)))
        for server in servers:  # warm-up, not counted
            wrk(server.url, 2, args.connections, server.script)
        for i in range(args.rounds):
            for server in (servers if i % 2 == 0 else servers[::-1]):
                pid = server.process.pid
                before_cpu = cpu_s(pid)
                run = wrk(server.url, args.duration, args.connections, server.script)
                run["cpu_us"] = (cpu_s(pid) - before_cpu) / max(run["rps"] * args.duration, 1) * 1e6
                server.runs.append(run)
            b, a = servers[0].runs[-1], servers[1].runs[-1]
            print(f"round {i + 1}: before {b['cpu_us']:7.0f} us/req {b['rps']:7.0f} req/s (non-2xx {b['non2xx']}) | "
                  f"after {a['cpu_us']:7.0f} us/req {a['rps']:7.0f} req/s (non-2xx {a['non2xx']}) | "
                  f"after/before CPU {a['cpu_us'] / b['cpu_us']:.3f}  [{os.getloadavg()[0]:.2f}]", flush=True)
    finally:
        for server in servers:
            server.process.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.process.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    before, after = servers
    med = {s.name: {k: statistics.median(r[k] for r in s.runs) for k in ("cpu_us", "rps")} for s in servers}
    ratios = [a["cpu_us"] / b["cpu_us"] for b, a in zip(before.runs, after.runs)]
    print(f"medians: before {med['before']['cpu_us']:.0f} us/req {med['before']['rps']:.0f} req/s | "
          f"after {med['after']['cpu_us']:.0f} us/req {med['after']['rps']:.0f} req/s")
    print(f"after/before: CPU per request {med['after']['cpu_us'] / med['before']['cpu_us']:.3f} "
          f"(median of the rounds' ratios {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}); "
          f"req/s {med['after']['rps'] / med['before']['rps']:.3f}")
    print(f"  {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
