"""Counters and gauges, rendered in the Prometheus text format at `/metrics`.

Built on prometheus_client. Components either own a Counter/Gauge, or register a
collector that reads their live stats at scrape time (a serial link's byte counts, a
queue's depth). Each `Metrics` has a `CollectorRegistry` of its own, never the
process-wide default one, so two gateways in one process (tests) share nothing.

The exposition is prometheus_client's (text format 0.0.4), families sorted by name and
the samples of an owned family by label values, as before; values are Go-style floats
(`1.0`, `1.7e+09`, `NaN`). Counters carry no `_created` series: see below.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from importlib.metadata import version
from typing import Any, NamedTuple

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, UnknownMetricFamily

__all__ = ["Metrics", "Counter", "Gauge", "Sample"]

# A `<name>_created` gauge for every counter and label set would double the series
# Prometheus stores for counters, on a Pi, for a timestamp nothing here reads (and the
# old exposition never had it). The switch is process-wide in prometheus_client; the
# gateway owns its process.
prometheus_client.disable_created_metrics()

#: The release (major.minor) whose counter child `Counter.inc` reaches into (its `_value`;
#: as `http.gate.untested` checks, which this module cannot import: http imports metrics).
TESTED = {"prometheus-client": "0.26"}
_REACH_IN = ".".join(version("prometheus-client").split(".")[:2]) == TESTED["prometheus-client"]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_KINDS: dict[str, type[Metric]] = {
    "counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "untyped": UnknownMetricFamily,
}


class Sample(NamedTuple):
    """One value of a family: `Sample("gatewayd_serial_bytes_total", {"link": "a"}, 42)`."""

    name: str
    labels: dict[str, str]
    value: float


def _check_name(name: str) -> None:
    # prometheus_client accepts UTF-8 names and escapes them at exposition; ours stay
    # the classic charset so the exposed name is the name asked for.
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}")


class _Family:
    _type: type[prometheus_client.Counter] | type[prometheus_client.Gauge]
    kind: str

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...], registry: CollectorRegistry):
        _check_name(name)
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._metric = self._type(name, help, self.labelnames, registry=registry)
        self._children: dict[tuple[tuple[str, object], ...], prometheus_client.Counter | prometheus_client.Gauge] = {}
        self.family_name = name.removesuffix("_total") if self.kind == "counter" else name

    def _child(self, labels: dict[str, str]) -> prometheus_client.Counter | prometheus_client.Gauge:
        # Counters are bumped per message: a dict hit here costs a third of `.labels()`
        # (which sorts the names and takes a lock on every call).
        key = tuple(labels.items())
        try:
            return self._children[key]
        except (KeyError, TypeError):  # TypeError: an unhashable value, str()-ed below
            pass
        try:
            child = self._metric.labels(**labels) if self.labelnames or labels else self._metric
        except ValueError:
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {tuple(labels)}") from None
        with contextlib.suppress(TypeError):
            self._children[key] = child
        return child

    def value(self, **labels: str) -> float:
        """The current value for `labels` (0 if never set); does not create the series."""
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {tuple(labels)}")
        want = {k: str(v) for k, v in labels.items()}
        for family in self._metric.collect():
            for s in family.samples:
                if s.name == self.name and s.labels == want:
                    return s.value
        return 0.0


class Counter(_Family):
    """A monotonically increasing count; name it `..._total`."""

    _type = prometheus_client.Counter
    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...], registry: CollectorRegistry):
        super().__init__(name, help, labelnames, registry)
        # Each label set's value, bumped straight (0.6 of the 1.4 us an inc cost was the
        # child's own checks: a child found here is one with all its labels, and no
        # exemplar is ever given). Filled by `inc` under the tested prometheus_client only.
        self._values: dict[tuple[tuple[str, object], ...], Any] = {}

    def inc(self, amount: float = 1, **labels: str) -> None:
        """Add `amount` (>= 0: a negative amount raises ValueError)."""
        try:
            value = self._values[tuple(labels.items())]
        except (KeyError, TypeError):
            child = self._child(labels)
            child.inc(amount)  # prometheus_client's checks, the first time
            if _REACH_IN:
                with contextlib.suppress(TypeError):
                    self._values[tuple(labels.items())] = child._value
            return
        if amount < 0:  # prometheus_client's refusal, in its words
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        value.inc(amount)


class Gauge(_Family):
    """A value that goes up and down."""

    _type = prometheus_client.Gauge
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self._child(labels).set(value)

    def inc(self, amount: float = 1, **labels: str) -> None:
        self._child(labels).inc(amount)


class _LiveFamily:
    """A family whose samples a component reads at scrape time (a custom collector)."""

    def __init__(self, name: str, kind: str, help: str, collect: Callable[[], Iterable[Sample]]):
        _check_name(name)
        if kind not in _KINDS:
            raise ValueError(f"{name}: kind must be one of {sorted(_KINDS)}, not {kind!r}")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"{name}: a counter's name ends in _total")
        self.name, self._kind, self._help, self._collect = name, kind, help, collect

    def _family(self) -> Metric:
        return _KINDS[self._kind](self.name, self._help)  # a counter family drops "_total"

    def describe(self) -> list[Metric]:
        """The names this collector exposes: a duplicate name fails at registration."""
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        for s in self._collect():
            family.add_sample(s.name, {k: str(v) for k, v in s.labels.items()}, s.value)
        return [family]


class Metrics:
    """The gateway's metric registry (one per Gateway, so tests don't share state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._families: dict[str, _Family] = {}
        self._owned: set[str] = set()  # prometheus_client's family names of the above

    def _get(self, cls: type[_Family], name: str, help: str, labels: Iterable[str]) -> _Family:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = cls(name, help, tuple(labels), self.registry)
            self._owned.add(family.family_name)
        elif not isinstance(family, cls) or family.labelnames != tuple(labels):
            raise ValueError(f"metric {name!r} already registered with another type or labels")
        return family

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        """Get or create a counter; the same name returns the same counter.

        It is exposed as `<name>` if `name` ends in `_total`, else as `<name>_total`
        (Prometheus' naming rule for counters, applied by prometheus_client).
        """
        name = name if name.endswith("_total") else name + "_total"
        return self._get(Counter, name, help, labels)  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Gauge:
        """Get or create a gauge."""
        return self._get(Gauge, name, help, labels)  # type: ignore[return-value]

    def collector(self, name: str, kind: str, help: str, collect: Callable[[], Iterable[Sample]]) -> None:
        """Register a family whose samples are read at scrape time.

        `kind` is "counter" (then `name` ends in `_total`), "gauge" or "untyped";
        `collect()` returns the family's `Sample`s. A name already registered raises
        ValueError.
        """
        self.registry.register(_LiveFamily(name, kind, help, collect))

    def collect(self) -> list[Metric]:
        """Every family, sorted by exposed name (what `render` writes)."""
        families = sorted(self.registry.collect(), key=_exposed_name)
        for family in families:
            if family.name in self._owned:
                # prometheus_client keeps label sets in first-use order; sorting them keeps
                # the page stable from one scrape (and one run) to the next.
                family.samples.sort(key=lambda s: tuple(s.labels.values()))
        return families

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        return generate_latest(self).decode("utf-8")


def _exposed_name(family: Metric) -> str:
    return family.name + "_total" if family.type == "counter" else family.name
