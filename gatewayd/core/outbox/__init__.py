"""The outbox: the durable buffer between ingest and the upstream sinks.

``ingest`` is what plugins call (``ctx.ingest``); ``store`` the Outbox itself (priorities, capacity,
TTL, batches), with its tables, records, selection, capacity and admin in modules of their own.
"""
