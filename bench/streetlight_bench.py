"""streetlight: status updates through the full path, and a fleet of lights at 10x cadence.

    .venv/bin/python bench/streetlight_bench.py [--duration 10] [--repeats 3] [--lights 1000] [--fleet-s 30]
        [--target gateway|hello|both] [--generator python|wrk] [--gateway-root PATH] [--skip-status-path]
        [--no-upstream] [--busy 32] [--schedule firmware|strict] [--set KEY=VALUE ...]

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
   firmware does, up to the specification's 5 s timeout, and sends its next status or
   poll a period after that answer (`--schedule firmware`, the default: the specification's
   "wait 10 seconds, poll again", firmware/streetlight/controller.py's timing: a slow
   gateway slows its lights, as wrk's think time does); `--schedule strict` keeps a fixed
   schedule instead and sends an overdue request at once (1,333 req/s offered whatever the
   latency: harsher than the specification's lights; until 2026-12-03 the only timing, so
   earlier figures of this client are strict ones). Printed apart: the gateway's
   answers (200 or not), the client's own failures (timeouts of the generator,
   connections lost), p50/p99 latency, how late the generator sent (its lag: a loaded
   client shows here, not as the gateway's errors), and the CPU seconds per request of
   the gateway's process and of the client (process CPU time: robust to a loaded
   machine), with the load average. Goal: zero errors.

   `--target hello` points the same fleet at the bare hello-world (`hello_app.py
   --any-path`, which answers every path): what the stack alone does under that load;
   `--target both`: the hello-world's fleet, then the gateway's, in the same sitting.
   `--generator wrk` drives the fleet with wrk (Debian's `wrk`, apt-get install wrk) and
   a Lua script instead of the Python client: one connection per light, all opened at the
   start (as a site's lights reconnect after a power cut), the same 1:3 mix of status
   reports and polls over every light, each connection waiting a random 0-1.5 s (0.75 s on
   average: the offered rate) after each answer. wrk is closed-loop: a slow server shows as
   fewer answers per second than offered, and as latency. Its CPU time is measured too (the
   child's rusage): a client that eats a core shared with the server is part of the result.
   `--busy N` then sends the same requests over N connections without think time: the
   server's CPU per request without the fleet's 1,000 connections.

   A light's error is a request not answered within the specification's 5 s, counted once
   per request. wrk 4.1 (src/wrk.c) counts less than that: its "timeout" is only an answer
   that came after --timeout (checked when it arrives; left out of the latency histogram,
   so its percentiles leave the late ones out), a request never answered is not counted at
   all, and its clock starts when the request is written, after the connection is up: a
   light whose SYN the full listen queue dropped (sent again after 1, 3, 7 s) waited that
   long, and wrk never sees it. (wrk 3's check_timeouts, every 2 s, counted each connection
   whose `c->start` was older than --timeout: one still connecting (`c->start` 0), one in
   its think time, and a slow request once per 2 s; wrk 4.0 removed it, Debian's wrk is
   4.1.0.) So the script sends for the run's length only and wrk waits on for the 5 s (less 0.3 s, so that an idle connection's
   keep-alive timeout cannot fire first: a request unanswered at the end waited >= 4.7 s),
   and the errors printed are: answers after 5 s (wrk's timeouts, --timeout 5 s), requests
   never answered (sent - answered), non-2xx, broken connections, and lights that got their
   connection only after 5 s. The percentiles are over every request sent, an unanswered
   or late one as ">= 5000 ms". Printed apart: how long the lights waited for their
   connections (a wait of 1-5 s plus a slow first answer is a late request this does not
   count), the answers in each second (a stall shows), and the listen queue's overflows and
   the SYNs sent again per 0.5 s (whole-machine counters, /proc/net/netstat: another
   bench's drops show there too; the lights' own waits are the line above), with the
   accept queue's length (ss's Recv-Q). The hello-world listens with the gateway's queue
   (1,024, `[http] backlog`; before 2026-12-03 hypercorn's 100, and its lights waited for
   their connections).

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
from collections.abc import Sequence
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import _ms, free_port, python_of, upstream_args, upstream_note, wait_ready, wrk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token"
STATUS = {"device_id": "{id}", "light_id": "SL001", "timestamp": "2025-12-17T10:30:35Z",
          "status": {"power_state": "on", "brightness": 85, "temperature_celsius": 42.5, "battery_percentage": 95,
                     "gsm_signal_strength": 82, "uptime_seconds": 864000, "error_flags": []},
          "energy": {"voltage": 230.5, "current": 0.26, "power_watts": 60, "frequency": 50, "cumulative_kwh": 1245.67}}


def start_gateway(tmp: Path, port: int, root: Path = ROOT, python: str | None = None,
                  upstream: bool = True, settings: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """The daemon of checkout `root` (mqtt off, the bench's limits) on 127.0.0.1:`port`, with an
    offline `[[upstream]]` unless `upstream` is False (bench/run.py's `upstream_args`); with
    `python` that interpreter (the checkout's own venv), else this one with `root` first on
    the path; `settings`: more `--set KEY=VALUE`s, after the bench's."""
    sink_args, sink_env = upstream_args(tmp, root, enabled=upstream)
    env = {**os.environ, "GATEWAYD_ADMIN_TOKEN": TOKEN, **sink_env}
    if root != ROOT and python is None:  # that checkout's gateway and plugin, this bench's venv
        env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "plugins" / "streetlight")])
    return subprocess.Popen(
        [python or sys.executable, "-m", "gatewayd", "run", *sink_args, "--set", f"http.listen=127.0.0.1:{port}",
         "--set", f"gateway.data_dir='{tmp}'", "--set", "http.access_log=false", "--set", "mqtt.broker=off",
         "--set", "log.level=warning", "--set", "plugins.streetlight.requests_per_minute=100000",
         # 1,000 lights configure from this one address within a minute (the bench, not a site)
         "--set", "plugins.streetlight.configure_per_address_per_minute=100000",
         *[arg for setting in settings for arg in ("--set", setting)]],
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


def status_script(tmp: Path, token: str, device: str) -> Path:
    """wrk's Lua script for the light's status POST (section 2's example body, its token)."""
    body = json.dumps(STATUS).replace("{id}", device)
    script = tmp / "status.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                      f'wrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    return script


def status_path(base: str, hello: str, token: str, device: str, tmp: Path, args: argparse.Namespace,
                pids: dict[str, int]) -> None:
    script = status_script(tmp, token, device)
    poll = tmp / "poll.lua"
    poll.write_text(f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    targets = {"hello-world (bare QuartTrio)": (hello, None),
               "POST .../status (full path)": (f"{base}/streetlight/device/{device}/status", str(script)),
               "GET .../commands (a poll)": (f"{base}/streetlight/device/{device}/commands", str(poll))}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for _ in range(args.repeats):
        for name, (url, lua) in targets.items():
            cpu, main = cpu_s(pids[name]), cpu_s(pids[name], thread=pids[name])
            run = wrk(url, args.duration, args.connections, lua)
            n = max(run["rps"] * args.duration, 1)
            run["cpu_ms"] = (cpu_s(pids[name]) - cpu) / n * 1000
            run["main_ms"] = (cpu_s(pids[name], thread=pids[name]) - main) / n * 1000
            results[name].append(run)
    hello_rps = statistics.median(r["rps"] for r in results["hello-world (bare QuartTrio)"])
    print(f"\n1. status path: wrk -t1 -c{args.connections} -d{args.duration}s, {args.repeats} repeats, medians "
          f"({os.cpu_count()} cores, {load()})")
    print(f"{'target':<32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs hello':>9} {'non-2xx':>8} {'CPU ms/req':>11} "
          f"{'of it trio':>11}")
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        print(f"{name:<32} {rps:>9.0f} {statistics.median(r['p50'] for r in runs):>8.2f} "
              f"{statistics.median(r['p99'] for r in runs):>8.2f} {rps / hello_rps:>8.0%} "
              f"{sum(r['non2xx'] for r in runs):>8} {statistics.median(r['cpu_ms'] for r in runs):>11.3f} "
              f"{statistics.median(r['main_ms'] for r in runs):>11.3f}")
    print("goal (the status path): >= 70% of the hello-world's req/s; 'of it trio': the main (trio) thread's CPU, "
          "the rest is the storage writer's and other threads'")


def cpu_s(pid: int, *, thread: int | None = None) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat: its exited threads
    too), or of one of its threads (`thread`: the main one's id is the pid)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rpartition(")")[2].split()
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
        self.late_at: list[float] = []  # when (s into the run) each request that got no answer in time was sent

    def failed(self, why: str) -> None:
        self.client_errors[why] = self.client_errors.get(why, 0) + 1


async def fleet(port: int, tokens: dict[str, str], seconds: float, gateway_pid: int, timeout: float,
                strict: bool = False) -> None:
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
                request = status
                if strict:
                    next_status = max(next_status + 3, trio.current_time())
            else:
                request = poll
                if strict:
                    next_poll = max(next_poll + 1, trio.current_time())
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
                stats.late_at.append(began - start)
                stream = None  # a late answer must not be taken for the next one's
                continue
            except (OSError, trio.BrokenResourceError, Answer) as e:
                stats.failed(type(e).__name__ if not isinstance(e, Answer) else str(e))
                stream = None
                continue
            finally:
                if not strict:  # the firmware's timing: the next one a period after this one's end
                    if request is status:
                        next_status = trio.current_time() + 3
                    else:
                        next_poll = trio.current_time() + 1
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
    timing = ("a strict schedule: an overdue request sent at once" if strict
              else "each a period after the last one's answer, as the firmware does")
    print(f"\n2. fleet: {len(tokens)} lights, status every 3 s and a poll every 1 s (10x the specification's "
          f"cadence: {offered:.0f} req/s offered at most; {timing}) for {seconds:.0f} s, one keep-alive "
          f"connection each ({os.cpu_count()} cores, {load()})")
    print(f"server answers {answers} ({answers / wall:.0f}/s): 200 {stats.answers.get(200, 0)}, "
          f"other {sum(not_ok.values())} {not_ok or ''}")
    print(f"client errors {sum(stats.client_errors.values())} {stats.client_errors or ''} "
          f"(timeout {timeout:g} s, the specification's)")
    print(f"latency p50 {pct(lat, 0.5)} ms, p99 {pct(lat, 0.99)} ms, max {pct(lat, 1.0)} ms; "
          f"generator lag p50 {pct(lags, 0.5)} ms, p99 {pct(lags, 0.99)} ms")
    print(f"CPU per request: server {gw_cpu / max(n, 1) * 1000:.2f} ms ({gw_cpu / wall:.0%} of a core), "
          f"client {my_cpu / max(n, 1) * 1000:.2f} ms ({my_cpu / wall:.0%} of a core)")
    if stats.late_at:
        fives = [0] * (int(seconds // 5) + 1)
        for at in stats.late_at:
            fives[min(len(fives) - 1, max(0, int(at // 5)))] += 1
        print("requests with no answer in time, by when they were sent (each 5 s of the run): "
              + " ".join(map(str, fives)))
    print("goal: zero errors (gateway answers other than 200, and client errors)")


FLEET_LUA = """
-- 1,000 lights' requests over as many connections: statuses and polls 1:3, each kind
-- round-robin over every light; a random 0-2x think time (mean: the offered rate).
-- Requests are sent for {seconds} s only (a think time is cut short to end by then); wrk runs
-- {drain} s longer, so a request still unanswered when wrk stops waited at least that long.
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} fleet_timespec;
int clock_gettime(int clock, fleet_timespec *tp);
]]
local ts = ffi.new("fleet_timespec")
local function now()  -- CLOCK_MONOTONIC, seconds
   ffi.C.clock_gettime(1, ts)
   return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local lights = {lights}
local think_ms = {think_ms}
local statuses, polls = {{}}, {{}}
local s, p, i = 0, 0, 0
local stop_at, began
sent = -1  -- a global (done() reads it: thread:get); wrk calls request() once to check it, unsent
-- wrk calls delay() before every request: after an answer, and on a new connection (before
-- its first request). A delay() with no answer of the same connection before it is the
-- latter: its time since the start is how long that light waited for its connection (a SYN
-- the listen queue dropped is sent again 1, 3, 7 s later), outside wrk's latencies.
connects, connect_1s, connect_3s, connect_5s, connect_max_ms = 0, 0, 0, 0, 0
local answered, delays_after_answers = 0, 0
per_second = {{}}  -- answers in each second since the start (when a stall or a storm was)
local threads = {{}}

function setup(thread)
   table.insert(threads, thread)
end

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
   began = now()
   stop_at = began + {seconds}
end

function request()
   sent = sent + 1
   i = i + 1
   if i % 4 == 0 then
      s = s % #lights + 1
      return statuses[s]
   end
   p = p % #lights + 1
   return polls[p]
end

function response(status, headers, body)
   answered = answered + 1
   local second = math.floor(now() - began) + 1
   per_second[second] = (per_second[second] or 0) + 1
end

function delay()
   local t = now()
   if delays_after_answers < answered then
      delays_after_answers = delays_after_answers + 1
   elseif connects < #lights then  -- later ones reconnect a broken connection (counted as such)
      local waited = t - began
      connects = connects + 1
      if waited >= 1 then connect_1s = connect_1s + 1 end
      if waited >= 3 then connect_3s = connect_3s + 1 end
      if waited >= 5 then connect_5s = connect_5s + 1 end
      connect_max_ms = math.max(connect_max_ms, math.floor(waited * 1000))
   end
   local left = (stop_at - t) * 1000
   if left <= 0 then
      return 3600000  -- the sending is over: this connection waits out the run
   end
   return math.min(math.random(0, 2 * think_ms), left)
end

function done(summary, latency, requests)
   local n, c = 0, {{0, 0, 0, 0, 0}}
   for _, thread in ipairs(threads) do
      n = n + thread:get("sent")
      for k, name in ipairs({{"connects", "connect_1s", "connect_3s", "connect_5s", "connect_max_ms"}}) do
         c[k] = c[k] + thread:get(name)
      end
   end
   local e = summary.errors
   local seconds, last = {{}}, 0
   for _, thread in ipairs(threads) do
      for second, k in pairs(thread:get("per_second")) do
         seconds[second] = (seconds[second] or 0) + k
         last = math.max(last, second)
      end
   end
   for second = 1, last do
      seconds[second] = seconds[second] or 0
   end
   -- wrk's latency histogram holds the answers within --timeout (the late ones are its
   -- "timeout" count): the percentiles over every request sent, the unanswered as late.
   local kept = summary.requests - e.timeout
   local function pct(q)
      local rank = math.ceil(q * n)
      if rank > kept or kept == 0 then
         return -1
      end
      return latency:percentile(100 * rank / kept)
   end
   io.write(string.format("FLEET sent=%d answered=%d late=%d connect=%d read=%d write=%d status=%d "
      .. "p50_us=%d p99_us=%d max_us=%d connects=%d connect_1s=%d connect_3s=%d connect_5s=%d "
      .. "connect_max_ms=%d per_second=%s\\n", n, summary.requests, e.timeout, e.connect, e.read, e.write,
      e.status, pct(0.5), pct(0.99), latency.max, c[1], c[2], c[3], c[4], c[5],
      table.concat(seconds, ",")))
end
"""

#: /proc/net/netstat's counters of the listen queue and of SYNs sent again (the whole
#: machine's: the client and the server are both here).
LISTEN_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPSynRetrans")


def netstat() -> dict[str, int]:
    """The TcpExt counters in LISTEN_COUNTERS, now."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], map(int, values.split()[1:])))
            return {k: table.get(k, 0) for k in LISTEN_COUNTERS}
    return dict.fromkeys(LISTEN_COUNTERS, 0)


def listen_queue(port: int) -> int:
    """Connections waiting in the listener's accept queue on `port` (ss -lnt's Recv-Q)."""
    out = subprocess.run(["ss", "-Hlnt", f"sport = :{port}"], capture_output=True, text=True).stdout.split()
    return int(out[1]) if len(out) > 1 and out[1].isdigit() else 0


def timeline(port: int, seconds: float, samples: list[tuple[float, dict[str, int], int]]) -> None:
    """Per 0.5 s for `seconds`: (time, the listen counters' increase, accept queue length)."""
    began, last = time.perf_counter(), netstat()
    while (t := time.perf_counter() - began) < seconds:
        time.sleep(0.5)
        now = netstat()
        samples.append((t + 0.5, {k: now[k] - last[k] for k in now}, listen_queue(port)))
        last = now


def wrk_fleet(port: int, tokens: dict[str, str], seconds: float, server_pid: int, timeout: float,
              tmp: Path, target: str, busy: bool = False) -> dict[str, float]:
    """The fleet, driven by wrk (see the module docstring); what it printed, as numbers.
    `busy`: no think time (each connection sends again at once: a server's saturation over
    few connections, the same requests)."""
    import threading

    offered = len(tokens) * (1 + 1 / 3)
    think_ms = 0 if busy else round(len(tokens) / offered * 1000)
    # wrk's -d is whole seconds. Sending stops DRAIN_MARGIN_S after `seconds`, wrk `timeout` s
    # after them: an unanswered request waited >= timeout - margin (4.7 s of the 5), and wrk
    # stops before an idle connection's keep-alive timeout (5 s after its last answer,
    # which came after the sending stopped) closes it, which wrk would count as a read error.
    drain_margin = 0.3
    script = tmp / "fleet.lua"
    script.write_text(FLEET_LUA.format(lights="{" + ",".join(f'{{"{d}","{t}"}}' for d, t in tokens.items()) + "}",
                                       think_ms=think_ms, host=f"127.0.0.1:{port}", seconds=seconds + drain_margin,
                                       drain=f"{timeout - drain_margin:g}", body=json.dumps(json.dumps(STATUS))))
    cmd = ["wrk", "-t1", f"-c{len(tokens)}", f"-d{seconds + timeout:.0f}s", f"--timeout={timeout:g}s", "--latency",
           "-s", str(script), f"http://127.0.0.1:{port}/"]
    samples: list[tuple[float, dict[str, int], int]] = []
    sampler = threading.Thread(target=timeline, args=(port, seconds + timeout, samples), daemon=True)
    before, server_cpu, wall = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_s(server_pid), time.perf_counter()
    sampler.start()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after, server_cpu, wall = (resource.getrusage(resource.RUSAGE_CHILDREN), cpu_s(server_pid) - server_cpu,
                               time.perf_counter() - wall)
    sampler.join()
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    line = re.search(r"^FLEET (.*)$", out, re.M).group(1)
    f = {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)\b(?!,)", line)}
    per_second = [int(k) for k in re.search(r"per_second=([\d,]*)", line).group(1).split(",") if k]
    unanswered = f["sent"] - f["answered"] - f["read"] - f["write"]
    errors = f["late"] + unanswered + f["read"] + f["write"] + f["connect"] + f["status"] + f["connect_5s"]
    drops = {k: sum(d[k] for _, d, _ in samples) for k in LISTEN_COUNTERS}
    sending = seconds + drain_margin

    def ms(us: int) -> str:
        return f">= {timeout * 1000:.0f}" if us < 0 else f"{us / 1000:.1f}"

    if busy:
        print(f"\n2b. the same requests over {len(tokens)} busy connections (no think time: "
              f"{target}'s saturation), {seconds:.0f} s ({os.cpu_count()} cores, {load()})")
        print(f"answered {f['answered']} ({f['answered'] / sending:.0f}/s), errors {errors}; CPU per request: server "
              f"{server_cpu / max(f['answered'], 1) * 1000:.2f} ms ({server_cpu / sending:.0%} of a core)")
        return {"errors": errors, **f, "server_ms": server_cpu / max(f["answered"], 1) * 1000,
                "core": server_cpu / sending}
    print(f"\n2. fleet ({target}, wrk): {len(tokens)} lights, statuses and polls 1:3, one connection each "
          f"(all opened at the start), {offered:.0f} req/s offered for {seconds:.0f} s "
          f"({os.cpu_count()} cores, {load()})")
    print(f"sent {f['sent']}, answered {f['answered']} ({f['answered'] / sending:.0f}/s, "
          f"{f['answered'] / sending / offered:.0%} of offered)")
    print(f"errors {errors}: answered after {timeout:g} s {f['late']}, never answered {unanswered}, "
          f"non-2xx {f['status']}, connections broken (read/write) {f['read']}/{f['write']}, connect {f['connect']}, "
          f"connected only after {timeout:g} s {f['connect_5s']}")
    print(f"connections: {f['connects']} made, waited >= 1 s {f['connect_1s']}, >= 3 s {f['connect_3s']} "
          f"(a first answer on top may make it late: not counted), slowest {f['connect_max_ms']} ms")
    print(f"latency over every request sent (unanswered as late): p50 {ms(f['p50_us'])} ms, "
          f"p99 {ms(f['p99_us'])} ms; slowest answer within {timeout:g} s: {f['max_us'] / 1000:.0f} ms")
    print(f"listen queue (whole machine, during the run): overflows {drops['ListenOverflows']}, drops "
          f"{drops['ListenDrops']}, SYNs sent again {drops['TCPSynRetrans']} (a dropped SYN is sent again "
          f"after 1, 3, 7 s: that wait is outside wrk's latencies); first 3 s: "
          + ", ".join(f"{t:.1f}s {d['ListenDrops']}/{d['TCPSynRetrans']}/q{q}" for t, d, q in samples if t <= 3))
    later = [(t, d) for t, d, _ in samples if t > 3 and (d["ListenDrops"] or d["TCPSynRetrans"])]
    if later:
        print("  later drops/SYN resends: " + ", ".join(f"{t:.1f}s {d['ListenDrops']}/{d['TCPSynRetrans']}"
                                                       for t, d in later[:12]))
    print("answers in each second: " + " ".join(map(str, per_second)))
    print(f"CPU per request: server {server_cpu / max(f['answered'], 1) * 1000:.2f} ms "
          f"({server_cpu / sending:.0%} of a core while sending), client (wrk) "
          f"{client_cpu / max(f['answered'], 1) * 1000:.2f} ms ({client_cpu / wall:.0%} of a core)")
    print("goal: zero errors and no listen drops, every offered request answered")
    return {"errors": errors, **f, **drops, "server_ms": server_cpu / max(f["answered"], 1) * 1000,
            "core": server_cpu / sending}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lights", type=int, default=1000)
    parser.add_argument("--fleet-s", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=5.0, help="a light's wait for an answer (the spec's 5 s)")
    parser.add_argument("--skip-status-path", action="store_true", help="only the fleet")
    parser.add_argument("--target", choices=("gateway", "hello", "both"), default="gateway",
                        help="the fleet's server: the gateway, the bare hello-world answering every path, or both "
                             "(the hello-world first)")
    parser.add_argument("--generator", choices=("python", "wrk"), default="python", help="the fleet's client")
    parser.add_argument("--schedule", choices=("firmware", "strict"), default="firmware",
                        help="the Python client's timing: a period after each answer (the spec's 'wait 10 "
                             "seconds, poll again', the firmware's), or a fixed schedule that sends an overdue "
                             "request at once")
    parser.add_argument("--gateway-root", type=Path, default=ROOT,
                        help="run the gateway from this checkout (a worktree of main, for a before/after)")
    parser.add_argument("--skip-fleet", action="store_true", help="only the status path")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="with --generator wrk: after each fleet, the same requests over N connections "
                             "without think time (the CPU per request without the fleet's connections)")
    parser.add_argument("--busy-s", type=float, default=10.0, help="how long the --busy run sends")
    parser.add_argument("--no-upstream", action="store_true",
                        help="no [[upstream]]: no upstream record per request (the old measure)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="a setting for the gateway (gatewayd run --set), e.g. http.max_handlers=0; repeatable")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("bench: wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="gatewayd-streetlight-bench-"))
    hello_port, gw_port = free_port(), free_port()
    hello = subprocess.Popen([sys.executable, str(ROOT / "bench" / "hello_app.py"), f"127.0.0.1:{hello_port}",
                              "--any-path", "--backlog", "1024"])  # the gateway's [http] backlog
    root = args.gateway_root.resolve()  # its own venv when it has one (its plugins, as installed there)
    gateway = start_gateway(tmp, gw_port, root, python_of(root) if root != ROOT else None,
                            upstream=not args.no_upstream, settings=args.settings)
    if args.settings:
        print("gateway settings: " + " ".join(args.settings))
    base = f"http://127.0.0.1:{gw_port}"
    try:
        wait_ready(f"{base}/health")
        wait_ready(f"http://127.0.0.1:{hello_port}/")
        print(f"gateway from {args.gateway_root.resolve()}")
        ids = light_ids(args.lights)
        began = time.monotonic()
        # The hello-world takes any token: only the status path needs a real light then.
        tokens = provision(base, ids if args.target != "hello" and not args.skip_fleet else ids[:1])
        print(f"{len(tokens)} lights registered and configured in {time.monotonic() - began:.1f} s")
        if not args.skip_status_path:
            status_path(base, f"http://127.0.0.1:{hello_port}/", tokens[ids[0]], ids[0], tmp, args,
                        {"hello-world (bare QuartTrio)": hello.pid, "POST .../status (full path)": gateway.pid,
                         "GET .../commands (a poll)": gateway.pid})
        if not args.skip_fleet:
            for target in ("hello", "gateway") if args.target == "both" else (args.target,):
                port, pid = (gw_port, gateway.pid) if target == "gateway" else (hello_port, hello.pid)
                lights = tokens if target == "gateway" else {device: "hello-takes-any-token" for device in ids}
                if args.generator == "wrk":
                    wrk_fleet(port, lights, args.fleet_s, pid, args.timeout, tmp, target)
                    if args.busy:
                        busy = dict(list(lights.items())[:args.busy])
                        wrk_fleet(port, busy, args.busy_s, pid, args.timeout, tmp, target, busy=True)
                else:
                    trio.run(fleet, port, lights, args.fleet_s, pid, args.timeout, args.schedule == "strict")
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
