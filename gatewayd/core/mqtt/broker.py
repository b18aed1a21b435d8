"""The managed local mosquitto: configuration, password file, ACLs, supervision.

With ``mqtt.broker = "managed"`` the gateway runs its own mosquitto as a child process.
Devices do not connect to it: they connect to the gateway's edge (:mod:`.edge`), which
relays to mosquitto on a private listener, a unix socket in this directory (``socket``,
in a 0700 directory: no other local user can connect to it, or squat it the way one
can take a free loopback port first), or with ``port`` set a loopback TCP port.
Everything mosquitto reads is written here under one directory (``<data_dir>/mosquitto/``):

- ``mosquitto.conf``  persistence on, ``allow_anonymous false``, one listener
- ``passwd``          mosquitto's own ``$7$`` PBKDF2-SHA512 entries, mode 0600
- ``acl``             the gateway's account may do anything; devices get the patterns
                      their plugins declare (``AclTemplate``), with ``%u`` = username
- ``gatewayd.secret`` the gateway's own password, generated once, mode 0600
- ``data/``           mosquitto's persistence (queued messages of persistent sessions)

Credential and ACL changes rewrite the files and send SIGHUP: mosquitto re-reads them
without dropping connected clients (clients whose credentials were removed are
disconnected by mosquitto itself). One exception is handled here: a reload re-checks
every session's password, and a persistent session restored from disk after a broker
restart has none, so mosquitto 2.0 disconnects it and then stops queueing for it
(measured with 2.0.11: messages published after such a reload were lost). That would
lose what devices send to the gateway in the window between a broker restart and the
gateway's reconnect, so after each mosquitto start a reload waits (``reload_pending``)
until the gateway's own account has connected again, or ``reload_hold_max`` passed. With ``mqtt.broker = "external"`` or ``"off"`` this
class is simply not used.

If no mosquitto binary is installed, :meth:`ManagedBroker.run` logs how to install it,
sets ``state = "unavailable"``, reports started and idles, so HTTP, serial and the rest
of the gateway keep running.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import trio

from ...protocol.passwd import hash_password, is_password_hash, verify_password
from ..logs import QuietLog

__all__ = [
    "AclTemplate",
    "BrokerAccount",
    "BrokerMode",
    "ManagedBroker",
    "find_mosquitto",
    "hash_password",
    "verify_password",
]

log = logging.getLogger("gatewayd.broker")

BrokerMode = Literal["managed", "external", "off"]
"""``mqtt.broker``: run our own mosquitto, use a broker someone else runs, or no MQTT."""

GATEWAY_USERNAME = "gatewayd"
_PER_CLIENT = ("New connection from", "New client connected", "Client ", "Socket error on client",
               "Saving in-memory database")  # (the last: every autosave_interval)
_SUN_PATH_MAX = 107  # a unix socket's path, in bytes (sun_path, less its NUL)
_USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")

@dataclass(frozen=True)
class AclTemplate:
    """One ACL line that a plugin declares for its devices.

    ``pattern`` may use mosquitto's substitutions ``%u`` (username) and ``%c`` (client
    id): ``AclTemplate("paku/%u/#", "write")`` becomes ``pattern write paku/%u/#``.
    """

    pattern: str
    access: Literal["read", "write", "readwrite", "deny"] = "readwrite"

    def __post_init__(self) -> None:
        if self.access not in ("read", "write", "readwrite", "deny"):
            raise ValueError(f"ACL access must be read/write/readwrite/deny, not {self.access!r}")
        if not self.pattern or any(c in self.pattern for c in "\n\r\x00") or self.pattern != self.pattern.strip():
            raise ValueError(f"bad ACL pattern {self.pattern!r}")


@dataclass(frozen=True)
class BrokerAccount:
    """A device's broker login. Only the ``$7$`` hash is kept (see :func:`hash_password`)."""

    username: str
    password_hash: str

    def __post_init__(self) -> None:
        # The username is substituted for %u in topics and written into passwd/acl, so
        # keep it to characters that cannot change a topic's shape or a file's lines.
        if not _USERNAME_RE.match(self.username):
            raise ValueError(f"broker username must match {_USERNAME_RE.pattern}: {self.username!r}")
        if self.username == GATEWAY_USERNAME:
            raise ValueError(f"{GATEWAY_USERNAME!r} is the gateway's own account")
        if not is_password_hash(self.password_hash):
            raise ValueError(f"password_hash for {self.username!r} is not a $7$ hash (use hash_password)")

    def __repr__(self) -> str:
        return f"BrokerAccount(username={self.username!r}, password_hash=<hidden>)"


