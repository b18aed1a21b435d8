"""Reading a live stream (SSE) in tests: its `data:` lines as bytes on the wire."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio


async def sse_data_lines(stream: Any, want: Callable[[list[bytes]], bool], timeout_s: float = 30.0) -> list[bytes]:
    """The `data: ...` lines of an httpx streaming response `stream`, read until `want(lines)`
    is true or the stream ends (then what came); trio.TooSlowError after `timeout_s`."""
    lines: list[bytes] = []
    buffer = b""
    with trio.fail_after(timeout_s):
        async for chunk in stream.aiter_raw():
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                if line.startswith(b"data: "):
                    lines.append(line)
                    if want(lines):
                        return lines
    return lines
