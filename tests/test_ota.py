"""The OTA store: semver order, rollout by device hash, signatures, resumable downloads."""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import random
import zlib

import pytest
import trio
from quart import Blueprint

from gatewayd.core.ota.http import parse_range
from gatewayd.core.ota.store import (
    OtaError,
    OtaStore,
    generate_keypair,
    load_private_key,
    load_public_key,
    rollout_bucket,
)
from gatewayd.core.storage import Storage
from gatewayd.plugins.api import PluginContext, hookimpl
from gatewayd.protocol.semver import parse_version
from gatewayd.testing import gw_client

TOKEN = "ota-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


# -- semantic versions ----------------------------------------------------------------


def test_semver_precedence_follows_the_spec():
    # The example chain of semver 2.0.0, section 11.
    chain = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
             "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "1.10.0", "2.0.0"]
    shuffled = chain[:]
    random.Random(3).shuffle(shuffled)
    assert [str(v) for v in sorted(map(parse_version, shuffled))] == chain
    assert parse_version("v2.1.0") == parse_version("2.1.0+build.7")


@pytest.mark.parametrize("text", ["1.2", "1.2.3.4", "01.2.3", "1.2.3-", "1.2.3-01", "latest", ""])
def test_semver_rejects_what_is_not_a_version(text):
    with pytest.raises(ValueError):
        parse_version(text)


# -- byte ranges ----------------------------------------------------------------------


@pytest.mark.parametrize("header,expected", [
    (None, None),
    ("bytes=0-99", (0, 99)),
    ("bytes=100-", (100, 999)),
    ("bytes=-100", (900, 999)),
    ("bytes=-5000", (0, 999)),
    ("bytes=990-5000", (990, 999)),
    ("bytes=1000-", "unsatisfiable"),
    ("bytes=-0", "unsatisfiable"),
    ("bytes=5-1", None),          # invalid: ignored, whole file
    ("bytes=0-1,5-9", None),      # multiple ranges: whole file
    ("items=0-1", None),
])
def test_parse_range(header, expected):
    assert parse_range(header, 1000) == expected


# -- rollout --------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [5, 25, 50, 90])
def test_rollout_share_is_within_two_percent_and_stable(percent):
    devices = [f"dev-{i:05d}" for i in range(10_000)]
    chosen = {d for d in devices if rollout_bucket("paku", "m1", "1.3.0", d) < percent}
    assert abs(len(chosen) / len(devices) * 100 - percent) <= 2
    assert chosen == {d for d in devices if rollout_bucket("paku", "m1", "1.3.0", d) < percent}  # stable
    wider = {d for d in devices if rollout_bucket("paku", "m1", "1.3.0", d) < percent + 10}
    assert chosen < wider  # raising the percentage only adds devices


@pytest.fixture
async def store(tmp_path):
    storage = Storage(tmp_path / "gw.sqlite3")
    async with trio.open_nursery() as nursery:
        await nursery.start(storage.run)
        from tests.core_schemas import install_schemas

        await trio.to_thread.run_sync(install_schemas, storage)
        yield OtaStore(storage, tmp_path / "firmware")
        nursery.cancel_scope.cancel()


def image(tmp_path, name="fw.bin", size=50_000, seed=1):
    path = tmp_path / name
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


async def add(store, tmp_path, version, channel="stable", rollout=None, seed=None, **kw):
    path = image(tmp_path, f"fw-{version}.bin", seed=seed or zlib.crc32(version.encode()))
    return await trio.to_thread.run_sync(functools.partial(
        store.add_blocking, path, family="paku", model="m1", version=version, channel=channel,
        rollout_percent=rollout, **kw))


