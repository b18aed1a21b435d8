"""SerialLink and the probe against pty pairs standing in for devices.

The test holds the pty master (the device end); the link opens the slave path
through pyserial exactly as it would open /dev/ttyUSB0.

Clocks: most tests run on the real clock under ``trio.fail_after`` (a hard
timeout, never a timing assertion), because data crosses the kernel. Tests of
timeouts use ``patient_clock``: a MockClock that jumps to the next deadline
only after 50 ms of real idleness. ``autojump_clock`` (threshold 0) would jump
while the link's open runs in a worker thread or while bytes written to a pty
are still in the kernel's flip buffer, and fire deadlines spuriously.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from gatewayd.core.serial.link import SerialLink, SerialNotOpen, SerialSettings, SerialSettingsError, SerialTimeout
from gatewayd.protocol.framing import make_framer
from gatewayd.testing import wait_until

REPO = Path(__file__).resolve().parents[1]


class PtyDevice:
    """The device end of a pty pair."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        self.path = os.ttyname(self._slave)
        os.set_blocking(self.master, False)
        self.closed = False

    def write(self, data: bytes) -> None:
        os.write(self.master, data)  # small writes: the pty buffer takes them whole

    async def read_frames(self, framer, n: int) -> list:
        events: list = []
        while len(events) < n:
            await trio.lowlevel.wait_readable(self.master)
            events += framer.feed(os.read(self.master, 4096))
        return events

    def close(self) -> None:
        """Unplug: the link's next read sees EOF/EIO."""
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.master)
            os.close(self.master)
            os.close(self._slave)


@pytest.fixture
async def device():
    dev = PtyDevice()
    yield dev
    dev.close()


@pytest.fixture
def patient_clock():
    return trio.testing.MockClock(autojump_threshold=0.05)


def settings(port: str, **kw) -> SerialSettings:
    return SerialSettings(port=port, **{"reconnect_min": 0.01, "reconnect_max": 0.05, **kw})


