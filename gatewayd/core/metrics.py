"""Counters and gauges, rendered in the Prometheus text format at `/metrics`.

Deliberately tiny: components either own a Counter/Gauge, or register a collector that
reads their live stats at scrape time (a serial link's byte counts, a queue's depth).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

__all__ = ["Metrics", "Counter", "Gauge", "Sample"]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class Sample(NamedTuple):
    """One value of a family: `Sample("gatewayd_serial_bytes_total", {"link": "a"}, 42)`."""

    name: str
    labels: dict[str, str]
    value: float


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(
        f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34)).replace(chr(10), "")}"'
        for k, v in sorted(labels.items())
    )
    return "{" + body + "}"


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Family:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...]):
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterable[Sample]:
        if not self.labelnames and not self._values:
            yield Sample(self.name, {}, 0.0)
        for key, value in sorted(self._values.items()):
            yield Sample(self.name, dict(zip(self.labelnames, key)), value)


class Counter(_Family):
    """A monotonically increasing count; name it `..._total`."""

    kind = "counter"

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Family):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = value

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Metrics:
    """The gateway's metric registry (one per Gateway, so tests don't share state)."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        self._collectors: list[tuple[str, str, str, Callable[[], Iterable[Sample]]]] = []

    def _get(self, cls: type, name: str, help: str, labels: Iterable[str]) -> _Family:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = cls(name, help, tuple(labels))
        elif not isinstance(family, cls) or family.labelnames != tuple(labels):
            raise ValueError(f"metric {name!r} already registered with another type or labels")
        return family

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        """Get or create a counter; the same name returns the same counter."""
        return self._get(Counter, name, help, labels)

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Gauge:
        """Get or create a gauge."""
        return self._get(Gauge, name, help, labels)

    def collector(self, name: str, kind: str, help: str, collect: Callable[[], Iterable[Sample]]) -> None:
        """Register a family whose samples are read at scrape time."""
        self._collectors.append((name, kind, help, collect))

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        families = [(f.name, f.kind, f.help, f.samples) for f in self._families.values()]
        for name, kind, help, samples in sorted(families + self._collectors, key=lambda f: f[0]):
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            for s in samples():
                lines.append(f"{s.name}{_labels(s.labels)} {_number(s.value)}")
        return "\n".join(lines) + "\n"
