"""gatewayd.protocol.times.parse_time: the ISO form is tried first only where float() must
refuse the text, so every answer (value or error) is what float()-first gave."""

from __future__ import annotations

import math
import random
from datetime import datetime, timezone

import pytest

from gatewayd.protocol.times import parse_time


def float_first(text: str) -> float:
    """parse_time as it was: float() tried on every text, then ISO 8601."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
        raise ValueError(f"not a time: {text!r}")
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected an ISO 8601 time (2026-01-02T03:04:05Z) or epoch seconds, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def outcome(parse, text: str) -> tuple[str, object]:
    try:
        return "value", parse(text)
    except ValueError as e:
        return "error", str(e)


TEXTS = [
    "2026-01-02T03:04:05Z", "2026-01-02T03:04:05.250+01:00", "2026-01-02", " 2026-01-02T03:04:05z ",
    "20260102T030405", "2026-01-02 03:04:05", "1767323045", "1767323045.5", " 1767323045 ", "-1", "+5",
    "1e9", "1E-5", "1e-5", "-1e-5", "1_000", "inf", "-inf", "INFINITY", "Infinity", "nan", "-nan", "NaN",
    "", "-", "e", "1-2", "2026-13-02", "03:04", "12:00:00", "T", "1e5-", "-2026-01-02", "١٢٣", "0x10",
]


@pytest.mark.parametrize("text", TEXTS)
def test_the_same_answer_as_float_first(text):
    assert outcome(parse_time, text) == outcome(float_first, text)


def test_the_same_answer_for_random_texts_of_time_and_number_characters():
    rng = random.Random(6)
    alphabet = "0123456789-+:.eETZz _"
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert outcome(parse_time, text) == outcome(float_first, text), text


def test_iso_and_epoch_values():
    assert parse_time("2026-01-02T03:04:05Z") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp()
    assert parse_time("1767323045.5") == 1767323045.5
    with pytest.raises(ValueError, match="not a time"):
        parse_time("inf")
