"""MQTT ingest throughput: a bare paho-on-trio consumer vs MQTTClient with durable writes.

    python bench/mqtt_bench.py [--messages N] [--runs 3] [--mode backlog|live]

Both consumers read from the same local mosquitto (a ManagedBroker on a free port) the
same QoS 1 messages, sent by the same publisher: a plain paho client in a separate
process.

- bare:    paho driven by trio (wait_readable + loop_read), automatic PUBACK, stores nothing.
- durable: gatewayd.core.mqtt.MQTTClient and the gateway's delivery pool (with delivery
           marks), manual PUBACK after a handler that waits for a durable write through
           the gateway's own Storage (writer thread, group commit, WAL,
           synchronous=NORMAL): one prepared INSERT per message, acked after COMMIT.

Modes: ``backlog`` (default) publishes N messages into each consumer's persistent session
while it is offline, then times the consumer draining them: this measures the consumer,
not the publisher. ``live`` runs the publisher while the consumer is connected.
Prints msgs/s (median of the runs) and durable/bare. Goal: durable >= 80% of bare.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from gatewayd.core.mqtt.broker import AclTemplate, BrokerAccount, ManagedBroker, find_mosquitto, hash_password  # noqa: E402
from gatewayd.core.mqtt.client import InboundMessage, MQTTClient, MQTTSettings  # noqa: E402
from gatewayd.core.mqtt.delivery import Delivery, DeliveryPool  # noqa: E402
from gatewayd.core.mqtt.marks import DeliveryMarks  # noqa: E402
from gatewayd.core.storage import Storage  # noqa: E402
from gatewayd.protocol.topics import TopicRouter  # noqa: E402
from gatewayd.testing.mqtt import free_port  # noqa: E402

TOPIC = "bench/dev1/data"
PAYLOAD = b'{"t": 1700000000.123, "temp": 21.5, "hum": 40.2, "seq": %d}'
DEVICE = ("dev1", "bench-device-password")


# --- the publisher (a separate process) ---------------------------------------------------


def publisher_main(host: str, port: int, count: int) -> None:
    """Publish ``count`` QoS 1 messages as fast as the broker acknowledges them."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher", protocol=paho.MQTTv5)
    c.username_pw_set(*DEVICE)
    c.max_inflight_messages_set(1000)
    c.connect(host, port, 30)
    c.loop_start()
    t0 = time.perf_counter()
    infos = [c.publish(TOPIC, PAYLOAD % i, qos=1) for i in range(count)]
    for info in infos:
        info.wait_for_publish(30)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    print(f"{count / dt:.0f}", flush=True)


async def publish(broker: ManagedBroker, count: int) -> float:
    """Run the publisher process; returns its own rate (msgs/s, PUBACKed)."""
    cmd = [sys.executable, __file__, "--publisher", broker.host, str(broker.port), str(count)]
    proc = await trio.run_process(cmd, capture_stdout=True)
    return float(proc.stdout.decode().strip())


# --- the durable-write stand-in -----------------------------------------------------------


def _insert(database: Any, topic: str, payload: bytes, at: float) -> None:
    # What a plugin's handler does on its hot path: one prepared INSERT on the writer's
    # connection, inside the group-commit transaction (gatewayd.core.storage).
    database.connection().execute("INSERT INTO reading VALUES (?, ?, ?)", (topic, payload, at))


# --- the two consumers --------------------------------------------------------------------


class BareConsumer:
    """paho on trio with automatic PUBACK and no storage: the baseline."""

    def __init__(self, broker: ManagedBroker, client_id: str, protocol: str) -> None:
        user, password = broker.gateway_credentials()
        if protocol == "5":
            self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            props.ReceiveMaximum = 256  # as MQTTClient's default max_in_flight
            self.c.connect_async(broker.host, broker.port, 30, clean_start=False, properties=props)
        else:
            self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
            self.c.connect_async(broker.host, broker.port, 30)
        self.c.username_pw_set(user, password)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(TOPIC, 1)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.c.on_message = self._on_message
        self.count = 0
        self.target = 0
        self.first = self.last = 0.0
        self.done = trio.Event()
        self.subscribed = trio.Event()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        self.count += 1
        if self.count == 1:
            self.first = time.perf_counter()
        if self.count == self.target:
            self.last = time.perf_counter()
            self.done.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.c.reconnect()
        sock = self.c.socket()
        async with trio.open_nursery() as n:
            n.start_soon(self._misc)
            task_status.started()
            try:
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    # the same drain loop as MQTTClient: read while packets keep coming
                    for _ in range(64):
                        before = self.count
                        self.c.loop_read()
                        if self.count == before:
                            break
                    while self.c.want_write():
                        await trio.lowlevel.wait_writable(sock)
                        self.c.loop_write()
            finally:
                self.c.disconnect()
                self.c.loop_write()

    async def _misc(self) -> None:
        while True:
            await trio.sleep(1)
            self.c.loop_misc()


async def run_bare(broker: ManagedBroker, count: int, mode: str, run: int, protocol: str) -> float:
    cid = f"bench-bare-{run}"
    cons = BareConsumer(broker, cid, protocol)
    cons.target = count
    async with trio.open_nursery() as n:
        if mode == "backlog":
            scope = trio.CancelScope()

            async def first_connect() -> None:
                with scope:
                    await cons.run()

            n.start_soon(first_connect)
            await cons.subscribed.wait()
            scope.cancel()
            await trio.sleep(0.1)
            await publish(broker, count)
            cons = BareConsumer(broker, cid, protocol)
            cons.target = count
            await n.start(cons.run)
        else:
            await n.start(cons.run)
            await cons.subscribed.wait()
            n.start_soon(publish, broker, count)
        await cons.done.wait()
        n.cancel_scope.cancel()
    return (count - 1) / (cons.last - cons.first)


