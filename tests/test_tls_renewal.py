"""A renewal (`gatewayd tls init` over a certificate) interrupted at each of its steps:
what the gateway loads is one pair (the key is the certificate's) at every instant, and
the next start finishes or undoes the renewal, saying so (review of issue 21).

The interruption is real: a child process runs the renewal and `os._exit`s at the
step (no `finally`, no cleanup), as a power cut or SIGKILL would end it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gatewayd.core.tls import SiteTls, TlsSection, init_site
from gatewayd.core.tlspair import PAIR_STEPS
from gatewayd.testing import gw_url

CHILD = """
import os, sys
from pathlib import Path
from gatewayd.core import tlspair
from gatewayd.core.tls import init_site

step = sys.argv[2]
if step == "mid-write":  # the key written, the certificate not yet
    write = tlspair._write
    def _write(path, data, mode):
        write(path, data, mode)
        os._exit(9)
    tlspair._write = _write
else:
    def _checkpoint(name):
        if name == step:
            os._exit(9)
    tlspair._checkpoint = _checkpoint
init_site(Path(sys.argv[1]), "gw", ["renewed.example"], ["127.0.0.1"])
os._exit(0)
"""

#: Where the renewal stops, and whether the new certificate is served after the start's recovery.
CASES = [("mid-write", False), *[(step, step != "written") for step in PAIR_STEPS]]


def _renew_interrupted(tls: Path, step: str) -> None:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tls), step], capture_output=True, text=True, timeout=60)
    assert done.returncode == 9, done.stderr


def _legacy(tls: Path) -> None:
    """The layout a gateway made before pairs: server.crt and server.key as plain files."""
    for name in ("server.crt", "server.key"):
        data = (tls / name).read_bytes()
        (tls / name).unlink()
        (tls / name).write_bytes(data)
    (tls / "current").unlink()
    for pair in tls.glob("pair-*"):
        shutil.rmtree(pair)


def _loaded(data: Path) -> tuple[bytes, SiteTls]:
    """What a starting gateway loads (the certificate's bytes); load() fails if the key is not its."""
    site = SiteTls(TlsSection(http=True), data, None)
    site.load()  # server_context(): load_cert_chain refuses a key that is not the certificate's
    return site.files[0].read_bytes(), site


@pytest.mark.parametrize("layout", ["pairs", "legacy"])
@pytest.mark.parametrize("step,renewed", CASES)
def test_a_renewal_interrupted_at_each_step_leaves_a_pair_that_loads(tmp_path, layout, step, renewed, caplog):
    data = tmp_path / "var"
    tls = data / "tls"
    init_site(tls, "gw", ["old.example"], ["127.0.0.1"])
    if layout == "legacy":
        _legacy(tls)
    old = (tls / "server.crt").read_bytes()

    _renew_interrupted(tls, step)
    served, _ = _loaded(data)  # consistent at the instant of the crash, before any recovery
    switched = PAIR_STEPS.index(step) >= PAIR_STEPS.index("switched") if step in PAIR_STEPS else False
    assert (served != old) == switched

    with caplog.at_level(logging.WARNING, "gatewayd.tls"):
        actions = SiteTls(TlsSection(http=True), data, None).recover()
    served, site = _loaded(data)
    assert (served != old) == renewed
    assert site.info is not None and ("renewed.example" in site.info.dns_names) == renewed
    # The names people and tools use are the pair that is served, once recovered.
    assert (tls / "server.crt").read_bytes() == served
    assert not list(tls.glob(".pair-*")) and not list(tls.glob("*.new"))
    if step in ("mid-write", "written"):
        assert actions and "half-written; the previous certificate is served" in actions[0]
    elif step == "complete":
        assert actions == [f"switched to {os.readlink(tls / 'current')}: a renewal was interrupted after its new "
                           "certificate was complete; it is served now"]
    elif step == "switched" and layout == "legacy":
        assert actions == ["linked server.crt and server.key to the served pair (a renewal was interrupted after "
                           "its switch)"]
    logged = [r.fields["action"] for r in caplog.records if r.getMessage() == "tls: recovered an interrupted renewal"]
    assert logged == actions
    # and the renewal then runs through
    init_site(tls, "gw", ["again.example"], ["127.0.0.1"])
    served, site = _loaded(data)
    assert site.info is not None and site.info.dns_names == ["again.example"]
    assert len(list(tls.glob("pair-*"))) <= 2  # the served pair and the previous one


async def test_the_gateway_start_finishes_an_interrupted_renewal_and_serves_it(gateway_factory, tmp_path, caplog):
    data = tmp_path / "var"
    init_site(data / "tls", "gw", ["localhost"], ["127.0.0.1"])
    old = (data / "tls" / "server.crt").read_bytes()
    _renew_interrupted(data / "tls", "complete")  # the new pair complete, not yet switched to
    assert (data / "tls" / "server.crt").read_bytes() == old
    with caplog.at_level(logging.WARNING, "gatewayd.tls"):
        async with gateway_factory(settings=["tls.http=true"]) as gw:
            async with httpx.AsyncClient(base_url=gw_url(gw), verify=False, timeout=10) as client:
                assert (await client.get("/health")).status_code == 200
            served = gw.tls.files[0].read_bytes()
    assert served != old and (data / "tls" / "server.crt").read_bytes() == served
    logged = [r.fields["action"] for r in caplog.records if r.getMessage() == "tls: recovered an interrupted renewal"]
    assert len(logged) == 1 and "it is served now" in logged[0]


def test_a_link_to_a_missing_pair_is_named(tmp_path):
    data = tmp_path / "var"
    init_site(data / "tls", "gw", ["localhost"], [])
    shutil.rmtree(data / "tls" / os.readlink(data / "tls" / "current"))
    site = SiteTls(TlsSection(http=True), data, None)
    with pytest.raises(Exception, match=r"tls.cert: no file at .*pair-1/server.crt"):
        site.load()


def test_the_two_renames_of_earlier_releases_are_finished_where_they_can_be(tmp_path, caplog):
    """Before pairs, a renewal wrote server.key.tmp, renamed it, then server.crt.tmp and renamed
    it: a crash between the renames left the new key with the old certificate."""
    data = tmp_path / "var"
    tls = data / "tls"
    init_site(tls, "gw", ["old.example"], [])
    _legacy(tls)
    new = tmp_path / "new"
    init_site(new, "gw", ["new.example"], [])  # (another CA: only the key and certificate matter here)
    (tls / "server.key").write_bytes((new / "server.key").read_bytes())  # renamed in
    (tls / "server.crt.tmp").write_bytes((new / "server.crt").read_bytes())  # written, not yet renamed
    with pytest.raises(Exception, match="KEY_VALUES_MISMATCH|not the key"):
        _loaded(data)
    with caplog.at_level(logging.WARNING, "gatewayd.tls"):
        actions = SiteTls(TlsSection(http=True), data, None).recover()
    assert actions == ["renamed server.crt.tmp to server.crt: a renewal was interrupted between its two renames "
                       "(server.key was the new one); the new certificate is served"]
    served, site = _loaded(data)
    assert site.info is not None and site.info.dns_names == ["new.example"]
    # The certificate not written yet: nothing to finish, the problem and the way out are named.
    (tls / "server.key").write_bytes(_other_key(tmp_path))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "gatewayd.tls"):
        assert SiteTls(TlsSection(http=True), data, None).recover() == []
    [record] = caplog.records
    assert record.getMessage() == "tls: an interrupted renewal cannot be finished"
    assert record.fields["problem"].startswith("server.key is not the key of server.crt (the new certificate was never "
                                               "written): run `gatewayd tls init` again")
    init_site(tls, "gw", ["again.example"], [])
    assert _loaded(data)[1].info.dns_names == ["again.example"]  # type: ignore[union-attr]


def _other_key(tmp_path: Path) -> bytes:
    init_site(tmp_path / "third", "gw", ["third.example"], [])
    return (tmp_path / "third" / "server.key").read_bytes()


def test_a_tls_folder_the_gateway_cannot_write_is_logged_not_a_crash(tmp_path, caplog, monkeypatch):
    data = tmp_path / "var"
    init_site(data / "tls", "gw", ["localhost"], [])
    (data / "tls" / ".pair-9.partial").mkdir()  # something to clean up, which fails

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))

    monkeypatch.setattr("gatewayd.core.tlspair.shutil.rmtree", refuse)
    with caplog.at_level(logging.ERROR, "gatewayd.tls"):
        assert SiteTls(TlsSection(http=True), data, None).recover() == []
    assert [r.getMessage() for r in caplog.records] == ["tls: cannot look for an interrupted renewal"]
    _loaded(data)  # the pair served is still what loads
