"""The email, slack and teams alert actions against real local servers: an SMTP sink
(aiosmtpd's Controller, in its own thread) and a webhook receiver (tests.test_notify's
QuartTrio app on hypercorn). The shapes themselves: gatewayd/core/alerts/channels.py.
"""

from __future__ import annotations

import email
import email.policy
import json
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from gatewayd.core.alerts.channels import slack_message, summary, teams_message
from gatewayd.core.alerts.rules import rule_from_dict
from gatewayd.core.config import SmtpSection, load_config
from gatewayd.core.schema import ConfigErrors
from gatewayd.testing import reserved_port
from tests.test_notify import Receiver, alerting, count, serving, wait_for_state


class Sink:
    """An SMTP server's handler: answers RCPT with the scripted codes in turn (the last repeats)."""

    def __init__(self, *rcpt_codes: str):
        self.rcpt_codes = rcpt_codes or ("250 OK",)
        self.rcpts = 0
        self.messages: list[tuple[str, list[str], email.message.EmailMessage]] = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        code = self.rcpt_codes[min(self.rcpts, len(self.rcpt_codes) - 1)]
        self.rcpts += 1
        if code.startswith("250"):
            envelope.rcpt_tos.append(address)
        return code

    async def handle_DATA(self, server, session, envelope):
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 Message accepted"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        if isinstance(auth_data, LoginPassword):
            self.logins.append((auth_data.login, auth_data.password))
            return AuthResult(success=auth_data.password == b"s3cret", handled=False)
        return AuthResult(success=False, handled=False)




@asynccontextmanager
async def smtp_sink(sink: Sink, **kw: Any):
    """A real SMTP server on 127.0.0.1 (aiosmtpd runs its asyncio loop in a thread)."""
    port = reserved_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port, authenticator=sink.authenticate,
                            auth_require_tls=False, **kw)
    await trio.to_thread.run_sync(controller.start)
    try:
        yield port
    finally:
        await trio.to_thread.run_sync(controller.stop)


def email_rules(*to: str):
    return [rule_from_dict({"name": "door-forced", "type": "door_forced", "cooldown_s": 0,
                            "actions": [{"kind": "email", "to": list(to)}]}, "rules[0]")]


async def test_an_email_reaches_a_real_smtp_server(tmp_path):
    sink = Sink()
    async with smtp_sink(sink) as port:
        smtp = SmtpSection(host="127.0.0.1", port=port, starttls=False, sender="gw@site.example")
        async with alerting(tmp_path, email_rules("maint@site.example", "l2@site.example"), smtp=smtp) as (
                bus, _, storage, metrics):
            event = await bus.emit("edgesentinel", "door-7", "door_forced", {"force_n": 310}, severity="critical")
            (row,) = await wait_for_state(storage, "sent")
    ((mail_from, rcpts, message),) = sink.messages
    assert (mail_from, rcpts) == ("gw@site.example", ["maint@site.example", "l2@site.example"])
    assert message["Subject"] == "[site-7] CRITICAL door-forced: door_forced (critical)"
    assert (message["From"], message["To"]) == ("gw@site.example", "maint@site.example, l2@site.example")
    assert message["X-Gatewayd-Delivery"] == str(row["id"])
    assert f"gatewayd.site-7.{row['id']}" in message["Message-ID"]
    body = message.get_content().replace("\r\n", "\n")
    assert "Device: door-7" in body and "Severity: critical" in body
    doc = json.loads(body.split("The alert as JSON:\n", 1)[1])
    assert (doc["event"]["id"], doc["event"]["data"], doc["to"]) == (event.id, {"force_n": 310},
                                                                      ["maint@site.example", "l2@site.example"])
    assert (row["action"], row["target"], row["attempts"]) == ("email", "mailto:maint@site.example,l2@site.example", 1)
    assert count(metrics, "sent") == 1


async def test_email_logs_in_with_the_password_from_its_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SMTP_PASSWORD", "s3cret")
    sink = Sink()
    async with smtp_sink(sink) as port:
        smtp = SmtpSection(host="127.0.0.1", port=port, starttls=False, user="gw", password_env="SMTP_PASSWORD")
        async with alerting(tmp_path, email_rules("a@site.example"), smtp=smtp) as (bus, _, storage, _m):
            await bus.emit("edgesentinel", "door-7", "door_forced")
            (row,) = await wait_for_state(storage, "sent")
    assert sink.logins == [(b"gw", b"s3cret")] and len(sink.messages) == 1
    assert "s3cret" not in json.dumps(row)


