"""The rest of the device API against a real gateway: the handshake and signed uploads,
the configuration profile with its ETag, OTA check, download and report."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from sentinel_testbed import API, OPEN, PLUGIN, compress, creds_headers, points, sign, upload

from gatewayd.testing import add_firmware, gw_client, provision

REQUIRED = [*OPEN, "plugins.edgesentinel.signature='required'"]


async def test_the_handshake_gives_a_nonce_and_the_time(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        r = await client.post(f"{API}/auth/handshake", headers=creds_headers(node))
        doc = r.json()
        assert r.status_code == 200 and len(doc["nonce"]) == 32 and abs(doc["server_time"] - gw.clock()) < 5
        assert doc["server_time_iso"].endswith("Z") and doc["max_skew_s"] == 120 and not doc["signature_required"]
        r = await client.post(f"{API}/auth/handshake", headers={"X-Device-Id": "es-1"})
        assert r.status_code == 401 and r.json()["error"]["message"] == "missing X-Device-Id or X-Auth-Key header"


async def test_a_required_signature_covers_a_fresh_timestamp_and_a_nonce_once(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=REQUIRED) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        body = compress({"points": points(2)})
        post = f"{API}/telemetry/batch"
        r = await client.post(post, **upload(node, body))
        assert r.status_code == 401 and "missing X-Signature header" in r.json()["error"]["message"]
        now = str(int(gw.clock()))
        r = await client.post(post, **upload(node, body, **{"X-Signature": sign(node.signing_secret, body, now)}))
        assert r.status_code == 401 and "missing X-Timestamp" in r.json()["error"]["message"]
        stale = str(int(gw.clock()) - 600)
        r = await client.post(post, **upload(node, body, **{"X-Timestamp": stale,
                                                           "X-Signature": sign(node.signing_secret, body, stale)}))
        assert r.status_code == 401 and "not within 120 s" in r.json()["error"]["message"]
        r = await client.post(post, **upload(node, body, **{"X-Timestamp": now, "X-Signature": "ab" * 32}))
        assert r.status_code == 401 and r.json()["error"]["message"] == "bad signature"
        nonce = (await client.post(f"{API}/auth/handshake", headers=creds_headers(node))).json()["nonce"]
        signed = {"X-Timestamp": now, "X-Nonce": nonce, "X-Signature": sign(node.signing_secret, body, now, nonce)}
        r = await client.post(post, **upload(node, body, **signed))
        assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
        r = await client.post(post, **upload(node, body, **signed))  # the nonce again, another key
        assert r.status_code == 401 and "nonce already used" in r.json()["error"]["message"]
        # A timestamp alone (no handshake) is enough.
        other = compress({"points": points(3)})
        r = await client.post(post, **upload(node, other, **{"X-Timestamp": now,
                                                            "X-Signature": sign(node.signing_secret, other, now)}))
        # Another batch_id (the key, without one): records are deduplicated per batch_id, as the spec says.
        assert r.status_code == 200 and (r.json()["accepted"], r.json()["duplicates"]) == (3, 0)


async def test_an_optional_signature_is_checked_when_sent(gateway_factory):
    async with gateway_factory(plugins=PLUGIN, settings=OPEN) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1")
        body = compress({"points": points(1)})
        r = await client.post(f"{API}/telemetry/batch", **upload(node, body, **{"X-Signature": "00" * 32}))
        assert r.status_code == 401
        # The spec's "HMAC on body" without a timestamp: of the body alone.
        good = hmac.new(node.signing_secret.encode(), body, hashlib.sha256).hexdigest()
        r = await client.post(f"{API}/telemetry/batch", **upload(node, body, **{"X-Signature": good}))
        assert r.status_code == 200, r.text


async def test_the_profile_has_the_devices_overrides_and_an_etag(gateway_factory):
    settings = [*OPEN, "plugins.edgesentinel.devices.es-2.sampling_hz={vibration=2000.0}",
                "plugins.edgesentinel.profiles.ES-200.window_s=2.0"]
    async with gateway_factory(plugins=PLUGIN, settings=settings) as gw, gw_client(gw) as client:
        one = await provision(gw, "edgesentinel", "es-1", model="ES-200")
        two = await provision(gw, "edgesentinel", "es-2")
        r = await client.get(f"{API}/config", headers=creds_headers(one))
        doc = r.json()
        assert r.status_code == 200 and doc["profile"] == "ES-200" and doc["window_s"] == 2.0
        assert doc["endpoints"]["telemetry"].endswith("/edgesentinel/api/iot/v1/telemetry/batch")
        assert doc["ntp_servers"] == ["pool.ntp.org"] and doc["backpressure"]["degraded"] is False
        tag = r.headers["ETag"]
        r = await client.get(f"{API}/config", headers={**creds_headers(one), "If-None-Match": tag})
        assert r.status_code == 304 and r.content == b"" and r.headers["ETag"] == tag
        r = await client.get(f"{API}/config", headers={**creds_headers(two), "If-None-Match": tag})
        assert r.status_code == 200 and r.json()["sampling_hz"]["vibration"] == 2000.0
        assert r.json()["profile"] == "default"
        r = await client.get(f"{API}/config", headers=creds_headers(one), params={"x": "1"})
        assert r.status_code == 200  # no query declared: ignored like any firmware's cache-buster


async def test_ota_check_gives_a_signed_url_that_expires(gateway_factory, tmp_path):
    image = tmp_path / "es.bin"
    image.write_bytes(b"\x7fFW" * 1000)
    async with gateway_factory(plugins=PLUGIN, settings=[*OPEN, "plugins.edgesentinel.url_ttl_s=60"]) as gw, \
            gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1", model="ES-100")
        await add_firmware(gw, image, family="edgesentinel", model="ES-100", version="1.2.0", unsigned=True)
        r = await client.get(f"{API}/ota/check", headers=creds_headers(node), params={"current": "1.2.0"})
        assert r.json() == {"update_available": False, "version": None, "url": None, "url_expires_at": None,
                            "sha256": None, "size": None, "signature": None}
        r = await client.get(f"{API}/ota/check", headers=creds_headers(node), params={"current": "1.1.0"})
        doc = r.json()
        assert doc["update_available"] and doc["version"] == "1.2.0" and doc["size"] == 3000
        url = urlsplit(doc["url"])
        got = await client.get(f"{url.path}?{url.query}")
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == doc["sha256"]
        forged = url.query.replace("es-1", "es-2")
        assert (await client.get(f"{url.path}?{forged}")).status_code == 403
        r = await client.get(f"{API}/ota/check", headers=creds_headers(node), params={"current": "one"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("current: ")
        r = await client.post(f"{API}/ota/report", headers=creds_headers(node),
                              json={"status": "installed", "version": "1.2.0"})
        assert r.status_code == 200 and r.json() == {"recorded": True}
        r = await client.post(f"{API}/ota/report", headers=creds_headers(node), json={"status": "exploded"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("status: ")


async def test_an_expired_download_url_is_refused(gateway_factory, tmp_path):
    image = tmp_path / "es.bin"
    image.write_bytes(b"FW" * 100)
    now = [1_767_225_600.0]
    async with gateway_factory(plugins=PLUGIN, settings=[*OPEN, "plugins.edgesentinel.url_ttl_s=60"],
                               clock=lambda: now[0]) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1", model="ES-100")
        await add_firmware(gw, image, family="edgesentinel", model="ES-100", version="2.0.0", unsigned=True)
        url = urlsplit((await client.get(f"{API}/ota/check", headers=creds_headers(node))).json()["url"])
        now[0] += 61
        r = await client.get(f"{url.path}?{url.query}")
        assert r.status_code == 403 and "expired" in r.json()["error"]["message"]


async def test_across_a_restart_download_urls_stay_good_and_a_nonce_needs_a_new_handshake(gateway_factory,
                                                                                          tmp_path):
    """Decided (README.md, "Restarts"): the URL-signing key is kept on disk; nonces are not."""
    image = tmp_path / "es.bin"
    image.write_bytes(b"FW" * 500)
    body = compress({"points": points(2)})
    async with gateway_factory(plugins=PLUGIN, settings=REQUIRED) as gw, gw_client(gw) as client:
        node = await provision(gw, "edgesentinel", "es-1", model="ES-100")
        await add_firmware(gw, image, family="edgesentinel", model="ES-100", version="2.0.0", unsigned=True)
        url = urlsplit((await client.get(f"{API}/ota/check", headers=creds_headers(node))).json()["url"])
        nonce = (await client.post(f"{API}/auth/handshake", headers=creds_headers(node))).json()["nonce"]
        key = gw.contexts["edgesentinel"].data_dir / "url-signing.key"
        assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    async with gateway_factory(plugins=PLUGIN, settings=REQUIRED) as gw, gw_client(gw) as client:
        got = await client.get(f"{url.path}?{url.query}")  # handed out before the restart
        assert got.status_code == 200 and got.content == image.read_bytes()
        now = str(int(gw.clock()))
        signed = {"X-Timestamp": now, "X-Nonce": nonce, "X-Signature": sign(node.signing_secret, body, now, nonce)}
        r = await client.post(f"{API}/telemetry/batch", **upload(node, body, **signed))
        assert r.status_code == 401 and r.json()["error"]["message"].endswith("handshake again"), r.text
        nonce = (await client.post(f"{API}/auth/handshake", headers=creds_headers(node))).json()["nonce"]
        signed = {"X-Timestamp": now, "X-Nonce": nonce, "X-Signature": sign(node.signing_secret, body, now, nonce)}
        r = await client.post(f"{API}/telemetry/batch", **upload(node, body, **signed))
        assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
        forged = url.query.replace("sig=", "sig=0")[:-1]  # another key's signature is still refused
        assert (await client.get(f"{url.path}?{forged}")).status_code == 403
