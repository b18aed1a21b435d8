"""`gatewayd firmware ...`: add, list, rollout, verify, keygen, site-key.

`add` copies the image into `<data_dir>/firmware/`, hashes it, and signs it (`--sign-key`,
or by default the site key, `<data_dir>/firmware-signing.pem`, made on first use) or
verifies a signature made elsewhere (`--signature`, checked against `ota.trusted_keys`
or `--public-key`). Works while the daemon runs (WAL); devices see the new image at
their next check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.ota.store import (
    CHANNELS,
    OTA_SCHEMA,
    OtaError,
    OtaStore,
    SigningError,
    SiteKey,
    generate_keypair,
    load_private_key,
    load_public_key,
)
from ..core.storage import Storage
from .context import add_common_options, load

if TYPE_CHECKING:
    from ..core.config import Config
    from ..plugins.manager import PluginManager

__all__ = ["setup_firmware", "cmd_firmware"]


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage 0-100, got {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage 0-100, got {text!r}")
    return value


def setup_firmware(parser: argparse.ArgumentParser) -> None:
    """Add the `firmware` subcommands."""

    sub = parser.add_subparsers(dest="firmware_command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_common_options(p, sub=True)
        p.set_defaults(firmware_run=name)
        return p

    p = command("add", "store a firmware image: hash it, sign or verify it, set its channel and rollout")
    p.add_argument("file", metavar="FILE", help="the image")
    p.add_argument("--family", required=True, help="the device family (plugin name)")
    p.add_argument("--model", required=True, help="the device model it is for")
    p.add_argument("--version", required=True, help="its semantic version (1.2.3, 1.3.0-beta.1)")
    p.add_argument("--channel", choices=CHANNELS, default="stable")
    p.add_argument("--rollout", type=_percent, metavar="PERCENT",
                   help="offer it to this share of devices (default: ota.rollout.<channel>, 100)")
    p.add_argument("--sign-key", metavar="PATH",
                   help="sign it with this Ed25519 private key (PEM); default: the site key (see site-key)")
    p.add_argument("--signature", metavar="PATH", help="a base64 signature made elsewhere; verified before storing")
    p.add_argument("--public-key", metavar="PATH", action="append", default=[],
                   help="also trust this public key when verifying --signature")
    p.add_argument("--unsigned", action="store_true", help="store it without a signature (not with --sign-key, "
                   "--signature or ota.require_signed)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command("list", "list stored images")
    p.add_argument("--family")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = command("rollout", "change an image's rollout percentage")
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("percent", type=_percent, metavar="PERCENT")
    p = command("verify", "re-hash an image and check its signature")
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--public-key", metavar="PATH", action="append", default=[])
    p = command("keygen", "make an Ed25519 key pair: PATH (private, mode 0600) and PATH.pub")
    p.add_argument("path", metavar="PATH")
    command("site-key", "print the public key of the site signing key, for the devices (made on first use)")


def _store(config: Config, storage: Storage) -> OtaStore:
    trusted = []
    for path in config.ota.trusted_keys:
        full = Path(path) if Path(path).is_absolute() or config.source is None else config.source.parent / path
        trusted.append(load_public_key(full))
    return OtaStore(storage, config.data_dir / "firmware", trusted_keys=trusted,
                    require_signed=config.ota.require_signed, default_rollout=config.ota.rollout,
                    site_key=SiteKey(config.data_dir), sign_by_default=config.ota.sign_with_site_key)


def cmd_firmware(args: argparse.Namespace, manager: PluginManager) -> int:

    try:
        if args.firmware_run == "keygen":
            private, public = generate_keypair(args.path)
            print(f"private key: {private} (keep it off the gateway if you can)\npublic key:  {public}")
            return 0
        config = load(args, manager)
        if args.firmware_run == "site-key":
            return _print_site_key(SiteKey(config.data_dir))
        storage = Storage(config.data_dir / "gatewayd.sqlite3", synchronous=config.storage.synchronous)
        storage.open()
        try:
            storage.install(OTA_SCHEMA)
            return _run(args, _store(config, storage))
        finally:
            storage.close()
    except (OtaError, SigningError) as e:
        print(f"gatewayd: {e}", file=sys.stderr)
        return 1


def _print_site_key(site: SiteKey) -> int:
    from ..core.ota.signing import key_id, public_pem

    public = site.private_key().public_key()
    print(public_pem(public).decode(), end="")
    print(f"key id {key_id(public)}; also in {site.public_path} (the private key: {site.path}, never copy it off)",
          file=sys.stderr)
    return 0


def _run(args: argparse.Namespace, store: OtaStore) -> int:
    if args.firmware_run == "add":
        signature = None
        if args.signature:
            try:
                signature = Path(args.signature).read_text().strip()
            except OSError as e:
                raise OtaError(f"cannot read {args.signature}: {e.strerror}") from None
        fw = store.add_blocking(
            args.file, family=args.family, model=args.model, version=args.version, channel=args.channel,
            rollout_percent=args.rollout, sign_key=load_private_key(args.sign_key) if args.sign_key else None,
            signature=signature, extra_keys=[load_public_key(p) for p in args.public_key], unsigned=args.unsigned,
        )
        if args.json:
            print(json.dumps(fw.as_dict(), indent=2))
        else:
            print(f"firmware {fw.id}: {fw.family}/{fw.model} {fw.version} ({fw.channel}, {fw.rollout_percent:g}%), "
                  f"{fw.size} bytes, sha256 {fw.sha256}" + (f", signed by key {fw.key_id}" if fw.signature else ""))
        return 0
    if args.firmware_run == "list":
        rows = [f for f in store.list_blocking() if not args.family or f.family == args.family]
        if args.json:
            print(json.dumps({"firmware": [f.as_dict() for f in rows]}, indent=2))
            return 0
        if not rows:
            print("no firmware stored (gatewayd firmware add FILE --family F --model M --version V)")
            return 0
        print(f"{'ID':>4} {'FAMILY':<13} {'MODEL':<16} {'VERSION':<14} {'CHANNEL':<7} {'ROLLOUT':>7} {'SIZE':>10} "
              f"{'SIGNED':<6} SHA256")
        for f in rows:
            print(f"{f.id:>4} {f.family:<13} {f.model:<16} {f.version:<14} {f.channel:<7} {f.rollout_percent:>6g}% "
                  f"{f.size:>10} {'yes' if f.signature else 'no':<6} {f.sha256[:16]}")
        return 0
    if args.firmware_run == "rollout":
        fw = store.set_rollout_blocking(args.id, args.percent)
        print(f"firmware {fw.id}: {fw.family}/{fw.model} {fw.version} now offered to {fw.rollout_percent:g}% of devices")
        return 0
    if args.firmware_run == "verify":
        fw = store.get_blocking(args.id)
        kid = store.verify_blocking(fw, [load_public_key(p) for p in args.public_key])
        print(f"firmware {fw.id}: sha256 ok" + (f", signature ok (key {kid})" if kid else ", unsigned"))
        return 0
    raise AssertionError(args.firmware_run)
