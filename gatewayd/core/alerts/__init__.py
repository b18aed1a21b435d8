"""Alerts: events, the alert-rule language and engine, notifications (log, webhook, MQTT, upstream)."""
