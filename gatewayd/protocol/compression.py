"""Compressed bodies decoded with a cap on what they expand to: pure, no I/O.

A body sent with `Content-Encoding: gzip` (or `zstd`) may expand a thousandfold: a
few kilobytes on the wire can be gigabytes in memory. `decompress` stops as soon as
the output passes `limit`, and refuses a truncated or corrupt stream with the reason.
Used by the upstream batch codec (`batch.py`) and, through `read_body` in the plugin
API, by device routes whose specification compresses what devices send (the
streetlight offline cache: "gzip for payloads > 10 KB").
"""

from __future__ import annotations

import zlib

import zstandard

__all__ = ["ENCODINGS", "DecodeError", "decompress"]

ENCODINGS = ("gzip", "zstd", "identity")
# zstd's worst case is a 4-byte RLE block expanding to 128 KiB.
_ZSTD_MAX_RATIO = 32 * 1024


class DecodeError(ValueError):
    """A body that cannot be decoded: `status` is the HTTP answer (400 corrupt or
    truncated, 413 larger than the limit once decoded, 415 an unknown encoding),
    `message` says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decoded from `encoding` (gzip, zstd or identity; concatenated gzip
    members or zstd frames are one stream), at most `limit` bytes of it; DecodeError
    otherwise. An identity body over `limit` is refused as well."""
    if encoding == "identity":
        if len(body) > limit:
            raise _too_large(limit)
        return body
    if encoding not in ENCODINGS:
        raise DecodeError(415, f"unsupported Content-Encoding {encoding!r} (expected gzip, zstd or none)")
    if not body:
        raise DecodeError(400, f"truncated {encoding} body (empty)")
    return _gunzip(body, limit) if encoding == "gzip" else _unzstd(body, limit)


def _too_large(limit: int) -> DecodeError:
    return DecodeError(413, f"body decompresses to more than {limit} bytes")


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
            raise DecodeError(400, f"corrupt gzip body: {exc}") from None
        if not inflater.eof:
            raise DecodeError(400, "truncated gzip body")
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
            raise DecodeError(400, f"corrupt zstd body: {exc}") from None
        if not inflater.eof:
            raise DecodeError(400, "truncated zstd body")
        data = inflater.unused_data + data[pos:]
    return b"".join(out)