async def test_a_4xx_is_retried_a_5xx_or_a_bad_login_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SMTP_PASSWORD", "wrong")
    retry, refuse = Sink("450 4.2.1 mailbox busy", "250 OK"), Sink("550 5.1.1 no such user")
    async with smtp_sink(retry) as p1, smtp_sink(refuse) as p2, smtp_sink(Sink()) as p3:
        cases = [(p1, {}), (p2, {}), (p3, {"user": "gw", "password_env": "SMTP_PASSWORD"})]
        states = []
        for i, (port, login) in enumerate(cases):
            smtp = SmtpSection(host="127.0.0.1", port=port, starttls=False, **login)
            async with alerting(tmp_path / str(i), email_rules("a@site.example"), smtp=smtp) as (bus, _, storage, _m):
                await bus.emit("edgesentinel", "door-7", "door_forced")
                states.append(await wait_for_state(storage, "sent" if i == 0 else "failed"))
    (busy,), (unknown,), (login,) = states
    assert (busy["attempts"], busy["last_error"]) == (2, f"SMTP 127.0.0.1:{p1} refused every recipient: "
                                                         "a@site.example (450)")
    assert len(retry.messages) == 1 and refuse.messages == []
    assert (unknown["attempts"], unknown["last_error"]) == (1, f"SMTP 127.0.0.1:{p2} refused every recipient: "
                                                               "a@site.example (550)")
    assert login["attempts"] == 1 and login["last_error"].startswith(f"SMTP 127.0.0.1:{p3} answered 535")


async def test_email_without_a_server_or_starttls_fails_with_the_reason(tmp_path):
    async with smtp_sink(Sink()) as port:
        results = []
        for i, smtp in enumerate([None, SmtpSection(host="127.0.0.1", port=port, starttls=True),
                                  SmtpSection(host="127.0.0.1", port=reserved_port(), starttls=False)]):
            kw = {"max_attempts": 2}
            async with alerting(tmp_path / str(i), email_rules("a@site.example"), smtp=smtp, **kw) as (
                    bus, _, storage, _m):
                await bus.emit("edgesentinel", "door-7", "door_forced")
                (row,) = await wait_for_state(storage, "failed")
                results.append((row["attempts"], row["last_error"]))
    assert results[0] == (1, "no mail server: set [notifications.smtp] host")
    assert results[1] == (1, f"SMTP 127.0.0.1:{port}: STARTTLS extension not supported by server. "
                             "(set starttls = false, or ssl = true for port 465)")
    assert results[2][0] == 2 and results[2][1].startswith("gave up after 2 attempts: SMTP 127.0.0.1:")  # refused


@pytest.mark.parametrize("kind", ["slack", "teams"])
async def test_slack_and_teams_get_their_shapes_and_are_retried(tmp_path, kind):
    receiver = Receiver(503, 200)
    async with serving(receiver) as url:
        hook = f"{url}/hook"
        rules = [rule_from_dict({"name": "tamper", "type": "tamper_detected", "cooldown_s": 0,
                                 "actions": [{"kind": kind, "url": hook}]}, "rules[0]")]
        async with alerting(tmp_path, rules) as (bus, _, storage, _m):
            await bus.emit("edgesentinel", "door-7", "tamper_detected", {"lid": "open"}, severity="critical")
            (row,) = await wait_for_state(storage, "sent")
    assert len(receiver.received) == 2 and row["attempts"] == 2
    assert row["target"] == f"{kind}:{url}/…"  # the URL's path is the chat's secret: never listed
    doc = json.loads(receiver.received[-1][1])
    title = "[site-7] CRITICAL tamper: tamper_detected (critical)"
    if kind == "slack":
        assert doc["text"] == f":red_circle: {title}"
        header, section, context = doc["blocks"]
        assert header == {"type": "header", "text": {"type": "plain_text", "text": title}}
        assert {"type": "mrkdwn", "text": "*Device*\ndoor-7"} in section["fields"]
        assert context["elements"][0]["text"] == "tamper_detected (critical)"
    else:
        (attachment,) = doc["attachments"]
        assert (doc["type"], attachment["contentType"]) == ("message", "application/vnd.microsoft.card.adaptive")
        card = attachment["content"]
        escaped = r"\[site-7\] CRITICAL tamper: tamper\_detected \(critical\)"  # markdown in a card: as typed
        assert (card["type"], card["version"], card["body"][0]["text"]) == ("AdaptiveCard", "1.4", escaped)
        assert {"title": "Device", "value": "door-7"} in card["body"][1]["facts"]


