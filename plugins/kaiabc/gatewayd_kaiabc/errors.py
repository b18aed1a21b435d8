"""The specification's error object, on every error of this plugin:
`{"error": {"code", "message", "details", "timestamp", "request_id"}}`, `code` from the
spec's list (a 429 also carries the spec's `retry_after_seconds`), plus `status` (the
HTTP status, as every error of the gateway carries it)."""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec
from quart import has_request_context, jsonify, request
from quart.typing import ResponseReturnValue

CODES = ("INVALID_PARAMETER", "NODE_NOT_FOUND", "NODE_OFFLINE", "ODE_INSTABILITY", "FILTER_DIVERGENCE",
         "RATE_LIMIT_EXCEEDED", "AUTHENTICATION_FAILED", "PERMISSION_DENIED",
         # beyond the spec's list, for statuses it names without a code (README.md, "Errors")
         "CONFLICT", "NOT_FOUND", "METHOD_NOT_ALLOWED", "PAYLOAD_TOO_LARGE", "UNSUPPORTED_MEDIA_TYPE",
         "SERVICE_UNAVAILABLE", "INTERNAL_ERROR",
         "STORAGE_FULL")


class SpecErrorDetail(msgspec.Struct, omit_defaults=True):
    status: int  # beyond the spec's fields: the HTTP status, as in every gateway error
    code: str
    message: str
    timestamp: str
    request_id: str
    details: dict[str, Any] | None = None
    retry_after_seconds: int | None = None
    path: str | None = None  # the spec's "Detailed Error Response"
    method: str | None = None


class SpecError(msgspec.Struct):
    """The spec's Standard Error Response."""

    error: SpecErrorDetail


class Fail(Exception):
    """A request answered with the spec's error: `raise Fail(404, "NODE_NOT_FOUND", "...")`."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        assert code in CODES, code
        self.status, self.code, self.message = status, code, message
        self.details, self.headers, self.retry_after_s = details, headers or {}, retry_after_s


def iso(ts: float) -> str:
    """Epoch seconds as the spec writes times: `2025-10-06T12:00:00.123Z`."""
    whole = int(ts)
    ms = int(round((ts - whole) * 1000))
    if ms == 1000:
        whole, ms = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + (f".{ms:03d}Z" if ms else "Z")


def request_id() -> str:
    return "req_" + secrets.token_hex(6)


def answer(e: Fail, now: float) -> ResponseReturnValue:
    body = SpecError(SpecErrorDetail(e.status, e.code, e.message, iso(now), request_id(), e.details, e.retry_after_s,
                                     request.path if has_request_context() else None,
                                     request.method if has_request_context() else None))
    response = jsonify(msgspec.to_builtins(body))
    response.status_code = e.status
    response.headers.update(e.headers)
    response.headers["X-Request-Id"] = body.error.request_id
    return response


def invalid(parameter: str, message: str, provided: Any = None, **more: Any) -> Fail:
    """400 INVALID_PARAMETER naming the parameter (`details.parameter`)."""
    details: dict[str, Any] = {"parameter": parameter, **more}
    if provided is not None:
        details["provided"] = provided
    return Fail(400, "INVALID_PARAMETER", message, details)