async def test_newest_for_respects_version_channel_and_rollout(store, tmp_path):
    await add(store, tmp_path, "1.2.0")
    await add(store, tmp_path, "1.10.0")
    await add(store, tmp_path, "1.11.0-beta.2", channel="beta")
    await add(store, tmp_path, "2.0.0", rollout=50)
    newest = functools.partial(store.newest_for, "paku", "m1")
    assert (await newest("1.10.0", "stable", None)) is None  # 2.0.0 is at 50 %: no id, no offer
    assert (await newest("1.2.0", "stable", None)).version == "1.10.0"  # 1.10 > 1.2 (not string order)
    assert (await newest("1.10.0", "beta", None)).version == "1.11.0-beta.2"
    assert await newest("1.11.0", "beta", None) is None
    assert (await newest(None, "stable", None)).version == "1.10.0"
    assert (await newest("v1.2", "stable", None)).version == "1.10.0"  # a lenient device-reported version
    inside = next(d for d in (f"d{i}" for i in range(100)) if rollout_bucket("paku", "m1", "2.0.0", d) < 50)
    outside = next(d for d in (f"d{i}" for i in range(100)) if rollout_bucket("paku", "m1", "2.0.0", d) >= 50)
    assert (await newest("1.10.0", "stable", inside)).version == "2.0.0"
    assert (await newest("1.10.0", "stable", outside)) is None
    assert await store.newest_for("paku", "other-model", "0.0.1", "stable", inside) is None
    with pytest.raises(ValueError):
        await newest("1.0.0", "nightly", inside)


async def test_add_refuses_duplicates_and_bad_versions(store, tmp_path):
    await add(store, tmp_path, "1.0.0")
    with pytest.raises(OtaError, match=r"paku/m1 1.0.0 is already in the store \(id 1\)"):
        await add(store, tmp_path, "1.0.0")
    with pytest.raises(OtaError, match="not a semantic version"):
        await add(store, tmp_path, "1.0")
    assert [f.version for f in await store.list()] == ["1.0.0"]


# -- signatures -----------------------------------------------------------------------


