"""Generated HTTP requests for every route of the gateway, and what a good answer is.

Shared by `tests/test_fuzz_http.py` (bounded, in CI) and `bench/fuzz_http.py` (the
long run). The pieces:

- `provision(gw)`: devices, claim codes, commands, events, an alert, firmware and paku
  telemetry, so path parameters and cursors have real targets as well as bogus ones.
- `CATALOGUE`: one `Route` per URL rule of the main app: its path parameters, query
  keys, JSON body fields and who may call it. `uncovered(app)` names the rules the
  catalogue does not know, so a new route cannot silently escape the fuzzer.
- `sweep(rule, method, targets)`: a fixed table of requests, each curated odd value in
  each slot (path parameter, query key, body field, body, auth, headers, method) with
  everything else valid.
- `requests(rule, method, targets)`: a hypothesis strategy of `Req` (method, raw
  request target, headers, body bytes) for one (rule, method); `any_request(...)` for all.
- `Sender`: sends a `Req` over real HTTP (httpx, a new connection per request) and
  collects the gateway's own error log lines written while it was answered.
- `judge(...)`: what is wrong with an answer, or None: no answer, a 5xx, JSON that a
  strict parser refuses (NaN, Infinity, not UTF-8), an error not in the core shape
  `{"error": {"status", "code", "message"}}`, or an admin route answering 2xx without
  the admin token.

Requests go out on a new connection each: a request answered before its body arrived
can leave a kept-alive connection hung for good (hypercorn closes it from inside
quart-trio's request scope, which is already cancelled), and a reused connection would
blame that on whichever request came next.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import sys
import threading
import traceback
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import trio
from hypothesis import strategies as st

import gatewayd_edgesentinel
import gatewayd_kaiabc
import gatewayd_paku
import gatewayd_streetlight
import gatewayd_thingsnxt
from gatewayd.plugins.api import InboundMessage
from gatewayd.testing import gw_client, gw_url

TOKEN = "fuzz-admin-token"
LIGHT = "IMEI:351234567890123"  # a streetlight: its id has a ":"
TOKEN_ENV = "GATEWAYD_ADMIN_TOKEN"
PLUGINS = [("paku", gatewayd_paku), ("kaiabc", gatewayd_kaiabc), ("streetlight", gatewayd_streetlight),
           ("edgesentinel", gatewayd_edgesentinel), ("thingsnxt", gatewayd_thingsnxt)]
MAX_BODY = 64 * 1024
SETTINGS = [f"http.max_body_bytes={MAX_BODY}",  # an oversized body costs 64 KiB, not 8 MiB
            "plugins.edgesentinel.require_claim=false",  # its node works unclaimed: requests reach the code
            "plugins.thingsnxt.rate_limit=0"]  # its 100 requests a minute would make the rest 429s
TX_TOKEN = "tx-token-0123456789abcdef"  # thingsnxt device tx-1's device_token
# One rule that fires, so /api/gateway/alerts has notifications to list.
CONFIG_TEXT = """
[[rules]]
name = "fuzz-alarm"
family = "paku"
type = "alarm"
actions = [{ kind = "log" }]
"""
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
ROOT = Path(__file__).resolve().parent.parent


# -- what the gateway holds before the first generated request -------------------------


@dataclass
class Targets:
    """Real things to aim at: every strategy mixes these with bogus values."""

    core_devices: list[str]          # ids in the core registry (any family)
    paku_devices: list[str]
    device_keys: list[str]           # device credentials: must never open an admin route
    claim_codes: list[str]
    firmware_ids: list[int]
    cursors: dict[str, str]          # a real next_cursor per paging route ("events", "telemetry")
    families: list[str] = field(default_factory=lambda: ["paku", "kaiabc", "streetlight"])
    light_tokens: list[str] = field(default_factory=list)  # streetlight device tokens (JWT), its lights' ids below
    lights: list[str] = field(default_factory=lambda: [LIGHT])
    node: tuple[str, str] = ("es-1", "")  # an edgesentinel node: X-Device-Id, X-Auth-Key
    thingsnxt_devices: list[str] = field(default_factory=lambda: ["tx-1", "tx-2"])


async def provision(gw: Any) -> Targets:
    """Give every route with path parameters or cursors something real to find."""
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def ok(r: httpx.Response, status: int) -> dict[str, Any]:
        assert r.status_code == status, f"provisioning: {r.request.method} {r.request.url} -> {r.status_code} {r.text}"
        return r.json()

    keys, codes = [], []
    async with gw_client(gw) as c:
        for device, model in (("pk-1", "pk-a"), ("pk-2", "pk-b"), ("dup", "pk-a")):
            r = await c.post("/paku/devices", headers=auth, json={"id": device, "model": model, "notes": "n"})
            doc = ok(r, 201)
            keys.append(doc["mqtt"]["password"])
        for device in ("kb-1", "dup"):  # "dup" is in two families: ?family= decides
            doc = ok(await c.post("/api/gateway/devices", headers=auth, json={
                "family": "kaiabc", "id": device, "name": "KaiABC 1", "metadata": {"floor": 2}}), 201)
            keys.append(doc["credentials"]["key"])
        for device in ("tx-1", "tx-2"):  # thingsnxt: tx-1's token is known (TX_TOKEN), for the sweep's bodies
            doc = ok(await c.post("/api/gateway/devices", headers=auth, json={
                "family": "thingsnxt", "id": device, **({"key": TX_TOKEN} if device == "tx-1" else {})}), 201)
            keys.append(doc["credentials"]["key"])
        ok(await c.post("/thingsnxt/devices/tx-1/telemetry", json={"device_token": TX_TOKEN, "data": {"v0": 1}}), 200)
        for family, device_id, n in (("paku", None, 12), ("paku", "pk-2", 2), ("kaiabc", "kb-1", 2)):
            for _ in range(n):
                body = {"family": family, "ttl_s": 3600, **({"device_id": device_id} if device_id else {})}
                codes.append(ok(await c.post("/api/gateway/devices/claim-codes", headers=auth, json=body),
                                201)["claim_code"]["code"])
        for device, family in (("pk-1", "paku"), ("pk-1", "paku"), ("kb-1", "kaiabc")):
            ok(await c.post(f"/api/gateway/devices/{device}/commands", headers=auth, params={"family": family},
                            json={"payload": {"action": "on"}, "ttl_s": 600, "priority": 1}), 201)

        for i in range(30):
            await gw.events.emit("paku", "pk-1", "button", {"n": i}, ts=T0 + i)
        await gw.events.emit("paku", "pk-2", "alarm", {"level": 3}, severity="critical", ts=T0 + 40)

        folder = Path(gw.config.gateway.data_dir) / "fuzz-images"
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for family, model, version, size in (("paku", "pk-a", "1.1.0", 300), ("paku", "pk-a", "1.2.0", 5000),
                                             ("paku", "pk-b", "2.0.0", 10), ("kaiabc", "kb", "1.0.0", 20)):
            path = folder / f"{model}-{version}.bin"
            path.write_bytes(bytes(range(256)) * (size // 256) + b"\x00" * (size % 256))
            fw = await trio.to_thread.run_sync(lambda p=path, f=family, m=model, v=version: gw.ota.add_blocking(
                p, family=f, model=m, version=v))
            images.append(fw.id)
        await gw.ota.report("paku", "pk-1", "installed", version="1.2.0", firmware_id=images[1])
        await gw.ota.report("paku", "pk-2", "failed", version="2.0.0", detail="checksum")

        handlers = gw.contexts["paku"].state
        for i in range(25):
            doc = {"ts": T0 + i, "temp_c": 20 + i, "hum": 40}
            payload = json.dumps(doc).encode()
            await handlers.on_telemetry(InboundMessage("paku/pk-1/telemetry", payload, 1, False, False))
        state = b'{"online": true, "rssi": -60, "fwVersion": "1.1.0"}'
        await handlers.on_state(InboundMessage("paku/pk-1/state", state, 1, True, False))

        doc = ok(await c.post("/api/gateway/devices", headers=auth, json={"family": "streetlight", "id": LIGHT}), 201)
        keys.append(doc["credentials"]["key"])
        light_token = ok(await c.post(f"/streetlight/device/{LIGHT}/configure", json={"latitude": 28.6,
                                                                                       "longitude": 77.2}),
                         200)["device_token"]
        ok(await c.post(f"/api/gateway/devices/{LIGHT}/commands", headers=auth, params={"family": "streetlight"},
                        json={"payload": {"command_type": "power_control", "action": "on"}}), 201)

        cursors = {
            "events": ok(await c.get("/api/gateway/events", headers=auth, params={"limit": 5}), 200)["next_cursor"],
            "telemetry": ok(await c.get("/paku/devices/pk-1/telemetry", headers=auth, params={"limit": 5}),
                            200)["next_cursor"],
        }
        assert all(cursors.values()), cursors
        node = ok(await c.post("/api/gateway/devices", headers=auth, json={"family": "edgesentinel", "id": "es-1"}),
                  201)["credentials"]["key"]
    return Targets(core_devices=["pk-1", "pk-2", "kb-1", "dup"], paku_devices=["pk-1", "pk-2", "dup"],
                   device_keys=keys, claim_codes=codes, firmware_ids=images, cursors=cursors,
                   light_tokens=[light_token], node=("es-1", node))


def maintenance_off(gw: Any) -> None:
    """From a worker thread: switch maintenance mode off. A generated request may switch
    it on (PUT /api/gateway/maintenance), and then device routes answer 503 by design,
    which would read as server errors of the routes tested after it."""
    from gatewayd.core.maintenance import MaintenanceState

    if gw.maintenance.state.active:
        trio.from_thread.run(gw.maintenance.set, MaintenanceState())


# -- bytes on the wire ------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """Bytes put on the wire as they are: a JSON token (`NaN`, 400 digits, `"\\xff"`), or
    a path or query piece not to be percent-encoded (`%00`, `..`)."""

    data: bytes

    def __repr__(self) -> str:
        return f"Raw({_short_bytes(self.data)})"


def to_json(value: Any) -> bytes:
    """JSON text of `value` with `Raw` pieces spliced in; floats NaN/Infinity as such."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, dict):
        return b"{" + b",".join(to_json(str(k)) + b":" + to_json(v) for k, v in value.items()) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(to_json(v) for v in value) + b"]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value).encode()
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        return json.dumps(value, allow_nan=True).encode()  # NaN, Infinity, -Infinity
    return json.dumps(str(value)).encode()  # ASCII, lone surrogates as \\ud800 escapes


