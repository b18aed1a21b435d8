"""The core's event, notification and firmware tables, for tests that build those services by hand."""

from gatewayd.core.alerts.events import EVENTS_SCHEMA
from gatewayd.core.alerts.notify import NOTIFY_SCHEMA
from gatewayd.core.ota.store import OTA_SCHEMA


def install_schemas(storage) -> None:
    """Create the tables (blocking: call it from a thread), as the gateway does at start."""
    for spec in (EVENTS_SCHEMA, NOTIFY_SCHEMA, OTA_SCHEMA):
        storage.install(spec)
