"""Review 4: TLS renewal and the site CA's files.

A site CA whose files are links to a place that is not there now (ca.crt and ca.key kept
on a removable disk or a mount that did not come up) is not "no CA": `tls init` made a new
CA over the links, and every device that pinned the site CA refused the gateway after.
"""

from __future__ import annotations

import os
import stat
import time

import pytest

from gatewayd.core.tls import TlsError, init_site, issue_client
from gatewayd.core.tlspair import recover, served_pair


def test_a_site_ca_behind_links_to_a_missing_place_is_not_replaced(tmp_path):
    tls = tmp_path / "tls"
    init_site(tls, "gw", ["localhost"], ["127.0.0.1"])
    vault = tmp_path / "vault"  # where the operator keeps the CA, on a disk of its own
    vault.mkdir()
    for name in ("ca.crt", "ca.key"):
        os.replace(tls / name, vault / name)
        os.symlink(vault / name, tls / name)
    pinned = (vault / "ca.crt").read_bytes()
    init_site(tls, "gw", ["localhost"], ["127.0.0.1"])  # the vault is there: the CA is kept
    assert (vault / "ca.crt").read_bytes() == pinned
    os.rename(vault, tmp_path / "vault-unmounted")  # the vault's disk did not come up
    with pytest.raises(TlsError, match="ca.crt"):
        init_site(tls, "gw", ["localhost"], ["127.0.0.1"])
    assert (tls / "ca.crt").is_symlink() and (tls / "ca.key").is_symlink()  # nothing written over them


def _files_under(directory) -> set[bytes]:
    return {p.read_bytes() for p in directory.rglob("*") if p.is_file() and not p.is_symlink()}


def test_a_certificate_put_in_place_by_hand_is_not_deleted_at_start(tmp_path):
    tls = tmp_path / "tls"
    init_site(tls, "gw", ["localhost"], ["127.0.0.1"])
    other = tmp_path / "other"
    init_site(other, "gw", ["gw.example"], [])  # a certificate and key from elsewhere
    switched = os.lstat(tls / "current").st_ctime_ns
    probe = tmp_path / "probe"
    while probe.touch() or probe.stat().st_ctime_ns <= switched:  # later than the switch, as a person's mv is
        time.sleep(0.001)  # (file times tick with the kernel's coarse clock)
    for name in ("server.crt", "server.key"):
        os.replace(other / "current" / name, tls / name)  # `mv` over the link, as people do
    mine = {(tls / "server.crt").read_bytes(), (tls / "server.key").read_bytes()}
    recover(tls)  # what every start of the gateway does
    assert mine <= _files_under(tls), "the certificate and key put there were deleted"
    assert (tls / "current").is_symlink() and served_pair(tls) is not None  # the pair served is still current's


def test_a_link_in_the_out_folder_does_not_overwrite_the_ca_key(tmp_path):
    """`gatewayd tls client NAME --out DIR`: DIR may be a folder others can write (a shared
    folder to hand the files over). A link `NAME.crt.tmp` left there by another user led the
    certificate's write to any file root can write, the site CA's key among them."""
    tls = tmp_path / "tls"
    init_site(tls, "gw", ["localhost"], ["127.0.0.1"])
    ca_key = (tls / "ca.key").read_bytes()
    out = tmp_path / "handover"
    out.mkdir()
    os.symlink(tls / "ca.key", out / "dev-1.crt.tmp")
    crt, key = issue_client(tls, "dev-1", out)
    assert (tls / "ca.key").read_bytes() == ca_key
    assert stat.S_IMODE((tls / "ca.key").stat().st_mode) == 0o600
    assert not crt.is_symlink() and crt.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