async def run_durable(
    broker: ManagedBroker, count: int, mode: str, run: int, db_dir: Path, protocol: str, store_it: bool = True
) -> float:
    store = Storage(db_dir / f"durable-{run}.sqlite3")
    user, password = broker.gateway_credentials()
    settings = MQTTSettings(
        host=broker.host, port=broker.port, client_id=f"bench-durable-{run}",
        username=user, password=password, status_topic=None, protocol=protocol,  # type: ignore[arg-type]
    )
    state = {"n": 0, "first": 0.0, "last": 0.0}
    done = trio.Event()

    async def handler(msg: InboundMessage) -> None:
        if state["n"] == 0:
            state["first"] = time.perf_counter()
        if store_it:  # --no-store: the client's own dispatch and manual-ack cost alone
            await store.write(_insert, store.database, msg.topic, msg.payload, time.time())
        state["n"] += 1
        if state["n"] == count:
            state["last"] = time.perf_counter()
            done.set()

    async with trio.open_nursery() as n:
        await n.start(store.run)
        await store.write(lambda: store.database.execute_sql(
            "CREATE TABLE IF NOT EXISTS reading (topic TEXT, payload BLOB, at REAL)"))
        marks = DeliveryMarks(store)
        await trio.to_thread.run_sync(marks.install)

        async def make_async() -> MQTTClient:
            pool = DeliveryPool(Delivery(TopicRouter(), store, marks=marks), size=256)
            await n.start(pool.run)
            client = MQTTClient(settings, pool, logging.getLogger("bench"))
            client.subscribe(TOPIC, handler)
            return client

        client = await make_async()
        if mode == "backlog":
            await n.start(client.run)
            await client.stop()
            await publish(broker, count)
            client = await make_async()
            await n.start(client.run)
        else:
            await n.start(client.run)
            n.start_soon(publish, broker, count)
        await done.wait()
        await client.stop()
        if os.environ.get("BENCH_DEBUG"):
            print(client.stats, "commits", store.stats["commits"], file=sys.stderr)
        n.cancel_scope.cancel()
    with sqlite3.connect(store.path) as db:
        stored = db.execute("SELECT count(*) FROM reading").fetchone()[0]
    assert stored >= count or not store_it, (stored, count)
    return (count - 1) / (state["last"] - state["first"])


async def main(args: argparse.Namespace) -> None:
    if find_mosquitto() is None:
        sys.exit("mosquitto is not installed (apt-get install mosquitto)")
    with tempfile.TemporaryDirectory() as tmp:
        broker = ManagedBroker(
            Path(tmp) / "mosquitto", port=free_port(),
            accounts=[BrokerAccount(DEVICE[0], hash_password(DEVICE[1]))],
            acl_templates=[AclTemplate("bench/%u/#", "write")],
            max_queued_messages=max(100_000, args.messages * 2),
        )
        async with trio.open_nursery() as n:
            await n.start(broker.run)
            pub_rate = await publish(broker, min(args.messages, 5000))  # warm-up + publisher's pace
            bare, durable = [], []
            for run in range(args.runs):
                bare.append(await run_bare(broker, args.messages, args.mode, run, args.protocol))
                durable.append(await run_durable(
                    broker, args.messages, args.mode, run, Path(tmp), args.protocol, not args.no_store))
                print(f"run {run + 1}: bare {bare[-1]:8.0f} msg/s   durable {durable[-1]:8.0f} msg/s", flush=True)
            n.cancel_scope.cancel()
    b, d = statistics.median(bare), statistics.median(durable)
    print(f"\nmode={args.mode} messages={args.messages} MQTT {args.protocol} QoS 1, payload {len(PAYLOAD % 0)} B, "
          f"publisher alone ~{pub_rate:.0f} msg/s, sys.setswitchinterval({args.switch_interval}), "
          f"gc {'default' if args.default_gc else 'tune_gc() as gatewayd run'}")
    print("durable write = gatewayd.core.storage.Storage.write (writer thread, group commit, WAL/NORMAL)")
    print(f"bare paho-on-trio, auto ack      : {b:8.0f} msg/s (median of {args.runs})")
    print(f"MQTTClient, manual ack + durable : {d:8.0f} msg/s (median of {args.runs})")
    print(f"ratio durable/bare               : {d / b:8.1%}   (goal >= 80%)")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--publisher":
        publisher_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mode", choices=["backlog", "live"], default="backlog")
    parser.add_argument("--no-store", action="store_true", help="MQTTClient with a handler that stores nothing")
    parser.add_argument("--default-gc", action="store_true", help="keep Python's GC thresholds (no tune_gc)")
    parser.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1")  # what the local client should use
    # The writer thread re-takes the GIL after every sleep/step/commit; at the default
    # 5 ms switch interval each of those can wait behind the busy trio thread.
    parser.add_argument("--switch-interval", type=float, default=0.0005)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("gatewayd.broker").setLevel(logging.ERROR)
    parsed = parser.parse_args()
    sys.setswitchinterval(parsed.switch_interval)
    if not parsed.default_gc:
        from gatewayd.core.runtime import tune_gc

        tune_gc()  # what `gatewayd run` does; both consumers run in this process
    trio.run(main, parsed)
