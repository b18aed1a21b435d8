"""Topic names, filters and the router, against the MQTT rules (3.1.1 and 5.0 section 4.7).

The reference matcher below is written independently of gatewayd.protocol.topics: it turns a
filter into a regular expression, the way the spec's prose reads.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.protocol.topics import TopicError, TopicRouter, matches, validate_filter, validate_topic

# --- the independent reference ---------------------------------------------------------


def ref_valid_filter(f: str) -> bool:
    if not f or "\x00" in f or len(f.encode("utf-8", "surrogatepass")) > 65535:
        return False
    levels = f.split("/")
    for i, lv in enumerate(levels):
        if lv == "#":
            if i != len(levels) - 1:
                return False
        elif lv == "+":
            pass
        elif "+" in lv or "#" in lv:
            return False
    return True


def ref_regex(f: str) -> re.Pattern[str]:
    levels = f.split("/")
    tail = ""
    if levels[-1] == "#":
        levels = levels[:-1]
        # '#' also matches the parent level, so the separator before it is optional
        tail = "(?:/.*)?" if levels else ".*"
    body = "/".join("[^/]*" if lv == "+" else re.escape(lv) for lv in levels)
    guard = r"(?!\$)" if f[0] in "+#" else ""
    return re.compile(guard + body + tail, re.DOTALL)


def ref_matches(f: str, t: str) -> bool:
    return ref_regex(f).fullmatch(t) is not None


# --- strategies: a small alphabet so filters and topics collide often ------------------

plain_level = st.sampled_from(["", "a", "b", "ab", "$SYS", "$x", "sport", "é", "a b"])
topics = st.lists(plain_level, min_size=1, max_size=5).map("/".join).filter(bool)
filter_level = st.one_of(plain_level, st.just("+"))


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(filter_level, min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "+"


@st.composite
def topic_and_derived_filter(draw: st.DrawFn) -> tuple[str, str]:
    """A topic and a filter built from it by wildcarding levels: it must match."""
    t = draw(topics)
    levels = t.split("/")
    out = [("+" if draw(st.booleans()) else lv) for lv in levels]
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(out)))
        out = out[:cut] + ["#"]
    return t, "/".join(out)


# --- properties -------------------------------------------------------------------------


@given(filters(), topics)
@settings(max_examples=800)
def test_matches_agrees_with_reference(f: str, t: str) -> None:
    assert validate_filter(f) == f
    assert validate_topic(t) == t
    assert matches(f, t) == ref_matches(f, t)


@given(topic_and_derived_filter())
@settings(max_examples=400)
def test_derived_filter_matches_unless_dollar_rule(pair: tuple[str, str]) -> None:
    t, f = pair
    blocked = t.startswith("$") and f[0] in "+#"
    assert matches(f, t) is (not blocked)


@given(st.text(alphabet="ab/+#$\x00", max_size=12))
@settings(max_examples=800)
def test_validate_filter_agrees_with_reference(f: str) -> None:
    if ref_valid_filter(f):
        assert validate_filter(f) == f
    else:
        with pytest.raises(TopicError):
            validate_filter(f)


@given(st.text(alphabet="ab/+#$\x00", max_size=12))
def test_validate_topic(t: str) -> None:
    ok = bool(t) and not set(t) & set("+#\x00")
    if ok:
        assert validate_topic(t) == t
    else:
        with pytest.raises(TopicError):
            validate_topic(t)


def test_length_limit_is_in_utf8_bytes() -> None:
    validate_topic("a" * 65535)
    with pytest.raises(TopicError):
        validate_topic("a" * 65536)
    with pytest.raises(TopicError):
        validate_filter("é" * 32768)  # 65536 bytes


# --- the spec's own examples (MQTT 3.1.1 4.7.1, 4.7.2) ----------------------------------

SPEC_MATCH = [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("#", "$SYS/monitor/Clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("#", "sport/tennis", True),
    ("ACCOUNTS", "Accounts", False),  # case-sensitive
    ("sport/tennis", "sport/tennis/", False),
]


@pytest.mark.parametrize(("f", "t", "expected"), SPEC_MATCH)
def test_spec_examples(f: str, t: str, expected: bool) -> None:
    assert matches(f, t) is expected
    assert ref_matches(f, t) is expected  # the reference agrees with the spec too


@pytest.mark.parametrize("f", ["#", "sport/tennis/#", "+", "+/tennis/#", "sport/+/player1", "/", "//", "+/+"])
def test_spec_valid_filters(f: str) -> None:
    assert validate_filter(f) == f


@pytest.mark.parametrize("f", ["sport/tennis#", "sport/tennis/#/ranking", "sport+", "", "a/#/", "##", "a/b+"])
def test_spec_invalid_filters(f: str) -> None:
    with pytest.raises(TopicError):
        validate_filter(f)


# --- the router ---------------------------------------------------------------------------


@given(st.lists(filters(), min_size=0, max_size=8), topics)
@settings(max_examples=500)
def test_router_returns_matching_handlers_in_order(fs: list[str], t: str) -> None:
    router: TopicRouter = TopicRouter()
    handlers = [(lambda i=i: i) for i in range(len(fs))]
    for f, h in zip(fs, handlers):
        router.add(f, h, owner="p")
    expected = [h for f, h in zip(fs, handlers) if ref_matches(f, t)]
    assert router.handlers_for(t) == expected


def test_router_dedups_handler_and_merges_qos() -> None:
    router: TopicRouter = TopicRouter()

    async def h(msg: object) -> None: ...

    router.add("paku/+/data", h, qos=0, owner="paku")
    router.add("paku/#", h, qos=1, owner="paku")
    router.add("paku/+/data", h, qos=1, owner="other")
    assert router.handlers_for("paku/d1/data") == [h]
    assert router.filters() == {"paku/+/data": 1, "paku/#": 1}
    gone = router.remove_owner("paku")
    assert [s.filter for s in gone] == ["paku/+/data", "paku/#"]
    assert router.filters() == {"paku/+/data": 1}
    router.remove(router.subscriptions()[0])
    assert len(router) == 0 and router.handlers_for("paku/d1/data") == []


def test_router_rejects_bad_input() -> None:
    router: TopicRouter = TopicRouter()
    with pytest.raises(TopicError):
        router.add("a/#/b", print)
    with pytest.raises(ValueError):
        router.add("a", print, qos=3)