def _short_bytes(data: bytes, limit: int = 300) -> str:
    """A Python expression for `data`; long repeats of 1-4 bytes written as `b'[' * 1000`."""
    parts: list[str] = []
    plain = bytearray()
    i = 0
    while i < len(data):
        best_unit, best_count = 1, 1
        for unit in range(1, 5):
            piece = data[i:i + unit]
            count = 1
            while data[i + count * unit:i + (count + 1) * unit] == piece:
                count += 1
            if count * unit > best_count * best_unit and len(piece) == unit:
                best_unit, best_count = unit, count
        if best_count * best_unit >= 16 and best_count >= 4:
            if plain:
                parts.append(repr(bytes(plain)))
                plain.clear()
            parts.append(f"{data[i:i + best_unit]!r} * {best_count}")
            i += best_unit * best_count
        else:
            plain.append(data[i])
            i += 1
    if plain:
        parts.append(repr(bytes(plain)))
    text = " + ".join(parts) or "b''"
    if len(text) > limit * 2:
        return f"{data[:limit]!r} + ...  # {len(data)} bytes in all"
    return text


@dataclass(frozen=True)
class Req:
    """One generated request, exactly as sent."""

    rule: str                                  # the URL rule it aims at
    method: str
    target: bytes                              # the request line's target: path and query, already encoded
    headers: tuple[tuple[str, bytes], ...]
    body: bytes = b""
    auth: str = "none"                         # which Authorization variant (see AUTH_KINDS)
    spread: bool = False                       # send from a different loopback address each time (see Sender)

    def show(self, base_url: str = "http://127.0.0.1:8080") -> str:
        """A reproduction: the request line, headers and body, and the same as one httpx call."""
        shown = {k: v.decode("latin-1") for k, v in self.headers}
        shown = {k: (v.replace(TOKEN, "$GATEWAYD_ADMIN_TOKEN") if k.lower() == "authorization" else v)
                 for k, v in shown.items()}
        headers = {k: (v.decode("ascii") if v.isascii() else v) for k, v in self.headers}  # bytes stay bytes
        target = self.target.decode("ascii")
        if len(target) > 200:
            target = f"{target[:120]}... ({len(target)} characters: {_short_bytes(self.target)})"
        lines = [f"    {self.method} {target}"]
        lines += [f"    {k}: {v}" for k, v in shown.items()]
        lines.append(f"    body: {_short_bytes(self.body)}")
        call = (f"httpx.request({self.method!r}, {base_url!r}, headers={headers!r}, content={_short_bytes(self.body)}, "
                f"extensions={{'target': {_short_bytes(self.target, 1000)}}})")
        lines.append(f"    python: {call}")
        return "\n".join(lines)


# -- values -----------------------------------------------------------------------------

def b64(text: str | bytes) -> str:
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


NINES = "9" * 400
ODD_TEXT = [
    "", " ", ".", "..", "...", "a/b", "a:b", "-", "-1", "0", "00", "1.5", "²", "٣", "1e309", "NaN", "null", "true",
    "é", "日本", "\U0001f600", "\u202e", "\x00", "a\x00b", "\x7f", "%00", "%", "%zz",
    "'; DROP TABLE core_device; --",
    "<x>", "x" * 129, "x" * 3000, NINES, "99999999999999999999999", str(10**30), str(-10**30), str(2**63),
    "\ud800",  # a lone surrogate: not encodable as UTF-8 ("surrogatepass" makes it %ED%A0%80)
]
# Path and query pieces sent without percent-encoding.
RAW_PIECES = [Raw(b".."), Raw(b"."), Raw(b"%00"), Raw(b"%FF"), Raw(b"%C0%AF"), Raw(b"%ED%A0%80"), Raw(b"%2F"),
              Raw(b"a%2Fb"), Raw(b"%2e%2e"), Raw(b"%2e%2e%2f%2e%2e"), Raw(b"%"), Raw(b"%2"), Raw(b"+"), Raw(b"")]
# JSON values of the wrong kind for a field, by class (each class as likely as the others).
HUGE_NUMBERS = [10**30, -10**30, 2**63, -2**63 - 1, 2**64, Raw(NINES.encode()), Raw(b"-" + NINES.encode()),
                Raw(b"1" + b"0" * 30), 1e308, -1e308]
NON_FINITE = [Raw(b"NaN"), Raw(b"Infinity"), Raw(b"-Infinity"), Raw(b"1e309"), Raw(b"-1e309"), Raw(b"-NaN")]
SMALL_NUMBERS = [-1, 0, -0.0, 1, 1.5, 0.1, 5e-324, Raw(b"1e-400"), 2**63 - 1, 2**31]
NESTED = [Raw(b"[" * n + b"]" * n) for n in (100, 999, 1000, 1001, 5000)] + [
    Raw(b'{"a":' * n + b"1" + b"}" * n) for n in (1000, 5000)]
WEIRD_STRINGS = [Raw(b'"\xff"'), Raw(b'"\xed\xa0\x80"'), Raw(b'"\xc0\xaf"'), Raw(b'"\\ud800"'),
                 Raw(b'"\\u0000"'), Raw(b'"a\nb"'), "x" * 5000, "x" * 200, "é" * 50, "", " ", "\x00", "\u202e",
                 "a/b", "a b"]
WRONG_TYPES = [True, False, None, [], {}, [1, "a", None], {"a": {"b": [None]}}, 1, "1", 1.0]
ODD_INSIDE = [{"a": Raw(b"NaN")}, [Raw(b"Infinity")], {"a": 10**30}, {"a": "\ud800"}, {"\ud800": 1}, [Raw(b'"\xff"')]]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**31), 2**31), st.floats(-1e9, 1e9),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)

WEIRD_VALUE = st.one_of(
    st.sampled_from(WRONG_TYPES),
    st.sampled_from(HUGE_NUMBERS),
    st.sampled_from(NON_FINITE),
    st.sampled_from(WEIRD_STRINGS),
    st.sampled_from(NESTED),
    st.sampled_from(ODD_INSIDE),
    st.sampled_from(SMALL_NUMBERS),
    st.integers(),
    st.floats(),  # NaN and the infinities included: written as NaN / Infinity
    st.text(max_size=30),
    json_values,
)
ODD_TEXT_VALUE = st.one_of(st.sampled_from(ODD_TEXT), st.sampled_from(RAW_PIECES), st.text(max_size=20))


def odd_text(values: Iterable[str] = ()) -> st.SearchStrategy[Any]:
    """Text for a path or query piece: mostly the given odd values, else any odd text, raw bytes, anything."""
    values = list(values)
    return st.one_of(st.sampled_from(values), st.sampled_from(values), ODD_TEXT_VALUE) if values else ODD_TEXT_VALUE


def encode_piece(value: Any, safe: str = "") -> bytes:
    if isinstance(value, Raw):
        return value.data
    return quote(str(value).encode("utf-8", "surrogatepass"), safe=safe).encode("ascii")


# -- who may call: the Authorization header ----------------------------------------------

AUTH_KINDS = ["admin", "none", "wrong", "device-key", "lower-case scheme", "basic", "no-space", "token-only",
              "token+x", "latin-1", "empty-bearer", "inner-tab", "two-tokens", "x-api-key", "light-jwt",
              "node-key", "node-wrong"]


