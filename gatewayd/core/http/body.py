"""Request bodies in, JSON out: strict both ways (see gatewayd.protocol.strict_json)."""

from __future__ import annotations

from typing import Any

from flask.json.provider import DefaultJSONProvider
from quart import request

from ...protocol.strict_json import BadJSON, json_kind, parse_json

__all__ = ["StrictJSONProvider", "read_json_object"]


async def read_json_object(*, required: bool = False) -> dict[str, Any]:
    """The current request's body as a JSON object, parsed strictly (`parse_json`).

    An empty body is `{}` unless `required`. Raises BadJSON (answer 400); a body over
    `http.max_body_bytes` has already been refused with 413. The Content-Type is not
    checked: device firmware often sends none.
    """
    raw = await request.get_data()
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

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return parse_json(s) if not kwargs else super().loads(s, **kwargs)
