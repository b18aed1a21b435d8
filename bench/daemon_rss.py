"""Peak RSS of a whole `gatewayd run` (every installed plugin, as a site box runs it)
draining a 1,000,000-record backlog, with each `gateway.profile`, in the same run.

    .venv/bin/python bench/daemon_rss.py [--records N]

ingest_bench.py's profiles section measures the drain alone (storage, outbox, sync
worker in a bare process); this adds everything else the daemon holds (quart and
hypercorn, the plugins, the live hub, MQTT, the threads), which is what a 512 MB board
has to fit. The backlog is filled by ingest_bench.fill, drained to ingest_bench's null
receiver; the RSS is read from /proc every 0.5 s, VmHWM at the end. Figures: the RSS
once the daemon answers /metrics (before the drain), and the peak.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest_bench as bench  # noqa: E402

TOKEN = "b" * 32


def _status(pid: int, key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))  # type: ignore[union-attr]


def _waiting(port: int) -> float | None:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=5).text
    except httpx.HTTPError:
        return None
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("gatewayd_outbox_records{"))


def run(profile: str, total: int, tmp: Path) -> dict:
    data = tmp / profile
    data.mkdir(mode=0o700)
    trio.run(bench.fill, data / "gatewayd.sqlite3", total)
    receiver, url = bench.start_receiver(None)
    port = bench.free_port()
    config = data / "gatewayd.toml"
    config.write_text(f'[gateway]\ndata_dir = "{data}"\nprofile = "{profile}"\n[http]\nlisten = "127.0.0.1:{port}"\n'
                      f'[mqtt]\nlisten = "127.0.0.1:{bench.free_port()}"\n[backup]\ninterval_s = 0\n'
                      f'[[upstream]]\nname = "cloud"\nurl = "{url}"\n')
    env = {**os.environ, "GATEWAYD_UPSTREAM_SECRET": bench.SECRET, "GATEWAYD_ADMIN_TOKEN": TOKEN}
    daemon = subprocess.Popen([sys.executable, "-m", "gatewayd", "run", "--config", str(config)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=data)
    try:
        began = time.monotonic()
        while (waiting := _waiting(port)) is None:
            time.sleep(0.1)
        at_start = _status(daemon.pid, "VmRSS")
        drain_began = time.monotonic()
        while waiting and time.monotonic() - began < 1800:
            time.sleep(0.5)
            waiting = _waiting(port)
        took = time.monotonic() - drain_began
        hwm = _status(daemon.pid, "VmHWM")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(10)
    if waiting:
        raise SystemExit(f"{profile}: {waiting:.0f} records still waiting after 30 min")
    return {"profile": profile, "rss_ready_mb": at_start / 1024, "vmhwm_mb": hwm / 1024, "rps": total / took}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--profile", action="append", choices=["default", "small"], help="only these (repeatable)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gatewayd-daemon-rss-") as d:
        for profile in args.profile or ("default", "small"):
            r = run(profile, args.records, Path(d))
            print(f"whole daemon, profile {profile:7}  RSS when ready {r['rss_ready_mb']:4.0f} MB   peak (VmHWM) through "
                  f"the {args.records:,}-record drain {r['vmhwm_mb']:4.0f} MB   {r['rps']:>9,.0f} records/s "
                  "(goal, small: < 100 MB)"
                  + (f"  MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']}" if "MALLOC_ARENA_MAX" in os.environ else ""))
            shutil.rmtree(Path(d) / profile)


if __name__ == "__main__":
    main()