def auth_header(kind: str, targets: Targets, key_index: int) -> list[tuple[str, bytes]]:
    token = TOKEN.encode()
    key = targets.device_keys[key_index % len(targets.device_keys)].encode()
    value = {
        "admin": b"Bearer " + token,
        "wrong": b"Bearer wrong-token",
        "device-key": b"Bearer " + key,
        "lower-case scheme": b"bearer " + token,   # schemes are case-insensitive: this is the admin
        "basic": b"Basic " + base64.b64encode(b"admin:" + token),
        "no-space": b"Bearer" + token,
        "token-only": token,
        "token+x": b"Bearer " + token + b"x",
        "latin-1": b"Bearer \xe9\xe9\xff",
        "empty-bearer": b"Bearer",
        "inner-tab": b"Bearer\t" + token,
        "two-tokens": b"Bearer " + token + b", Bearer " + token,
    }.get(kind)
    if kind == "x-api-key":
        return [("X-API-Key", key)]
    if kind == "light-jwt":  # a streetlight's own device token (configure hands it out)
        return [("Authorization", b"Bearer " + (targets.light_tokens or ["none"])[0].encode())]
    if kind in ("node-key", "node-wrong"):  # edgesentinel's X-Device-Id + X-Auth-Key
        node_id, node_key = targets.node
        return [("X-Device-Id", node_id.encode()), ("X-Auth-Key", (node_key if kind == "node-key" else "x" * 43).encode())]
    return [] if value is None else [("Authorization", value)]


def is_admin(kind: str) -> bool:
    return kind in ("admin", "lower-case scheme")


# -- the catalogue of routes --------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """What the fuzzer knows about one URL rule (for all of its methods)."""

    params: dict[str, str] = field(default_factory=dict)
    """path parameter -> kind: "device" (core ids), "paku-device", "firmware", "file"."""
    query: dict[str, str] = field(default_factory=dict)
    """query key -> kind of value (see Strategies.query_values)."""
    body: dict[str, str] = field(default_factory=dict)
    """JSON body field -> kind of valid value (see Strategies.body); "!field": required.
    {}: the route reads no body (it gets bodies anyway)."""
    admin: bool = True
    """Only the admin token may get a 2xx answer."""
    json: bool = True
    """Its answers are JSON (errors always are; see `binary_ok`)."""
    binary_ok: bool = False
    """A successful answer may be bytes (firmware images)."""
    range_headers: bool = False
    """It serves byte ranges: Range, If-Range and If-None-Match are slots of their own."""
    claim: bool = False
    """Rate limited per client address: send from many loopback addresses."""
    html: bool = False
    """A page for a browser (the dashboard): its answers are HTML, its own errors too."""
    light: bool = False
    """A streetlight device route: a light's token by default, errors in the specification's
    body `{"status": "error", "code", "message", "retry_after_seconds"}`."""
    node: bool = False
    """A device route of edgesentinel: valid requests carry its node's X-Device-Id + X-Auth-Key."""
    upload: bool = False
    """edgesentinel's batch: valid requests carry an Idempotency-Key and the body's Content-SHA256."""

    @property
    def base_auth(self) -> str:
        return "admin" if self.admin else "light-jwt" if self.light else "node-key" if self.node else "none"
    detail_errors: bool = False
    """Its family's errors are FastAPI's `{"detail": "..."}` (thingsnxt); the core's own
    refusals in front of it (the admin token, an oversized body) keep the core shape."""


DEVICE_BODY = {"!family": "family", "id": "new-device", "name": "text", "model": "text", "firmware": "text",
               "metadata": "object", "key": "secret", "signing_secret": "secret"}
PAKU_FIELDS = {"name": "text", "model": "text", "firmware": "text", "notes": "text"}
EVENTS_QUERY = {"family": "family", "device": "device", "type": "type", "severity": "severity", "since": "time",
                "until": "time", "limit": "limit", "cursor": "events-cursor"}

TX_DEVICE = {"device_id": "thingsnxt-device"}
TX_TELEMETRY = {"!device_token": "thingsnxt-token", "data": "object"}