async def test_signed_here_verifies_and_a_bad_signature_is_rejected(store, tmp_path):
    private, public = generate_keypair(tmp_path / "signing.pem")
    assert oct(os.stat(private).st_mode & 0o777) == "0o600"
    fw = await add(store, tmp_path, "1.0.0", sign_key=load_private_key(private))
    key = load_public_key(public)
    assert store.verify_blocking(fw, [key]) == fw.key_id
    # A signature made elsewhere for *this* image verifies; for another image it does not.
    other = image(tmp_path, "other.bin", seed=99)
    good = base64.b64encode(load_private_key(private).sign(fw.signed_message())).decode()
    with pytest.raises(OtaError, match="bad signature"):
        await trio.to_thread.run_sync(functools.partial(
            store.add_blocking, other, family="paku", model="m1", version="1.0.1", signature=good, extra_keys=[key]))
    # ... nor when the image is altered on disk after it was stored.
    fw.path.write_bytes(fw.path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(OtaError, match="SHA-256 no longer matches"):
        store.verify_blocking(fw, [key])
    assert [f.version for f in await store.list()] == ["1.0.0"]


async def test_require_signed_refuses_unsigned_images(store, tmp_path):
    store.require_signed = True
    with pytest.raises(OtaError, match="require_signed"):
        await add(store, tmp_path, "1.0.0")


# -- downloads through the real HTTP app ---------------------------------------------


class OtaPlugin:
    """A family plugin that serves the store's images under its own routes."""

    @hookimpl
    def gatewayd_http_routes(self, ctx: PluginContext):
        bp = Blueprint("otaplug", __name__)

        @bp.get("/ota/check")
        async def check():
            from quart import request

            fw = await ctx.ota.newest_for(request.args["model"], request.args["current"], "stable",
                                         request.args["device"])
            return {"update": None} if fw is None else {"update": {"version": fw.version, "sha256": fw.sha256,
                                                                   "url": f"{ctx.mount}/ota/{fw.id}"}}

        @bp.get("/ota/<int:fid>")
        async def download(fid: int):
            return await ctx.ota.response(fid)

        @bp.get("/ota/manifest.json")
        async def manifest():
            images = await ctx.ota.list()
            return {"manifest": ctx.ota.manifest(images, lambda fw: f"{ctx.mount}/ota/{fw.id}")}

        @bp.get("/ota/<int:fid>/meta")
        async def meta(fid: int):  # what paku's firmware route does: look it up, then serve it
            fw = await ctx.ota.get(fid)
            return ({"error": "no such firmware"}, 404) if fw is None else fw.as_dict()

        return bp


async def stored(gw, tmp_path, size=300_000):
    path = image(tmp_path, size=size, seed=5)
    fw = await trio.to_thread.run_sync(functools.partial(
        gw.ota.add_blocking, path, family="otaplug", model="m1", version="1.4.0"))  # the test plugin's family
    return fw, path.read_bytes()


async def test_resumed_range_download_matches_the_sha256(gateway_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)
    async with gateway_factory() as gw:
        fw, data = await stored(gw, tmp_path)
        url = f"/api/gateway/firmware/{fw.id}/download"
        async with gw_client(gw, headers=ADMIN) as client:
            got = b""
            async with client.stream("GET", url) as r:  # the link drops after ~100 kB
                assert (r.status_code, r.headers["content-length"]) == (200, str(len(data)))
                assert r.headers["etag"] == f'"{fw.sha256}"' and r.headers["accept-ranges"] == "bytes"
                async for chunk in r.aiter_raw():
                    got += chunk
                    if len(got) >= 100_000:
                        break
            r = await client.get(url, headers={"Range": f"bytes={len(got)}-", "If-Range": fw.etag})
            assert r.status_code == 206
            assert r.headers["content-range"] == f"bytes {len(got)}-{len(data) - 1}/{len(data)}"
            assert r.headers["content-length"] == str(len(data) - len(got))
            whole = got + r.content
            assert hashlib.sha256(whole).hexdigest() == fw.sha256 and whole == data


async def test_range_edge_cases_and_conditional_get(gateway_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)
    async with gateway_factory() as gw:
        fw, data = await stored(gw, tmp_path, size=1000)
        url = f"/api/gateway/firmware/{fw.id}/download"
        async with gw_client(gw, headers=ADMIN) as client:
            r = await client.get(url, headers={"Range": "bytes=1000-"})
            assert (r.status_code, r.headers["content-range"]) == (416, "bytes */1000")
            assert r.json()["error"]["status"] == 416
            r = await client.get(url, headers={"Range": "bytes=-10"})
            assert (r.status_code, r.content) == (206, data[-10:])
            r = await client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"another-image"'})
            assert (r.status_code, r.content) == (200, data)  # the client's part is stale: send it whole
            r = await client.get(url, headers={"If-None-Match": fw.etag})
            assert (r.status_code, r.content) == (304, b"")
            assert (await client.get("/api/gateway/firmware/999/download")).status_code == 404
            listing = (await client.get("/api/gateway/firmware")).json()["firmware"]
            assert [(f["id"], f["sha256"]) for f in listing] == [(fw.id, fw.sha256)]
        async with gw_client(gw) as anonymous:
            assert (await anonymous.get(url)).status_code == 401


async def test_a_plugin_serves_the_same_file_under_its_own_route(gateway_factory, tmp_path):
    async with gateway_factory(plugins=[("otaplug", OtaPlugin())]) as gw:
        fw, data = await stored(gw, tmp_path)
        async with gw_client(gw) as client:
            r = await client.get("/otaplug/ota/check", params={"model": "m1", "current": "1.3.9", "device": "pk-1"})
            update = r.json()["update"]
            assert (update["version"], update["url"]) == ("1.4.0", f"/otaplug/ota/{fw.id}")
            r = await client.get(update["url"], headers={"Range": "bytes=0-99"})
            assert (r.status_code, r.content, r.headers["etag"]) == (206, data[:100], fw.etag)
            r = await client.get("/otaplug/ota/check", params={"model": "m1", "current": "1.4.0", "device": "pk-1"})
            assert r.json() == {"update": None}


async def test_reports_are_stored_and_failures_become_events(gateway_factory, monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)
    async with gateway_factory() as gw:
        for status in ("started", "downloaded", "verified", "failed"):
            await gw.ota.report("paku", "pk-1", status, version="1.4.0", detail="crc" if status == "failed" else "")
        with pytest.raises(ValueError, match="status: expected one of"):
            await gw.ota.report("paku", "pk-1", "exploded")
        async with gw_client(gw, headers=ADMIN) as client:
            reports = (await client.get("/api/gateway/firmware/reports", params={"device": "pk-1"})).json()["reports"]
            assert [r["status"] for r in reports] == ["failed", "verified", "downloaded", "started"]
            events = (await client.get("/api/gateway/events", params={"type": "ota_failed"})).json()["events"]
            assert [(e["device_id"], e["severity"], e["data"]["detail"]) for e in events] == [("pk-1", "warning", "crc")]


# -- ids out of range ----------------------------------------------------------------

HUGE_ID = 99999999999999999999999  # past SQLite's 64-bit INTEGER


async def test_ids_out_of_range_are_not_found(store, tmp_path):
    await add(store, tmp_path, "1.0.0")
    for bad in (HUGE_ID, -HUGE_ID, 2**63, 0, -1):
        assert await store.get(bad) is None
        with pytest.raises(OtaError, match=f"no firmware with id {bad}"):
            await trio.to_thread.run_sync(store.get_blocking, bad)
        with pytest.raises(OtaError, match=f"no firmware with id {bad}"):
            await trio.to_thread.run_sync(store.set_rollout_blocking, bad, 50)
    assert (await store.get(2**63 - 1)) is None
    with pytest.raises(ValueError, match="firmware_id"):
        await store.report("paku", "pk-1", "failed", firmware_id=HUGE_ID)


async def test_a_huge_firmware_id_is_a_404_on_admin_and_device_routes(gateway_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)
    async with gateway_factory(plugins=[("otaplug", OtaPlugin())]) as gw:
        await stored(gw, tmp_path, size=1000)
        async with gw_client(gw, headers=ADMIN) as client:
            for url in (f"/api/gateway/firmware/{HUGE_ID}", f"/api/gateway/firmware/{HUGE_ID}/download"):
                r = await client.get(url)
                assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found"), r.text
        async with gw_client(gw) as anonymous:  # a device route: no admin token, like paku's
            for fid in (HUGE_ID, 2**63):
                r = await anonymous.get(f"/otaplug/ota/{fid}")
                assert r.status_code == 404, r.text
                r = await anonymous.get(f"/otaplug/ota/{fid}/meta")
                assert r.status_code == 404, r.text


# -- file names -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fw\n.bin", "fw\r\nX-Evil: 1.bin", "fw\t.bin", "fw\x7f.bin", "fw\x85.bin",
                                  "fw\u202egnp.bin", "fw\udcff.bin"])
