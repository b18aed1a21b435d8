"""`gateway.profile`: defaults for a kind of box, under the keys a config sets itself.

`"default"` is tuned for throughput on a box with memory to spare. `"small"` is for a
512 MB board (a Raspberry Pi Zero 2 / 3): Python's own garbage-collector thresholds
instead of the daemon's relaxed ones (`runtime.tune_gc`: fewer collections, more memory
held between them), smaller upstream batches, fewer reader threads and smaller live
buffers. Any key the configuration sets itself wins over its profile's default. The garbage
collector is set by `runtime.tune_gc_for(profile)` at `gatewayd run`.
Figures: bench/ingest_bench.py's profiles section (peak RSS of a 1,000,000-record drain).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROFILES", "apply_profile"]

#: What each profile changes: section -> key -> default. "upstream" applies to every
#: [[upstream]] table.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "small": {
        "storage": {"readers": 2, "group_commit_max": 200},
        "upstream": {"max_records": 1000, "max_bytes": 256 * 1024},
        "live": {"ring_size": 200, "queue_size": 64, "max_subscribers": 50},
    },
}


def apply_profile(raw: dict[str, Any]) -> None:
    """Fill the chosen profile's defaults into the raw TOML where the file set nothing.

    An unknown profile or a section of the wrong type is left for the schema to refuse
    (naming the key)."""
    gateway = raw.get("gateway")
    name = gateway.get("profile", "default") if isinstance(gateway, dict) else "default"
    for section, defaults in PROFILES.get(name, {}).items() if isinstance(name, str) else ():
        if section == "upstream":
            tables = raw.get("upstream")
            for table in tables if isinstance(tables, list) else ():
                if isinstance(table, dict):
                    for key, value in defaults.items():
                        table.setdefault(key, value)
            continue
        table = raw.setdefault(section, {})
        if isinstance(table, dict):
            for key, value in defaults.items():
                table.setdefault(key, value)