def find_mosquitto(explicit: str | None = None) -> str | None:
    """The mosquitto binary: ``explicit`` (a path, or a name looked up on PATH and in /usr/sbin)."""
    name = explicit or "mosquitto"
    if os.sep in name:
        return name if os.access(name, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    # Debian puts it in /usr/sbin, which is not on a non-root user's PATH.
    for candidate in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _write_atomic(path: Path, text: str, mode: int) -> None:
    # mosquitto may re-read on SIGHUP at any moment: never let it see half a file. A
    # temporary name of its own per write: two writers never share (or rename away)
    # each other's half-written file.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ManagedBroker:
    """Runs and supervises the gateway's own mosquitto.

    ``state`` is one of ``"new"``, ``"starting"``, ``"running"``, ``"restarting"``,
    ``"unavailable"`` (no mosquitto binary), ``"stopped"``; ``last_error`` is the latest
    failure (exit code and mosquitto's last log line), for /health.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        socket: str | os.PathLike[str] | None = None,
        acl_templates: Sequence[AclTemplate] = (),
        accounts: Iterable[BrokerAccount] = (),
        mosquitto: str | None = None,
        autosave_interval: int = 10,
        max_queued_messages: int = 100_000,
        max_inflight_messages: int = 256,
        max_packet_size: int = 0,
        startup_timeout: float = 10.0,
        reload_hold_max: float = 120.0,
        restart_min: float = 0.5,
        restart_max: float = 60.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.host = host
        self.port = port
        self.socket = str(socket) if socket is not None else None
        if self.socket is not None and len(os.fsencode(self.socket)) > _SUN_PATH_MAX:
            raise ValueError(f"the broker socket path is over {_SUN_PATH_MAX} bytes: {self.socket}")
        self.mosquitto = mosquitto
        self.autosave_interval = autosave_interval
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.max_packet_size = max_packet_size
        self.startup_timeout = startup_timeout
        self.reload_hold_max = reload_hold_max
        self.restart_min = restart_min
        self.restart_max = restart_max
        self.log = logger or log
        self._quiet = QuietLog(self.log)
        self.state = "new"
        self.last_error: str | None = None
        self.restarts = 0
        self.reload_pending = False
        self._gateway_seen = False  # has the gateway connected to this mosquitto process?
        self._templates: tuple[AclTemplate, ...] = tuple(acl_templates)
        self._accounts: dict[str, BrokerAccount] = {a.username: a for a in accounts}
        self._process: trio.Process | None = None

    # --- files --------------------------------------------------------------------------

    @property
    def conf_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def address(self) -> tuple[str, int] | str:
        """Where mosquitto listens: the path of its unix socket, or (host, port)."""
        return self.socket if self.socket is not None else (self.host, self.port)

    @property
    def where(self) -> str:
        return self.socket if self.socket is not None else f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running mosquitto's pid, if any."""
        return self._process.pid if self._process and self._process.returncode is None else None

    def gateway_credentials(self) -> tuple[str, str]:
        """(username, password) of the gateway's own account; the password is made once."""
        self.directory.mkdir(parents=True, exist_ok=True)
        secret = self.directory / "gatewayd.secret"
        if not secret.exists():
            _write_atomic(secret, secrets.token_urlsafe(32) + "\n", 0o600)
        return GATEWAY_USERNAME, secret.read_text().strip()

    def set_accounts(self, accounts: Iterable[BrokerAccount]) -> None:
        """Replace the device accounts; rewrites passwd and reloads a running mosquitto."""
        self._accounts = {a.username: a for a in accounts}
        self._write_credentials()
        self.reload()

    def add_account(self, account: BrokerAccount) -> None:
        """Add or replace one device account (and reload)."""
        self.set_accounts([*(a for a in self._accounts.values() if a.username != account.username), account])

    def reload(self) -> None:
        """SIGHUP mosquitto so it re-reads passwd and acl; connected clients stay.

        Deferred (``reload_pending``) while the gateway has not yet reconnected to a
        freshly started mosquitto: see the module docstring.
        """
        if self.pid is None:
            return  # the files are read at start
        if not self._gateway_seen:
            if not self.reload_pending:
                self.log.info("credential reload deferred until the gateway's MQTT session reconnects")
            self.reload_pending = True
            return
        self._sighup()

    def _sighup(self) -> None:
        self.reload_pending = False
        if self.pid is not None:
            self.log.info("reloading mosquitto credentials and ACLs (SIGHUP)")
            os.kill(self.pid, signal.SIGHUP)

    def _gateway_connected(self) -> None:
        self._gateway_seen = True
        if self.reload_pending:
            self._sighup()

    async def _release_reload_hold(self, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(self.reload_hold_max)
        if not self._gateway_seen and not scope.cancel_called:
            self.log.warning("the gateway has not reconnected to mosquitto; applying credential changes anyway")
            self._gateway_connected()

    def write_config(self) -> None:
        """Write mosquitto.conf, passwd and acl (done by :meth:`run` too)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # its socket, passwords and queued messages: ours alone
        (self.directory / "data").mkdir(exist_ok=True)
        d = self.directory.resolve()
        lines = [
            "# Written by gatewayd (ManagedBroker) at every start: edits are overwritten.",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {d / 'passwd'}",
            f"acl_file {d / 'acl'}",
            # Queued messages of persistent sessions survive a broker restart; the
            # autosave bounds what a mosquitto crash (not a clean stop) can lose.
            "persistence true",
            f"persistence_location {d / 'data'}/",
            f"autosave_interval {self.autosave_interval}",
            # What devices publish while the gateway is down waits here for it.
            f"max_queued_messages {self.max_queued_messages}",
            f"max_inflight_messages {self.max_inflight_messages}",
            *([f"max_packet_size {self.max_packet_size}"] if self.max_packet_size else []),
            # As root mosquitto would switch to user 'mosquitto' and could not read
            # the 0600 files we wrote: stay who we are.
            f"user {getpass.getuser()}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp false",
            "connection_messages true",
            # Listener options from here on: before the first 'listener' line, mosquitto
            # would open a default listener on port 1883 of every interface for them.
            f"listener 0 {self.socket}" if self.socket is not None else f"listener {self.port} {self.host}",
            # A client's id is its username: a device cannot take over the gateway's
            # session or another device's by connecting under its client id.
            "use_username_as_clientid true",
            "",
        ]
        _write_atomic(self.conf_path, "\n".join(lines), 0o644)
        self._write_credentials()

    def _write_credentials(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        user, password = self.gateway_credentials()
        entries = [f"{user}:{hash_password(password)}"]
        entries += [f"{a.username}:{a.password_hash}" for a in self._accounts.values()]
        _write_atomic(self.directory / "passwd", "\n".join(entries) + "\n", 0o600)
        # 'pattern' lines apply to every client; keep them before any 'user' block.
        acl = ["# Written by gatewayd (ManagedBroker): edits are overwritten."]
        acl += [f"pattern {t.access} {t.pattern}" for t in self._templates]
        acl += ["", f"user {user}", "topic readwrite #", ""]
        _write_atomic(self.directory / "acl", "\n".join(acl), 0o600)

    # --- supervision --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run mosquitto until cancelled, restarting it with backoff when it exits.

        Started = the listener accepts TCP connections, or the first start attempt
        failed/timed out (then ``state``/``last_error`` say why and it keeps retrying):
        the gateway must not hang at start because of its broker.
        """
        binary = find_mosquitto(self.mosquitto)
        if binary is None:
            self.state = "unavailable"
            self.last_error = "mosquitto is not installed"
            self.log.error(
                "mosquitto not found: the managed MQTT broker is unavailable "
                "(install it with: apt-get install mosquitto), or set mqtt.broker = \"external\""
            )
            task_status.started()
            await trio.sleep_forever()
        self.write_config()
        await self._stop_stale()
        delay = self.restart_min
        first = True
        try:
            while True:
                self.state = "starting" if first else "restarting"
                began = time.monotonic()
                await self._run_once(binary, task_status if first else None)
                first = False
                if time.monotonic() - began > 30:
                    delay = self.restart_min  # it ran fine for a while: not a crash loop
                self.restarts += 1
                self.state = "restarting"
                self.log.warning("mosquitto exited (%s); restarting in %.1f s", self.last_error, delay)
                await trio.sleep(delay * (0.75 + secrets.randbelow(500) / 1000))
                delay = min(delay * 2, self.restart_max)
        finally:
            self.state = "stopped"

    async def _run_once(self, binary: str, task_status: trio.TaskStatus[None] | None) -> None:
        if self.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket)  # left by a mosquitto that crashed: it would refuse to bind
        proc = await trio.lowlevel.open_process(
            [binary, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._process = proc
        # Only a session restored from disk needs protecting (see the module docstring).
        self._gateway_seen = not (self.directory / "data" / "mosquitto.db").exists()
        _write_atomic(self.directory / "mosquitto.pid", f"{proc.pid}\n", 0o644)
        tail: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relay_output, proc, tail)
                hold = trio.CancelScope()
                nursery.start_soon(self._release_reload_hold, hold)
                ready = await self._wait_ready(proc)
                if ready:
                    self.state = "running"
                    self.log.info("mosquitto listening on %s (pid %d)", self.where, proc.pid)
                elif proc.returncode is None:
                    self.last_error = f"mosquitto did not accept connections within {self.startup_timeout:.0f} s"
                if task_status is not None:
                    task_status.started()
                await proc.wait()
                hold.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._terminate(proc)
            self._process = None
        last = tail[-1] if tail else "no output"
        self.last_error = f"exit code {proc.returncode}: {last}"

    async def _wait_ready(self, proc: trio.Process) -> bool:
        with trio.move_on_after(self.startup_timeout):
            while proc.returncode is None:
                try:
                    if self.socket is not None:
                        stream: trio.abc.Stream = await trio.open_unix_socket(self.socket)
                    else:
                        stream = await trio.open_tcp_stream(self.host, self.port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                # The port may belong to another broker (e.g. the system mosquitto):
                # only ours counts, so check it is still alive.
                await trio.sleep(0.05)
                return proc.poll() is None
        return False

    async def _relay_output(self, proc: trio.Process, tail: list[str]) -> None:
        assert proc.stdout is not None
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                tail[:] = [*tail[-4:], line]
                if line.startswith("New client connected") and line.endswith(f"u'{GATEWAY_USERNAME}')."):
                    self._gateway_connected()
                if line.startswith(_PER_CLIENT):
                    # One line per device connection, its end, its socket errors: the
                    # edge counts these (and a reconnecting or hostile client must not
                    # fill the log). Our own readiness probes are among them.
                    self.log.debug("mosquitto: %s", line)
                    continue
                level = logging.WARNING if "Error" in line or "Warning" in line else logging.INFO
                self._quiet(line[:40], level, "mosquitto: %s", line)

    async def _terminate(self, proc: trio.Process) -> None:
        if proc.returncode is not None:
            return
        proc.terminate()  # SIGTERM: mosquitto saves its persistence file and exits
        with trio.move_on_after(5):
            await proc.wait()
            return
        proc.kill()
        await proc.wait()

    async def _stop_stale(self) -> None:
        # A gatewayd that was killed hard leaves its mosquitto running on our port; stop
        # it if, and only if, it is a mosquitto started with our config file.
        pidfile = self.directory / "mosquitto.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
        except (OSError, ValueError):
            return
        if any(b"mosquitto" in part for part in cmdline[:1]) and str(self.conf_path).encode() in cmdline:
            self.log.warning("stopping a stale mosquitto (pid %d) left by a previous run", pid)
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    await trio.sleep(0.1)
                    os.kill(pid, 0)
            except ProcessLookupError:
                pass
