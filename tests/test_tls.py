"""TLS on the LAN, over real connections: the site CA and certificates `gatewayd tls`
makes, HTTPS from hypercorn, the MQTT edge's TLS listener (mosquitto_pub --cafile),
client certificates, and the certificate's expiry in /health and /metrics."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import peewee
import pytest
import trio
import trio.testing

from gatewayd.cli import main
from gatewayd.core.config import load_config
from gatewayd.core.runtime import ListenError, find_exception
from gatewayd.core.schema import ConfigErrors
from gatewayd.core.tls import certificate_info, init_site, issue_client
from gatewayd.plugins.api import hookimpl
from gatewayd.testing import gw_client, gw_url, provision, wait_handled
from gatewayd.testing import reserved_port


class Reading(peewee.Model):
    device = peewee.CharField()
    text = peewee.TextField()

    class Meta:
        table_name = "tlstest_reading"


class TlsPlugin:
    @hookimpl
    def gatewayd_storage_models(self, models):
        models.add(Reading)

    @hookimpl
    def gatewayd_mqtt_topics(self, topics, ctx):
        self.ctx = ctx
        topics.subscribe("dev/+/data", self.on_data, qos=1)
        topics.acl("dev/%u/#", "write")

    async def on_data(self, msg):
        device = msg.topic.split("/")[1]
        await self.ctx.ingest.record(device, "data", {"text": msg.payload.decode()},
                                     family_rows=lambda: Reading.insert(device=device,
                                                                        text=msg.payload.decode()).execute())


def _site(data_dir: Path, **kwargs) -> Path:
    init_site(data_dir / "tls", "test-gateway", ["localhost"], ["127.0.0.1"], **kwargs)
    return data_dir / "tls"


def _client_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    return ctx


# -- certificates --------------------------------------------------------------------


async def test_init_makes_a_ca_and_a_server_certificate_that_verifies(tmp_path):
    tls = _site(tmp_path)
    ca, server = certificate_info(tls / "ca.crt"), certificate_info(tls / "server.crt")
    assert ca.is_ca and not server.is_ca
    assert server.dns_names == ["localhost"] and server.ip_addresses == ["127.0.0.1"]
    assert (tls / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tls / "server.key").stat().st_mode & 0o777 == 0o600
    # A real handshake: the server presents it, a client pinning the CA accepts it
    # (Python's default client context: hostname checked, strict X.509).
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls / "server.crt", tls / "server.key")
    left, right = trio.testing.memory_stream_pair()
    client = trio.SSLStream(left, _client_context(tls / "ca.crt"), server_hostname="localhost")
    srv = trio.SSLStream(right, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(srv.do_handshake)
        await client.do_handshake()
    assert client.getpeercert()["subject"] == ((("commonName", "localhost"),),)
    # A name the certificate does not carry is refused.
    left, right = trio.testing.memory_stream_pair()
    client = trio.SSLStream(left, _client_context(tls / "ca.crt"), server_hostname="elsewhere.example")
    srv = trio.SSLStream(right, server_ctx, server_side=True)
    with pytest.raises(BaseExceptionGroup) as e:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(srv.do_handshake)
            await client.do_handshake()
    broken = find_exception(e.value, trio.BrokenResourceError)
    assert broken is not None and "Hostname mismatch" in str(broken.__cause__)


def test_renewal_keeps_the_ca_so_pinned_devices_still_trust_the_gateway(tmp_path):
    tls = _site(tmp_path)
    ca_before = (tls / "ca.crt").read_bytes()
    cert_before = (tls / "server.crt").read_bytes()
    result = init_site(tls, "test-gateway", ["localhost", "gw.example"], ["127.0.0.1"])
    assert not result.ca_created
    assert (tls / "ca.crt").read_bytes() == ca_before
    assert (tls / "server.crt").read_bytes() != cert_before
    assert result.server.dns_names == ["localhost", "gw.example"]


def test_init_refuses_a_bad_address_and_a_lone_ca_key(tmp_path):
    from gatewayd.core.tls import TlsError

    with pytest.raises(TlsError, match="not an IP address: '300.1.1.1'"):
        init_site(tmp_path / "tls", "gw", ["localhost"], ["300.1.1.1"])
    (tmp_path / "tls").mkdir(exist_ok=True)
    (tmp_path / "tls" / "ca.key").write_text("x")
    with pytest.raises(TlsError, match="ca.key exists without ca.crt"):
        init_site(tmp_path / "tls", "gw", ["localhost"], [])


def test_cli_init_show_and_client(tmp_path, capsys):
    data = tmp_path / "var"
    common = ["--set", f"gateway.data_dir='{data}'"]
    assert main(["tls", "init", "--only", "--name", "gw.site", "--ip", "10.1.2.3", *common]) == 0
    assert "site CA created" in capsys.readouterr().out
    assert main(["tls", "init", "--only", "--name", "gw.site", *common]) == 0
    assert "site CA kept" in capsys.readouterr().out
    assert main(["tls", "show", "--json", *common, "--set", "tls.http=true"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dns_names"] == ["gw.site"] and 824 < doc["days_left"] <= 825 and doc["listeners"]["http"] is True
    assert main(["tls", "client", "sensor-17", "--out", str(tmp_path / "c"), *common]) == 0
    # Never over existing files (with --out <data_dir>/tls, the name "ca" replaced the CA's key).
    before = (tmp_path / "c" / "sensor-17.key").read_bytes()
    assert main(["tls", "client", "sensor-17", "--out", str(tmp_path / "c"), *common]) == 1
    assert (tmp_path / "c" / "sensor-17.key").read_bytes() == before
    assert certificate_info(tmp_path / "c" / "sensor-17.crt").subject == "CN=sensor-17"
    assert main(["tls", "init", "--only", "--ip", "nope", *common]) == 1
    assert "not an IP address" in capsys.readouterr().err


# -- config --------------------------------------------------------------------------


def test_config_names_the_tls_key():
    with pytest.raises(ConfigErrors) as e:
        load_config(None, ["tls.mqtt_plain=false"])
    assert "tls.mqtt_plain: false needs tls.mqtt_listen" in str(e.value)
    with pytest.raises(ConfigErrors) as e:
        load_config(None, ["tls.http=true", "tls.client_auth='always'"])
    assert "tls.client_auth: expected one of 'none', 'optional', 'required'" in str(e.value)
    with pytest.raises(ConfigErrors) as e:
        load_config(None, ["tls.certfile='x'"])
    assert "tls.certfile: unknown key (did you mean 'cert'?)" in str(e.value)


async def test_a_missing_certificate_is_named_at_start(gateway_factory):
    with pytest.raises(BaseException) as e:
        async with gateway_factory(settings=["tls.http=true"]):
            pass
    error = find_exception(e.value, ListenError)
    assert error is not None and "tls.cert: no file at" in str(error) and "gatewayd tls init" in str(error)


# -- HTTPS ---------------------------------------------------------------------------


async def test_https_listener_serves_the_site_certificate(gateway_factory, tmp_path):
    tls = _site(tmp_path / "var")
    async with gateway_factory(settings=["tls.http=true"]) as gw:
        url = gw_url(gw)
        assert url.startswith("https://")
        async with httpx.AsyncClient(base_url=url, verify=_client_context(tls / "ca.crt"), timeout=10) as client:
            r = await client.get("/health")
            assert r.status_code == 200
            assert r.json()["components"]["tls"]["state"] == "ok"
            assert 824 < r.json()["components"]["tls"]["days_left"] <= 825
        # A client that does not trust the site CA refuses the gateway...
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            with pytest.raises(httpx.ConnectError):  # certifi's roots do not hold the site CA
                await client.get("/health")
        # ...and plain HTTP gets no answer on the TLS-only listener.
        plain = url.replace("https://", "http://")
        async with httpx.AsyncClient(base_url=plain, timeout=5) as client:
            with pytest.raises(httpx.HTTPError):
                await client.get("/health")


async def test_expiry_is_reported_well_before_it_happens(gateway_factory, tmp_path):
    _site(tmp_path / "var", days=10)
    async with gateway_factory(settings=["tls.http=true", "tls.warn_days=30"]) as gw:
        ca = tmp_path / "var" / "tls" / "ca.crt"
        async with httpx.AsyncClient(base_url=gw_url(gw), verify=_client_context(ca), timeout=10) as client:
            r = await client.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "warning"  # a warning: devices still connect
            tls = r.json()["components"]["tls"]
            assert tls["state"] == "expiring" and "expires in 10 days" in tls["reason"]
            assert tls["severity"] == "warning"
            metrics = (await client.get("/metrics", headers=_admin())).text
    line = next(x for x in metrics.splitlines() if x.startswith("gatewayd_tls_certificate_expires_in_seconds"))
    assert 9 * 86400 < float(line.split()[-1]) <= 10 * 86400
    assert "gatewayd_tls_certificate_expiry_timestamp_seconds{cert=\"server\"}" in metrics


def _admin() -> dict[str, str]:
    import os

    token = os.environ.get("GATEWAYD_ADMIN_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


# -- MQTT over TLS at the edge ---------------------------------------------------------


def _mosquitto_pub(*args: str) -> list[str]:
    tool = shutil.which("mosquitto_pub")
    if tool is None:
        pytest.fail("mosquitto_pub is not installed: apt-get install mosquitto-clients")
    return [tool, *args]


async def test_mqtt_tls_only_edge_takes_mosquitto_pub_with_the_site_ca(gateway_factory, tmp_path):
    tls = _site(tmp_path / "var")
    port = reserved_port()
    settings = [f"tls.mqtt_listen='127.0.0.1:{port}'", "tls.mqtt_plain=false"]
    async with gateway_factory(plugins=[("tlstest", TlsPlugin())], mqtt=True, settings=settings) as gw:
        assert gw.mqtt.facade().device_port == port
        device = await provision(gw, "tlstest", "d1")
        base = ["-h", "localhost", "-p", str(port), "-u", device.mqtt.username, "-P", device.key, "-i", "d1",
                "-q", "1", "-t", "dev/d1/data", "-m", "over-tls"]
        result = await _publish(_mosquitto_pub(*base, "--cafile", str(tls / "ca.crt")))
        assert result.returncode == 0, result.stderr
        await wait_handled(gw, "dev/+/data")
        rows = await gw.storage.read(lambda: [(r.device, r.text) for r in Reading.select()])
        assert rows == [("d1", "over-tls")]
        # Without the CA (a device that does not pin it) the handshake fails.
        other = _site(tmp_path / "other")
        result = await _publish(_mosquitto_pub(*base, "--cafile", str(other / "ca.crt")))
        assert result.returncode != 0
        # The plain listener is closed: TLS only.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", gw.config.mqtt.listen.port)
        # Plain MQTT bytes on the TLS port: no CONNACK, the connection just ends.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(bytes.fromhex("101000044d5154540402003c0004") + b"test")
        with trio.fail_after(10):
            data = await stream.receive_some(100)
        assert not data.startswith(b"\x20")
        await stream.aclose()
        assert gw.mqtt.edge.stats.accepted == 1


async def _publish(command: list[str]) -> subprocess.CompletedProcess:
    return await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)


async def test_mqtt_client_certificates_required(gateway_factory, tmp_path):
    tls = _site(tmp_path / "var")
    crt, key = issue_client(tls, "d1", tmp_path / "clients")
    port = reserved_port()
    settings = [f"tls.mqtt_listen='127.0.0.1:{port}'", "tls.client_auth='required'"]
    async with gateway_factory(plugins=[("tlstest", TlsPlugin())], mqtt=True, settings=settings) as gw:
        device = await provision(gw, "tlstest", "d1")
        base = ["-h", "localhost", "-p", str(port), "-u", device.mqtt.username, "-P", device.key, "-i", "d1",
                "-q", "1", "-t", "dev/d1/data", "--cafile", str(tls / "ca.crt")]
        without = await _publish(_mosquitto_pub(*base, "-m", "no-cert"))
        assert without.returncode != 0
        with_cert = await _publish(_mosquitto_pub(*base, "-m", "with-cert", "--cert", str(crt), "--key", str(key)))
        assert with_cert.returncode == 0, with_cert.stderr
        await wait_handled(gw, "dev/+/data")
        rows = await gw.storage.read(lambda: [r.text for r in Reading.select()])
        assert rows == ["with-cert"]
        # The plain listener stays (tls.mqtt_plain defaults to true) for devices not moved yet.
        stream = await trio.open_tcp_stream("127.0.0.1", gw.config.mqtt.listen.port)
        await stream.aclose()


def test_gatewayd_tls_help_helps():
    out = subprocess.run([sys.executable, "-m", "gatewayd", "tls", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "tls init" in out.stdout and "Renewal" in out.stdout and "--config" in out.stdout


# -- a plugin's own listener (issue 21's goal: every device-facing listener TLS-only) --


async def test_a_plugins_own_listener_is_https_only_with_client_certificates(gateway_factory, tmp_path):
    import gatewayd_paku

    tls = _site(tmp_path / "var")
    mine = issue_client(tls, "pk-1", tmp_path / "clients")
    settings = ["plugins.paku.listen='127.0.0.1:0'", "tls.http=true", "tls.client_auth='required'"]
    async with gateway_factory(plugins=[("paku", gatewayd_paku)], settings=settings) as gw:
        [url] = gw.http_urls["paku"]
        assert url.startswith("https://")
        ctx = _client_context(tls / "ca.crt")
        ctx.load_cert_chain(*mine)
        async with httpx.AsyncClient(base_url=url, verify=ctx, timeout=10) as client:
            r = await client.get("/health")  # paku's own /health at / of its listener
            assert r.status_code == 200 and "mqtt" in r.json()
        # Without a client certificate, and in plain HTTP: no answer.
        async with httpx.AsyncClient(base_url=url, verify=_client_context(tls / "ca.crt"), timeout=10) as client:
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                await client.get("/health")
        async with httpx.AsyncClient(base_url=url.replace("https://", "http://"), timeout=5) as client:
            with pytest.raises(httpx.HTTPError):
                await client.get("/health")
