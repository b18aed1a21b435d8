"""MicroPython's `ujson` on CPython."""

from json import dumps, loads  # noqa: F401
