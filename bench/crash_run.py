"""Crash run: are acknowledged paku messages kept, exactly once, through process kills?

    .venv/bin/python bench/crash_run.py [--devices 4] [--rate 200] [--gateway-kills 4]
        [--broker-kills-down 2] [--broker-kills-stalled 2] [--seed N] [--keep]

    # the defaults take about 1.5 min; the run issue 14 asks for, about 12 min:
    .venv/bin/python bench/crash_run.py --gateway-kills 50 --broker-kills-down 10 --broker-kills-stalled 10

What it measures. The product's first rule is "nothing is acknowledged to a device before
it is committed". For MQTT devices the acknowledgement a device sees is the broker's
PUBACK, so this run counts, per (device, seq), what the devices were acknowledged and
what the gateway stored, while it kills the gateway and its managed mosquitto at random
moments under load:

- a real ``gatewayd run`` subprocess (paku plugin, ``mqtt.broker = "managed"`` on a free
  ``mqtt.listen`` port, the HTTP API on a free port, an admin token) in a temporary data
  dir, forwarding upstream to the reference receiver (``gatewayd receive``, its own
  subprocess), so what reached the cloud is counted too;
- N paku devices provisioned over the admin API (``POST /paku/devices``), each a paho
  2.x client in this process (MQTT 3.1.1, ``clean_session=False``, client id = device
  id, QoS 1, in-flight window ``--inflight``, automatic reconnect with a 0.2-2 s
  backoff) publishing ``paku/<id>/telemetry`` = ``{"seq": n, ...}`` at ``--rate``
  messages a second each. A seq is ACKNOWLEDGED when paho reports its PUBACK
  (``on_publish``). A device keeps at most ``--buffer`` unacknowledged messages (a real
  device's bounded buffer; it pauses its readings beyond that, counted as "throttled").

The faults, in a seeded random order, each after a random gap of ``--gap-min`` to
``--gap-max`` seconds of load (the gateway is back and connected before a gap starts):

- gateway: SIGKILL the gateway (a crash, the OOM killer, a watchdog) and start it
  again. Its mosquitto is left running and keeps acknowledging devices while nothing
  drains it; the new gateway stops it with SIGTERM (mosquitto saves its state) and starts
  its own.
- broker_down: SIGKILL the gateway, ~1.5 s later SIGKILL the mosquitto it left behind,
  start the gateway again. Both processes dying (an OOM kill of the service's cgroup, a
  crash loop); messages mosquitto acknowledged after its last save of its state exist
  nowhere else.
- broker_stalled: SIGSTOP the gateway (a long GC pause, a disk that hangs, a VM that is
  descheduled), ``--stall`` seconds later SIGKILL its mosquitto, then SIGCONT: the
  gateway notices and restarts mosquitto itself. While it is stopped, mosquitto keeps
  acknowledging devices; what it could hand the gateway waits in the gateway's socket
  buffer (read after SIGCONT), the rest (beyond mosquitto's in-flight window for the
  gateway's session) waits in mosquitto's memory.

None of them is a power cut: the page cache survives a process kill, so SQLite
(``synchronous=NORMAL``) and mosquitto's files keep what they wrote. A lost message here
is lost by the design, not by the disk.

The processes are found by pid files and /proc, not by port: the gateway is our child;
its broker is any mosquitto named by a ``*.pid`` file under the data dir, any mosquitto
whose command line names the data dir, and any mosquitto descendant of the gateway
(looked up before the gateway is killed). A fault that finds no broker is reported as
such (the design may have no separate broker any more).

Device side, as paho 2.2 actually behaves (read in paho/mqtt/client.py and seen here):
a QoS 1 message stays in the client's ``_out_messages`` until its PUBACK; a publish
while disconnected is kept (``rc = MQTT_ERR_NO_CONN``, sent after the next CONNACK). On
every reconnect paho re-sends every unacknowledged QoS 1 message (DUP set on those sent
before), whatever ``clean_session`` is: it only changes QoS 2 handling and whether the
broker keeps the session. That re-send ignores the in-flight window (the counter is reset
and every message is marked for sending), so after an outage a device sends its whole
backlog at once. There is no re-send on a live connection (no retry timer in 2.x), and
``publish`` refuses a message (``MQTT_ERR_QUEUE_SIZE``) whose 16-bit message id is still
outstanding, hence ``--buffer`` < 65535. ``on_publish`` may run (paho's thread) before
``publish`` returns; the device handles that race.

At the end the devices stop publishing and wait for their outstanding PUBACKs, the
gateway gets time to drain (stored and upstream counts stable, upstream caught up), it is
stopped with SIGTERM, and the run reads ``paku_measurement`` in
``<data_dir>/gatewayd.sqlite3`` and the receiver's ``records`` (read-only connections).

How to read the figures:

- acknowledged: seqs whose PUBACK the device got; not acknowledged at the end: still
  waiting in paho when the drain timed out (not a loss: the device still has them).
- LOST: acknowledged, never stored. The goal is 0; the exit status is 1 otherwise.
- DUPLICATED: (device, seq) stored under more than one record (each extra row gets a new
  record id, so the cloud can't tell it apart either). The goal is 0.
- upstream: distinct (device, seq) the receiver got, and the ones it got under more
  than one record id (the gateway's duplicates, forwarded).
- per fault: a lost seq is charged to the first fault that killed something after its
  PUBACK (what a kill loses was acknowledged before it; with half a second of slack, as
  the PUBACKs a dying broker already wrote are read by the device a little later); an
  extra stored row to the last fault that began before the row was stored (a redelivery
  follows its fault). "each fault" lists them one by one, with when the lost messages
  were acknowledged relative to the kill: the window says what was lost (say, what the
  broker acknowledged since it last saved its state and had not handed on).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

TOKEN = "crash-run-admin-token"
UPSTREAM_SECRET = "crash-run-upstream-secret"
KINDS = ("gateway", "broker_down", "broker_stalled")
HOST = "127.0.0.1"
ATTRIBUTION_SLACK = 0.5  # seconds; faults are further apart than that (--gap-min + a restart)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def venv_command(name: str) -> str:
    """The console script next to this interpreter (.venv/bin/gatewayd)."""
    for candidate in (Path(sys.prefix) / "bin" / name, Path(sys.executable).parent / name):
        if candidate.exists():
            return str(candidate)
    raise SystemExit(f"crash_run: no {name} next to {sys.executable}: run it with the project's .venv/bin/python")


def http(method: str, url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}


# --- processes, found through /proc ---------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # start time in clock ticks since boot: a pid reused later differs

    def alive(self) -> bool:
        st = proc_stat(self.pid)
        return st is not None and st[2] == self.start and st[0] != "Z"


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def started_at(ticks: int) -> float:
    """A /proc start time (clock ticks since boot) as a wall-clock time."""
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def proc_cmdline(pid: int) -> list[str]:
    try:
        return [p.decode(errors="replace") for p in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if p]
    except OSError:
        return []


def is_mosquitto(pid: int) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    argv = proc_cmdline(pid)
    return "mosquitto" in comm or bool(argv and "mosquitto" in os.path.basename(argv[0]))


def find_brokers(data_dir: Path, gateway_pid: int | None) -> set[Proc]:
    """Every live mosquitto that belongs to this gateway (see the module docstring)."""
    table: dict[int, tuple[str, int, int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := proc_stat(int(entry.name))) is not None:
            table[int(entry.name)] = st
    candidates: set[int] = set()
    for pidfile in data_dir.rglob("*.pid"):
        try:
            pid = int(pidfile.read_text().split()[0])
            written = pidfile.stat().st_mtime
        except (OSError, ValueError, IndexError):
            continue
        # A stale file may name a pid that another process got since: only a process that
        # started shortly before its pid file was written is the one the file means.
        if pid in table and -3 < written - started_at(table[pid][2]) < 15:  # btime is whole seconds
            candidates.add(pid)
    marker = str(data_dir.resolve())
    for pid in table:
        if any(marker in arg for arg in proc_cmdline(pid)):
            candidates.add(pid)
    if gateway_pid is not None:
        children: dict[int, list[int]] = defaultdict(list)
        for pid, (_, ppid, _) in table.items():
            children[ppid].append(pid)
        todo = list(children[gateway_pid])
        while todo:
            pid = todo.pop()
            candidates.add(pid)
            todo += children[pid]
    return {Proc(pid, table[pid][2]) for pid in candidates
            if pid in table and table[pid][0] != "Z" and is_mosquitto(pid)}


def kill_and_wait(procs: set[Proc], sig: int = signal.SIGKILL, timeout: float = 5.0) -> list[int]:
    """Send `sig` to each process that is still the one we found; wait until they are gone."""
    hit = []
    for p in procs:
        if p.alive():
            try:
                os.kill(p.pid, sig)
                hit.append(p.pid)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while any(p.alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    return hit


# --- the gateway and the receiver ------------------------------------------------------


class Receiver:
    """`gatewayd receive` as a subprocess: what reached the cloud."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.db = root / "received.sqlite3"
        self.url = f"http://{HOST}:{self.port}"
        self.log = open(root / "receiver.log", "ab")
        self.proc = subprocess.Popen(
            [venv_command("gatewayd"), "receive", "--listen", f"{HOST}:{self.port}", "--db", str(self.db)],
            cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if http("GET", self.url + "/v1/health")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the receiver did not start: see {root / 'receiver.log'}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Gateway:
    """`gatewayd run --config FILE` as a subprocess, killed and started again at will."""

    def __init__(self, root: Path, receiver_url: str, env: dict[str, str]) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.http_port = free_port()
        self.mqtt_port = free_port()
        self.url = f"http://{HOST}:{self.http_port}"
        self.env = env
        self.config = root / "gatewayd.toml"
        self.config.write_text(f"""\
# written by bench/crash_run.py
[gateway]
id = "crash-run"
data_dir = "{self.data_dir}"
shutdown_grace_s = 3.0

[log]
level = "info"

[http]
listen = "{HOST}:{self.http_port}"
access_log = false
admin_token_env = "GATEWAYD_ADMIN_TOKEN"

[mqtt]
broker = "managed"
listen = "{HOST}:{self.mqtt_port}"

[plugins.paku]
enabled = true

[plugins.kaiabc]
enabled = false

[[upstream]]
name = "cloud"
url = "{receiver_url}"
secret_env = "GATEWAYD_UPSTREAM_SECRET"
""")
        self.log_path = root / "gateway.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def brokers(self) -> set[Proc]:
        return find_brokers(self.data_dir, self.pid)

    def start(self, timeout: float = 60.0) -> float:
        """Start it and wait until it is ready; returns the seconds that took."""
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [venv_command("gatewayd"), "run", "--config", str(self.config)],
                cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # its own group: a Ctrl-C here reaches it only through cleanup
        self.starts += 1
        self.wait_ready(timeout)
        return time.monotonic() - began

    def wait_ready(self, timeout: float = 60.0, not_brokers: set[Proc] = frozenset()) -> None:
        """HTTP answers, paku's MQTT client is connected, and (if there is one) a broker runs
        that is not one of `not_brokers` (the ones just killed)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited ({self.proc and self.proc.returncode}): see {self.log_path}")
            try:
                status, body = http("GET", self.url + "/paku/health", timeout=2)
                ready = status == 200 and body.get("mqtt", {}).get("connected") is True
            except OSError:
                ready = False
            if ready and not_brokers:
                ready = bool(self.brokers() - set(not_brokers))
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway was not ready within {timeout:.0f} s: see {self.log_path}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the gateway only: what it started (mosquitto) is left running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # harmless if it runs; a stopped one must die too
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: queued writes committed, mosquitto saved and stopped)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# --- devices ---------------------------------------------------------------------------


class Device:
    """One paku device: a paho client (its own network thread) and a publishing thread."""

    def __init__(self, device_id: str, password: str, port: int, *, rate: float, inflight: int,
                 buffer: int) -> None:
        self.id = device_id
        self.topic = f"paku/{device_id}/telemetry"
        self.rate = rate
        self.buffer = buffer
        self.lock = threading.Lock()
        self.pending: dict[int, int] = {}  # mid -> seq: handed to paho, no PUBACK yet
        self.early: dict[int, float] = {}  # mid -> time: PUBACK reported before publish() returned
        self.acked: dict[int, float] = {}  # seq -> wall time of its PUBACK
        self.published = 0
        self.refused = 0  # publish() refused it (message id still in use): retried
        self.throttled = 0  # readings skipped while `buffer` messages waited for PUBACK
        self.connects = 0
        self.connected = threading.Event()
        self.stopping = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=False,
                        protocol=paho.MQTTv311)
        c.username_pw_set(device_id, password)
        c.max_inflight_messages_set(inflight)
        c.reconnect_delay_set(min_delay=0.2, max_delay=2)  # floats work: paho only multiplies them
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self.client = c
        self.port = port
        self.thread = threading.Thread(target=self._publish_loop, name=f"device-{device_id}", daemon=True)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            self.connects += 1
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        now = time.time()
        with self.lock:  # never held around publish(): paho holds its own lock while calling us
            seq = self.pending.pop(mid, None)
            if seq is None:
                self.early[mid] = now  # publish() has not returned this mid yet
            else:
                self.acked[seq] = now

    def connect(self) -> None:
        self.client.connect_async(HOST, self.port, keepalive=10)
        self.client.loop_start()  # paho's thread: reconnects by itself (retry_first_connection)

    def start(self) -> None:
        self.thread.start()

    def outstanding(self) -> int:
        with self.lock:
            return len(self.pending)

    def _publish_loop(self) -> None:
        period = 1.0 / self.rate
        rng = random.Random(self.id)
        seq = 0
        due = time.monotonic()
        while not self.stopping.is_set():
            due += period
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                due = time.monotonic()  # fell behind (GIL, CPU): don't burst to catch up
            if self.outstanding() >= self.buffer:
                self.throttled += 1
                continue
            payload = json.dumps({"seq": seq, "temp_c": round(20 + 5 * rng.random(), 2),
                                  "hum": rng.randrange(30, 70)}, separators=(",", ":"))
            info = self.client.publish(self.topic, payload, qos=1)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self.refused += 1  # not queued by paho: the same seq is tried again
                continue
            with self.lock:
                early = self.early.pop(info.mid, None)
                if early is None:
                    self.pending[info.mid] = seq
                else:
                    self.acked[seq] = early
            seq += 1
            self.published = seq

    def stop_publishing(self) -> None:
        self.stopping.set()
        self.thread.join()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- faults ----------------------------------------------------------------------------


@dataclass
class Fault:
    n: int
    kind: str
    began: float  # wall clock
    killed_at: float = 0.0  # when it killed what loses data (the broker; the gateway for "gateway")
    ended: float = 0.0  # the gateway was ready again
    gateway_pid: int | None = None
    broker_pids: list[int] = field(default_factory=list)
    note: str = ""
    lost: int = 0
    dup_rows: int = 0
    lost_acked: list[float] = field(default_factory=list)  # PUBACK times of what it lost


def fault_gateway(gw: Gateway, f: Fault) -> None:
    f.gateway_pid = gw.pid
    f.killed_at = time.time()
    gw.kill()
    gw.start()


def fault_broker_down(gw: Gateway, f: Fault, wait: float) -> None:
    before = gw.brokers()  # while the gateway lives its children count too
    f.gateway_pid = gw.pid
    gw.kill()
    time.sleep(wait)
    brokers = before | gw.brokers()
    f.killed_at = time.time()
    f.broker_pids = kill_and_wait(brokers)
    if not f.broker_pids:
        f.note = "no broker process found"
    gw.start()


def fault_broker_stalled(gw: Gateway, f: Fault, stall: float) -> None:
    brokers = gw.brokers()
    f.gateway_pid = gw.pid
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(stall)
        f.killed_at = time.time()
        f.broker_pids = kill_and_wait(brokers | gw.brokers(), timeout=1.0)  # a zombie until SIGCONT
        if not f.broker_pids:
            f.note = "no broker process found"
    finally:
        gw.proc.send_signal(signal.SIGCONT)
    time.sleep(0.2)
    gw.wait_ready(not_brokers=brokers)


# --- reading the results ---------------------------------------------------------------


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)


def stored_rows(db: Path) -> list[tuple[str, int, float]]:
    """(device, seq, received_at) of every paku telemetry row the gateway stored."""
    con = read_only(db)
    try:
        rows = con.execute("SELECT device, payload, received_at FROM paku_measurement ORDER BY id").fetchall()
    finally:
        con.close()
    out = []
    for device, payload, received_at in rows:
        try:
            out.append((device, int(json.loads(payload)["seq"]), received_at))
        except (ValueError, KeyError, TypeError):
            pass  # not ours
    return out


def upstream_rows(db: Path) -> list[tuple[str, int, object]]:
    """(device, seq, record id) of every paku telemetry record the receiver stored."""
    if not db.exists():
        return []
    con = read_only(db)
    try:
        rows = con.execute("SELECT device, data, record_id FROM records "
                           "WHERE family = 'paku' AND kind = 'telemetry'").fetchall()
    except sqlite3.OperationalError:
        return []  # no batch yet: no table yet
    finally:
        con.close()
    out = []
    for device, data, record_id in rows:
        try:
            out.append((device, int(json.loads(data)["seq"]), record_id))
        except (ValueError, KeyError, TypeError):
            pass
    return out


def count(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    try:
        con = read_only(db)
        try:
            return con.execute(sql).fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


# --- the run ---------------------------------------------------------------------------


def log(t0: float, message: str) -> None:
    print(f"[{time.monotonic() - t0:7.1f}s] {message}", flush=True)


def run(args: argparse.Namespace, root: Path) -> int:
    t0 = time.monotonic()
    wall0 = time.time()
    rng = random.Random(args.seed)
    env = {**os.environ, "GATEWAYD_ADMIN_TOKEN": TOKEN, "GATEWAYD_UPSTREAM_SECRET": UPSTREAM_SECRET}
    receiver = Receiver(root, env)
    gw = Gateway(root, receiver.url, env)
    devices: list[Device] = []
    faults: list[Fault] = []
    try:
        took = gw.start()
        log(t0, f"gateway up in {took:.1f} s (pid {gw.pid}, mqtt.listen {HOST}:{gw.mqtt_port}, "
                f"broker pids {sorted(p.pid for p in gw.brokers())}), receiver at {receiver.url}")
        for d in range(args.devices):
            status, body = http("POST", gw.url + "/paku/devices", {"id": f"crash-{d}", "model": "crash"})
            if status != 201:
                raise RuntimeError(f"POST /paku/devices answered {status}: {body}")
            devices.append(Device(body["id"], body["mqtt"]["password"], gw.mqtt_port, rate=args.rate,
                                  inflight=args.inflight, buffer=args.buffer))
        for dev in devices:
            dev.connect()
        deadline = time.monotonic() + 30
        for dev in devices:  # the broker reloads its accounts after a provisioning
            if not dev.connected.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"device {dev.id} could not connect to the gateway's broker")
        for dev in devices:
            dev.start()
        log(t0, f"{len(devices)} devices publishing {args.rate:g} msg/s each")
        time.sleep(args.warmup)

        schedule = ["gateway"] * args.gateway_kills + ["broker_down"] * args.broker_kills_down \
            + ["broker_stalled"] * args.broker_kills_stalled
        rng.shuffle(schedule)
        for n, kind in enumerate(schedule, 1):
            time.sleep(rng.uniform(args.gap_min, args.gap_max))
            f = Fault(n, kind, time.time())
            acked = sum(len(d.acked) for d in devices)
            if kind == "gateway":
                fault_gateway(gw, f)
            elif kind == "broker_down":
                fault_broker_down(gw, f, args.down_wait)
            else:
                fault_broker_stalled(gw, f, args.stall)
            f.ended = time.time()
            faults.append(f)
            killed = f"mosquitto {f.broker_pids} killed, " if f.broker_pids else ""
            log(t0, f"fault {n}/{len(schedule)} {kind:14s} gateway {f.gateway_pid} killed/stopped, {killed}"
                    f"ready again after {f.ended - f.began:.1f} s (acknowledged so far {acked})"
                    + (f"  !! {f.note}" if f.note else ""))

        time.sleep(args.tail)
        for dev in devices:
            dev.stop_publishing()
        log(t0, f"devices stopped publishing; waiting for their PUBACKs "
                f"({sum(d.outstanding() for d in devices)} outstanding)")
        deadline = time.monotonic() + args.drain
        while sum(d.outstanding() for d in devices) and time.monotonic() < deadline:
            time.sleep(0.1)
        db = gw.data_dir / "gatewayd.sqlite3"
        stable_since, last = time.monotonic(), None
        while time.monotonic() < deadline:
            counts = (count(db, "SELECT COUNT(*) FROM paku_measurement"),
                      count(receiver.db, "SELECT COUNT(*) FROM records WHERE family = 'paku'"))
            if counts != last:
                stable_since, last = time.monotonic(), counts
            quiet = time.monotonic() - stable_since
            if (quiet > 3 and counts[1] >= counts[0]) or quiet > 15:
                break
            time.sleep(0.25)
        log(t0, f"drained: stored {last[0] if last else '?'}, upstream {last[1] if last else '?'}; "
                f"{sum(d.outstanding() for d in devices)} still unacknowledged")
        for dev in devices:
            dev.close()
        status = gw.stop()
        log(t0, f"gateway stopped (exit status {status})")
    finally:
        for dev in devices:
            dev.stopping.set()
        leftovers = gw.brokers()
        gw.kill()
        kill_and_wait(leftovers | gw.brokers(), signal.SIGTERM)
        receiver.stop()
    wall = time.monotonic() - t0
    return report(args, gw, receiver, devices, faults, wall, wall0)


def report(args, gw: Gateway, receiver: Receiver, devices: list[Device], faults: list[Fault],
           wall: float, wall0: float) -> int:
    stored = stored_rows(gw.data_dir / "gatewayd.sqlite3")
    upstream = upstream_rows(receiver.db)
    acked = {(d.id, seq): t for d in devices for seq, t in d.acked.items()}
    published = sum(d.published for d in devices)
    unacked = sum(d.outstanding() for d in devices)

    stored_times: dict[tuple[str, int], list[float]] = defaultdict(list)
    for device, seq, received_at in stored:
        stored_times[(device, seq)].append(received_at)
    lost = sorted((t, key) for key, t in acked.items() if key not in stored_times)
    dup_keys = {k: v for k, v in stored_times.items() if len(v) > 1}
    dup_rows = sum(len(v) - 1 for v in dup_keys.values())
    stored_not_acked = sum(1 for k in stored_times if k not in acked)

    up_ids: dict[tuple[str, int], set] = defaultdict(set)
    for device, seq, record_id in upstream:
        up_ids[(device, seq)].add(record_id)
    up_dups = {k: v for k, v in up_ids.items() if len(v) > 1}
    acked_not_up = sum(1 for k in acked if k not in up_ids)

    # Attribution: a lost seq to the first fault that killed something after its PUBACK, or
    # at most ATTRIBUTION_SLACK before it (PUBACKs a broker wrote just before it died reach
    # the device a little later); an extra stored row to the last fault that began before
    # the row was stored.
    kills = [f.killed_at + ATTRIBUTION_SLACK for f in faults]
    begins = [f.began for f in faults]
    lost_after_last = 0
    for t, _ in lost:
        i = bisect_left(kills, t)
        if i < len(faults):
            faults[i].lost += 1
            faults[i].lost_acked.append(t)
        else:
            lost_after_last += 1
    dups_before_first = 0
    for times in dup_keys.values():
        for t in sorted(times)[1:]:
            i = bisect_right(begins, t) - 1
            if i >= 0:
                faults[i].dup_rows += 1
            else:
                dups_before_first += 1

    if args.keep:  # for a post-mortem next to gateway.log
        with open(gw.root / "acknowledged.csv", "w") as out:
            out.write("device,seq,acked_at,stored_rows\n")
            for (device, seq), t in sorted(acked.items()):
                out.write(f"{device},{seq},{t:.6f},{len(stored_times.get((device, seq), ()))}\n")
        (gw.root / "faults.json").write_text(json.dumps(
            [{k: v for k, v in vars(f).items() if k != "lost_acked"} for f in faults], indent=1))

    n = len(devices)
    print()
    print(f"crash run: {n} paku devices x {args.rate:g} msg/s, QoS 1, clean_session off, in-flight "
          f"{args.inflight}, buffer {args.buffer}; seed {args.seed}; wall time {wall:.0f} s")
    print(f"faults: {args.gateway_kills} gateway kills, {args.broker_kills_down} broker kills with the gateway "
          f"down ({args.down_wait:g} s after it), {args.broker_kills_stalled} with the gateway stalled "
          f"(SIGSTOP, broker killed {args.stall:g} s later); gaps {args.gap_min:g}-{args.gap_max:g} s")
    print(f"gateway starts: {gw.starts}; device connections: {sum(d.connects for d in devices)}; "
          f"publishes refused by paho (retried): {sum(d.refused for d in devices)}; readings throttled: "
          f"{sum(d.throttled for d in devices)}")
    print()
    w = 44
    print(f"{'published (handed to paho)':{w}s} {published:9d}")
    print(f"{'acknowledged (PUBACK seen by the device)':{w}s} {len(acked):9d}")
    print(f"{'not acknowledged at the end (still queued)':{w}s} {unacked:9d}")
    print(f"{'stored (paku_measurement rows)':{w}s} {len(stored):9d}")
    print(f"{'stored, distinct (device, seq)':{w}s} {len(stored_times):9d}")
    print(f"{'LOST (acknowledged, never stored)':{w}s} {len(lost):9d}")
    print(f"{'DUPLICATED (device+seq stored > once)':{w}s} {len(dup_keys):9d}   ({dup_rows} extra rows)")
    print(f"{'stored, never acknowledged':{w}s} {stored_not_acked:9d}")
    print(f"{'reached upstream, distinct (device, seq)':{w}s} {len(up_ids):9d}   ({len(upstream)} records)")
    print(f"{'upstream duplicates (same device+seq)':{w}s} {len(up_dups):9d}   "
          f"({sum(len(v) - 1 for v in up_dups.values())} extra records)")
    print(f"{'acknowledged, not upstream':{w}s} {acked_not_up:9d}")
    print()
    print(f"{'per fault':16s} {'count':>5s} {'lost':>7s} {'lost/fault':>10s} {'max':>6s} "
          f"{'dup rows':>8s} {'dup/fault':>9s} {'dup/fault/device':>16s}")
    for kind in KINDS:
        fs = [f for f in faults if f.kind == kind]
        if not fs:
            continue
        lost_k = sum(f.lost for f in fs)
        dup_k = sum(f.dup_rows for f in fs)
        print(f"{kind:16s} {len(fs):5d} {lost_k:7d} {lost_k / len(fs):10.0f} {max(f.lost for f in fs):6d} "
              f"{dup_k:8d} {dup_k / len(fs):9.0f} {dup_k / len(fs) / max(n, 1):16.0f}")
    if lost_after_last or dups_before_first:
        print(f"{'no fault':16s} {'':5s} {lost_after_last:7d} {'':10s} {'':6s} {dups_before_first:8d}")
    print()
    print("each fault: n, kind, at (s), lost, extra rows stored, when the lost ones were acknowledged")
    for f in faults:
        span = ""
        if f.lost_acked:
            span = (f"   PUBACKs at {min(f.lost_acked) - f.killed_at:+.2f} .. "
                    f"{max(f.lost_acked) - f.killed_at:+.2f} s from the kill")
        print(f"  {f.n:3d} {f.kind:15s} {f.began - wall0:7.1f} {f.lost:6d} {f.dup_rows:6d}{span}"
              + (f"   {f.note}" if f.note else ""))
    if lost:
        sample = ", ".join(f"{d}#{s}" for _, (d, s) in lost[:5])
        print(f"\nfirst lost: {sample}")
    print(f"\ngoal: 0 lost, 0 duplicated -> {'MET' if not lost and not dup_keys else 'NOT MET'}")
    return 1 if lost else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rate", type=float, default=200.0, help="telemetry messages a second, per device")
    parser.add_argument("--gateway-kills", type=int, default=4)
    parser.add_argument("--broker-kills-down", type=int, default=2)
    parser.add_argument("--broker-kills-stalled", type=int, default=2)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--inflight", type=int, default=20, help="paho's in-flight window per device")
    parser.add_argument("--buffer", type=int, default=20000,
                        help="unacknowledged messages a device holds at most (< 65535)")
    parser.add_argument("--gap-min", type=float, default=2.0, help="seconds of load before a fault, at least")
    parser.add_argument("--gap-max", type=float, default=12.0, help="... and at most")
    parser.add_argument("--down-wait", type=float, default=1.5,
                        help="broker_down: seconds between killing the gateway and its broker")
    parser.add_argument("--stall", type=float, default=2.0,
                        help="broker_stalled: seconds the gateway is stopped before its broker is killed")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--tail", type=float, default=3.0, help="seconds of load after the last fault")
    parser.add_argument("--drain", type=float, default=120.0, help="seconds the end may wait for acks and drain")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (logs, databases, acknowledged.csv, faults.json)")
    args = parser.parse_args()
    if not 0 < args.buffer < 65535:
        parser.error("--buffer must be between 1 and 65534 (paho's message ids are 16-bit)")
    if args.devices < 1 or args.rate <= 0 or args.gap_min > args.gap_max:
        parser.error("need --devices >= 1, --rate > 0 and --gap-min <= --gap-max")
    root = Path(tempfile.mkdtemp(prefix="gatewayd-crash-"))
    try:
        status = run(args, root)
    except RuntimeError as e:
        print(f"crash_run: {e}", file=sys.stderr)
        args.keep = True
        status = 2
    finally:
        if args.keep:
            print(f"\nkept: {root} (gateway.log, receiver.log, data/, received.sqlite3, "
                  "acknowledged.csv, faults.json)")
        else:
            import shutil
            shutil.rmtree(root, ignore_errors=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
