"""``gatewayd serial probe URL``: listen on a serial line and show what decodes.

For installers wiring a device: open the port with the given settings, print
every decoded frame (text if it is printable UTF-8, else hex) and every
framing error, and stop after ``--count`` frames or ``--timeout`` seconds.
With ``--json`` each line of stdout is one JSON object::

    {"frame": "<text or null>", "hex": "<payload hex>", "len": <bytes>}
    {"error": "<reason>", "sample_hex": "<first bytes dropped>"}

Progress and diagnostics go to stderr; "listening on ..." is printed there
once the port is open.

Exit status: 0 once ``--count`` frames arrived (with ``--count 0``: at the
timeout, if any frame arrived); 1 if the timeout came first or the port
vanished, with a hint on what to check; 2 for bad arguments or a port that
cannot be opened (the OS error is shown). Also runnable as
``python -m gatewayd.core.serial.probe``.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
from typing import TextIO

import trio

from ...protocol.framing import FRAMERS, FramingError
from .link import PortLost, SerialPort, SerialSettings

__all__ = ["add_probe_arguments", "main", "run_probe"]


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the probe's arguments to ``parser`` (the CLI's ``serial probe``)."""
    parser.add_argument("url", metavar="URL", help="device path (/dev/ttyUSB0) or pyserial URL (socket://host:port)")
    parser.add_argument("--baudrate", type=int, default=115200, metavar="N", help="line speed (default 115200)")
    parser.add_argument("--framing", choices=list(FRAMERS), default="jsonl", help="frame format (default jsonl)")
    parser.add_argument("--crc", action="store_true", help="frames carry a CRC-16/CCITT-FALSE")
    parser.add_argument("--max-frame", type=int, default=4096, metavar="N", help="largest payload in bytes")
    parser.add_argument("--count", type=int, default=1, metavar="N", help="stop after N frames (0: no limit)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S", help="give up after S seconds (0: never)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line on stdout")


def run_probe(args: argparse.Namespace) -> int:
    """Run the probe (its own ``trio.run``) and return the exit status."""
    try:
        settings = SerialSettings(port=args.url, baudrate=args.baudrate, framing=args.framing,
                                  crc=args.crc, max_frame=args.max_frame)
        if args.count < 0:
            raise ValueError(f"--count: expected 0 or more, got {args.count}")
        if not (args.timeout >= 0 and math.isfinite(args.timeout)):
            raise ValueError(f"--timeout: expected 0 or more seconds, got {args.timeout}")
    except ValueError as exc:
        print(f"serial probe: {exc}", file=sys.stderr)
        return 2
    try:
        return trio.run(_probe, settings, args.count, args.timeout, args.json, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatewayd serial probe",
                                     description="Listen on a serial line and show what decodes.")
    add_probe_arguments(parser)
    return run_probe(parser.parse_args(argv))


def _open_hint(exc: Exception) -> str:
    if getattr(exc, "errno", None) in (errno.EACCES, errno.EPERM):
        return " (is this user in the 'dialout' group?)"
    if getattr(exc, "errno", None) == errno.EBUSY:
        return " (is another program, or the running gateway, using the port?)"
    return ""


async def _probe(settings: SerialSettings, count: int, timeout: float, as_json: bool,
                 out: TextIO, err: TextIO) -> int:
    try:
        port = await SerialPort.open(settings)
    except (OSError, ValueError) as exc:
        print(f"serial probe: cannot open {settings.port}: {exc}{_open_hint(exc)}", file=err)
        return 2
    crc = ", crc" if settings.crc else ""
    print(f"listening on {settings.port} ({settings.framing}{crc}, {settings.baudrate} baud)", file=err, flush=True)
    framer = settings.make_framer()
    frames = received = 0
    try:
        with trio.move_on_after(timeout or math.inf):
            while not count or frames < count:
                data = await port.receive()
                received += len(data)
                for event in framer.feed(data):
                    _show(event, as_json, out)
                    if not isinstance(event, FramingError):
                        frames += 1
                        if frames == count:
                            break
    except PortLost as exc:
        print(f"serial probe: {settings.port}: {exc}", file=err)
        return 1
    finally:
        await port.aclose()
    if (count and frames >= count) or (not count and frames):
        return 0
    if frames:
        print(f"serial probe: only {frames} of {count} frames within {timeout} s", file=err)
    elif received:
        print(f"serial probe: {received} bytes arrived within {timeout} s but no valid frame: check the baud "
              f"rate (now {settings.baudrate}), the framing (now {settings.framing}), --crc and --max-frame",
              file=err)
    else:
        print(f"serial probe: nothing received within {timeout} s: check the wiring (TX/RX crossed? RS-485 A/B "
              "swapped? common ground?), that the device is powered and sending, and the port name", file=err)
    return 1


def _show(event: bytes | FramingError, as_json: bool, out: TextIO) -> None:
    if isinstance(event, FramingError):
        record = {"error": event.reason, "sample_hex": event.sample.hex()}
        line = json.dumps(record) if as_json else f"error  {event.reason}  (starts {event.sample.hex(' ')})"
    else:
        text = _printable(event)
        if as_json:
            line = json.dumps({"frame": text, "hex": event.hex(), "len": len(event)})
        else:
            line = f"frame  {len(event)} B  " + (text if text is not None else "hex " + event.hex(" "))
    print(line, file=out, flush=True)


def _printable(frame: bytes) -> str | None:
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.replace("\t", " ").isprintable() else None


if __name__ == "__main__":
    sys.exit(main())
