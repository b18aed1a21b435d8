"""Libraries vs the hand-written code they replaced: PyJWT and prometheus_client.

    python bench/libs_bench.py [--runs 7] [--jwt-ops 20000] [--renders 200]

Issue 15 asks for the library unless it costs more than it gains; this measures what
it costs, with the old code (copied below, verbatim, as the BASELINE) timed in the
same run on the same inputs:

- JWT: `encode_jwt` + `decode_jwt` of the claims `Authenticator.issue_jwt` signs,
  `decode_jwt` alone, and the whole check a bearer-authenticated device request pays
  (`Authenticator.bearer_jwt`: the JWT, then the device's row read from SQLite), with
  the old and the new `decode_jwt` in turn.
- /metrics: `Metrics.render()` of a registry shaped like a busy gateway's: 40
  families, owned counters and gauges plus scrape-time collectors, 3 of them with
  100 label sets (scraped every 15 s by default Prometheus settings).
- A labelled `Counter.inc` (paid per message by plugins and the event bus).

Before timing, both sides are checked to agree: the same tokens, and renders that
parse (prometheus_client's parser) to the same samples. Medians over the runs;
ratio = new time / old time (above 1: the library is slower).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import importlib.metadata
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import jwt  # noqa: E402
import prometheus_client  # noqa: E402
import trio  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from gatewayd.core import metrics as new_metrics  # noqa: E402
from gatewayd.core.config import load_config  # noqa: E402
from gatewayd.core.devices import auth as auth_module  # noqa: E402
from gatewayd.core.devices import secrets as new_jwt  # noqa: E402
from gatewayd.core.devices.secrets import Keyring  # noqa: E402
from gatewayd.core.devices.services import DeviceServices  # noqa: E402
from gatewayd.core.storage import Storage  # noqa: E402

# ======================================================================================
# BASELINE: the hand-written code as it was before the libraries (gatewayd/core/
# devices/secrets.py and gatewayd/core/metrics.py at 79d700e), copied verbatim apart
# from names. Not used by the gateway; here only to be measured against.
# ======================================================================================


class OldJWTError(Exception):
    def __init__(self, reason: str, *, expired: bool = False):
        super().__init__(reason)
        self.expired = expired


def old_encode_jwt(claims: dict[str, Any], key: bytes) -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":"), sort_keys=True, allow_nan=False).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def old_decode_jwt(token: str, key: bytes, *, now: float, leeway_s: float = 0) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise OldJWTError("not a JWT (expected three dot-separated parts)")
    if not token.isascii():
        raise OldJWTError("malformed JWT")
    try:
        header = json.loads(_unb64url(parts[0]))
        signature = _unb64url(parts[2])
    except (ValueError, RecursionError):
        raise OldJWTError("malformed JWT") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise OldJWTError("unsupported JWT algorithm (only HS256)")
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise OldJWTError("bad JWT signature")
    try:
        claims = json.loads(_unb64url(parts[1]))
    except (ValueError, RecursionError):
        raise OldJWTError("malformed JWT payload") from None
    if not isinstance(claims, dict):
        raise OldJWTError("malformed JWT payload")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)):
        raise OldJWTError("JWT without expiry")
    if now > exp + leeway_s:
        raise OldJWTError("JWT expired", expired=True)
    return claims


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise ValueError("bad base64url") from None


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class OldSample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), "")}"'
        for k, v in sorted(labels.items())
    )
    return "{" + body + "}"


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _OldFamily:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...]):
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[OldSample]:
        if not self.labelnames and not self._values:
            yield OldSample(self.name, {}, 0.0)
        for key, value in sorted(self._values.items()):
            yield OldSample(self.name, dict(zip(self.labelnames, key)), value)


class _OldCounter(_OldFamily):
    kind = "counter"

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class _OldGauge(_OldFamily):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = value

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class OldMetrics:
    def __init__(self) -> None:
        self._families: dict[str, _OldFamily] = {}
        self._collectors: list[tuple[str, str, str, Callable[[], Iterable[OldSample]]]] = []

    def _get(self, cls: type, name: str, help: str, labels: Iterable[str]) -> _OldFamily:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = cls(name, help, tuple(labels))
        elif not isinstance(family, cls) or family.labelnames != tuple(labels):
            raise ValueError(f"metric {name!r} already registered with another type or labels")
        return family

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> _OldCounter:
        return self._get(_OldCounter, name, help, labels)  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> _OldGauge:
        return self._get(_OldGauge, name, help, labels)  # type: ignore[return-value]

    def collector(self, name: str, kind: str, help: str, collect: Callable[[], Iterable[OldSample]]) -> None:
        self._collectors.append((name, kind, help, collect))

    def render(self) -> str:
        lines: list[str] = []
        families = [(f.name, f.kind, f.help, f.samples) for f in self._families.values()]
        for name, kind, help, samples in sorted(families + self._collectors, key=lambda f: f[0]):
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            for s in samples():
                lines.append(f"{s.name}{_labels(s.labels)} {_number(s.value)}")
        return "\n".join(lines) + "\n"


# ======================================================================================
# end of BASELINE
# ======================================================================================


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Seconds per call of fn, over `repeat` calls."""
    began = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - began) / repeat