async def test_a_file_name_with_control_characters_is_refused(store, tmp_path, name):
    path = tmp_path / "src" / name
    path.parent.mkdir()
    path.write_bytes(b"image")  # "\udcff": the byte 0xff, not UTF-8 (Python's surrogateescape)
    with pytest.raises(OtaError, match=r"file name .*: a control or formatting character"):
        await trio.to_thread.run_sync(functools.partial(
            store.add_blocking, path, family="paku", model="m1", version="1.0.0"))
    assert await store.list() == []


async def test_any_stored_file_name_downloads_with_a_safe_content_disposition(gateway_factory, tmp_path, monkeypatch):
    """Names stored before they were checked (a newline, non-Latin-1) must not break downloads."""
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)
    async with gateway_factory(plugins=[("otaplug", OtaPlugin())]) as gw:
        fw, data = await stored(gw, tmp_path, size=1000)
        names = {"bad\nname.bin": ('attachment; filename="bad_name.bin"; filename*=UTF-8\'\'bad_name.bin'),
                 'fïrm "ware"\\✓.bin': ('attachment; filename="f_rm _ware___.bin"; '
                                        "filename*=UTF-8''f%C3%AFrm%20%22ware%22%5C%E2%9C%93.bin"),
                 "plain-1.0.bin": 'attachment; filename="plain-1.0.bin"'}
        async with gw_client(gw, headers=ADMIN) as client:
            for name, disposition in names.items():
                await gw.storage.write(lambda n=name: gw.storage.database.execute_sql(
                    "UPDATE core_firmware SET filename = ? WHERE id = ?", (n, fw.id)))
                for url in (f"/api/gateway/firmware/{fw.id}/download", f"/otaplug/ota/{fw.id}"):
                    r = await client.get(url)
                    assert (r.status_code, r.content) == (200, data), r.text
                    assert r.headers["content-disposition"] == disposition


# -- the URLs handed to devices --------------------------------------------------------

