"""A node's configuration profile (`GET /api/iot/v1/config`) and its ETag. Pure.

The profile named after the device's model (or a device's `profile` override, else
`default`), the device's own overrides merged over it, the endpoints as the node must
call them (from the gateway's public URL), the signature rules, and the backpressure
factor applied to the sampling rates.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .config import EdgesentinelConfig, Profile

API = "/api/iot/v1"
ENDPOINTS = {"handshake": "/auth/handshake", "telemetry": "/telemetry/batch", "config": "/config",
             "ota_check": "/ota/check", "ota_report": "/ota/report"}
SIGNATURE_HEADER, TIMESTAMP_HEADER, NONCE_HEADER = "X-Signature", "X-Timestamp", "X-Nonce"


def profile_name(config: EdgesentinelConfig, device_id: str, model: str) -> str:
    settings = config.devices.get(device_id)
    if settings is not None and settings.profile:
        return settings.profile
    return model if model in config.profiles else "default"


def signature_required(config: EdgesentinelConfig, device_id: str) -> bool:
    settings = config.devices.get(device_id)
    return (settings.signature if settings is not None and settings.signature else config.signature) == "required"


def effective(config: EdgesentinelConfig, device_id: str, model: str, base_url: str, factor: float = 1.0,
              reason: str = "") -> dict[str, Any]:
    """The document a node gets: its profile with its overrides, endpoints, signing rules."""
    name = profile_name(config, device_id, model)
    profile = config.profiles.get(name) or Profile()
    settings = config.devices.get(device_id)
    rates = dict(profile.sampling_hz)
    thresholds = dict(profile.thresholds)
    window_s, upload_s = profile.window_s, profile.upload_interval_s
    if settings is not None:
        rates.update(settings.sampling_hz)
        thresholds.update(settings.thresholds)
        window_s = settings.window_s if settings.window_s is not None else window_s
        upload_s = settings.upload_interval_s if settings.upload_interval_s is not None else upload_s
    return {
        "device_id": device_id,
        "profile": name,
        "sampling_hz": {sensor: round(hz * factor, 6) for sensor, hz in sorted(rates.items())},
        "window_s": window_s,
        "upload_interval_s": upload_s,
        "batch_max_records": min(profile.batch_max_records, config.max_records),
        "thresholds": dict(sorted(thresholds.items())),
        "ntp_servers": list(profile.ntp_servers),
        "endpoints": {"base": base_url, **{name: f"{base_url}{API}{path}" for name, path in ENDPOINTS.items()}},
        "signature": {"required": signature_required(config, device_id), "header": SIGNATURE_HEADER,
                      "timestamp_header": TIMESTAMP_HEADER, "nonce_header": NONCE_HEADER,
                      "max_skew_s": config.max_skew_s},
        "backpressure": {"degraded": factor < 1.0, "sampling_factor": factor,
                         **({"reason": reason} if factor < 1.0 and reason else {})},
    }


def etag(doc: dict[str, Any]) -> str:
    """A strong ETag of the document: the same profile, the same tag (quoted)."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def matches(if_none_match: str | None, tag: str) -> bool:
    """`If-None-Match` holds this tag (or `*`); weak tags compare as strong ones (RFC 9110, GET)."""
    if not if_none_match:
        return False
    candidates = [c.strip().removeprefix("W/") for c in if_none_match.split(",")]
    return "*" in candidates or tag in candidates
