"""`gatewayd firmware ...` as a subprocess, then the running gateway serves what it stored."""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from gatewayd.core.ota.store import load_private_key, signed_message
from gatewayd.testing import gw_client

REPO = Path(__file__).resolve().parents[1]
TOKEN = "firmware-cli-token"


def gatewayd(*args, data_dir, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gatewayd", *args, "--set", f"gateway.data_dir='{data_dir}'"],
                          capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


def test_add_list_rollout_and_verify(tmp_path):
    data_dir = tmp_path / "var"
    image = tmp_path / "door-ctl.bin"
    image.write_bytes(random.Random(1).randbytes(70_000))
    assert gatewayd("firmware", "keygen", str(tmp_path / "k.pem"), data_dir=data_dir).returncode == 0
    r = gatewayd("firmware", "add", str(image), "--family", "edgesentinel", "--model", "dc-2", "--version", "2.1.0",
                 "--channel", "beta", "--rollout", "25%", "--sign-key", str(tmp_path / "k.pem"), "--json",
                 data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    fw = json.loads(r.stdout)
    assert (fw["id"], fw["channel"], fw["rollout_percent"]) == (1, "beta", 25.0)
    assert fw["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert (data_dir / "firmware" / f"{fw['sha256']}.bin").read_bytes() == image.read_bytes()
    r = gatewayd("firmware", "rollout", "1", "60", data_dir=data_dir)
    assert r.returncode == 0 and "now offered to 60% of devices" in r.stdout
    r = gatewayd("firmware", "list", data_dir=data_dir)
    assert r.stdout.splitlines()[1].split()[:8] == ["1", "edgesentinel", "dc-2", "2.1.0", "beta", "60%", "70000",
                                                    "yes"]
    r = gatewayd("firmware", "verify", "1", "--public-key", str(tmp_path / "k.pem.pub"), data_dir=data_dir)
    assert r.returncode == 0 and "signature ok" in r.stdout, r.stderr


def test_a_bad_signature_is_rejected_and_nothing_is_stored(tmp_path):
    data_dir = tmp_path / "var"
    gatewayd("firmware", "keygen", str(tmp_path / "k.pem"), data_dir=data_dir)
    image = tmp_path / "fw.bin"
    image.write_bytes(b"the real image" * 1000)
    # Signed for a different hash (as if the image were swapped after signing).
    key = load_private_key(tmp_path / "k.pem")
    sig = base64.b64encode(key.sign(signed_message("paku", "m1", "1.0.0", "0" * 64))).decode()
    (tmp_path / "fw.sig").write_text(sig)
    r = gatewayd("firmware", "add", str(image), "--family", "paku", "--model", "m1", "--version", "1.0.0",
                 "--signature", str(tmp_path / "fw.sig"), "--public-key", str(tmp_path / "k.pem.pub"),
                 data_dir=data_dir)
    assert r.returncode == 1
    assert "bad signature" in r.stderr
    assert json.loads(gatewayd("firmware", "list", "--json", data_dir=data_dir).stdout) == {"firmware": []}
    assert [p.name for p in (data_dir / "firmware").iterdir()] == []  # no stray copy left behind
    # The right signature over the right manifest line is accepted.
    good = hashlib.sha256(image.read_bytes()).hexdigest()
    (tmp_path / "fw.sig").write_text(base64.b64encode(key.sign(signed_message("paku", "m1", "1.0.0", good))).decode())
    r = gatewayd("firmware", "add", str(image), "--family", "paku", "--model", "m1", "--version", "1.0.0",
                 "--signature", str(tmp_path / "fw.sig"), "--public-key", str(tmp_path / "k.pem.pub"),
                 data_dir=data_dir)
    assert r.returncode == 0, r.stderr


def test_bad_arguments_exit_with_a_message(tmp_path):
    r = gatewayd("firmware", "add", str(tmp_path / "missing.bin"), "--family", "paku", "--model", "m1",
                 "--version", "1.0.0", data_dir=tmp_path / "var")
    assert (r.returncode, r.stderr.strip()) == (1, f"gatewayd: no such file: {tmp_path / 'missing.bin'}")
    r = gatewayd("firmware", "add", "x", "--family", "paku", "--model", "m1", "--version", "1", "--rollout", "150",
                 data_dir=tmp_path / "var")
    assert r.returncode == 2 and "expected a percentage 0-100" in r.stderr


def test_a_file_name_with_a_newline_is_refused_and_nothing_is_stored(tmp_path):
    image = tmp_path / "door\nctl.bin"
    image.write_bytes(b"image")
    r = gatewayd("firmware", "add", str(image), "--family", "paku", "--model", "m1", "--version", "1.0.0",
                 data_dir=tmp_path / "var")
    assert r.returncode == 1 and "file name 'door\\nctl.bin': a control or formatting character (U+000A)" in r.stderr
    assert json.loads(gatewayd("firmware", "list", "--json", data_dir=tmp_path / "var").stdout) == {"firmware": []}


async def test_added_by_the_cli_then_downloaded_from_the_gateway(gateway_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)
    image = tmp_path / "fw.bin"
    image.write_bytes(random.Random(2).randbytes(200_000))
    r = await trio.to_thread.run_sync(functools.partial(
        gatewayd, "firmware", "add", str(image), "--family", "paku", "--model", "m1", "--version", "1.0.0",
        data_dir=tmp_path / "var"))
    assert r.returncode == 0, r.stderr
    with trio.fail_after(30):
        async with gateway_factory() as gw:  # the same data_dir (tmp_path / "var")
            async with gw_client(gw, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
                r = await client.get("/api/gateway/firmware/1/download")
                assert r.status_code == 200
                assert r.content == image.read_bytes()
                assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'


# Eight CLI processes in a row: each imports the whole gateway (1.3 s on a quiet box, up to
# 8 s at load 10 on two cores), so the suite's 60 s per test is too short for it under load.
@pytest.mark.timeout(300)
def test_images_are_signed_by_default_with_a_site_key_made_on_first_use(tmp_path):
    from gatewayd.core.ota.store import key_id, load_public_key

    data_dir = tmp_path / "var"

    def add(version, *extra):
        image = tmp_path / f"fw-{version}.bin"
        image.write_bytes(version.encode() * 1000)
        r = gatewayd("firmware", "add", str(image), "--family", "paku", "--model", "m1", "--version", version,
                     "--json", *extra, data_dir=data_dir)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    first = add("1.0.0")
    private = data_dir / "firmware-signing.pem"
    assert oct(os.stat(private).st_mode & 0o777) == "0o600"
    public = load_public_key(data_dir / "firmware-signing.pem.pub")
    assert first["key_id"] == key_id(public)
    public.verify(base64.b64decode(first["signature"]), signed_message("paku", "m1", "1.0.0", first["sha256"]))
    assert add("1.0.1")["key_id"] == first["key_id"]  # made once, then reused
    r = gatewayd("firmware", "verify", "1", data_dir=data_dir)  # the site key is trusted without --public-key
    assert r.returncode == 0 and f"signature ok (key {first['key_id']})" in r.stdout, r.stderr
    r = gatewayd("firmware", "site-key", data_dir=data_dir)
    assert r.stdout == (data_dir / "firmware-signing.pem.pub").read_text() and first["key_id"] in r.stderr
    # Unsigned only when asked for: per image, or for the site.
    assert add("1.0.2", "--unsigned")["signature"] is None
    assert add("1.0.3", "--set", "ota.sign_with_site_key=false")["signature"] is None
    r = gatewayd("firmware", "add", str(tmp_path / "fw-1.0.0.bin"), "--family", "paku", "--model", "m1",
                 "--version", "1.0.4", "--unsigned", "--set", "ota.require_signed=true", data_dir=data_dir)
    assert r.returncode == 1 and "ota.require_signed is on: an unsigned image is refused" in r.stderr


def test_callers_making_the_site_key_at_once_end_up_with_one_key(tmp_path):
    from gatewayd.core.ota.signing import SiteKey, key_id

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: key_id(SiteKey(tmp_path).private_key().public_key()), range(16)))
    assert len(set(ids)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["firmware-signing.pem", "firmware-signing.pem.pub"]
