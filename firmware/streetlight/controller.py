"""Reference firmware of a CCMS street-light controller (the specification's sections 3-11).

A controller as section 10's pseudocode and section 5's state machine describe it:

    INITIALIZING -> CONFIGURING -> READY <-> OFFLINE, and ERROR

- status every `next_update_seconds` (30 s; 10 s hot or low on battery) and on change;
- commands polled every `next_poll_seconds` (10 s; 2 s while a user's command waits),
  backing off 10 -> 30 -> 60 -> 300 s while the gateway cannot be reached, or pushed
  over MQTT when configure hands out MQTT settings (falling back to polling when the
  broker is lost, retrying MQTT every 30 s);
- a local FIFO queue of 100 entries for what could not be sent; each entry retried
  immediately, after 5, 15 and 30 s, then kept for the sync;
- an offline cache of up to 3 hours of readings, synced on reconnection in the
  specification's priority order: acks, alerts, the latest status, cached readings
  (gzip over 10 KB), logs;
- the error table of section 6: 400 log and drop, 401 reconfigure, 404 back to
  CONFIGURING, 429 wait `retry_after_seconds`, 5xx wait 30 s (3 times).

It runs on CPython with `httpx` (and `paho-mqtt` for MQTT). Time comes from a `Clock`:
`Clock()` is real time, `Clock(speed=60)` runs a minute per second, so tests can live
hours of a light's life in seconds. Run it: `python controller.py BASE_URL DEVICE_ID`.

TLS: `--cafile ca.crt` pins the site CA (`<data_dir>/tls/ca.crt` from `gatewayd tls init`):
an https:// base URL is checked against that CA only, and MQTT (when configure hands it
out) speaks TLS with it, so run the gateway with `tls.mqtt_plain = false`, whose configure
answers the TLS port.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import hmac
import json
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

QUEUE_SIZE = 100
RETRY_DELAYS = (0, 5, 15, 30)  # then the entry waits for the sync
CACHE_SECONDS = 3 * 3600
POLL_BACKOFF = (10, 30, 60, 300)
GZIP_OVER = 10 * 1024
MQTT_RETRY_S = 30


class Clock:
    """Wall-clock seconds, `speed` times faster than real time."""

    def __init__(self, speed: float = 1.0, start: float | None = None) -> None:
        self.speed = speed
        self.start = time.time() if start is None else start
        self.origin = time.monotonic()

    def time(self) -> float:
        return self.start + (time.monotonic() - self.origin) * self.speed

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds) / self.speed)


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Unreachable(Exception):
    """No answer: no network, a timeout, the gateway down."""


@dataclass
class Entry:
    """One request that could not be sent yet (section 6's queue entry)."""

    endpoint: str
    payload: dict[str, Any]
    timestamp: float
    priority: int  # the sync order: 0 acks, 1 alerts, 2 status, 4 logs
    retry_count: int = 0
    last_retry: float = 0.0


@dataclass
class Lamp:
    """The hardware: what the controller switches and measures."""

    power_state: str = "off"
    brightness: int = 100
    temperature: float = 35.0
    battery: float = 95.0
    gsm_signal: float = 80.0
    error_flags: list[str] = field(default_factory=list)


class StreetLight:
    def __init__(self, base_url: str, device_id: str, *, clock: Clock | None = None, secret: str | None = None,
                 flash: dict[str, Any] | None = None, latitude: float = 28.6139, longitude: float = 77.2090,
                 firmware_version: str = "v2.1.0", use_mqtt: bool = True, cafile: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.device_id = device_id
        self.clock = clock or Clock()
        self.secret = secret
        self.flash = flash if flash is not None else {}  # survives a reboot: config, token, schedule
        self.position = (latitude, longitude)
        self.firmware_version = firmware_version
        self.use_mqtt = use_mqtt
        self.lamp = Lamp()
        self.state = "INITIALIZING"
        self.queue: collections.deque[Entry] = collections.deque(maxlen=QUEUE_SIZE)
        self.cache: collections.deque[dict[str, Any]] = collections.deque()  # offline readings
        self.logs: list[dict[str, Any]] = []
        self.executed: list[dict[str, Any]] = []  # commands run, in order (tests read it)
        self.next_status = 0.0
        self.next_poll = 0.0
        self.update_s = 30
        self.poll_s = 10
        self.backoff = 0  # index into POLL_BACKOFF while offline
        self.configure_attempts = 0
        self.retry_at = 0.0  # 429 / 5xx / configure failures: nothing before this
        self.last_reported: tuple[Any, ...] | None = None
        self.radio = True  # the GSM link; tests cut it to make the light offline
        self.mqtt: Any = None
        self.mqtt_retry_at = 0.0
        self._pushed: collections.deque[dict[str, Any]] = collections.deque()
        self._lock = threading.Lock()
        # The site CA pinned (no system roots): a gateway whose certificate it did not sign is refused.
        self.tls = ssl.create_default_context(cafile=cafile) if cafile else None
        self.http = httpx.Client(timeout=5.0, verify=self.tls or True)

    # -- the main loop (section 10) ----------------------------------------------------------

    def run(self, stop: threading.Event, tick: float = 1.0) -> None:
        """Tick once a (light's) second until `stop` is set."""
        try:
            while not stop.is_set():
                self.step()
                self.clock.sleep(tick)
        finally:
            self.close()

    def step(self) -> None:
        now = self.clock.time()
        if now < self.retry_at:
            return
        if self.state in ("INITIALIZING", "CONFIGURING"):
            self.configure()
            return
        if self.state == "ERROR":
            return
        self.mqtt_upkeep(now)
        for cmd in self.take_pushed():
            self.execute(cmd)
        if now >= self.next_status or self.status_changed():
            self.send_status()
        if now >= self.next_poll and self.state in ("READY", "OFFLINE") and not self.mqtt_connected():
            self.poll_commands()

    # -- HTTP ------------------------------------------------------------------------------

    def request(self, method: str, endpoint: str, payload: dict[str, Any] | None = None, *,
                compress: bool = False) -> httpx.Response:
        if not self.radio:
            raise Unreachable("no GSM link")
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if compress:
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        if self.secret and payload is not None:
            headers["X-Device-Signature"] = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        if "token" in self.flash and endpoint != "/configure":
            headers["Authorization"] = f"Bearer {self.flash['token']}"
        try:
            return self.http.request(method, f"{self.base_url}/device/{self.device_id}{endpoint}", content=body or None,
                                     headers=headers)
        except httpx.HTTPError as e:
            raise Unreachable(str(e)) from None

    def handle_error(self, r: httpx.Response) -> None:
        """Section 6's table, for any answer but 200."""
        doc = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        self.log("warning", f"{r.request.url.path}: {r.status_code} {doc.get('code')} {doc.get('message')}")
        if r.status_code == 401:
            self.flash.pop("token", None)
            self.state = "CONFIGURING"
        elif r.status_code == 404 and doc.get("code") != "COMMAND_NOT_FOUND":
            self.state = "CONFIGURING"  # the gateway does not know the light (any more)
        elif r.status_code == 429:
            self.retry_at = self.clock.time() + max(1, int(doc.get("retry_after_seconds") or 1))
        elif r.status_code >= 500:
            self.retry_at = self.clock.time() + 30

    # -- configure (section 1) ----------------------------------------------------------------

    def configure(self) -> None:
        self.state = "CONFIGURING"
        lat, lon = self.position
        payload = {"device_id": self.device_id, "device_type": "street_light_controller", "latitude": lat,
                   "longitude": lon, "status": self.lamp.power_state, "gsm_imei": self.device_id.split(":")[-1],
                   "gsm_signal_strength": self.lamp.gsm_signal, "communication_type": "GSM",
                   "firmware_version": self.firmware_version, "timestamp": iso(self.clock.time())}
        try:
            r = self.request("POST", "/configure", payload)
        except Unreachable as e:
            self.log("warning", f"configure: gateway unreachable: {e}")  # a refused certificate says so here
            self.retry_at = self.clock.time() + 10
            return
        if r.status_code != 200:
            doc = r.json()
            self.configure_attempts += 1
            self.log("error", f"Configuration Failed: {doc.get('message')}. Retrying in "
                              f"{doc.get('retry_after_seconds') or 300} s")
            self.retry_at = self.clock.time() + (doc.get("retry_after_seconds") or 300)
            if self.configure_attempts >= 3 and r.status_code == 400:
                self.state = "ERROR"  # the queue for manual intervention
            return
        doc = r.json()
        self.configure_attempts = 0
        self.flash.update(token=doc["device_token"], light_id=doc["light_id"], config=doc["config"])
        self.lamp.brightness = doc["config"].get("brightness_level", self.lamp.brightness)
        if doc.get("mqtt_enabled") and self.use_mqtt:
            self.flash["mqtt"] = {k: doc[k] for k in ("mqtt_broker", "mqtt_port", "mqtt_username", "mqtt_password",
                                                      "topics")}
        self.state = "READY"
        self.next_status = self.next_poll = 0.0

    # -- status (section 2) --------------------------------------------------------------------

    def reading(self) -> dict[str, Any]:
        lamp = self.lamp
        return {"device_id": self.device_id, "light_id": self.flash.get("light_id"),
                "timestamp": iso(self.clock.time()),
                "status": {"power_state": lamp.power_state, "brightness": lamp.brightness,
                           "temperature_celsius": lamp.temperature, "battery_percentage": lamp.battery,
                           "gsm_signal_strength": lamp.gsm_signal, "error_flags": list(lamp.error_flags)},
                "energy": {"voltage": 230.0, "current": 0.26 if lamp.power_state == "on" else 0.0,
                           "power_watts": 60 * lamp.brightness / 100 if lamp.power_state == "on" else 0}}

    def status_changed(self) -> bool:
        key = (self.lamp.power_state, self.lamp.brightness, tuple(self.lamp.error_flags))
        return self.last_reported is not None and key != self.last_reported

    def send_status(self) -> None:
        reading = self.reading()
        self.last_reported = (self.lamp.power_state, self.lamp.brightness, tuple(self.lamp.error_flags))
        self.next_status = self.clock.time() + self.update_s
        if self.mqtt_connected():
            compact = {"light_id": reading["light_id"], "status": self.lamp.power_state,
                       "brightness": self.lamp.brightness, "battery": self.lamp.battery,
                       "timestamp": reading["timestamp"]}
            self.mqtt.publish(self.flash["mqtt"]["topics"]["publish"], json.dumps(compact), qos=1)
            return
        try:
            r = self.request("POST", "/status", reading)
        except Unreachable:
            self.go_offline()
            self.cache_reading(reading)
            return
        if r.status_code == 200:
            self.update_s = int(r.json().get("next_update_seconds", 30))
            self.next_status = self.clock.time() + self.update_s
            if "device_token" in r.json():
                self.flash["token"] = r.json()["device_token"]
            self.back_online()
        else:
            self.handle_error(r)

    def cache_reading(self, reading: dict[str, Any]) -> None:
        """Up to 3 hours of readings; the oldest go first when it is full."""
        self.cache.append(reading)
        cutoff = self.clock.time() - CACHE_SECONDS
        while self.cache and _ts(self.cache[0]["timestamp"]) < cutoff:
            self.cache.popleft()

    # -- commands (section 3) ------------------------------------------------------------------

    def poll_commands(self) -> None:
        try:
            r = self.request("GET", "/commands")
        except Unreachable:
            self.go_offline()
            return
        if r.status_code != 200:
            self.handle_error(r)
            self.next_poll = self.clock.time() + self.poll_s
            return
        self.back_online()
        doc = r.json()
        self.poll_s = int(doc.get("next_poll_seconds", 10))
        self.next_poll = self.clock.time() + self.poll_s
        for cmd in doc["commands"]:
            self.execute(cmd)

    def execute(self, cmd: dict[str, Any]) -> None:
        """Run a command, then acknowledge it at once (queued if that fails)."""
        kind, result = cmd.get("command_type"), {}
        if kind == "power_control":
            self.lamp.power_state = "on" if cmd.get("action") == "on" else "off"
            result = {"new_state": self.lamp.power_state, "actual_brightness": self.lamp.brightness}
        elif kind == "brightness_control":
            self.lamp.brightness = int(cmd["brightness_level"])
            result = {"actual_brightness": self.lamp.brightness}
        elif kind == "schedule_update":
            self.flash.setdefault("config", {}).update(
                {"schedule_enabled": cmd["schedule"].get("enabled", True),
                 **{k: v for k, v in cmd["schedule"].items() if k != "enabled"}})
            result = {"schedule": cmd["schedule"]}
        ok = kind in ("power_control", "brightness_control", "schedule_update")
        if any(c["command_id"] == cmd["command_id"] for c in self.executed):
            pass  # delivered again (push and poll, or a redelivery): acknowledge, do not run twice
        else:
            self.executed.append(cmd)
        ack = {"device_id": self.device_id, "command_id": cmd["command_id"], "status": "executed" if ok else "failed",
               "execution_timestamp": iso(self.clock.time()), "result": result}
        self.send("/command-ack", ack, priority=0)

    # -- alerts and logs ---------------------------------------------------------------------

    def alert(self, alert_type: str, message: str, **data: Any) -> None:
        self.send("/alert", {"alert_type": alert_type, "severity": "critical", "message": message, "data": data,
                             "timestamp": iso(self.clock.time())}, priority=1)

    def log(self, level: str, message: str) -> None:
        self.logs.append({"timestamp": iso(self.clock.time()), "level": level, "message": message})

    def send(self, endpoint: str, payload: dict[str, Any], priority: int) -> None:
        """Send now, or queue it (FIFO, 100 entries) for the retries and the sync."""
        entry = Entry(endpoint, payload, self.clock.time(), priority)
        if not self.try_send(entry):
            self.queue.append(entry)

    def try_send(self, entry: Entry) -> bool:
        entry.retry_count += 1
        entry.last_retry = self.clock.time()
        try:
            r = self.request("POST", entry.endpoint, entry.payload)
        except Unreachable:
            self.go_offline()
            return False
        if r.status_code == 200:
            return True
        self.handle_error(r)
        # Refused for good (logged): a bad payload, or an ack for a command the gateway
        # does not know. Dropped, not retried.
        return r.status_code == 400 or (r.status_code == 404 and entry.endpoint == "/command-ack")

    # -- offline and the sync (section 7) -----------------------------------------------------

    def go_offline(self) -> None:
        if self.state == "READY":
            self.state = "OFFLINE"
            self.backoff = 0
        else:
            self.backoff = min(self.backoff + 1, len(POLL_BACKOFF) - 1)
        self.poll_s = POLL_BACKOFF[self.backoff]
        self.next_poll = self.clock.time() + self.poll_s
        self.retry_queue()

    def retry_queue(self) -> None:
        """Entries within their retry schedule (now, 5, 15, 30 s) are tried again; the others
        wait for the sync."""
        now = self.clock.time()
        for entry in list(self.queue):
            if entry.retry_count < len(RETRY_DELAYS) and now - entry.last_retry >= RETRY_DELAYS[entry.retry_count]:
                if self.radio and self.try_send(entry):
                    self.queue.remove(entry)

    def back_online(self) -> None:
        if self.state != "OFFLINE":
            return
        self.state = "READY"
        self.backoff = 0
        self.sync()

    def sync(self) -> None:
        """Section 7's order: acks, alerts, the latest status (sent already), cached
        readings (gzip when over 10 KB), logs."""
        for entry in sorted(self.queue, key=lambda e: (e.priority, e.timestamp)):
            if entry.priority <= 2:
                if not self.try_send(entry):
                    return
                self.queue.remove(entry)
        while self.cache:
            batch = list(self.cache)[:1000]
            payload = {"device_id": self.device_id, "readings": batch}
            compress = len(json.dumps(payload)) > GZIP_OVER
            try:
                r = self.request("POST", "/sync", payload, compress=compress)
            except Unreachable:
                return
            if r.status_code != 200:
                self.handle_error(r)
                return
            for _ in batch:
                self.cache.popleft()
        if self.logs:
            try:
                r = self.request("POST", "/logs", {"logs": self.logs[-1000:]}, compress=True)
            except Unreachable:
                return
            if r.status_code == 200:
                self.logs.clear()

    # -- MQTT (section 4) ----------------------------------------------------------------------

    def mqtt_connected(self) -> bool:
        return self.mqtt is not None and self.mqtt.is_connected()

    def mqtt_upkeep(self, now: float) -> None:
        settings = self.flash.get("mqtt")
        if settings is None or self.mqtt_connected() or now < self.mqtt_retry_at or not self.radio:
            return
        self.mqtt_retry_at = now + MQTT_RETRY_S
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        if self.mqtt is not None:
            self.mqtt.loop_stop()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=settings["mqtt_username"], protocol=paho.MQTTv5)
        client.username_pw_set(settings["mqtt_username"], settings["mqtt_password"])
        if self.tls is not None:
            client.tls_set_context(self.tls)  # the site CA only, the host name checked
        topic = settings["topics"]["subscribe"]
        client.on_connect = lambda c, u, f, reason, p: c.subscribe(topic, qos=1) if not reason.is_failure else None
        client.on_message = lambda c, u, m: self._pushed.append(json.loads(m.payload))
        try:
            client.connect(settings["mqtt_broker"], settings["mqtt_port"], 30)
        except OSError:
            self.log("warning", "MQTT unreachable: polling over HTTP")
            return
        client.loop_start()
        self.mqtt = client

    def take_pushed(self) -> list[dict[str, Any]]:
        out = []
        while self._pushed:
            out.append(self._pushed.popleft())
        return out

    def close(self) -> None:
        if self.mqtt is not None:
            self.mqtt.disconnect()
            self.mqtt.loop_stop()
        self.http.close()


def _ts(text: str) -> float:
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone


def main(argv: list[str]) -> StreetLight:
    """The light the command line describes."""
    import argparse

    p = argparse.ArgumentParser(description="CCMS street-light reference firmware")
    p.add_argument("base_url", help="the gateway's mount: http(s)://<gateway>:8080/streetlight")
    p.add_argument("device_id", help="IMEI:...")
    p.add_argument("--no-mqtt", action="store_true", help="poll over HTTP even when configure offers MQTT")
    p.add_argument("--cafile", default=None, help="the site CA to pin: https and MQTT over TLS checked against it")
    opts = p.parse_args(argv)
    return StreetLight(opts.base_url, opts.device_id, use_mqtt=not opts.no_mqtt, cafile=opts.cafile)


if __name__ == "__main__":
    light = main(sys.argv[1:])
    try:
        light.run(threading.Event())
    except KeyboardInterrupt:
        pass
