"""The spec's workflow table as the family's default rules, in the core rule engine
(docs/events.md). Pure: the rules from the options.

Who hears of what is the site's `[plugins.edgesentinel.teams.<team>]`: an e-mail to
its addresses (the core's `email` action, through `[notifications.smtp]`), its Slack
and Teams channels, and its webhooks, each given the team's name and addresses as the
payload's `to` (SMS is a webhook to a relay). Every rule also sends an `alert` record
upstream (the cloud opens tickets and incidents from it) and logs. A `[[rules]]` table
of the same name in gatewayd.toml replaces a rule; `enabled = false` switches it off.

| rule | event | fires | team |
|---|---|---|---|
| `<name>-connectivity-lost` | `device_offline` (silence > `silence_s`) or `connectivity_lost` | silent `connectivity_lost_s` (5 min) | maintenance, then l2 after `escalate_l2_s` |
| `<name>-connectivity-lost-l3` | the same | not back after `escalate_l3_s` | l3 |
| `<name>-power-outage` | `power_outage` | severity critical | maintenance |
| `<name>-safe-shutdown` | `safe_shutdown_initiated` | any | field |
| `<name>-supercap-low` | `supercap_low` | `voltage < 80% of rated_voltage`, or `voltage_pct < 80` | maintenance |
| `<name>-safety-edge` | `safety_edge_triggered` | more than `safety_edge_max` within `safety_edge_window_s` | safety |
| `<name>-emergency-stop` | `emergency_stop_activated` | any, every one | safety |
| `<name>-light-curtain` | `light_curtain_breach` | outside `operating_hours` | security |
| `<name>-server-unreachable` | `server_unreachable`, `upload_diagnostics` | `retry_count > retry_alert_after` | it |
| `<name>-sensor-fault` | `sensor_fault` | any: mutes the threshold rules for the device | maintenance |
| `<name>-tamper` | `tamper_detected` | any, every one | security |
| `<name>-sd-error` | `sd_error` | any | maintenance |
| `<name>-over-torque`, `<name>-vibration` | door events `over_torque`, `vibration_alert` | any | maintenance |

Grouping against alert fatigue is the engine's `cooldown_s`: one alert per rule,
device and type in that time, the next one carrying `"grouped": N`.
"""

from __future__ import annotations

from typing import Any

from .config import EdgesentinelConfig

def team_actions(config: EdgesentinelConfig, team: str) -> list[dict[str, Any]]:
    """How a team hears (none configured: nothing): an e-mail to its addresses, its Slack and
    Teams channels, its webhooks (each given `to`: the team's name and addresses)."""
    settings = config.teams.get(team)
    if settings is None:
        return []
    to = [team, *settings.email]
    mail = [{"kind": "email", "to": list(settings.email)}] if settings.email else []
    chats = [{"kind": "slack", "url": url} for url in settings.slack]
    chats += [{"kind": "teams", "url": url} for url in settings.msteams]
    hooks = [{"kind": "webhook", "url": hook.url, "to": to, **({"secret_env": hook.secret_env} if hook.secret_env
                                                               else {})} for hook in settings.webhooks]
    return [*mail, *chats, *hooks]


def rules(name: str, config: EdgesentinelConfig) -> list[dict[str, Any]]:
    """The default rules of the plugin called `name` (its family)."""
    base = [{"kind": "upstream"}]

    def rule(suffix: str, team: str, level: str = "warning", **keys: Any) -> dict[str, Any]:
        return {"name": f"{name}-{suffix}", "family": name,
                "actions": [*base, {"kind": "log", "level": level}, *team_actions(config, team)], **keys}

    offline = ["device_offline", "connectivity_lost"]
    # device_offline is emitted after silence_s of silence: the rule waits for the rest of the 5 minutes.
    first_wait = config.connectivity_lost_s - config.silence_s
    lost = rule("connectivity-lost", "maintenance", type=offline, min_duration_s=first_wait,
                resolved_by=["device_online", "connectivity_restored"], alert_severity="warning",
                message="door controller silent for more than 5 minutes")
    lost["escalate"] = {"after_s": config.escalate_l2_s - config.silence_s,
                        "actions": [{"kind": "log", "level": "error"}, *team_actions(config, "l2")]}
    threshold_rules = [f"{name}-supercap-low", f"{name}-supercap-low-pct", f"{name}-safety-edge",
                       f"{name}-light-curtain", f"{name}-over-torque", f"{name}-vibration"]
    return [
        lost,
        {**rule("connectivity-lost-l3", "l3", "error", type=offline,
                min_duration_s=config.escalate_l3_s - config.silence_s,
                resolved_by=["device_online", "connectivity_restored"], alert_severity="critical",
                message="door controller still offline: escalated to L3")},
        rule("power-outage", "maintenance", "error", type="power_outage", severity="critical", cooldown_s=60),
        rule("safe-shutdown", "field", "error", type="safe_shutdown_initiated", alert_severity="critical",
             message="safe shutdown initiated: incident opened, prepare a site visit"),
        rule("supercap-low", "maintenance", type="supercap_low", when=["voltage < 80% of rated_voltage"],
             alert_severity="warning",
             message="supercap below 80% of rated voltage: check the backup power system"),
        rule("supercap-low-pct", "maintenance", type="supercap_low", when=["voltage_pct < 80"],
             alert_severity="warning", message="supercap below 80% of rated voltage: check the backup power system"),
        rule("safety-edge", "safety", type="safety_edge_triggered", more_than=config.safety_edge_max,
             within_s=config.safety_edge_window_s, alert_severity="warning",
             message="safety edge triggered repeatedly: safety audit, check door alignment"),
        rule("emergency-stop", "safety", "error", type="emergency_stop_activated", alert_severity="critical",
             cooldown_s=0),
        rule("light-curtain", "security", "error", type="light_curtain_breach", outside_hours=config.operating_hours,
             utc_offset=config.utc_offset, alert_severity="critical"),
        rule("server-unreachable", "it", type=["server_unreachable", "upload_diagnostics"],
             when=[f"retry_count > {config.retry_alert_after}"], alert_severity="warning",
             message="node cannot reach its server: check the server's status"),
        {**rule("sensor-fault", "maintenance", type="sensor_fault", alert_severity="warning",
                message="sensor failure: maintenance scheduled; threshold alerts of this device muted"),
         "actions": [*rule("sensor-fault", "maintenance")["actions"],
                     {"kind": "suppress", "rules": threshold_rules, "for_s": 86400}]},
        rule("tamper", "security", "error", type="tamper_detected", alert_severity="critical", cooldown_s=0),
        rule("sd-error", "maintenance", "error", type="sd_error", alert_severity="critical",
             message="SD card failure: prepare a replacement"),
        rule("over-torque", "maintenance", type="over_torque", alert_severity="warning"),
        rule("vibration", "maintenance", type="vibration_alert", alert_severity="warning"),
    ]
