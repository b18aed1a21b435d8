"""The notification queue against a real webhook receiver (QuartTrio on hypercorn, port 0).

Real time with short backoffs (50-200 ms): a mock clock would jump over the HTTP
round trips' own timeouts. Every test has a hard deadline.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import random
from contextlib import asynccontextmanager

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio

from gatewayd.core.alerts.events import EventBus
from gatewayd.core.alerts.notify import Notifier, list_notifications
from gatewayd.core.alerts.rules import rule_from_dict
from tests.core_schemas import install_schemas
from gatewayd.core.config import load_config
from gatewayd.core.metrics import Metrics
from gatewayd.core.storage import Storage
from gatewayd.testing import wait_until

SECRET = "webhook-test-secret"


class Receiver:
    """A webhook endpoint that answers the scripted statuses in turn (the last repeats)."""

    def __init__(self, *statuses: int):
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.got = trio.Event()
        self.app = QuartTrio("receiver")
        self.app.add_url_rule("/hook", "hook", self.hook, methods=["POST"])

    async def hook(self):
        body = await request.get_data()
        self.received.append(({k.lower(): v for k, v in request.headers.items()}, body))
        self.got.set()
        status = self.statuses[min(len(self.received), len(self.statuses)) - 1]
        return {"ok": status < 300}, status


@asynccontextmanager
async def serving(receiver: Receiver):
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(functools.partial(serve, receiver.app, config, shutdown_trigger=stop.wait))
        yield urls[0]
        stop.set()


def rules_for(url: str, name: str = "door-forced", **action):
    webhook = {"kind": "webhook", "url": url, "to": ["security"], **action}
    return [rule_from_dict({"name": name, "type": "door_forced", "cooldown_s": 0, "actions": [webhook]}, "rules[0]")]


@asynccontextmanager
async def alerting(tmp_path, rules, **notifier_kw):
    """Storage + Notifier + EventBus, running; yields (bus, notifier, storage, metrics)."""
    storage = Storage(tmp_path / "gw.sqlite3")
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        await trio.to_thread.run_sync(install_schemas, storage)
        kw = {"max_attempts": 5, "backoff_base_s": 0.05, "backoff_max_s": 0.2, "rng": random.Random(7), **notifier_kw}
        notifier = Notifier(storage, gateway_id="site-7", metrics=metrics, **kw)
        bus = EventBus(storage, rules=rules, notifier=notifier, metrics=metrics)
        await nursery.start(notifier.run)
        await nursery.start(bus.run)
        yield bus, notifier, storage, metrics
        nursery.cancel_scope.cancel()


async def wait_for_state(storage, state, n=1):
    async def rows():
        rows = await storage.read(list_notifications, None, 100)
        return sum(r["state"] == state for r in rows) >= n and rows

    return await wait_until(rows, what=f"{n} notification(s) {state}")


def count(metrics, state):
    return metrics.counter("gatewayd_notifications_total", "", ("state",)).value(state=state)


async def test_webhook_fails_twice_then_is_delivered_signed(tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    receiver = Receiver(500, 500, 200)
    async with serving(receiver) as url:
        async with alerting(tmp_path, rules_for(f"{url}/hook", secret_env="HOOK_SECRET")) as (bus, _, storage, metrics):
            event = await bus.emit("edgesentinel", "door-7", "door_forced", {"force_n": 310}, severity="critical")
            (row,) = await wait_for_state(storage, "sent")
    assert len(receiver.received) == 3
    headers, body = receiver.received[-1]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-gatewayd-signature"], expected)
    assert {h["x-gatewayd-delivery"] for h, _ in receiver.received} == {str(row["id"])}  # one delivery, retried
    doc = json.loads(body)
    assert (doc["rule"], doc["device_id"], doc["event_type"], doc["to"]) == ("door-forced", "door-7", "door_forced",
                                                                             ["security"])
    assert (doc["event"]["id"], doc["event"]["data"], doc["gateway_id"]) == (event.id, {"force_n": 310}, "site-7")
    assert (row["attempts"], row["last_error"]) == (3, f"HTTP 500 from {url}/hook")
    assert (count(metrics, "sent"), count(metrics, "retried"), count(metrics, "failed")) == (1, 2, 0)
    assert SECRET not in json.dumps(row)


async def test_gives_up_after_max_attempts(tmp_path):
    receiver = Receiver(503)
    async with serving(receiver) as url:
        async with alerting(tmp_path, rules_for(f"{url}/hook"), max_attempts=3) as (bus, notifier, storage, metrics):
            await bus.emit("edgesentinel", "door-7", "door_forced")
            (row,) = await wait_for_state(storage, "failed")
            assert notifier.depth == 0
    assert len(receiver.received) == 3
    assert row["last_error"] == f"gave up after 3 attempts: HTTP 503 from {url}/hook"
    assert (count(metrics, "failed"), count(metrics, "retried")) == (1, 2)


async def test_a_4xx_or_a_missing_secret_fails_at_once(tmp_path):
    receiver = Receiver(404)
    async with serving(receiver) as url:
        rules = rules_for(f"{url}/hook") + rules_for(f"{url}/hook", "unsigned", secret_env="NOT_SET_ANYWHERE")
        async with alerting(tmp_path, rules) as (bus, _, storage, _metrics):
            await bus.emit("edgesentinel", "door-7", "door_forced")
            rows = await wait_for_state(storage, "failed", 2)
    assert sorted((r["attempts"], r["last_error"]) for r in rows) == [
        (1, f"HTTP 404 from {url}/hook"),
        (1, "the webhook secret variable NOT_SET_ANYWHERE is not set"),
    ]
    assert len(receiver.received) == 1


async def test_mqtt_upstream_and_log_actions(tmp_path):
    published, forwarded = [], []

    async def publish(topic, payload, qos):
        published.append((topic, json.loads(payload), qos))

    async def forward(record):
        forwarded.append(record)

    rules = load_config(None, [], {}, text="""
