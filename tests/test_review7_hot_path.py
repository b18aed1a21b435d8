"""Review 7 of this stop's hot-path changes (hx6, sl6, tnx6), against the real gateway: its
HTTP app on a real socket, real SQLite, the plugins as the daemon loads them.

Both were defects (xfail first, then fixed):

- hx6's remembered URL matches (`lean.Routes`) are bounded in number, but each kept the
  request's whole path twice (the key, and the converter's argument), and since hx6's
  614b085 its whole Host header: a flood of distinct long paths that a route matches (any
  device id, before any token check), or of long distinct Hosts, held up to 4,096 of them,
  some 16 KB each, for nobody's benefit (a device id is at most 128 characters).
- tnx6's live events written from a reading's `Encoded` text: that text is the outbox's
  (`ensure_ascii=False`), which writes U+007F (DEL) as it is, where the hub's own encoding
  (main's) writes `\\u007f`: the event's bytes on the wire changed for such a reading.
"""

from __future__ import annotations

import json
from pathlib import Path

import gatewayd_streetlight
import gatewayd_thingsnxt
import pytest
import trio

from gatewayd.testing import gw_client, gw_url, provision, sse_data_lines, wait_until

TOKEN = "review7-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)


async def _flood(port: int, requests: list[tuple[str, str]]) -> list[bytes]:
    """GET each (path, Host) over one keep-alive connection, one at a time; the status lines."""
    client = await trio.open_tcp_stream("127.0.0.1", port)
    statuses = []
    buffer = b""
    for path, host in requests:
        await client.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        while b"\r\n\r\n" not in buffer:
            data = await client.receive_some(65536)
            assert data, buffer
            buffer += data
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(buffer) < length:
            data = await client.receive_some(65536)
            assert data
            buffer += data
        buffer = buffer[length:]
        statuses.append(head.split(b"\r\n")[0])
    await client.aclose()
    return statuses


def _held(routes) -> int:
    """The characters the remembered matches hold: their keys' and their arguments'."""
    return sum(sum(len(part) for part in key if part) + sum(len(str(v)) for v in args.values())
               for key, (_, args) in routes._matched.items())


async def test_a_flood_of_long_distinct_paths_does_not_fill_the_remembered_url_matches(gateway_factory):
    async with gateway_factory(plugins=[("streetlight", gatewayd_streetlight)]) as gw:
        port = int(gw_url(gw).rsplit(":", 1)[1])
        own = "/streetlight/device/IMEI:351234567890123/commands"
        long_host = ".".join(["h" * 60] * 100)  # 6,099 characters, each label a valid one
        floods = {
            "paths": [(f"/streetlight/device/IMEI:{i:06d}{'9' * 6000}/commands", "gw") for i in range(150)],
            "hosts": [(own, f"{i:06d}.{long_host}") for i in range(150)],
        }
        for what, requests in floods.items():
            gw.app.routes.clear()
            with trio.fail_after(120):
                statuses = await _flood(port, [*requests, (own, "gw")])  # a light's own: remembered
            # each matched a route, then was refused (the id is too long; not a registered light;
            # then its address locked out after so many failed authentications)
            assert set(statuses) <= {b"HTTP/1.1 400 ", b"HTTP/1.1 404 ", b"HTTP/1.1 429 "}, (what, set(statuses))
            assert any(key[1] == own for key in gw.app.routes._matched)
            # A remembered match is worth its memory for a device's own path (ids of at most 128
            # characters), not for a path or Host an attacker made up: 150 must not hold ~1 MB.
            assert _held(gw.app.routes) < 150 * 1024, (what, len(gw.app.routes), _held(gw.app.routes))


async def test_a_live_event_of_a_reading_is_the_hubs_own_json_byte_for_byte(gateway_factory):
    async with gateway_factory(plugins=[("thingsnxt", gatewayd_thingsnxt)],
                               settings=["plugins.thingsnxt.rate_limit=0"]) as gw, \
            gw_client(gw) as client:
        esp = await provision(gw, "thingsnxt", "6123456abc")
        reading = {"name": "a\u007fb", "t": 1.5}
        # Published before anyone watches: a subscriber arriving later resumes it from the ring.
        r = await client.post(f"/thingsnxt/devices/{esp.device_id}/telemetry",
                              json={"device_token": esp.key, "data": reading})
        assert r.status_code == 200, r.text
        async with client.stream("GET", "/api/gateway/live/events", params={"streams": "thingsnxt.#"},
                                 headers={**ADMIN, "Last-Event-ID": "0"}) as stream:
            assert stream.status_code == 200
            await wait_until(lambda: gw.live.subscribers == 1)
            r = await client.post(f"/thingsnxt/devices/{esp.device_id}/telemetry",
                                  json={"device_token": esp.key, "data": reading})
            assert r.status_code == 200, r.text
            lines = await sse_data_lines(stream, lambda got: len(got) == 3)  # online, the first reading (resumed), the second
        updates = [line for line in lines if b"telemetry_update" in line]
        assert len(updates) == 2
        for line in updates:
            event = json.loads(line[len(b"data: "):])
            events = event if isinstance(event, list) else [event]
            for one in events:
                # What main's hub wrote: its own encoding (ASCII: U+007F escaped) of the event.
                assert one["data"]["data"] == reading
            assert b"\\u007f" in line and b"\x7f" not in line, line


