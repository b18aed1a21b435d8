"""The version gate of the core's patches of framework internals (hypercorn, h11, quart-trio).

Each patch (`one_write`, `keepalive`, `handoff`, `lean`, `gatewayd.core.live.frames`) was
read against the releases pinned in constraints.txt and names them in its `TESTED`; under
any other release it leaves the framework as it is and logs why (`untested`).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version

__all__ = ["release", "untested"]


def release(name: str) -> str:
    """The installed release of distribution `name` as major.minor ("none" if not installed)."""
    try:
        return ".".join(version(name).split(".")[:2])
    except PackageNotFoundError:
        return "none"


def untested(tested: Mapping[str, str]) -> str:
    """The releases found that differ from `tested` ({name: major.minor}), e.g.
    "hypercorn 0.19 (tested: 0.18)"; "" when every one is the tested release."""
    found = {name: release(name) for name in tested}
    return ", ".join(f"{name} {found[name]} (tested: {tested[name]})" for name in tested if found[name] != tested[name])
