"""paku reference firmware: what a paku device does, written the way it runs on the device.

MicroPython style: small, one main loop, no threads. The network sits behind two tiny
adapters at the bottom (`MQTTClient` with umqtt.simple's API, `http_get` with urequests'
shape), so on a board the real `umqtt.simple` / `urequests` are used and on CPython the
same code runs on paho-mqtt and urllib:

    python firmware/paku/device.py --host 127.0.0.1 --port 1883 --id ID --password=PW \
        --http http://127.0.0.1:8080/paku [--once] [--cafile ca.crt]

With `--cafile` (the site CA, `<data_dir>/tls/ca.crt` from `gatewayd tls init`) MQTT
speaks TLS (the gateway's `tls.mqtt_listen`, 8883) and an https:// `--http` is checked
against it: the device trusts that CA only, pinned (docs/site-box.md).

One cycle: connect (persistent session, last will `offline` retained on
paku/<id>/state), publish the state (retained: online, rssi, fwVersion), publish a
telemetry reading, execute the commands that arrive on paku/<id>/cmd and acknowledge
each on paku/<id>/event/ack, and (every `--ota-every` cycles) ask the OTA manifest for a
newer image, download it, verify its SHA-256 and "install" it (a file in --state-dir;
the next start reports the new fwVersion).
"""

import json
import math
import sys
import time

try:  # MicroPython
    import uhashlib as hashlib
except ImportError:
    import hashlib

VERSION = "1.0.0"
MODEL = "pk-a"
CHUNK = 1024
#: The site CA the device pins (`--cafile`), as an ssl.SSLContext; None: plain MQTT.
TLS = None


