"""Request bodies in, JSON out: strict both ways (see gatewayd.protocol.strict_json)."""

from __future__ import annotations

from typing import Any

import trio
from flask.json.provider import DefaultJSONProvider
from quart import request

from ...protocol.encoding import EncodingError, inflate
from ...protocol.json_encoders import json_encoder
from ...protocol.strict_json import BadJSON, json_kind, parse_json

__all__ = ["BodyTooLarge", "StrictJSONProvider", "body_received", "read_body", "read_json_object", "request_data"]

# Inflating a larger body takes milliseconds: a worker thread does it, not the trio thread.
_INFLATE_INLINE_BYTES = 64 * 1024


class BodyTooLarge(EncodingError):
    """A body larger than `http.max_body_bytes` as sent: 413, code `payload_too_large`.

    The app answers Quart's own 413 by raising this one in its place: an EncodingError, so
    a Blueprint that answers those in its family's shape answers this one in it too."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"the body is larger than {limit} bytes (http.max_body_bytes)")


def body_received() -> bool:
    """Whether all of the current request's body has come in, within `http.max_body_bytes`
    (then `request_data()` needs no wait)."""
    body = request.body
    # quart's Body keeps these (quart and quart-trio are pinned, constraints.txt; a test
    # reads a body through both ways); anything else is answered "not known": wait.
    complete = getattr(body, "_complete", None)
    return complete is not None and complete.is_set() and getattr(body, "_must_raise", True) is None


async def request_data() -> bytes:
    """The current request's body, as `request.get_data()` returns it (413 beyond
    `http.max_body_bytes`), without its wait when the body is already in: quart's
    `get_data` opens a cancel scope and passes a checkpoint every call, which costs a
    small request more than reading its body (the declared routes read each body once,
    the core's after-request hook again)."""
    if body_received():
        return bytes(request.body._data)
    return await request.get_data()


async def read_body(*, max_inflated: int | None = None) -> bytes:
    """The current request's body. With `max_inflated`, a body sent with
    `Content-Encoding: gzip` or `zstd` is inflated, up to that many bytes: EncodingError
    (answer its `status`: 400 corrupt or truncated, 413 too large once inflated, 415 an
    encoding not supported). Without it the bytes are returned as they came. Either way
    a body over `http.max_body_bytes` as sent has already been refused with 413."""
    raw = await request_data()
    if max_inflated is None:
        return raw
    encoding = request.headers.get("Content-Encoding", "")
    if len(raw) > _INFLATE_INLINE_BYTES:
        return await trio.to_thread.run_sync(inflate, raw, encoding, max_inflated)
    return inflate(raw, encoding, max_inflated)


async def read_json_object(*, required: bool = False, max_inflated: int | None = None) -> dict[str, Any]:
    """The current request's body as a JSON object, parsed strictly (`parse_json`).

    An empty body is `{}` unless `required`. Raises BadJSON (answer 400); a body over
    `http.max_body_bytes` has already been refused with 413. The Content-Type is not
    checked: device firmware often sends none. With `max_inflated`, a gzip or zstd body
    is inflated first (`read_body`; EncodingError).
    """
    raw = await read_body(max_inflated=max_inflated)
    if not raw:
        if required:
            raise BadJSON("body: expected a JSON object, got an empty body")
        return {}
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        raise BadJSON(f"body: expected a JSON object, got {json_kind(doc)}")
    return doc


class StrictJSONProvider(DefaultJSONProvider):
    """Quart's JSON provider, strict both ways: responses never hold NaN or Infinity
    (a ValueError, logged as a 500, instead of a body strict parsers refuse), and
    `request.get_json()` parses like `parse_json` (a BadJSON is Quart's 400)."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)

    def response(self, *args: Any, **kwargs: Any) -> Any:
        """flask's response (what `jsonify` and a returned dict make), the same bytes, its
        encoder made once per thread (`json_encoder`): `json.dumps` with options builds a
        JSONEncoder and its C encoder on every call, which costs more than encoding a small answer."""
        if self.compact is False or (self.compact is None and self._app.debug):
            return super().response(*args, **kwargs)
        encode = json_encoder(separators=(",", ":"), ensure_ascii=self.ensure_ascii, allow_nan=False,
                              sort_keys=self.sort_keys, default=self.default)
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(f"{encode(obj)}\n", mimetype=self.mimetype)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return parse_json(s) if not kwargs else super().loads(s, **kwargs)