EVIL = {"Host": "evil.example:666", "X-Forwarded-Host": "evil.example"}


async def manifest_url(client) -> str:
    r = await client.get("/otaplug/ota/manifest.json", headers=EVIL)
    assert r.status_code == 200, r.text
    [entry] = r.json()["manifest"]
    return entry["url"]


async def test_manifest_urls_come_from_http_public_url_never_from_the_host_header(gateway_factory, tmp_path):
    settings = ["http.public_url='http://gw.site.example:8080/edge/'"]
    async with gateway_factory(plugins=[("otaplug", OtaPlugin())], settings=settings) as gw:
        fw, _ = await stored(gw, tmp_path, size=1000)
        async with gw_client(gw) as client:
            assert await manifest_url(client) == f"http://gw.site.example:8080/edge/otaplug/ota/{fw.id}"
        assert gw.ota.url("/x") == "http://gw.site.example:8080/edge/x"
        with pytest.raises(ValueError, match="absolute path"):
            gw.ota.url("x")


async def test_without_public_url_the_urls_are_the_listen_address_as_bound(gateway_factory, tmp_path):
    from gatewayd.testing import gw_url

    async with gateway_factory(plugins=[("otaplug", OtaPlugin())]) as gw:  # http.listen = 127.0.0.1:0
        fw, data = await stored(gw, tmp_path, size=1000)
        async with gw_client(gw) as client:
            url = await manifest_url(client)
            assert url == f"{gw_url(gw)}/otaplug/ota/{fw.id}" and not url.startswith("http://127.0.0.1:0/")
            assert (await client.get(url)).content == data


async def test_a_wildcard_listen_address_becomes_a_real_one_logged_once(gateway_factory, tmp_path, caplog):
    import logging
    import socket
    from urllib.parse import urlsplit

    from gatewayd.testing import gw_url

    async with gateway_factory(plugins=[("otaplug", OtaPlugin())], settings=["http.listen='0.0.0.0:0'"]) as gw:
        fw, data = await stored(gw, tmp_path, size=1000)
        with caplog.at_level(logging.WARNING, logger="gatewayd.ota"):
            async with gw_client(gw) as client:
                urls = [await manifest_url(client), await manifest_url(client)]
                parts = urlsplit(urls[0])
                assert urls[0] == urls[1] and parts.hostname != "0.0.0.0"
                assert parts.port == urlsplit(gw_url(gw)).port
                with socket.socket() as sock:
                    sock.bind((parts.hostname, 0))  # an address of this machine
                assert (await client.get(urls[0])).content == data  # and the gateway answers on it
        [warning] = [r for r in caplog.records if "http.public_url is not set" in r.getMessage()]
        assert "wildcard" in warning.getMessage()


async def test_the_gateway_signs_what_it_stores_with_its_site_key(gateway_factory, tmp_path):
    async with gateway_factory(plugins=[("otaplug", OtaPlugin())]) as gw:
        fw, _ = await stored(gw, tmp_path, size=1000)
        site = tmp_path / "var" / "firmware-signing.pem"
        assert oct(os.stat(site).st_mode & 0o777) == "0o600"
        public = load_public_key(tmp_path / "var" / "firmware-signing.pem.pub")
        public.verify(base64.b64decode(fw.signature), fw.signed_message())
        async with gw_client(gw) as client:
            [entry] = (await client.get("/otaplug/ota/manifest.json")).json()["manifest"]
            assert entry["signature"] == fw.signature
            r = await client.get(f"/otaplug/ota/{fw.id}")
            assert r.headers["x-firmware-signature"] == fw.signature


def test_a_public_url_asked_for_before_a_port_0_listener_is_bound_is_an_error_not_cached():
    from gatewayd.core.http.urls import PublicUrl
    from gatewayd.core.schema import Address

    bound: list[str] = []
    public = PublicUrl("", Address("127.0.0.1", 0), lambda: bound)
    with pytest.raises(RuntimeError, match="not bound yet"):
        public()
    bound.append("http://127.0.0.1:41234")
    assert public() == "http://127.0.0.1:41234"
    assert PublicUrl("https://gw.example", Address("0.0.0.0", 0))() == "https://gw.example"