def compare(runs: int, old: Callable[[], object], new: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median seconds per call of old and new, timed in alternation (the machine is shared)."""
    old(), new()  # warm up (imports, caches)
    pairs = [(timed(old, repeat), timed(new, repeat)) for _ in range(runs)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


# -- JWT ---------------------------------------------------------------------------------

CLAIMS = {"sub": "SL001", "fam": "streetlight", "ep": 3, "iat": 1700000000, "exp": 1700604800}
NOW = 1700000100.0


def jwt_cases(key: bytes) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    old_token = old_encode_jwt(CLAIMS, key)
    new_token = new_jwt.encode_jwt(CLAIMS, key)
    assert old_token == new_token, "the two encoders disagree"
    assert old_decode_jwt(new_token, key, now=NOW) == new_jwt.decode_jwt(old_token, key, now=NOW) == CLAIMS
    return {
        "encode + verify": (
            lambda: old_decode_jwt(old_encode_jwt(CLAIMS, key), key, now=NOW),
            lambda: new_jwt.decode_jwt(new_jwt.encode_jwt(CLAIMS, key), key, now=NOW),
        ),
        "verify (per device request)": (
            lambda: old_decode_jwt(old_token, key, now=NOW),
            lambda: new_jwt.decode_jwt(new_token, key, now=NOW),
        ),
    }


async def bearer_jwt_times(runs: int, requests: int) -> tuple[list[float], list[float]]:
    """Seconds per `Authenticator.bearer_jwt` call (the JWT, then the device's row read
    from SQLite on a reader thread) with the old and the new `decode_jwt`, alternating."""
    old_times: list[float] = []
    new_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        config = load_config(None, [f"gateway.data_dir='{data_dir}'"], {})
        storage = Storage(data_dir / "gatewayd.sqlite3")
        async with trio.open_nursery() as nursery:
            await nursery.start(storage.run)
            services = DeviceServices(config, storage, new_metrics.Metrics())
            await trio.to_thread.run_sync(services.install)
            device, _ = await services.registry.provision("streetlight", "SL001")
            headers = {"Authorization": f"Bearer {services.auth.issue_jwt(device).token}"}
            for run in range(runs + 1):
                sides = [(old_decode_jwt, old_times), (new_jwt.decode_jwt, new_times)]
                for decode, times in sides if run % 2 else sides[::-1]:  # neither always goes first
                    auth_module.decode_jwt = decode  # type: ignore[assignment]
                    began = time.perf_counter()
                    for _ in range(requests):
                        await services.auth.bearer_jwt("streetlight", headers, "192.0.2.10")
                    if run:  # the first round warms up
                        times.append((time.perf_counter() - began) / requests)
            auth_module.decode_jwt = new_jwt.decode_jwt
            nursery.cancel_scope.cancel()
    return old_times, new_times


# -- /metrics ----------------------------------------------------------------------------

FAMILIES = ["meter", "streetlight", "paku", "kaiabc"]
SCHEMES = ["api_key", "jwt", "signature", "body_token", "device_key"]


class FakeStats:
    """Live numbers read by the collectors at scrape time, as components hold them."""

    def __init__(self) -> None:
        self.links = {f"line{i}": (i * 1031, i * 77) for i in range(100)}  # 100 serial lines
        self.classes = {c: (i * 13, i * 4096) for i, c in enumerate(["ack", "alert", "state", "history", "log"])}
        self.sinks = {f"sink{i}": i * 1000 for i in range(3)}
        self.uptime = 86400.5


def build(cls: type, sample: type, stats: FakeStats) -> Any:
    """The same 40 families on either implementation; returns the registry."""
    m = cls()
    # Owned: 20 families (events, auth, rules, notifications, plugin counters, gauges).
    events = m.counter("gatewayd_events_total", "Events stored", ("family", "severity"))
    for i in range(100):  # 100 label sets: a site's device types x severities
        events.inc(i + 1, family=f"fam{i // 4}", severity=["info", "warning", "critical", "debug"][i % 4])
    fires = m.counter("gatewayd_rule_firings_total", "Alert rules fired", ("rule", "level"))
    for i in range(100):  # 100 rules that fired
        fires.inc(i, rule=f"rule_{i}", level="warning" if i % 3 else "critical")
    auth = m.counter("gatewayd_auth_failures_total", "Device authentication failures", ("family", "scheme"))
    for f in FAMILIES:
        for s in SCHEMES:
            auth.inc(3, family=f, scheme=s)
    m.counter("gatewayd_auth_lockouts_total", "Addresses locked out", ("family",)).inc(family="meter")
    m.counter("gatewayd_rule_errors_total", "Rule evaluations that raised (a bug)")
    m.counter("gatewayd_events_rejected_total", "Events refused as invalid", ("family",)).inc(family="paku")
    notes = m.counter("gatewayd_notifications_total", "Notification deliveries by outcome", ("state",))
    for st in ("queued", "sent", "retried", "failed"):
        notes.inc(7, state=st)
    m.counter("gatewayd_plugin_task_restarts_total", "Plugin tasks restarted", ("plugin", "task")).inc(
        plugin="paku", task="ota")
    for i in range(6):
        c = m.counter(f"gatewayd_plugin{i}_messages_total", "Plugin messages", ("kind", "outcome"))
        for kind in ("telemetry", "event", "state"):
            c.inc(1000 + i, kind=kind, outcome="stored")
        m.gauge(f"gatewayd_plugin{i}_devices", "Plugin devices online").set(40 + i)
    # Live: 20 collectors.
    m.collector("gatewayd_serial_bytes_total", "counter", "Bytes through serial lines", lambda: [
        sample("gatewayd_serial_bytes_total", {"link": ln}, b) for ln, (b, _) in stats.links.items()])  # 100
    m.collector("gatewayd_serial_up", "gauge", "1 when a serial line is open", lambda: [
        sample("gatewayd_serial_up", {"link": ln}, 1.0) for ln in stats.links])  # 100
    m.collector("gatewayd_outbox_records", "gauge", "Records waiting, per class", lambda: [
        sample("gatewayd_outbox_records", {"class": c}, n) for c, (n, _) in stats.classes.items()])
    m.collector("gatewayd_outbox_bytes", "gauge", "Bytes waiting, per class", lambda: [
        sample("gatewayd_outbox_bytes", {"class": c}, b) for c, (_, b) in stats.classes.items()])
    for name in ("gatewayd_sync_backlog_records", "gatewayd_sync_paused", "gatewayd_sync_breaker_open",
                 "gatewayd_sync_last_success_timestamp_seconds"):
        m.collector(name, "gauge", "Per sink", lambda name=name: [
            sample(name, {"sink": s}, 1700000000.25 + n) for s, n in stats.sinks.items()])
    for name in ("gatewayd_sync_batches_total", "gatewayd_sync_records_total", "gatewayd_sync_worker_restarts_total"):
        m.collector(name, "counter", "Per sink and outcome", lambda name=name: [
            sample(name, {"sink": s, "outcome": o}, n) for s, n in stats.sinks.items() for o in ("ok", "error")])
    for name in ("gatewayd_mqtt_handler_errors_total", "gatewayd_mqtt_storage_waits_total",
                 "gatewayd_mqtt_reconnects_total", "gatewayd_storage_commits_total", "gatewayd_storage_jobs_total"):
        m.collector(name, "counter", "A count", lambda name=name: [sample(name, {}, 123456)])
    for name in ("gatewayd_mqtt_in_flight", "gatewayd_mqtt_connected", "gatewayd_mqtt_edge_connections"):
        m.collector(name, "gauge", "A level", lambda name=name: [sample(name, {}, 1)])
    m.collector("gatewayd_uptime_seconds", "gauge", "Seconds since the gateway started",
                lambda: [sample("gatewayd_uptime_seconds", {}, stats.uptime)])
    return m


def parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--jwt-ops", type=int, default=20000, help="JWT operations per run")
    parser.add_argument("--renders", type=int, default=200, help="/metrics renders per run")
    parser.add_argument("--incs", type=int, default=200000, help="counter increments per run")
    parser.add_argument("--requests", type=int, default=3000, help="bearer_jwt calls per run")
    args = parser.parse_args()

    print(f"PyJWT {jwt.__version__}, prometheus_client {_version(prometheus_client)}, Python {sys.version.split()[0]}")
    print(f"medians of {args.runs} runs; ratio = new/old time (> 1: the library is slower)\n")
    rows: list[tuple[str, float, float, str]] = []

    key = Keyring(bytes(range(32))).jwt_key
    for name, (old, new) in jwt_cases(key).items():
        t_old, t_new = compare(args.runs, old, new, args.jwt_ops)
        rows.append((f"JWT {name}", t_old, t_new, "ops/s"))
    old_times, new_times = trio.run(bearer_jwt_times, args.runs, args.requests)
    rows.append(("Authenticator.bearer_jwt (JWT + the device's row)", statistics.median(old_times),
                 statistics.median(new_times), "µs"))

    stats = FakeStats()
    old_m, new_m = build(OldMetrics, OldSample, stats), build(new_metrics.Metrics, new_metrics.Sample, stats)
    old_text, new_text = old_m.render(), new_m.render()
    assert parsed(old_text) == parsed(new_text), "the two renders disagree"
    n_families = sum(1 for line in new_text.splitlines() if line.startswith("# TYPE"))
    n_samples = sum(1 for line in new_text.splitlines() if line and not line.startswith("#"))
    t_old, t_new = compare(args.runs, old_m.render, new_m.render, args.renders)
    rows.append((f"/metrics render ({n_families} families, {n_samples} samples, {len(new_text)} B)",
                 t_old, t_new, "ms"))

    old_c = old_m.counter("gatewayd_plugin0_messages_total", "", ("kind", "outcome"))
    new_c = new_m.counter("gatewayd_plugin0_messages_total", "", ("kind", "outcome"))
    t_old, t_new = compare(args.runs, lambda: old_c.inc(kind="telemetry", outcome="stored"),
                           lambda: new_c.inc(kind="telemetry", outcome="stored"), args.incs)
    rows.append(("Counter.inc with 2 labels", t_old, t_new, "µs"))

    print(f"{'':<62}{'old':>12}{'new':>12}{'ratio':>8}")
    for name, t_old, t_new, unit in rows:
        show = {"ops/s": lambda t: f"{1 / t:,.0f}/s", "ms": lambda t: f"{t * 1e3:.3f} ms",
                "µs": lambda t: f"{t * 1e6:.2f} µs"}[unit]
        print(f"{name:<62}{show(t_old):>12}{show(t_new):>12}{t_new / t_old:>8.2f}")
    verify, bearer, render, inc = (rows[i][1:3] for i in (1, 2, 3, 4))
    print("\nwhat it costs where it is paid:")
    print(f"  JWT verify: {(verify[1] - verify[0]) * 1e6:+.1f} µs per bearer-authenticated request, against a whole"
          f" bearer_jwt check of {bearer[0] * 1e6:.0f} µs (old) / {bearer[1] * 1e6:.0f} µs (new)")
    print(f"  /metrics: {(render[1] - render[0]) * 1e3:+.2f} ms per scrape, "
          f"{(render[1] - render[0]) / 15 * 100:+.3f}% of one core at a 15 s scrape interval")
    print(f"  Counter.inc: {(inc[1] - inc[0]) * 1e6:+.2f} µs per increment")
    return 0


def _version(module: Any) -> str:
    return importlib.metadata.version(module.__name__.replace("_", "-"))


if __name__ == "__main__":
    sys.exit(main())
