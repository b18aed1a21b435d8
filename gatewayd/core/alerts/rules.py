"""Alert rules: what an operator (or a plugin) writes, checked and compiled.

A rule is a `[[rules]]` table in gatewayd.toml, or a dict a plugin returns from
`gatewayd_alert_rules(ctx)`; both are checked by the same dataclasses, so a mistake
gets the same precise message naming the key (`rules[2].when[0]: ...`). The engine that
evaluates them over events is `gatewayd.core.alerts.engine` (pure, time passed in).

Matchers (all optional, all must hold): `family`, `type`, `device` (shell globs),
`severity` / `min_severity`, `when` (field thresholds such as `"battery < 10"` or
`"voltage < 80% of rated_voltage"`), `min_duration_s` (+ `resolved_by`), `more_than`
events `within_s`, `outside_hours` / `inside_hours` (+ `utc_offset`), `absent_for_s`.
Actions: webhook, email, slack, teams, mqtt, upstream, log, suppress. See docs/events.md.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..schema import ConfigError, ConfigErrors, load_section
from .channels import EMAIL, redact_url

__all__ = [
    "SEVERITIES",
    "Action",
    "Escalation",
    "Condition",
    "Rule",
    "parse_condition",
    "load_rules",
    "rule_from_dict",
    "merge_rules",
]

SEVERITIES = ("info", "warning", "critical")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")


@dataclass
class Action:
    """What a rule does when it fires. `kind` picks which keys apply."""

    kind: Literal["webhook", "email", "slack", "teams", "mqtt", "upstream", "log", "suppress"]
    url: str = ""
    """webhook, slack, teams: where the JSON is POSTed."""
    secret_env: str = ""
    """webhook: env var holding the HMAC-SHA256 key; the body's signature goes in X-Gatewayd-Signature."""
    topic: str = ""
    """mqtt: topic; `{family}`, `{device}`, `{rule}`, `{type}` are filled in."""
    qos: int = 1
    level: Literal["info", "warning", "error"] = "warning"
    """log: the log level of the line."""
    to: list[str] = field(default_factory=list)
    """Recipients (team names, addresses) passed along in the payload for the far end to route;
    email: the addresses the mail goes to (through `[notifications.smtp]`)."""
    rules: list[str] = field(default_factory=list)
    """suppress: names of the rules muted for the device ([] = every other rule)."""
    for_s: float = 3600.0
    """suppress: how long at most; the mute ends earlier when the trigger resolves."""

    def validate(self) -> None:
        if self.kind in ("webhook", "slack", "teams") and not re.match(r"https?://[^\s/]+", self.url):
            what = "a webhook" if self.kind == "webhook" else f"a {self.kind} action"
            raise ConfigError("url", f"{what} needs an http(s) URL, got {self.url!r}")
        if self.kind in ("slack", "teams") and self.secret_env:
            raise ConfigError("secret_env", f"a {self.kind} webhook is not signed (its URL is its secret)")
        if self.kind == "email":
            if not self.to:
                raise ConfigError("to", "an email action needs at least one address")
            for i, address in enumerate(self.to):
                if not EMAIL.fullmatch(address):
                    raise ConfigError(f"to[{i}]", f"expected an e-mail address, got {address!r}")
        if self.kind == "mqtt":
            if not self.topic or any(c in self.topic for c in "#+"):
                raise ConfigError("topic", f"an mqtt action needs a topic without wildcards, got {self.topic!r}")
            if self.qos not in (0, 1, 2):
                raise ConfigError("qos", f"must be 0, 1 or 2, got {self.qos}")
        if self.kind == "suppress" and self.for_s <= 0:
            raise ConfigError("for_s", f"must be > 0, got {self.for_s}")

    @property
    def target(self) -> str:
        """Where the action goes, for listings (never a secret)."""
        if self.kind == "email":
            return "mailto:" + ",".join(self.to)
        if self.kind in ("slack", "teams"):
            return f"{self.kind}:{redact_url(self.url)}"
        return {"webhook": self.url, "mqtt": self.topic}.get(self.kind, self.kind)


@dataclass
class Escalation:
    """A second set of actions if the alert is still unresolved `after_s` after it began."""

    after_s: float
    actions: list[Action]

    def validate(self) -> None:
        if self.after_s <= 0:
            raise ConfigError("after_s", f"must be > 0, got {self.after_s}")
        if not self.actions:
            raise ConfigError("actions", "an escalation needs at least one action")
        if any(a.kind == "suppress" for a in self.actions):
            raise ConfigError("actions", "suppress is not an escalation action")


