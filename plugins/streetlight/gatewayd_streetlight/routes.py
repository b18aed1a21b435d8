"""The lights' HTTP API (the specification's section 12) under the plugin's mount
(`/streetlight`): one method per route, every refusal in the specification's error body
`{"status": "error", "code", "message", "retry_after_seconds"}`. README.md has the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, cast
from urllib.parse import urlsplit

import jwt
import msgspec
from quart import Blueprint, Response, current_app, jsonify, request

from gatewayd.plugins.api import (
    AuthError,
    BadJSON,
    Device,
    DeviceAuth,
    DeviceExists,
    EncodingError,
    REPORT_STATUSES,
    Meta,
    PluginContext,
    Routes,
    StorageError,
    StorageFull,
)

from . import commands as cmds
from . import schemas
from .config import StreetlightConfig
from .health import next_update_seconds, poll_seconds
from .lights import retry_after
from .messages import (
    Invalid,
    iso,
    parse_ack,
    parse_alert,
    parse_firmware,
    parse_logs,
    parse_registration,
    parse_status,
    parse_sync,
)

if TYPE_CHECKING:
    from .lights import Streetlight

    Ctx = PluginContext[StreetlightConfig, Streetlight]

DEVICE = {"device_id": schemas.DeviceId}
FirmwareId = Annotated[str, Meta(pattern=r"^[1-9][0-9]{0,17}$")]
CHANNELS = ("stable", "beta")


SIGNATURE_HEADER = "X-Device-Signature"


def _credentials() -> tuple[str | None, bool]:
    """The request's Authorization header (the first), and whether it has X-Device-Signature:
    one pass over the headers. (Werkzeug's `get` of a header that is not there raises and
    catches an exception: 2.3 us, a request without a signature paid it every time.)"""
    authorization, signed = None, False
    for name, value in request.headers:
        lowered = name.lower()
        if lowered == "authorization":
            if authorization is None:
                authorization = value
        elif lowered == "x-device-signature":
            signed = True
    return authorization, signed


class Refused(Exception):
    """A request answered with the specification's error body."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s