CATALOGUE: dict[str, Route] = {
    # Quart's own: no static folder ships, so everything is 404
    "/static/<path:filename>": Route(params={"filename": "file"}, admin=False),
    "/health": Route(admin=False),
    "/metrics": Route(admin=False, json=False),
    # Public today although the docs put /api/gateway/* behind the token (issue 14, item 6).
    "/api/gateway/plugins": Route(admin=False),
    "/api/gateway/devices": Route(query={"family": "family", "status": "status"}, body=DEVICE_BODY),
    "/api/gateway/devices/claim-codes": Route(body={"!family": "family", "ttl_s": "positive", "device_id": "device"}),
    "/api/gateway/devices/<device_id>": Route(params={"device_id": "device"}, query={"family": "family"}),
    "/api/gateway/devices/<device_id>/disable": Route(params={"device_id": "device"}, query={"family": "family"}),
    "/api/gateway/devices/<device_id>/enable": Route(params={"device_id": "device"}, query={"family": "family"}),
    "/api/gateway/devices/<device_id>/rotate": Route(params={"device_id": "device"}, query={"family": "family"},
                                                     body={"grace_s": "non-negative"}),
    "/api/gateway/devices/<device_id>/revoke": Route(params={"device_id": "device"}, query={"family": "family"}),
    "/api/gateway/devices/<device_id>/commands": Route(
        params={"device_id": "device"}, query={"family": "family", "status": "status"},
        body={"!payload": "any", "ttl_s": "positive", "priority": "priority"}),
    # Valid requests switch maintenance off only: on, device routes would answer 503 (by design).
    "/api/gateway/maintenance": Route(body={"!active": "off", "reason": "text", "retry_after_s": "positive"}),
    "/api/gateway/events": Route(query=EVENTS_QUERY),
    "/api/gateway/alerts": Route(query={"state": "state", "limit": "limit"}),
    "/api/gateway/firmware": Route(query={"family": "family"}),
    "/api/gateway/firmware/<int:firmware_id>": Route(params={"firmware_id": "firmware"}),
    "/api/gateway/firmware/<int:firmware_id>/download": Route(params={"firmware_id": "firmware"}, binary_ok=True,
                                                              range_headers=True),
    "/api/gateway/firmware/reports": Route(query={"device": "device", "limit": "limit"}),
    # Live streams: the SSE stream's answer is judged on its status and headers; the
    # WebSocket route gets plain HTTP requests (no upgrade), which must be refused cleanly.
    "/api/gateway/live/events": Route(query={"streams": "streams", "last_id": "limit", "token": "token"}),
    "/api/gateway/live": Route(query={"streams": "streams", "token": "token"}),
    # The site dashboard: pages for a browser, with a session cookie or the admin token.
    "/": Route(json=False, html=True),
    "/dashboard/devices/<device_id>": Route(params={"device_id": "device"}, query={"family": "family"}, json=False,
                                            html=True),
    # A form of the device page: a session and its CSRF token (the fuzzer has neither: 303 to the log-in).
    "/dashboard/devices/<device_id>/commands": Route(params={"device_id": "device"}, admin=False, json=False,
                                                     html=True),
    "/dashboard/login": Route(admin=False, json=False, html=True),
    "/dashboard/logout": Route(admin=False, json=False, html=True),
    "/dashboard/static/<name>": Route(params={"name": "file"}, admin=False, json=False),
    # The OpenAPI documents and their pages (behind the token or a dashboard session).
    "/openapi.json": Route(),
    "/docs": Route(json=False, html=True),
    "/paku/openapi.json": Route(),
    "/edgesentinel/openapi.json": Route(),
    "/edgesentinel/docs": Route(json=False, html=True),
    "/edgesentinel/api/iot/v1/auth/handshake": Route(admin=False, node=True),
    "/edgesentinel/api/iot/v1/telemetry/batch": Route(admin=False, node=True, upload=True, body={
        "batch_id": "text", "restamp": "off", "points": "any", "windows": "any",
        "waveforms": "any", "door_events": "any", "system_events": "any", "diagnostics": "object"}),
    "/edgesentinel/api/iot/v1/config": Route(admin=False, node=True),
    "/edgesentinel/api/iot/v1/ota/check": Route(admin=False, node=True, query={"current": "version", "channel": "channel",
                                                                                "model": "model"}),
    "/edgesentinel/api/iot/v1/ota/report": Route(admin=False, node=True, body={"!status": "ota-status", "version": "version",
                                                                                "detail": "text"}),
    "/edgesentinel/data": Route(query={"series": "text", "device": "device", "metric": "text", "since": "time",
                                       "until": "time", "limit": "limit"}, json=False),
    "/edgesentinel/doors": Route(query={"device": "device", "days": "limit"}),
    "/edgesentinel/claim": Route(admin=False, claim=True, body={"!device_id": "text", "!code": "claim-code"}),
    "/edgesentinel/ota/<int:firmware_id>/firmware.bin": Route(admin=False, params={"firmware_id": "firmware"},
                                                             binary_ok=True, query={"device": "text", "expires": "limit",
                                                                                    "sig": "text"}),
    "/paku/docs": Route(json=False, html=True),
    "/paku/health": Route(admin=False),
    "/streetlight/openapi.json": Route(),
    "/streetlight/docs": Route(json=False, html=True),
    "/streetlight/device/<device_id>/configure": Route(admin=False, light=True, params={"device_id": "light"}, body={
        "device_id": "light-id", "latitude": "latitude", "longitude": "longitude", "status": "power-state",
        "name": "text", "firmware_version": "text", "timestamp": "time"}),
    "/streetlight/device/<device_id>/status": Route(admin=False, light=True, params={"device_id": "light"}, body={
        "!status": "power-state", "brightness": "percent", "battery": "percent", "timestamp": "time",
        "light_id": "text", "energy": "object"}),
    "/streetlight/device/<device_id>/sync": Route(admin=False, light=True, params={"device_id": "light"},
                                                   body={"!readings": "readings"}),
    "/streetlight/device/<device_id>/commands": Route(admin=False, light=True, params={"device_id": "light"},
                                                       query={"limit": "limit"}),
    "/streetlight/device/<device_id>/command-ack": Route(admin=False, light=True, params={"device_id": "light"}, body={
        "!command_id": "text", "!status": "ack-status", "result": "any", "execution_timestamp": "time"}),
    "/streetlight/device/<device_id>/alert": Route(admin=False, light=True, params={"device_id": "light"}, body={
        "!alert_type": "alert-type", "severity": "severity", "message": "text", "data": "object"}),
    "/streetlight/device/<device_id>/logs": Route(admin=False, light=True, params={"device_id": "light"},
                                                   body={"!logs": "logs"}),
    "/streetlight/device/<device_id>/health": Route(admin=False, light=True, params={"device_id": "light"}),
    "/streetlight/device/<device_id>/firmware": Route(admin=False, light=True, params={"device_id": "light"}, body={
        "!firmware_version": "text", "status": "text", "channel": "text"}),
    "/streetlight/firmware/<firmware_id>/image": Route(admin=False, light=True, binary_ok=True, range_headers=True,
                                                           params={"firmware_id": "firmware"}),
    "/paku/devices": Route(body={"id": "new-device", **PAKU_FIELDS}),
    "/paku/devices/<device_id>": Route(params={"device_id": "paku-device"}, body=PAKU_FIELDS),
    "/paku/devices/<device_id>/telemetry": Route(params={"device_id": "paku-device"}, query={
        "since": "time", "until": "time", "limit": "limit", "cursor": "telemetry-cursor"}),
    "/paku/claim": Route(admin=False, claim=True, body={"!code": "claim-code", "id": "new-device", "model": "text",
                                                         "name": "text"}),
    "/paku/ota/manifest.json": Route(admin=False, query={
        "model": "model", "current": "version", "channel": "channel", "device": "device"}),
    "/paku/ota/<int:firmware_id>/firmware.bin": Route(admin=False, params={"firmware_id": "firmware"}, binary_ok=True,
                                                     range_headers=True),
    # kaiabc: the spec's /v1 under its mount; nodes call with X-API-Key, people with the admin token
    "/kaiabc/openapi.json": Route(),
    "/kaiabc/docs": Route(json=False, html=True),
    "/kaiabc/v1/health": Route(admin=False),
    "/kaiabc/v1/sensors/nodes": Route(admin=False, query={"limit": "limit"}, body={
        "!node_id": "new-device", "!hardware_type": "text", "!runtime": "text", "name": "text", "location": "text"}),
    "/kaiabc/v1/sensors/temperature": Route(admin=False, body={"!node_id": "device", "!temperature_kelvin": "positive",
                                                               "timestamp": "text"}),
    "/kaiabc/v1/sensors/batch": Route(admin=False, body={"!node_id": "device", "!readings": "any"}),
    "/kaiabc/v1/oscillator/state": Route(admin=False, query={"node_id": "device", "detail_level": "state"}),
    "/kaiabc/v1/oscillator/history": Route(admin=False, query={
        "node_id": "device", "start_time": "time", "end_time": "time", "limit": "limit", "cursor": "telemetry-cursor"}),
    "/kaiabc/v1/ws": Route(admin=False),
    "/kaiabc/v1/oscillator/reset": Route(body={"!node_id": "device", "initial_conditions": "object",
                                               "units": "text", "reason": "text"}),
    "/kaiabc/v1/entrainment/parameters": Route(admin=False, query={"node_id": "device"}, body={
        "node_id": "device", "parameters": "object", "reference_temperature_kelvin": "positive", "reason": "text"}),
    "/kaiabc/v1/entrainment/phase-shift": Route(body={"!node_id": "device", "!shift_type": "text",
                                                      "!magnitude_hours": "positive", "duration_minutes": "positive"}),
    "/kaiabc/v1/entrainment/prc": Route(admin=False, query={"node_id": "device", "resolution": "limit"}),
    "/kaiabc/v1/bulk/sensor-readings": Route(admin=False, body={"!readings": "any"}),
    "/kaiabc/v1/bulk/oscillator-states": Route(admin=False, body={"!node_ids": "any", "detail_level": "text"}),
    "/kaiabc/v1/diagnostics/performance": Route(),
    "/kaiabc/v1/diagnostics/logs": Route(query={"node_id": "device", "limit": "limit", "start_time": "time",
                                               "end_time": "time"}),
    "/kaiabc/v1/diagnostics/health-check": Route(body={"components": "any", "detailed": "any"}),
    "/kaiabc/v1/config/templates": Route(admin=False, query={"hardware_type": "family", "runtime": "family"}),
    "/kaiabc/v1/config/validate": Route(body={"!config": "object", "node_id": "device"}),
    "/kaiabc/v1/analytics/period-stability": Route(admin=False, query={"node_id": "device", "days": "limit"}),
    "/kaiabc/v1/analytics/entrainment-efficiency": Route(admin=False, query={"node_id": "device",
                                                                              "shift_id": "type"}),
    "/kaiabc/v1/analytics/export": Route(admin=False, query={"node_id": "device", "start_time": "time",
                                                             "end_time": "time", "format": "type"}),
    "/kaiabc/v1/auth/tokens": Route(body={"!name": "text", "!role": "text", "ttl_days": "positive"}),
    "/kaiabc/v1/auth/tokens/<name>": Route(params={"name": "file"}),
    "/kaiabc/v1/simulation/config": Route(body={"tolerance": "object", "max_step_size": "positive",
                                                "solver_type": "text"}),
    "/kaiabc/v1/simulation/pause": Route(body={"node_id": "device", "reason": "text"}),
    "/kaiabc/v1/simulation/resume": Route(body={"node_id": "device", "reason": "text"}),
    "/kaiabc/v1/output/koa": Route(admin=False, query={"node_id": "device"}),
    "/kaiabc/v1/output/mapping": Route(body={"node_id": "device", "mapping_function": "text", "pwm_min": "priority",
                                             "pwm_max": "positive", "invert": "any"}),
    "/kaiabc/v1/output/manual-override": Route(body={"!node_id": "device", "!override_enabled": "any",
                                                     "pwm_value": "positive", "duration_minutes": "positive"}),
    "/kaiabc/v1/filter/state": Route(admin=False, query={"node_id": "device"}),
    "/kaiabc/v1/filter/parameters": Route(body={"!node_id": "device", "process_noise": "object",
                                                "measurement_noise": "object"}),
    "/kaiabc/v1/filter/reset": Route(body={"!node_id": "device", "reason": "text"}),
    "/thingsnxt/openapi.json": Route(),
    "/thingsnxt/docs": Route(json=False, html=True),
    "/thingsnxt/health": Route(admin=False, detail_errors=True),
    "/thingsnxt/devices/<device_id>/telemetry": Route(admin=False, detail_errors=True, params=TX_DEVICE,
                                                      body=TX_TELEMETRY),
    "/thingsnxt/telemetry": Route(admin=False, detail_errors=True, body=TX_TELEMETRY),
    "/thingsnxt/telemetry/latest": Route(admin=False, detail_errors=True, query={"device_token": "thingsnxt-token"}),
    "/thingsnxt/devices/<device_id>/telemetry/bulk": Route(
        admin=False, detail_errors=True, params=TX_DEVICE,
        body={"!device_token": "thingsnxt-token", "!readings": "tx-readings"}),
    "/thingsnxt/devices": Route(detail_errors=True, body={"device_id": "new-device", "name": "text", "model": "text"}),
    "/thingsnxt/devices/<device_id>/state": Route(detail_errors=True, params=TX_DEVICE, body={"!data": "pins"}),
    # The dashboard panel's form: obeyed only with a session and its form token (never 2xx: 303 or 403).
    "/thingsnxt/dashboard/pins": Route(detail_errors=True),
    # Its live streams: a scoped token or the admin token (so admin=False: a live token opens them too).
    "/thingsnxt/sse": Route(admin=False, detail_errors=True, query={"token": "token"}),
    "/thingsnxt/sse/<device_id>": Route(admin=False, detail_errors=True, params=TX_DEVICE, query={"token": "token"}),
    "/thingsnxt/ws": Route(admin=False, detail_errors=True, query={"token": "token"}),
    "/thingsnxt/ws/<device_id>": Route(admin=False, detail_errors=True, params=TX_DEVICE, query={"token": "token"}),
}