class Paku:
    """One device: its topics, its sensors, its commands, its OTA."""

    def __init__(self, opts, mqtt_factory):
        self.o = opts
        self.fw_version = read_installed(opts.state_dir) or VERSION
        self.started = time.time()
        self.interval = opts.interval
        self.mqtt = mqtt_factory(opts.id, opts.host, opts.port, opts.id, opts.password, keepalive=30)

    def topic(self, leaf):
        return "paku/%s/%s" % (self.o.id, leaf)

    # -- MQTT -----------------------------------------------------------------------

    def connect(self):
        self.mqtt.set_last_will(self.topic("state"), b"offline", retain=True, qos=1)
        self.mqtt.set_callback(self.on_message)
        self.mqtt.connect(clean_session=False)  # commands wait in the broker while we sleep
        self.mqtt.subscribe(self.topic("cmd"), qos=1)
        self.publish_state(True)

    def publish(self, leaf, doc, retain=False, qos=1):
        self.mqtt.publish(self.topic(leaf), json.dumps(doc).encode(), retain=retain, qos=qos)

    def publish_state(self, online):
        self.publish("state", {"status": "online" if online else "offline", "rssi": self.rssi(),
                               "fwVersion": self.fw_version}, retain=True)

    def publish_telemetry(self):
        self.publish("telemetry", {"ts": int(time.time()), "temp_c": self.temperature(),
                                   "uptime_s": int(time.time() - self.started)})

    def on_message(self, topic, msg):
        try:
            cmd = json.loads(msg)
            command_id = cmd["id"]
        except (ValueError, KeyError, TypeError):
            log("ignored a command that is not JSON with an id")
            return
        ok, result = self.execute(cmd)
        self.publish("event/ack", {"id": command_id, "ok": ok, "result": result})
        log("command %s %s: %s" % (command_id, "done" if ok else "failed", result))

    def execute(self, cmd):
        action = cmd.get("action")
        if action == "ping":
            return True, "pong"
        if action == "blink":
            return True, {"blinked": int(cmd.get("times", 1))}
        if action == "set_interval":
            seconds = cmd.get("seconds")
            if not isinstance(seconds, (int, float)) or seconds < 1:
                return False, "seconds must be a number >= 1"
            self.interval = seconds
            return True, {"interval_s": seconds}
        if action == "ota_check":
            return True, self.check_ota()
        return False, "unknown action %r" % (action,)

    # -- sensors (simulated on CPython) -------------------------------------------------

    def temperature(self):
        return round(21.0 + 2.0 * math.sin(time.time() / 600.0), 2)

    def rssi(self):
        return -60

    # -- OTA ------------------------------------------------------------------------------

    def check_ota(self):
        """Ask for a newer image; download, verify and install it. Returns what happened."""
        url = "%s/ota/manifest.json?model=%s&current=%s&device=%s" % (self.o.http, MODEL, self.fw_version, self.o.id)
        status, body = http_get(url)
        if status != 200:
            return "manifest: HTTP %d" % status
        offers = json.loads(body)
        if not offers:
            return "up to date (%s)" % self.fw_version
        offer = offers[0]
        self.publish("event/ota", {"status": "started", "version": offer["version"], "ts": time.time()})
        try:
            path = self.download(offer)
        except ValueError as e:
            self.publish("event/ota", {"status": "failed", "version": offer["version"], "detail": str(e), "ts": time.time()})
            return "failed: %s" % e
        self.publish("event/ota", {"status": "verified", "version": offer["version"], "ts": time.time()})
        write_installed(self.o.state_dir, offer["version"], path)
        self.fw_version = offer["version"]
        self.publish("event/ota", {"status": "installed", "version": offer["version"], "ts": time.time()})
        self.publish_state(True)
        return "installed %s" % offer["version"]

    def download(self, offer):
        digest = hashlib.sha256()
        path = "%s/firmware-%s.bin" % (self.o.state_dir, offer["version"])
        status, size = http_get(offer["url"], stream_to=path, digest=digest)
        if status != 200:
            raise ValueError("download: HTTP %d" % status)
        got = "".join("%02x" % b for b in digest.digest())
        if got != offer["sha256"]:
            raise ValueError("sha256 mismatch: got %s, manifest says %s" % (got, offer["sha256"]))
        if "size" in offer and offer["size"] != size:
            raise ValueError("size mismatch: got %d bytes, manifest says %d" % (size, offer["size"]))
        return path

    # -- the main loop ------------------------------------------------------------------

    def run(self, once=False):
        self.connect()
        cycle = 0
        try:
            while True:
                self.publish_telemetry()
                if cycle % self.o.ota_every == 0:
                    log("ota: %s" % self.check_ota())
                deadline = time.time() + (self.o.listen_s if once else self.interval)
                while time.time() < deadline:
                    self.mqtt.check_msg()
                    time.sleep(0.05)
                cycle += 1
                if once:
                    break
        finally:
            self.publish_state(False)  # a clean goodbye: the broker won't send the last will
            self.mqtt.disconnect()


def read_installed(state_dir):
    try:
        with open(state_dir + "/installed.json") as f:
            return json.load(f)["version"]
    except (OSError, ValueError, KeyError):
        return None


def write_installed(state_dir, version, path):
    with open(state_dir + "/installed.json", "w") as f:
        json.dump({"version": version, "image": path}, f)


def log(text):
    print("paku: " + text)


# -- network adapters: umqtt.simple / urequests on a board, paho-mqtt / urllib here ------------


def mqtt_client_class():
    try:
        from umqtt.simple import MQTTClient  # on the board

        return MQTTClient
    except ImportError:
        return _paho_client_class()


