"""µs per PUBLISH parsed and per packet split by gatewayd.protocol.mqtt_packets, against
paho's decoder and paho's packet reading on the same bytes.

    python bench/mqtt_packets_bench.py [--repeats 5] [--packets 20000]

Packets: QoS 1 PUBLISHes to 100 topics like ``dev/sensor-0042/data``, MQTT 3.1.1 and 5
(no properties), 64 and 512 byte payloads.

* parse: ``parse_publish`` on a whole packet, against paho's ``_packet.decode_publish``
  on the body alone (the fixed header already stripped: in paho's favour) and, for
  3.1.1, gatewayd's client fast path (``mqtt_fastpath.decode_311``, which reads less:
  no UTF-8 or wildcard check, bytes topic).
* split (memory): ``FrameReader`` fed the stream in 64 KiB chunks.
* split (socket): the same stream written to a socketpair in batches that fit its
  buffer, timed while it is read back: ``FrameReader`` over ``recv(65536)``; paho's
  ``_packet_read`` (three or more ``recv`` per packet: type, each length byte, body);
  paho's ``_packet_read`` over gatewayd's ``ReadBuffer`` (one ``recv`` per 64 KiB, as
  the gateway's own client reads). paho's packet handling is replaced by a counter.

Medians over the repeats, interleaved so drift hits every candidate alike.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt import _packet  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode  # noqa: E402

from gatewayd.core.mqtt.fastpath import ReadBuffer, decode_311  # noqa: E402
from gatewayd.protocol.mqtt_packets import FrameReader, encode_publish, parse_publish  # noqa: E402

PAHO_PROTOCOL = {4: paho.MQTTv311, 5: paho.MQTTv5}
BATCH = 100_000  # bytes written before reading back: fits a socketpair's buffer


def packets(level: int, size: int, count: int) -> list[bytes]:
    return [encode_publish(f"dev/sensor-{i % 100:04d}/data", bytes(size), 1, packet_id=i % 65535 + 1,
                           protocol_level=level) for i in range(count)]


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def parse_times(level: int, raw: bytes) -> dict[str, float]:
    body_start = 3 if len(raw) > 129 else 2
    flags, body, protocol = raw[0] & 0x0F, raw[body_start:], PAHO_PROTOCOL[level]
    times = {
        "parse_publish": per_call(lambda: parse_publish(flags, raw, body_start, level), 100_000),
        "paho decode_publish": per_call(lambda: _packet.decode_publish(raw[0], body, protocol), 20_000),
    }
    if level == 4:
        times["gatewayd decode_311"] = per_call(lambda: decode_311(raw[0], body), 100_000)
    return times


def split_in_memory(stream: bytes, count: int) -> float:
    reader = FrameReader(1 << 20)
    next_frame = reader.next_frame
    start = time.perf_counter()
    seen = 0
    for i in range(0, len(stream), 65536):
        reader.feed(stream[i:i + 65536])
        while next_frame() is not None:
            seen += 1
    elapsed = time.perf_counter() - start
    assert seen == count
    return elapsed / count * 1e6


def split_from_socket(stream: bytes, count: int, reader_kind: str) -> float:
    """µs per packet read back from a socketpair by ``reader_kind``."""
    w, r = socket.socketpair()
    r.setblocking(False)
    seen = 0
    if reader_kind == "FrameReader":
        reader = FrameReader(1 << 20)

        def read_available() -> None:
            nonlocal seen
            while True:
                try:
                    data = r.recv(65536)
                except BlockingIOError:
                    return
                reader.feed(data)
                while reader.next_frame() is not None:
                    seen += 1
    else:
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        client._sock = r

        def handle() -> MQTTErrorCode:
            nonlocal seen
            seen += 1
            return MQTTErrorCode.MQTT_ERR_SUCCESS

        client._packet_handle = handle
        if reader_kind == "paho + ReadBuffer":
            client._sock_recv = ReadBuffer(client._sock_recv).recv

        def read_available() -> None:
            while client._packet_read() == MQTTErrorCode.MQTT_ERR_SUCCESS:
                pass

    elapsed = 0.0
    try:
        for i in range(0, len(stream), BATCH):
            w.sendall(stream[i:i + BATCH])
            start = time.perf_counter()
            read_available()
            elapsed += time.perf_counter() - start
    finally:
        w.close()
        r.close()
    assert seen == count, (reader_kind, seen)
    return elapsed / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--packets", type=int, default=20_000)
    args = parser.parse_args()
    print(f"µs per packet, medians of {args.repeats}; {args.packets} packets per split run")
    for level in (4, 5):
        for size in (64, 512):
            stream_packets = packets(level, size, args.packets)
            stream = b"".join(stream_packets)
            runs: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for name, value in parse_times(level, stream_packets[42]).items():
                    runs.setdefault(f"parse: {name}", []).append(value)
                runs.setdefault("split (memory): FrameReader", []).append(split_in_memory(stream, args.packets))
                for kind in ("FrameReader", "paho _packet_read", "paho + ReadBuffer"):
                    if level == 4 or kind == "FrameReader":  # paho frames 3.1.1 and 5 alike
                        runs.setdefault(f"split (socket): {kind}", []).append(
                            split_from_socket(stream, args.packets, kind))
            print(f"\nMQTT {'3.1.1' if level == 4 else '5'}, {size} B payload ({len(stream_packets[42])} B packets)")
            for name, values in runs.items():
                print(f"  {name:<36}{statistics.median(values):8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
