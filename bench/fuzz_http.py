"""The long fuzz run: N generated requests (default 10,000) against every route of a real gateway.

    .venv/bin/python bench/fuzz_http.py [--requests 10000] [--seed N] [--no-sweep] [--all]

The generators and the judge of tests/test_fuzz_http.py (tests/fuzz_http.py): one
gateway (core, paku, kaiabc) with devices, claim codes, commands, events and firmware
in it; first the sweep (each curated odd value in each slot of each route, the rest
valid), then hypothesis-generated requests spread evenly over the routes until N have
been sent, over real HTTP, one after the other. Nothing is shrunk: for each distinct
defect (by route and cause: where the gateway raised, or what is wrong with the answer)
it prints how often it happened and its smallest request. Then the count per status
and the requests/s.

Exit status 1 when any answer was a 5xx, no answer, or otherwise bad (non-standard or
invalid JSON, an error not in the core shape, an admin route open without the token).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, Phase, Verbosity, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

from gatewayd.testing import gw_url, start_gateway  # noqa: E402
from tests import fuzz_http as fuzz  # noqa: E402


class Tally:
    """What came back: counts per status, and each defect with its smallest request."""

    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.defects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.sent = 0

    def add(self, route: fuzz.Route, req: fuzz.Req, out: fuzz.Outcome) -> None:
        self.sent += 1
        self.statuses["no answer" if out.status is None else str(out.status)] += 1
        problem = fuzz.judge(route, req, out)
        if problem is None:
            return
        entry = self.defects.setdefault(problem.key(req), {"count": 0, "routes": Counter(), "req": req,
                                                                  "problem": problem, "all": []})
        entry["count"] += 1
        entry["routes"][f"{req.method} {req.rule}"] += 1
        entry["all"].append(req)
        if fuzz.size(req) < fuzz.size(entry["req"]):
            entry["req"], entry["problem"] = req, problem


def run(gw: Any, targets: fuzz.Targets, total: int, seed: int | None, do_sweep: bool) -> tuple[Tally, float, int]:
    tally = Tally()
    pairs = fuzz.route_pairs(gw.app)
    began = time.perf_counter()
    with fuzz.LogTap() as tap:
        sender = fuzz.Sender(gw, tap)
        try:
            swept = 0
            if do_sweep:
                for rule, method in pairs:
                    for req in fuzz.sweep(rule, method, targets):
                        if tally.sent >= total:
                            break
                        tally.add(fuzz.CATALOGUE[req.rule], req, sender.send(req))
                swept = tally.sent
            remaining = total - tally.sent
            if remaining > 0:
                @settings(max_examples=remaining, deadline=None, database=None, derandomize=seed is None,
                          phases=[Phase.generate], suppress_health_check=list(HealthCheck),
                          verbosity=Verbosity.quiet)
                @given(fuzz.any_request(gw.app, targets))
                def generated(req: fuzz.Req) -> None:
                    tally.add(fuzz.CATALOGUE[req.rule], req, sender.send(req))

                if seed is not None:
                    generated = hypothesis_seed(seed)(generated)
                generated()
        finally:
            sender.close()
    return tally, time.perf_counter() - began, swept


def report(tally: Tally, elapsed: float, swept: int, base: str, show_all: bool) -> int:
    bad = sorted(tally.defects.values(), key=lambda d: (d["problem"].kind, -d["count"]))
    five = sum(n for status, n in tally.statuses.items() if status == "no answer" or status.startswith("5"))
    print(f"{len(bad)} distinct defects (the admin token is $GATEWAYD_ADMIN_TOKEN; requests as sent):\n")
    for d in bad:
        print(fuzz.describe(d["req"].rule, d["req"], d["problem"], base, d["count"]))
        if len(d["routes"]) > 1 or d["problem"].shared:
            print("    routes: " + ", ".join(f"{route} (x{n})" for route, n in sorted(d["routes"].items())))
        if show_all:
            for req in d["all"]:
                print(f"    - {req.method} {req.target[:200].decode('ascii')} body={fuzz._short_bytes(req.body, 100)}")
        print()
    print("status   count")
    for status, n in sorted(tally.statuses.items()):
        print(f"{status:8} {n:6}")
    print(f"\n{tally.sent} requests ({swept} from the sweep, {tally.sent - swept} generated) in {elapsed:.1f} s: "
          f"{tally.sent / elapsed:.0f} requests/s; {five} answers 5xx or none; {len(bad)} distinct defects")
    return 1 if bad or five else 0


async def main_async(args: argparse.Namespace) -> int:
    os.environ[fuzz.TOKEN_ENV] = fuzz.TOKEN
    with tempfile.TemporaryDirectory(prefix="gatewayd-fuzz-") as tmp:
        async with start_gateway(Path(tmp) / "var", plugins=fuzz.PLUGINS, settings=fuzz.SETTINGS,
                                 config_text=fuzz.CONFIG_TEXT) as gw:
            missing = fuzz.uncovered(gw.app)
            if missing:
                print(f"routes the generators do not know (add them to tests/fuzz_http.py CATALOGUE): {missing}")
                return 2
            targets = await fuzz.provision(gw)
            tally, elapsed, swept = await trio.to_thread.run_sync(
                run, gw, targets, args.requests, args.seed, not args.no_sweep)
            return report(tally, elapsed, swept, gw_url(gw), args.all)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests in all (default 10000)")
    parser.add_argument("--seed", type=int, help="hypothesis seed (default: derandomized, the same every run)")
    parser.add_argument("--no-sweep", action="store_true", help="generated requests only")
    parser.add_argument("--all", action="store_true", help="list every bad request, not only the smallest")
    args = parser.parse_args()
    logging.getLogger("gatewayd").setLevel(logging.ERROR)  # the defects are reported below, not as log lines
    return trio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
