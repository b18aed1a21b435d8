"""Generated requests against every route of a real gateway (issue 14: no input gets a 500).

One gateway (core, paku, kaiabc) with devices, claim codes, commands, events, an alert
and firmware in it; every (URL rule, method) of its app gets hypothesis-generated
requests over real HTTP (see tests/fuzz_http.py for the generators and the judge).
Every answer must be < 500, strict JSON when it says JSON, and errors in the core shape
`{"error": {"status", "code", "message"}}`; admin routes never answer 2xx without the
token. A rule the generators do not know fails the test: coverage cannot shrink.

Two passes. The sweep: a fixed table per (rule, method), each curated odd value in each
slot (path parameter, query key, body field, body, auth, headers, method) with the rest
valid, so every single odd thing reaches the code behind the checks. The search:
hypothesis, mostly one odd slot with any value of its kind, sometimes many. A failure of
the search is shrunk to a minimal request, then the search goes on past it (up to ROUNDS
times per rule and method), so one run lists every distinct cause it meets. Causes are
told apart by route and by where the gateway raised (its error log); one raised before
any route's code runs (a bad Host header) is one finding for all routes.

Bounded for CI and reproducible (derandomized): each (rule, method) gets
GATEWAYD_FUZZ_EXAMPLES (default 8) search examples per slot (path parameter, query key,
body field, ... see fuzz_http.slots_of). For a longer search raise it (80: ten times as
many); GATEWAYD_FUZZ_SEED=N searches another sequence. `bench/fuzz_http.py` sends 10,000
requests across all routes. On a slow machine the test stops at its own time budget (its
timeout less a margin), judges what it sent, and says in a warning which (rule, method)
pairs it did not finish, instead of being cut off by its timeout.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import hypothesis
import pytest
import trio
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from quart import Blueprint, Response, request

from gatewayd.plugins.api import hookimpl
from gatewayd.testing import TimeBudget, gw_url
from tests import fuzz_http as fuzz

EXAMPLES = int(os.environ.get("GATEWAYD_FUZZ_EXAMPLES", "8"))  # per slot of each (rule, method)
SEED = os.environ.get("GATEWAYD_FUZZ_SEED")
ROUNDS = 4


@dataclass
class Finding:
    rule: str
    req: fuzz.Req
    problem: fuzz.Problem


class Defect(Exception):
    """A bad answer; one subclass per (route, kind, cause), so hypothesis shrinks each cause on its own."""

    key: tuple[str, str, str]

    def __init__(self, req: fuzz.Req, problem: fuzz.Problem):
        super().__init__(f"{problem.kind}: {problem.cause}")
        self.req, self.problem = req, problem


_defect_types: dict[tuple[str, str, str], type[Defect]] = {}


def defect(key: tuple[str, str, str]) -> type[Defect]:
    if key not in _defect_types:
        _defect_types[key] = type(f"Defect{len(_defect_types)}", (Defect,), {"key": key})
    return _defect_types[key]


def _defects(e: BaseException) -> list[Defect]:
    if isinstance(e, Defect):
        return [e]
    return [d for inner in getattr(e, "exceptions", ()) for d in _defects(inner)]


def sweep_pair(sender: fuzz.Sender, route: fuzz.Route, rule: str, method: str, targets: fuzz.Targets,
               known: set[tuple[str, str, str]], budget: TimeBudget | None = None) -> list[Finding]:
    """The fixed table of one (rule, method): the smallest request of each new cause."""
    best: dict[tuple[str, str, str], Finding] = {}
    for req in fuzz.sweep(rule, method, targets, route):
        if budget is not None and budget.spent():
            break
        problem = fuzz.judge(route, req, sender.send(req))
        if problem is None or (key := problem.key(req)) in known:
            continue
        if key not in best or fuzz.size(req) < fuzz.size(best[key].req):
            best[key] = Finding(rule, req, problem)
    known.update(best)
    return list(best.values())


def search_pair(sender: fuzz.Sender, route: fuzz.Route, rule: str, method: str, targets: fuzz.Targets,
                known: set[tuple[str, str, str]], per_slot: int = EXAMPLES,
                budget: TimeBudget | None = None) -> list[Finding]:
    """Hypothesis on one (rule, method); each new cause is shrunk, reported, then searched past."""
    findings: list[Finding] = []
    examples = per_slot * len(fuzz.slots_of(route, method))
    for _ in range(ROUNDS):
        @settings(max_examples=examples, deadline=None, database=None, derandomize=SEED is None,
                  phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck),
                  verbosity=Verbosity.quiet, print_blob=False)
        @given(fuzz.requests(rule, method, targets, route))
        def probe(req: fuzz.Req) -> None:
            if budget is not None and budget.spent():
                return  # nothing more is sent (the test says which pairs it did not finish)
            problem = fuzz.judge(route, req, sender.send(req))
            if problem is not None and problem.key(req) not in known:
                raise defect(problem.key(req))(req, problem)

        if SEED is not None:
            probe = hypothesis.seed(int(SEED))(probe)
        try:
            probe()
            return findings
        except Exception as e:  # noqa: BLE001 - Defects (or groups of them) are findings; anything else is not
            found = _defects(e)
            if not found:
                raise
            for d in found:
                if d.key not in known:
                    known.add(d.key)
                    findings.append(Finding(rule, d.req, d.problem))
    return findings


def fuzz_app(gw: Any, targets: fuzz.Targets, catalogue: dict[str, fuzz.Route],
             budget: TimeBudget | None = None, unfinished: list[str] | None = None) -> list[Finding]:
    """The sweep of every (rule, method), then the search of every one past what the sweep found.
    Once `budget` is spent nothing more is sent; `unfinished` gets what was not (fully) done."""
    findings: list[Finding] = []
    known: set[tuple[str, str, str]] = set()
    pairs = fuzz.route_pairs(gw.app)
    with fuzz.LogTap() as tap:
        sender = fuzz.Sender(gw, tap)
        try:
            for phase, run in (("sweep", sweep_pair), ("search", search_pair)):
                for rule, method in pairs:
                    if budget is None or not budget.spent():
                        findings += run(sender, catalogue[rule], rule, method, targets, known, budget=budget)
                        fuzz.maintenance_off(gw)
                    if budget is not None and budget.spent() and unfinished is not None:  # cut short, or not begun
                        unfinished.append(f"{phase} {method} {rule}")
        finally:
            sender.close()
    return findings


def report(gw: Any, findings: list[Finding]) -> str:
    base = gw_url(gw)
    lines = [f"{len(findings)} bad answers (each a minimal request; the admin token is $GATEWAYD_ADMIN_TOKEN):"]
    lines += [fuzz.describe(f.rule, f.req, f.problem, base) for f in findings]
    return "\n\n".join(lines)


# Grows with the routes (the core's and five plugins'): ~185 s on a shared 2-core machine; past
# ~840 s it stops (TimeBudget).
@pytest.mark.timeout(900)
async def test_every_route_answers_generated_requests_without_5xx(gateway_factory, monkeypatch, request):
    budget = TimeBudget.of_test(request.node)
    monkeypatch.setenv(fuzz.TOKEN_ENV, fuzz.TOKEN)
    async with gateway_factory(plugins=fuzz.PLUGINS, settings=fuzz.SETTINGS, config_text=fuzz.CONFIG_TEXT) as gw:
        assert not fuzz.uncovered(gw.app), (
            f"routes without generators in tests/fuzz_http.py CATALOGUE: {fuzz.uncovered(gw.app)}")
        assert not fuzz.stale(gw.app), f"CATALOGUE entries for routes that are gone: {fuzz.stale(gw.app)}"
        targets = await fuzz.provision(gw)
        unfinished: list[str] = []
        findings = await trio.to_thread.run_sync(fuzz_app, gw, targets, fuzz.CATALOGUE, budget, unfinished)
        assert not findings, report(gw, findings)
        if unfinished:
            pairs = len(fuzz.route_pairs(gw.app))
            assert len(unfinished) < pairs, f"the time budget ({budget.seconds:.0f} s) ran out before the sweep was done"
            warnings.warn(f"fuzz: the time budget ({budget.seconds:.0f} s) ran out: of {pairs} (rule, method) "
                          f"pairs' sweep and search, {len(unfinished)} not finished: {unfinished}", stacklevel=1)


# -- the harness can fail: a plugin planted with the bugs it must find -------------------


def _bait_routes():
    bp = Blueprint("bait", __name__)

    @bp.post("/things")
    async def things() -> Any:
        doc = json.loads(await request.get_data())         # RecursionError when nested deep: a 500
        # (not request.get_json(): the core's strict JSON provider would refuse it cleanly)
        if not isinstance(doc, dict):
            return {"error": {"status": 400, "code": "bad_request", "message": "expected an object"}}, 400
        if "id" in doc and not re.match(r"[a-z]+$", doc["id"]):   # TypeError when "id" is not a string: a 500
            return {"error": {"status": 400, "code": "bad_request", "message": "bad id"}}, 400
        return {"ok": True}, 201

    @bp.get("/nan")
    async def nan() -> Any:
        return Response('{"v": NaN}', content_type="application/json")

    @bp.get("/shape")
    async def shape() -> Any:
        return {"message": "not the core shape"}, 400

    return bp


class _Bait:
    @hookimpl
    def gatewayd_http_routes(self, ctx):
        return _bait_routes()


BAIT_CATALOGUE = {
    **fuzz.CATALOGUE,
    "/bait/things": fuzz.Route(admin=False, body={"id": "text", "name": "text"}),
    "/bait/nan": fuzz.Route(admin=False),
    "/bait/shape": fuzz.Route(admin=False),
    "/bait/openapi.json": fuzz.Route(),  # every plugin's Blueprint gets its document and page
    "/bait/docs": fuzz.Route(json=False, html=True),
}


async def test_the_harness_finds_planted_defects(gateway_factory, monkeypatch):
    monkeypatch.setenv(fuzz.TOKEN_ENV, fuzz.TOKEN)
    async with gateway_factory(plugins=[*fuzz.PLUGINS, ("bait", _Bait())], settings=fuzz.SETTINGS) as gw:
        # a new route is noticed
        assert fuzz.uncovered(gw.app) == ["/bait/docs", "/bait/nan", "/bait/openapi.json", "/bait/shape", "/bait/things"]
        targets = fuzz.Targets(core_devices=["d"], paku_devices=["d"], device_keys=["k"], claim_codes=["c"],
                               firmware_ids=[1], cursors={"events": "e", "telemetry": "t"})

        def run() -> tuple[list[Finding], list[Finding]]:
            with fuzz.LogTap() as tap:
                sender = fuzz.Sender(gw, tap)
                pairs = [("/bait/things", "POST"), ("/bait/nan", "GET"), ("/bait/shape", "GET")]
                try:  # each pass on its own: both must find everything
                    swept, known = [], set()
                    for rule, method in pairs:
                        swept += sweep_pair(sender, BAIT_CATALOGUE[rule], rule, method, targets, known)
                    searched, known = [], set()
                    for rule, method in pairs:
                        searched += search_pair(sender, BAIT_CATALOGUE[rule], rule, method, targets, known, 30)
                    return swept, searched
                finally:
                    sender.close()

        swept, searched = await trio.to_thread.run_sync(run)
    for findings in (swept, searched):
        found = {(f.rule, f.problem.kind, f.problem.cause.split(" at ")[0]) for f in findings}
        assert found >= {
            ("/bait/things", "500", "RecursionError"),
            ("/bait/things", "500", "TypeError"),
            ("/bait/nan", "non-standard JSON", "NaN"),
            ("/bait/shape", "error shape", "400"),
        }, report(gw, findings)
    shrunk = next(f.req for f in searched if f.problem.cause.startswith("TypeError"))
    assert len(shrunk.body) < 20, shrunk  # shrunk to the one odd thing: {"id":0}
