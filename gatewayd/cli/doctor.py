"""`gatewayd doctor`: check a site box before the installer leaves.

Each check ends `ok`, `warn` (worth knowing, not wrong), `fail` (a real problem) or
`skip` (nothing to check here, or it cannot be decided on this box). The exit status is
1 when any check failed, else 0: warnings and skipped checks never fail the doctor.
`--json` prints the same report for tooling.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import errno
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal

from ..core.config import Config, ConfigErrors
from ..core.schema import Address, read_secret
from ..core.storage import unusable_message
from ..plugins.manager import PluginManager
from .context import config_path, load
from .doctor_options import setup_doctor

__all__ = ["Check", "run_checks", "setup_doctor", "cmd_doctor"]

Status = Literal["ok", "warn", "fail", "skip"]

#: The device specifications tolerate a clock this far off.
MAX_SKEW_S = 120.0
#: Free disk below this fails whatever the outbox's capacity.
MIN_FREE_BYTES = 100 << 20



@dataclass
class Check:
    name: str
    status: Status
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def cmd_doctor(args: argparse.Namespace, manager: PluginManager) -> int:
    checks = run_checks(args, manager)
    failed = [c for c in checks if c.status == "fail"]
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"[{marks[c.status]}] {c.name:<{width}}  {c.message}")
        warned = sum(c.status == "warn" for c in checks)
        print(f"\n{len(failed)} problem(s), {warned} warning(s)" if failed or warned else "\nall checks passed")
    return 1 if failed else 0


def run_checks(args: argparse.Namespace, manager: PluginManager) -> list[Check]:
    try:
        config = load(args, manager)
    except ConfigErrors as e:
        where = config_path(args) or "built-in defaults"
        return [Check("config", "fail", f"{where}: {len(e.errors)} error(s): " + "; ".join(str(x) for x in e.errors),
                      {"errors": [str(x) for x in e.errors]})]
    checks = [Check("config", "ok", f"{config_path(args) or 'built-in defaults'} is valid")]
    for step in (_ports, _data_dir, _database, _backup_dir, _service_paths, _mosquitto, _master_key, _tls, _serial, _smtp):
        try:
            checks += step(config, manager)
        except Exception as e:  # noqa: BLE001 - a broken check is reported, the others still run
            checks.append(Check(step.__name__.strip("_"), "fail", f"the check itself failed: {e!r}"))
    if args.no_network:
        checks.append(Check("upstream", "skip", "--no-network"))
        checks.append(_clock(config, None))
    else:
        upstream, skew = _upstream(config, args.timeout)
        checks += upstream
        checks.append(_clock(config, skew))
    return checks


# -- listeners -------------------------------------------------------------------------


def _listeners(config: Config) -> list[tuple[str, str, Address]]:
    out = [("http", "http.listen", config.http.listen)]
    if config.mqtt.broker == "managed":
        if config.tls.mqtt_plain:
            out.append(("mqtt", "mqtt.listen", config.mqtt.listen))
        if config.tls.mqtt_listen is not None:
            out.append(("mqtt-tls", "tls.mqtt_listen", config.tls.mqtt_listen))
    for name, settings in config.plugins.items():
        if settings.enabled and settings.listen is not None:
            out.append((f"plugin {name}", f"plugins.{name}.listen", settings.listen))
    return out


def _ports(config: Config, manager: PluginManager) -> list[Check]:
    health = None  # this gateway's /health, if it holds the main listener
    checks = []
    for label, key, address in _listeners(config):
        error = _try_bind(address)
        if error is None:
            checks.append(Check(f"port {label}", "ok", f"{address} ({key}) is free"))
            continue
        if error.errno == errno.EADDRINUSE:
            if health is None:
                health = _own_health(config) or {}
            if _held_by_us(label, address, config, health):
                checks.append(Check(f"port {label}", "ok", f"{address} ({key}) is held by this gateway (running)"))
            else:
                checks.append(Check(f"port {label}", "fail", f"{address} ({key}) is in use by another program "
                                                             f"(ss -ltnp 'sport = :{address.port}' names it)"))
        elif error.errno == errno.EACCES:
            checks.append(Check(f"port {label}", "fail", f"{address} ({key}): permission denied (a port below "
                                                         "1024 needs CAP_NET_BIND_SERVICE, which the service unit "
                                                         "grants)"))
        else:
            checks.append(Check(f"port {label}", "fail", f"{address} ({key}): {error.strerror or error}"))
    return checks


def _try_bind(address: Address) -> OSError | None:
    host = address.host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon binds
            s.bind((host, address.port))
            s.listen(1)  # bind alone succeeds on a port another socket listens on, with SO_REUSEADDR
    except OSError as e:
        return e
    return None


def _own_health(config: Config) -> dict[str, Any] | None:
    import httpx

    listen = config.http.listen
    host = "127.0.0.1" if listen.host in ("", "0.0.0.0") else ("::1" if listen.host == "::" else listen.host)
    scheme = "https" if config.tls.http else "http"
    url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{listen.port}/health"
    try:
        r = httpx.get(url, timeout=3, verify=False)  # identifying the listener, not trusting it
        doc = r.json()
    except (httpx.HTTPError, ValueError):
        # Behind tls.client_auth = "required" the doctor has no client certificate to
        # show: the listener is this gateway's if it serves this gateway's certificate.
        if config.tls.http and config.tls.client_auth != "none" and _serves_our_certificate(config, host, listen.port):
            return {"components": {}, "identified_by": "certificate"}
        return None
    return doc if isinstance(doc, dict) and "components" in doc else None


def _serves_our_certificate(config: Config, host: str, port: int) -> bool:
    import ssl

    from ..core.tls import SiteTls

    try:
        ours = ssl.PEM_cert_to_DER_cert(SiteTls.from_config(config).cert.read_text())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # identifying, not trusting
        with socket.create_connection((host, port), timeout=3) as raw, ctx.wrap_socket(raw) as tls:
            # TLS 1.3: the client's handshake ends before the server refuses the missing
            # client certificate, so the server's certificate is seen.
            return tls.getpeercert(binary_form=True) == ours
    except (OSError, ValueError, ssl.SSLError):
        return False


def _held_by_us(label: str, address: Address, config: Config, health: dict[str, Any]) -> bool:
    if not health:
        return False
    if label == "http" or health.get("identified_by") == "certificate":
        return True  # (by its certificate: the main listener is ours, its /health closed to the doctor)
    broker = health.get("components", {}).get("mqtt_broker", {})
    if label == "mqtt":
        return bool(broker.get("listen") == str(address))
    if label == "mqtt-tls":
        return bool(broker.get("tls_listen") == str(address))
    return True  # a plugin's listener, with the main one answering as this gateway


# -- disk ------------------------------------------------------------------------------


def _data_dir(config: Config, manager: PluginManager) -> list[Check]:
    data = config.data_dir
    existing = data
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [Check("data dir", "fail", f"{data}: {existing} is not a folder (gateway.data_dir)")]
    if not data.exists():
        if not os.access(existing, os.W_OK):
            return [Check("data dir", "fail", f"{data} does not exist and {existing} is not writable by "
                                              f"{_user()}")]
        checks = [Check("data dir", "warn", f"{data} does not exist yet (made at the first start)")]
    else:
        try:
            probe = data / f".doctor-{os.getpid()}"
            probe.write_bytes(b"x")
            probe.unlink()
            checks = [Check("data dir", "ok", f"{data} is writable by {_user()}")]
        except OSError as e:
            return [Check("data dir", "fail", f"{data} is not writable by {_user()}: {e.strerror}")]
    usage = shutil.disk_usage(existing)
    db = data / "gatewayd.sqlite3"
    used = sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())
    need = config.outbox.max_bytes
    details = {"free_bytes": usage.free, "database_bytes": used, "outbox_max_bytes": need}
    free_mb, need_mb = usage.free >> 20, need >> 20
    if usage.free < MIN_FREE_BYTES:
        checks.append(Check("disk", "fail", f"only {free_mb} MiB free under {existing}", details))
    elif usage.free + used < need:
        checks.append(Check("disk", "fail", f"{free_mb} MiB free under {existing}, but the outbox may grow to "
                                            f"{need_mb} MiB (outbox.max_bytes): lower it or free space", details))
    else:
        checks.append(Check("disk", "ok", f"{free_mb} MiB free, room for the outbox's {need_mb} MiB "
                                          "(outbox.max_bytes)", details))
    return checks


def _database(config: Config, manager: PluginManager) -> list[Check]:
    """The database opens and passes SQLite's quick_check (read-only; the running
    gateway's writes go on): a corrupt file stops every start."""
    db = config.data_dir / "gatewayd.sqlite3"
    if not db.exists():
        return [Check("database", "skip", f"{db} does not exist yet (made at the first start)")]
    if not os.access(db, os.R_OK):
        return [Check("database", "fail", f"{db} is not readable by {_user()}")]
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
            versions = dict(conn.execute("SELECT component, version FROM core_schema")) \
                if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'core_schema'").fetchone() else {}
        conn.close()
    except sqlite3.DatabaseError as e:
        return [Check("database", "fail", unusable_message(db, str(e)))]
    if problems != ["ok"]:
        return [Check("database", "fail", unusable_message(db, "quick_check: " + "; ".join(problems)),
                      {"quick_check": problems})]
    if newer := _newer_schemas(versions, manager):
        return [Check("database", "fail", f"{db} was migrated by a newer release ({'; '.join(newer)}): this "
                                          "gatewayd refuses to start on it; install that release again, or restore "
                                          "the copy taken before it migrated (backup.dir, gatewayd-pre-upgrade-*)",
                      {"schemas": versions})]
    return [Check("database", "ok", f"{db}: quick_check ok, {_db_size(db) >> 20} MiB, {len(versions)} component "
                                    "schema(s)", {"schemas": versions})]


