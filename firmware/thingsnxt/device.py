"""thingsnxt reference firmware: the specification's ESP32 logic (esp32_production_ready.ino),
written the way it runs on a board. MicroPython style: small, one main loop, no threads;
the network behind one tiny adapter (`http_request`, urequests' shape), so on CPython
the same code runs on urllib:

    python firmware/thingsnxt/device.py --prefs prefs.json --console /dev/ttyUSB0 --provision
    python firmware/thingsnxt/device.py --prefs prefs.json [--cycles N] [--speed 10] [--cafile ca.crt]

- Credentials in a preferences file (`iot-config`: device_id, device_token, api_base_url),
  as `Preferences` keeps them on the ESP32; written by serial provisioning.
- Serial provisioning: JSON lines on the console. `{"cmd": "provision", "device_id",
  "device_token", "api_base_url"}` is saved, then answered `{"provisioned": true,
  "device_id", "api_base_url"}`; a bad one `{"provisioned": false, "error"}`.
- Telemetry every 10 s (`POST {API_BASE_URL}/devices/{id}/telemetry`), the state poll
  every 5 s (`GET /telemetry/latest`), the health check every 60 s (`GET /health`).
- Three tries per request, 2 s then 4 s apart (RETRY_BASE_DELAY * 2^n); no retry on 4xx.
- On 429 the telemetry and poll intervals double (up to 8x); each success halves them back.
- The LEDs (virtual pins v0, v1, ...) follow the server's answer.
- TLS: `--cafile ca.crt` pins the site CA (`<data_dir>/tls/ca.crt` from `gatewayd tls init`)
  for an https:// api_base_url: a certificate that CA did not sign is refused (on the
  ESP32: `WiFiClientSecure.setCACert` with the same PEM).
"""

import json
import os
import sys
import time

MAX_HTTP_RETRIES = 3
RETRY_BASE_DELAY = 1.0  # seconds; delay = base * 2^retries
TELEMETRY_S, POLL_S, HEALTH_S = 10.0, 5.0, 60.0
MAX_SLOWDOWN = 8
PREFS_NAMESPACE = "iot-config"
PREF_KEYS = ("device_id", "device_token", "api_base_url")
#: The site CA the device pins (`--cafile`), as an ssl.SSLContext; None: no pinning.
TLS = None


# -- preferences (the ESP32's NVS) ---------------------------------------------------


def load_prefs(path):
    try:
        with open(path) as f:
            return json.load(f).get(PREFS_NAMESPACE, {})
    except (OSError, ValueError):
        return {}


def save_prefs(path, prefs):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({PREFS_NAMESPACE: prefs}, f)
    os.replace(tmp, path)


# -- serial provisioning -------------------------------------------------------------


