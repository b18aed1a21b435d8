"""What the edgesentinel tests share: a node's upload, as the firmware sends it."""

from __future__ import annotations

import email
import email.policy
import gzip
import hashlib
import hmac
import json
import socket
import uuid
from typing import Any

import trio
import zstandard
from aiosmtpd.controller import Controller

import gatewayd_edgesentinel

PLUGIN = [("edgesentinel", gatewayd_edgesentinel)]
OPEN = ["plugins.edgesentinel.require_claim=false"]
API = "/edgesentinel/api/iot/v1"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def creds_headers(creds: Any) -> dict[str, str]:
    return {"X-Device-Id": creds.device_id, "X-Auth-Key": creds.key}


def points(n: int, *, start: float = T0, metric: str = "temp_c") -> list[dict[str, Any]]:
    return [{"ts": start + i, "metric": metric, "value": 20.0 + i % 7, "unit": "C"} for i in range(n)]


def compress(doc: Any, encoding: str = "zstd") -> bytes:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    if encoding == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    if encoding == "gzip":
        return gzip.compress(raw)
    return raw


def upload(creds: Any, body: bytes, *, key: str | None = None, encoding: str = "zstd", sha: str | None = None,
           **extra: str) -> dict[str, Any]:
    """The keyword arguments of client.post for one batch."""
    headers = {**creds_headers(creds), "Idempotency-Key": key or str(uuid.uuid4()),
               "Content-SHA256": sha or hashlib.sha256(body).hexdigest(), **extra}
    if encoding != "identity":
        headers["Content-Encoding"] = encoding
    return {"content": body, "headers": headers}


def sign(secret: str, body: bytes, stamp: str, nonce: str | None = None) -> str:
    message = stamp.encode() + b"." + (nonce.encode() + b"." if nonce else b"") + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


class MailSink:
    """A real SMTP server on 127.0.0.1 for the e-mail workflows (aiosmtpd, in its own thread):
    `async with MailSink() as sink:` then `sink.port`, `sink.messages` (parsed)."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 Message accepted"

    def settings(self) -> list[str]:
        """The gateway's `[notifications.smtp]`, pointed here."""
        return ["notifications.smtp.host='127.0.0.1'", f"notifications.smtp.port={self.port}",
                "notifications.smtp.starttls=false", "notifications.smtp.sender='gw@site.example'"]

    async def __aenter__(self) -> MailSink:
        await trio.to_thread.run_sync(self._controller.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await trio.to_thread.run_sync(self._controller.stop)
