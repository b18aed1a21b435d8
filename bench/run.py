"""HTTP bench: the real daemon vs a bare QuartTrio hello-world, measured in one run.

    .venv/bin/python -m bench [--duration 10] [--connections 32] [--repeats 3]

Drives each target with wrk (Debian's `wrk` package) and prints req/s, p50/p99 latency
and each figure's ratio to the hello-world's req/s; also the daemon's idle RSS and the
time from spawn to `/health` = 200. Targets run in turn, repeats interleaved, medians
reported: machines here are noisy.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
POST_LUA = """
wrk.method = "POST"
wrk.body = '{"device": "bench", "value": 1.5}'
wrk.headers["Content-Type"] = "application/json"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_of(root: Path) -> str | None:
    """The checkout's own interpreter (its venv imports its own plugins), if it has one."""
    venv = root / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else None


def wait_ready(url: str, timeout: float = 30) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.monotonic() - began
        except httpx.TransportError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} not ready within {timeout} s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url: str, duration: int, connections: int, script: str | None = None) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if script:
        cmd[1:1] = ["-s", script]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": p50, "p99": p99, "non2xx": int(errors.group(1)) if errors else 0}


UPSTREAM_SECRET_ENV = "GATEWAYD_BENCH_UPSTREAM_SECRET"


def upstream_args(tmp: Path, root: Path | None = ROOT, *, enabled: bool = True) -> tuple[list[str], dict[str, str]]:
    """`gatewayd run` arguments and environment for a daemon with one `[[upstream]]`, as at a
    site that forwards to its cloud: every ingested record is then written to the outbox
    (its row and counts) in the request's own transaction, the cost a bench of "the full
    path" must include. The sink is an HTTP URL on a closed local port: a site whose link
    is down. Its worker's attempts are refused at once and back off (1 s doubling to
    300 s, the breaker opening after 5), so delivery takes next to no CPU from the
    measured process, and the records stay in the outbox. The reference receiver would
    take the records off again, but it is a Python process on the same 2 cores and the
    worker's batches (encode, compress, HMAC) would run in the measured process: that is
    delivery, not what these benches measure.

    `--set` cannot add an array of tables, so the sink goes into a TOML file in `tmp`
    passed with `--config`: `root`'s gatewayd.toml (what the daemon reads by default from
    its checkout; `root=None`: none, the built-in defaults) with the `[[upstream]]` table
    appended. `enabled=False` (a bench's
    `--no-upstream`): no arguments, the old measure without the upstream record.
    """
    if not enabled:
        return [], {}
    default = None if root is None else root / "gatewayd.toml"
    text = default.read_text() if default is not None and default.exists() else ""
    path = tmp / "bench-upstream.toml"
    path.write_text(f'{text}\n[[upstream]]\nname = "bench-offline"\nurl = "http://127.0.0.1:{free_port()}"\n'
                    f'secret_env = "{UPSTREAM_SECRET_ENV}"\n')
    return ["--config", str(path)], {UPSTREAM_SECRET_ENV: "bench-secret-not-a-real-one"}


def upstream_note(base: str) -> str:
    """What the offline sink did during the run (from /metrics): records it keeps waiting,
    batches attempted (a retry is an attempt: they should stay few)."""
    try:
        text = httpx.get(f"{base}/metrics", timeout=10).text
    except httpx.HTTPError as e:
        return f"upstream: /metrics failed ({e})"
    backlog = re.findall(r'^gatewayd_sync_backlog_records\{sink="bench-offline"\} (\S+)', text, re.M)
    if not backlog:
        return "upstream: none (--no-upstream: no upstream record per request)"
    attempts = sum(float(n) for labels, n in re.findall(r'^gatewayd_sync_batches_total\{([^}]*)\} (\S+)', text, re.M)
                   if 'sink="bench-offline"' in labels)
    return (f"upstream: one sink on a closed port (a site offline): {float(backlog[0]):.0f} records kept in the "
            f"outbox, {attempts:.0f} batch attempts (retries) in the whole run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("bench: wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="gatewayd-bench-"))
    hello_port, gw_port = free_port(), free_port()
    hello = subprocess.Popen([sys.executable, str(ROOT / "bench" / "hello_app.py"), f"127.0.0.1:{hello_port}"])
    began = time.monotonic()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "-p", "tests.plugin_everything", "run",
         "--set", f"http.listen=127.0.0.1:{gw_port}", "--set", f"gateway.data_dir='{tmp}'",
         "--set", "http.access_log=false", "--set", "mqtt.broker=off", "--set", "log.level=warning"],
        cwd=ROOT,
    )
    try:
        wait_ready(f"http://127.0.0.1:{gw_port}/health")
        startup = time.monotonic() - began  # from the process's start, imports included
        wait_ready(f"http://127.0.0.1:{hello_port}/")
        time.sleep(2)
        idle_rss = rss_mb(gateway.pid)
        script = tmp / "post.lua"
        script.write_text(POST_LUA)
        targets = {
            "hello-world (bare QuartTrio)": (f"http://127.0.0.1:{hello_port}/", None),
            "gateway GET /health": (f"http://127.0.0.1:{gw_port}/health", None),
            "durable write (peewee insert)": (f"http://127.0.0.1:{gw_port}/everything/readings", str(script)),
            "durable write (prepared stmt)": (f"http://127.0.0.1:{gw_port}/everything/readings/prepared",
                                              str(script)),
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for _ in range(args.repeats):
            for name, (url, lua) in targets.items():
                results[name].append(wrk(url, args.duration, args.connections, lua))
        loaded_rss = rss_mb(gateway.pid)
        rows = int(subprocess.run(
            ["sqlite3", str(tmp / "gatewayd.sqlite3"), "select count(*) from everything_reading"],
            capture_output=True, text=True).stdout.strip() or 0) if shutil.which("sqlite3") else None
    finally:
        gateway.send_signal(signal.SIGTERM)
        hello.terminate()
        gateway.wait(timeout=10)
        hello.wait(timeout=10)

    base = statistics.median(r["rps"] for r in results["hello-world (bare QuartTrio)"])
    print(f"\nHTTP bench: wrk -t1 -c{args.connections} -d{args.duration}s, {args.repeats} repeats, medians "
          f"({os.cpu_count()} cores)")
    print(f"{'target':<32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs hello':>9} {'non-2xx':>8}")
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        print(f"{name:<32} {rps:>9.0f} {statistics.median(r['p50'] for r in runs):>8.2f} "
              f"{statistics.median(r['p99'] for r in runs):>8.2f} {rps / base:>8.0%} "
              f"{sum(r['non2xx'] for r in runs):>8}")
    print(f"\nstart to /health = 200: {startup:.2f} s")
    print(f"idle RSS: {idle_rss:.1f} MB; RSS after load: {loaded_rss:.1f} MB")
    if rows is not None:
        print(f"rows committed by the durable write route: {rows}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0
