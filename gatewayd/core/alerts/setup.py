"""Wiring events, rules, notifications and the firmware store into a Gateway.

Called by the runtime: `await start_alerting(gateway, core_nursery)` once storage is
open (creates `gateway.events`, `gateway.notifier`, `gateway.ota` and starts the
notification worker and the rule timer in the core nursery), then
`load_alert_rules(gateway)` once the plugin contexts exist (plugin default rules
merged under the config's `[[rules]]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ..logs import get_logger
from ..ota.http import PublicUrl
from ..ota.store import OTA_SCHEMA, OtaStore, SigningError, SiteKey, load_public_key
from ..schema import ConfigErrors
from .events import EVENTS_SCHEMA, EventBus
from .notify import NOTIFY_SCHEMA, Notifier
from .rules import Rule, merge_rules, rule_from_dict

if TYPE_CHECKING:
    from ..runtime import Gateway

__all__ = ["start_alerting", "load_alert_rules", "install_schemas"]

log = get_logger("gatewayd.alerting")


def install_schemas(storage) -> None:
    """Create or migrate the core_event / core_notification / core_firmware tables (blocking)."""
    for spec in (EVENTS_SCHEMA, NOTIFY_SCHEMA, OTA_SCHEMA):
        storage.install(spec)


def _trusted_keys(gateway: Gateway) -> list:
    keys = []
    for path in gateway.config.ota.trusted_keys:
        full = path if path.startswith("/") or gateway.config.source is None else str(
            gateway.config.source.parent / path)
        try:
            keys.append(load_public_key(full))
        except SigningError as e:
            gateway.health.set("ota", "failed", f"ota.trusted_keys: {e}")
            log.error("cannot load a trusted firmware key", key="ota.trusted_keys", error=str(e))
    return keys


async def start_alerting(gateway: Gateway, nursery: trio.Nursery) -> None:
    """Install the tables, build the services and start their background tasks."""
    config = gateway.config
    await trio.to_thread.run_sync(install_schemas, gateway.storage)
    n = config.notifications
    gateway.notifier = Notifier(
        gateway.storage, gateway_id=config.gateway.id, clock=gateway.clock, max_attempts=n.max_attempts,
        backoff_base_s=n.backoff_base_s, backoff_max_s=n.backoff_max_s, timeout_s=n.timeout_s,
        metrics=gateway.metrics,
    )
    gateway.events = EventBus(gateway.storage, rules=config.rules, notifier=gateway.notifier, clock=gateway.clock,
                              metrics=gateway.metrics)
    gateway.ota = OtaStore(
        gateway.storage, config.data_dir / "firmware", clock=gateway.clock, events=gateway.events,
        trusted_keys=_trusted_keys(gateway), require_signed=config.ota.require_signed,
        default_rollout=config.ota.rollout,
        site_key=SiteKey(config.data_dir), sign_by_default=config.ota.sign_with_site_key,
        # Resolved at the first URL handed out: by then the main listener is bound (port 0).
        public_url=PublicUrl(config.http.public_url, config.http.listen, lambda: gateway.http_urls.get("main", [])),
    )
    await nursery.start(gateway.notifier.run)
    await nursery.start(gateway.events.run)


def load_alert_rules(gateway: Gateway) -> list[Rule]:
    """Collect every enabled plugin's default rules, merge the config's over them."""
    plugin_rules: list[Rule] = []
    for name in gateway.enabled_plugins:
        if name in gateway.failed or name not in gateway.contexts:
            continue
        try:
            raw = gateway.plugins.alert_rules(name, gateway.contexts[name])
            rules = [rule_from_dict(r, f"plugins.{name}.alert_rules[{i}]", source=f"plugin:{name}", family=name)
                     for i, r in enumerate(raw)]
        except ConfigErrors as e:
            gateway._fail(name, f"alert rules: {'; '.join(str(x) for x in e.errors)}", e)
            continue
        except Exception as e:
            gateway._fail(name, f"alert rules: {e!r}", e)
            continue
        plugin_rules.extend(rules)
    rules = merge_rules(plugin_rules, gateway.config.rules)
    gateway.events.set_rules(rules)
    log.info("alert rules loaded", rules=len(rules), from_plugins=len(plugin_rules),
             from_config=len(gateway.config.rules))
    return rules
