"""The email action under hostile conditions: a mail server that never finishes an
answer (a tarpit dripping a byte at a time) and an alert text with line breaks.
Real parts: a raw-socket SMTP tarpit in a thread, aiosmtpd, the real Notifier and SQLite.
"""

from __future__ import annotations

from gatewayd.core.alerts.rules import rule_from_dict
from gatewayd.core.config import SmtpSection
from tests.test_notify import alerting, wait_for_state
from tests.test_notify_channels import Sink, email_rules, smtp_sink


async def test_a_multi_line_rule_message_still_mails_with_a_one_line_subject(tmp_path):
    """A TOML multi-line `message` is legal config: the e-mail must not fail for ever with
    'not strict JSON' (the header refuses CR/LF); the subject is folded to one line."""
    rules = [rule_from_dict({"name": "door-forced", "type": "door_forced", "cooldown_s": 0,
                             "message": "door forced open\nBcc: everyone@example.com\r\ncheck the site",
                             "actions": [{"kind": "email", "to": ["a@site.example"]}]}, "rules[0]")]
    sink = Sink()
    async with smtp_sink(sink) as port:
        smtp = SmtpSection(host="127.0.0.1", port=port, starttls=False, sender="gw@site.example")
        async with alerting(tmp_path, rules, smtp=smtp) as (bus, _, storage, _m):
            await bus.emit("edgesentinel", "door-7", "door_forced")
            await wait_for_state(storage, "sent")
    ((_, rcpts, message),) = sink.messages
    assert rcpts == ["a@site.example"] and message["Bcc"] is None
    assert message["Subject"] == ("[site-7] INFO door-forced: door forced open Bcc: everyone@example.com "
                                  "check the site")
    assert "door forced open\nBcc: everyone@example.com" in message.get_content().replace("\r\n", "\n")
