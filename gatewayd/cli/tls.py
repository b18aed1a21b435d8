"""`gatewayd tls init|show|client`: the site CA and the gateway's certificate (core/tls.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..core.tls import (SiteTls, TlsError, certificate_info, check_served, default_names, dns_name, init_site,
                        ip_address, issue_client)
from .context import CliContext, add_common_options

__all__ = ["setup_tls", "cmd_tls"]

EPILOG = """\
examples:
  gatewayd tls init                          CA (first time) + certificate for this box's names
  gatewayd tls init --name gw.site.example --ip 192.168.1.20
  gatewayd tls show --json                   what is served and when it expires
  gatewayd tls client sensor-17 --out certs/ a client certificate (mutual TLS)

Renewal: run `gatewayd tls init` again. The site CA stays, so devices that pinned it
(ca.crt) keep trusting the gateway; restart the service for the listeners to load the
new certificate. Then turn TLS on in [tls] (docs/configuration.md).
"""


def setup_tls(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="tls_command", metavar="COMMAND", required=True)
    init = sub.add_parser("init", help="make the site CA (once) and a new server certificate",
                          description="Make the site CA if there is none under <data_dir>/tls/ (it is kept on "
                          "later runs: devices pin it), then a new server certificate and key for this box's "
                          "names and addresses (host name, <host>.local, localhost, its addresses) plus any "
                          "--name and --ip.")
    init.add_argument("--name", action="append", default=[], metavar="DNS", help="another DNS name (repeatable)")
    init.add_argument("--ip", action="append", default=[], metavar="ADDRESS", help="another IP address (repeatable)")
    init.add_argument("--only", action="store_true", help="only the --name/--ip given, not this box's own")
    init.add_argument("--days", type=int, default=825, help="the certificate's validity (default 825 days)")
    init.add_argument("--json", action="store_true", help="machine-readable output")
    show = sub.add_parser("show", help="the certificate served, its names and when it expires")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    client = sub.add_parser("client", help="a client certificate signed by the site CA (mutual TLS)")
    client.add_argument("common_name", metavar="NAME", help="the certificate's common name (a device id)")
    client.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.crt and NAME.key")
    client.add_argument("--days", type=int, default=825, help="validity (default 825 days)")
    for p in (init, show, client):
        add_common_options(p, sub=True)


def cmd_tls(args: argparse.Namespace, manager: Any) -> int:
    config = CliContext(args, manager).config
    tls_dir = config.data_dir / "tls"
    try:
        if args.tls_command == "init":
            if not 1 <= args.days <= 3650:
                print("gatewayd tls init: --days must be 1 .. 3650", file=sys.stderr)
                return 2
            names, ips = ([], []) if args.only else default_names()
            # What was asked for must be valid (init_site refuses it whole); the box's
            # own names that are not valid DNS names (a host name with "_") are left out.
            names = [n for n in names if _valid(dns_name, n)]
            ips = [a for a in ips if _valid(ip_address, a)]
            result = init_site(tls_dir, config.gateway.id, list(dict.fromkeys([*args.name, *names])),
                               list(dict.fromkeys([*args.ip, *ips])), days=args.days)
            info = result.server
            if args.json:
                print(json.dumps({"directory": str(tls_dir), "ca_created": result.ca_created,
                                  **_info_json(info)}, indent=2))
                return 0
            print(f"site CA {'created' if result.ca_created else 'kept'}: {tls_dir / 'ca.crt'}"
                  + ("" if result.ca_created else " (devices that pinned it keep trusting the gateway)"))
            print(f"server certificate: {tls_dir / 'server.crt'}, valid until {info.not_after:%Y-%m-%d}")
            print(f"  names      {' '.join(info.dns_names) or '-'}")
            print(f"  addresses  {' '.join(info.ip_addresses) or '-'}")
            print("next: set tls.http = true and/or tls.mqtt_listen = \"0.0.0.0:8883\" in the config, restart, "
                  "and give devices ca.crt to pin")
            return 0
        if args.tls_command == "show":
            site = SiteTls.from_config(config)
            info = site.info = certificate_info(site.cert)
            state = site.state() if site.enabled else None
            problems = []
            if info.days_left() <= 0:
                problems.append(f"the certificate expired on {info.not_after:%Y-%m-%d}: renew it (gatewayd tls init)")
            # The files `tls init` makes are checked against the site CA; a certificate of
            # one's own (tls.cert) against its key only.
            try:
                check_served(site.cert, site.key, None if config.tls.cert else tls_dir / "ca.crt")
            except TlsError as e:
                problems.append(str(e))
            doc = {"cert": str(site.cert), **_info_json(info),
                   "listeners": {"http": config.tls.http, "mqtt_listen": str(config.tls.mqtt_listen or "") or None,
                                 "mqtt_plain": config.tls.mqtt_plain},
                   "ok": not problems, "problems": problems}
            if args.json:
                print(json.dumps(doc, indent=2))
                return 1 if problems else 0
            print(f"certificate {site.cert}")
            print(f"  subject    {info.subject}")
            print(f"  valid      {info.not_before:%Y-%m-%d} .. {info.not_after:%Y-%m-%d} "
                  f"({info.days_left():.0f} days left)")
            print(f"  names      {' '.join(info.dns_names) or '-'}")
            print(f"  addresses  {' '.join(info.ip_addresses) or '-'}")
            print(f"  served     {'yes' if site.enabled else 'no (tls.http and tls.mqtt_listen are off)'}"
                  + (f", {state.state}" if state else ""))
            print(f"  key        {site.key}")
            for problem in problems:
                print(f"  PROBLEM    {problem}")
            return 1 if problems else 0
        crt, key = issue_client(tls_dir, args.common_name, Path(args.out), days=args.days)
        print(f"client certificate: {crt}\nkey: {key} (0600; install it on the device, then delete it here)")
        return 0
    except TlsError as e:
        print(f"gatewayd tls {args.tls_command}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file where the tls folder or --out belongs, no permission, a full disk
        where = f"{e.filename}: " if e.filename else ""
        print(f"gatewayd tls {args.tls_command}: {where}{e.strerror or e}", file=sys.stderr)
        return 1


def _valid(check: Any, value: str) -> bool:
    try:
        check(value)
    except TlsError:
        return False
    return True


def _info_json(info: Any) -> dict[str, Any]:
    return {"subject": info.subject, "not_before": info.not_before.isoformat(),
            "not_after": info.not_after.isoformat(), "days_left": round(info.days_left(), 1),
            "dns_names": info.dns_names, "ip_addresses": info.ip_addresses}
