"""An HTTP/1.1 answer of known length in one write to the socket: its head with its body.

hypercorn 0.18 writes an answer in three sends on the connection: the status line and
headers, the body, and the end of the message (no bytes at all when the length was
given). Each send takes the connection's send lock, a shielded cancel scope and a trip
through trio's socket: for a small JSON answer the three cost more than the gateway's
own work on the request (bench/thingsnxt_bench.py, bench/streetlight_bench.py). Here the
head of an answer with a `content-length` waits for its body and goes out with it, and an
empty send is not made. The bytes are h11's, the same and in the same order: only how
many writes carry them changes.

An answer without a length (chunked: Server-Sent Events, streamed downloads) is not held:
its head goes out at once, as the live streams' clients expect, and before anything the
live fast path writes straight to the socket (`gatewayd.core.live.frames`). Anything other
than the body or its end sends what was held first.

hypercorn's internals: `enable()` patches only the releases it was tested with (pinned in
constraints.txt); under others it logs why and leaves hypercorn as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import h11

from .gate import untested

try:  # hypercorn's internals: where they moved, nothing is patched (below)
    from hypercorn.events import RawData
    from hypercorn.protocol.events import Body, EndBody
    from hypercorn.protocol.h11 import H11Protocol
    _moved = ""
except ImportError as e:  # pragma: no cover  (pyproject pins the tested minor release)
    _moved = f"hypercorn's internals moved ({e})"

__all__ = ["enable", "enabled"]

log = logging.getLogger(__name__)

#: The releases (major.minor) whose internals this was tested against.
TESTED = {"hypercorn": "0.18", "h11": "0.16"}

_state = {"enabled": False}


def _why_not() -> str:
    """Why the patch is off ("" when it may be on)."""
    return _moved or untested(TESTED)


def enabled() -> bool:
    """Whether answers of known length go out in one write (`enable()` was called and took)."""
    return _state["enabled"]


def enable() -> bool:
    """Patch hypercorn's HTTP/1.1 protocol (once, for every server of this process); False,
    logged, under an untested release of hypercorn or h11."""
    if _state["enabled"]:
        return True
    why = _why_not()
    if why:
        log.warning("http: answers go out in hypercorn's own three writes: %s", why)
        return False
    original_stream_send = H11Protocol.stream_send
    setattr(H11Protocol, "_gatewayd_held", b"")  # an answer's head waiting for its body (per connection once set)

    async def _send_h11_event(self: Any, event: Any) -> None:
        # hypercorn's own, but an answer's head with a length is held for its body, the two
        # go out together, and no empty send is made.
        held: bytes = self._gatewayd_held
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            data = b""  # nothing of this event (as hypercorn); what was held still goes
        else:
            if type(event) is h11.Response and _sized(event):
                self._gatewayd_held = held + data
                return
        if held:
            self._gatewayd_held = b""
            data = held + data
        if data:
            await self.send(RawData(data=data))

    async def stream_send(self: Any, event: Any) -> None:
        if self._gatewayd_held and not isinstance(event, (Body, EndBody)):
            held, self._gatewayd_held = self._gatewayd_held, b""
            await self.send(RawData(data=held))
        await original_stream_send(self, event)

    setattr(H11Protocol, "_send_h11_event", _send_h11_event)
    setattr(H11Protocol, "stream_send", stream_send)
    _state["enabled"] = True
    return True


def _sized(response: h11.Response) -> bool:
    """Whether the answer says its length (its body follows at once, whole)."""
    return any(name == b"content-length" for name, _ in response.headers)
