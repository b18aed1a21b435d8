"""Review 6 of the live hub's direct writes (live5) against the real daemon: with more
subscribers than the write budget lets each be woken for (`live.writes_per_s` low), the hub's
timer task writes every cut straight to each parked reader's connection. Then: every reader
gets every event once and in order, while one subscriber closes with the WebSocket handshake
in the middle of the stream, one stops reading altogether (its socket fills), and the
publishes never wait for either."""

from __future__ import annotations

import json
import socket

import trio
from trio_websocket import open_websocket_url

from gatewayd.testing import gw_client, gw_url, wait_until

from .test_live import ADMIN, TOKEN, admin_token, read_sse  # noqa: F401  (admin_token: the fixture)

N = 300
UPGRADE = ("GET /api/gateway/live?streams=paku.%23 HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           f"Authorization: Bearer {TOKEN}\r\n\r\n").encode()


async def test_direct_writes_keep_order_through_a_close_handshake_and_a_stuck_reader(gateway_factory, monkeypatch):
    from gatewayd.core.live.hub import _Channel

    direct = [0]
    write_parked = _Channel._write_parked

    def counting(self, now):
        direct[0] += len(self.parked)  # readers the cut is written to by whoever cuts
        return write_parked(self, now)

    monkeypatch.setattr(_Channel, "_write_parked", counting)
    async with gateway_factory(settings=["live.writes_per_s=10", "live.heartbeat_s=1"]) as gw, \
            gw_client(gw) as client:
        url = gw_url(gw).replace("http://", "ws://") + "/api/gateway/live?streams=paku.%23"
        headers = [("Authorization", f"Bearer {TOKEN}")]
        host, port = gw_url(gw).removeprefix("http://").rsplit(":", 1)
        stuck = trio.socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few batches
        await stuck.connect((host, int(port)))
        await stuck.send(UPGRADE)  # upgraded, then never read again
        async with open_websocket_url(url, extra_headers=headers) as a, \
                open_websocket_url(url, extra_headers=headers) as b, \
                open_websocket_url(url, extra_headers=headers) as c, \
                client.stream("GET", "/api/gateway/live/events", params={"streams": "paku.#"}, headers=ADMIN) as r:
            await wait_until(lambda: gw.live.subscribers == 5)
            assert gw.live.cut_every_s > gw.live.batch_s  # the regime where the hub writes itself
            got: dict[str, list[int]] = {"a": [], "b": [], "c": []}

            async def read_ws(name: str, ws) -> None:
                while len(got[name]) < N:
                    for item in json.loads(await ws.get_message()):
                        if "data" in item:
                            got[name].append(item["data"]["i"])
                        else:
                            got[name].append(-1)  # a gap: nothing may be lost here

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_ws, "a", a)
                nursery.start_soon(read_ws, "b", b)
                for i in range(N):
                    gw.live.publish("paku.telemetry.pk-1", {"i": i, "pad": "x" * 200})  # never waits
                    if i == N // 2:
                        with trio.fail_after(30):
                            await c.aclose()  # the close handshake, answered mid-stream
                    if i % 10 == 9:
                        await trio.sleep(0.05)
                sse = [e["data"]["data"]["i"] for e in await read_sse(r, N)]
            assert c.closed is not None and c.closed.code == 1000
        assert got["a"] == got["b"] == sse == list(range(N))
        assert direct[0] > 0  # the hub did write cuts itself (what this test is about)
        stuck.close()


async def test_the_gateway_stops_though_a_stuck_reader_holds_a_write_the_hub_began(gateway_factory):
    """A reader that stops reading while the hub writes to it directly: the socket takes part
    of a batch, the hub leaves the rest to the reader's task (shielded, the send lock held).
    The gateway's stop must still end within its grace (abort_stalled_writes)."""
    from gatewayd.core.live import frames

    stuck = []
    with trio.fail_after(120):  # a hang detector: the grace is 1 s
        async with gateway_factory(settings=["live.writes_per_s=10", "gateway.shutdown_grace_s=1"]) as gw:
            host, port = gw_url(gw).removeprefix("http://").rsplit(":", 1)
            for _ in range(3):  # more readers than the budget: the hub writes each cut itself
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                await sock.connect((host, int(port)))
                await sock.send(UPGRADE)
                stuck.append(sock)
            await wait_until(lambda: gw.live.subscribers == 3)
            assert gw.live.cut_every_s > gw.live.batch_s
            while not frames._in_write:  # until a write is left half done on a full socket
                gw.live.publish("paku.telemetry.pk-1", {"pad": "x" * 50_000})
                await trio.sleep(0.05)
            gw.request_shutdown()  # leaving the block waits for the gateway to stop
    for sock in stuck:
        sock.close()
    assert not frames._in_write
