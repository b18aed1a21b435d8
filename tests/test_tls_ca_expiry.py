"""The CAs' ends are in /health and /metrics, with the server certificate's warning
window: the site CA devices pin, and `tls.client_ca` that client certificates (mutual
TLS devices) chain to (review of issue 21)."""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gatewayd.core.tls import init_site
from gatewayd.testing import gw_url


def _site(data_dir: Path) -> Path:
    init_site(data_dir / "tls", "gw", ["localhost"], ["127.0.0.1"])
    return data_dir / "tls"


def _resign_ca(tls: Path, *, not_after: dt.datetime) -> None:
    """The site CA again, same name and key (what it signed still chains to it), ending at `not_after`."""
    cert = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((tls / "ca.key").read_bytes(), password=None)
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_after - dt.timedelta(days=400)).not_valid_after(not_after))
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    (tls / "ca.crt").write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))  # type: ignore[arg-type]


def _admin() -> dict[str, str]:
    token = os.environ.get("GATEWAYD_ADMIN_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _metric(text: str, name: str, cert: str) -> float:
    return float(next(x for x in text.splitlines() if x.startswith(f'{name}{{cert="{cert}"}}')).split()[-1])


async def test_a_site_ca_near_its_end_is_a_warning_in_health_and_metrics(gateway_factory, tmp_path):
    tls = _site(tmp_path / "var")
    _resign_ca(tls, not_after=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=12))
    async with gateway_factory(settings=["tls.http=true", "tls.warn_days=30"]) as gw:
        async with httpx.AsyncClient(base_url=gw_url(gw), verify=ssl.create_default_context(cafile=str(tls / "ca.crt")),
                                     timeout=10) as client:
            r = await client.get("/health")
            metrics = (await client.get("/metrics", headers=_admin())).text
    assert r.status_code == 200 and r.json()["status"] == "warning"
    component = r.json()["components"]["tls"]
    assert component["state"] == "expiring" and component["severity"] == "warning"
    assert component["reason"].startswith("the site CA (ca.crt, pinned by devices) expires in 12 days: make a new one")
    assert 11 < component["site_ca"]["days_left"] <= 12 and component["days_left"] > 700  # the server's own
    assert "client_ca" not in component  # no client certificates asked for
    assert 11 * 86400 < _metric(metrics, "gatewayd_tls_certificate_expires_in_seconds", "site_ca") <= 12 * 86400
    assert _metric(metrics, "gatewayd_tls_certificate_expires_in_seconds", "server") > 700 * 86400
    assert 'gatewayd_tls_certificate_expiry_timestamp_seconds{cert="site_ca"}' in metrics
    assert 'cert="client_ca"' not in metrics


async def test_an_expired_client_ca_fails_health_and_a_near_one_warns(gateway_factory, tmp_path):
    tls = _site(tmp_path / "var")
    clients = _site(tmp_path / "clients")  # another CA for the devices' certificates
    now = dt.datetime.now(dt.timezone.utc)
    _resign_ca(clients, not_after=now - dt.timedelta(days=1))
    settings = ["tls.http=true", "tls.client_auth='optional'", f"tls.client_ca='{clients / 'ca.crt'}'"]
    verify = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    async with gateway_factory(settings=settings) as gw:
        async with httpx.AsyncClient(base_url=gw_url(gw), verify=verify, timeout=10) as client:
            r = await client.get("/health")
            metrics = (await client.get("/metrics", headers=_admin())).text
    assert r.status_code == 503 and r.json()["components"]["tls"]["state"] == "expired"
    assert r.json()["components"]["tls"]["reason"].startswith(
        f"the client CA (tls.client_ca, {clients / 'ca.crt'}) expired: devices' client certificates are refused")
    assert -2 * 86400 < _metric(metrics, "gatewayd_tls_certificate_expires_in_seconds", "client_ca") < 0
    assert r.json()["components"]["tls"]["site_ca"]["days_left"] > 7000  # the site CA itself is fine

    _resign_ca(clients, not_after=now + dt.timedelta(days=20))
    async with gateway_factory(settings=settings) as gw:
        async with httpx.AsyncClient(base_url=gw_url(gw), verify=verify, timeout=10) as client:
            r = await client.get("/health")
    component = r.json()["components"]["tls"]
    assert r.status_code == 200 and component["state"] == "expiring" and 19 < component["client_ca"]["days_left"] <= 20
    assert "devices' client certificates chained to it are refused after" in component["reason"]
