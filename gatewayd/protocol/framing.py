"""Serial framers: bytes on a line <-> whole frames, sans-I/O.

Nothing here touches trio or pyserial; :mod:`gatewayd.core.serial.link` feeds the
bytes it reads into a framer and sends what ``encode`` returns.

API
---
``make_framer(name, *, max_frame, crc) -> Framer`` builds one of
``FRAMERS``: ``"jsonl"`` (newline-delimited), ``"length"`` (2-byte big-endian
length prefix), ``"slip"`` (RFC 1055), ``"cobs"`` (0x00-delimited COBS).

* ``framer.encode(payload) -> bytes``: the bytes to put on the line. Raises
  ``ValueError`` for a payload the framing cannot carry (empty, longer than
  ``max_frame``, a newline inside a jsonl payload).
* ``framer.feed(data) -> list[bytes | FramingError]``: decode what arrived, in
  order. A ``bytes`` item is one frame's payload (CRC checked and removed); a
  :class:`FramingError` is a value (never raised) saying why some bytes were
  dropped. Noise never raises and never wedges the framer. Output depends only
  on the byte stream, not on how it was split into ``feed`` calls.
* ``framer.reset()``: forget partial input (after a reconnect).

``max_frame`` bounds the payload (CRC and framing overhead excluded); the
buffer a framer holds stays bounded by it. Empty payloads are not frames:
encoders refuse them and decoders drop empty frames silently, which lets SLIP
and COBS send a leading delimiter that flushes line noise (RFC 1055 advice).

CRC is CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, xorout 0;
check value 0x29B1 for ``b"123456789"``), computed over the payload and
appended big-endian before framing. For jsonl it is appended as 4 uppercase
hex digits instead, because the binary CRC may contain ``\\n`` or ``\\r``.

Resynchronisation after garbage
-------------------------------
* jsonl, slip, cobs: noise ends at the next delimiter. Garbage followed by a
  delimiter and a frame yields that frame; slip and cobs encoders start every
  frame with a delimiter, so garbage followed by ``encode(p)`` yields ``p``
  (possibly after one junk frame or error for the garbage itself; with CRC
  on, junk is reported as an error instead of delivered). jsonl does not add
  a leading newline (devices read it as a blank line), so noise without a
  newline merges into the next line, which is lost or, without CRC, delivered
  corrupted.
* length, crc on: the stream is scanned for a 2-byte header with a length in
  ``1..max_frame+2`` whose body passes the CRC; on a bad length or CRC
  mismatch the scan slides by one byte. Promise: a valid frame after garbage is
  delivered, unless a header inside the garbage *also* passes this check (a
  false match, about 2**-16 per plausible offset) and swallows its start. A
  plausible header in garbage may also ask for more bytes than have arrived;
  the frame behind it is then delivered only once enough further bytes
  (at most ``max_frame + 4``) arrive. One error is reported per episode.
* length, crc off: nothing distinguishes a header from payload, so the header
  is trusted. A too-long length is reported as ``oversized`` and that many
  bytes are skipped; a zero length as ``bad length``. After garbage, frames
  may come out misaligned and bogus until the stream realigns by chance: no
  resynchronisation is promised. Use crc = true on lines that see noise.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "FRAMERS",
    "CobsFramer",
    "Framer",
    "FramingError",
    "LengthFramer",
    "LineFramer",
    "SlipFramer",
    "crc16_ccitt",
    "make_framer",
]

# Reasons a FramingError can carry.
OVERSIZED = "oversized"
CRC_MISMATCH = "crc mismatch"
BAD_ESCAPE = "bad escape"  # slip: ESC not followed by ESC_END / ESC_ESC
BAD_COBS = "bad cobs"  # cobs: a code byte points past the end of the frame
BAD_LENGTH = "bad length"  # length: header of 0
TOO_SHORT = "too short"  # crc on: frame shorter than the CRC itself

_SAMPLE = 32  # bytes of a bad frame kept for diagnostics (the probe shows them)


@dataclass(frozen=True, slots=True)
class FramingError:
    """Bytes the framer dropped, and why. Returned by ``feed``, never raised.

    ``reason`` is one of "oversized", "crc mismatch", "bad escape",
    "bad cobs", "bad length", "too short". ``sample`` holds at most the first
    32 raw bytes involved, for diagnostics (do not log it at info level).
    """

    reason: str
    sample: bytes = b""


def crc16_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE of ``data`` (binascii's crc_hqx is that CRC)."""
    return binascii.crc_hqx(data, 0xFFFF)


