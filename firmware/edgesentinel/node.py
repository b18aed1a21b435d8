"""EdgeSentinel reference node: what a door sensor node does, against the gateway as
against its cloud (only the base URL changes).

    python firmware/edgesentinel/node.py --base http://127.0.0.1:8080/edgesentinel \
        --id es-1 --key KEY --state-dir /var/lib/es [--sample 3000] [--until-drained]

- Samples: synthetic door cycles (cycle_open / cycle_close with durations) and
  vibration RMS points, appended to buffer files of `--file-records` records each
  (`buffer-000001.jsonl`, ...): the node's offline buffer. `--event TYPE[:SEVERITY]`
  buffers a system event it detected (`tamper_detected:critical`), sent the same way.
- Uploads zstd batches of at most `--batch` records with `X-Device-Id`, `X-Auth-Key`,
  `Idempotency-Key` and `Content-SHA256`. The key and `batch_id` are derived from the
  file and the record offset, so a batch sent again after a crash is the same batch:
  the gateway answers it from its ledger or counts its records as duplicates.
- A batch is the same bytes each time it is sent (`sending.json` keeps its record
  count and `retry_count` until it is acknowledged): its key with another body would be
  a 409 for ever. `diagnostics.retry_count` is the failures before the previous batch
  got through (the gateway hears of an outage once it is over).
- Resumes at the last acknowledged position: `cursor.json` holds, per file, the
  offset of the first record not yet acknowledged, written (atomically) only after a
  200. Newest data first: the newest file with unsent records goes first, then the
  older ones (backfill).
- Backs off exponentially from 1 s to 300 s with +-25 % jitter after a failure and
  honours `next_hint: "backoff_ms: N"` in any answer.
- Circuit breaker (`Breaker`): closed -> open after `--breaker` consecutive failures of
  the gateway (no answer, or a 5xx: maintenance, a failing database) -> after
  `--breaker-cooldown-s` (doubling per failed probe up to 300 s, +-25 %, at least the
  hint) half-open: one probe, a handshake (no body, nothing to store) -> closed on a
  200 and uploads resume; open again otherwise. While open no batch is sent. A 429 or
  a 4xx is a working gateway's answer: backoff and hint, not the breaker.

- TLS: `--cafile ca.crt` pins the site CA (`gatewayd tls init`) for an https:// base;
  `--cert node.crt --cert-key node.key` adds the client certificate of the mutual-TLS
  tier (`tls.client_auth`, issued by `gatewayd tls client <id>`).

Printed lines (`uploaded`, `refused`, `waiting`, `breaker: open|half-open|closed`) are
what the tests read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import zstandard

API = "/api/iot/v1"
T_BASE = 1_767_225_600.0


class Node:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.o = opts
        self.dir = Path(opts.state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cursor: dict[str, int] = json.loads((self.dir / "cursor.json").read_text()) \
            if (self.dir / "cursor.json").exists() else {}
        self.failures = 0  # consecutive failed uploads of any kind
        self.retries = 0  # failures before the last acknowledged batch: the next new batch's retry_count
        self.backoff_s = 0.0
        self.rng = random.Random(opts.seed)
        self.breaker = Breaker(opts.breaker, opts.breaker_cooldown_s, opts.max_wait_s, self.rng)
        self.zstd = zstandard.ZstdCompressor(level=3)
        self.sent_batches = 0

    # -- the buffer ---------------------------------------------------------------------

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("buffer-*.jsonl"))

    def sample(self, n: int) -> None:
        """n synthetic records, appended to the buffer (a new file every file_records)."""
        seq = sum(len(f.read_text().splitlines()) for f in self.files())
        for i in range(seq, seq + n):
            ts = T_BASE + i * 0.5
            if i % 10 == 0:
                record = {"kind": "door_events", "ts": ts, "door_id": "dock-1",
                          "type": "cycle_open" if i % 20 == 0 else "cycle_close", "duration_ms": 1800 + i % 400}
            else:
                record = {"kind": "points", "ts": ts, "metric": "vibration_rms_g",
                          "value": round(0.3 + 0.1 * math.sin(i / 7), 4), "unit": "g", "meta": {"seq": i}}
            self.buffer(i, record)

    def buffer(self, seq: int, record: dict[str, object]) -> None:
        path = self.dir / f"buffer-{seq // self.o.file_records:06d}.jsonl"
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def report(self, spec: str) -> None:
        """A system event (`type[:severity]`) the node detected, buffered like any record."""
        event_type, _, severity = spec.partition(":")
        seq = sum(len(f.read_text().splitlines()) for f in self.files())
        self.buffer(seq, {"kind": "system_events", "ts": round(time.time(), 3), "event_type": event_type,
                          "severity": severity or "warning", "description": f"reported by {self.o.id}",
                          "resolved": False})

    def pending(self) -> list[tuple[Path, int, list[str]]]:
        """(file, acknowledged offset, its lines) of every file with unsent records, newest first."""
        out = []
        for path in self.files():
            lines = path.read_text().splitlines()
            done = self.cursor.get(path.name, 0)
            if done < len(lines):
                out.append((path, done, lines))
        return out[::-1]  # newest first, then the backlog

    def sending(self, name: str, start: int, n: int) -> dict[str, int]:
        """The batch at (file, offset) as first sent: its record count and retry_count,
        kept in `sending.json` (atomically, before the first sending) until acknowledged."""
        state = self.dir / "sending.json"
        if state.exists():
            kept = json.loads(state.read_text())
            if (kept["name"], kept["start"]) == (name, start):
                return {"n": kept["n"], "retry_count": kept["retry_count"]}
        kept = {"name": name, "start": start, "n": n, "retry_count": self.retries}
        tmp = self.dir / "sending.json.tmp"
        tmp.write_text(json.dumps(kept))
        os.replace(tmp, state)
        return {"n": n, "retry_count": self.retries}

    def acknowledge(self, path: Path, offset: int) -> None:
        self.cursor[path.name] = offset
        tmp = self.dir / "cursor.json.tmp"
        tmp.write_text(json.dumps(self.cursor))
        os.replace(tmp, self.dir / "cursor.json")

    # -- one upload ------------------------------------------------------------------------

    def upload_one(self) -> bool | None:
        """Send the next batch; True if acknowledged, False if refused or failed, None if nothing to send."""
        queue = self.pending()
        if not queue:
            return None
        path, start, lines = queue[0]
        # A batch sent again (after a failure or a crash) is byte for byte the one sent
        # first: same records, same diagnostics. Its Idempotency-Key is that of the first
        # sending; another body under it is a 409 for ever (the gateway may have committed
        # the first and lost only its answer).
        sending = self.sending(path.name, start, min(self.o.batch, len(lines) - start))
        chunk = [json.loads(line) for line in lines[start:start + sending["n"]]]
        doc: dict[str, object] = {"batch_id": f"{self.o.id}:{path.stem}:{start}",
                                  "diagnostics": {"retry_count": sending["retry_count"]}}
        for record in chunk:
            kind = record.pop("kind")
            doc.setdefault(kind, []).append(record)  # type: ignore[union-attr]
        body = self.zstd.compress(json.dumps(doc).encode())
        key = idempotency_key(f"{self.o.id}:{path.name}:{start}:{len(chunk)}")
        headers = {"X-Device-Id": self.o.id, "X-Auth-Key": self.o.key, "Idempotency-Key": key,
                   "Content-SHA256": hashlib.sha256(body).hexdigest(), "Content-Encoding": "zstd",
                   "Content-Type": "application/json"}
        status, answer = post(self.o.base + API + "/telemetry/batch", body, headers)
        self.sent_batches += 1
        if self.o.crash_after and self.sent_batches >= self.o.crash_after:
            print(f"crash: after sending batch {self.sent_batches}, before saving the cursor", flush=True)
            os._exit(3)  # the worst moment: the gateway has it, the node does not know
        hint = hint_ms(answer)
        if status == 200:
            self.acknowledge(path, start + len(chunk))
            (self.dir / "sending.json").unlink(missing_ok=True)
            self.retries = self.failures  # the next batch tells the gateway (server_unreachable)
            self.failures = 0
            self.breaker.answered()
            self.backoff_s = (hint or 0) / 1000
            print(f"uploaded {path.name}@{start}+{len(chunk)}: accepted {answer.get('accepted')} duplicates "
                  f"{answer.get('duplicates')} rejected {answer.get('rejected')}"
                  + (f" next_hint {hint} ms" if hint else ""), flush=True)
            return True
        self.failures += 1
        base = min(300.0, 1.0 * 2 ** (self.failures - 1))
        self.backoff_s = max(base * self.rng.uniform(0.75, 1.25), (hint or 0) / 1000)
        print(f"refused {status} {error_code(answer)} (failure {self.failures})"
              + (f" next_hint {hint} ms" if hint else ""), flush=True)
        if gateway_failed(status) and self.breaker.failed(hint):
            self.backoff_s = 0.0  # the breaker's cool-down is the wait now
            print(f"breaker: open after {self.breaker.failures} failures; half-open in "
                  f"{self.breaker.wait_s():.1f} s", flush=True)
        elif not gateway_failed(status):
            self.breaker.answered()
        return False

    def probe(self) -> None:
        """Half-open: one handshake (no body). 200 closes the breaker; anything else opens it again."""
        print("breaker: half-open, probing with a handshake", flush=True)
        status, answer = post(self.o.base + API + "/auth/handshake", b"",
                              {"X-Device-Id": self.o.id, "X-Auth-Key": self.o.key})
        if status == 200:
            self.breaker.answered()
            print("breaker: closed (the probe was answered)", flush=True)
            return
        self.breaker.failed(hint_ms(answer))
        print(f"breaker: open again (probe: {status} {error_code(answer)}); half-open in "
              f"{self.breaker.wait_s():.1f} s", flush=True)

    def run(self) -> int:
        if self.o.sample:
            self.sample(self.o.sample)
        for spec in self.o.event:
            self.report(spec)
        deadline = time.monotonic() + self.o.max_s
        while time.monotonic() < deadline:
            if self.breaker.is_open:
                if (wait := self.breaker.wait_s()) > 0:
                    print(f"waiting {wait * 1000:.0f} ms", flush=True)
                    time.sleep(wait)
                self.probe()
                continue
            if self.backoff_s > 0:
                print(f"waiting {self.backoff_s * 1000:.0f} ms", flush=True)
                time.sleep(min(self.backoff_s, self.o.max_wait_s))
                self.backoff_s = 0.0
            done = self.upload_one()
            if done is None:
                print("drained", flush=True)
                return 0
        print("gave up: time is out", flush=True)
        return 1


class Breaker:
    """The node's circuit breaker over the gateway: closed, open, half-open (the module's docstring)."""

    def __init__(self, threshold: int, cooldown_s: float, max_wait_s: float, rng: random.Random) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.max_wait_s = max_wait_s
        self.rng = rng
        self.failures = 0  # consecutive failures of the gateway
        self.opened = 0  # times opened since last closed: the cool-down doubles
        self.until: float | None = None  # open until then (monotonic); None: closed

    @property
    def is_open(self) -> bool:
        """Open or due to half-open: the next request is a probe, not a batch."""
        return self.until is not None

    def wait_s(self) -> float:
        return max(0.0, self.until - time.monotonic()) if self.until is not None else 0.0

    def failed(self, hint: int | None) -> bool:
        """One more failure (of a batch, or of the probe); True if the breaker is open now."""
        self.failures += 1
        if self.until is None and self.failures < self.threshold:
            return False
        self.opened += 1
        cooldown = min(300.0, self.cooldown_s * 2 ** (self.opened - 1)) * self.rng.uniform(0.75, 1.25)
        # Tests shorten every wait with --max-wait-s; the hint (maintenance's Retry-After) still counts.
        self.until = time.monotonic() + min(max(cooldown, (hint or 0) / 1000), self.max_wait_s)
        return True

    def answered(self) -> None:
        """The gateway answered (a 200, or a 4xx such as 429): closed, the count starts again."""
        self.failures = self.opened = 0
        self.until = None


def gateway_failed(status: int) -> bool:
    """No answer (refused, reset, timed out) or a server error: what the breaker counts."""
    return status == 0 or status >= 500


def error_code(answer: object) -> str:
    error = answer.get("error") if isinstance(answer, dict) else None
    return str(error.get("code", "")) if isinstance(error, dict) else ""


def idempotency_key(seed: str) -> str:
    """A UUIDv4-shaped key derived from the batch's place in the buffer: the same batch, the same key."""
    h = bytearray(hashlib.sha256(seed.encode()).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x40
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def hint_ms(answer: object) -> int | None:
    hint = answer.get("next_hint") if isinstance(answer, dict) else None
    if isinstance(hint, str) and hint.startswith("backoff_ms:"):
        try:
            return int(hint.split(":", 1)[1])
        except ValueError:
            return None
    return None


#: The site CA pinned (`--cafile`) and the client certificate (`--cert`), for https.
TLS: ssl.SSLContext | None = None


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30, context=TLS) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}
    except (urllib.error.URLError, OSError) as e:
        return 0, {"error": {"code": f"network: {e}"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="http://<gateway>:8080/edgesentinel")
    p.add_argument("--id", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--sample", type=int, default=0, help="records to sample before uploading")
    p.add_argument("--file-records", type=int, default=1000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--breaker", type=int, default=5, help="consecutive failures that open the breaker")
    p.add_argument("--breaker-cooldown-s", type=float, default=30.0,
                   help="open this long before the half-open probe (doubles per failed probe, to 300 s)")
    p.add_argument("--max-s", type=float, default=120.0, help="give up after this long")
    p.add_argument("--max-wait-s", type=float, default=300.0, help="cap on one wait (tests shorten it)")
    p.add_argument("--event", action="append", default=[], metavar="TYPE[:SEVERITY]",
                   help="report this system event (tamper_detected:critical); repeatable")
    p.add_argument("--crash-after", type=int, default=0, help="exit hard after sending this many batches")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cafile", default=None, help="the site CA to pin (https only, this CA only)")
    p.add_argument("--cert", default=None, help="the node's client certificate (mutual TLS)")
    p.add_argument("--cert-key", default=None, help="its private key")
    opts = p.parse_args(argv)
    global TLS
    if opts.cafile:
        TLS = ssl.create_default_context(cafile=opts.cafile)
        if opts.cert:
            TLS.load_cert_chain(opts.cert, opts.cert_key)
    return Node(opts).run()


if __name__ == "__main__":
    sys.exit(main())
