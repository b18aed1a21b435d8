"""The family's error shape: the specification's backend is FastAPI, whose errors devices
and apps read as `{"detail": "<message>"}` with the status code (README.md, "Errors")."""

from __future__ import annotations

from typing import Any

from gatewayd.plugins.api import Struct


class Detail(Struct):
    """`{"detail": "Device not found"}`: every refusal of the plugin's routes."""

    detail: str


class Refused(Exception):
    """A request answered with an error: `raise Refused(404, "Device not found")`."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def detail(message: str) -> dict[str, Any]:
    """The body of an error: `{"detail": message}`."""
    return {"detail": message}
