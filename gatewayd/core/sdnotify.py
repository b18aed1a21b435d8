"""systemd's service notifications (`Type=notify`, `WatchdogSec=`), from the trio loop.

The protocol is one datagram of `KEY=VALUE` lines to the unix socket systemd names in
`$NOTIFY_SOCKET` (sd_notify(3)); a path, or an abstract socket when it starts with `@`.
`READY=1` once the gateway has started (every listener bound, plugins up), `STATUS=`
lines for `systemctl status`, `STOPPING=1` on a graceful stop, and `WATCHDOG=1` every
half `$WATCHDOG_USEC` from a trio task: a loop that is wedged (a blocking call on the
trio thread, a deadlock) stops the pings, and systemd kills and restarts the service.

Twenty lines of our own rather than a dependency: `sdnotify` (PyPI) has had no release
since 2017 and its socket blocks; `systemd-python`/`cysystemd` are C builds against
libsystemd (a compiler and libsystemd-dev on every Pi). Without `$NOTIFY_SOCKET` (not
under systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import trio

from .logs import get_logger

__all__ = ["SystemdNotifier"]

log = get_logger("gatewayd.systemd")

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class SystemdNotifier:
    """Sends notifications to systemd; a no-op when not run by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """From `environ`, or from (and out of) the process's environment: the variables are
        removed, as sd_notify(3)'s unset_environment does, so that children (the managed
        mosquitto, built with systemd support, would say READY=1 itself) do not inherit them."""
        if environ is None:
            env: Mapping[str, str] = {k: os.environ.pop(k) for k in _VARIABLES if k in os.environ}
        else:
            env = environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if address.startswith("@"):
            self.address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self.address = address
        self.watchdog_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self.sent = 0
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send `KEY=VALUE` lines; False when not under systemd or the send failed."""
        if self.address is None:
            return False
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)  # a datagram to systemd; never wait on the trio thread
        try:
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            log.warning("cannot notify systemd", socket=str(self.address), error=str(e))
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    async def watchdog(self) -> None:
        """Forever: `WATCHDOG=1` every half watchdog period (returns at once without one)."""
        if self.address is None or self.watchdog_s is None:
            return
        log.info("systemd watchdog fed from the trio loop", every_s=round(self.watchdog_s / 2, 3))
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