class Framer:
    """Base of the four framers; see the module docstring for the contract."""

    name = ""
    _crc_len = 2  # bytes the CRC adds to a body (jsonl: 4 hex digits)

    def __init__(self, *, max_frame: int = 4096, crc: bool = False) -> None:
        if max_frame < 1:
            raise ValueError(f"max_frame must be >= 1, got {max_frame}")
        self.max_frame = max_frame
        self.crc = crc
        # Largest body (payload + CRC) a valid frame can have.
        self.max_body = max_frame + (self._crc_len if crc else 0)

    def encode(self, payload: bytes) -> bytes:
        """The bytes that carry ``payload`` on the line."""
        if not payload:
            raise ValueError("empty payload")
        if len(payload) > self.max_frame:
            raise ValueError(f"payload of {len(payload)} bytes exceeds max_frame {self.max_frame}")
        return self._wrap(self._seal(payload))

    def feed(self, data: bytes) -> list[bytes | FramingError]:
        """Decode ``data``; return complete frames and errors in stream order."""
        raise NotImplementedError

    def reset(self) -> None:
        """Drop any partial frame (the line was reopened)."""
        raise NotImplementedError

    def _wrap(self, body: bytes) -> bytes:
        raise NotImplementedError

    def _seal(self, payload: bytes) -> bytes:
        if not self.crc:
            return payload
        return payload + crc16_ccitt(payload).to_bytes(2, "big")

    def _unseal(self, body: bytes) -> bytes | FramingError:
        """Check and strip the CRC; ``body`` is known to be within max_body."""
        if not self.crc:
            return body
        if len(body) <= 2:
            return FramingError(TOO_SHORT, body[:_SAMPLE])
        payload, tail = body[:-2], body[-2:]
        if crc16_ccitt(payload).to_bytes(2, "big") != tail:
            return FramingError(CRC_MISMATCH, body[:_SAMPLE])
        return payload


class _DelimitedFramer(Framer):
    """Shared buffering for framers whose frames end at a delimiter byte."""

    _delim = b"\n"

    def __init__(self, *, max_frame: int = 4096, crc: bool = False) -> None:
        super().__init__(max_frame=max_frame, crc=crc)
        self._max_raw = self._raw_bound(self.max_body)
        self.reset()

    def reset(self) -> None:
        self._buf = bytearray()
        self._discarding: bytes | None = None  # sample of an oversized frame

    def _raw_bound(self, body: int) -> int:
        """Longest on-the-line frame (delimiter excluded) for a body of that size."""
        raise NotImplementedError

    def _decode(self, raw: bytes) -> bytes | FramingError:
        """One delimited chunk (non-empty) -> body or error."""
        raise NotImplementedError

    def feed(self, data: bytes) -> list[bytes | FramingError]:
        out: list[bytes | FramingError] = []
        buf = self._buf
        buf += data
        start = 0
        while True:
            end = buf.find(self._delim, start)
            if end < 0:
                break
            raw = bytes(buf[start:end])
            start = end + 1
            if self._discarding is not None:
                out.append(FramingError(OVERSIZED, self._discarding))
                self._discarding = None
            elif len(raw) > self._max_raw:
                out.append(FramingError(OVERSIZED, raw[:_SAMPLE]))
            elif raw:
                self._emit(raw, out)
        del buf[:start]
        # Too long to be a frame whatever comes next: keep only a sample of its
        # start, so a line of noise without delimiters cannot grow memory.
        if self._discarding is not None:
            self._discarding += buf[: _SAMPLE - len(self._discarding)]
            buf.clear()
        elif len(buf) > self._max_raw:
            self._discarding = bytes(buf[:_SAMPLE])
            buf.clear()
        return out

    def _emit(self, raw: bytes, out: list[bytes | FramingError]) -> None:
        body = self._decode(raw)
        if isinstance(body, FramingError):
            out.append(body)
        elif len(body) > self.max_body:
            out.append(FramingError(OVERSIZED, raw[:_SAMPLE]))
        elif body:
            out.append(self._unseal(body))


