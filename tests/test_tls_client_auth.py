"""Mutual TLS (`tls.client_auth`) over real connections, on HTTPS and on the MQTT edge's
TLS listener: a client certificate from another CA is refused, none is refused when
required and let through when optional (a second look at issue 21)."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import httpx
import pytest
import trio

from gatewayd.core.tls import init_site, issue_client
from gatewayd.testing import gw_url
from gatewayd.testing import reserved_port


def _site(data_dir: Path) -> Path:
    init_site(data_dir / "tls", "gw", ["localhost"], ["127.0.0.1"])
    return data_dir / "tls"


def _context(ca: Path, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


async def _get(url: str, ctx: ssl.SSLContext) -> int:
    async with httpx.AsyncClient(base_url=url, verify=ctx, timeout=10) as client:
        return (await client.get("/health")).status_code


async def test_https_required_client_certificates(gateway_factory, tmp_path):
    tls = _site(tmp_path / "var")
    mine = issue_client(tls, "d1", tmp_path / "mine")
    other_ca = _site(tmp_path / "other")
    theirs = issue_client(other_ca, "d1", tmp_path / "theirs")
    async with gateway_factory(settings=["tls.http=true", "tls.client_auth='required'"]) as gw:
        url = gw_url(gw)
        assert await _get(url, _context(tls / "ca.crt", mine)) == 200
        for refused in (_context(tls / "ca.crt"), _context(tls / "ca.crt", theirs)):
            # TLS 1.3: the server's refusal arrives after the client's handshake ends, as
            # an alert on the first read: either way no answer comes.
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                await _get(url, refused)
        # A certificate of ours, for a server (not a client): refused too (extendedKeyUsage).
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await _get(url, _context(tls / "ca.crt", (tls / "server.crt", tls / "server.key")))


async def test_https_optional_client_certificates(gateway_factory, tmp_path):
    tls = _site(tmp_path / "var")
    mine = issue_client(tls, "d1", tmp_path / "mine")
    theirs = issue_client(_site(tmp_path / "other"), "d1", tmp_path / "theirs")
    async with gateway_factory(settings=["tls.http=true", "tls.client_auth='optional'"]) as gw:
        url = gw_url(gw)
        assert await _get(url, _context(tls / "ca.crt")) == 200  # none sent: let through
        assert await _get(url, _context(tls / "ca.crt", mine)) == 200
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            await _get(url, _context(tls / "ca.crt", theirs))  # one sent is checked


async def _mqtt_handshake(port: int, ctx: ssl.SSLContext) -> bytes:
    """A TLS handshake and an MQTT CONNECT without credentials: what comes back (a
    CONNACK, b'' when the connection is closed, or the TLS error raised)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, ctx, server_hostname="localhost")
    try:
        with trio.fail_after(10):
            await tls.do_handshake()
            await tls.send_all(bytes.fromhex("100c00044d5154540402003c0000"))
            return await tls.receive_some(100)
    finally:
        await tls.aclose()


async def test_mqtt_client_certificate_from_another_ca_is_refused(gateway_factory, tmp_path):
    tls = _site(tmp_path / "var")
    mine = issue_client(tls, "d1", tmp_path / "mine")
    theirs = issue_client(_site(tmp_path / "other"), "d1", tmp_path / "theirs")
    port = reserved_port()
    settings = [f"tls.mqtt_listen='127.0.0.1:{port}'", "tls.client_auth='required'"]
    async with gateway_factory(mqtt=True, settings=settings):
        answer = await _mqtt_handshake(port, _context(tls / "ca.crt", mine))
        assert answer[:1] == b"\x20"  # a CONNACK (refusing the empty login: the certificate let it through)
        for refused in (_context(tls / "ca.crt", theirs), _context(tls / "ca.crt")):
            try:
                answer = await _mqtt_handshake(port, refused)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                continue
            assert not answer.startswith(b"\x20")  # no CONNACK: the connection was closed