class LightRoutes:
    """The routes of one plugin; `blueprint()` mounts them."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self._expiry: dict[str, float] = {}  # token -> its expiry
        # The two answers most requests get, their bytes as the app's JSON provider made them
        # (keyed by what varies in them: the hint, the second): a poll with nothing waiting
        # and a status without a new token are not encoded again within the same second.
        self._answers: dict[tuple[Any, ...], tuple[bytes, str]] = {}
        self._configure_endpoint = f".{self.configure.__name__}"  # `_limit_address`'s, in any Blueprint
        ctx.ratelimit.define("device", ctx.config.requests_per_minute, 60)
        ctx.ratelimit.define("configure", ctx.config.configure_per_minute, 60)
        ctx.ratelimit.define("configure-address", ctx.config.configure_per_address_per_minute, 60)

    def blueprint(self) -> Blueprint:
        bp = Blueprint(self.ctx.name, __name__)
        r = Routes(bp, error=schemas.Error, tag=self.ctx.name, auth=DeviceAuth.bearer_jwt())
        gone = {404: "DEVICE_NOT_FOUND: the light is not registered (it configures again)"}
        body_max = self.ctx.config.max_body_bytes
        r.post("/device/<device_id>/configure", path=DEVICE, body=schemas.ConfigureRequest, auth=None,
               responses={200: schemas.Configured},
               errors={403: "PENDING_APPROVAL (enrollment) or DEVICE_DISABLED",
                       404: "DEVICE_NOT_FOUND: not registered and enrollment is off",
                       401: "SIGNATURE_INVALID: the light must sign its body (X-Device-Signature)",
                       429: "RATE_LIMITED", 503: "STORAGE_UNAVAILABLE", 507: "STORAGE_FULL"})(self.configure)
        r.post("/device/<device_id>/status", path=DEVICE, body=schemas.StatusReport,
               responses={200: schemas.StatusRecorded}, errors={**gone, 503: "STORAGE_UNAVAILABLE",
                                                                507: "STORAGE_FULL"})(self.status)
        r.post("/device/<device_id>/sync", path=DEVICE, body=schemas.Sync, max_inflated=body_max,
               responses={200: schemas.Synced}, errors={**gone, 503: "STORAGE_UNAVAILABLE",
                                                        507: "STORAGE_FULL"})(self.sync)
        r.get("/device/<device_id>/commands", path=DEVICE, query=schemas.CommandsQuery,
              responses={200: schemas.PendingCommands}, errors=gone)(self.commands)
        r.post("/device/<device_id>/command-ack", path=DEVICE, body=schemas.CommandAck,
               responses={200: schemas.Acked}, errors={404: "DEVICE_NOT_FOUND, or COMMAND_NOT_FOUND"})(self.ack)
        r.post("/device/<device_id>/alert", path=DEVICE, body=schemas.AlertRequest,
               responses={200: schemas.Recorded}, errors=gone)(self.alert)
        r.post("/device/<device_id>/logs", path=DEVICE, body=schemas.LogsRequest, max_inflated=body_max,
               responses={200: schemas.Recorded}, errors=gone)(self.logs)
        r.get("/device/<device_id>/health", path=DEVICE, responses={200: schemas.HealthReport}, errors=gone)(self.health)
        r.put("/device/<device_id>/firmware", path=DEVICE, body=schemas.FirmwareRequest,
              responses={200: schemas.FirmwareAnswer}, errors=gone)(self.firmware)
        # The id as digits, not <int:>: Quart's own 404 for "abc" would not be the family's error body.
        r.get("/firmware/<firmware_id>/image", path={"firmware_id": FirmwareId},
              responses={200: None, 206: None, 304: None}, errors={404: "FIRMWARE_NOT_FOUND"})(self.image)
        # Before the body is read and checked against its declaration: a refused body counts too.
        bp.before_request(self._limit_address)
        bp.register_error_handler(Refused, self.refused)
        bp.register_error_handler(AuthError, self.auth_error)
        bp.register_error_handler(BadJSON, self.bad_json)  # strict JSON and the declarations alike
        bp.register_error_handler(EncodingError, self.encoding_error)
        bp.register_error_handler(StorageFull, self.storage_full)
        bp.register_error_handler(StorageError, self.storage_error)
        return bp

    # -- the routes ---------------------------------------------------------------------

    async def configure(self, device_id: str, body: schemas.ConfigureRequest) -> schemas.Configured:
        """Register a light and give it its id, its config and its device token.

        A light registered beforehand (`gatewayd devices add --family streetlight --id
        IMEI:...`), or, with `enrollment = true`, any light once an operator approved it.
        A light whose metadata says `"signed": true` (or every light, with
        `require_signatures`) signs its body: `X-Device-Signature`."""
        # Per client address before anything (`_limit_address`, before the body is read); per
        # light only once the request passed the light's checks (below): forged requests do
        # not use up a light's configures.
        try:
            reg = parse_registration(body, device_id, self.ctx.config.service_area)
        except Invalid as e:
            raise Refused(400, e.code, e.message, 300 if e.code == "CONFIG_INVALID" else None) from None
        device = await self.ctx.devices.get(device_id)
        pending = self.ctx.config.pending_retry_s
        if device is None:
            if not self.ctx.config.enrollment:
                raise Refused(404, "DEVICE_NOT_FOUND", f"light {device_id} is not registered on this gateway",
                              pending)
            await self._enroll(device_id, reg.data())
            raise Refused(403, "PENDING_APPROVAL", f"light {device_id} waits for an operator's approval", pending)
        if device.status == "disabled":
            if device.metadata.get("enrollment") == "pending":
                raise Refused(403, "PENDING_APPROVAL", f"light {device_id} waits for an operator's approval", pending)
            raise Refused(403, "DEVICE_DISABLED", f"light {device_id} is disabled on this gateway", pending)
        signed = await self._signature(device)
        # A light that signed is itself; an unsigned one may be anyone knowing its id, so
        # each client address has its own count for it.
        self._limit(device_id if signed else f"{device_id} {request.remote_addr}", "configure", "the light's configure")
        light_id, config = await self.ctx.state.configure(device, reg)
        token = self.ctx.auth.issue_jwt(device, ttl_s=self.ctx.config.token_ttl_s)
        answer = schemas.Configured(
            "success", "Device configured successfully", light_id, msgspec.convert(config, schemas.LightConfig),
            token.token, iso(token.expires_at), False, iso(self.ctx.now()))
        port = self.ctx.config.mqtt_port or self.ctx.mqtt.device_port
        if self.ctx.config.mqtt and port is not None:
            password = await self.ctx.devices.issue_key(device_id, mqtt_username=light_id)
            answer.mqtt_enabled, answer.mqtt_port = True, port
            answer.mqtt_broker = self.ctx.config.mqtt_host or urlsplit(self.ctx.http.url("/")).hostname or "127.0.0.1"
            answer.mqtt_username, answer.mqtt_password = light_id, password
            state = self.ctx.state
            answer.topics = schemas.Topics(state.topic(light_id, "commands"), state.topic(light_id, "status"))
        self.ctx.log.info("light configured", device=device_id, light=light_id)
        return answer

    async def status(self, device_id: str, body: schemas.StatusReport) -> schemas.StatusRecorded | Response:
        """Store a status report; answer when to send the next one (and a fresh token when
        the light's nears its expiry)."""
        credentials = _credentials()
        authorization = credentials[0]
        device = await self._authenticate(device_id, credentials)
        try:
            status = parse_status(body, device_id=device_id)
        except Invalid as e:
            raise Refused(400, e.code, e.message) from None
        latest = await self.ctx.state.record_status(device_id, status, via="http")
        now = self.ctx.now()
        answer = schemas.StatusRecorded("success", "Status recorded",
                                        next_update_seconds(latest, self.ctx.config.health), iso(now))
        if self._token_expires_at(authorization) - now < self.ctx.config.token_refresh_before_s:
            # The device as the token check found it (its epoch is the one the new token carries).
            token = self.ctx.auth.issue_jwt(device, ttl_s=self.ctx.config.token_ttl_s)
            answer.device_token, answer.token_expires_at = token.token, iso(token.expires_at)
            return answer
        return await self._answer(("status", answer.next_update_seconds, answer.server_timestamp), answer)

    async def sync(self, device_id: str, body: schemas.Sync) -> schemas.Synced:
        """The offline sync: cached readings (gzip welcome), stored in one transaction."""
        await self._authenticate(device_id)
        readings = self._parse(lambda: parse_sync(body, device_id, self.ctx.config.max_sync_readings))
        stored = await self.ctx.state.record_sync(device_id, readings)
        return schemas.Synced("success", f"{stored} readings stored", stored, iso(self.ctx.now()))

    async def commands(self, device_id: str, query: schemas.CommandsQuery) -> schemas.PendingCommands | Response:
        """The light's pending commands, high priority first, and when to poll again."""
        await self._authenticate(device_id)
        # A light that polls is not listening on MQTT (any more): what was pushed to it and
        # never acknowledged is handed out again now, not after command_redeliver_s.
        pushed_to = self.ctx.state.mqtt_seen.pop(device_id, None) is not None
        redeliver_s = 0.0 if pushed_to else self.ctx.config.command_redeliver_s
        # From the queue's memory: no query in the common case (nothing waits); the
        # queue's write only to hand out.
        unacked = await self.ctx.commands.open_for(device_id)
        now = self.ctx.now()
        taken = await self.ctx.commands.next_for(device_id, limit=query.limit, redeliver_after_s=redeliver_s) \
            if unacked and cmds.any_due(unacked, now, redeliver_s) else []
        waiting = any(cmds.priority_of(c) == "high" for c in unacked)  # until its ack: poll fast
        latest = self.ctx.state.latest.get(device_id)
        answer = schemas.PendingCommands("ok", [cmds.shape(c) for c in cmds.ordered(taken)] if taken else [],
                                         poll_seconds(latest, waiting, self.ctx.config.health), iso(now))
        if taken:
            return answer
        return await self._answer(("poll", answer.next_poll_seconds, answer.server_timestamp), answer)

    async def ack(self, device_id: str, body: schemas.CommandAck) -> schemas.Acked:
        """A command executed (or failed), with its result; a repeated ack changes nothing."""
        await self._authenticate(device_id)
        ack = self._parse(lambda: parse_ack(body, device_id))
        command = await self.ctx.commands.get(ack.command_id)
        if command is None or command.device_id != device_id or command.family != self.ctx.name:
            raise Refused(404, "COMMAND_NOT_FOUND", f"no command {ack.command_id!r} for light {device_id}")
        if command.status in ("pending", "delivered"):
            status = "executed" if ack.ok else "failed"
            # Upstream first: a crash before the queue's update is an ack sent twice, never none.
            await self.ctx.ingest.record(device_id, "command_ack", ack.data(status), ts=ack.ts, cls="command_ack")
            command = await self.ctx.commands.ack(ack.command_id, ack.ok, ack.result, device_id=device_id) or command
        return schemas.Acked("success", "Acknowledgement recorded", command.id, command.status, iso(self.ctx.now()))

    async def alert(self, device_id: str, body: schemas.AlertRequest) -> schemas.Recorded:
        """A light's alert: an event (the alert rules see it) and an `alert` record upstream."""
        await self._authenticate(device_id)
        alert = self._parse(lambda: parse_alert(body, device_id))
        ts = alert.ts or self.ctx.now()
        data = {"alert_type": alert.alert_type, "severity": alert.severity, "message": alert.message,
                "timestamp": iso(ts), "data": alert.data}
        await self.ctx.ingest.record(device_id, "alert", data, ts=ts, cls="alert")
        await self.ctx.events.emit(device_id, alert.alert_type, {"message": alert.message, **alert.data},
                                   severity=alert.severity, ts=ts)
        if alert.severity == "critical":
            await self.ctx.state.error(device_id, ts, {"alert_type": alert.alert_type})
        return schemas.Recorded("success", "Alert recorded", iso(self.ctx.now()))

    async def logs(self, device_id: str, body: schemas.LogsRequest) -> schemas.Recorded:
        """A light's log lines (gzip welcome): upstream in the lowest class."""
        await self._authenticate(device_id)
        entries = self._parse(lambda: parse_logs(body, device_id))
        await self.ctx.ingest.record(device_id, "logs", {"logs": entries}, ts=self.ctx.now(), cls="log")
        return schemas.Recorded("success", f"{len(entries)} log entries recorded", iso(self.ctx.now()))

    async def health(self, device_id: str) -> schemas.HealthReport:
        """What the gateway knows of the light: online, its last status, each health metric
        against its threshold, and the indicator (green / yellow / red / gray)."""
        device = await self._authenticate(device_id)
        state = self.ctx.state
        assessment = state.assess(device)
        latest = state.latest.get(device_id)
        pending = await self.ctx.commands.list(device_id, status="pending")
        return schemas.HealthReport(
            "ok", device_id, state.light_of.get(device_id), self.ctx.devices.is_online(device_id),
            assessment.indicator, assessment.reason,
            None if latest is None else {**latest, "ts": iso(latest["ts"]), "received_at": iso(latest["received_at"])},
            [schemas.MetricState(**m) for m in assessment.as_json()["metrics"]], len(pending), iso(self.ctx.now()))

    async def firmware(self, device_id: str, body: schemas.FirmwareRequest) -> schemas.FirmwareAnswer:
        """The light says what it runs (and how an update goes); the answer says whether a
        newer image waits in the gateway's OTA store, and where."""
        device = await self._authenticate(device_id)
        report = self._parse(lambda: parse_firmware(body, device_id, REPORT_STATUSES, CHANNELS))
        if report.status is not None:
            await self.ctx.ota.report(device_id, report.status, version=report.version, detail=report.detail)
        if report.version != device.firmware:
            await self.ctx.devices.update(device_id, firmware=report.version)
        model = device.model or self.ctx.name
        try:
            newest = await self.ctx.ota.newest_for(model, report.version, report.channel, device_id)
        except ValueError as e:
            raise Refused(400, "INVALID_PAYLOAD", f"firmware_version: {e}") from None
        now = iso(self.ctx.now())
        if newest is None:
            return schemas.FirmwareAnswer("success", "Firmware up to date", False, now)
        image = schemas.FirmwareImage(newest.version, self.ctx.ota.url(f"{self.ctx.mount}/firmware/{newest.id}/image"),
                                      newest.sha256, newest.size)
        return schemas.FirmwareAnswer("success", f"Firmware {newest.version} available", True, now, image)

    async def image(self, firmware_id: str) -> Response:
        """A firmware image from the OTA store (Range and ETag honoured)."""
        await self._authenticate_any()
        fw = await self.ctx.ota.get(int(firmware_id))
        if fw is None:
            raise Refused(404, "FIRMWARE_NOT_FOUND", f"no {self.ctx.name} firmware {firmware_id}")
        response: Response = await self.ctx.ota.response(fw)
        return response

    # -- errors (the specification's error body) ----------------------------------------

    def _error(self, status: int, code: str, message: str, retry_after_s: float | None = None,
               headers: dict[str, str] | None = None) -> Response:
        self.ctx.state.refused.inc(code=code)
        seconds = retry_after(retry_after_s)
        response = jsonify({"status": "error", "code": code, "message": message, "retry_after_seconds": seconds})
        response.status_code = status
        if status == 429:
            response.headers["Retry-After"] = str(seconds)
        response.headers.update(headers or {})
        return response

    async def refused(self, e: Refused) -> Response:
        return self._error(e.status, e.code, e.message, e.retry_after_s)

    async def auth_error(self, e: AuthError) -> Response:
        if e.status == 429:
            return self._error(429, "RATE_LIMITED", e.reason, e.retry_after_s or 60)
        if e.status == 403:
            return self._error(403, "DEVICE_DISABLED", e.reason, self.ctx.config.pending_retry_s)
        code = "TOKEN_EXPIRED" if "expired" in e.reason else "SIGNATURE_INVALID" if "signature" in e.reason.lower() \
            else "UNAUTHORIZED"
        return self._error(401, code, f"{e.reason}: configure again for a new token", None)

    async def bad_json(self, e: BadJSON) -> Response:
        return self._error(400, "INVALID_PAYLOAD", str(e))

    async def encoding_error(self, e: EncodingError) -> Response:
        codes = {400: "PAYLOAD_CORRUPT", 413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_ENCODING"}
        return self._error(e.status, codes.get(e.status, "INVALID_PAYLOAD"), str(e))

    async def storage_full(self, e: StorageFull) -> Response:
        return self._error(507, "STORAGE_FULL", f"storage full: nothing was stored ({e})", 300)

    async def storage_error(self, e: StorageError) -> Response:
        return self._error(503, "STORAGE_UNAVAILABLE", f"storage unavailable: nothing was stored ({e})", 30)

    # -- what the routes share ----------------------------------------------------------

    async def _authenticate(self, device_id: str, credentials: tuple[str | None, bool] | None = None) -> Device:
        """The light's own bearer token (and signature, when it must sign); 404 for a light
        the gateway does not know (it configures again), 429 over its request rate.
        `credentials`: `_credentials()` when the route read them already."""
        authorization, signed = credentials or _credentials()
        # The one header the check reads, as a dict: not looked up again in Quart's headers.
        headers = {} if authorization is None else {"Authorization": authorization}
        try:
            device = await self.ctx.auth.bearer_jwt(headers, request.remote_addr, device_id=device_id)
        except AuthError as e:
            if e.status == 401 and await self.ctx.devices.get(device_id, max_age_s=2.0) is None:
                raise Refused(404, "DEVICE_NOT_FOUND", f"light {device_id} is not registered: configure again",
                              None) from None
            raise
        self._limit(device_id, "device", "the light's request")
        state, now = self.ctx.state, self.ctx.now()
        silent = state.silent_s(device)
        if silent is not None and silent > self.ctx.config.token_max_silence_s:
            raise AuthError(401, f"token expired: not heard from in {silent / 86400:.0f} days", device_id)
        await self._signature(device, signed)
        state.heard[device_id] = now
        return device

    async def _authenticate_any(self) -> Device:
        """A firmware download: any light of the family with its token."""
        device = await self.ctx.auth.bearer_jwt(request.headers, request.remote_addr)
        self._limit(device.id, "device", "the light's request")
        return device

    async def _signature(self, device: Device, sent: bool | None = None) -> bool:
        """Check `X-Device-Signature` when the light must sign or sent one (`sent`: whether
        the request has the header, when the caller knows); True if it signed."""
        if sent is None:
            sent = request.headers.get(SIGNATURE_HEADER) is not None
        if not sent and not (self.ctx.config.require_signatures or device.metadata.get("signed") is True):
            return False
        body = await request.get_data(as_text=False)  # as sent (compressed too): what the light signed
        assert isinstance(body, bytes)
        await self.ctx.auth.signature(request.headers, body, request.remote_addr, device_id=device.id)
        return True

    async def _limit_address(self) -> None:
        """Before a configure's body is read: its client address's count (a flood of forged
        or malformed configures is answered 429 unread)."""
        # By the view's own name: on the plugin's own listener the endpoint is `<name>_root.configure`.
        # (Every request of the plugin comes here: one string test, nothing looked up.)
        endpoint = request.endpoint
        if endpoint is not None and endpoint.endswith(self._configure_endpoint):
            self._limit(request.remote_addr or "", "configure-address", "this address's configure")

    def _limit(self, key: str, cls: str, what: str) -> None:
        decision = self.ctx.ratelimit.check(key, cls)
        if not decision.allowed:
            raise Refused(429, "RATE_LIMITED", f"more than {what} rate allows: retry later", decision.retry_after_s)

    def _token_expires_at(self, authorization: str | None) -> float:
        """The expiry of the token this request carried (`authorization`, its header,
        verified by `_authenticate`)."""
        token = (authorization or "").partition(" ")[2].strip()
        expires = self._expiry.get(token)
        if expires is None:
            if len(self._expiry) >= 10_000:  # a light keeps its token for days: a small memory
                self._expiry.clear()
            expires = self._expiry[token] = float(jwt.decode(token, options={"verify_signature": False})["exp"])
        return expires

    async def _answer(self, key: tuple[Any, ...], answer: msgspec.Struct) -> Response:
        """`answer` as the app's JSON provider answers it, its bytes kept under `key` (what
        varies in it) for the next request with the same."""
        kept = self._answers.get(key)
        if kept is None:
            made = cast(Response, current_app.json.response(msgspec.to_builtins(answer)))  # Quart's, typed as flask's
            body = await made.get_data(as_text=False)
            assert isinstance(body, bytes)
            if len(self._answers) >= 64:  # keys carry the second: only the newest matter
                self._answers.clear()
            kept = self._answers[key] = (body, made.mimetype or "application/json")
        return current_app.response_class(kept[0], mimetype=kept[1])

    @staticmethod
    def _parse(fn: Any) -> Any:
        try:
            return fn()
        except Invalid as e:
            raise Refused(400, e.code, e.message) from None

    async def _enroll(self, device_id: str, registration: dict[str, Any]) -> None:
        """An unknown light, with enrollment on: registered disabled, waiting for approval
        (`gatewayd devices enable --family streetlight ID`)."""
        fields: dict[str, Any] = {"status": "disabled", "metadata": {"enrollment": "pending",
                                                                      "registration": registration}}
        if isinstance(registration.get("name"), str):
            fields["name"] = registration["name"]
        if isinstance(registration.get("firmware_version"), str):
            fields["firmware"] = registration["firmware_version"]
        try:
            await self.ctx.devices.provision(device_id, **fields)
        except ValueError as e:
            raise Refused(400, "CONFIG_INVALID", str(e), 300) from None
        except DeviceExists:
            pass  # another configure of the same light got there first
        self.ctx.log.info("light waiting for approval", device=device_id)
