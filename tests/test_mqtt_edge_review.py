"""Attacks on the MQTT edge (docs/mqtt.md), kept as regression tests: each test reproduces
one bug an adversarial review found with real parts (a running gateway with its managed
mosquitto, raw sockets speaking MQTT bytes, a real `gatewayd run` subprocess with paku).

Every test here failed on the edge as it was first written (one socket written by two
tasks, per-connection windows, unbounded queues and caches, a loopback port for the
private mosquitto); each docstring says what went wrong then.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import gatewayd_paku
import pytest
import trio

from gatewayd import testing
from gatewayd.plugins.api import StorageFull
from gatewayd.protocol import mqtt_packets as mp
from gatewayd.testing import gw_client, gw_mqtt_address, reserved_port, storage_full, wait_until

from .test_mqtt_edge import EdgePlugin, RawDevice, provision, stored_records

PAKU = [("paku", gatewayd_paku)]


@pytest.fixture
def plugin():
    return EdgePlugin()


@pytest.fixture
async def edge(gateway_factory, plugin):
    async with gateway_factory(plugins=[("edgetest", plugin)], mqtt=True) as gw:
        yield gw, gw_mqtt_address(gw)[1]


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(b)) + b


def connect5(username: str, password: str, *, keepalive: int = 30) -> bytes:
    """An MQTT 5 CONNECT, clean start, no properties."""
    body = _s("MQTT") + bytes([5, 0xC2]) + struct.pack("!H", keepalive) + b"\x00" + _s(username) + _s(username)
    body += _s(password)
    return b"\x10" + mp._encode_length(len(body)) + body


async def connect_v5(port: int, username: str, password: str) -> tuple[RawDevice, bytes]:
    """An MQTT 5 device (the account must already be loaded); returns it and its CONNACK."""
    dev = RawDevice(await trio.open_tcp_stream("127.0.0.1", port))
    await dev.stream.send_all(connect5(username, password))
    kind, _, raw, start = await dev.read()
    assert kind == mp.CONNACK and mp.parse_connack(raw, start, 5).reason_code == 0
    return dev, raw


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


# -- one device crashes the gateway ---------------------------------------------------------


async def test_an_mqtt5_device_that_does_not_read_and_sends_a_malformed_packet_does_not_crash_the_gateway(
        edge, plugin):
    """A protocol error on an MQTT 5 connection made the edge send a DISCONNECT straight
    on the device's stream, outside the send lock, while another task was blocked
    sending to a device that does not read: trio raised BusyResourceError, nothing
    caught it, and it ended the whole gateway (a real `gatewayd run` exited with status
    1). Now one task writes each stream."""
    gw, port = edge
    user, password = await provision(gw, "d1")
    await RawDevice.connect(port, user, password)  # the account is loaded
    dev, _ = await connect_v5(port, user, password)
    dev.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await dev.stream.send_all(mp.encode_publish("dev/d1/data", b"x", 2, packet_id=1, protocol_level=5))
    await wait_until(lambda: plugin.stored)
    # The device reads nothing from here on; each resend is answered with a PUBREC.
    resend = mp.encode_publish("dev/d1/data", b"x", 2, dup=True, packet_id=1, protocol_level=5)
    with trio.move_on_after(2):
        await dev.stream.send_all(resend * 200_000)
    await trio.sleep(0.3)
    # A PUBLISH with QoS 3: malformed. (The edge may not read it at all: it stops reading
    # a device that does not read its acknowledgements.)
    with trio.move_on_after(2):
        await dev.stream.send_all(b"\x36\x05\x00\x01a\x00\x01")
    await trio.sleep(0.5)
    # The gateway is still there for everyone else.
    other_user, other_pw = await provision(gw, "d2")
    calm = await RawDevice.connect(port, other_user, other_pw)
    with trio.fail_after(5):
        await calm.publish("dev/d2/data", b"still here", packet_id=1)
        assert await calm.expect_ack() == 1


async def test_a_stalled_broker_and_a_busy_device_do_not_crash_the_gateway(edge, plugin):
    """Two tasks wrote to a session's mosquitto stream: the relay and the keepalive on the
    device's behalf, without a lock. When mosquitto stops reading for a moment (SIGSTOP
    here; a long autosave on slow flash, a descheduled VM) the ping blocked in send_all,
    the next relayed packet met it, trio raised BusyResourceError and the gateway ended.
    Ordinary traffic, no malice needed. Now one task writes each stream."""
    gw, port = edge
    user, password = await provision(gw, "d1")
    dev = await RawDevice.connect(port, user, password, keepalive=2)
    broker_pid = gw.mqtt.broker.pid
    os.kill(broker_pid, signal.SIGSTOP)
    try:
        # Relayed traffic (another topic) until the way to mosquitto is full and the
        # edge stops reading the device; kept publishes and the device's own pings in
        # between, so the edge's keepalive pings queue up behind them.
        with trio.move_on_after(8):
            for cycle in range(1, 60):
                await dev.stream.send_all(mp.encode_publish("other/topic", b"y" * 16_000, 0))
                await dev.stream.send_all(mp.encode_publish("dev/d1/data", f"kept {cycle}".encode(), 1,
                                                            packet_id=cycle))
                await dev.stream.send_all(b"\xc0\x00")
                await trio.sleep(0.1)
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    other_user, other_pw = await provision(gw, "d2")
    calm = await RawDevice.connect(port, other_user, other_pw)
    with trio.fail_after(5):
        await calm.publish("dev/d2/data", b"still here", packet_id=1)
        assert await calm.expect_ack() == 1


# -- nothing stored twice ----------------------------------------------------------------------


async def test_a_resend_on_a_new_connection_while_the_first_copy_waits_for_storage_is_stored_once(edge, plugin):
    """Disk full: the message waits in the gateway, unacknowledged, as documented. The
    device reconnects (as it does when its PINGREQs go unanswered: a full window is not
    read) and sends it again with DUP. No mark is committed yet and in-flight ids are
    per connection, so a second delivery starts; when storage is back both commit."""
    gw, port = edge
    user, password = await provision(gw, "d1")
    dev = await RawDevice.connect(port, user, password)
    reading = b"reading-1 " * 20_000
    async with storage_full(gw):
        await dev.publish("dev/d1/data", reading, packet_id=1)
        await wait_until(lambda: gw.mqtt.delivery.stats.storage_waits >= 1)
        await dev.stream.aclose()
        dev = await RawDevice.connect(port, user, password)
        await dev.publish("dev/d1/data", reading, packet_id=1, dup=True)
        await wait_until(lambda: gw.mqtt.delivery.stats.storage_waits >= 3)
    with trio.fail_after(10):
        assert await dev.expect_ack() == 1
    await trio.sleep(1)
    assert len(await stored_records(gw)) == 1, "one message, stored twice"


async def test_a_storage_retry_after_a_partial_commit_does_not_store_the_records_twice(
        gateway_factory, upstream_receiver, monkeypatch):
    """paku's OTA event commits the event (with the delivery mark), then writes the OTA
    report. If the disk fills in between, StorageFull makes the delivery run the whole
    handler again, and the event already committed is ingested a second time under a
    new record id (upstream too). The same holds for on_state's firmware update and for
    two plugins subscribed to one topic. (After a crash in the same place, the device's
    DUP resend is answered 'duplicate' and the OTA report is never written.)"""
    async with gateway_factory(plugins=PAKU, mqtt=True, upstream=upstream_receiver) as gw:
        port = gw_mqtt_address(gw)[1]
        creds = await testing.provision(gw, "paku", "pk-1")
        store = gw.contexts["paku"].ota._store
        real_report = store.report
        calls = 0

        async def report(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == 1:
                raise StorageFull("database or disk is full")  # the disk filled after the event's commit
            return await real_report(*args, **kwargs)

        monkeypatch.setattr(store, "report", report)
        dev = await RawDevice.connect(port, creds.mqtt.username, creds.mqtt.password)
        payload = json.dumps({"status": "installed", "version": "1.2.0"}).encode()
        with trio.fail_after(10):
            await dev.publish("paku/pk-1/event/ota", payload, packet_id=1)
            assert await dev.expect_ack() == 1
        await trio.sleep(2)
        events = [r for r in upstream_receiver.records() if r["kind"] == "event"]
        rows = await gw.storage.read(
            lambda: gw.storage.database.execute_sql("SELECT count(*) FROM paku_event").fetchone()[0])
        assert (len(events), rows) == (1, 1), "one OTA event, stored and sent upstream twice"


# -- acknowledged before the commit -------------------------------------------------------------


async def test_an_mqtt5_topic_alias_does_not_get_an_acknowledgement_before_the_commit(edge, plugin):
    """docs/mqtt.md said topic aliases were 'not allowed (mosquitto's max_topic_alias 0)'.
    mosquitto 2.0.11 advertises Topic Alias Maximum 10 anyway (the edge relays its
    CONNACK unchanged) and accepts them; the edge relayed every PUBLISH with an alias, so
    mosquitto acknowledged it on receipt, before any commit, and handed it to the gateway's
    own client: the device was told 'received' about a message nothing stored yet. Now
    the edge resolves aliases itself."""
    gw, port = edge
    user, password = await provision(gw, "d1")
    await RawDevice.connect(port, user, password)
    dev, connack = await connect_v5(port, user, password)
    props = b"\x03\x23\x00\x01"  # property length 3: Topic Alias 1
    body = _s("dev/d1/data") + b"\x00\x01" + props + b"block"
    await dev.stream.send_all(b"\x32" + mp._encode_length(len(body)) + body)
    await wait_until(lambda: plugin.calls >= 1)
    with trio.move_on_after(0.5) as waited:
        await dev.read()
    assert waited.cancelled_caught, "acknowledged before the handler returned"
    plugin.release.set()


# -- what a handler is told ---------------------------------------------------------------------


async def test_a_devices_retained_state_sent_again_is_stored_again(gateway_factory, upstream_receiver):
    """A broker forwarding a live PUBLISH to a subscriber clears RETAIN ([MQTT-3.3.1-9]);
    RETAIN set means 'the stored copy, on subscribe', and paku drops such a state when it
    equals the stored one. The edge passes the device's own flag through, so a device that
    publishes its (unchanged) state retained, as birth messages are, has it dropped as a
    'duplicate': not stored, not sent upstream, its presence not refreshed."""
    async with gateway_factory(plugins=PAKU, mqtt=True, upstream=upstream_receiver) as gw:
        port = gw_mqtt_address(gw)[1]
        creds = await testing.provision(gw, "paku", "pk-1")
        dev = await RawDevice.connect(port, creds.mqtt.username, creds.mqtt.password)
        state = json.dumps({"status": "online", "rssi": -60}).encode()
        with trio.fail_after(5):
            for pid in (1, 2):
                await dev.stream.send_all(mp.encode_publish("paku/pk-1/state", state, 1, retain=True, packet_id=pid))
                assert await dev.expect_ack() == pid
                await trio.sleep(1.1)
        await trio.sleep(1)
        states = [r for r in upstream_receiver.records() if r["kind"] == "state"]
        assert len(states) == 2, "the device's second state report was dropped as a broker's retained copy"


async def test_the_private_broker_is_a_socket_only_the_gateways_user_reaches(edge, plugin):
    """mosquitto listened on an unprivileged loopback port (named in the 0644
    mosquitto.conf). When mosquitto restarted (after a crash: 0.5 s to 60 s of backoff),
    any local process could bind that port first: the gateway's client then sent it the
    gateway's own password, and the edge relayed every device's CONNECT, password
    included. Now it is a unix socket in a 0700 directory, re-made at each start."""
    gw, port = edge
    user, password = await provision(gw, "d1")
    broker = gw.mqtt.broker
    path = Path(broker.socket)
    assert path.is_socket() and (path.parent.stat().st_mode & 0o777) == 0o700
    conf = broker.conf_path.read_text()
    listeners = [line for line in conf.splitlines() if line.startswith("listener")]
    assert listeners == [f"listener 0 {path}"], "mosquitto listens on a TCP port"
    os.kill(broker.pid, signal.SIGKILL)  # a mosquitto crash leaves its socket file behind
    with trio.fail_after(20):
        while True:  # the restarted mosquitto binds it again, and devices get in
            await trio.sleep(0.5)
            try:
                dev = await RawDevice.connect(port, user, password)
            except (AssertionError, TimeoutError, trio.BrokenResourceError, OSError):
                continue
            break
        await dev.publish("dev/d1/data", b"after the crash", packet_id=1)
        assert await dev.expect_ack() == 1


# -- memory ---------------------------------------------------------------------------------------


async def test_a_device_that_never_reads_cannot_grow_the_gateways_memory(edge, plugin):
    """Acknowledgements the edge writes itself go to an unbounded list (_out). A device
    that sends one QoS 2 message and then resends it (each answered with a PUBREC, no
    delivery, no storage, no window) without ever reading grows the gateway by ~45 bytes
    per 20-byte packet, for as long as it likes."""
    gw, port = edge
    user, password = await provision(gw, "d1")
    dev = await RawDevice.connect(port, user, password)
    dev.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await dev.publish("dev/d1/data", b"x", packet_id=1, qos=2)
    assert await dev.expect_ack(mp.PUBREC) == 1
    session = next(iter(gw.mqtt.edge.sessions))
    resend = mp.encode_publish("dev/d1/data", b"x", 2, dup=True, packet_id=1)
    with trio.move_on_after(4):
        for _ in range(100):
            await dev.stream.send_all(resend * 5000)
    await trio.sleep(0.3)
    queued = session._to_device.size
    assert queued < 1 << 20, f"{queued} bytes of acknowledgements queued for a device that does not read"


async def test_topic_names_a_device_sends_are_not_kept_after_it_left(edge, plugin):
    """The edge asks the router for the handlers of every new topic a device publishes to,
    before the ACL check; the router caches each answer (10,000 topics, topic names up to
    64 KiB), and each connection caches 1,024 more. 3,000 QoS 0 PUBLISHes on 60 KB topics
    the device may not even write leave ~180 MB behind (measured RSS: +183 MB)."""
    gw, port = edge
    user, password = await provision(gw, "d1")
    dev = await RawDevice.connect(port, user, password)
    for i in range(3000):
        await dev.stream.send_all(mp.encode_publish(f"dev/d1/{i:06d}/" + "x" * 60_000, b"", 0))
    await dev.stream.send_all(b"\xc0\x00")  # PINGREQ: everything before it was read once it is answered
    with trio.fail_after(30):
        while (await dev.read())[0] != mp.PINGRESP:
            pass
    await dev.stream.aclose()
    await wait_until(lambda: gw.mqtt.edge.stats.connections == 0)
    kept = sum(map(len, gw.mqtt.router._cache))
    assert kept < 10 << 20, f"{kept / 1e6:.0f} MB of one device's topic names kept by the router"


async def test_unauthenticated_connections_cannot_make_the_gateway_hold_a_megabyte_each(edge):
    """Before CONNECT was complete the edge buffered up to mqtt.max_packet_bytes (1 MiB) per
    connection for up to 10 s, with no cap on such connections: 200 sockets that never
    logged in cost the gateway ~190 MB."""
    gw, port = edge
    before = rss_mb()
    streams = []
    try:
        start = b"\x10\xff\xff\x3f" + b"\x00" * 1_000_000  # a CONNECT announcing ~1 MiB, never finished
        for _ in range(200):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            streams.append(stream)
            try:
                await stream.send_all(start)
            except trio.BrokenResourceError:
                pass  # the gateway closed it: what it should do

        await trio.sleep(1)
        grown = rss_mb() - before
    finally:
        for stream in streams:
            await stream.aclose()
    assert grown < 50, f"200 connections that never logged in cost {grown:.0f} MB"


# -- logs -----------------------------------------------------------------------------------------


async def test_one_device_sending_bad_messages_does_not_flood_the_log(edge, plugin, caplog):
    """Every rejected message logs an INFO line (delivery.py), with no rate limit (handler
    errors have one: one line per 10 s). With paku each bad message is two lines (the
    core's and paku's): a real gateway logged 2,000 lines for 1,000 bad payloads from one
    device, and 400 for 200 reconnects that each sent a malformed packet."""
    gw, port = edge
    user, password = await provision(gw, "d1")
    dev = await RawDevice.connect(port, user, password)
    caplog.set_level(logging.INFO)
    caplog.clear()
    with trio.fail_after(20):
        for pid in range(1, 501):
            await dev.publish("dev/d1/data", b"bad", packet_id=pid)
        for _ in range(500):
            await dev.expect_ack()
    lines = [r for r in caplog.records if r.name.startswith("gatewayd.mqtt")]
    assert len(lines) <= 20, f"{len(lines)} log lines for one device's 500 bad messages"


# -- metrics and health ---------------------------------------------------------------------------


async def test_sockets_that_never_logged_in_are_not_counted_as_devices_connected(edge):
    """gatewayd_mqtt_edge_connections ('device connections open') and /health's
    devices_connected count every TCP connection, a port scan included."""
    gw, port = edge
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
    try:
        await trio.sleep(0.2)
        async with gw_client(gw) as client:
            mqtt = (await client.get("/health")).json()["components"]["mqtt"]
            metrics = (await client.get("/metrics")).text
        assert mqtt["devices_connected"] == 0
        assert "gatewayd_mqtt_edge_connections 0" in metrics
    finally:
        for stream in streams:
            await stream.aclose()


# -- a real gatewayd run ----------------------------------------------------------------------------


def _paku_gateway(root: Path, nofile: int) -> tuple[subprocess.Popen, int, int, Path]:
    """`gatewayd run` with paku, its open-file limit at `nofile` (systemd's default soft limit
    is 1024); returns the process, its HTTP and MQTT ports and its log."""
    http_port, mqtt_port = reserved_port(), reserved_port()
    config = root / "gatewayd.toml"
    config.write_text(f"""
