"""Structured logging: key=value (default) or JSON lines on stderr."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(getattr(record, "fields", {}) or {})
    # Records from libraries (hypercorn, paho) carry no fields; keep their extras too.
    for key, value in record.__dict__.items():
        if key not in _RESERVED and key != "fields":
            fields.setdefault(key, value)
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=info logger=gatewayd.runtime msg="..." key=value ...`"""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={_timestamp(record)}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
        ]
        # Access lines are already key=value (see core/http.py); don't quote them.
        message = record.getMessage()
        parts.append(message if record.name == "gatewayd.access" else f"msg={_quote(message)}")
        parts += [f"{k}={_quote(v)}" for k, v in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in _fields(record).items() if k not in doc})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str = "info", fmt: str = "kv", stream=None) -> None:
    """Configure the root logger once for the whole process."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class StructLogger:
    """A thin wrapper so call sites read `log.info("plugin failed", plugin=name, reason=r)`."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def _log(self, level: int, msg: str, exc_info: Any, fields: dict[str, Any]) -> None:
        if self.logger.isEnabledFor(level):
            self.logger.log(level, msg, exc_info=exc_info, extra={"fields": fields}, stacklevel=3)

    def debug(self, msg: str, **fields: Any) -> None:
        self._log(logging.DEBUG, msg, None, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._log(logging.INFO, msg, None, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._log(logging.WARNING, msg, None, fields)

    def error(self, msg: str, **fields: Any) -> None:
        self._log(logging.ERROR, msg, None, fields)

    def exception(self, msg: str, **fields: Any) -> None:
        self._log(logging.ERROR, msg, True, fields)


def get_logger(name: str) -> StructLogger:
    """Return a structured logger; core modules use `gatewayd.<module>`."""
    return StructLogger(name)


class QuietLog:
    """One line per `period_s` for a kind of event, with how many were not logged: one
    misbehaving client must not fill the log."""

    def __init__(self, logger: logging.Logger, period_s: float = 10.0) -> None:
        self.log = logger
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._skipped: Counter[str] = Counter()

    def __call__(self, key: str, level: int, text: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.period_s:
            self._skipped[key] += 1
            return
        skipped = self._skipped.pop(key, 0)
        self.log.log(level, text + (f" ({skipped} more like it since)" if skipped else ""), *args,
                     exc_info=exc_info)
        self._last[key] = now
        if len(self._last) > 1000:
            self._last.clear()