class Collector:
    """A frame handler that keeps what it got and can wait for it."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.frames: list[bytes] = []
        self.reply = reply
        self._changed = trio.Event()

    async def __call__(self, frame: bytes, link: SerialLink) -> None:
        if frame == b"boom":
            raise RuntimeError("handler bug")
        self.frames.append(frame)
        self._changed.set()
        self._changed = trio.Event()
        if self.reply is not None:
            await link.send(self.reply + frame)

    async def wait_for(self, n: int) -> list[bytes]:
        while len(self.frames) < n:
            await self._changed.wait()
        return self.frames


async def test_frames_in_replies_out(nursery, device):
    got = Collector(reply=b"ack:")
    link = SerialLink("meter", settings(device.path), got)
    with trio.fail_after(10):
        await nursery.start(link.run)
        assert link.state == "open"
        assert link.health()["mode"] == "fd"
        device.write(b'{"t": 1}\r\n{"t": 2}\n')
        assert await got.wait_for(2) == [b'{"t": 1}', b'{"t": 2}']
        assert await device.read_frames(make_framer("jsonl"), 2) == [b'ack:{"t": 1}', b'ack:{"t": 2}']
    assert link.stats.frames_in == 2 and link.stats.frames_out == 2
    assert link.stats.bytes_in == 19 and link.stats.bytes_out == len(b'ack:{"t": 1}\n') * 2


async def test_garbage_between_frames_is_counted_and_skipped(nursery, device):
    got = Collector()
    link = SerialLink("meter", settings(device.path, framing="cobs", crc=True), got)
    framer = make_framer("cobs", crc=True)
    with trio.fail_after(10):
        await nursery.start(link.run)
        device.write(framer.encode(b"one") + b"\x07\xff\x13\x00" + b"\x55" * 9 + framer.encode(b"two"))
        assert await got.wait_for(2) == [b"one", b"two"]
    assert link.stats.framing_errors == 2  # the bad COBS block and the CRC-less noise
    assert link.state == "open"


async def test_oversized_frame_is_counted_and_the_link_survives(nursery, device):
    got = Collector()
    link = SerialLink("meter", settings(device.path, max_frame=16), got)
    with trio.fail_after(10):
        await nursery.start(link.run)
        device.write(b"x" * 100 + b"\n" + b"small\n")
        assert await got.wait_for(1) == [b"small"]
    assert link.stats.framing_errors == 1
    assert link.stats.last_error == "framing: oversized"
    assert link.state == "open"


async def test_handler_that_raises_is_counted_and_never_kills_the_link(nursery, device):
    got = Collector()
    link = SerialLink("meter", settings(device.path), got)
    with trio.fail_after(10):
        await nursery.start(link.run)
        device.write(b"boom\nafter\n")
        assert await got.wait_for(1) == [b"after"]
    assert link.stats.handler_errors == 1 and link.state == "open"


async def test_reconnects_when_the_device_comes_back(nursery, tmp_path):
    port = tmp_path / "ttyUSB0"
    first = PtyDevice()
    port.symlink_to(first.path)
    got = Collector()
    link = SerialLink("meter", settings(str(port)), got)
    with trio.fail_after(10):
        await nursery.start(link.run)
        assert link.state == "open"
        first.write(b"before\npartial")  # the device dies mid-frame
        await got.wait_for(1)
        await wait_until(lambda: link.stats.bytes_in == 14)

        first.close()  # unplugged: the pty hangs up and udev removes the node
        port.unlink()
        await wait_until(lambda: link.state == "disconnected")
        assert link.stats.reconnects == 0
        with pytest.raises(SerialNotOpen):
            await link.send(b"hello")

        second = PtyDevice()
        try:
            port.symlink_to(second.path)  # plugged back in
            await link.wait_open()
            assert link.stats.reconnects == 1
            second.write(b"after\n")
            assert await got.wait_for(2) == [b"before", b"after"]
            await link.send(b"hello")
            assert await second.read_frames(make_framer("jsonl"), 1) == [b"hello"]
        finally:
            second.close()


async def test_absent_device_does_not_block_start(nursery, tmp_path):
    port = tmp_path / "ttyACM0"
    link = SerialLink("meter", settings(str(port)), Collector())
    with trio.fail_after(10):
        await nursery.start(link.run)
        assert link.state in ("disconnected", "connecting")
        assert "No such file" in link.stats.last_error
        dev = PtyDevice()
        try:
            port.symlink_to(dev.path)
            await link.wait_open()
        finally:
            dev.close()
    assert link.stats.reconnects == 0  # never open before: a first open, not a reconnect


async def test_request_gets_the_matching_reply_and_the_handler_the_rest(nursery, device):
    got = Collector()
    link = SerialLink("meter", settings(device.path, framing="slip"), got)
    framer = make_framer("slip")

    async def device_answers():
        [poll] = await device.read_frames(framer, 1)
        device.write(framer.encode(b"unsolicited") + framer.encode(b"R:" + poll))

    with trio.fail_after(10):
        await nursery.start(link.run)
        nursery.start_soon(device_answers)
        reply = await link.request(b"poll-7", match=lambda f: f.startswith(b"R:"), timeout=5)
        assert reply == b"R:poll-7"
        assert await got.wait_for(1) == [b"unsolicited"]
    assert link.stats.frames_in == 2


async def test_request_times_out_when_the_device_never_answers(patient_clock, nursery, device):
    got = Collector()
    link = SerialLink("meter", settings(device.path), got)
    with trio.fail_after(60):
        await nursery.start(link.run)
        with pytest.raises(SerialTimeout):
            await link.request(b"poll", match=lambda f: f == b"pong", timeout=5)
        assert trio.current_time() >= 5  # virtual time: the clock jumped
        # A late reply is no one's reply any more: the handler gets it.
        device.write(b"pong\n")
        assert await got.wait_for(1) == [b"pong"]
    assert isinstance(SerialTimeout("x"), trio.TooSlowError)


async def test_request_fails_fast_when_the_link_is_down(patient_clock, nursery, tmp_path):
    link = SerialLink("meter", settings(str(tmp_path / "absent")))
    with trio.fail_after(60):
        await nursery.start(link.run)
        with pytest.raises(SerialNotOpen):
            await link.request(b"poll", match=bool, timeout=5)
        assert trio.current_time() < 5


async def test_request_waiter_fails_when_the_link_is_lost(nursery, device):
    link = SerialLink("meter", settings(device.path, reconnect_min=5, reconnect_max=5))

    async def unplug_after_poll():
        await device.read_frames(make_framer("jsonl"), 1)
        device.close()

    with trio.fail_after(10):
        await nursery.start(link.run)
        nursery.start_soon(unplug_after_poll)
        with pytest.raises(SerialNotOpen, match="link lost"):
            await link.request(b"poll", match=bool, timeout=60)


async def test_write_timeout_when_nobody_reads(patient_clock, nursery, device):
    link = SerialLink("meter", settings(device.path, framing="length", max_frame=4000, write_timeout=2))
    with trio.fail_after(60):
        await nursery.start(link.run)
        with pytest.raises(SerialTimeout):
            for _ in range(10_000):  # the pty buffer fills long before this
                await link.send(b"z" * 4000)
    assert link.state == "open"  # a stuck line is not a lost one


async def test_loop_url_runs_in_a_worker_thread(nursery):
    got = Collector()
    link = SerialLink("loop", settings("loop://", framing="cobs"), got)
    with trio.fail_after(10):
        await nursery.start(link.run)
        assert link.health()["mode"] == "thread"
        await link.send(b"\x00echo\x00")  # loop:// reads back what it writes
        assert await got.wait_for(1) == [b"\x00echo\x00"]
        assert await link.request(b"ping", match=lambda f: f == b"ping", timeout=5) == b"ping"
    assert got.frames == [b"\x00echo\x00"]


async def test_socket_url_reads_the_fd_and_reconnects_after_eof(nursery):
    accepted, connections = trio.open_memory_channel(2)

    async def keep(stream):  # serve_tcp closes a stream when its handler returns
        await accepted.send(stream)
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, keep, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    got = Collector()
    link = SerialLink("tcp", settings(f"socket://127.0.0.1:{port}"), got)
    with trio.fail_after(10):
        await nursery.start(link.run)
        assert link.health()["mode"] == "fd"
        server = await connections.receive()
        await server.send_all(b"hi\n")
        await got.wait_for(1)
        await server.aclose()  # the remote end goes away: EOF, then a new connection
        server = await connections.receive()
        await wait_until(lambda: link.state == "open")
        assert link.stats.reconnects == 1
        await link.send(b"back")
        assert await server.receive_some() == b"back\n"
        await server.aclose()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", ""), ("baudrate", 0), ("baudrate", True), ("bytesize", 9), ("parity", "X"),
        ("stopbits", 3), ("framing", "xmodem"), ("max_frame", 0), ("crc", "yes"),
        ("read_timeout", 0), ("write_timeout", float("nan")), ("reconnect_min", -1),
        ("reconnect_max", 0.001),
    ],
)
def test_settings_errors_name_the_field(field, value):
    with pytest.raises(SerialSettingsError) as info:
        SerialSettings(**{"port": "loop://", field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")


def test_settings_from_mapping():
    assert SerialSettings.from_mapping({"port": "loop://", "framing": "slip"}).framing == "slip"
    with pytest.raises(SerialSettingsError) as info:
        SerialSettings.from_mapping({"port": "loop://", "baud": 9600})
    assert info.value.field == "baud"
    with pytest.raises(SerialSettingsError, match="max_frame"):
        SerialSettings(port="loop://", framing="length", crc=True, max_frame=65535)


# -- the probe, as installers run it ------------------------------------------

PROBE = [sys.executable, "-m", "gatewayd.core.serial.probe"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


async def test_probe_prints_frames_and_errors_as_json(device):
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(
            [*PROBE, device.path, "--json", "--count", "2", "--max-frame", "64", "--timeout", "15"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=ENV,
        )
        try:
            # Write only once the probe opened the port: opening flushes input.
            banner = b""
            while b"listening" not in banner:
                chunk = await proc.stderr.receive_some()
                assert chunk, f"probe exited early: {banner!r}"
                banner += chunk
            device.write(b"y" * 100 + b"\n" + b'{"t":1}\n' + b"\x01\x02\n")
            out = b""
            while chunk := await proc.stdout.receive_some():
                out += chunk
            assert await proc.wait() == 0
        finally:
            proc.kill()
            await proc.wait()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert lines == [
        {"error": "oversized", "sample_hex": "79" * 32},
        {"frame": '{"t":1}', "hex": b'{"t":1}'.hex(), "len": 7},
        {"frame": None, "hex": "0102", "len": 2},
    ]


async def test_probe_times_out_with_a_hint(device):
    with trio.fail_after(20):
        result = await trio.run_process([*PROBE, device.path, "--timeout", "0.3"], capture_stdout=True,
                                        capture_stderr=True, check=False, cwd=REPO, env=ENV)
    assert result.returncode == 1
    assert b"check the wiring" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/ttyUSB9"], b"No such file"),
        (["loop://", "--framing", "xmodem"], b"invalid choice"),
        (["loop://", "--max-frame", "0"], b"max_frame"),
        (["loop://", "--count", "-1"], b"--count"),
    ],
)
async def test_probe_bad_arguments_and_unopenable_ports_exit_2(args, message):
    with trio.fail_after(20):
        result = await trio.run_process([*PROBE, *args], capture_stdout=True, capture_stderr=True,
                                        check=False, cwd=REPO, env=ENV)
    assert result.returncode == 2
    assert message in result.stderr
