"""Reference KaiABC nodes: the spec's Pico (MicroPython) and ELM11 (Lua) clients, run on
a desktop against a gateway, fed a synthetic temperature profile.

The clients are the specification's text (`pico_client.py`, `elm11_client.lua`, checked
against it by plugins/kaiabc/tests/test_clients.py); only their three constants
`API_BASE`, `API_KEY` and `NODE_ID` are replaced when they are loaded. The Pico client
runs under CPython with the smallest shims of MicroPython's `urequests`, `ujson` and
`machine` (micropython/); the ELM11 client under Debian's lua5.1 with lua-socket,
lua-cjson and a stub `pwm` module (lua/).

    python firmware/kaiabc/runner.py pico --base http://127.0.0.1:8080/kaiabc/v1 --key K --node pico_001

TLS: `--cafile ca.crt` pins the site CA for an https:// base, in what runs the clients
(the clients stay the spec's text): the Pico's `urequests` shim gets an ssl context with
that CA only; the ELM11's `socket.http` becomes lua/pinned_http.lua's (LuaSec, Debian's
lua-sec, with the peer verified against that CA and the host name checked).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import ssl
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
PICO = HERE / "pico_client.py"
ELM11 = HERE / "elm11_client.lua"
CONSTANTS = ("API_BASE", "API_KEY", "NODE_ID")


def with_constants(text: str, **values: str) -> str:
    """The client's text with exactly its three constants' lines replaced."""
    for name in CONSTANTS:
        text, n = re.subn(rf'^{name} = "[^"\n]*"$', f'{name} = "{values[name]}"', text, count=1, flags=re.M)
        if n != 1:
            raise ValueError(f"{name} not found in the client")
    return text


def temperature_k(t_hours: float, *, mean_k: float = 303.15, amplitude_k: float = 5.0,
                  cycle_hours: float = 24.0, square: bool = True) -> float:
    """A daily temperature profile: 12:12 square (warm first) or sine, around `mean_k`."""
    s = math.sin(2 * math.pi * t_hours / cycle_hours)
    return mean_k + amplitude_k * ((1.0 if s >= 0 else -1.0) if square else s)


def load_pico(base: str, key: str, node: str, clock: Callable[[], float] = time.time,
              cafile: str | None = None) -> types.ModuleType:
    """The Pico client as a module. `get_iso_timestamp`, which the spec's client calls and
    does not define (the board's RTC), is given from `clock`; `cafile` pins the site CA
    in the `urequests` shim (no system roots)."""
    shims = str(HERE / "micropython")
    if shims not in sys.path:
        sys.path.insert(0, shims)
    import urequests  # the shim (micropython/)

    urequests.TLS = ssl.create_default_context(cafile=cafile) if cafile else None
    module = types.ModuleType("pico_client")
    module.__dict__["get_iso_timestamp"] = lambda: _iso(clock())
    code = compile(with_constants(PICO.read_text(), API_BASE=base, API_KEY=key, NODE_ID=node), str(PICO), "exec")
    exec(code, module.__dict__)
    return module


def run_pico(base: str, key: str, node: str, cycles: int, hours_per_cycle: float = 1.0,
             cafile: str | None = None) -> list[dict[str, Any]]:
    """Register, then `cycles` times: send a reading of the profile, fetch the state."""
    client = load_pico(base, key, node, cafile=cafile)
    out: list[dict[str, Any]] = [{"register": client.register_node()}]
    for i in range(cycles):
        out.append({"batch": client.send_sensor_data(temperature_k(i * hours_per_cycle), 45.0, 101325),
                    "state": client.get_current_state()})
    return out


def run_elm11(base: str, key: str, node: str, cycles: int, temperatures_c: list[float],
              lua: str = "lua5.1", cafile: str | None = None) -> subprocess.CompletedProcess[str]:
    """main_loop of the ELM11 client for `cycles` cycles (lua/run_elm11.lua); `cafile`
    pins the site CA (lua/pinned_http.lua, LuaSec: Debian's lua-sec)."""
    args = [lua, str(HERE / "lua" / "run_elm11.lua"), str(ELM11), base, key, node, str(cycles),
            *(f"{t:.3f}" for t in temperatures_c)]
    env = {"LUA_PATH": f"{HERE / 'lua'}/?.lua;;", "PATH": "/usr/bin:/bin",
           "KAIABC_CAFILE": os.path.abspath(cafile) if cafile else ""}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("client", choices=["pico", "elm11"])
    p.add_argument("--base", required=True, help="the gateway's API base (http://host:8080/kaiabc/v1)")
    p.add_argument("--key", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--cafile", default=None, help="the site CA to pin for an https:// base")
    args = p.parse_args()
    if args.client == "pico":
        print(json.dumps(run_pico(args.base, args.key, args.node, args.cycles, cafile=args.cafile), indent=2))
        return 0
    temps = [temperature_k(i) - 273.15 for i in range(args.cycles)]
    done = run_elm11(args.base, args.key, args.node, args.cycles, temps, cafile=args.cafile)
    print(done.stdout + done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