[gateway]
id = "review"
data_dir = "{root / 'data'}"
shutdown_grace_s = 2.0
[http]
listen = "127.0.0.1:{http_port}"
access_log = false
admin_token_env = "GATEWAYD_ADMIN_TOKEN"
[mqtt]
broker = "managed"
listen = "127.0.0.1:{mqtt_port}"
[plugins.paku]
enabled = true
[plugins.kaiabc]
enabled = false
""")
    log = root / "gateway.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log, "ab") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "gatewayd"), "run", "--config", str(config)],
                                env=dict(os.environ, GATEWAYD_ADMIN_TOKEN="review-token"), cwd=root,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=limit)
    return proc, http_port, mqtt_port, log


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                 headers={"Authorization": "Bearer review-token", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def _device_publishes(mqtt_port: int, user: str, password: str) -> bool:
    def s(text: str) -> bytes:
        return struct.pack("!H", len(text)) + text.encode()

    body = s("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 30) + s(user) + s(user) + s(password)
    try:
        with socket.create_connection(("127.0.0.1", mqtt_port), timeout=3) as c:
            c.settimeout(3)
            c.sendall(bytes([0x10, len(body)]) + body)
            if c.recv(4) != b"\x20\x02\x00\x00":
                return False
            payload = b'{"temp_c": 1}'
            topic = f"paku/{user}/telemetry".encode()
            pub = struct.pack("!H", len(topic)) + topic + b"\x00\x01" + payload
            c.sendall(bytes([0x32, len(pub)]) + pub)
            return c.recv(4) == b"\x40\x02\x00\x01"
    except OSError:
        return False


def _unauthenticated_flood(mqtt_port: int, sockets: int, seconds: float, probe) -> list[bool]:
    """Hold `sockets` idle TCP connections (no CONNECT), re-opening those the gateway
    closes; probe once a second; returns the probes' results."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held: list[socket.socket] = []
    results = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            while len(held) < sockets:
                sock = socket.socket()
                sock.settimeout(0.5)
                try:
                    sock.connect(("127.0.0.1", mqtt_port))
                except OSError:
                    sock.close()
                    break
                held.append(sock)
            results.append(probe())
            time.sleep(1)
            alive = []
            for sock in held:
                sock.setblocking(False)
                try:
                    if sock.recv(1) == b"":
                        sock.close()
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    sock.close()
                    continue
                alive.append(sock)
            held = alive
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return results


