"""edgesentinel's device API under the plugin's mount (`/edgesentinel/api/iot/v1/...`),
declared once (request, answers, auth: validated and published as OpenAPI), one
method per route. README.md has the table, the headers and every decision.

Every refusal has the family's shape, `{"error": {"status", "code", "message"},
"next_hint": "backoff_ms: N" | null}`: the firmware reads `next_hint` from any answer.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlencode

from msgspec import Meta, Struct
from quart import Blueprint, Response, jsonify, request

from gatewayd.plugins.api import (
    CHANNELS,
    REPORT_STATUSES,
    AuthError,
    AuthScheme,
    BadJSON,
    ClaimError,
    Device,
    DeviceExists,
    DeviceAuth,
    EncodingError,
    ErrorDetail,
    PluginContext,
    Routes,
    StorageError,
    StorageFull,
    parse_time,
    read_body,
    waiting_elsewhere_for,
)

from . import explorer, profiles
from .batch import BatchError, content_sha256, encoding_of, idempotency_key, refused_encoding
from .pressure import over_budget
from .profiles import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from .state import url_key

if TYPE_CHECKING:
    from .config import EdgesentinelConfig
    from .state import Sentinel

API = "/api/iot/v1"
VERSION = Annotated[str, Meta(pattern=r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.+-]*)?$", max_length=64,
                              description="semantic version, 1.2.3")]


class Refusal(Struct):
    """The family's error shape: the gateway's `error` plus the spec's `next_hint`."""

    error: ErrorDetail
    next_hint: str | None = None


class Handshake(Struct):
    nonce: str
    nonce_ttl_s: float
    server_time: float
    server_time_iso: str
    max_skew_s: float
    signature_required: bool


class BatchAnswer(Struct):
    """`accepted` records stored now, `duplicates` already stored (or repeated in the
    batch) and not stored again, `rejected` invalid records (listed in `rejections`,
    the first 100), `next_hint` the backoff the node should apply before its next upload."""

    accepted: int
    duplicates: int
    rejected: int
    next_hint: str | None
    batch_id: str
    rejections: list[dict[str, Any]]


class OtaQuery(Struct, forbid_unknown_fields=True):
    current: Annotated[VERSION | None, Meta(description="the version the node runs")] = None
    channel: Annotated[str, Meta(pattern="^(" + "|".join(CHANNELS) + ")$")] = "stable"
    model: Annotated[str, Meta(max_length=128, description="default: the device's registered model")] = ""


class OtaCheck(Struct):
    update_available: bool
    version: str | None = None
    url: str | None = None
    url_expires_at: float | None = None
    sha256: str | None = None
    size: int | None = None
    signature: str | None = None


class OtaReport(Struct, forbid_unknown_fields=True):
    status: Annotated[str, Meta(pattern="^(" + "|".join(REPORT_STATUSES) + ")$")]
    version: VERSION | None = None
    detail: Annotated[str, Meta(max_length=1024)] = ""


class Recorded(Struct):
    recorded: bool


class Claim(Struct, forbid_unknown_fields=True):
    """What the claim QR holds: the device id and its one-time code (the bootstrap token)."""

    device_id: Annotated[str, Meta(min_length=1, max_length=128)]
    code: Annotated[str, Meta(min_length=1, max_length=64, description="ABCD-EFGH-JKLM")]


class Claimed(Struct):
    device_id: str
    status: str
    key: Annotated[str | None, Meta(description="a new device's key (a code made without a device), once")] = None


class FirmwareQuery(Struct, forbid_unknown_fields=True):
    device: Annotated[str, Meta(max_length=128)]
    expires: Annotated[int, Meta(ge=0, le=2**40)]
    sig: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]


DEVICE = DeviceAuth.device_key()
SIGNED = AuthScheme({**DEVICE.security_schemes,
                     "signature": {"type": "apiKey", "in": "header", "name": SIGNATURE_HEADER,
                                   "description": "hex HMAC-SHA256 of the body as sent (with X-Timestamp: of "
                                                  "`<timestamp>.<body>`), optional unless configured"}},
                    {**DEVICE.refusals, 401: "unknown device, wrong key, or a bad or missing signature"})
