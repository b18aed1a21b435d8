"""Semantic versions (semver 2.0.0): parse and order firmware versions.

Firmware versions in the wild are written `1.2.3`, `v2.1.0`, `1.4.0-beta.2` or
`1.4.0+build.7`; all parse. Ordering follows semver 2.0 section 11: major, minor and
patch numerically; a pre-release sorts before its release; pre-release identifiers
compare one by one (numeric ones numerically, below alphanumeric ones, which compare
in ASCII order), and a shorter list that is a prefix sorts first; build metadata is
ignored. So `1.0.0-alpha < 1.0.0-alpha.1 < 1.0.0-alpha.beta < 1.0.0-beta <
1.0.0-beta.2 < 1.0.0-beta.11 < 1.0.0-rc.1 < 1.0.0`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = ["Version", "parse_version", "is_newer"]

_SEMVER = re.compile(
    r"v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)


@functools.total_ordering
@dataclass(frozen=True)
class Version:
    """One parsed version; compare with <, ==, sorted()."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: str = ""

    def _key(self) -> tuple:
        # A release (no pre-release) sorts after every pre-release of the same triple.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, not self.prerelease, pre)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: Version) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + self.build
        return text


def parse_version(text: str) -> Version:
    """Parse `1.2.3`, `v1.2.3-rc.1+abc`; raise ValueError naming the bad text."""
    if not isinstance(text, str):
        raise ValueError(f"expected a version string like '1.2.3', got {text!r}")
    m = _SEMVER.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a semantic version (MAJOR.MINOR.PATCH[-pre][+build]): {text!r}")
    major, minor, patch, pre, build = m.groups()
    return Version(int(major), int(minor), int(patch), tuple(pre.split(".")) if pre else (), build or "")


def is_newer(candidate: str, current: str | None) -> bool:
    """True when `candidate` is a newer version than `current` (None/"" = nothing installed)."""
    if not current:
        return True
    return parse_version(candidate) > parse_version(current)
