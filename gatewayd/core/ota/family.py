"""`ctx.ota`: the firmware store bound to one family: its images, its devices' reports."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..http.errors import error_response
from .http import firmware_response
from .store import Firmware, OtaStore

__all__ = ["FamilyOta"]


class FamilyOta:
    """What a plugin may do with the firmware store: read its family's images, hand
    them to devices, and record what its devices report. Adding images, rollouts and
    signing keys are the operator's (`gatewayd firmware ...`)."""

    def __init__(self, store: OtaStore, family: str) -> None:
        self._store = store
        self.family = family

    async def list(self, model: str | None = None) -> list[Firmware]:
        """The family's images (of one `model`), newest first."""
        images = await self._store.list(self.family)
        return [f for f in images if model is None or f.model == model]

    async def get(self, firmware_id: int) -> Firmware | None:
        """One of the family's images; None for an id that is another family's or none."""
        fw = await self._store.get(firmware_id)
        return fw if fw is not None and fw.family == self.family else None

    async def newest_for(self, model: str, current_version: str | None, channel: str = "stable",
                         device_id: str | None = None) -> Firmware | None:
        """The newest image this device should install, or None if it is up to date.

        Newer than `current_version` (semver; None: the newest), on a channel the
        device sees (`CHANNELS`; beta devices also get stable releases), and in its
        rollout (a stable hash of `device_id`). ValueError for a bad version or channel.
        """
        return await self._store.newest_for(self.family, model, current_version, channel, device_id)

    async def report(self, device_id: str, status: str, *, version: str | None = None, detail: str = "",
                     ts: float | None = None) -> None:
        """Record a device's progress (`REPORT_STATUSES`), also as an event its rules see."""
        await self._store.report(self.family, device_id, status, version=version, detail=detail, ts=ts)

    async def response(self, firmware: Firmware | int) -> Any:
        """Serve the image for the current request (Range, ETag, 304/206/416), from the
        family's own route; a 404 in the core shape for an image that is not the family's."""
        fw = firmware if isinstance(firmware, Firmware) else await self.get(firmware)
        if fw is None or fw.family != self.family:
            return error_response(404, f"no firmware with id {getattr(firmware, 'id', firmware)}")
        return await firmware_response(fw)

    def url(self, path: str) -> str:
        """The URL a device downloads `path` from: `http.public_url` + path, never built
        from the request's Host header."""
        return self._store.url(path)

    def manifest(self, firmwares: Iterable[Firmware], path: Callable[[Firmware], str]) -> list[dict[str, Any]]:
        """`[{model, version, url, sha256, size, signature}]`, each URL `url(path(image))`."""
        return self._store.manifest(firmwares, path)
