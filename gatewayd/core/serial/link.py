"""Serial links under trio: pyserial ports, framers, reconnect, request/response.

A plugin declares a link as a :class:`SerialSettings` and a frame handler; the
core runs ``SerialLink.run`` in its nursery::

    async def on_frame(frame: bytes, link: SerialLink) -> None:
        ...                      # validate, ingest, then maybe: await link.send(b"ACK")

    link = SerialLink("meter-1", SerialSettings(port="/dev/ttyUSB0", framing="cobs"), on_frame)
    await nursery.start(link.run)
    reply = await link.request(b"poll", match=lambda f: f.startswith(b"R"), timeout=2)

I/O: a port with a usable file descriptor (device paths, ``socket://``) is read
with ``trio.lowlevel.wait_readable`` + non-blocking ``os.read`` and written with
non-blocking ``os.write``; other ports (``loop://``, ``rfc2217://``, pyserial
wrappers such as ``spy://`` whose own read must run) go through a worker
thread that reads in slices of ``read_timeout`` seconds. The trio thread never
blocks on the port.

Lifecycle: ``state`` is "closed" before ``run`` and after it returns,
"connecting" during an open attempt, "open", and "disconnected" after a read
error, EOF (a pty whose other end closed, an unplugged USB adapter) or a failed
open. A disconnected link waits an exponential, +-25 % jittered delay between
``reconnect_min`` and ``reconnect_max`` and tries again, forever.
``run`` reports started after the *first open attempt*, successful or not, so
an absent device never holds up gateway start; check ``state`` or
``await link.wait_open()`` where it matters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal, Mapping

import serial
import trio

from ...protocol.framing import FRAMERS, Framer, FramingError, make_framer

try:  # plain implementations whose reads can be replaced by reading their fd
    from serial.serialposix import Serial as _PosixSerial
    from serial.urlhandler.protocol_socket import Serial as _SocketSerial

    _FD_READS = (_PosixSerial.read, _SocketSerial.read)
except ImportError:  # pragma: no cover - not POSIX
    _FD_READS = ()

__all__ = [
    "FrameHandler", "LinkStats", "PortLost", "SerialLink", "SerialLinkError", "SerialNotOpen",
    "SerialPort", "SerialSettings", "SerialSettingsError", "SerialTimeout",
]

log = logging.getLogger("gatewayd.serial")

State = Literal["connecting", "open", "disconnected", "closed"]
FrameHandler = Callable[[bytes, "SerialLink"], Awaitable[None]]


class SerialSettingsError(ValueError):
    """A bad setting; ``field`` names it so the config layer can add the TOML path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SerialLinkError(Exception):
    """Base of the errors a link raises to its callers."""


class SerialNotOpen(SerialLinkError):
    """The link is not open (connecting, disconnected, closed) or was lost mid-call."""


class SerialTimeout(SerialLinkError, trio.TooSlowError):
    """No matching reply within the request timeout, or a write did not finish
    within ``write_timeout``. A ``trio.TooSlowError``, so either can be caught."""


class PortLost(SerialLinkError):
    """Reading or writing the port failed: the device is gone (raised by SerialPort)."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SerialSettings:
    """How to open and frame one serial line. Validated on construction."""

    port: str  # /dev/ttyUSB0, socket://host:port, rfc2217://host:port, loop://
    baudrate: int = 115200
    bytesize: int = 8  # 5..8
    parity: str = "N"  # N E O M S
    stopbits: float = 1  # 1, 1.5, 2
    framing: str = "jsonl"  # a key of framing.FRAMERS
    max_frame: int = 4096  # largest payload in bytes, CRC excluded
    crc: bool = False  # CRC-16/CCITT-FALSE on every frame
    read_timeout: float = 0.1  # worker-thread read slice: bounds cancel latency
    write_timeout: float = 2.0  # a send that takes longer raises SerialTimeout
    reconnect_min: float = 0.5  # first delay before reopening, seconds
    reconnect_max: float = 30.0  # cap of the exponential backoff, seconds

    def __post_init__(self) -> None:
        def check(field: str, ok: bool, expected: str) -> None:
            if not ok:
                raise SerialSettingsError(field, f"expected {expected}, got {getattr(self, field)!r}")

        check("port", isinstance(self.port, str) and bool(self.port.strip()), "a device path or URL")
        check("baudrate", isinstance(self.baudrate, int) and not isinstance(self.baudrate, bool)
              and self.baudrate > 0, "a positive integer")
        check("bytesize", self.bytesize in (5, 6, 7, 8) and not isinstance(self.bytesize, bool), "5, 6, 7 or 8")
        check("parity", self.parity in ("N", "E", "O", "M", "S"), "one of N, E, O, M, S")
        check("stopbits", self.stopbits in (1, 1.5, 2) and not isinstance(self.stopbits, bool), "1, 1.5 or 2")
        check("framing", self.framing in FRAMERS, f"one of {', '.join(FRAMERS)}")
        check("max_frame", isinstance(self.max_frame, int) and not isinstance(self.max_frame, bool)
              and self.max_frame > 0, "a positive integer")
        check("crc", isinstance(self.crc, bool), "true or false")
        for field in ("read_timeout", "write_timeout", "reconnect_min", "reconnect_max"):
            value = getattr(self, field)
            check(field, _number(value) and value > 0, "a positive number of seconds")
        check("reconnect_max", self.reconnect_max >= self.reconnect_min, "a value >= reconnect_min")
        try:
            self.make_framer()
        except ValueError as exc:
            raise SerialSettingsError("max_frame", str(exc)) from None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SerialSettings:
        """Build from a config table; unknown keys raise SerialSettingsError."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise SerialSettingsError(key, f"unknown setting; known: {', '.join(sorted(known))}")
        if "port" not in data:
            raise SerialSettingsError("port", "missing")
        return cls(**data)

    def make_framer(self) -> Framer:
        """A fresh framer for these settings."""
        return make_framer(self.framing, max_frame=self.max_frame, crc=self.crc)


