"""The email action under hostile conditions: a mail server that never finishes an
answer (a tarpit dripping a byte at a time) and an alert text with line breaks.
Real parts: a raw-socket SMTP tarpit in a thread, aiosmtpd, the real Notifier and SQLite.
"""

from __future__ import annotations

import socket
import threading

from gatewayd.core.alerts.notify import list_notifications
from gatewayd.core.alerts.rules import rule_from_dict
from gatewayd.core.config import SmtpSection
from gatewayd.testing.waiting import wait_until
from tests.test_notify import alerting, wait_for_state
from tests.test_notify_channels import Sink, email_rules, smtp_sink


class Tarpit:
    """Accepts SMTP connections and drips the greeting one byte every `every` s, for ever:
    each read gets a byte before the socket timeout, so only a deadline on the whole
    conversation ends it."""

    def __init__(self, every: float = 0.1):
        self.every = every
        self.stop = threading.Event()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.threads: list[threading.Thread] = []

    def __enter__(self):
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in list(self.threads):
            t.join(5)
        self.server.close()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._drip, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _drip(self, conn: socket.socket):
        with conn:
            greeting = b"220-" + b"x" * 10_000  # a continuation line that never ends
            for byte in greeting:
                if self.stop.wait(self.every):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return


async def test_a_tarpit_mail_server_cannot_hold_the_queue(tmp_path):
    """Each byte comes before the 0.3 s socket timeout: without a deadline on the whole
    exchange the delivery (and the notification batch it is part of) never ends."""
    with Tarpit(every=0.1) as tarpit:
        smtp = SmtpSection(host="127.0.0.1", port=tarpit.port, starttls=False)
        async with alerting(tmp_path, email_rules("a@site.example"), smtp=smtp, timeout_s=0.3) as (
                bus, _, storage, _m):
            await bus.emit("edgesentinel", "door-7", "door_forced")

            async def retried():
                rows = await storage.read(list_notifications, None, 10)
                return [r for r in rows if r["attempts"] >= 1] or None

            (row,) = await wait_until(retried, timeout=15, what="the tarpit delivery given up and retried")
    assert row["state"] == "pending" and "SMTP 127.0.0.1" in row["last_error"]


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


async def test_implicit_tls_still_names_the_server_it_verifies(tmp_path):
    """The deadline builds the client before connecting: it must still hand TLS the host
    name (a '' server_hostname is a ValueError, not a TLS failure against the plain sink)."""
    async with smtp_sink(Sink()) as port:
        smtp = SmtpSection(host="127.0.0.1", port=port, starttls=False, ssl=True)
        async with alerting(tmp_path, email_rules("a@site.example"), smtp=smtp, max_attempts=1) as (
                bus, _, storage, _m):
            await bus.emit("edgesentinel", "door-7", "door_forced")
            (row,) = await wait_for_state(storage, "failed")
    assert row["last_error"].startswith(f"gave up after 1 attempts: SMTP 127.0.0.1:{port}: [SSL")


async def test_slack_mrkdwn_control_characters_are_escaped(tmp_path):
    """`ctx.events.emit` takes any device id of 1-128 characters, and a rule's message is
    free text: `<!channel>` or `<https://evil|bank>` must reach Slack as text, not as a
    mention of everyone or a disguised link (Slack: escape &, <, > in mrkdwn)."""
    from tests.test_notify import Receiver, serving

    receiver = Receiver(200)
    async with serving(receiver) as url:
        rules = [rule_from_dict({"name": "tamper", "type": "tamper_detected", "cooldown_s": 0,
                                 "message": "lid open <!channel> & <https://evil.example|the portal>",
                                 "actions": [{"kind": "slack", "url": f"{url}/hook"}]}, "rules[0]")]
        async with alerting(tmp_path, rules) as (bus, _, storage, _m):
            await bus.emit("edgesentinel", "<!here>", "tamper_detected", severity="critical")
            await wait_for_state(storage, "sent")
    import json

    doc = json.loads(receiver.received[-1][1])
    header, section, context = doc["blocks"]
    assert "<!" not in doc["text"] and "&lt;!channel&gt; &amp; &lt;https://evil.example|the portal&gt;" in doc["text"]
    assert {"type": "mrkdwn", "text": "*Device*\n&lt;!here&gt;"} in section["fields"]
    assert "<" not in context["elements"][0]["text"]
    assert header["text"]["type"] == "plain_text" and "<!channel>" in header["text"]["text"]  # plain text: as is


async def test_teams_markdown_in_device_text_is_shown_literally(tmp_path):
    """Teams renders a card's TextBlock and fact values as markdown: a device named
    `*x*[link](http://evil)` must read as typed, not as bold text and a disguised link."""
    import json

    from tests.test_notify import Receiver, serving

    receiver = Receiver(200)
    async with serving(receiver) as url:
        rules = [rule_from_dict({"name": "tamper", "type": "tamper_detected", "cooldown_s": 0,
                                 "message": "lid open [see](http://evil)",
                                 "actions": [{"kind": "teams", "url": f"{url}/hook"}]}, "rules[0]")]
        async with alerting(tmp_path, rules) as (bus, _, storage, _m):
            await bus.emit("edgesentinel", "*x*[link](http://evil)", "tamper_detected", severity="critical")
            await wait_for_state(storage, "sent")
    card = json.loads(receiver.received[-1][1])["attachments"][0]["content"]
    title, facts, reason = card["body"]
    literal = r"\*x\*\[link\]\(http://evil\)"
    assert {"title": "Device", "value": literal} in facts["facts"]
    assert title["text"] == r"\[site-7\] CRITICAL tamper: lid open \[see\]\(http://evil\)"
    for block in (title["text"], reason["text"], *(f["value"] for f in facts["facts"])):
        assert "*x*" not in block and "](" not in block and "[see]" not in block


class Silent:
    """A mail server that accepts connections and never says a word (until the test ends)."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.server.close()

    def _accept(self):
        while not self.stop.is_set():
            try:
                self.accepted.append(self.server.accept()[0])
            except OSError:
                continue


async def test_a_mail_server_that_never_answers_holds_no_webhook(tmp_path):
    """Three alerts, each mailed and posted: the webhooks are delivered and saved while the
    mail server still sits on the first e-mails (a 60 s timeout, a 180 s deadline), and
    e-mails take two threads at a time, not one per e-mail."""
    from tests.test_notify import Receiver, serving

    receiver = Receiver(200)
    with Silent() as silent:
        async with serving(receiver) as url:
            rules = [rule_from_dict({"name": "door-forced", "type": "door_forced", "cooldown_s": 0, "actions": [
                {"kind": "email", "to": ["a@site.example"]}, {"kind": "webhook", "url": f"{url}/hook"}]}, "rules[0]")]
            smtp = SmtpSection(host="127.0.0.1", port=silent.port, starttls=False)
            async with alerting(tmp_path, rules, smtp=smtp, timeout_s=60) as (bus, _, storage, _m):
                for device in ("door-1", "door-2", "door-3"):
                    await bus.emit("edgesentinel", device, "door_forced")
                await wait_for_state(storage, "sent", 3)
                await wait_until(lambda: len(silent.accepted) >= 2, what="two e-mails at the mail server")
                rows = await storage.read(list_notifications, None, 10)
                accepted = len(silent.accepted)
    sent = sorted(r["action"] for r in rows if r["state"] == "sent")
    assert sent == ["webhook"] * 3 and len(receiver.received) == 3
    assert [(r["state"], r["attempts"]) for r in rows if r["action"] == "email"] == [("pending", 0)] * 3
    assert accepted == 2  # the third e-mail waits for a mail thread
