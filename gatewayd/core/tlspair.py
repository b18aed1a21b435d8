"""The server certificate and its key, changed as one: a pair that is never half-renewed.

`gatewayd tls init` over an existing certificate used to replace `server.key` and
`server.crt` with two renames: a crash between them left a key that was not the
certificate's, and the gateway refused to start. Now each pair is a folder of its own,
written whole before anything points at it, and one symlink says which pair is served:

    tls/pair-7/server.crt, server.key    a pair, never changed once complete
    tls/current -> pair-7                what the gateway serves (switched by one rename)
    tls/server.crt -> current/server.crt and server.key -> current/server.key
                                         the names people and tools know

A renewal: write `.pair-8.partial/`, sync it, rename it to `pair-8/` (complete), point
`current.new` at it and rename that over `current` (the switch: one atomic rename), then
make the two compatibility links (first time only) and delete the pairs older than the
previous one (kept for a look back). The loader (`served_pair`) reads `current` once
and both files from the folder it names, so what it reads is one pair at every instant.

`recover` (at every start of the gateway and before every `tls init`) finishes what a
crash interrupted, saying so in the log: an unfinished `.pair-N.partial` is deleted (the
previous pair is still served); a complete pair newer than `current` whose key is its
certificate's (the crash came between the folder's rename and the switch) is switched
to, as the renewal meant. Before the first pair, the two renames of earlier releases
are finished where they can be (`server.key` replaced, `server.crt.tmp` its
certificate) and named where they cannot. Plain files put where the two links belong
after the switch (someone's own certificate, `mv`ed there) are kept, not served, and named.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .logs import get_logger

__all__ = ["PAIR_STEPS", "install_pair", "key_matches", "recover", "served_pair"]

log = get_logger("gatewayd.tls")

PAIR = re.compile(r"pair-(\d+)")
PARTIAL = re.compile(r"\.pair-(\d+)\.partial")
CURRENT = "current"
#: The steps of a renewal, in order; a crash may come after any of them (tests interrupt
#: the renewal at each).
PAIR_STEPS = ("written", "complete", "switched", "linked", "pruned")


def _checkpoint(step: str) -> None:
    """After each step of `install_pair`: nothing here (tests stop the process at each)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)  # whatever the umask


def _link(directory: Path, name: str, target: str) -> None:
    """`directory/name` -> `target` (relative), replacing what is there in one rename."""
    tmp = directory / f"{name}.new"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, directory / name)


