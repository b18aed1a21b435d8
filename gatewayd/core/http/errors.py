"""The core routes' error shape: `{"error": {"status", "code", "message"}}`.

Plugins keep their family's own shape with error handlers on their Blueprint.
"""

from __future__ import annotations

from quart import Response, jsonify
from werkzeug.exceptions import ServiceUnavailable

__all__ = ["PluginUnavailable", "error_response"]

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


class PluginUnavailable(ServiceUnavailable):
    """A failed plugin's route was asked for: 503. The core answers it in its shape; a family
    whose Blueprint handles this exception (or HTTPException, or Exception) answers in its own,
    as with the body refusals. That handler is registered with the Blueprint, before the plugin
    could fail, and must not lean on what the failed startup was to build."""

    def __init__(self, plugin: str, reason: str) -> None:
        super().__init__(f"plugin unavailable: {reason}")
        self.plugin, self.reason = plugin, reason