class LineFramer(_DelimitedFramer):
    """Newline-delimited frames (JSON lines). A trailing ``\\r`` is stripped;
    blank lines are skipped. Payloads may not contain ``\\n`` or end in ``\\r``."""

    name = "jsonl"
    _crc_len = 4

    def _raw_bound(self, body: int) -> int:
        return body + 1  # a CRLF line ending

    def _wrap(self, body: bytes) -> bytes:
        return body + b"\n"

    def encode(self, payload: bytes) -> bytes:
        if b"\n" in payload or payload.endswith(b"\r"):
            raise ValueError("a jsonl payload may not contain \\n or end with \\r")
        return super().encode(payload)

    def _seal(self, payload: bytes) -> bytes:
        return payload + b"%04X" % crc16_ccitt(payload) if self.crc else payload

    def _decode(self, raw: bytes) -> bytes:
        return raw[:-1] if raw.endswith(b"\r") else raw

    def _unseal(self, body: bytes) -> bytes | FramingError:
        if not self.crc:
            return body
        if len(body) <= 4:
            return FramingError(TOO_SHORT, body[:_SAMPLE])
        payload, tail = body[:-4], body[-4:]
        if b"%04X" % crc16_ccitt(payload) != tail.upper():
            return FramingError(CRC_MISMATCH, body[:_SAMPLE])
        return payload


_END, _ESC, _ESC_END, _ESC_ESC = b"\xc0", b"\xdb", b"\xdc", b"\xdd"


class SlipFramer(_DelimitedFramer):
    """SLIP (RFC 1055): END=0xC0 delimits, ESC=0xDB escapes. Each encoded
    frame starts with END as well, so noise before it is cut off."""

    name = "slip"
    _delim = _END

    def _raw_bound(self, body: int) -> int:
        return 2 * body  # every byte escaped

    def _wrap(self, body: bytes) -> bytes:
        escaped = body.replace(_ESC, _ESC + _ESC_ESC).replace(_END, _ESC + _ESC_END)
        return _END + escaped + _END

    def _decode(self, raw: bytes) -> bytes | FramingError:
        if _ESC not in raw:
            return raw
        head, *rest = raw.split(_ESC)
        parts = [head]
        for part in rest:
            # An ESC at the very end of a frame (part == b"") is a bad escape too.
            if part[:1] == _ESC_END:
                parts.append(_END)
            elif part[:1] == _ESC_ESC:
                parts.append(_ESC)
            else:
                return FramingError(BAD_ESCAPE, raw[:_SAMPLE])
            parts.append(part[1:])
        return b"".join(parts)


class CobsFramer(_DelimitedFramer):
    """COBS with a 0x00 delimiter. Each encoded frame starts with 0x00 as
    well, so noise before it is cut off (an empty frame is ignored)."""

    name = "cobs"
    _delim = b"\x00"

    def _raw_bound(self, body: int) -> int:
        return body + body // 254 + 1

    def _wrap(self, body: bytes) -> bytes:
        out = bytearray(b"\x00")
        for block in _cobs_blocks(body):
            out.append(len(block) + 1)
            out += block
        out.append(0)
        return bytes(out)

    def _decode(self, raw: bytes) -> bytes | FramingError:
        out = bytearray()
        i, n = 0, len(raw)
        while i < n:
            code = raw[i]
            end = i + code
            if end > n:
                return FramingError(BAD_COBS, raw[:_SAMPLE])
            out += raw[i + 1 : end]
            if code != 0xFF and end < n:
                out.append(0)
            i = end
        return bytes(out)


