"""The notification queue: durable delivery of alert actions, with retries.

Every action of a firing becomes one `core_notification` row (pending) in one commit.
The `Notifier.run` worker delivers due rows, each as a task of its own that commits its
own outcome (an endpoint has room for a few at once; e-mails go on threads of their own,
two at a time, so a mail server that never answers holds no webhook) - webhook (JSON
POST signed with HMAC-SHA256), e-mail (smtplib, through `[notifications.smtp]`), a Slack
or Teams message (channels.py has their shapes), MQTT publish, an upstream record of
the `alert` class, or a log line - and marks them sent, or schedules a retry with
exponential backoff (±25 % jitter), or gives up after `max_attempts` (failed, with the
last error). Rows survive restarts, so an alert raised while the network is down goes
out when it comes back.

Delivery is at-least-once: a crash between a webhook's 2xx and the commit of "sent"
sends it again. Webhook receivers dedupe on the `X-Gatewayd-Delivery` header (the row id);
a retried e-mail keeps its `Message-ID`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import smtplib
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import httpx
import peewee
import trio

from ..logs import get_logger
from ..metrics import Sample
from ..schema import read_secret
from ..storage import SchemaSpec, StorageError
from .channels import SmtpSection, email_message, redact_url, slack_message, teams_message
from .engine import Firing

if TYPE_CHECKING:
    from email.message import EmailMessage

    from ..metrics import Metrics
    from ..storage import Storage

__all__ = ["Notifier", "NOTIFY_SCHEMA", "STATES", "sign_body", "list_notifications"]

log = get_logger("gatewayd.notify")
STATES = ("pending", "sent", "failed")
SIGNATURE_HEADER = "X-Gatewayd-Signature"
DELIVERY_HEADER = "X-Gatewayd-Delivery"
BATCH = 50
MAIL_SERVER = "mailto:"
"""The endpoint key of every e-mail (no action's target is this bare prefix)."""
SAVE_RETRY_MAX_S = 60.0
"""A delivery's outcome that could not be committed is tried again, backing off up to this."""
SMTP_DEADLINE_FACTOR = 3
"""An e-mail's whole SMTP conversation may take this many times `timeout_s`."""

PublishMqtt = Callable[[str, bytes, int], Awaitable[Any]]
ForwardUpstream = Callable[[dict[str, Any]], Awaitable[Any]]


class CoreNotification(peewee.Model):
    created_at = peewee.FloatField()
    rule = peewee.CharField(max_length=128)
    level = peewee.CharField(max_length=16)
    severity = peewee.CharField(max_length=16)
    kind = peewee.CharField(max_length=16)
    target = peewee.CharField(max_length=512)
    action = peewee.TextField()
    payload = peewee.TextField()
    family = peewee.CharField(max_length=64, null=True)
    device_id = peewee.CharField(max_length=128, null=True)
    event_id = peewee.IntegerField(null=True)
    state = peewee.CharField(max_length=16, default="pending")
    attempts = peewee.IntegerField(default=0)
    last_error = peewee.TextField(null=True)
    next_attempt_at = peewee.FloatField()
    sent_at = peewee.FloatField(null=True)

    class Meta:
        table_name = "core_notification"
        indexes = ((("state", "next_attempt_at"), False),)


NOTIFY_SCHEMA = SchemaSpec("core_notifications", [CoreNotification], version=1)


class _Permanent(Exception):
    """Retrying cannot help (a 4xx, a missing secret, no MQTT): fail the row now."""


def sign_body(secret: str, body: bytes) -> str:
    """The `X-Gatewayd-Signature` value: `sha256=<hex HMAC-SHA256 of the raw body>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _rows_for(firings: list[Firing], gateway_id: str, now: float) -> list[dict[str, Any]]:
    rows = []
    for f in firings:
        base = f.payload(gateway_id)
        for action in f.actions:
            payload = {**base, "to": list(action.to), "action": action.kind}
            rows.append({
                "created_at": now, "rule": f.rule.name, "level": f.level, "severity": f.severity,
                "kind": action.kind, "target": action.target[:512], "action": json.dumps(asdict(action)),
                "payload": json.dumps(payload), "family": f.key[1], "device_id": f.key[2] or None,
                "event_id": getattr(f.event, "id", None), "state": "pending", "attempts": 0,
                "next_attempt_at": now,
            })
    return rows


def _insert_rows(rows: list[dict[str, Any]]) -> list[int]:
    return [CoreNotification.insert(**row).execute() for row in rows]


@dataclass(frozen=True)
class _Busy:
    """What a pass must not start: rows under way, endpoints with no room (`email`: the mail server)."""

    ids: frozenset[int] = frozenset()
    targets: frozenset[str] = frozenset()
    email: bool = False


def _endpoint(row: CoreNotification) -> str:
    """Deliveries to one endpoint share its room: a webhook's or chat's URL, an MQTT topic;
    every e-mail goes through the one mail server."""
    return MAIL_SERVER if row.kind == "email" else row.target


def _waiting(busy: _Busy) -> peewee.ModelSelect:
    """Pending rows not being delivered now, whose endpoint has room for one more."""
    query = CoreNotification.select().where(CoreNotification.state == "pending")
    if busy.ids:
        query = query.where(CoreNotification.id.not_in(sorted(busy.ids)))
    if busy.targets:
        query = query.where(CoreNotification.target.not_in(sorted(busy.targets)))
    if busy.email:
        query = query.where(CoreNotification.kind != "email")
    return query


def _due(now: float, limit: int, busy: _Busy) -> list[CoreNotification]:
    return list(_waiting(busy).where(CoreNotification.next_attempt_at <= now)
                .order_by(CoreNotification.next_attempt_at, CoreNotification.id).limit(limit))


def _next_due(busy: _Busy) -> tuple[float | None, int]:
    first = _waiting(busy).order_by(CoreNotification.next_attempt_at).first()
    return (first.next_attempt_at if first else None), _pending_count()


def _pending_count() -> int:
    return CoreNotification.select().where(CoreNotification.state == "pending").count()


def _save(row_id: int, outcome: dict[str, Any]) -> None:
    CoreNotification.update(**outcome).where(CoreNotification.id == row_id).execute()


def list_notifications(state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Newest first; for `gatewayd alerts list` and `/api/gateway/alerts` (reader thread)."""
    query = CoreNotification.select().order_by(CoreNotification.id.desc()).limit(limit)
    if state:
        query = query.where(CoreNotification.state == state)
    return [
        {
            "id": r.id, "created_at": r.created_at, "rule": r.rule, "level": r.level, "severity": r.severity,
            "action": r.kind, "target": r.target, "family": r.family, "device_id": r.device_id,
            "event_id": r.event_id, "state": r.state, "attempts": r.attempts, "last_error": r.last_error,
            "next_attempt_at": r.next_attempt_at if r.state == "pending" else None, "sent_at": r.sent_at,
        }
        for r in query
    ]


class Notifier:
    """Queues firings durably and delivers them in the background (`run`)."""

    def __init__(
        self,
        storage: Storage,
        *,
        gateway_id: str,
        clock: Callable[[], float] = time.time,
        max_attempts: int = 8,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
        timeout_s: float = 10.0,
        concurrency: int = 8,
        per_endpoint: int = 2,
        mail_threads: int = 2,
        publish_mqtt: PublishMqtt | None = None,
        forward_upstream: ForwardUpstream | None = None,
        smtp: SmtpSection | None = None,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ):
        self.storage = storage
        self.gateway_id = gateway_id
        self.clock = clock
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.publish_mqtt = publish_mqtt
        """`await publish_mqtt(topic, payload_bytes, qos)`; set by the runtime when MQTT is on."""
        self.forward_upstream = forward_upstream
        """`await forward_upstream(record)`: queue an `alert`-class record upstream."""
        self.smtp = smtp
        """The mail server of `email` actions (`[notifications.smtp]`); None or no host: they fail."""
        self._limiter = trio.CapacityLimiter(concurrency)
        """HTTP posts and publishes under way at once (an e-mail takes a mail thread instead)."""
        self._mail_threads = trio.CapacityLimiter(mail_threads)
        """smtplib blocks: e-mails run on threads of their own, this many at a time."""
        self._room = {MAIL_SERVER: mail_threads}
        self._per_endpoint = per_endpoint
        self._in_flight: dict[int, str] = {}
        """Row id -> endpoint of each delivery under way (not picked again until its outcome is saved)."""
        self._nursery: trio.Nursery | None = None
        self._rng = rng or random.Random()
        self._wake = trio.Event()
        self._client: httpx.AsyncClient | None = None
        self.depth = 0
        self._total = None
        if metrics is not None:
            self._total = metrics.counter(
                "gatewayd_notifications_total", "Notification deliveries by outcome", ("state",))
            metrics.collector(
                "gatewayd_notification_queue_depth", "gauge", "Notifications waiting for delivery",
                lambda: [Sample("gatewayd_notification_queue_depth", {}, self.depth)],
            )

    def _count(self, state: str, n: int = 1) -> None:
        if self._total is not None:
            self._total.inc(n, state=state)

    async def enqueue(self, firings: list[Firing]) -> list[int]:
        """Commit one pending row per action of each firing; wake the worker."""
        rows = _rows_for(firings, self.gateway_id, self.clock())
        if not rows:
            return []
        ids = await self.storage.write(_insert_rows, rows)
        self.depth += len(ids)
        self._count("queued", len(ids))
        self._wake.set()
        return ids

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Deliver due notifications until cancelled; never dies of a bad row or a full disk.

        Each delivery runs as a task of its own and saves its own outcome: a slow webhook
        or a mail server that never answers holds only its own rows. An endpoint has room
        for `per_endpoint` deliveries at once (the mail server: `mail_threads`); its other
        rows wait in the table while the rest go out."""
        async with httpx.AsyncClient(timeout=self.timeout_s) as client, trio.open_nursery() as nursery:
            self._client, self._nursery = client, nursery
            if self.smtp is not None and (cleartext := self.smtp.cleartext_login()):
                log.warning("[notifications.smtp] password sent in cleartext", problem=cleartext)
            task_status.started()
            failures = 0
            while True:
                self._wake = trio.Event()
                try:
                    if await self.deliver_due():
                        failures = 0
                        continue
                    next_at, self.depth = await self.storage.read(_next_due, self._busy())
                    failures = 0
                except Exception as e:  # a full disk, a bug: log, back off, never crash the core
                    failures += 1
                    if isinstance(e, StorageError):
                        log.error("notification queue unavailable", error=str(e))
                    else:
                        log.exception("notification worker error", error=repr(e))
                    next_at = self.clock() + min(60.0, 2.0 ** failures)
                wait = 60.0 if next_at is None else min(60.0, max(0.0, next_at - self.clock()))
                with trio.move_on_after(wait):
                    await self._wake.wait()  # set by enqueue and by each finished delivery

    async def deliver_due(self) -> int:
        """Start the deliveries that are due, not under way and have room at their endpoint."""
        assert self._nursery is not None, "deliver inside Notifier.run"
        rows = await self.storage.read(_due, self.clock(), BATCH, self._busy())
        under_way = Counter(self._in_flight.values())
        started = 0
        for row in rows:
            endpoint = _endpoint(row)
            if under_way[endpoint] >= self._room.get(endpoint, self._per_endpoint):
                continue  # filled by rows earlier in this pass; it is picked again when one finishes
            under_way[endpoint] += 1
            self._in_flight[row.id] = endpoint
            self._nursery.start_soon(self._attempt, row)
            started += 1
        return started

    def _busy(self) -> _Busy:
        counts = Counter(self._in_flight.values())
        full = {e for e, n in counts.items() if n >= self._room.get(e, self._per_endpoint)}
        return _Busy(frozenset(self._in_flight), frozenset(full - {MAIL_SERVER}), MAIL_SERVER in full)

    async def _attempt(self, row: CoreNotification) -> None:
        try:
            outcome = await self._outcome(row)
            await self._save_outcome(row.id, outcome)
        finally:
            del self._in_flight[row.id]
            self._wake.set()  # its endpoint has room again

    async def _save_outcome(self, row_id: int, outcome: dict[str, Any]) -> None:
        """Commit one delivery's outcome. Until it is saved the row stays under way (a full
        disk must not turn one sent webhook into one per pass); retried with backoff."""
        failures = 0
        while True:
            try:
                await self.storage.write(_save, row_id, outcome)
                return
            except Exception as e:  # a full disk, a bug: never crash the worker
                failures += 1
                log.error("notification outcome not saved, will retry", id=row_id, error=str(e) or repr(e))
                await trio.sleep(min(SAVE_RETRY_MAX_S, 2.0 ** failures))

    async def _outcome(self, row: CoreNotification) -> dict[str, Any]:
        attempts = row.attempts + 1
        try:
            if row.kind == "email":  # waits for a mail thread, not for a slot HTTP deliveries need
                await self._deliver(row)
            else:
                async with self._limiter:
                    await self._deliver(row)
        except _Permanent as e:
            return self._failed(row, attempts, str(e))
        except Exception as e:  # network errors, 5xx, a broken publish: retry
            error = str(e) or e.__class__.__name__
            if attempts >= self.max_attempts:
                return self._failed(row, attempts, f"gave up after {attempts} attempts: {error}")
            delay = self._delay(attempts)
            self._count("retried")
            log.warning("notification delivery failed, will retry", id=row.id, rule=row.rule,
                        action=row.kind, attempt=attempts, retry_in_s=round(delay, 1), error=error[:200])
            return {"attempts": attempts, "last_error": error[:1000], "next_attempt_at": self.clock() + delay}
        self.depth = max(0, self.depth - 1)
        self._count("sent")
        return {"state": "sent", "attempts": attempts, "sent_at": self.clock()}

    def _failed(self, row: CoreNotification, attempts: int, error: str) -> dict[str, Any]:
        self.depth = max(0, self.depth - 1)
        self._count("failed")
        log.error("notification failed", id=row.id, rule=row.rule, action=row.kind, target=row.target,
                  attempts=attempts, error=error[:200])
        return {"state": "failed", "attempts": attempts, "last_error": error[:1000]}

    def _delay(self, attempts: int) -> float:
        nominal = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(attempts - 1, 32))
        return min(self.backoff_max_s, nominal * self._rng.uniform(0.75, 1.25))

    async def _deliver(self, row: CoreNotification) -> None:
        try:
            action = json.loads(row.action)
            payload = json.loads(row.payload)
        except ValueError as e:
            raise _Permanent(f"unreadable notification row: {e}") from None
        payload["delivery_id"] = row.id
        try:  # strict JSON on the wire: a receiver's parser would refuse NaN and Infinity
            body = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as e:
            raise _Permanent(f"notification is not strict JSON: {e}") from None
        if row.kind == "webhook":
            await self._webhook(action, row.id, body)
        elif row.kind == "email":
            await self._email(action, row.id, payload)
        elif row.kind in ("slack", "teams"):
            doc = slack_message(payload) if row.kind == "slack" else teams_message(payload)
            await self._post(action["url"], json.dumps(doc, allow_nan=False).encode(),
                             {"Content-Type": "application/json"}, shown=redact_url(action["url"]))
        elif row.kind == "mqtt":
            if self.publish_mqtt is None:
                raise _Permanent("MQTT is not available (mqtt.broker = 'off'?)")
            topic = action["topic"].format_map(_Fields(payload))
            await self.publish_mqtt(topic, body, int(action.get("qos", 1)))
        elif row.kind == "upstream":
            if self.forward_upstream is None:
                raise _Permanent("no upstream is configured")
            await self.forward_upstream({**payload, "class": "alert"})
        elif row.kind == "log":
            getattr(log, action.get("level", "warning"))(
                "alert", rule=row.rule, level=row.level, severity=row.severity, family=row.family,
                device=row.device_id, message=payload.get("message"), grouped=payload.get("grouped"))
        else:
            raise _Permanent(f"unknown action kind {row.kind!r}")

    async def _webhook(self, action: dict[str, Any], delivery_id: int, body: bytes) -> None:
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: str(delivery_id)}
        if action.get("secret_env"):
            secret = read_secret(action["secret_env"])
            if secret is None:
                raise _Permanent(f"the webhook secret variable {action['secret_env']} is not set")
            headers[SIGNATURE_HEADER] = sign_body(secret, body)
        await self._post(action["url"], body, headers, shown=action["url"])

    async def _post(self, url: str, body: bytes, headers: dict[str, str], *, shown: str) -> None:
        """POST; a 2xx is done, a 5xx/408/425/429 retried, any other 4xx permanent (`shown` names the URL)."""
        assert self._client is not None, "deliver inside Notifier.run"
        response = await self._client.post(url, content=body, headers=headers)
        if response.is_success:
            return
        text = f"HTTP {response.status_code} from {shown}"
        if 400 <= response.status_code < 500 and response.status_code not in (408, 425, 429):
            raise _Permanent(text)
        raise RuntimeError(text)

    async def _email(self, action: dict[str, Any], delivery_id: int, payload: dict[str, Any]) -> None:
        smtp = self.smtp
        if smtp is None or not smtp.host:
            raise _Permanent("no mail server: set [notifications.smtp] host")
        password = None
        if smtp.user:
            password = read_secret(smtp.password_env)
            if password is None:
                raise _Permanent(f"the SMTP password variable {smtp.password_env} is not set")
        try:
            message = email_message(payload, sender=smtp.from_address, to=list(action["to"]), delivery_id=delivery_id)
        except ValueError as e:
            raise _Permanent(f"notification is not strict JSON: {e}") from None
        # smtplib blocks: a mail thread (mail_threads at once, apart from trio's default pool);
        # _send_mail's deadline bounds the wait (abandoned on shutdown).
        await trio.to_thread.run_sync(_send_mail, smtp, password, message, self.timeout_s, abandon_on_cancel=True,
                                      limiter=self._mail_threads)


def _send_mail(smtp: SmtpSection, password: str | None, message: EmailMessage, timeout: float) -> None:
    """Send one message (worker thread). A 5xx answer, a refused login or no STARTTLS is
    permanent; a 4xx, a timeout or a refused connection is retried."""
    context = ssl.create_default_context()
    where = f"SMTP {smtp.host}:{smtp.port}"
    # `timeout` bounds each socket read; a server dripping a byte at a time never trips it.
    # The whole conversation gets SMTP_DEADLINE_FACTOR x timeout, then its socket is shut.
    client = (smtplib.SMTP_SSL(timeout=timeout, context=context) if smtp.ssl else smtplib.SMTP(timeout=timeout))
    client._host = smtp.host  # what STARTTLS and SSL verify the certificate against (SNI); the constructor sets it
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = client.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout * SMTP_DEADLINE_FACTOR, cut)
    timer.daemon = True
    timer.start()
    try:
        with client:
            client.connect(smtp.host, smtp.port)
            if smtp.starttls:
                client.starttls(context=context)
            if smtp.user and password is not None:
                client.login(smtp.user, password)
            refused = client.send_message(message)
    except smtplib.SMTPRecipientsRefused as e:
        codes = [code for code, _ in e.recipients.values()]
        text = f"{where} refused every recipient: " + ", ".join(f"{r} ({c})" for r, (c, _) in e.recipients.items())
        if all(code >= 500 for code in codes):
            raise _Permanent(text) from None
        raise RuntimeError(text) from None
    except smtplib.SMTPResponseException as e:
        text = f"{where} answered {e.smtp_code}: {_text(e.smtp_error)}"
        if e.smtp_code >= 500:
            raise _Permanent(text) from None
        raise RuntimeError(text) from None
    except smtplib.SMTPNotSupportedError as e:
        raise _Permanent(f"{where}: {e} (set starttls = false, or ssl = true for port 465)") from None
    except (smtplib.SMTPException, OSError) as e:
        if expired.is_set():
            raise RuntimeError(f"{where}: no complete answer within {timeout * SMTP_DEADLINE_FACTOR:g} s") from None
        raise RuntimeError(f"{where}: {e or e.__class__.__name__}") from None
    finally:
        timer.cancel()
    if refused:
        log.warning("some e-mail recipients were refused", refused=sorted(refused), server=where)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Fields(dict):
    """format_map source for MQTT topics: `{family}`, `{device}`, `{rule}`, `{type}`."""

    def __init__(self, payload: dict[str, Any]):
        super().__init__(family=payload.get("family") or "", device=payload.get("device_id") or "-",
                         rule=payload.get("rule") or "", type=payload.get("event_type") or "")

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"