def _newer_schemas(versions: dict[str, int], manager: PluginManager) -> list[str]:
    """`component: schema version N, newer than this gatewayd's M` for each component the
    database holds at a later version than this release (its core and loaded plugins) knows."""
    from ..core.runtime import core_schema_versions

    known = core_schema_versions()
    for name in manager.names:
        if manager.is_loaded(name):
            try:
                registry = manager.storage_models(name)
            except Exception:  # noqa: BLE001 - a plugin's own failure is the gateway's to report
                continue
            if registry.models:
                known[name] = registry.version
    return [f"{c}: schema version {v}, newer than this gatewayd's {known[c]}"
            for c, v in sorted(versions.items()) if c in known and v > known[c]]


def _backup_dir(config: Config, manager: PluginManager) -> list[Check]:
    """`backup.dir` holds the daemon's copies and the one taken before a migration:
    a writable folder (or one that can be made) with room for a copy of the database."""
    from ..core.backup import backup_dir
    from ..core.backupdir import mount_problem, mount_required, space_needed

    directory = backup_dir(config.backup, config.data_dir, config.source.parent if config.source else None)
    what = "backup.dir" if config.backup.dir else "backup.dir (default)"
    if (mount_required(directory, config.backup.require_mount, config.data_dir)
            and (problem := mount_problem(directory, config.data_dir))):
        return [Check("backup dir", "fail", problem, {"dir": str(directory), "require_mount": True})]
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [Check("backup dir", "fail", f"{directory} ({what}): {existing} is a file, not a folder")]
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "is" if existing == directory else f"does not exist and {existing} is"
        return [Check("backup dir", "fail", f"{directory} ({what}) {verb} not writable by {_user()}")]
    db = config.data_dir / "gatewayd.sqlite3"
    need, free = space_needed(db, existing), shutil.disk_usage(existing).free
    details = {"dir": str(directory), "free_bytes": free, "needed_bytes": need, "keep": config.backup.keep}
    if free < need:
        return [Check("backup dir", "fail", f"{directory} ({what}): {free >> 20} MiB free, a copy of the database "
                                            f"needs {need >> 20} MiB: free space or point backup.dir at a larger "
                                            "disk", details)]
    # The peak: keep + 1 daily copies (the oldest goes after the new one passed) beside
    # keep_pre_upgrade copies taken before migrations, or keep daily copies beside
    # keep_pre_upgrade + 1 at an upgrade's start: keep + keep_pre_upgrade + 1 in both.
    # Those already there take space now.
    from ..core.backup import list_backups
    from ..core.backupdir import list_pre_upgrade

    present = (list_backups(directory) + list_pre_upgrade(directory)) if directory.is_dir() else []
    held = sum(p.stat().st_size for p in present)
    copy = _db_size(db)
    daily = config.backup.keep if config.backup.interval_s else 0
    count = daily + config.backup.keep_pre_upgrade + 1
    peak = count * copy
    details.update(keep_pre_upgrade=config.backup.keep_pre_upgrade, held_bytes=held, peak_bytes=peak)
    if peak > free + held:
        keeps = (f"backup.keep = {config.backup.keep} and " if daily else "") + \
            f"backup.keep_pre_upgrade = {config.backup.keep_pre_upgrade}"
        return [Check("backup dir", "warn", f"{directory} ({what}): {keeps} mean {count} copies of {copy >> 20} MiB "
                                            f"at the peak, {peak >> 20} MiB; {(free + held) >> 20} MiB are there "
                                            f"(free, and the {len(present)} copies already taken): lower "
                                            f"{'backup.keep or ' if daily else ''}backup.keep_pre_upgrade or point "
                                            "backup.dir at a larger disk (a copy that does not fit is refused; a "
                                            "start that needs to migrate then refuses to)", details)]
    made = "" if existing == directory else " (made at the first backup)"
    off = "; backups are off (backup.interval_s = 0), the copy before a migration still goes here" \
        if not config.backup.interval_s else ""
    return [Check("backup dir", "ok", f"{directory} is writable{made}, {free >> 20} MiB free for copies of "
                                      f"{need >> 20} MiB{off}", details)]


