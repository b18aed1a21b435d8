"""Serving firmware over HTTP: Content-Length, ETag, conditional GET and byte ranges.

Devices on flaky links resume a download with `Range: bytes=N-` (206 Partial Content);
`If-Range: "<sha256>"` makes sure the resumed part belongs to the same image. The same
response serves the admin route `/api/gateway/firmware/<id>/download` and any plugin
route (`await ctx.ota.response(fw)`, `ota/family.py`), so every family gets resumable downloads.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal
from urllib.parse import quote

import trio
from msgspec import Meta, Struct
from quart import Blueprint, Response, request

from ..http.app import AdminGuard
from ..http.declare import ADMIN_TOKEN, Raw, Routes
from ..http.errors import error_response
from .store import REPORT_STATUSES, Firmware, OtaStore, unprintable

__all__ = ["parse_range", "content_disposition", "firmware_response", "firmware_blueprint"]

CHUNK = 64 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | Literal["unsatisfiable"]:
    """One byte range of a `size`-byte file, inclusive; None = send it all.

    Follows RFC 9110 14.2: a missing, malformed or multi-range header is ignored (the
    whole file, 200); a range starting at or past the end is "unsatisfiable" (416);
    an end past the file is clamped; `bytes=-N` is the last N bytes.
    """
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:  # a suffix: the last N bytes
        suffix = int(m[2])
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(m[1])
    end = int(m[2]) if m[2] else size - 1
    if m[2] and end < start:
        return None  # invalid syntax: ignore the header
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


async def _read_file(fw: Firmware, start: int, length: int) -> AsyncIterator[bytes]:
    async with await trio.open_file(fw.path, "rb") as f:
        await f.seek(start)
        remaining = length
        while remaining > 0:
            chunk = await f.read(min(CHUNK, remaining))
            if not chunk:
                return  # the file shrank under us; the client sees a short body and retries
            remaining -= len(chunk)
            yield chunk


def content_disposition(filename: str) -> str:
    """`attachment` with the name as a quoted ASCII `filename` and, when that had to
    change it, the exact name as `filename*` (RFC 6266, RFC 8187).

    Whatever is stored: a control character in a header value makes the server refuse
    the whole response, and a name stored before names were checked must still download.
    """
    shown = "".join("_" if unprintable(c) else c for c in filename) or "firmware.bin"
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in shown)
    value = f'attachment; filename="{plain}"'
    if plain != filename:
        value += "; filename*=UTF-8''" + quote(shown, safe="", errors="replace")
    return value


def _etag_matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


async def firmware_response(fw: Firmware) -> Response:
    """Serve `fw` for the current Quart request (200, 206, 304 or 416)."""
    try:
        size = (await trio.Path(fw.path).stat()).st_size
    except OSError:
        return error_response(500, f"firmware {fw.id}: the image file is missing from the store")
    if size != fw.size:
        return error_response(500, f"firmware {fw.id}: the image file changed on disk; run gatewayd firmware verify")
    headers = {
        "ETag": fw.etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "no-cache",
        "Content-Disposition": content_disposition(fw.filename),
        "X-Firmware-Version": fw.version,
        "X-Firmware-SHA256": fw.sha256,
    }
    if fw.signature:
        headers["X-Firmware-Signature"] = fw.signature
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match and _etag_matches(if_none_match, fw.etag):
        return Response(b"", status=304, headers={"ETag": fw.etag})
    wanted = parse_range(request.headers.get("Range"), size)
    if_range = request.headers.get("If-Range")
    if wanted is not None and if_range is not None and if_range.strip() != fw.etag:
        wanted = None  # the client holds part of another image: send this one whole
    if wanted == "unsatisfiable":
        response = error_response(416, f"range not satisfiable: the image is {size} bytes")
        response.headers["Content-Range"] = f"bytes */{size}"
        return response
    start, end, status = (0, size - 1, 200) if wanted is None else (*wanted, 206)
    length = max(0, end - start + 1)
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(length)
    body: Any = _read_file(fw, start, length) if request.method != "HEAD" else b""
    response = Response(body, status=status, headers=headers, content_type="application/octet-stream")
    return response


class FirmwareOut(Struct):
    id: int
    family: str
    model: str
    version: str
    channel: str
    filename: str
    size: int
    sha256: str
    signature: str | None
    key_id: str | None
    rollout_percent: float
    created_at: float


class FirmwareList(Struct):
    firmware: list[FirmwareOut]


class Report(Struct):
    id: int
    ts: float
    family: str
    device_id: str
    firmware_id: int | None
    version: str | None
    status: Annotated[str, Meta(description="one of " + ", ".join(REPORT_STATUSES))]
    detail: str


class Reports(Struct):
    reports: list[Report]


class ListQuery(Struct, forbid_unknown_fields=True):
    family: str = ""


class ReportsQuery(Struct, forbid_unknown_fields=True):
    device: str = ""
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100


IMAGE = Raw("application/octet-stream", "the image (with Content-Length, ETag and its X-Firmware-* headers)")
NO_IMAGE = {404: "no firmware with this id", 500: "the image file is missing from the store or changed on disk"}


def firmware_blueprint(ota: OtaStore, admin: AdminGuard) -> Blueprint:
    """Admin routes: list images, one image, its download, and OTA reports."""
    bp = Blueprint("gatewayd_firmware", __name__)
    routes = Routes(bp, tag="firmware", auth=ADMIN_TOKEN)

    @bp.before_request
    async def _admin() -> Response | None:
        return admin.check()

    @routes.get("/api/gateway/firmware", query=ListQuery, responses={200: FirmwareList})
    async def list_firmware(query: ListQuery) -> Any:
        """The images in the OTA store (of one family), newest first."""
        return {"firmware": [f.as_dict() for f in await ota.list(query.family or None)]}

    @routes.get("/api/gateway/firmware/<int:firmware_id>", responses={200: FirmwareOut},
                errors={404: "no firmware with this id"})
    async def one(firmware_id: int) -> Any:
        """One image."""
        fw = await ota.get(firmware_id)
        if fw is None:
            return error_response(404, f"no firmware with id {firmware_id}")
        return fw.as_dict()

    @routes.get("/api/gateway/firmware/<int:firmware_id>/download",
                responses={200: IMAGE, 206: Raw("application/octet-stream", "the range asked for (Range, If-Range)"),
                           304: None},
                errors={**NO_IMAGE, 416: "the range starts past the end of the image"})
    async def download(firmware_id: int) -> Any:
        """An image, resumable: Range, If-Range and If-None-Match (docs/ota.md)."""
        fw = await ota.get(firmware_id)
        if fw is None:
            return error_response(404, f"no firmware with id {firmware_id}")
        return await firmware_response(fw)

    @routes.get("/api/gateway/firmware/reports", query=ReportsQuery, responses={200: Reports})
    async def reports(query: ReportsQuery) -> Any:
        """Devices' OTA progress reports, newest first (of one device)."""
        return {"reports": await ota.reports(query.device or None, query.limit)}

    return bp