def provision_reply(line, prefs_path):
    """The console's answer to one line, or None for a line that is not a command."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("cmd") != "provision":
        return None
    for key in PREF_KEYS:
        value = doc.get(key)
        if not isinstance(value, str) or not value or len(value) > 256:
            return {"provisioned": False, "error": "%s: expected a string of 1-256 characters" % key}
    if not doc["api_base_url"].startswith(("http://", "https://")):
        return {"provisioned": False, "error": "api_base_url: expected http:// or https://"}
    save_prefs(prefs_path, {key: doc[key] for key in PREF_KEYS})
    return {"provisioned": True, "device_id": doc["device_id"], "api_base_url": doc["api_base_url"]}


def serve_console(fd, prefs_path, once=True):
    """Read JSON lines from the serial console `fd`; answer provisioning commands. Returns
    after the first successful provisioning (once) or when the other end closes."""
    os.write(fd, b"thingsnxt firmware: waiting for provisioning\n")  # a log line, as the .ino prints
    buffer = b""
    while True:
        try:
            chunk = os.read(fd, 512)
        except OSError:  # the other end of a pty closed
            return False
        if not chunk:
            return False
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            reply = provision_reply(line.decode("utf-8", "replace").strip(), prefs_path)
            if reply is None:
                continue
            os.write(fd, json.dumps(reply).encode() + b"\n")
            if reply["provisioned"] and once:
                return True


# -- the network ---------------------------------------------------------------------


def http_request(method, url, doc=None, timeout=5.0):
    """(status, parsed JSON body or None); status < 0 on a connection error (as HTTPClient)."""
    import urllib.error
    import urllib.request

    data = None if doc is None else json.dumps(doc).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=TLS) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except OSError as e:
        print("connection failed: %s" % e, file=sys.stderr)  # a refused certificate says so here
        return -1, None
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


# -- the device ----------------------------------------------------------------------


class Device:
    def __init__(self, prefs, http=http_request, sleep=time.sleep, clock=time.monotonic, speed=1.0, log=None):
        self.id, self.token, self.base = prefs["device_id"], prefs["device_token"], prefs["api_base_url"].rstrip("/")
        self.http, self.sleep, self.clock, self.speed = http, sleep, clock, speed
        self.leds = {}  # virtual pin -> value, as the server last said
        self.temperature = 21.0
        self.slowdown = 1
        self.stats = {"sent": 0, "failed": 0, "rate_limited": 0, "polls": 0, "healthy": 0}
        self.log = log or (lambda message: print(message, file=sys.stderr))

    def request(self, method, path, doc=None):
        """Up to MAX_HTTP_RETRIES tries with exponential back-off; (status, body)."""
        status, body = -1, None
        for retries in range(MAX_HTTP_RETRIES):
            status, body = self.http(method, self.base + path, doc)
            if status == 429:
                self.stats["rate_limited"] += 1
                self.slowdown = min(self.slowdown * 2, MAX_SLOWDOWN)  # adaptive polling
                self.log("Too Many Requests - Reducing frequency (x%d)" % self.slowdown)
                return status, body
            if 0 < status < 500:  # answered: success, or a 4xx that a retry would not change
                break
            if retries + 1 < MAX_HTTP_RETRIES:
                self.sleep(RETRY_BASE_DELAY * (1 << (retries + 1)) / self.speed)
        if 200 <= status < 300 and self.slowdown > 1:
            self.slowdown //= 2
        if status in (400, 403, 404):
            self.log({400: "Bad Request - Check payload", 403: "Forbidden - Invalid token",
                      404: "Not Found - device does not exist"}[status])
        return status, body

    def sync_leds(self, data):
        if isinstance(data, dict):
            for key, value in data.items():
                if key[:1] == "v" and key[1:].isdigit():
                    self.leds[key] = value

    def send_telemetry(self):
        self.temperature += 0.1
        data = dict(self.leds)
        data["temperature"] = round(self.temperature, 1)
        status, body = self.request("POST", "/devices/%s/telemetry" % self.id,
                                    {"device_token": self.token, "data": data})
        if status == 200 and isinstance(body, dict):
            self.stats["sent"] += 1
            self.sync_leds(body.get("data"))  # the server's state: what an app set wins
        elif status != 429:
            self.stats["failed"] += 1
        return status

    def poll_state(self):
        status, body = self.request("GET", "/telemetry/latest?device_token=%s" % _quote(self.token))
        if status == 200 and isinstance(body, dict):
            self.stats["polls"] += 1
            self.sync_leds(body.get("data"))
        return status

    def check_health(self):
        status, _ = self.http("GET", self.base + "/health", None)
        if status == 200:
            self.stats["healthy"] += 1
            self.log("Backend healthy")
        return status

    def run(self, cycles=None):
        """The main loop: each of the three at its own interval; `cycles` telemetry sends, or forever."""
        now = self.clock()
        due = {"telemetry": now, "poll": now + POLL_S / self.speed, "health": now}
        sent = 0
        while cycles is None or sent < cycles:
            now = self.clock()
            if now >= due["health"]:
                self.check_health()
                due["health"] = now + HEALTH_S / self.speed
            if now >= due["telemetry"]:
                self.send_telemetry()
                sent += 1
                due["telemetry"] = self.clock() + TELEMETRY_S * self.slowdown / self.speed
            if now >= due["poll"]:
                self.poll_state()
                due["poll"] = self.clock() + POLL_S * self.slowdown / self.speed
            self.sleep(max(0.0, min(due.values()) - self.clock()))


def _quote(text):
    out = []
    for ch in text:
        out.append(ch if ch.isalnum() or ch in "-_.~" else "".join("%%%02X" % b for b in ch.encode()))
    return "".join(out)


def main(argv):
    import argparse

    parser = argparse.ArgumentParser(description="thingsnxt reference firmware")
    parser.add_argument("--prefs", required=True, help="the preferences file (the ESP32's NVS)")
    parser.add_argument("--console", help="the serial console to provision over (a tty path)")
    parser.add_argument("--provision", action="store_true", help="wait for provisioning on --console first")
    parser.add_argument("--cycles", type=int, default=None, help="stop after N telemetry sends")
    parser.add_argument("--speed", type=float, default=1.0, help="run the intervals N times faster")
    parser.add_argument("--cafile", default=None, help="the site CA to pin (https checked against it only)")
    args = parser.parse_args(argv)
    if args.cafile:
        import ssl

        global TLS
        TLS = ssl.create_default_context(cafile=args.cafile)  # this CA only: no system roots
    if args.provision:
        fd = os.open(args.console, os.O_RDWR | os.O_NOCTTY)
        try:
            if not serve_console(fd, args.prefs):
                return 1
        finally:
            os.close(fd)
    prefs = load_prefs(args.prefs)
    if not all(prefs.get(k) for k in PREF_KEYS):
        print("not provisioned: run with --console PORT --provision", file=sys.stderr)
        return 1
    device = Device(prefs, speed=args.speed)
    device.run(args.cycles)
    print(json.dumps(device.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