async def test_a_command_queued_by_another_process_reaches_the_lights_next_polls(gateway_factory, tmp_path):
    """sl6 keeps the empty poll's answer per second: a command `gatewayd devices command`
    queues from another process must still reach the light (the queue's change watch), and
    the poll after its ack is the empty answer again, with a fresh server_timestamp."""
    import sys

    sys.path.insert(0, str(Path(gatewayd_streetlight.__file__).parents[1] / "tests"))
    from streetlight_testbed import BASE, IMEI, bearer, configure

    async with gateway_factory(plugins=[("streetlight", gatewayd_streetlight)],
                               settings=["devices.presence_flush_s=0.05"]) as gw, gw_client(gw) as client:
        await provision(gw, "streetlight", IMEI)
        auth = bearer((await configure(client))["device_token"])

        async def poll() -> dict:
            r = await client.get(f"{BASE}/{IMEI}/commands", headers=auth)
            assert r.status_code == 200, r.text
            return dict(r.json())

        empty = await poll()
        assert empty["commands"] == []
        cli = [sys.executable, "-m", "gatewayd", "devices", "command", IMEI, '{"command_type": "power_control", "action": "on"}', "--set",
               f"gateway.data_dir='{tmp_path / 'var'}'"]
        done = await trio.run_process(cli, capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr
        got: list[dict] = []

        async def delivered() -> bool:
            answer = await poll()
            got.append(answer)
            return bool(answer["commands"])

        await wait_until(delivered)
        [cmd] = got[-1]["commands"]
        r = await client.post(f"{BASE}/{IMEI}/command-ack", headers=auth,
                              json={"command_id": cmd["command_id"], "status": "executed", "device_id": IMEI,
                                    "timestamp": "2025-12-17T10:31:00Z"})
        assert r.status_code == 200, r.text
        await trio.sleep(1.1)  # the next second: the kept empty answer of an earlier one must not come back
        after = await poll()
        assert after["commands"] == [] and after["server_timestamp"] > empty["server_timestamp"]


async def test_a_large_answer_the_socket_takes_in_parts_arrives_whole_and_in_order():
    """hx6 writes an answer's bytes straight to the socket and leaves the rest to send_all:
    a body larger than the socket buffer, to a client that reads slowly, and a streamed body of
    many chunks, arrive byte for byte; the keep-alive connection answers the next request."""
    import hashlib

    from quart import Response

    from gatewayd.core.http.app import create_app
    from gatewayd.core.http.serve import serve_app
    from gatewayd.core.logs import get_logger
    from gatewayd.core.schema import Address
    from gatewayd.testing.ports import reserved_port

    big = bytes(range(256)) * (8 * 4096)  # 8 MiB: more than the sockets hold
    app = create_app("review7", max_body_bytes=1 << 20, log=get_logger("review7"))

    @app.get("/big")
    async def whole() -> Response:
        return Response(big, content_type="application/octet-stream")

    @app.get("/stream")
    async def streamed() -> Response:
        async def chunks():
            for i in range(0, len(big), 7919):
                yield big[i:i + 7919]
        return Response(chunks(), content_type="application/octet-stream")

    port = reserved_port()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_app(
            app, Address("127.0.0.1", port), shutdown_trigger=stop.wait, graceful_timeout=1,
            access_log=False, task_status=task_status))
        client = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(120):
            await client.send_all(b"GET /big HTTP/1.1\r\nHost: gw\r\n\r\nGET /stream HTTP/1.1\r\nHost: gw\r\n\r\n"
                                  b"GET /big HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            got = bytearray()
            n = 0
            while True:
                data = await client.receive_some(65536)
                if not data:
                    break
                got += data
                n += 1
                if n % 64 == 0:
                    await trio.sleep(0.01)  # a slow reader: the gateway's socket buffer fills
        stop.set()
    answers = bytes(got).split(b"HTTP/1.1 200 \r\n")
    assert len(answers) == 4 and answers[0] == b""
    digest = hashlib.sha256(big).hexdigest()
    first, second, third = answers[1:]
    assert hashlib.sha256(first.partition(b"\r\n\r\n")[2]).hexdigest() == digest
    assert b"transfer-encoding: chunked" in second.partition(b"\r\n\r\n")[0].lower()
    body, rest = bytearray(), second.partition(b"\r\n\r\n")[2]
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        body += rest[:int(size, 16)]
        rest = rest[int(size, 16) + 2:]
    assert hashlib.sha256(body).hexdigest() == digest
    assert hashlib.sha256(third.partition(b"\r\n\r\n")[2]).hexdigest() == digest
