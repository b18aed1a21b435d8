"""gatewayd: a site-level edge gateway daemon.

Devices of several families talk to it over HTTP, MQTT or serial lines; one plugin per
family speaks that family's protocol. Everything is stored durably in SQLite before a
device is acknowledged, and forwarded upstream when the link is up.
"""

__version__ = "0.2.0"
