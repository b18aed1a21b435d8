"""Upstream sync: the workers and sinks that deliver the outbox to the cloud, and the
reference receiver of the batch protocol.

The wire format lives in :mod:`gatewayd.protocol.batch` and the sender's retry policy in
:mod:`gatewayd.protocol.retry` (both sans-I/O); ``docs/upstream-protocol.md`` documents
the protocol for cloud teams.
"""