IGNORED_METHODS = {"HEAD", "OPTIONS"}  # added to every rule by Quart; generated as variants of the others


def rules_of(app: Any) -> dict[str, set[str]]:
    """URL rule -> its methods (without HEAD and OPTIONS), from the app's url_map."""
    out: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        out.setdefault(rule.rule, set()).update(set(rule.methods or ()) - IGNORED_METHODS)
    return out


def uncovered(app: Any) -> list[str]:
    """Rules the app serves that the catalogue has no generator for."""
    return sorted(rule for rule in rules_of(app) if rule not in CATALOGUE)


def stale(app: Any) -> list[str]:
    """Catalogue entries for rules the app no longer serves."""
    return sorted(set(CATALOGUE) - set(rules_of(app)))


def route_pairs(app: Any) -> list[tuple[str, str]]:
    """Every (rule, method) to fuzz, in a stable order."""
    return sorted((rule, method) for rule, methods in rules_of(app).items() for method in methods)


# -- values by slot ------------------------------------------------------------------------
#
# A request is a handful of slots: each path parameter, each query key of the route, the
# other query pairs, each body field, the body as a whole, the Authorization header,
# the other headers, the method. Valid values make the request get past the checks in
# front of the code under test; odd values are what the code must refuse cleanly.

LIMITS_OK = ["1", "10", "1000"]
LIMITS_ODD = ["0", "-1", "1001", "²", "٣", "1e309", "NaN", "inf", "1.5", " 5", "5 ", "0x10", "1_0", NINES,
              "99999999999999999999999", ""]
TIMES_OK = ["1767225600", "1767225605.5", "2026-01-01T00:00:05Z", "2026-01-01", "2026-01-01T02:00:00+02:00"]
TIMES_ODD = ["1e309", "NaN", "inf", "-inf", "-1e300", "1e300", NINES, "99999-01-01", "2026-13-01",
             "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "²", "", "yesterday", "1e20", "-1",
             "2026-01-01T00:00:00+99:00"]
GARBAGE_CURSORS = [
    b64(json.dumps({"before": 10**30})), b64(json.dumps({"before": -5})), b64(json.dumps({"before": 1.5})),
    b64(json.dumps({"before": "1"})), b64(json.dumps({"before": True})), b64('{"before": NaN}'),
    b64('{"before": ' + NINES + "}"), b64(json.dumps({"before": 2**63})), b64(json.dumps({"before": 2**64})),
    b64("[1e308, " + str(10**30) + "]"), b64("[" + NINES + ", 1]"), b64("[NaN, 1]"), b64("[Infinity, 1]"),
    b64("[1, " + str(2**63) + "]"), b64("[1, " + str(-2**63 - 1) + "]"), b64("[1.5, " + str(10**30) + "]"),
    b64("[1e309, 1]"), b64("[1, 2, 3]"), b64("[]"), b64("null"), b64('"x"'), b64("[" * 1000 + "]" * 1000),
    b64('{"before": 1}' + " " * 10), b64(b"\xff\xfe"), b64(b'{"before": "\xff"}'), "!!!!", "a", "====", "%FF",
    "x" * 3000, "",
]
VERSIONS_OK = ["1.0.0", "1.1.0", "1.2.0", "2.0.0-rc.1"]
VERSIONS_ODD = ["1.2", "one", "1.2.3-rc.1+build", "99999999999999999999.0.0", "1.0.0.0.0", "v1", "", "1." + NINES,
                "-1.0.0"]
OTHER_KEYS = ["limit", "cursor", "since", "until", "family", "x", "", "é", "limit[]"]
NEW_DEVICE_ID = st.builds(lambda s: f"fz-{s}", st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1,
                                                         max_size=10))
WRONG_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
BODY_FORMS = ["truncated", "invalid-utf8", "bom", "utf-16", "utf-32", "gzip", "whole", "binary", "array", "scalar",
              "set-field", "content-type", "content-encoding"]
WHOLE_BODIES = [b"", b"null", b"[]", b"[1,2]", b'"x"', b"0", b"NaN", b"Infinity", b"{", b"}", b"{}", b" ", b"\x00",
                b"\xff\xfe", b"\xef\xbb\xbf{}", b'{"a":1}{"b":2}', b'{"a":1,}', b"{'a': 1}",
                b"[" * 1000 + b"]" * 1000, b"[" * 10_000 + b"]" * 10_000, b'{"a":' * 1000 + b"1" + b"}" * 1000,
                b" " * (MAX_BODY + 1), b'{"a":"' + b"x" * MAX_BODY + b'"}']
ODD_CONTENT_TYPES = [None, b"text/plain", b"application/json; charset=latin-1", b"application/json; charset=nope",
                     b"application/x-www-form-urlencoded", b"multipart/form-data", b"multipart/form-data; boundary=x",
                     b"*/*", b"application/merge-patch+json", b"\xe9"]
INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"]
RANGES_OK = [b"bytes=0-", b"bytes=0-0", b"bytes=100-", b"bytes=-100", b"bytes=0-99"]
RANGES_ODD = [b"bytes=-0", b"bytes=5-1", b"bytes=0-1,2-3", b"bytes=" + NINES.encode() + b"-",
              b"bytes=0-" + NINES.encode(), b"bytes=-" + NINES.encode(), b"bytes=99999999999999999999-", b"bytes=",
              b"bytes=-", b"items=0-1", b"bytes=\xb2-", b"bytes=1-2-3", b"bytes=\xd9\xa3-"]
PATH_ODD = {
    "device": ["ghost", "..", ".", Raw(b"%00"), Raw(b"%FF"), "\ud800", "é", "x" * 129, "x" * 3000, NINES, "\x00",
               "a/b", Raw(b"%2F"), Raw(b""), "'; DROP TABLE core_device; --"],
    "firmware": ["0", "999", "99999999999999999999999", str(10**30), NINES, str(2**63), str(2**64), "٣", "01", "-1",
                 "1.5", "abc"],
    "file": ["x" * 300, Raw(b"../../etc/passwd"), Raw(b"%2e%2e/%2e%2e/etc/passwd"), Raw(b"..%2f..%2fetc%2fpasswd"),
             Raw(b"/etc/passwd"), Raw(b"a/../../b"), Raw(b"%00")],
}
PATH_ODD["paku-device"] = [*PATH_ODD["device"], "kb-1"]  # a device of another family
PATH_ODD["light"] = [*PATH_ODD["device"], "kb-1", "IMEI:", ":", "IMEI:351234567890123:x", Raw(b"IMEI%3A1")]
PATH_ODD["thingsnxt-device"] = [*PATH_ODD["device"], "pk-1"]
HOSTS = [b"evil.example", b"evil.example:99999", b"[::1]", b"[::1", b"127.0.0.1:1", b"a_b", b"%00", b"\xe9.example",
         b"xn--bcher-kva.example", b"a" * 64, b"a" * 300, b"a..b", b".", b"", b"host with spaces", b"h:-1", b"h:port"]


