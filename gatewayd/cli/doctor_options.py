"""`gatewayd doctor`'s options, apart from its checks (cli/doctor.py): the parser of every
command is built at each start, and the checks module is imported only when the doctor runs
(`gatewayd run` never needs it: ~2 MB of a small board's RSS)."""

from __future__ import annotations

import argparse

__all__ = ["EPILOG", "setup_doctor"]

EPILOG = """\
status: ok, warn (worth knowing), fail (a real problem), skip (cannot be decided here).
exit status: 1 when a check failed, 0 otherwise (warnings never fail).

examples:
  sudo -u gatewayd gatewayd doctor --config /etc/gatewayd/gatewayd.toml
  gatewayd doctor --json | jq '.checks[] | select(.status == "fail")'
  gatewayd doctor --no-network              no request to the upstream sinks
"""


def setup_doctor(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument("--no-network", action="store_true", help="skip the upstream checks (no request leaves the box)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for each network check (default 10)")
