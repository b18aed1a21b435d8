"""`gatewayd tls` refuses what would break devices' trust, with a message, never a
traceback, and before writing anything: a site CA that is not one (or not its key),
names that are not DNS names, a certificate whose key or CA does not match. `tls show`
and the doctor exit non-zero for real problems (review of issue 21)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import pytest

from gatewayd.cli import main
from gatewayd.core.tls import TlsError, certificate_info, init_site, issue_client


def _site(data_dir: Path, **kwargs) -> Path:
    init_site(data_dir / "tls", "gw", ["localhost"], ["127.0.0.1"], **kwargs)
    return data_dir / "tls"


def _snapshot(tls: Path) -> dict[str, bytes]:
    """Every file under tls/ (the pair folders too) and where each link points."""
    return {str(p.relative_to(tls)): os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
            for p in sorted(tls.rglob("*")) if p.is_symlink() or p.is_file()}


# -- an existing CA is checked before it is kept --------------------------------------


def test_init_refuses_to_keep_a_ca_certificate_that_is_not_a_ca(tmp_path):
    tls = _site(tmp_path)
    # An operator copied the server's certificate over ca.crt (with its key: a matching pair).
    shutil.copy(tls / "server.crt", tls / "ca.crt")
    shutil.copy(tls / "server.key", tls / "ca.key")
    before = _snapshot(tls)
    with pytest.raises(TlsError, match=r"ca.crt cannot be kept as the site CA: it is not a CA certificate "
                                       r"\(basicConstraints CA=false\)"):
        init_site(tls, "gw", ["localhost"], [])
    assert _snapshot(tls) == before  # nothing written


def test_init_refuses_a_ca_key_that_is_not_the_cas(tmp_path):
    tls = _site(tmp_path)
    other = _site(tmp_path / "other")
    shutil.copy(other / "ca.key", tls / "ca.key")
    before = _snapshot(tls)
    with pytest.raises(TlsError, match="ca.key is not the key of ca.crt"):
        init_site(tls, "gw", ["localhost"], [])
    with pytest.raises(TlsError, match="ca.key is not the key of ca.crt"):
        issue_client(tls, "d1", tmp_path / "clients")
    assert _snapshot(tls) == before


def test_init_refuses_a_ca_without_key_cert_sign(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a signing CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tls / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    with pytest.raises(TlsError, match=r"keyUsage does not allow signing certificates \(keyCertSign\)"):
        init_site(tls, "gw", ["localhost"], [])
    assert not (tls / "server.crt").exists()


def test_cli_init_names_a_bad_ca_and_exits_1(tmp_path, capsys):
    data = tmp_path / "var"
    tls = _site(data)
    (tls / "ca.crt").write_text("not a certificate")
    assert main(["tls", "init", "--only", "--name", "gw.site", "--set", f"gateway.data_dir='{data}'"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gatewayd tls init: ") and "ca.crt is not a PEM certificate" in err
    assert "Traceback" not in err


# -- names and addresses ---------------------------------------------------------------


def test_a_name_over_64_characters_is_in_the_san_and_not_the_cn(tmp_path):
    long = "a" * 60 + ".site.example"  # a valid DNS name of 73 characters
    init_site(tmp_path / "tls", "gw", [long], [])
    info = certificate_info(tmp_path / "tls" / "server.crt")
    assert info.dns_names == [long]
    assert info.subject == "CN=gatewayd gw"


def test_a_non_ascii_name_is_idna_encoded(tmp_path):
    init_site(tmp_path / "tls", "gw", ["Bücher.Site", "gw.example."], ["::1"])
    info = certificate_info(tmp_path / "tls" / "server.crt")
    assert info.dns_names == ["xn--bcher-kva.site", "gw.example"]
    assert info.subject == "CN=xn--bcher-kva.site"


@pytest.mark.parametrize("names, ips, message", [
    (["bad name!"], [], "not a DNS name: 'bad name!' (label 'bad name!': letters, digits and inner hyphens only)"),
    (["ok.example", "under_score.example"], [], "label 'under_score'"),
    (["-lead.example"], [], "label '-lead'"),
    (["a" * 64 + ".example"], [], "over 63 characters"),
    (["a..b"], [], "an empty label"),
    (["*.site.example"], [], "wildcards are not issued"),
    ([""], [], "not a DNS name: '' (empty)"),
    (["ok.example"], ["10.0.0.1", "10.0.0.300"], "not an IP address: '10.0.0.300'"),
    (["ok.example"], ["fe80::1%eth0"], "no %zone"),
])
def test_every_name_and_address_is_checked_before_anything_is_written(tmp_path, names, ips, message):
    tls = _site(tmp_path)
    before = _snapshot(tls)
    with pytest.raises(TlsError) as e:
        init_site(tls, "gw", names, ips)
    assert message in str(e.value)
    assert _snapshot(tls) == before  # the working certificate is untouched


def test_cli_bad_names_are_messages_not_tracebacks(tmp_path, capsys):
    data = tmp_path / "var"
    common = ["--set", f"gateway.data_dir='{data}'"]
    assert main(["tls", "init", "--only", "--name", "gw.site", *common]) == 0
    before = _snapshot(data / "tls")
    capsys.readouterr()
    assert main(["tls", "init", "--name", "bad name!", *common]) == 1
    err = capsys.readouterr().err
    assert "gatewayd tls init: not a DNS name: 'bad name!'" in err and "Traceback" not in err
    assert _snapshot(data / "tls") == before
    assert main(["tls", "client", "", "--out", str(tmp_path / "c"), *common]) == 1
    assert "needs a name (the device id): got an empty one" in capsys.readouterr().err
    assert main(["tls", "client", "d" * 65, "--out", str(tmp_path / "c"), *common]) == 1
    assert "65 characters long; a certificate's common name holds at most 64" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["tls", "client", "d" * 64, "--out", str(tmp_path / "c"), *common]) == 0


# -- tls show: exit 1 for real problems ------------------------------------------------


def _show(capsys, data: Path) -> tuple[int, dict]:
    code = main(["tls", "show", "--json", "--set", f"gateway.data_dir='{data}'"])
    return code, json.loads(capsys.readouterr().out)


def test_show_a_key_that_is_not_the_certificates_fails(tmp_path, capsys):
    data = tmp_path / "var"
    tls = _site(data)
    code, doc = _show(capsys, data)
    assert code == 0 and doc["ok"] and doc["problems"] == []
    other = _site(tmp_path / "other")
    shutil.copy(other / "server.key", tls / "server.key")
    code, doc = _show(capsys, data)
    assert code == 1 and not doc["ok"]
    assert doc["problems"] == [f"{tls / 'server.key'} is not the key of {tls / 'server.crt'} (tls.key / tls.cert): "
                               "run `gatewayd tls init`"]
    assert main(["tls", "show", "--set", f"gateway.data_dir='{data}'"]) == 1
    assert "PROBLEM    " in capsys.readouterr().out


def test_show_an_expired_certificate_fails_and_one_from_another_ca_too(tmp_path, capsys):
    data = tmp_path / "var"
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=100)
    tls = _site(data, days=30, now=long_ago)
    code, doc = _show(capsys, data)
    assert code == 1 and doc["days_left"] < 0 and "the certificate expired on" in doc["problems"][0]
    other = _site(tmp_path / "other")
    for name in ("server.crt", "server.key"):
        shutil.copy(other / name, tls / name)
    code, doc = _show(capsys, data)
    assert code == 1 and doc["problems"] == [f"{tls / 'server.crt'} is not signed by the site CA {tls / 'ca.crt'}: "
                                             "devices that pin it would refuse the gateway; run `gatewayd tls init`"]


# -- the doctor --------------------------------------------------------------------------


def _doctor_tls(capsys, data: Path) -> dict:
    main(["doctor", "--json", "--no-network", "--set", f"gateway.data_dir='{data}'", "--set", "tls.http=true",
          "--set", "http.listen='127.0.0.1:0'", "--set", "mqtt.listen='127.0.0.1:0'"])
    return next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "tls")


def test_doctor_checks_the_chain_to_the_site_ca_and_the_key(tmp_path, capsys):
    data = tmp_path / "var"
    tls = _site(data)
    assert _doctor_tls(capsys, data)["status"] == "ok"
    other = _site(tmp_path / "other")
    shutil.copy(other / "server.key", tls / "server.key")
    check = _doctor_tls(capsys, data)
    assert check["status"] == "fail" and "server.key" in check["message"] and "server.crt" in check["message"]
    shutil.copy(other / "server.crt", tls / "server.crt")  # a matching pair, from another CA
    check = _doctor_tls(capsys, data)
    assert check["status"] == "fail" and "is not signed by the site CA" in check["message"]
    _site(data)  # renewed by the site CA: green again
    assert _doctor_tls(capsys, data)["status"] == "ok"
    shutil.copy(other / "ca.key", tls / "ca.key")  # the site CA's key lost
    check = _doctor_tls(capsys, data)
    assert check["status"] == "fail" and "ca.key is not the key of ca.crt" in check["message"]


def test_an_expired_site_ca_is_not_kept(tmp_path):
    tls = tmp_path / "tls"
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30 * 365)
    init_site(tls, "gw", ["localhost"], [], now=long_ago)  # a CA of 20 years, made 30 years ago
    before = _snapshot(tls)
    with pytest.raises(TlsError, match=r"ca.crt cannot be kept as the site CA: it expired on \d{4}-\d\d-\d\d"):
        init_site(tls, "gw", ["localhost"], [])
    assert _snapshot(tls) == before