def _raw_fd(ser: serial.SerialBase) -> int | None:
    """The fd to read directly, or None where pyserial's own read must run."""
    if getattr(type(ser), "read", None) not in _FD_READS:
        return None
    try:
        return ser.fileno()
    except (OSError, AttributeError, ValueError):
        return None


class SerialPort:
    """One open pyserial port driven from trio (fd mode or thread mode).

    ``SerialLink`` uses it per connection; ``serial_probe`` uses it directly.
    """

    def __init__(self, ser: serial.SerialBase, settings: SerialSettings) -> None:
        self._ser = ser
        self._settings = settings
        self._fd = _raw_fd(ser)
        if self._fd is not None:
            os.set_blocking(self._fd, False)
        self.mode: Literal["fd", "thread"] = "fd" if self._fd is not None else "thread"
        # Own limiter: thread-mode links hold a thread for their whole life and
        # must not starve the default limiter other components share.
        self._limiter = trio.CapacityLimiter(2)
        self._closed = False

    @classmethod
    async def open(cls, settings: SerialSettings) -> SerialPort:
        """Open the port; raises OSError (pyserial's SerialException) or ValueError.

        The open runs in a thread and is not abandoned on cancel, so an open
        port is never leaked; pyserial bounds it (5 s for a socket:// connect).
        """

        def blocking_open() -> serial.SerialBase:
            return serial.serial_for_url(
                settings.port, baudrate=settings.baudrate, bytesize=settings.bytesize,
                parity=settings.parity, stopbits=settings.stopbits,
                timeout=settings.read_timeout, write_timeout=settings.write_timeout,
            )

        return cls(await trio.to_thread.run_sync(blocking_open), settings)

    async def receive(self) -> bytes:
        """The next bytes that arrived (never empty). Raises PortLost."""
        if self._fd is None:
            while True:
                data = await trio.to_thread.run_sync(self._read_slice, limiter=self._limiter)
                if data:
                    return data
        while True:
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:
                raise PortLost("port closed") from None
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise PortLost(f"read failed: {exc}") from exc
            if not data:
                raise PortLost("end of file (device gone)")
            return data

    def _read_slice(self) -> bytes:
        # Worker thread: at most read_timeout for the first byte, then whatever
        # else is already buffered.
        try:
            data = self._ser.read(1)
            if data and (waiting := self._ser.in_waiting):
                data += self._ser.read(waiting)
            return data
        except (OSError, ValueError, TypeError) as exc:  # pyserial raises all three when closed
            raise PortLost(f"read failed: {exc}") from exc

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data`` within write_timeout (else SerialTimeout). Raises PortLost."""
        with trio.move_on_after(self._settings.write_timeout) as scope:
            if self._fd is None:
                await self._send_thread(data)
            else:
                await self._send_fd(data)
        if scope.cancelled_caught:
            raise SerialTimeout(f"write not done within {self._settings.write_timeout} s")

    async def _send_fd(self, data: bytes) -> None:
        view = memoryview(data)
        await trio.lowlevel.checkpoint()
        while view:
            if self._closed:  # checked after every wait: the fd number may be reused
                raise PortLost("port closed")
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_writable(self._fd)
                except trio.ClosedResourceError:
                    raise PortLost("port closed") from None
            except OSError as exc:
                raise PortLost(f"write failed: {exc}") from exc

    async def _send_thread(self, data: bytes) -> None:
        try:
            await trio.to_thread.run_sync(self._ser.write, data, limiter=self._limiter)
        except serial.SerialTimeoutException:
            raise SerialTimeout(f"write not done within {self._settings.write_timeout} s") from None
        except (OSError, ValueError, TypeError) as exc:
            raise PortLost(f"write failed: {exc}") from exc

    async def aclose(self) -> None:
        """Close the port; wakes fd waiters first. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._fd is not None:
            trio.lowlevel.notify_closing(self._fd)
        with trio.CancelScope(shield=True):
            try:
                if self._fd is None:  # rfc2217 close talks to the server: not on the trio thread
                    await trio.to_thread.run_sync(self._ser.close, limiter=self._limiter)
                else:
                    self._ser.close()
            except (OSError, ValueError):
                pass  # the device is already gone; nothing left to release