class Strategies:
    """Values and strategies for one set of targets, built once (building strategies per draw is slow)."""

    def __init__(self, t: Targets):
        self.targets = t
        self.query_values = {  # kind -> (valid values, odd values)
            "family": (t.families, ["nofamily", "", "PAKU", "é"]),
            "status": (["active", "provisioned", "disabled", "claimed", "pending", "delivered"], ["bogus"]),
            "device": (t.core_devices, ["ghost"]),
            "type": (["alarm", "button", "alarm,button"], [",", "a" * 100]),
            "severity": (["info", "warning", "critical", "info,critical"], ["bogus", ","]),
            "state": (["pending", "sent", "failed"], ["bogus"]),
            "limit": (LIMITS_OK, LIMITS_ODD),
            "time": (TIMES_OK, TIMES_ODD),
            "events-cursor": ([t.cursors["events"]], GARBAGE_CURSORS),
            "telemetry-cursor": ([t.cursors["telemetry"]], GARBAGE_CURSORS),
            "model": (["pk-a", "pk-b"], ["nope", "x" * 300]),
            "version": (VERSIONS_OK, VERSIONS_ODD),
            "channel": (["stable", "beta"], ["nightly"]),
            "streams": (["paku.#", "paku.telemetry.*,kaiabc.#", "*.*.pk-1"], ["", "a..b", "#.x", "a*", "," * 40,
                                                                         ",".join(["a"] * 40)]),
            "token": (["gwt_not-a-real-token"], ["", "x" * 300, "gwt_"]),
            "text": (["x", "es-1", "0" * 64], ["", "x" * 300, "é", "-1"]),
            "thingsnxt-token": ([TX_TOKEN], ["", "x" * 300, "wrong-token"]),
        }
        self.query_ok = {kind: st.sampled_from(ok) for kind, (ok, _) in self.query_values.items()}
        self.query_odd = {kind: odd_text(odd) for kind, (_, odd) in self.query_values.items()}
        self.body = {
            "family": st.sampled_from(t.families),
            "new-device": st.one_of(NEW_DEVICE_ID, st.sampled_from(t.core_devices)),
            "device": st.sampled_from([*t.core_devices, "ghost"]),
            "text": st.text(max_size=20),
            "secret": st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=16, max_size=40),
            "object": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
            "positive": st.one_of(st.integers(1, 10**6), st.floats(0.001, 1e6)),
            "non-negative": st.one_of(st.integers(0, 10**6), st.floats(0, 1e6)),
            "priority": st.integers(-10, 10),
            "off": st.just(False),
            "any": json_values,
            "claim-code": st.sampled_from([*t.claim_codes, "AAAA-BBBB-CCCC", "aaaa-bbbb-cccc"]),
            "light-id": st.sampled_from([*t.lights, "IMEI:1"]),
            "latitude": st.floats(-90, 90),
            "longitude": st.floats(-180, 180),
            "power-state": st.sampled_from(["on", "off", "error"]),
            "percent": st.floats(0, 100),
            "time": st.one_of(st.sampled_from(["2025-12-17T10:30:35Z", "2025-12-17T10:30:35+05:30"]),
                              st.floats(946684800, 7258118400)),
            "readings": st.lists(st.fixed_dictionaries({"status": st.sampled_from(["on", "off"]),
                                                        "timestamp": st.floats(946684800, 7258118400)}),
                                 min_size=1, max_size=5),
            "ack-status": st.sampled_from(["executed", "failed"]),
            "alert-type": st.sampled_from(["battery_low", "lamp_failure", "x.y:z"]),
            "severity": st.sampled_from(["info", "warning", "critical"]),
            "logs": st.lists(st.fixed_dictionaries({"message": st.text(max_size=20)}), min_size=1, max_size=3),
            "version": st.sampled_from(VERSIONS_OK),
            "ota-status": st.sampled_from(["started", "installed", "failed", "bogus"]),
            "thingsnxt-token": st.sampled_from([TX_TOKEN, "wrong-token"]),
            "tx-readings": st.lists(st.fixed_dictionaries({"timestamp": st.sampled_from([T0, "2026-01-01T00:00:05Z"]),
                                                        "data": st.dictionaries(st.sampled_from(["t", "v0"]),
                                                                                json_values, max_size=2)}),
                                 min_size=1, max_size=3),
            "pins": st.dictionaries(st.sampled_from(["v0", "v1", "led"]), st.integers(0, 1), min_size=1, max_size=2),
        }
        self.path_first = {"device": t.core_devices[0], "paku-device": t.paku_devices[0], "light": t.lights[0],
                           "thingsnxt-device": t.thingsnxt_devices[0],
                           "firmware": str(t.firmware_ids[0]), "file": "x.js"}
        self.path_ok = {
            "device": st.sampled_from(t.core_devices),
            "paku-device": st.sampled_from(t.paku_devices),
            "light": st.sampled_from(t.lights),
            "thingsnxt-device": st.sampled_from(t.thingsnxt_devices),
            "firmware": st.sampled_from([str(i) for i in t.firmware_ids]),
            "file": st.sampled_from(["x.js", "a/b.css"]),
        }
        self.path_odd = {kind: st.one_of(st.sampled_from(values), ODD_TEXT_VALUE) for kind, values in PATH_ODD.items()}
        self.other_query = odd_text()
        self.auth_odd = {admin: st.sampled_from([k for k in AUTH_KINDS if k != ("admin" if admin else "none")])
                         for admin in (True, False)}
        self.wrong_methods = {m: st.sampled_from([w for w in WRONG_METHODS if w != m])
                              for m in [*WRONG_METHODS, "HEAD"]}
        self._names: dict[tuple[str, ...], st.SearchStrategy[str]] = {}

    def names(self, names: Iterable[str]) -> st.SearchStrategy[str]:
        key = tuple(names)
        if key not in self._names:
            self._names[key] = st.sampled_from(key)
        return self._names[key]


_strategies: dict[int, tuple[Targets, Strategies]] = {}


def strategies_for(targets: Targets) -> Strategies:
    if id(targets) not in _strategies:
        _strategies[id(targets)] = (targets, Strategies(targets))  # the targets kept: their id stays theirs
    return _strategies[id(targets)][1]


# -- putting a request together ----------------------------------------------------------


def build_path(rule: str, values: dict[str, Any]) -> bytes:
    out = rule
    for name, value in values.items():
        piece = encode_piece(value, safe="/" if isinstance(value, str) and name == "filename" else "")
        for pattern in (f"<{name}>", f"<int:{name}>", f"<path:{name}>"):
            out = out.replace(pattern, piece.decode("ascii"))
    return out.encode("ascii")