[[rules]]
name = "hot"
type = "status"
when = ["temperature > 65"]
actions = [{ kind = "mqtt", topic = "site/alerts/{family}/{device}", qos = 1 }, { kind = "upstream" }, { kind = "log" }]
""").rules
    async with alerting(tmp_path, rules) as (bus, notifier, storage, _):
        notifier.publish_mqtt, notifier.forward_upstream = publish, forward
        assert await bus.observe("streetlight", "SL001", "status", {"temperature": 60}) is None
        stored = await bus.observe("streetlight", "SL001", "status", {"temperature": 70})
        assert stored is not None and stored.id is not None  # stored because a rule fired
        await wait_for_state(storage, "sent", 3)
    ((topic, doc, qos),) = published
    assert (topic, qos, doc["rule"], doc["event"]["data"]) == ("site/alerts/streetlight/SL001", 1, "hot",
                                                               {"temperature": 70})
    ((record,),) = [forwarded]
    assert (record["class"], record["rule"], record["severity"]) == ("alert", "hot", "info")


async def test_without_mqtt_an_mqtt_action_fails_with_the_reason(tmp_path):
    rules = load_config(None, [], {}, text="""
[[rules]]
name = "m"
type = "x"
actions = [{ kind = "mqtt", topic = "a/b" }]
""").rules
    async with alerting(tmp_path, rules) as (bus, _, storage, _):
        await bus.emit("fam", "d", "x")
        (row,) = await wait_for_state(storage, "failed")
    assert row["last_error"] == "MQTT is not available (mqtt.broker = 'off'?)"


async def test_pending_notifications_survive_a_restart(tmp_path):
    receiver = Receiver(200)
    async with serving(receiver) as url:
        rules = rules_for(f"{url}/hook")
        storage = Storage(tmp_path / "gw.sqlite3")
        async with trio.open_nursery() as nursery:  # a gateway that queues, then stops before delivering
            await nursery.start(storage.run)
            await trio.to_thread.run_sync(install_schemas, storage)
            bus = EventBus(storage, rules=rules, notifier=Notifier(storage, gateway_id="gw"))
            await bus.emit("edgesentinel", "door-7", "door_forced")
            nursery.cancel_scope.cancel()
        assert receiver.received == []
        async with alerting(tmp_path, rules) as (_, _, storage, _):
            (row,) = await wait_for_state(storage, "sent")
    assert len(receiver.received) == 1 and row["attempts"] == 1


def test_queue_depth_metric_is_exposed():
    metrics = Metrics()
    notifier = Notifier(None, gateway_id="gw", metrics=metrics)
    notifier.depth = 4
    text = metrics.render()
    assert "gatewayd_notification_queue_depth 4" in text
    assert "# TYPE gatewayd_notifications_total counter" in text



async def test_a_payload_with_nan_is_never_sent(tmp_path):
    """Strict JSON on the wire: a queued row holding NaN (written by an older gateway)
    fails with the reason instead of reaching the receiver as `{"v":NaN}`."""
    from gatewayd.core.alerts.notify import CoreNotification

    receiver = Receiver(200)
    async with serving(receiver) as url:
        rules = rules_for(f"{url}/hook")
        storage = Storage(tmp_path / "gw.sqlite3")
        async with trio.open_nursery() as nursery:  # queue one notification, stop before delivering
            await nursery.start(storage.run)
            await trio.to_thread.run_sync(install_schemas, storage)
            bus = EventBus(storage, rules=rules, notifier=Notifier(storage, gateway_id="gw"))
            await bus.emit("edgesentinel", "door-7", "door_forced")
            await storage.write(lambda: CoreNotification.update(payload='{"v": NaN}').execute())
            nursery.cancel_scope.cancel()
        async with alerting(tmp_path, rules) as (_, _, storage, _):
            (row,) = await wait_for_state(storage, "failed")
    assert receiver.received == []
    assert row["last_error"].startswith("notification is not strict JSON")


class HeldEndpoint(Receiver):
    """/held answers nothing until `release`; /hook answers 200 at once."""

    def __init__(self):
        super().__init__(200)
        self.release = trio.Event()
        self.held: list[bytes] = []
        self.app.add_url_rule("/held", "held", self.hold, methods=["POST"])

    async def hold(self):
        self.held.append(await request.get_data())
        await self.release.wait()
        return {"ok": True}


async def test_a_held_endpoint_holds_only_its_own_deliveries(tmp_path):
    """Ten alerts for an endpoint that does not answer, then one for another: the other is
    delivered and saved meanwhile, and the held one has two deliveries under way, not
    every slot of the worker (concurrency 8)."""
    receiver = HeldEndpoint()
    async with serving(receiver) as url:
        rules = rules_for(f"{url}/held", "slow") + [rule_from_dict(
            {"name": "quick", "type": "tamper", "actions": [{"kind": "webhook", "url": f"{url}/hook"}]}, "rules[1]")]
        async with alerting(tmp_path, rules, timeout_s=60) as (bus, notifier, storage, _m):
            for i in range(10):
                await bus.emit("edgesentinel", f"door-{i}", "door_forced")
            await wait_until(lambda: len(receiver.held) >= 2, what="the held endpoint's first deliveries")
            await bus.emit("edgesentinel", "door-0", "tamper")
            (quick,) = [r for r in await wait_for_state(storage, "sent") if r["state"] == "sent"]
            under_way = len(receiver.held)
            receiver.release.set()
            await wait_for_state(storage, "sent", 11)
    assert (quick["rule"], quick["attempts"]) == ("quick", 1) and len(receiver.received) == 1
    assert under_way == 2 and len(receiver.held) == 10
