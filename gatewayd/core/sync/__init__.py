"""Upstream sync: the batch protocol codec, the retry policy, the reference receiver.

The wire format is documented for cloud teams in ``docs/upstream-protocol.md``.
``protocol`` and ``retry`` are sans-I/O; the sinks that send over HTTP and MQTT
build on them, and ``receiver`` is the reference implementation of the far end.
The receiver (QuartTrio, hypercorn) is not imported here, so the codec stays cheap
to import: ``from gatewayd.core.sync.receiver import create_receiver_app``.
"""

from .protocol import (
    CLASS_PRIORITY,
    CLASSES,
    DecodedBatch,
    EncodedBatch,
    ProtocolError,
    Rejection,
    SerializedRecords,
    decode_batch,
    encode_batch,
    mqtt_topic,
    mqtt_user_properties,
    rfc3339_utc,
    sign,
    validate_record,
)
from .retry import Backoff, CircuitBreaker, Outcome, parse_response

__all__ = [
    "CLASSES",
    "CLASS_PRIORITY",
    "Backoff",
    "CircuitBreaker",
    "DecodedBatch",
    "EncodedBatch",
    "Outcome",
    "ProtocolError",
    "Rejection",
    "SerializedRecords",
    "decode_batch",
    "encode_batch",
    "mqtt_topic",
    "mqtt_user_properties",
    "parse_response",
    "rfc3339_utc",
    "sign",
    "validate_record",
]

# The sinks and workers pull in httpx and the outbox: imported on first use only, so
# the codec stays cheap (and the outbox can import the codec without a cycle).
_LAZY = {
    "HttpSink": ".http_sink",
    "MqttSink": ".mqtt_sink",
    "SyncWorker": ".worker",
    "Upstream": ".upstream",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