def _paho_client_class():
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    class MQTTClient:
        """umqtt.simple.MQTTClient's API on paho-mqtt, driven synchronously like umqtt."""

        def __init__(self, client_id, server, port=0, user=None, password=None, keepalive=0):
            self._args = (client_id, server, port or 1883, user, password, keepalive)
            self._client = None
            self._will = None
            self._cb = None
            self._connack = None
            self._inbox = []  # umqtt calls the callback from check_msg() only, never mid-publish

        def set_callback(self, f):
            self._cb = f

        def set_last_will(self, topic, msg, retain=False, qos=0):
            self._will = (topic, msg, qos, retain)

        def connect(self, clean_session=True):
            client_id, server, port, user, password, keepalive = self._args
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                            protocol=paho.MQTTv311, reconnect_on_failure=False)
            if user is not None:
                c.username_pw_set(user, password)
            if self._will:
                topic, msg, qos, retain = self._will
                c.will_set(topic, msg, qos=qos, retain=retain)
            if TLS is not None:
                c.tls_set_context(TLS)  # the site CA only, the host name checked
            c.on_connect = lambda cl, u, flags, rc, props: setattr(self, "_connack", rc)
            c.on_message = lambda cl, u, m: self._inbox.append((m.topic.encode(), m.payload))
            c.connect(server, port, keepalive or 60)
            self._client = c
            self._loop_until(lambda: self._connack is not None)
            if self._connack.is_failure:
                raise OSError("MQTT connect refused: %s" % self._connack)

        def publish(self, topic, msg, retain=False, qos=0):
            info = self._client.publish(topic, msg, qos=qos, retain=retain)
            if qos:
                self._loop_until(info.is_published)

        def subscribe(self, topic, qos=0):
            done = []
            self._client.on_subscribe = lambda cl, u, m, rcs, props: done.append(m)
            _, mid = self._client.subscribe(topic, qos)
            self._loop_until(lambda: mid in done)

        def check_msg(self):
            self._client.loop(timeout=0.01)
            while self._inbox:
                topic, msg = self._inbox.pop(0)
                if self._cb:
                    self._cb(topic, msg)

        def disconnect(self):
            self._client.disconnect()
            self._client.loop(timeout=0.1)

        def _loop_until(self, condition, timeout=10):
            deadline = time.time() + timeout
            while not condition():
                if time.time() > deadline:
                    raise OSError("MQTT: no answer from the broker")
                self._client.loop(timeout=0.05)

    return MQTTClient


def http_get(url, stream_to=None, digest=None):
    """(status, body); with `stream_to`, the body goes to that file (hashed) and its size is returned."""
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        with urlopen(url, timeout=30, context=TLS) as r:
            if stream_to is None:
                return r.status, r.read()
            size = 0
            with open(stream_to, "wb") as f:
                while True:
                    chunk = r.read(CHUNK)
                    if not chunk:
                        return r.status, size
                    digest.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
    except HTTPError as e:
        return e.code, b""


def main(argv):
    import argparse
    import os

    p = argparse.ArgumentParser(description="paku reference device")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--id", required=True)
    p.add_argument("--password", default=os.environ.get("PAKU_PASSWORD"), help="or $PAKU_PASSWORD")
    p.add_argument("--http", default="http://127.0.0.1:8080/paku", help="the gateway's paku URL")
    p.add_argument("--once", action="store_true", help="one cycle, then disconnect")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between readings")
    p.add_argument("--listen-s", type=float, default=3.0, help="with --once: how long to wait for commands")
    p.add_argument("--ota-every", type=int, default=10, help="check the OTA manifest every N cycles")
    p.add_argument("--state-dir", default=None, help="where installed images go (default ./paku-<id>)")
    p.add_argument("--cafile", default=None, help="the site CA to pin: MQTT over TLS, https checked against it")
    opts = p.parse_args(argv)
    if opts.cafile:
        import ssl

        global TLS
        TLS = ssl.create_default_context(cafile=opts.cafile)  # this CA only: no system roots
    if not opts.password:
        p.error("--password (or $PAKU_PASSWORD) is required")
    opts.http = opts.http.rstrip("/")
    opts.state_dir = opts.state_dir or "paku-" + opts.id
    os.makedirs(opts.state_dir, exist_ok=True)
    Paku(opts, mqtt_client_class()).run(once=opts.once)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