def _cobs_blocks(body: bytes) -> list[bytes]:
    """Split ``body`` into COBS blocks: zero-free runs of at most 254 bytes.

    Every block but a full 254-byte one (code 0xFF) stands for its bytes plus
    a zero, the last block's zero being dropped by the decoder.
    """
    blocks = []
    for run in body.split(b"\x00"):
        while len(run) >= 254:
            blocks.append(run[:254])
            run = run[254:]
        blocks.append(run)
    # A body ending in a full block leaves an empty final block that carries
    # nothing (its zero is dropped anyway): save the byte.
    if len(blocks) > 1 and not blocks[-1] and len(blocks[-2]) == 254:
        blocks.pop()
    return blocks


class LengthFramer(Framer):
    """Frames as a 2-byte big-endian body length followed by the body.
    See the module docstring for what it can promise after garbage."""

    name = "length"

    def __init__(self, *, max_frame: int = 4096, crc: bool = False) -> None:
        super().__init__(max_frame=max_frame, crc=crc)
        if self.max_body > 0xFFFF:
            raise ValueError(f"max_frame {max_frame} does not fit a 2-byte length with this crc setting")
        self.reset()

    def reset(self) -> None:
        self._buf = bytearray()
        self._skip = 0  # crc off: bytes of an oversized frame still to drop
        self._resyncing = False  # crc on: an error was reported, scanning on

    def _wrap(self, body: bytes) -> bytes:
        return len(body).to_bytes(2, "big") + body

    def feed(self, data: bytes) -> list[bytes | FramingError]:
        out: list[bytes | FramingError] = []
        buf = self._buf
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        buf += data
        pos = 0
        while len(buf) - pos >= 2:
            length = int.from_bytes(buf[pos : pos + 2], "big")
            if self.crc:
                if not 2 < length <= self.max_body:
                    pos = self._slide(pos, BAD_LENGTH if length <= 2 else OVERSIZED, out)
                    continue
                if len(buf) - pos - 2 < length:
                    break
                body = self._unseal(bytes(buf[pos + 2 : pos + 2 + length]))
                if isinstance(body, FramingError):
                    pos = self._slide(pos, body.reason, out)
                    continue
                self._resyncing = False
                out.append(body)
                pos += 2 + length
            elif length == 0:
                out.append(FramingError(BAD_LENGTH, bytes(buf[pos : pos + 2])))
                pos += 2
            elif length > self.max_body:
                out.append(FramingError(OVERSIZED, bytes(buf[pos : pos + 2])))
                available = len(buf) - pos - 2
                if available < length:
                    self._skip = length - available
                    pos = len(buf)
                else:
                    pos += 2 + length
            elif len(buf) - pos - 2 < length:
                break
            else:
                out.append(bytes(buf[pos + 2 : pos + 2 + length]))
                pos += 2 + length
        del buf[:pos]
        return out

    def _slide(self, pos: int, reason: str, out: list[bytes | FramingError]) -> int:
        # Report the first failure of an episode only: sliding through noise
        # would otherwise produce one error per byte.
        if not self._resyncing:
            out.append(FramingError(reason, bytes(self._buf[pos : pos + 2])))
            self._resyncing = True
        return pos + 1


FRAMERS: dict[str, Callable[..., Framer]] = {
    "jsonl": LineFramer,
    "length": LengthFramer,
    "slip": SlipFramer,
    "cobs": CobsFramer,
}


def make_framer(name: str, *, max_frame: int = 4096, crc: bool = False) -> Framer:
    """A new framer of kind ``name`` (a key of ``FRAMERS``).

    Raises ``ValueError`` for an unknown name or an impossible ``max_frame``.
    """
    try:
        factory = FRAMERS[name]
    except KeyError:
        raise ValueError(f"unknown framing {name!r}; expected one of {', '.join(FRAMERS)}") from None
    return factory(max_frame=max_frame, crc=crc)
