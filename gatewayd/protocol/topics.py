"""MQTT topic names, topic filters and the topic router: pure functions, no I/O.

The rules are those of MQTT 3.1.1 section 4.7 and MQTT 5.0 section 4.7 (identical for
what is implemented here):

- Levels are separated by ``/``; empty levels are legal (``a//b``, ``/a``).
- ``+`` matches exactly one level (possibly empty) and must occupy a whole level.
- ``#`` matches the parent level and any number of children (``a/#`` matches ``a``,
  ``a/`` and ``a/b/c``); it must be the last character and occupy a whole level.
- A filter starting with a wildcard does not match a topic starting with ``$``
  (``#`` and ``+/x`` do not see ``$SYS/x``); ``$SYS/#`` does.
- Names and filters are 1..65535 UTF-8 bytes and contain no U+0000.
- Topic names (what is published) contain no wildcard.

Shared subscriptions (``$share/group/filter``) are not interpreted: the gateway does not
use them, and as a plain filter ``$share/...`` simply matches nothing devices publish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, TypeVar

__all__ = [
    "TopicError",
    "validate_filter",
    "validate_topic",
    "matches",
    "Subscription",
    "TopicRouter",
]

_MAX_LEN = 65535


class TopicError(ValueError):
    """A topic name or topic filter that MQTT does not allow."""


def _check_common(kind: str, text: str) -> None:
    if not isinstance(text, str):
        raise TopicError(f"{kind} must be a str, not {type(text).__name__}")
    if not text:
        raise TopicError(f"{kind} must not be empty")
    if "\x00" in text:
        raise TopicError(f"{kind} must not contain U+0000: {text!r}")
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise TopicError(f"{kind} is not valid UTF-8: {text!r}") from exc
    if len(encoded) > _MAX_LEN:
        raise TopicError(f"{kind} is longer than {_MAX_LEN} UTF-8 bytes")


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid topic name to publish on, else raise TopicError."""
    _check_common("topic", topic)
    if "+" in topic or "#" in topic:
        raise TopicError(f"topic must not contain wildcards: {topic!r}")
    return topic


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid subscription filter, else raise TopicError."""
    _check_common("filter", topic_filter)
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise TopicError(f"'#' must be a whole level and the last one: {topic_filter!r}")
        if "+" in level and level != "+":
            raise TopicError(f"'+' must be a whole level: {topic_filter!r}")
    return topic_filter


def _matches_levels(flevels: list[str] | tuple[str, ...], tlevels: list[str]) -> bool:
    # A filter beginning with a wildcard never sees '$' topics ([MQTT-4.7.2-1]).
    if tlevels[0].startswith("$") and flevels[0] in ("+", "#"):
        return False
    n = len(tlevels)
    for i, f in enumerate(flevels):
        if f == "#":
            return True  # matches the parent (i == n) and every child
        if i >= n:
            return False
        if f != "+" and f != tlevels[i]:
            return False
    return len(flevels) == n


def matches(topic_filter: str, topic: str) -> bool:
    """True if the topic name ``topic`` matches the subscription filter ``topic_filter``.

    Both are assumed valid (see :func:`validate_filter` / :func:`validate_topic`);
    the router validates on the way in so the hot path does not.
    """
    return _matches_levels(topic_filter.split("/"), topic.split("/"))


H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True, eq=False)
class Subscription(Generic[H]):
    """One registration in a :class:`TopicRouter`.

    ``owner`` names who registered it (a plugin name, "core"), so a plugin's
    subscriptions can be removed together and shown in /health.
    """

    filter: str
    qos: int
    handler: H
    owner: Hashable
    _levels: tuple[str, ...]


class TopicRouter(Generic[H]):
    """Holds (filter, qos, handler, owner) subscriptions; finds the handlers for a topic.

    The router is pure bookkeeping: the MQTT client asks it which filters to subscribe
    (:meth:`filters`) and, per inbound message, which handlers to call
    (:meth:`handlers_for`). Registration order is call order.
    """

    #: Topics whose handlers are remembered (devices publish to few topics each, over
    #: and over); past this many, the memory starts again.
    CACHE_SIZE = 10_000
    #: Longer topic names are matched each time, not remembered: the cache's memory stays
    #: under CACHE_SIZE * CACHE_TOPIC_MAX characters whatever senders make up.
    CACHE_TOPIC_MAX = 256

    def __init__(self) -> None:
        self._subs: list[Subscription[H]] = []
        self._cache: dict[str, list[H]] = {}

    def add(self, topic_filter: str, handler: H, *, qos: int = 1, owner: Hashable = None) -> Subscription[H]:
        """Register ``handler`` for topics matching ``topic_filter``; raises TopicError."""
        validate_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        sub = Subscription(topic_filter, qos, handler, owner, tuple(topic_filter.split("/")))
        self._subs.append(sub)
        self._cache.clear()
        return sub

    def remove(self, subscription: Subscription[H]) -> None:
        """Remove one registration (no error if it is already gone)."""
        self._subs = [s for s in self._subs if s is not subscription]
        self._cache.clear()

    def remove_owner(self, owner: Hashable) -> list[Subscription[H]]:
        """Remove every registration of ``owner``; returns what was removed."""
        gone = [s for s in self._subs if s.owner == owner]
        self._subs = [s for s in self._subs if s.owner != owner]
        self._cache.clear()
        return gone

    def subscriptions(self) -> list[Subscription[H]]:
        """Every registration, in registration order."""
        return list(self._subs)

    def filters(self) -> dict[str, int]:
        """Distinct filters to subscribe at the broker, each with the highest QoS asked."""
        out: dict[str, int] = {}
        for s in self._subs:
            out[s.filter] = max(s.qos, out.get(s.filter, 0))
        return out

    def handlers_for(self, topic: str) -> list[H]:
        """The handlers whose filter matches ``topic`` (each handler at most once).

        The list is shared with later calls for the same topic: do not modify it.
        """
        found = self._cache.get(topic)
        if found is not None:
            return found
        tlevels = topic.split("/")
        found = []
        for s in self._subs:
            if _matches_levels(s._levels, tlevels) and s.handler not in found:
                found.append(s.handler)
        if len(topic) <= self.CACHE_TOPIC_MAX:
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            self._cache[topic] = found
        return found

    def __len__(self) -> int:
        return len(self._subs)