@pytest.mark.timeout(120)
def test_idle_unauthenticated_connections_do_not_lock_devices_out():
    """No cap on connections that have not logged in (each is held 10 s, and re-opened):
    ~1,100 idle sockets use up the gateway's file descriptors, so a provisioned device
    cannot connect (nor /health answer) for as long as the flood lasts, and trio logs an
    EMFILE traceback ten times a second."""
    root = Path(tempfile.mkdtemp(prefix="edge-review-"))
    proc, http_port, mqtt_port, log = _paku_gateway(root, nofile=1024)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                status, body = _http("GET", base + "/paku/health")
                if status == 200 and body.get("mqtt", {}).get("connected"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)
        status, device = _http("POST", base + "/paku/devices", {"id": "pk-1", "model": "review"})
        assert status == 201
        user, password = device["id"], device["mqtt"]["password"]
        deadline = time.monotonic() + 20
        while not _device_publishes(mqtt_port, user, password):  # the account reaches mosquitto by a reload
            assert time.monotonic() < deadline, "the device never got in"
            time.sleep(0.2)
        results = _unauthenticated_flood(mqtt_port, 1100, 8, lambda: _device_publishes(mqtt_port, user, password))
        assert all(results[1:]), f"the device was locked out {results.count(False)} times out of {len(results)}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- what the fixes promise -----------------------------------------------------------------------