_OPS = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
_NUMBER = r"-?\d+(?:\.\d+)?"
_FIELD = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_CONDITION = re.compile(
    rf"\s*(?P<field>{_FIELD})\s*(?P<op><=|>=|==|!=|<|>)\s*"
    rf"(?:(?P<pct>{_NUMBER})\s*%\s*of\s+(?P<of>{_FIELD}|{_NUMBER})"
    rf"|(?P<num>{_NUMBER})|\"(?P<dq>[^\"]*)\"|'(?P<sq>[^']*)'|(?P<bool>true|false))\s*"
)


@dataclass(frozen=True)
class Condition:
    """One compiled `when` entry: `field op value`, or `field op pct% of other`."""

    text: str
    field: str
    op: str
    value: Any
    of: str | float | None = None
    # Split and looked up once, not per event: every status of every light runs them.
    _path: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _compare: Callable[[Any, Any], Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_path", tuple(self.field.split(".")))
        object.__setattr__(self, "_compare", _OPS[self.op])

    def check(self, event: Any) -> bool:
        """True when the event's data satisfies it; a missing or non-numeric field is False."""
        actual = _lookup(event, self.field, self._path)
        if actual is None:
            return False
        expected = self.value
        if self.of is not None:
            base = self.of if isinstance(self.of, float) else lookup(event, self.of)
            if not _is_number(base):
                return False
            expected = self.value / 100.0 * base
        if _is_number(expected) and not _is_number(actual):
            return False
        if isinstance(expected, (str, bool)) and self.op not in ("==", "!="):
            return False
        try:
            return bool(self._compare(actual, expected))
        except TypeError:
            return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def lookup(event: Any, path: str) -> Any:
    """A data field by dotted path (`energy.voltage`); `duration_s` falls back to the event's."""
    return _lookup(event, path, path.split("."))


def _lookup(event: Any, path: str, parts: Sequence[str]) -> Any:
    node: Any = getattr(event, "data", None) or {}
    for part in parts:
        if type(node) is dict:  # the usual case, without the Mapping ABC's isinstance
            node = node.get(part)
            if node is None:
                break
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            node = None
            break
    if node is None and path == "duration_s":
        return getattr(event, "duration_s", None)
    return node


def parse_condition(text: str) -> Condition:
    """Compile `"battery < 10"`, `"voltage < 80% of rated_voltage"`, `"door == 'open'"`."""
    m = _CONDITION.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(
            f"expected 'FIELD OP NUMBER', 'FIELD OP PCT% of FIELD' or 'FIELD ==|!= \"TEXT\"', got {text!r}"
        )
    op = m["op"]
    if m["pct"] is not None:
        of_text = m["of"]
        of: str | float = float(of_text) if re.fullmatch(_NUMBER, of_text) else of_text
        return Condition(text, m["field"], op, float(m["pct"]), of)
    if m["num"] is not None:
        return Condition(text, m["field"], op, float(m["num"]))
    if op not in ("==", "!="):
        raise ValueError(f"only == and != compare text or true/false, got {text!r}")
    if m["bool"] is not None:
        return Condition(text, m["field"], op, m["bool"] == "true")
    return Condition(text, m["field"], op, m["dq"] if m["dq"] is not None else m["sq"])


def _parse_hours(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
    if not m or int(m[1]) > 24 or int(m[3]) > 24 or int(m[2]) > 59 or int(m[4]) > 59:
        raise ValueError(f"expected 'HH:MM-HH:MM' (e.g. '07:00-19:00'), got {text!r}")
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if start == end or start > 1440 or end > 1440:
        raise ValueError(f"an empty or impossible range: {text!r}")
    return start, end


def _parse_offset(text: str) -> int:
    if text in ("Z", "UTC", ""):
        return 0
    m = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", text)
    if not m or int(m[2]) > 14 or int(m[3]) > 59:
        raise ValueError(f"expected an offset like '+05:30' or '-08:00', got {text!r}")
    minutes = int(m[2]) * 60 + int(m[3])
    return -minutes if m[1] == "-" else minutes


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if value in ("", None):
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(key, f"expected a string or an array of strings, got {value!r}")
    return tuple(items)


@dataclass
class Rule:
    """One alert rule (a `[[rules]]` table). Unset matchers match everything."""

    name: str
    actions: list[Action] = field(default_factory=list)
    enabled: bool = True
    family: str = ""
    type: Any = ""
    """An event type, a glob (`sensor_*`), or an array of them."""
    device: str = ""
    severity: Any = ""
    """One severity or an array: the event's severity must be one of them."""
    min_severity: Literal["", "info", "warning", "critical"] = ""
    when: list[str] = field(default_factory=list)
    min_duration_s: float = 0.0
    resolved_by: list[str] = field(default_factory=list)
    more_than: int = 0
    within_s: float = 0.0
    outside_hours: str = ""
    inside_hours: str = ""
    utc_offset: str = "+00:00"
    absent_for_s: float = 0.0
    alert_severity: Literal["", "info", "warning", "critical"] = ""
    message: str = ""
    cooldown_s: float = 300.0
    escalate: Escalation | None = None
    source: str = field(default="config", init=False)
    """Where the rule came from: `config` or `plugin:<name>` (set by the loader)."""

    def validate(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError("name", f"expected letters, digits and _ . : -, got {self.name!r}")
        self.types = _strings(self.type, "type")
        self.severities = _strings(self.severity, "severity")
        for s in self.severities:
            if s not in SEVERITIES:
                raise ConfigError("severity", f"expected info, warning or critical, got {s!r}")
        conditions = []
        for i, text in enumerate(self.when):
            try:
                conditions.append(parse_condition(text))
            except ValueError as e:
                raise ConfigError(f"when[{i}]", str(e)) from None
        self.conditions = tuple(conditions)
        for key in ("min_duration_s", "within_s", "absent_for_s", "cooldown_s"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.more_than < 0:
            raise ConfigError("more_than", f"must be >= 0, got {self.more_than}")
        if bool(self.more_than) != bool(self.within_s):
            raise ConfigError("within_s" if self.more_than else "more_than",
                              "more_than and within_s go together ('more than N events within S seconds')")
        if self.more_than and self.min_duration_s:
            raise ConfigError("min_duration_s", "a rule counts events (more_than) or times one (min_duration_s), "
                                                "not both; write two rules")
        if self.outside_hours and self.inside_hours:
            raise ConfigError("inside_hours", "give outside_hours or inside_hours, not both")
        self.hours: tuple[int, int] | None = None
        for key in ("outside_hours", "inside_hours"):
            if getattr(self, key):
                try:
                    self.hours = _parse_hours(getattr(self, key))
                except ValueError as e:
                    raise ConfigError(key, str(e)) from None
        try:
            self.offset_min = _parse_offset(self.utc_offset)
        except ValueError as e:
            raise ConfigError("utc_offset", str(e)) from None
        if self.absent_for_s and (self.min_duration_s or self.more_than or self.when or self.hours):
            raise ConfigError("absent_for_s", "a silence rule matches on family/type/device only")
        if self.enabled and not self.actions:
            raise ConfigError("actions", "an enabled rule needs at least one action")

    # -- matching (used by the engine) ----------------------------------------------

    def matches_source(self, event: Any) -> bool:
        """family and device globs."""
        if self.family and not fnmatch.fnmatchcase(event.family or "", self.family):
            return False
        return not self.device or fnmatch.fnmatchcase(event.device_id or "", self.device)

    def matches_type(self, event_type: str) -> bool:
        return not self.types or any(fnmatch.fnmatchcase(event_type, t) for t in self.types)

    def matches_severity(self, severity: str) -> bool:
        if self.severities and severity not in self.severities:
            return False
        return not self.min_severity or _RANK.get(severity, 0) >= _RANK[self.min_severity]

    def in_time_window(self, ts: float) -> bool:
        """outside_hours / inside_hours at the event's local time (utc_offset)."""
        if self.hours is None:
            return True
        minute = int(((ts / 60.0) + self.offset_min) % 1440)
        start, end = self.hours
        inside = start <= minute < end if start < end else (minute >= start or minute < end)
        return inside if self.inside_hours else not inside


def rule_from_dict(raw: Any, key: str, *, source: str = "config", family: str = "") -> Rule:
    """Check and compile one rule table; raises ConfigErrors naming `key.<field>`."""
    if isinstance(raw, Mapping) and family and "family" not in raw:
        raw = {**raw, "family": family}
    rule = load_section(Rule, raw, key)
    rule.source = source
    return rule


def load_rules(raw: Any, key: str = "rules") -> list[Rule]:
    """The `[[rules]]` array of tables: every rule checked, names unique."""
    if not isinstance(raw, list):
        raise ConfigErrors([ConfigError(key, "expected an array of tables ([[rules]])")])
    errors: list[ConfigError] = []
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        try:
            rule = rule_from_dict(item, f"{key}[{i}]")
        except ConfigErrors as e:
            errors.extend(e.errors)
            continue
        if rule.name in seen:
            errors.append(ConfigError(f"{key}[{i}].name", f"duplicate rule name {rule.name!r}"))
        seen.add(rule.name)
        rules.append(rule)
    if errors:
        raise ConfigErrors(errors)
    return rules


def merge_rules(plugin_rules: Iterable[Rule], config_rules: Iterable[Rule]) -> list[Rule]:
    """Plugin defaults first; a config rule with the same name replaces (or disables) one."""
    merged = {r.name: r for r in plugin_rules}
    for rule in config_rules:
        merged[rule.name] = rule
    return list(merged.values())