def encode_body(doc: Any, form: str = "json", arg: Any = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The body bytes of `doc` in one of BODY_FORMS (`arg` says how), and its headers."""
    content_type: bytes | None = b"application/json"
    encoding: bytes | None = None
    if form == "array":
        doc = [doc]
    elif form == "scalar":
        doc = arg
    elif form == "set-field":  # (name, value): a nested value, an unknown key
        doc = {**(doc if isinstance(doc, dict) else {}), arg[0]: arg[1]}
    body = to_json(doc)
    if form == "truncated":
        body = body[:arg if arg >= 0 else max(0, len(body) + arg)]
    elif form == "invalid-utf8":
        at, bad = arg
        at = min(at, len(body))
        body = body[:at] + bad + body[at:]
    elif form == "bom":
        body = b"\xef\xbb\xbf" + body
    elif form in ("utf-16", "utf-32"):
        body = body.decode("utf-8", "replace").encode(form)
    elif form == "gzip":
        body, encoding = gzip.compress(body, mtime=0), b"gzip"
    elif form in ("whole", "binary"):
        body = arg
    elif form == "content-type":
        content_type = arg
    elif form == "content-encoding":
        encoding = arg
    headers = []
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    if encoding is not None:
        headers.append(("Content-Encoding", encoding))
    return body, headers


def make_request(rule: str, route: Route, targets: Targets, *, method: str, path: dict[str, Any],
                 query: Iterable[tuple[Any, Any]] = (), doc: Any = None, form: str = "json", arg: Any = None,
                 auth: str, key_index: int = 0, headers: Iterable[tuple[str, bytes]] = ()) -> Req:
    """One request: `query` pairs with value None are a key without "="; `doc` None is no body."""
    target = build_path(rule, path)
    pairs = [encode_piece(k) + (b"" if v is None else b"=" + encode_piece(v)) for k, v in query]
    if pairs:
        target += b"?" + b"&".join(pairs)
    all_headers = auth_header(auth, targets, key_index)
    body = b""
    if doc is not None:
        body, body_headers = encode_body(doc, form, arg)
        all_headers += body_headers
    if route.upload:  # a fresh key per body (the same body again is a replay), its hash as sent
        digest = hashlib.sha256(body).hexdigest()
        all_headers += [("Idempotency-Key", str(uuid.UUID(digest[:32], version=4)).encode()),
                        ("Content-SHA256", digest.encode())]
    all_headers += list(headers)
    return Req(rule, method, target, tuple(all_headers), body, auth, route.claim)


BODY_METHODS = ("POST", "PATCH", "PUT")


def slots_of(route: Route, method: str) -> list[tuple[str, str]]:
    """What a request can get wrong, one at a time (body fields only where the method has a body)."""
    fields = route.body if method in BODY_METHODS else {}
    return [*(("path", p) for p in route.params), *(("query", q) for q in route.query),
            *(("field", f.lstrip("!")) for f in fields), ("body", ""), ("query", "*"), ("auth", ""),
            ("headers", ""), ("method", "")]


# -- the sweep: every curated odd value in every slot, the rest valid ------------------------

BODY_DEFAULTS = {"family": "paku", "any": {"a": 1}, "claim-code": "AAAA-BBBB-CCCC", "device": "pk-1",
                 "new-device": "fz-sweep", "text": "x", "secret": "s" * 20, "object": {}, "positive": 60,
                 "non-negative": 0, "priority": 0, "power-state": "on", "readings": [{"status": "on", "timestamp": T0}],
                 "ack-status": "executed", "alert-type": "battery_low", "logs": [{"message": "x"}],
                 "off": False, "ota-status": "installed", "version": "1.0.0",
                 "thingsnxt-token": TX_TOKEN, "tx-readings": [{"timestamp": T0, "data": {"t": 1}}], "pins": {"v0": 1}}
SWEEP_FIELD = [True, None, [], {}, 1, "1", 10**30, 2**63, Raw(NINES.encode()), Raw(b"NaN"), Raw(b"Infinity"),
               Raw(b"1e309"), NESTED[2], NESTED[5], Raw(b'"\xff"'), Raw(b'"\\ud800"'), "\x00", "x" * 5000, "", "a/b",
               -1, 0, 1.5, *ODD_INSIDE[:5]]
SWEEP_BODIES = [
    ("truncated", 1), ("truncated", -1), ("invalid-utf8", (0, b"\xff")), ("invalid-utf8", (1, b"\xed\xa0\x80")),
    ("bom", None), ("utf-16", None), ("gzip", None), ("binary", b"\x00\x01\xfe\xff"), ("array", None),
    ("scalar", 1), ("scalar", Raw(b"NaN")), ("set-field", ("extra", Raw(b"NaN"))), ("set-field", ("", NESTED[2])),
    *(("whole", b) for b in (b"", b"null", b"[]", b"{", b"NaN", b"\xff\xfe", b"[" * 1000 + b"]" * 1000,
                             b'{"a":' * 1000 + b"1" + b"}" * 1000, b" " * (MAX_BODY + 1), b'{"a":1,}')),
    *(("content-type", c) for c in (None, b"text/plain", b"application/x-www-form-urlencoded",
                                    b"multipart/form-data")),
    ("content-encoding", b"deflate"),
]
SWEEP_HOSTS = [b"a" * 64, b"a..b", b".", b"[::1", b"\xe9.example", b"", b"h:port", b"evil.example"]
SWEEP_AUTH = ["none", "wrong", "device-key", "basic", "token-only", "latin-1", "empty-bearer", "x-api-key", "admin",
              "node-key", "node-wrong"]
QUERY_ODD_ALSO = ["", "\ud800", "x" * 3000, Raw(b"%FF"), Raw(b"%00")]


def sweep(rule: str, method: str, targets: Targets, route: Route | None = None) -> list[Req]:
    """A fixed table of requests for one (rule, method): each curated odd value in each
    slot, everything else valid (real ids, a minimal body, the admin token). A failure
    here is already minimal: one odd thing."""
    route = route or CATALOGUE[rule]
    gen = strategies_for(targets)
    base_auth = route.base_auth
    doc = {name.lstrip("!"): BODY_DEFAULTS[kind] for name, kind in route.body.items() if name.startswith("!")}
    has_body = method in BODY_METHODS
    base: dict[str, Any] = dict(method=method, path={n: gen.path_first[k] for n, k in route.params.items()},
                                doc=doc if has_body else None, auth=base_auth)

    def req(**changes: Any) -> Req:
        return make_request(rule, route, targets, **{**base, **changes})

    out = [req(method=m) for m in ("OPTIONS", "HEAD" if method == "GET" else "PUT", "DELETE")]
    for name, kind in route.params.items():
        out += [req(path={**base["path"], name: value}) for value in PATH_ODD[kind]]
    for key, kind in route.query.items():
        ok, odd = gen.query_values[kind]
        out += [req(query=[(key, value)]) for value in [*odd, *QUERY_ODD_ALSO]]
        out.append(req(query=[(key, ok[0]), (key, ok[-1])]))  # repeated
    out.append(req(query=[("x", "1"), ("", ""), ("limit", None), (Raw(b"%FF"), Raw(b"%00"))]))
    for name in route.body if has_body else ():
        field_name = name.lstrip("!")
        out += [req(doc={**doc, field_name: value}) for value in SWEEP_FIELD]
    out += [req(doc=doc, form=form, arg=arg) for form, arg in (SWEEP_BODIES if has_body else SWEEP_BODIES[:4])]
    out += [req(auth=kind) for kind in SWEEP_AUTH if kind != base_auth]
    out += [req(headers=[("Host", host)]) for host in SWEEP_HOSTS]
    if route.range_headers:
        out += [req(headers=[("Range", r)]) for r in RANGES_ODD]
        out += [req(headers=[("Range", b"bytes=0-0"), ("If-Range", v)]) for v in (b'"nope"', b"*", b"")]
        out += [req(headers=[("If-None-Match", v)]) for v in (b"*", b'"x", W/"y"', b",,,")]
    return out


# -- the search: hypothesis ---------------------------------------------------------------
#
# Most requests make exactly one slot odd and keep the rest valid, with any value of the
# kind (not only the sweep's); a quarter of them make any slot odd. Shrinking goes to the
# first slot, to the first branch of each one_of and to 0: valid values come first
# everywhere, and the shrunk request is the one odd thing.


@st.composite
def requests(draw: Any, rule: str, method: str, targets: Targets, route: Route | None = None) -> Req:
    """A request aimed at one (rule, method)."""
    route = route or CATALOGUE[rule]
    gen = strategies_for(targets)
    slots = slots_of(route, method)
    pick = draw(st.integers(0, len(slots) + len(slots) // 3))
    chosen = slots[pick] if pick < len(slots) else None  # None: any slot may be odd

    def odd(kind: str, name: str = "") -> bool:
        return (kind, name) == chosen if chosen is not None else draw(st.booleans())

    if odd("method"):
        choice = draw(st.integers(0, 2))
        if choice == 1:
            method = "OPTIONS"
        elif choice == 2 and method == "GET":
            method = "HEAD"
        else:
            method = draw(gen.wrong_methods[method])

    path = {name: draw(gen.path_odd[kind] if odd("path", name) else gen.path_ok[kind])
            for name, kind in route.params.items()}

    query: list[tuple[Any, Any]] = []
    for key, kind in route.query.items():
        if odd("query", key):
            query.append((key, draw(gen.query_odd[kind])))
        elif draw(st.booleans()):
            query.append((key, draw(gen.query_ok[kind])))
    if odd("query", "*"):  # unknown keys, repeated keys, a key without "="
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.one_of(gen.names(route.query), st.sampled_from(OTHER_KEYS))) if route.query \
                else draw(st.sampled_from(OTHER_KEYS))
            query.append((key, draw(gen.other_query) if draw(st.integers(0, 7)) < 7 else None))
        if draw(st.booleans()):
            query = draw(st.permutations(query))

    auth = draw(gen.auth_odd[route.admin]) if odd("auth") else route.base_auth
    key_index = draw(st.integers(0, len(targets.device_keys) - 1))

    doc: Any = None
    form, arg = "json", None
    odd_body = odd("body")
    if method in BODY_METHODS or odd_body:
        doc = {}
        for name, kind in (route.body if method in BODY_METHODS else {}).items():
            field_name = name.lstrip("!")
            if odd("field", field_name):
                doc[field_name] = draw(WEIRD_VALUE)
            elif draw(st.integers(0, 9)) < (9 if name.startswith("!") else 5):
                doc[field_name] = draw(gen.body[kind])
        if odd_body:
            form = draw(st.sampled_from(BODY_FORMS))
            size = len(to_json(doc))
            arg = {
                "truncated": lambda: draw(st.integers(0, max(0, size - 1))),
                "invalid-utf8": lambda: (draw(st.integers(0, size)), draw(st.sampled_from(INVALID_UTF8))),
                "scalar": lambda: draw(WEIRD_VALUE),
                "set-field": lambda: (draw(st.sampled_from(["a", "extra", "", *sorted(doc)])),
                                      draw(st.one_of(st.sampled_from(NESTED), WEIRD_VALUE))),
                "whole": lambda: draw(st.sampled_from(WHOLE_BODIES)),
                "binary": lambda: draw(st.binary(max_size=64)),
                "content-type": lambda: draw(st.sampled_from(ODD_CONTENT_TYPES)),
                "content-encoding": lambda: draw(st.sampled_from([b"gzip", b"deflate", b"br", b"identity, gzip"])),
            }.get(form, lambda: None)()

    headers: list[tuple[str, bytes]] = []
    if odd("headers"):
        which = draw(st.integers(0, 3))
        if which == 0 or not route.range_headers:
            headers.append(("Host", draw(st.sampled_from(HOSTS))))
        elif which == 1:
            headers.append(("Range", draw(st.sampled_from(RANGES_ODD))))
        elif which == 2:
            headers += [("Range", draw(st.sampled_from(RANGES_OK))),
                        ("If-Range", draw(st.sampled_from([b'"nope"', b"*", b'W/"x"', b""])))]
        else:
            headers.append(("If-None-Match", draw(st.sampled_from([b"*", b'"x", W/"y"', b",,,", b'"' * 3]))))
    elif route.range_headers and draw(st.booleans()):
        headers.append(("Range", draw(st.sampled_from(RANGES_OK))))
    return make_request(rule, route, targets, method=method, path=path, query=query, doc=doc, form=form, arg=arg,
                        auth=auth, key_index=key_index, headers=headers)


def any_request(app: Any, targets: Targets) -> st.SearchStrategy[Req]:
    """A request for any (rule, method) of the app, each pair equally likely."""
    return st.sampled_from(route_pairs(app)).flatmap(lambda pair: requests(pair[0], pair[1], targets))


# -- sending --------------------------------------------------------------------------------


class LogTap(logging.Handler):
    """The gateway's error log lines (with their exceptions) since the last `take()`."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self._records: list[logging.LogRecord] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self._records.append(record)

    def take(self) -> list[logging.LogRecord]:
        with self._guard:
            records, self._records = self._records, []
        return records

    def __enter__(self) -> "LogTap":
        logging.getLogger("gatewayd").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("gatewayd").removeHandler(self)


@dataclass
class Outcome:
    status: int | None
    headers: httpx.Headers | None
    body: bytes
    error: Exception | None
    server_errors: list[logging.LogRecord]


class HarnessError(Exception):
    """The harness made a request it cannot send: a bug in the generators, not in the gateway."""


class Sender:
    """Sends `Req`s to the gateway's main listener, one new connection per request.

    Requests to routes rate limited per client address (`Req.spread`) go out from
    127.0.0.2-254 in turn: the limit is real, but an example that fails must fail again
    when hypothesis replays it, whatever the bucket of one address holds by then.

    While a request is answered the process has the recursion limit it had when the
    Sender was made (make it outside hypothesis): hypothesis raises the limit by 2,000
    while it runs a test, for the whole process, and the gateway runs in this process,
    so JSON nested 1,000 deep would not overflow there as it does in production.
    """

    def __init__(self, gw: Any, tap: LogTap, timeout: float = 15.0):
        self.base = gw_url(gw)
        self.tap = tap
        self.timeout = timeout
        self.recursion_limit = sys.getrecursionlimit()
        self._clients: dict[str | None, httpx.Client] = {}
        self.sent = 0
        self._next_source = 0

    def _client(self, source: str | None) -> httpx.Client:
        if source not in self._clients:
            transport = httpx.HTTPTransport(local_address=source, verify=False,
                                            limits=httpx.Limits(max_keepalive_connections=0))
            self._clients[source] = httpx.Client(base_url=self.base, transport=transport, timeout=self.timeout,
                                                 headers={"User-Agent": "gatewayd-fuzz"})
        return self._clients[source]

    def send(self, req: Req) -> Outcome:
        source = None
        if req.spread:
            self._next_source = self._next_source % 253 + 1
            source = f"127.0.0.{self._next_source + 1}"
        self.tap.take()  # what was logged before this request is not its doing
        self.sent += 1
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(self.recursion_limit)
        try:
            with self._client(source).stream(req.method, "/", headers=list(req.headers), content=req.body,
                                             extensions={"target": req.target}) as r:
                # A live stream never ends: its answer is its status and headers.
                live = r.headers.get("content-type", "").startswith("text/event-stream")
                body = b"" if live else r.read()
        except (httpx.LocalProtocolError, UnicodeError) as e:
            raise HarnessError(f"cannot send {req!r}: {e}") from e
        except httpx.TransportError as e:  # no answer: reset, closed, timed out
            return Outcome(None, None, b"", e, self.tap.take())
        finally:
            sys.setrecursionlimit(limit)
        return Outcome(r.status_code, r.headers, body, None, self.tap.take())

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


# -- judging ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    kind: str      # "500", "no answer", "non-standard JSON", "invalid JSON", "not JSON", "error shape", "no token"
    cause: str     # what the gateway's log or the answer says; part of the key
    detail: str = ""
    shared: bool = False
    """Raised before any route's code ran (no frame of this repository on the stack): the
    same defect whichever route the request was for."""

    def key(self, req: Req) -> tuple[str, str, str]:
        return "*" if self.shared else f"{req.method} {req.rule}", self.kind, self.cause


class NonStandardJSON(ValueError):
    pass


def _refuse_constant(token: str) -> Any:
    raise NonStandardJSON(token)


def strict_json(body: bytes) -> Any:
    """Parse as a strict parser would: UTF-8, no NaN / Infinity."""
    return json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _ours(frame: traceback.FrameSummary) -> bool:
    return frame.filename.startswith(str(ROOT)) and "/.venv/" not in frame.filename


def _place(frame: traceback.FrameSummary, ours: bool) -> str:
    path = Path(frame.filename)
    shown = path.relative_to(ROOT) if ours else Path(*path.parts[-2:])
    return f"{shown}:{frame.lineno} in {frame.name}"


def server_cause(records: list[logging.LogRecord]) -> tuple[str, str, bool] | None:
    """From the gateway's error log: the exception (and the one it wraps, e.g. a
    StorageError from an OverflowError), where it was raised (the innermost frame of this
    repository, the root cause's first) and the route code it came through (the outermost
    one); its message; and whether no code of this repository was on the stack at all
    (then it was raised before any route ran, and is the same whichever route)."""
    for record in records:
        if not record.exc_info or record.exc_info[1] is None:
            continue
        outer = _leaf(record.exc_info[1])
        chain = [outer]
        while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
            chain.append(_leaf(inner))
        root = chain[-1]
        name = type(outer).__name__ + (f"({type(root).__name__})" if type(root) is not type(outer) else "")
        message = f"{type(root).__name__}: {str(root)[:200]}"
        route_frames = [f for f in traceback.extract_tb(outer.__traceback__) if _ours(f)]
        for exc in reversed(chain):  # the root cause's own frames first
            ours = [f for f in traceback.extract_tb(exc.__traceback__) if _ours(f)]
            if ours:
                via = route_frames[0] if route_frames else ours[0]
                cause = f"{name} at {_place(ours[-1], True)}"
                if via != ours[-1]:
                    cause += f" (via {_place(via, True)})"
                return cause, message, False
        frames = traceback.extract_tb(outer.__traceback__)
        return f"{name}" + (f" at {_place(frames[-1], False)}" if frames else ""), message, True
    for record in records:
        return record.getMessage()[:120], "", True
    return None


def judge(route: Route, req: Req, out: Outcome) -> Problem | None:
    """What is wrong with this answer to `req`, or None."""
    if out.error is not None:
        return Problem("no answer", type(out.error).__name__, str(out.error))
    status, headers, body = out.status, out.headers, out.body
    assert status is not None and headers is not None
    if status >= 500:
        found = server_cause(out.server_errors)
        if found:
            return Problem(str(status), found[0], found[1], shared=found[2])
        try:
            message = strict_json(body)["error"]["message"]
        except Exception:  # noqa: BLE001 - whatever it is, it is the cause we show
            message = body[:120].decode("utf-8", "replace")
        return Problem(str(status), message)
    if route.admin and not is_admin(req.auth) and req.method != "OPTIONS" and 200 <= status < 300:
        return Problem("no token", f"{status} without the admin token")
    if req.method == "HEAD" or status in (204, 304) or not body:
        return None
    content_type = headers.get("content-type", "")
    mimetype = content_type.split(";")[0].strip().lower()
    is_json = mimetype == "application/json" or mimetype.endswith("+json")
    doc: Any = None
    if is_json:
        try:
            doc = strict_json(body)
        except NonStandardJSON as e:
            return Problem("non-standard JSON", str(e), _around(body, str(e)))
        except UnicodeDecodeError as e:
            return Problem("invalid JSON", "not UTF-8", str(e))
        except ValueError as e:
            return Problem("invalid JSON", "syntax", f"{e}: {body[:200]!r}")
    elif route.html and mimetype == "text/html":
        return None  # a page, or the page telling what went wrong
    elif status >= 400 or (200 <= status < 300 and route.json and not route.binary_ok):
        # (3xx: werkzeug's own redirects for // in a path are HTML; not an answer of ours)
        return Problem("not JSON", f"{status} {mimetype or 'no content type'}", repr(body[:200]))
    if status >= 400 and route.light and isinstance(doc, dict) and doc.get("status") == "error":
        if not (isinstance(doc.get("code"), str) and isinstance(doc.get("message"), str)
                and type(doc.get("retry_after_seconds")) is int):
            return Problem("error shape", str(status), repr(body[:200]))
        return None
    if status >= 400:
        if route.detail_errors and isinstance(doc, dict) and list(doc) == ["detail"] and isinstance(doc["detail"], str):
            return None
        error = doc.get("error") if isinstance(doc, dict) else None
        if not (isinstance(error, dict) and error.get("status") == status and isinstance(error.get("code"), str)
                and isinstance(error.get("message"), str)):
            return Problem("error shape", str(status), repr(body[:200]))
    return None


def _around(body: bytes, token: str) -> str:
    at = body.find(token.encode())
    return repr(body[max(0, at - 60):at + 60]) if at >= 0 else repr(body[:120])


def describe(rule: str, req: Req, problem: Problem, base_url: str, count: int = 1) -> str:
    """A finding as the report shows it: what, where, why, and how to make it again."""
    times = f" (x{count})" if count > 1 else ""
    where = f"{req.method} {rule}" + (" (any route: raised before a route runs)" if problem.shared else "")
    head = f"[{problem.kind}] {where}{times}: {problem.cause}"
    detail = f"\n    {problem.detail}" if problem.detail and problem.detail != problem.cause else ""
    return f"{head}{detail}\n{req.show(base_url)}"


def size(req: Req) -> int:
    """How big a reproduction is: the smallest of a kind is the one to show."""
    return len(req.target) + len(req.body) + sum(len(v) for _, v in req.headers)