def test_shapes_of_an_escalation():
    payload = {"gateway_id": "gw", "rule": "r", "level": "escalation", "severity": "warning", "message": "m",
               "reason": "why", "device_id": None, "event": None, "grouped": 3}
    assert summary(payload) == "[gw] WARNING r (escalation): m"
    assert {"type": "mrkdwn", "text": "*Grouped*\n3"} in slack_message(payload)["blocks"][1]["fields"]
    facts = teams_message(payload)["attachments"][0]["content"]["body"][1]["facts"]
    assert {"title": "Level", "value": "escalation"} in facts and all(f["title"] != "Device" for f in facts)


@pytest.mark.parametrize(("text", "error"), [
    ('[[rules]]\nname = "a"\ntype = "x"\nactions = [{ kind = "email", to = ["a@b.example"] }]\n',
     "rules[0].actions[0]: an email action needs [notifications.smtp] host"),
    ('[notifications.smtp]\nhost = "mx"\n[[rules]]\nname = "a"\ntype = "x"\nactions = [{ kind = "email" }]\n',
     "rules[0].actions[0].to: an email action needs at least one address"),
    ('[notifications.smtp]\nhost = "mx"\n[[rules]]\nname = "a"\ntype = "x"\n'
     'actions = [{ kind = "email", to = ["maintenance"] }]\n',
     "rules[0].actions[0].to[0]: expected an e-mail address, got 'maintenance'"),
    ('[[rules]]\nname = "a"\ntype = "x"\nactions = [{ kind = "slack", url = "hooks.slack.com" }]\n',
     "rules[0].actions[0].url: a slack action needs an http(s) URL, got 'hooks.slack.com'"),
    ('[notifications.smtp]\nhost = "mx"\nuser = "gw"\n', "notifications.smtp.password_env: a user needs password_env"),
    ('[notifications.smtp]\nhost = "mx"\nssl = true\n', "notifications.smtp.starttls: ssl = true already encrypts"),
    ('[notifications.smtp]\nhots = "mx"\n', "notifications.smtp.hots: unknown key"),
])
def test_config_mistakes_are_named(text, error):
    with pytest.raises(ConfigErrors) as e:
        load_config(None, [], {}, text=text)
    assert error in str(e.value)


def test_a_valid_smtp_section_loads():
    config = load_config(None, [], {}, text='[notifications.smtp]\nhost = "mx.site.example"\nport = 465\n'
                                            'ssl = true\nstarttls = false\nsender = "gw@site.example"\n'
                                            '[[rules]]\nname = "a"\ntype = "x"\n'
                                            'actions = [{ kind = "email", to = ["ops@site.example"] }]\n')
    smtp = config.notifications.smtp
    assert (smtp.host, smtp.port, smtp.ssl, smtp.from_address) == ("mx.site.example", 465, True, "gw@site.example")
    assert config.rules[0].actions[0].target == "mailto:ops@site.example"


def test_a_long_subject_is_not_folded():
    """A folded Subject reads back with a leading space in Python's parser (and some clients)."""
    from gatewayd.core.alerts.channels import email_message

    payload = {"gateway_id": "a-rather-long-gateway-name", "rule": "edgesentinel-connectivity-lost-l3",
               "severity": "critical", "message": "door controller still offline: escalated to L3"}
    raw = bytes(email_message(payload, sender="gw@site.example", to=["a@site.example"], delivery_id=9))
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == summary(payload) and len(summary(payload)) > 78
    assert b"\r\n" in raw and b"Subject: [a-rather-long" in raw


@pytest.mark.parametrize(("smtp", "warned"), [
    (SmtpSection(host="mx.site.example", starttls=False, user="gw", password_env="P"), True),
    (SmtpSection(host="mx.site.example", user="gw", password_env="P"), False),  # STARTTLS
    (SmtpSection(host="mx.site.example", port=465, ssl=True, starttls=False, user="gw", password_env="P"), False),
    (SmtpSection(host="mx.site.example", starttls=False), False),  # no login, no password to expose
    (SmtpSection(host="127.0.0.1", starttls=False, user="gw", password_env="P"), False),  # a relay on this box
])
async def test_a_login_over_cleartext_is_warned_at_start(tmp_path, caplog, smtp, warned):
    with caplog.at_level("WARNING", logger="gatewayd.notify"):
        async with alerting(tmp_path, [], smtp=smtp):
            pass
    records = [r for r in caplog.records if r.getMessage() == "[notifications.smtp] password sent in cleartext"]
    assert len(records) == warned
    if warned:
        assert records[0].fields["problem"].startswith("logs in to mx.site.example:587 as 'gw' over cleartext")