#: The installed service unit (scripts/install's wrapper says where it put it).
DEFAULT_UNIT = "/etc/systemd/system/gatewayd.service"


def _service_paths(config: Config, manager: PluginManager) -> list[Check]:
    """Under the unit's ProtectSystem=strict only ReadWritePaths= are writable: a
    data_dir or backup.dir elsewhere (a USB stick) is writable to the doctor, run
    outside the sandbox, and read-only to the service."""
    unit = Path(os.environ.get("GATEWAYD_UNIT") or DEFAULT_UNIT)
    if not unit.is_file():
        return [Check("service paths", "skip", f"no service unit at {unit}")]
    writable = _read_write_paths(unit)
    from ..core.backup import backup_dir

    wanted = [("gateway.data_dir", config.data_dir),
              ("backup.dir", backup_dir(config.backup, config.data_dir, config.source.parent if config.source else None))]
    closed = [(key, path) for key, path in wanted
              if not any(_under(path, w) for w in writable)]
    details = {"unit": str(unit), "read_write_paths": [str(w) for w in writable]}
    if closed:
        return [Check("service paths", "fail", "; ".join(
            f"{path} ({key}) is read-only to the service (ProtectSystem=strict)" for key, path in closed)
            + f": add it with `sudo systemctl edit gatewayd` ([Service] ReadWritePaths={closed[0][1]}), "
              "then restart", details)]
    return [Check("service paths", "ok", f"the service may write {', '.join(str(p) for _, p in wanted)} "
                                         f"({unit.name}: ReadWritePaths)", details)]


