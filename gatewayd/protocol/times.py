"""Times as devices and operators write them: epoch seconds or ISO 8601. Pure."""

from __future__ import annotations

import math
from datetime import datetime, timezone

__all__ = ["TS_MAX", "TS_MIN", "parse_time", "plausible_ts"]

#: A reading stamped before 2000 or after 2200 is a device clock bug (or milliseconds
#: given for seconds): refused rather than stored where nobody will find it.
TS_MIN, TS_MAX = 946684800.0, 7258118400.0


def parse_time(text: str) -> float:
    """ISO 8601 (`2026-01-02T03:04:05Z`, a date, an offset; UTC unless it says otherwise)
    or epoch seconds -> epoch seconds. ValueError saying what was expected."""
    text = text.strip()
    if not _never_a_number(text):  # an ISO time skips float()'s ValueError, raised and caught
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
        moment = moment.replace(tzinfo=timezone.utc)  # a gateway speaks UTC unless told otherwise
    return moment.timestamp()


def _never_a_number(text: str) -> bool:
    """True for a text `float()` refuses for sure: a `:` (a time of day), or a `-` past
    the first character with no exponent before which it could stand (a date)."""
    if ":" in text:
        return True
    return "-" in text[1:] and "e" not in text and "E" not in text


def plausible_ts(ts: float) -> bool:
    """True for a time between 2000 and 2200 (epoch seconds)."""
    return TS_MIN <= ts <= TS_MAX