@dataclass
class LinkStats:
    """Counters for /health and /metrics. Only ever increase (last_error aside)."""

    bytes_in: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    frames_out: int = 0
    framing_errors: int = 0
    handler_errors: int = 0
    reconnects: int = 0  # reopened after having been open
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(eq=False)
class _Waiter:
    match: Callable[[bytes], bool]
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    frame: bytes | None = None
    error: SerialLinkError | None = None


class SerialLink:
    """A supervised serial line: opens, frames, dispatches, reconnects.

    ``handler(frame, link)`` is awaited for every frame no ``request`` claims,
    one at a time in arrival order, in a task of its own (so a handler may call
    ``send`` or ``request``). A handler that raises is logged and counted in
    ``stats.handler_errors``; the link goes on. A slow handler applies
    backpressure: once about ``HANDLER_QUEUE`` frames wait, the link stops
    reading (so replies to ``request`` wait too) and the OS buffer fills.
    """

    HANDLER_QUEUE = 64
    _WARN_EVERY = 60.0  # seconds between framing-error warnings per link

    def __init__(self, name: str, settings: SerialSettings, handler: FrameHandler | None = None) -> None:
        self.name = name
        self.settings = settings
        self.stats = LinkStats()
        self._handler = handler
        self._framer = settings.make_framer()
        self._state: State = "closed"
        self._port: SerialPort | None = None
        self._opened = trio.Event()
        self._write_lock = trio.Lock()
        self._waiters: list[_Waiter] = []
        self._conn_scope: trio.CancelScope | None = None
        self._write_failure: str | None = None
        self._running = False
        self._last_warning = -math.inf
        self._unwarned = 0

    @property
    def state(self) -> State:
        """'connecting' | 'open' | 'disconnected' | 'closed'."""
        return self._state

    def health(self) -> dict[str, Any]:
        """State, port, I/O mode and counters, for /health."""
        mode = self._port.mode if self._port else None
        return {"name": self.name, "port": self.settings.port, "state": self._state, "mode": mode,
                **self.stats.as_dict()}

    async def wait_open(self) -> None:
        """Return once the link is open (at once if it is); no timeout of its own."""
        while self._state != "open":
            await self._opened.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Reports started after the first open attempt."""
        if self._running:
            raise RuntimeError(f"serial link {self.name} is already running")
        self._running = True
        send_frames, receive_frames = trio.open_memory_channel[bytes](self.HANDLER_QUEUE)
        try:
            async with trio.open_nursery() as nursery:
                if self._handler is not None:
                    nursery.start_soon(self._dispatch, self._handler, receive_frames)
                await self._connect_forever(send_frames, task_status)
        finally:
            self._state = "closed"
            self._opened = trio.Event()  # a set one would make wait_open spin
            self._fail_waiters("link closed")
            self._running = False
            log.info("serial link %s (%s): closed", self.name, self.settings.port)

    async def send(self, payload: bytes) -> None:
        """Frame and write ``payload``. Raises SerialNotOpen, SerialTimeout,
        or ValueError for a payload the framing cannot carry."""
        data = self._framer.encode(payload)  # encoding is stateless: shared with the reader
        async with self._write_lock:
            port = self._port
            if port is None or self._state != "open":
                raise SerialNotOpen(f"serial link {self.name} is {self._state}")
            try:
                await port.send_all(data)
            except PortLost as exc:
                # The reader may not notice (a socket can fail writes only):
                # drop this connection so the link reconnects.
                self._write_failure = str(exc)
                if self._conn_scope is not None:
                    self._conn_scope.cancel()
                raise SerialNotOpen(f"serial link {self.name}: {exc}") from exc
        self.stats.bytes_out += len(data)
        self.stats.frames_out += 1

    async def request(self, payload: bytes, *, match: Callable[[bytes], bool], timeout: float) -> bytes:
        """Send ``payload`` and return the first later frame for which ``match``
        is true; that frame skips the handler. ``timeout`` covers the send and
        the wait. Raises SerialTimeout (a trio.TooSlowError) when it runs out,
        SerialNotOpen if the link is or goes down. Waiters are tried in the
        order their requests started."""
        waiter = _Waiter(match)
        self._waiters.append(waiter)  # before sending: the reply may be quick
        try:
            with trio.move_on_after(timeout):
                await self.send(payload)
                await waiter.done.wait()
        finally:
            self._waiters.remove(waiter)
        if waiter.frame is not None:
            return waiter.frame
        if waiter.error is not None:
            raise waiter.error
        raise SerialTimeout(f"serial link {self.name}: no matching reply within {timeout} s")

    async def _connect_forever(self, send_frames: trio.MemorySendChannel[bytes], task_status) -> None:
        failures = 0
        ever_open = False
        while True:
            self._state = "connecting"
            try:
                port = await SerialPort.open(self.settings)
            except (OSError, ValueError) as exc:
                self._lost(f"open failed: {exc}")
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
            else:
                if ever_open:
                    self.stats.reconnects += 1
                ever_open, failures = True, 0
                reason = await self._serve(port, send_frames, task_status)
                task_status = trio.TASK_STATUS_IGNORED
                self._lost(reason)
            await trio.sleep(self._backoff(failures))
            failures += 1

    async def _serve(self, port: SerialPort, send_frames, task_status) -> str:
        """Read one connection until it is lost; returns why."""
        self._framer.reset()  # a partial frame from before the gap is garbage now
        self._write_failure = None
        self._port = port
        self._state = "open"
        self._opened.set()
        log.info("serial link %s (%s): open (%s mode)", self.name, self.settings.port, port.mode)
        task_status.started()
        try:
            with trio.CancelScope() as self._conn_scope:
                while True:
                    data = await port.receive()
                    self.stats.bytes_in += len(data)
                    for event in self._framer.feed(data):
                        if isinstance(event, FramingError):
                            self._framing_error(event)
                        else:
                            await self._deliver(event, send_frames)
        except PortLost as exc:
            return str(exc)
        finally:
            self._conn_scope = None
            self._port = None
            await port.aclose()
        return self._write_failure or "write failed"

    async def _deliver(self, frame: bytes, send_frames: trio.MemorySendChannel[bytes]) -> None:
        self.stats.frames_in += 1
        for waiter in self._waiters:
            if waiter.done.is_set():
                continue
            try:
                matched = waiter.match(frame)
            except Exception:
                log.exception("serial link %s (%s): request match function failed", self.name, self.settings.port)
                continue
            if matched:
                waiter.frame = frame
                waiter.done.set()
                return
        if self._handler is not None:
            # No scheduling round per frame while the queue has room: one read
            # can hold dozens of small frames.
            try:
                send_frames.send_nowait(frame)
            except trio.WouldBlock:
                await send_frames.send(frame)

    async def _dispatch(self, handler: FrameHandler, receive_frames: trio.MemoryReceiveChannel[bytes]) -> None:
        while True:
            frames = [await receive_frames.receive()]
            # Take what else is queued without a scheduling round per frame.
            while len(frames) < self.HANDLER_QUEUE:
                try:
                    frames.append(receive_frames.receive_nowait())
                except trio.WouldBlock:
                    break
            for frame in frames:
                try:
                    await handler(frame, self)
                except Exception:
                    self.stats.handler_errors += 1
                    log.exception("serial link %s (%s): frame handler failed (%d bytes)",
                                  self.name, self.settings.port, len(frame))

    def _lost(self, reason: str) -> None:
        if self._state == "open":
            log.warning("serial link %s (%s): disconnected: %s", self.name, self.settings.port, reason)
        elif reason != self.stats.last_error:
            log.warning("serial link %s (%s): %s; retrying", self.name, self.settings.port, reason)
        else:  # the same failure every backoff period: once at warning is enough
            log.debug("serial link %s (%s): %s; retrying", self.name, self.settings.port, reason)
        self.stats.last_error = reason
        self._state = "disconnected"
        self._opened = trio.Event()
        self._fail_waiters(f"link lost: {reason}")

    def _fail_waiters(self, reason: str) -> None:
        for waiter in self._waiters:
            if not waiter.done.is_set():
                waiter.error = SerialNotOpen(f"serial link {self.name}: {reason}")
                waiter.done.set()

    def _framing_error(self, error: FramingError) -> None:
        self.stats.framing_errors += 1
        self.stats.last_error = f"framing: {error.reason}"
        # Noise can produce many errors a second: warn at most once a minute.
        now = trio.current_time()
        if now - self._last_warning >= self._WARN_EVERY:
            log.warning("serial link %s (%s): framing error (%s), %d more since last warning",
                        self.name, self.settings.port, error.reason, self._unwarned)
            self._last_warning, self._unwarned = now, 0
        else:
            self._unwarned += 1

    def _backoff(self, failures: int) -> float:
        low, high = self.settings.reconnect_min, self.settings.reconnect_max
        delay = min(high, low * 2 ** min(failures, 32)) * random.uniform(0.75, 1.25)
        return min(high, max(low, delay))