def _read_write_paths(unit: Path) -> list[Path]:
    """ReadWritePaths= of a unit and its drop-ins (`<unit>.d/*.conf`, in name order); an
    empty assignment resets the list, a leading `-` only makes a path optional."""
    paths: list[Path] = []
    for f in [unit, *sorted(unit.with_name(unit.name + ".d").glob("*.conf"))]:
        try:
            lines = f.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, sep, value = line.strip().partition("=")
            if not sep or key.strip() != "ReadWritePaths":
                continue
            if not value.strip():
                paths = []
            paths += [Path(v.lstrip("-+")) for v in value.split()]
    return paths


def _under(path: Path, top: Path) -> bool:
    path, top = path.resolve(), top.resolve()
    return path == top or top in path.parents


def _db_size(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


# -- mosquitto -------------------------------------------------------------------------


def _mosquitto(config: Config, manager: PluginManager) -> list[Check]:
    from ..core.mqtt.broker import find_mosquitto

    if config.mqtt.broker != "managed":
        return [Check("mosquitto", "skip", f"mqtt.broker = {config.mqtt.broker!r}: the gateway runs no broker")]
    binary = find_mosquitto(config.mqtt.mosquitto)
    if binary is None:
        return [Check("mosquitto", "fail", f"{config.mqtt.mosquitto!r} not found (mqtt.mosquitto): "
                                           "apt-get install mosquitto")]
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [Check("mosquitto", "fail", f"{binary} does not run: {e}")]
    m = re.search(r"mosquitto version (\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    if not m:
        return [Check("mosquitto", "warn", f"{binary}: cannot read its version")]
    version = ".".join(m.groups())
    if int(m.group(1)) < 2:
        return [Check("mosquitto", "fail", f"{binary} is {version}; the gateway needs 2.0 or later (unix socket "
                                           "listeners)", {"version": version})]
    return [Check("mosquitto", "ok", f"{binary} {version}", {"version": version, "path": binary})]


# -- secrets and TLS -------------------------------------------------------------------


def _master_key(config: Config, manager: PluginManager) -> list[Check]:
    env = config.auth.master_key_env
    value = os.environ.get(env) if env else None
    if value:
        try:
            key = base64.b64decode(value.strip(), validate=True)
        except (ValueError, binascii.Error):
            return [Check("master key", "fail", f"{env} is set but is not base64")]
        if len(key) < 32:
            return [Check("master key", "fail", f"{env} holds {len(key)} bytes; at least 32 are needed")]
        return [Check("master key", "ok", f"from {env} (auth.master_key_env); keep a copy off the box")]
    path = config.data_dir / "master.key"
    if path.is_file():
        try:
            key = base64.b64decode(path.read_text().strip())
        except (OSError, ValueError, binascii.Error) as e:
            return [Check("master key", "fail", f"{path} is unreadable: {e}")]
        if len(key) < 32:
            return [Check("master key", "fail", f"{path} is too short ({len(key)} bytes)")]
        if path.stat().st_mode & 0o077:
            return [Check("master key", "warn", f"{path} is readable by others: chmod 600 {path}")]
        return [Check("master key", "ok", f"{path}; keep a copy off the box (backups do not hold it)")]
    devices = _count_devices(config.data_dir / "gatewayd.sqlite3")
    if devices:
        return [Check("master key", "fail", f"no master key ({path}, or ${env}) but {devices} device(s) are "
                                            "provisioned: their secrets cannot be read; restore the key")]
    return [Check("master key", "warn", f"none yet: {path} is made when the first device is provisioned")]


def _smtp(config: Config, manager: PluginManager) -> list[Check]:
    smtp = config.notifications.smtp
    if not smtp.host:
        return [Check("smtp", "skip", "no mail server ([notifications.smtp] host)")]
    if cleartext := smtp.cleartext_login():
        return [Check("smtp", "warn", cleartext, {"host": smtp.host, "port": smtp.port})]
    how = "SSL" if smtp.ssl else "STARTTLS" if smtp.starttls else "cleartext"
    login = f", logs in as {smtp.user!r}" if smtp.user else ", no login"
    return [Check("smtp", "ok", f"{smtp.host}:{smtp.port} over {how}{login}", {"host": smtp.host, "port": smtp.port})]


def _count_devices(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM core_device").fetchone()[0])
    except sqlite3.Error:
        return 0


def _tls(config: Config, manager: PluginManager) -> list[Check]:
    from ..core.tls import SiteTls, TlsError, check_ca, check_served

    site = SiteTls.from_config(config)
    if not site.enabled:
        return [Check("tls", "skip", "no TLS listener configured (tls.http, tls.mqtt_listen); device traffic "
                                     "on the LAN is plain text")]
    site_ca = config.data_dir / "tls" / "ca.crt"
    try:
        site.load()
        # The files `tls init` makes: the certificate chains to the site CA devices pin,
        # and the CA itself is one (with its key). A certificate of one's own (tls.cert):
        # its key only.
        check_served(site.cert, site.key, None if config.tls.cert else site_ca)
        if not config.tls.cert:
            check_ca(site_ca.parent)
    except TlsError as e:
        return [Check("tls", "fail", str(e))]
    state = site.state()
    details = {k: v for k, v in state.details.items()}
    if state.state == "expired":
        return [Check("tls", "fail", state.reason or "expired", details)]
    if state.state == "expiring":
        return [Check("tls", "warn", state.reason or "expiring", details)]
    # A private key others can read: anyone with an account on the box can pose as the
    # gateway (server.key) or issue certificates every device trusts (ca.key).
    keys = [site.key] + ([site_ca.parent / "ca.key"] if not config.tls.cert else [])
    if shared := [str(k) for k in keys if k.is_file() and k.stat().st_mode & 0o077]:
        return [Check("tls", "warn", f"{' and '.join(shared)} readable by others: chmod 600 "
                                     f"{' '.join(shared)}", details)]
    return [Check("tls", "ok", f"{site.cert} valid until {details['expires_at']} ({details['days_left']:.0f} days)",
                  details)]


# -- serial ----------------------------------------------------------------------------


def _serial(config: Config, manager: PluginManager) -> list[Check]:
    links = _serial_links(config, manager)
    if not links:
        return [Check("serial", "skip", "no serial line configured")]
    import serial

    checks = []
    for plugin, name, settings in links:
        label = f"serial {plugin}.{name}"
        try:
            port = serial.serial_for_url(settings.port, baudrate=settings.baudrate, timeout=0, exclusive=True) \
                if "://" not in settings.port else serial.serial_for_url(settings.port, timeout=0)
            port.close()
        except (serial.SerialException, OSError, ValueError) as e:
            busy = "busy" in str(e).lower() or "lock" in str(e).lower()
            checks.append(Check(label, "warn" if busy else "fail",
                                f"{settings.port}: {e}" + (" (held by the running gateway?)" if busy else "")))
            continue
        checks.append(Check(label, "ok", f"{settings.port} opens"))
    return checks


def _serial_links(config: Config, manager: PluginManager) -> list[tuple[str, str, Any]]:
    """Every plugin's serial lines, asked of the plugins as `gatewayd run` does."""
    enabled = [n for n, s in config.plugins.items() if s.enabled and manager.is_loaded(n)
               and manager.implements(n, "gatewayd_serial_links")]
    if not enabled:
        return []
    from ..core.runtime import Gateway

    gateway = Gateway(config, manager)
    gateway._build_contexts()
    out = []
    for name in enabled:
        if name in gateway.contexts:
            for link in manager.serial_links(name, gateway.contexts[name]).links:
                out.append((name, link.name, link.settings))
    return out


# -- upstream and the clock ------------------------------------------------------------


def _upstream(config: Config, timeout: float) -> tuple[list[Check], float | None]:
    if not config.upstream:
        return [Check("upstream", "skip", "no [[upstream]] configured")], None
    checks, skew = [], None
    for entry in config.upstream:
        label = f"upstream {entry.name}"
        if not entry.enabled:
            checks.append(Check(label, "skip", "enabled = false"))
            continue
        if entry.kind == "mqtt":
            checks.append(_mqtt_upstream(config, entry, timeout))
            continue
        check, seen = _http_upstream(config, entry, timeout)
        checks.append(check)
        skew = seen if seen is not None else skew
    return checks, skew


def _http_upstream(config: Config, entry: Any, timeout: float) -> tuple[Check, float | None]:
    """A dry batch (no records), signed as the sync worker signs: proves the sink is
    reachable, the URL right and the secret accepted."""
    import httpx

    from ..protocol.batch import encode_batch
    from ..protocol.retry import parse_response

    label = f"upstream {entry.name}"
    secret = read_secret(entry.secret_env)
    if secret is None:
        return Check(label, "fail", f"environment variable {entry.secret_env} (upstream.secret_env) is not set"), None
    endpoint = entry.url.rstrip("/") + entry.path
    batch = encode_batch([], gateway_id=config.gateway.id, batch_id=str(uuid.uuid4()), secret=secret.encode(),
                         compression=entry.compression, now=time.time())
    verify: bool | str = entry.tls_ca or entry.tls_verify
    try:
        sent = time.time()
        r = httpx.post(endpoint, content=batch.body, headers={**batch.headers, "User-Agent": "gatewayd-doctor"},
                       timeout=timeout, verify=verify, follow_redirects=False)
        received = time.time()
    except httpx.HTTPError as e:
        return Check(label, "fail", f"{endpoint} unreachable: {type(e).__name__}: {e or 'no detail'}"), None
    skew = None
    if "date" in r.headers:
        try:
            skew = (sent + received) / 2 - parsedate_to_datetime(r.headers["date"]).timestamp()
        except (TypeError, ValueError):
            skew = None
    outcome = parse_response(r.status_code, r.headers, r.content, now=time.time())
    details = {"endpoint": endpoint, "status": r.status_code}
    if outcome.kind in ("delivered", "already_delivered"):
        return Check(label, "ok", f"{endpoint} accepted a signed dry batch ({r.status_code})", details), skew
    if r.status_code in (401, 403):
        return Check(label, "fail", f"{endpoint} refused the gateway ({r.status_code}): check "
                                    f"{entry.secret_env} and gateway.id", details), skew
    if r.status_code in (404, 405):
        return Check(label, "fail", f"{endpoint} answered {r.status_code}: check upstream.url (the gateway "
                                    f"appends {entry.path})", details), skew
    return Check(label, "fail", f"{endpoint} answered {r.status_code}: {outcome.reason or ''}".rstrip(": "),
                 details), skew


def _mqtt_upstream(config: Config, entry: Any, timeout: float) -> Check:
    """A real MQTT login with the sink's credentials (and TLS settings). The doctor's
    client id is the sink's with `-doctor` appended: the same id would take the running
    gateway's session over."""
    import ssl
    from urllib.parse import urlsplit

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

    label = f"upstream {entry.name}"
    parts = urlsplit(entry.url)
    secure = parts.scheme == "mqtts"
    host, port = parts.hostname or "", parts.port or (8883 if secure else 1883)
    password = read_secret(entry.password_env)
    if entry.password_env and password is None:
        return Check(label, "fail", f"environment variable {entry.password_env} (upstream.password_env) is not set")
    client_id = (entry.client_id or f"gatewayd-{config.gateway.id}-{entry.name}") + "-doctor"
    answer: dict[str, Any] = {}
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                         reconnect_on_failure=False)
    client.on_connect = lambda c, u, flags, reason, props: answer.setdefault("reason", reason)
    if entry.username:
        client.username_pw_set(entry.username, password)
    details = {"host": host, "port": port, "client_id": client_id, "username": entry.username or None}
    try:
        if secure:
            ctx = ssl.create_default_context(cafile=entry.tls_ca or None)
            if entry.tls_cert:
                ctx.load_cert_chain(entry.tls_cert, entry.tls_key or None)
            client.tls_set_context(ctx)
        client.connect(host, port, keepalive=max(int(timeout) * 2, 10))
        deadline = time.monotonic() + timeout
        while "reason" not in answer and time.monotonic() < deadline:
            if client.loop(timeout=0.2) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break  # closed: some brokers refuse a login by closing the connection
    except (OSError, ssl.SSLError, ValueError) as e:
        return Check(label, "fail", f"{host}:{port} unreachable: {getattr(e, 'strerror', None) or e}", details)
    finally:
        if answer.get("reason") is not None and not answer["reason"].is_failure:
            client.disconnect()
            client.loop(timeout=0.2)  # DISCONNECT sent: the broker does not publish a will
        sock = client.socket()
        if sock is not None:
            sock.close()
    reason = answer.get("reason")
    who = f"as {entry.username}" if entry.username else "anonymously"
    if reason is None:
        return Check(label, "fail", f"{host}:{port} did not accept the login {who} within {timeout:.0f} s (the "
                                    "connection was closed or not answered)", details)
    details["reason"] = str(reason)
    if not reason.is_failure:
        return Check(label, "ok", f"{host}:{port} accepted the gateway's login {who}", details)
    if reason.value == 0x85:  # Client Identifier not valid: a broker that allows only the sink's own id
        return Check(label, "warn", f"{host}:{port} refused the doctor's client id {client_id!r} ({reason}); "
                                    "the login itself is not checked", details)
    return Check(label, "fail", f"{host}:{port} refused the gateway's login {who}: {reason} (check "
                                f"upstream.username and {entry.password_env or 'upstream.password_env'})", details)


def _clock(config: Config, skew: float | None) -> Check:
    if skew is not None and abs(skew) > MAX_SKEW_S:
        return Check("clock", "fail", f"the clock is {skew:+.0f} s off the upstream's (devices tolerate "
                                      f"±{MAX_SKEW_S:.0f} s): fix time synchronisation", {"skew_s": round(skew, 1)})
    synced = _time_daemon()
    details = {"skew_s": round(skew, 1)} if skew is not None else {}
    if synced is True:
        return Check("clock", "ok", "synchronised (NTP)" + (f", {skew:+.1f} s off the upstream" if skew is not None
                                                            else ""), details)
    if synced is False:
        return Check("clock", "warn" if skew is not None else "fail",
                     "the time daemon says the clock is NOT synchronised"
                     + (f" (yet within {skew:+.1f} s of the upstream)" if skew is not None else
                        ": check timedatectl / chronyc; devices tolerate ±2 min"), details)
    if skew is not None:
        return Check("clock", "ok", f"{skew:+.1f} s off the upstream (no time daemon to ask)", details)
    return Check("clock", "skip", "no time daemon to ask (timedatectl, chronyc) and no upstream to compare with")


def _time_daemon() -> bool | None:
    """True/False when systemd-timesyncd (timedatectl) or chrony says; None when neither can."""
    if shutil.which("timedatectl"):
        try:
            out = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                                 text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip() in ("yes", "no"):
                return out.stdout.strip() == "yes"
        except (OSError, subprocess.TimeoutExpired):
            pass
    if shutil.which("chronyc"):
        try:
            out = subprocess.run(["chronyc", "-n", "tracking"], capture_output=True, text=True, timeout=5)
            if out.returncode == 0:
                return "Not synchronised" not in out.stdout and "Leap status     : Normal" in out.stdout
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None
