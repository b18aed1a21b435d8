"""MicroPython's `urequests` on CPython (urllib), as far as the spec's Pico client uses it:
`get`/`post(url, headers=, data=)` and a response with `status_code`, `text`, `json()`.
An HTTP error status is a response, as on the device (urequests raises only on I/O).

`TLS` is set by what runs the client (runner.py's `--cafile`): an ssl.SSLContext that
pins the site CA, so an https:// API_BASE is checked against it only."""

import json
import urllib.error
import urllib.request

#: The site CA pinned (an ssl.SSLContext), or None: no pinning.
TLS = None


class Response:
    def __init__(self, status_code, content):
        self.status_code = status_code
        self.content = content
        self.text = content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)

    def close(self):
        pass


def request(method, url, data=None, json=None, headers=None):
    if json is not None:
        data = __import__("json").dumps(json)
    if isinstance(data, str):
        data = data.encode("utf-8")
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30, context=TLS) as r:
            return Response(r.status, r.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, e.read())


def get(url, **kw):
    return request("GET", url, **kw)


def post(url, **kw):
    return request("POST", url, **kw)


def put(url, **kw):
    return request("PUT", url, **kw)