BATCH_ERRORS = {400: "a missing or bad header, a body that is corrupt, truncated, too large once inflated "
                     "(max_decompressed_bytes), not JSON, not a batch, or whose Content-SHA256 does not match",
                409: "this Idempotency-Key was used for another body",
                415: "a Content-Encoding other than gzip or zstd",
                429: "the gateway is under pressure: retry after next_hint's backoff_ms",
                503: "maintenance mode (next_hint says when to come back), or the database failed",
                507: "the disk is full: nothing was stored"}


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str, hint: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.hint, self.headers = status, code, message, hint, headers or {}


def refusal(status: int, code: str, message: str, hint: str | None = None, **headers: str) -> Response:
    response = jsonify({"error": {"status": status, "code": code, "message": message}, "next_hint": hint})
    response.status_code = status
    response.headers.update(headers)
    return response


class DeviceRoutes:
    """The routes of one plugin; `blueprint()` mounts them."""

    def __init__(self, ctx: PluginContext[EdgesentinelConfig, Sentinel]) -> None:
        self.ctx = ctx
        self._url_key = url_key(ctx.data_dir)  # signs firmware URLs; kept, so a restart does not void them
        ctx.ratelimit.define("claim", 10, 60)  # per client address: claim codes are not for guessing

    def blueprint(self) -> Blueprint:
        bp = Blueprint(self.ctx.name, __name__)
        routes = Routes(bp, error=Refusal, tag=self.ctx.name, auth=DEVICE)
        routes.post(f"{API}/auth/handshake", responses={200: Handshake}, errors={503: "maintenance mode"})(
            self.handshake)
        routes.post(f"{API}/telemetry/batch", auth=SIGNED, responses={200: BatchAnswer}, errors=BATCH_ERRORS)(
            self.telemetry_batch)
        routes.get(f"{API}/config", responses={200: dict[str, Any], 304: None}, errors={503: "maintenance mode"})(
            self.config)
        routes.get(f"{API}/ota/check", query=OtaQuery, responses={200: OtaCheck},
                   errors={503: "maintenance mode"})(self.ota_check)
        routes.post(f"{API}/ota/report", body=OtaReport, responses={200: Recorded},
                    errors={503: "maintenance mode, or the database failed", 507: "the disk is full"})(
            self.ota_report)
        routes.post("/claim", auth=None, body=Claim, responses={200: Claimed, 201: Claimed},
                    errors={403: "the code is wrong, expired, used, or another device's", 409: "the id is taken",
                            429: "too many claim attempts from this address", 503: "the database failed",
                            507: "the disk is full"})(self.claim)
        routes.get("/ota/<int:firmware_id>/firmware.bin", auth=None, query=FirmwareQuery,
                   responses={200: None, 206: None, 304: None},
                   errors={403: "the URL's signature is wrong or it has expired", 404: "no such firmware"})(
            self.firmware)
        explorer.add_routes(self.ctx, bp)  # the site's data: explorer, CSV export, door histograms (admin)
        bp.register_error_handler(Refused, self.refused)
        bp.register_error_handler(BatchError, self.batch_refused)
        bp.register_error_handler(AuthError, self.auth_refused)
        bp.register_error_handler(BadJSON, self.bad_json)  # strict JSON and the declarations alike
        bp.register_error_handler(StorageFull, self.storage_full)
        bp.register_error_handler(StorageError, self.storage_error)
        return bp

    # -- the routes ------------------------------------------------------------------------

    async def handshake(self) -> Handshake:
        """A nonce for the next signed request, and the gateway's time.

        The node compares `server_time` with its clock: beyond ±`max_skew_s` it asks for
        re-stamping (`restamp` in its batches). A signed request may carry the nonce in
        `X-Nonce` (signed as `<timestamp>.<nonce>.<body>`): accepted once, within
        `nonce_ttl_s`."""
        device = await self._device()
        now = self.ctx.now()
        config = self.ctx.config
        return Handshake(self.ctx.state.issue_nonce(device.id), config.nonce_ttl_s, now,
                         time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
                         config.max_skew_s, profiles.signature_required(config, device.id))

    async def telemetry_batch(self) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Upload a batch of records (gzip or zstd JSON: README.md, "The batch").

        Headers: `X-Device-Id`, `X-Auth-Key`, `Idempotency-Key` (a UUIDv4 per batch),
        `Content-SHA256` (hex SHA-256 of the body as sent), `Content-Encoding`. A repeated
        key answers what it answered first and stores nothing; 200 once committed."""
        state, config = self.ctx.state, self.ctx.config
        device = await self._device()
        key = idempotency_key(request.headers.get("Idempotency-Key"))
        body = await read_body()  # as sent: the hash and the signature are of these bytes
        # The body as sent is in the budget too, from now until answered: bodies of one
        # node queued on its lock (or of many nodes) were held uncounted.
        tight = over_budget(state.inflight_bytes, len(body), config.backpressure)
        state.inflight_bytes += len(body)
        try:
            stamp = await self._signature(device, body)
            checksum = content_sha256(request.headers.get("Content-SHA256"), body)
            if stamp is not None and not state.first_signed(device.id, stamp[0], checksum, key, stamp[1]):
                raise AuthError(401, f"replayed request: this signed body and {TIMESTAMP_HEADER} came under another "
                                     "Idempotency-Key (a retry sends the same key)", device.id)
            if tight is not None:
                # Over the memory budget: a batch already answered still gets its answer
                # (one indexed read, no lock, nothing inflated); only new work waits. A
                # first sending of this key still being stored finds nothing: 429.
                answer = await state.replay(device, key, checksum)
                if answer is None:
                    state.batches.inc(outcome="backpressure")
                    raise Refused(429, "backpressure", f"{tight.reason}: retry later", tight.hint,
                                  {"Retry-After": str(math.ceil((tight.backoff_ms or 1000) / 1000))})
                state.batches.inc(outcome="replayed")
                return answer.doc, answer.status, {"Idempotency-Replayed": "true"}
            encoding = encoding_of(request.headers.get("Content-Encoding"), body)
            async with waiting_elsewhere_for(state.lock(device.id)):  # the storage under it
                answer = await state.replay(device, key, checksum)
                if answer is None:
                    verdict = state.verdict()
                    if verdict.level == "reject":
                        state.batches.inc(outcome="backpressure")
                        raise Refused(429, "backpressure", f"{verdict.reason}: retry later", verdict.hint,
                                      {"Retry-After": str(math.ceil((verdict.backoff_ms or 1000) / 1000))})
                    state.inflight += 1
                    try:
                        try:
                            inflated = await read_body(max_inflated=config.max_decompressed_bytes)
                        except EncodingError as e:
                            raise refused_encoding(e, encoding, config.max_decompressed_bytes) from None
                        if (tight := over_budget(state.inflight_bytes - len(body), len(inflated),
                                                   config.backpressure)) is not None:
                            state.batches.inc(outcome="backpressure")
                            raise Refused(429, "backpressure", f"{tight.reason}: retry later", tight.hint,
                                          {"Retry-After": str(math.ceil((tight.backoff_ms or 1000) / 1000))})
                        state.inflight_bytes += len(inflated)
                        try:
                            answer = await state.take(device, key, checksum, inflated, verdict)
                        finally:
                            state.inflight_bytes -= len(inflated)
                    finally:
                        state.inflight -= 1
                else:
                    state.batches.inc(outcome="replayed")
        finally:
            state.inflight_bytes -= len(body)
        return answer.doc, answer.status, {"Idempotency-Replayed": "true" if answer.replayed else "false"}

    async def config(self) -> Any:
        """The node's configuration profile (ETag; `If-None-Match` answers 304).

        Under sustained backpressure the sampling rates are lowered (`backpressure`)."""
        device = await self._device()
        state = self.ctx.state
        now = self.ctx.now()
        state.verdict()  # the pressure now, so a node that only polls /config sees it too
        factor = state.degrade.factor(now)
        doc = profiles.effective(self.ctx.config, device.id, device.model, self.ctx.http.url(self.ctx.mount),
                                 factor, state.degrade.reason if factor < 1 else "")
        tag = profiles.etag(doc)
        if profiles.matches(request.headers.get("If-None-Match"), tag):
            return "", 304, {"ETag": tag}
        return doc, 200, {"ETag": tag, "Cache-Control": "no-cache"}

    async def ota_check(self, query: OtaQuery) -> OtaCheck:
        """The newest firmware for this node, with a signed download URL that expires."""
        device = await self._device()
        try:
            fw = await self.ctx.ota.newest_for(query.model or device.model or "default", query.current,
                                               query.channel, device.id)
        except ValueError as e:
            raise BadJSON(f"current: {e}") from None
        if fw is None:
            return OtaCheck(False)
        expires = int(self.ctx.now() + self.ctx.config.url_ttl_s)
        params = {"device": device.id, "expires": expires, "sig": self._url_sig(fw.id, device.id, expires)}
        url = self.ctx.ota.url(f"{self.ctx.mount}/ota/{fw.id}/firmware.bin?{urlencode(params)}")
        return OtaCheck(True, fw.version, url, float(expires), fw.sha256, fw.size, fw.signature)

    async def ota_report(self, body: OtaReport) -> Recorded:
        """The node's OTA progress (downloading, installed, failed, ...): an event its rules see."""
        device = await self._device()
        await self.ctx.ota.report(device.id, body.status, version=body.version, detail=body.detail)
        return Recorded(True)

    async def claim(self, body: Claim) -> tuple[Claimed, int]:
        """A technician claims a node: the QR's device id and code. The node's key works from now on."""
        decision = self.ctx.ratelimit.check(request.remote_addr or "-", "claim")
        if not decision.allowed:
            raise Refused(429, "rate_limited", "too many claim attempts; retry later", None,
                          self.ctx.ratelimit.headers(decision))
        try:
            device, creds = await self.ctx.devices.claim(body.code, body.device_id)
        except ClaimError as e:
            raise Refused(403, "claim_refused", f"claim refused: {e}") from None
        except DeviceExists:
            raise Refused(409, "exists", f"device {body.device_id!r} already exists") from None
        except ValueError as e:
            raise BadJSON(f"device_id: {e}") from None
        self.ctx.log.info("device claimed", device=device.id)
        return Claimed(device.id, device.status, creds.key if creds else None), 201 if creds else 200

    async def firmware(self, firmware_id: int, query: FirmwareQuery) -> Any:
        """The image behind a URL `/ota/check` gave (Range, ETag); no credentials but the URL's signature."""
        fresh = query.expires >= self.ctx.now()
        if not (fresh and hmac.compare_digest(query.sig, self._url_sig(firmware_id, query.device, query.expires))):
            raise Refused(403, "bad_url", "the download URL is wrong or has expired: ask /ota/check again")
        fw = await self.ctx.ota.get(firmware_id) if firmware_id < 2**63 else None
        if fw is None:
            raise Refused(404, "not_found", f"no {self.ctx.name} firmware {firmware_id}")
        return await self.ctx.ota.response(fw)

    # -- what the routes share ---------------------------------------------------------------

    async def _device(self) -> Device:
        """Maintenance first (503), then `X-Device-Id` + `X-Auth-Key` (AuthError)."""
        maintenance = self.ctx.maintenance
        if maintenance.active:
            state = maintenance.state
            raise Refused(503, "maintenance", "the gateway is in maintenance mode"
                          + (f": {state.reason}" if state.reason else ""),
                          f"backoff_ms: {state.retry_after_s * 1000}", {"Retry-After": str(state.retry_after_s)})
        return await self.ctx.auth.device_key(request.headers, request.remote_addr)

    async def _signature(self, device: Device, body: bytes) -> tuple[str, float] | None:
        """`X-Signature` (README.md, "Signing"): checked when sent; required by configuration.
        For a signature over a timestamp and no nonce: the timestamp and until when it is
        good (the route refuses the same signed body again under another key), else None."""
        headers = request.headers
        if headers.get(SIGNATURE_HEADER) is None:
            if profiles.signature_required(self.ctx.config, device.id):
                raise AuthError(401, f"missing {SIGNATURE_HEADER} header (required for this device)", device.id)
            return None
        stamp = headers.get(TIMESTAMP_HEADER)
        nonce = headers.get(NONCE_HEADER)
        if stamp is None and profiles.signature_required(self.ctx.config, device.id):
            raise AuthError(401, f"missing {TIMESTAMP_HEADER} header (a required signature covers a timestamp)",
                            device.id)
        when = None
        if stamp is not None:
            when = _epoch(stamp)
            if when is None or abs(self.ctx.now() - when) > self.ctx.config.max_skew_s:
                raise AuthError(401, f"{TIMESTAMP_HEADER} is not within {self.ctx.config.max_skew_s:g} s of the "
                                     f"gateway's clock ({self.ctx.now():.0f}): sync the clock (handshake)", device.id)
        if nonce is not None and stamp is None:
            raise AuthError(401, f"{NONCE_HEADER} needs {TIMESTAMP_HEADER}: the signature covers "
                                 "<timestamp>.<nonce>.<body>", device.id)
        await self.ctx.auth.signature(headers, body, request.remote_addr,
                                      device_id=device.id, header_name=SIGNATURE_HEADER,
                                      timestamp_header=TIMESTAMP_HEADER if stamp is not None else None,
                                      nonce_header=NONCE_HEADER if nonce is not None else None)
        # The nonce is spent only by a good signature: one seen on the wire cannot be voided by a bogus one.
        if nonce is not None and not self.ctx.state.take_nonce(device.id, nonce):
            raise AuthError(401, f"{NONCE_HEADER} is not a fresh nonce from this device's handshake (used, "
                                 "expired or from before a gateway restart): handshake again", device.id)
        if stamp is None or when is None or nonce is not None:
            return None  # a nonce is once by itself; a body alone has no replay protection (optional mode)
        return stamp, when + self.ctx.config.max_skew_s

    def _url_sig(self, firmware_id: int, device_id: str, expires: int) -> str:
        message = f"{firmware_id}\n{device_id}\n{expires}".encode()
        return hmac.new(self._url_key, message, hashlib.sha256).hexdigest()

    # -- refusals, in the family's shape --------------------------------------------------

    async def refused(self, e: Refused) -> Response:
        return refusal(e.status, e.code, e.message, e.hint, **e.headers)

    async def batch_refused(self, e: BatchError) -> Response:
        self.ctx.state.batches.inc(outcome=e.code)
        return refusal(e.status, e.code, e.message)

    async def auth_refused(self, e: AuthError) -> Response:
        retry = {"Retry-After": str(math.ceil(e.retry_after_s))} if e.retry_after_s else {}
        hint = f"backoff_ms: {math.ceil(e.retry_after_s * 1000)}" if e.retry_after_s else None
        code = {401: "unauthorized", 403: "forbidden", 429: "locked_out"}.get(e.status, "refused")
        return refusal(e.status, code, e.reason, hint, **retry)

    async def bad_json(self, e: BadJSON) -> Response:
        return refusal(400, "bad_request", str(e))

    async def storage_full(self, e: StorageFull) -> Response:
        return refusal(507, "storage_full", f"storage full: nothing was stored ({e})", "backoff_ms: 60000")

    async def storage_error(self, e: StorageError) -> Response:
        return refusal(503, "storage_unavailable", f"storage unavailable: nothing was stored ({e})",
                       "backoff_ms: 5000")


def _epoch(stamp: str) -> float | None:
    """`X-Timestamp`: epoch seconds or ISO 8601 with a zone (what the core's check reads)."""
    try:
        value = parse_time(stamp)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
