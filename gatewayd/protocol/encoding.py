"""Compressed bodies (`Content-Encoding: gzip | zstd | identity`), inflated within a bound. Pure.

`inflate` never holds more than `limit` bytes of output (plus one read slice): a small
body that decompresses to gigabytes (a "zip bomb") is refused as soon as it passes the
limit. Concatenated gzip members and zstd frames are one valid stream, as their RFCs say.
The upstream batch protocol and device routes that take compressed bodies share it.
"""

from __future__ import annotations

import zlib

import zstandard

__all__ = ["ENCODINGS", "EncodingError", "inflate"]

ENCODINGS = ("identity", "gzip", "zstd")
# zstd's worst case is a 4-byte RLE block expanding to 128 KiB.
_ZSTD_MAX_RATIO = 32 * 1024


class EncodingError(ValueError):
    """A body that cannot be inflated: `status` 400 (corrupt or truncated), 413 (larger
    than the limit once inflated) or 415 (an encoding not supported), `code` a stable
    reason (`corrupt_body`, `too_large`, `unsupported_encoding`), and the message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decoded per its `Content-Encoding` (case and spaces ignored; "" is identity),
    at most `limit` bytes. Raises EncodingError."""
    encoding = encoding.strip().lower() or "identity"
    if encoding not in ENCODINGS:
        raise EncodingError(415, "unsupported_encoding",
                            f"unsupported Content-Encoding {encoding[:32]!r} (expected {', '.join(ENCODINGS)})")
    if encoding == "identity":
        if len(body) > limit:
            raise _too_large(limit)
        return body
    if not body:
        raise EncodingError(400, "corrupt_body", f"truncated {encoding} body (empty)")
    return _gunzip(body, limit) if encoding == "gzip" else _unzstd(body, limit)


def _too_large(limit: int) -> EncodingError:
    return EncodingError(413, "too_large", f"body decompresses to more than {limit} bytes")


def _gunzip(body: bytes, limit: int) -> bytes:
    out: list[bytes] = []
    total = 0
    data = body
    while data:  # concatenated gzip members are one valid stream
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            while True:
                chunk = inflater.decompress(data, limit - total + 1)
                total += len(chunk)
                if total > limit:
                    raise _too_large(limit)
                out.append(chunk)
                data = inflater.unconsumed_tail
                if inflater.eof or not data:
                    break
        except zlib.error as exc:
            raise EncodingError(400, "corrupt_body", f"corrupt gzip body: {exc}") from None
        if not inflater.eof:
            raise EncodingError(400, "corrupt_body", "truncated gzip body")
        data = inflater.unused_data
    return b"".join(out)


def _unzstd(body: bytes, limit: int) -> bytes:
    # zstandard's decompressobj has no output cap, so feed it input in slices small
    # enough that even the worst-case ratio cannot overshoot the limit by much.
    out: list[bytes] = []
    total = 0
    data = body
    while data:  # concatenated frames are one valid stream
        inflater = zstandard.ZstdDecompressor().decompressobj()
        pos = 0
        try:
            while pos < len(data) and not inflater.eof:
                step = max(256, min(65536, (limit - total) // _ZSTD_MAX_RATIO))
                chunk = inflater.decompress(data[pos : pos + step])
                pos += step
                total += len(chunk)
                if total > limit:
                    raise _too_large(limit)
                out.append(chunk)
        except zstandard.ZstdError as exc:
            raise EncodingError(400, "corrupt_body", f"corrupt zstd body: {exc}") from None
        if not inflater.eof:
            raise EncodingError(400, "corrupt_body", "truncated zstd body")
        data = inflater.unused_data + data[pos:]
    return b"".join(out)
