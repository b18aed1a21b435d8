"""What the chat and e-mail actions send: an alert's payload as an e-mail, a Slack
message or a Microsoft Teams card (pure; delivery is notify.py's), and the mail
server's settings (`[notifications.smtp]`).

Every shape is built from the one payload document all actions share (docs/events.md):

- `email`: a plain-text message, subject `[<gateway>] <SEVERITY> <rule>: <message>`,
  the alert's fields one a line, then the payload as JSON; `Message-ID` derived from the
  gateway and the delivery id, so a retried delivery is recognisably the same mail.
- `slack`: a Slack incoming-webhook message, `text` (the fallback notifications show)
  and `blocks` (a header, the fields, the reason).
- `teams`: a Teams "Workflows" webhook message carrying an Adaptive Card 1.4 (the form
  the Workflows app's "post to a channel when a webhook request is received" takes;
  the older Office 365 connectors and their MessageCard are retired by Microsoft).
"""

from __future__ import annotations

import ipaddress
import json
import re
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..schema import ConfigError

__all__ = ["SmtpSection", "email_message", "slack_message", "teams_message", "summary", "redact_url", "teams_text",
           "EMAIL"]

EMAIL = re.compile(r"[^@\s,;<>\"]+@[^@\s,;<>\"]+\.[^@\s,;<>\"]+")
_SEVERITY_MARK = {"critical": ":red_circle:", "warning": ":warning:", "info": ":information_source:"}
# Headers unfolded up to RFC 5322's 998: a folded Subject reads back with a leading space.
_MAIL_POLICY = SMTP.clone(max_line_length=998)
_TEAMS_SPECIAL = re.compile(r"[\\`*_{}\[\]()<>#|~&]|^[-+]")  # a leading - or + would start a list
_TEAMS_COLOR = {"critical": "Attention", "warning": "Warning", "info": "Default"}


@dataclass
class SmtpSection:
    """`[notifications.smtp]`: the mail server `email` alert actions are sent through."""

    host: str = ""
    """"" = no mail server: an `email` action fails with that reason."""
    port: int = 587
    starttls: bool = True
    """Upgrade the connection with STARTTLS (verified against the system's CAs) before logging in."""
    ssl: bool = False
    """Implicit TLS from the first byte (port 465) instead of STARTTLS."""
    user: str = ""
    """Log in as this user (with the password from `password_env`); "" = no login."""
    password_env: str = ""
    sender: str = ""
    """The From address ("" = `gatewayd@<host>`)."""

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError("port", f"must be 1 .. 65535, got {self.port}")
        if self.ssl and self.starttls:
            raise ConfigError("starttls", "ssl = true already encrypts: set starttls = false")
        if self.user and not self.password_env:
            raise ConfigError("password_env", "a user needs password_env, the variable holding the password")
        if self.sender and not EMAIL.fullmatch(self.sender):
            raise ConfigError("sender", f"expected an e-mail address, got {self.sender!r}")

    def cleartext_login(self) -> str | None:
        """Why logging in to this server exposes the password, or None: a login over a
        connection neither STARTTLS nor SSL protects, to a host other than this box's own
        loopback (a local relay's traffic never leaves the box)."""
        if not (self.host and self.user) or self.starttls or self.ssl or _loopback(self.host):
            return None
        return (f"logs in to {self.host}:{self.port} as {self.user!r} over cleartext (starttls = false, ssl = false): "
                "the password crosses the network readable; set starttls = true (port 587) or ssl = true (port 465)")

    @property
    def from_address(self) -> str:
        return self.sender or f"gatewayd@{self.host or 'localhost'}"


def _loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def summary(payload: dict[str, Any]) -> str:
    """One line: `[site-7] CRITICAL es-tamper: tamper_detected (critical)`."""
    level = " (escalation)" if payload.get("level") == "escalation" else ""
    return (f"[{payload.get('gateway_id')}] {str(payload.get('severity', 'info')).upper()} "
            f"{payload.get('rule')}{level}: {payload.get('message')}")


def _facts(payload: dict[str, Any]) -> list[tuple[str, str]]:
    event = payload.get("event") or {}
    facts = [("Gateway", payload.get("gateway_id")), ("Family", payload.get("family")),
             ("Device", payload.get("device_id")), ("Event", payload.get("event_type")),
             ("Severity", payload.get("severity")), ("Level", payload.get("level")),
             ("Time", event.get("time")), ("Grouped", payload.get("grouped") or None)]
    return [(name, str(value)) for name, value in facts if value not in (None, "")]


def email_message(payload: dict[str, Any], *, sender: str, to: list[str], delivery_id: int) -> EmailMessage:
    """The alert as a plain-text e-mail from `sender` to `to`."""
    message = EmailMessage(policy=_MAIL_POLICY)
    # One line: a header refuses CR/LF, and a multi-line rule message must not fail every mail.
    message["Subject"] = " ".join(summary(payload).split())[:200]
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Date"] = formatdate(localtime=False)
    domain = sender.rpartition("@")[2] or "gatewayd.local"
    message["Message-ID"] = make_msgid(f"gatewayd.{payload.get('gateway_id')}.{delivery_id}", domain=domain)
    message["X-Gatewayd-Delivery"] = str(delivery_id)
    lines = [str(payload.get("message")), "", *(f"{name}: {value}" for name, value in _facts(payload)),
             f"Reason: {payload.get('reason')}", "", "The alert as JSON:",
             json.dumps(payload, sort_keys=True, indent=1, allow_nan=False)]
    message.set_content("\n".join(lines))
    return message


def slack_message(payload: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook body: `text` plus Block Kit `blocks`."""
    mark = _SEVERITY_MARK.get(str(payload.get("severity")), "")
    text = f"{mark} {_mrkdwn(summary(payload))}".strip()
    fields = [{"type": "mrkdwn", "text": f"*{name}*\n{_mrkdwn(value)}"} for name, value in _facts(payload)][:10]
    return {
        "text": text,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": summary(payload)[:150]}},
            {"type": "section", "fields": fields},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _mrkdwn(str(payload.get("reason")))[:2000]}]},
        ],
    }


def _mrkdwn(text: str) -> str:
    """Slack's mrkdwn control characters escaped: `<!channel>`, `<@U1>` or `<url|label>` in
    a device id or a message is shown as typed, never a mention or a disguised link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def teams_message(payload: dict[str, Any]) -> dict[str, Any]:
    """A Teams Workflows webhook body: one Adaptive Card (1.4) attachment."""
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "size": "Medium", "weight": "Bolder", "wrap": True,
             "text": teams_text(summary(payload)), "color": _TEAMS_COLOR.get(str(payload.get("severity")), "Default")},
            {"type": "FactSet", "facts": [{"title": name, "value": teams_text(value)} for name, value in _facts(payload)]},
            {"type": "TextBlock", "wrap": True, "isSubtle": True, "text": teams_text(str(payload.get("reason")))},
        ],
    }
    return {"type": "message", "attachments": [
        {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}]}


def teams_text(text: str) -> str:
    """Device-supplied text shown literally in a card: Teams renders a TextBlock's text and a
    fact's value as markdown, so `*x*` would be bold and `[label](url)` a disguised link.
    Markdown's punctuation gets a backslash (CommonMark's escape, which Teams honours);
    line breaks become spaces, as a blank line would start a new paragraph."""
    return _TEAMS_SPECIAL.sub(r"\\\g<0>", " ".join(text.splitlines()))


def redact_url(url: str) -> str:
    """A chat webhook's URL carries its secret in the path: listings show only the host."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…" if parts.netloc else "…"