def publish5(topic: str, payload: bytes, packet_id: int, alias: int | None = None, retain: bool = False) -> bytes:
    """An MQTT 5 QoS 1 PUBLISH, with a Topic Alias property when `alias` is given."""
    props = b"\x23" + struct.pack("!H", alias) if alias is not None else b""
    body = _s(topic) + struct.pack("!H", packet_id) + mp._encode_length(len(props)) + props + payload
    return bytes([0x32 | retain]) + mp._encode_length(len(body)) + body


async def test_topic_aliases_work_both_for_the_gateways_topics_and_the_brokers(edge, plugin):
    gw, port = edge
    user, password = await provision(gw, "d1")
    await RawDevice.connect(port, user, password)  # the account is loaded
    dev, _ = await connect_v5(port, user, password)
    with trio.fail_after(10):
        await dev.stream.send_all(publish5("dev/d1/data", b"a1", 1, alias=1))
        assert await dev.expect_ack() == 1
        await dev.stream.send_all(publish5("", b"a2", 2, alias=1))  # the alias alone
        assert await dev.expect_ack() == 2
        # An alias for a topic that is mosquitto's: relayed, and mosquitto resolves it.
        await dev.stream.send_all(publish5("dev/d1/status", b"s1", 3, alias=2))
        assert await dev.expect_ack() == 3
        await dev.stream.send_all(publish5("", b"s2", 4, alias=2))
        assert await dev.expect_ack() == 4
    assert plugin.stored == [b"a1", b"a2"]
    assert gw.mqtt.edge.stats.intercepted == 2 and gw.mqtt.edge.stats.protocol_errors == 0
    # An alias never set up is the device's error: MQTT 5 says so (0x94), and closes.
    await dev.stream.send_all(publish5("", b"?", 5, alias=9))
    with trio.fail_after(5):
        kind, _, raw, start = await dev.read()
    assert kind == mp.DISCONNECT and raw[start] == 0x94


async def test_handlers_see_a_devices_publish_as_a_subscriber_would_retain_cleared(edge, plugin):
    gw, port = edge
    user, password = await provision(gw, "d1")
    seen = []
    gw.mqtt.delivery.watch(lambda msg, verdict: seen.append((msg.retain, verdict)))
    dev = await RawDevice.connect(port, user, password)
    with trio.fail_after(5):
        await dev.stream.send_all(mp.encode_publish("dev/d1/data", b"birth", 1, retain=True, packet_id=1))
        assert await dev.expect_ack() == 1
    assert seen == [(False, "handled")] and plugin.stored == [b"birth"]