def _pairs(directory: Path) -> dict[int, Path]:
    try:
        return {int(m.group(1)): p for p in directory.iterdir()
                if (m := PAIR.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()}
    except OSError:
        return {}


def _current(directory: Path) -> int | None:
    try:
        m = PAIR.fullmatch(os.readlink(directory / CURRENT))
    except OSError:
        return None
    return int(m.group(1)) if m else None


def key_matches(cert_path: Path, key_path: Path) -> bool:
    """The key file is the certificate file's (both readable PEM); False otherwise."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    return bool(cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki))


def served_pair(directory: Path) -> tuple[Path, Path] | None:
    """The certificate and key files `current` names (read once), or None when this
    folder has no pair yet (a certificate made before pairs: `server.crt|key` themselves)."""
    try:
        target = os.readlink(directory / CURRENT)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OSError(e.errno, f"{directory / CURRENT} is not a link to a certificate pair ({e.strerror})") from None
    pair = directory / target
    return pair / "server.crt", pair / "server.key"


def install_pair(directory: Path, cert: bytes, key: bytes) -> Path:
    """Serve `cert` and `key` from now on, switched as one (see the module's doc)."""
    recover(directory)
    number = max([*_pairs(directory), _current(directory) or 0, 0]) + 1
    staging = directory / f".pair-{number}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o755)
    _write(staging / "server.key", key, 0o600)
    _write(staging / "server.crt", cert, 0o644)
    _fsync_dir(staging)
    _checkpoint("written")
    pair = directory / f"pair-{number}"
    os.rename(staging, pair)
    _fsync_dir(directory)
    _checkpoint("complete")
    _link(directory, CURRENT, pair.name)
    _fsync_dir(directory)
    _checkpoint("switched")
    _compat_links(directory)
    _checkpoint("linked")
    _prune(directory, number)
    _checkpoint("pruned")
    return pair


def _compat_links(directory: Path) -> None:
    """`server.crt` and `server.key` as links into `current` (replacing the files a
    gateway made before pairs: the loader reads `current`, so either order is safe)."""
    for name in ("server.crt", "server.key"):
        target = f"{CURRENT}/{name}"
        path = directory / name
        if not (path.is_symlink() and os.readlink(path) == target):
            _link(directory, name, target)
    _fsync_dir(directory)


def _prune(directory: Path, current: int) -> None:
    for number, path in _pairs(directory).items():
        if number < current - 1:  # the previous pair stays, for a look back
            shutil.rmtree(path, ignore_errors=True)


def _recover_before_pairs(directory: Path, matches: Callable[[Path, Path], bool]) -> list[str]:
    """What the two renames of a gateway made before pairs leave: `server.key` replaced,
    and `server.crt.tmp` (its certificate) written but not yet renamed; or leftovers."""
    crt, key = directory / "server.crt", directory / "server.key"
    crt_tmp, key_tmp = directory / "server.crt.tmp", directory / "server.key.tmp"
    done = []
    if crt_tmp.is_file() and key.is_file() and not matches(crt, key) and matches(crt_tmp, key):
        os.replace(crt_tmp, crt)
        _fsync_dir(directory)
        done.append("renamed server.crt.tmp to server.crt: a renewal was interrupted between its two renames "
                    "(server.key was the new one); the new certificate is served")
    for leftover in (crt_tmp, key_tmp):
        if leftover.is_file():
            leftover.unlink()
            done.append(f"deleted {leftover.name}, left by an interrupted renewal")
    if key.is_file() and crt.is_file() and not matches(crt, key):
        log.error("tls: an interrupted renewal cannot be finished", tls_dir=str(directory),
                  problem="server.key is not the key of server.crt (the new certificate was never written): run "
                          "`gatewayd tls init` again (the site CA is kept: devices still trust the gateway)")
    return done


def _placed_after_switch(directory: Path, links: list[Path]) -> list[str]:
    """Plain files where the compatibility links belong, put there after `current` was
    switched (a later change time: `mv`, `install`, a release before pairs): someone's own,
    not the files a renewal interrupted before its links left behind (older than the switch)."""
    try:
        switched = os.lstat(directory / CURRENT).st_ctime_ns
        return [p.name for p in links if not p.is_symlink() and p.is_file() and p.stat().st_ctime_ns > switched]
    except OSError:
        return []


def recover(directory: Path, matches: Callable[[Path, Path], bool] = key_matches) -> list[str]:
    """Finish or undo a renewal a crash interrupted; each action logged and returned."""
    if not directory.is_dir():
        return []
    done: list[str] = []
    for path in directory.iterdir():
        if PARTIAL.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"deleted {path.name}, a certificate pair a crash left half-written; the previous "
                        "certificate is served (run `gatewayd tls init` again to renew)")
        elif path.name in (f"{CURRENT}.new", "server.crt.new", "server.key.new") and path.is_symlink():
            path.unlink()
    current = _current(directory)
    if current is None:
        done += _recover_before_pairs(directory, matches)
    newer = sorted((n for n in _pairs(directory) if current is None or n > current), reverse=True)
    for number in newer:
        pair = _pairs(directory)[number]
        if matches(pair / "server.crt", pair / "server.key"):
            _link(directory, CURRENT, pair.name)
            _fsync_dir(directory)
            done.append(f"switched to {pair.name}: a renewal was interrupted after its new certificate was "
                        "complete; it is served now")
            break
        shutil.rmtree(pair, ignore_errors=True)
        done.append(f"deleted {pair.name}: its key is not its certificate's (an interrupted renewal)")
    if _current(directory) is not None:
        links = [(directory / n) for n in ("server.crt", "server.key")]
        if placed := _placed_after_switch(directory, links):
            log.error("tls: files put where the links into `current` belong are not served (and kept)",
                      tls_dir=str(directory), files=", ".join(placed),
                      problem="the gateway serves the pair `current` names; for a certificate of your own set "
                              "tls.cert and tls.key to it, or move these files away to have the links made again")
        elif not all(p.is_symlink() for p in links):
            _compat_links(directory)
            if not done:  # (after a switch just above, the links are part of it)
                done.append("linked server.crt and server.key to the served pair (a renewal was interrupted "
                            "after its switch)")
        _prune(directory, _current(directory) or 0)
    for line in done:
        log.warning("tls: recovered an interrupted renewal", tls_dir=str(directory), action=line)
    return done
