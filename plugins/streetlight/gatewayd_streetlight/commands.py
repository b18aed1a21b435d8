"""Commands for lights, in the specification's shape (section 3), and how a light gets them.

Operators queue `{"command_type": "brightness_control", "brightness_level": 75}` through
the core's queue (the admin API, `gatewayd devices command`, the dashboard); `check`
(the `gatewayd_check_command` hook) refuses anything a light would not understand and
fills in the priority. A light gets a command by poll or by MQTT push in one shape
(`render`): the queue's id as `command_id`, its `priority`, `requested_at`.
"""

from __future__ import annotations

import json
from typing import Any

from gatewayd.plugins.api import Command

from .messages import CLOCK, iso

PRIORITIES = {"high": 2, "normal": 1, "low": 0}
# The spec's example: switching is what a user waits for; a schedule can wait.
DEFAULT_PRIORITY = {"power_control": "high", "brightness_control": "normal", "schedule_update": "low"}
SCHEDULE_KEYS = ("enabled", "sunrise_time", "sunset_time")


def check(payload: Any) -> dict[str, Any]:
    """An operator's command, checked and normalised; ValueError naming the field."""
    if not isinstance(payload, dict):
        raise ValueError(f"expected a JSON object such as {{\"command_type\": \"power_control\", \"action\": \"on\"}}, "
                         f"got {type(payload).__name__}")
    kind = payload.get("command_type")
    if not isinstance(kind, str) or kind not in DEFAULT_PRIORITY:  # a list or an object: no dict key
        raise ValueError(f"command_type: expected one of {', '.join(DEFAULT_PRIORITY)}, got {kind!r:.60}")
    out: dict[str, Any] = {"command_type": kind}
    if kind == "power_control":
        if payload.get("action") not in ("on", "off"):
            raise ValueError(f"action: expected 'on' or 'off' for a power_control command, "
                             f"got {payload.get('action')!r:.60}")
        out["action"] = payload["action"]
    elif kind == "brightness_control":
        level = payload.get("brightness_level")
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 100:
            raise ValueError(f"brightness_level: expected an integer 0-100 for a brightness_control command, "
                             f"got {level!r:.60}")
        out["brightness_level"] = level
    else:
        out["schedule"] = _schedule(payload.get("schedule"))
    priority = payload.get("priority", DEFAULT_PRIORITY[kind])
    if not isinstance(priority, str) or priority not in PRIORITIES:
        raise ValueError(f"priority: expected one of {', '.join(PRIORITIES)}, got {priority!r:.60}")
    out["priority"] = priority
    extra = sorted(set(payload) - set(out))
    if extra:
        raise ValueError(f"{extra[0]}: unknown field of a {kind} command (the gateway adds command_id and "
                         "requested_at)")
    return out


def _schedule(schedule: Any) -> dict[str, Any]:
    if not isinstance(schedule, dict) or not schedule:
        raise ValueError("schedule: required for a schedule_update command "
                         '(an object: {"enabled": true, "sunrise_time": "06:30:00", "sunset_time": "18:00:00"})')
    for key, value in schedule.items():
        if key not in SCHEDULE_KEYS:
            raise ValueError(f"schedule.{key}: unknown (expected {', '.join(SCHEDULE_KEYS)})")
        if key == "enabled" and not isinstance(value, bool):
            raise ValueError(f"schedule.enabled: expected true or false, got {value!r:.60}")
        if key != "enabled" and not (isinstance(value, str) and CLOCK.fullmatch(value)):
            raise ValueError(f"schedule.{key}: expected HH:MM:SS, got {value!r:.60}")
    return dict(schedule)


def priority_of(command: Command) -> str:
    payload = command.payload if isinstance(command.payload, dict) else {}
    priority = payload.get("priority")
    return priority if isinstance(priority, str) and priority in PRIORITIES else "normal"


def any_due(unacked: list[Command], now: float, redeliver_after_s: float) -> bool:
    """Whether a poll has something to hand out: a pending command, or one handed out and
    not acknowledged for `redeliver_after_s` (expired ones are the queue's to drop)."""
    return any((c.expires_at is None or c.expires_at > now)
               and (c.status == "pending" or (c.delivered_at or 0.0) <= now - redeliver_after_s) for c in unacked)


def ordered(commands: list[Command]) -> list[Command]:
    """High priority first, then oldest first."""
    return sorted(commands, key=lambda c: (-PRIORITIES[priority_of(c)], c.created_at))


def shape(command: Command) -> dict[str, Any]:
    """A command as a light gets it by poll (section 3)."""
    payload = command.payload if isinstance(command.payload, dict) else {}
    # The queue's id wins over one in the payload: a command stored while the plugin did not
    # check it (it was not running) must still be one the light can acknowledge.
    body = {k: v for k, v in payload.items() if k not in ("priority", "command_id", "requested_at")}
    return {"command_id": command.id, **body, "priority": priority_of(command), "requested_at": iso(command.created_at)}


def render(command: Command) -> bytes:
    """A command as it is pushed on `devices/<light_id>/commands` (section 4): the poll's
    shape, with the topic's `timestamp`."""
    doc = shape(command)
    return json.dumps({**doc, "timestamp": doc["requested_at"]}, separators=(",", ":")).encode()
