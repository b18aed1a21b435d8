"""Frames per second through a pty pair, against raw pty reads of the same bytes.

    python bench/serial_bench.py [--repeats 5] [--bytes 2000000]

For each framing (jsonl, cobs) and payload size (64, 512 B) a writer thread
pushes a pre-encoded stream into the pty master while a SerialLink on the
slave decodes it and hands every frame to a handler; the clock stops at the
last frame. The baseline, measured in the same run on a fresh pty with the
same termios settings (pyserial opens it), reads the same bytes with
``wait_readable`` + ``os.read`` and no framing. Also shown: the framer alone
(sans-I/O, fed 4 KiB chunks), to tell decoding cost from dispatch cost.
Medians over the repeats; ratio = link frames/s / raw frames/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import serial  # noqa: E402
import trio  # noqa: E402

from gatewayd.core.serial.link import SerialLink, SerialSettings  # noqa: E402
from gatewayd.protocol.framing import make_framer  # noqa: E402

CASES = [("jsonl", 64), ("jsonl", 512), ("cobs", 64), ("cobs", 512)]


def payload(framing: str, size: int) -> bytes:
    if framing == "jsonl":
        return b'{"v":"' + b"a" * (size - 8) + b'"}'
    return bytes(i % 256 for i in range(size))  # zeros included: COBS has work to do


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:65536]) :]


async def link_rate(framing: str, size: int, stream: bytes, frames: int) -> float:
    master, slave = os.openpty()
    seen = 0
    done = trio.Event()

    async def handler(frame: bytes, link: SerialLink) -> None:
        nonlocal seen
        seen += 1
        if seen == frames:
            done.set()

    link = SerialLink("bench", SerialSettings(port=os.ttyname(slave), framing=framing, max_frame=size), handler)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            start = time.perf_counter()
            nursery.start_soon(trio.to_thread.run_sync, write_all, master, stream)
            await done.wait()
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
    finally:
        os.close(master)
        os.close(slave)
    return frames / elapsed


async def raw_rate(stream: bytes, frames: int) -> float:
    master, slave = os.openpty()
    port = serial.Serial(os.ttyname(slave))  # the same raw termios the link gets
    fd = port.fileno()
    try:
        async with trio.open_nursery() as nursery:
            start = time.perf_counter()
            nursery.start_soon(trio.to_thread.run_sync, write_all, master, stream)
            received = 0
            while received < len(stream):
                await trio.lowlevel.wait_readable(fd)
                try:
                    received += len(os.read(fd, 65536))
                except BlockingIOError:
                    pass
            elapsed = time.perf_counter() - start
    finally:
        port.close()
        os.close(master)
        os.close(slave)
    return frames / elapsed


def framer_rate(framing: str, size: int, stream: bytes, frames: int) -> float:
    framer = make_framer(framing, max_frame=size)
    start = time.perf_counter()
    decoded = 0
    for i in range(0, len(stream), 4096):
        decoded += len(framer.feed(stream[i : i + 4096]))
    elapsed = time.perf_counter() - start
    assert decoded == frames
    return frames / elapsed


async def main(repeats: int, total_bytes: int) -> None:
    print(f"{'case':<12}{'link fr/s':>12}{'raw fr/s':>12}{'ratio':>8}{'framer fr/s':>14}{'link MB/s':>11}")
    for framing, size in CASES:
        one = make_framer(framing, max_frame=size).encode(payload(framing, size))
        frames = max(1, total_bytes // len(one))
        stream = one * frames
        links, raws, framers = [], [], []
        for _ in range(repeats):  # interleaved, so drift hits both alike
            raws.append(await raw_rate(stream, frames))
            links.append(await link_rate(framing, size, stream, frames))
            framers.append(framer_rate(framing, size, stream, frames))
        link, raw, framer = (statistics.median(x) for x in (links, raws, framers))
        mbps = link * len(one) / 1e6
        print(f"{framing + ' ' + str(size):<12}{link:>12,.0f}{raw:>12,.0f}{link / raw:>8.2f}{framer:>14,.0f}{mbps:>11.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bytes", type=int, default=2_000_000, help="stream size per run")
    args = parser.parse_args()
    trio.run(main, args.repeats, args.bytes)
