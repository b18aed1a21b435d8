"""The core routes' error shape: `{"error": {"status", "code", "message"}}`.

Plugins keep their family's own shape with error handlers on their Blueprint.
"""

from __future__ import annotations

from quart import Response, jsonify

__all__ = ["error_response"]

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
    507: "insufficient_storage",
}


def error_response(status: int, message: str, code: str | None = None, **headers: str) -> Response:
    """The core's error shape, e.g. `error_response(404, "no such device")`."""
    body = {"error": {"status": status, "code": code or _CODES.get(status, "error"), "message": message}}
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers)
    return response
