"""The daemon as an operator runs it: start, health, limits, graceful shutdown."""

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
import trio

from gatewayd.testing import gw_client, reserved_port, wait_until
from tests import plugin_everything, plugin_ingest

EVERYTHING = ("everything", plugin_everything)
STARTUP_S = 120  # for the daemon to answer /health (tests that start one have the time: DAEMON_TIMEOUT)
DAEMON_TIMEOUT = pytest.mark.timeout(STARTUP_S + 60)




def start_daemon(tmp_path, *extra):
    port = reserved_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "-p", "tests.plugin_everything", "run",
         "--set", f"http.listen=127.0.0.1:{port}", "--set", f"gateway.data_dir='{tmp_path / 'var'}'",
         "--set", "mqtt.broker=off", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    # ~2 s on an idle machine, over 20 s on a loaded one: wait for the answer, not a window.
    while time.monotonic() - began < STARTUP_S:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError("daemon exited: " + proc.stdout.read())
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no /health = 200 within {STARTUP_S} s")


@DAEMON_TIMEOUT
def test_sigterm_ends_the_daemon_with_status_0(tmp_path):
    proc, base = start_daemon(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = proc.stdout.read()
    assert "gateway started" in log and "gateway stopped" in log


@DAEMON_TIMEOUT
def test_in_flight_request_finishes_during_graceful_shutdown(tmp_path):
    proc, base = start_daemon(tmp_path, "--set", "gateway.shutdown_grace_s=3")
    result = {}

    def slow():
        result["r"] = httpx.post(base + "/everything/slow?s=1", timeout=60)

    import threading

    t = threading.Thread(target=slow)
    t.start()
    began = time.monotonic()  # until the request is under way in the daemon, however slow the machine
    while httpx.get(base + "/everything/slow", timeout=10).json()["under_way"] < 1:
        assert time.monotonic() - began < 60 and t.is_alive(), "the slow request never arrived"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert proc.wait(timeout=30) == 0
    assert result["r"].status_code == 201
    row_id = result["r"].json()["id"]
    with sqlite3.connect(tmp_path / "var" / "gatewayd.sqlite3") as conn:
        assert conn.execute("select device from everything_reading where id=?", (row_id,)).fetchone() == ("slow",)


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gatewayd", "run", "--set", f"http.listen=127.0.0.1:{port}",
             "--set", f"gateway.data_dir='{tmp_path}'", "--set", "mqtt.broker=off"],
            capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (http.listen)" in result.stderr


async def test_body_limit_gives_413_in_the_core_shape(gateway_factory):
    async with gateway_factory(plugins=[EVERYTHING], settings=["http.max_body_bytes=2048"]) as gw:
        async with gw_client(gw) as client:
            r = await client.post("/everything/readings", content=b"x" * 5000)
            assert r.status_code == 413
            assert r.json()["error"]["code"] == "payload_too_large"
            assert (await client.get("/everything/readings")).json() == {"count": 0}


async def test_unknown_route_uses_the_core_error_shape(gateway_factory):
    async with gateway_factory() as gw:
        async with gw_client(gw) as client:
            r = await client.get("/nope")
            assert r.status_code == 404
            assert r.json()["error"]["status"] == 404
            assert r.json()["error"]["code"] == "not_found"


async def test_an_open_upstream_circuit_is_a_warning_in_health(gateway_factory, upstream_receiver):
    # Nothing listens on the sink's URL: the first failure opens the circuit (threshold 1).
    dead = upstream_receiver.config_text(url=f"http://127.0.0.1:{reserved_port()}/upstream", breaker_threshold=1)
    async with gateway_factory(plugins=[("ingest", plugin_ingest)], config_text=dead) as gw, gw_client(gw) as client:
        assert (await client.post("/ingest/records", json={"device": "d1", "seq": 1})).status_code == 201

        async def health() -> Any:
            r = await client.get("/health")
            return r if r.json()["components"]["upstream.cloud"].get("breaker") == "open" else None

        r = await wait_until(health, timeout=60, what="the upstream circuit is open")
        doc = r.json()
        cloud = doc["components"]["upstream.cloud"]
        assert r.status_code == 200 and doc["status"] == "warning", doc
        assert (cloud["state"], cloud["reason"], cloud["severity"]) == ("degraded", "circuit_open", "warning"), cloud
        assert cloud["last_error"], cloud


async def test_health_lists_components(gateway_factory):
    async with gateway_factory(plugins=[EVERYTHING]) as gw:
        async with gw_client(gw) as client:
            doc = (await client.get("/health")).json()
    assert doc["status"] == "ok"
    assert doc["components"]["storage"]["state"] == "ok"
    assert doc["components"]["http"]["state"] == "ok"
    assert doc["plugins"] == {"everything": {"state": "ok"}}


async def test_metrics_are_prometheus_text(gateway_factory):
    async with gateway_factory(plugins=[EVERYTHING]) as gw:
        async with gw_client(gw) as client:
            await client.post("/everything/readings", json={"value": 1})
            r = await client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert "# TYPE gatewayd_everything_readings_total counter\ngatewayd_everything_readings_total 1.0\n" in text
    assert 'gatewayd_plugin_up{plugin="everything"} 1' in text
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            float(value)


@DAEMON_TIMEOUT
def test_backup_command_while_running(tmp_path):
    proc, base = start_daemon(tmp_path)
    try:
        for i in range(20):
            httpx.post(base + "/everything/readings", json={"value": i}, timeout=5)
        dest = tmp_path / "backups"
        dest.mkdir()
        result = subprocess.run(
            [sys.executable, "-m", "gatewayd", "backup", str(dest), "--set", f"gateway.data_dir='{tmp_path / 'var'}'"],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        (copy,) = dest.iterdir()
        with sqlite3.connect(copy) as conn:
            assert conn.execute("select count(*) from everything_reading").fetchone()[0] == 20
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_plugins_command_lists_the_plugin(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd", "-p", "tests.plugin_everything", "plugins", "--json"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    import json

    rows = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert rows["everything"]["enabled"] is True
    assert rows["everything"]["mount"] == "/everything"


def test_gatewayd_run_raises_its_open_files_limit_up_to_the_hard_one():
    # ~500 MQTT devices need ~1,000 descriptors: a 1024 soft limit must not be the ceiling.
    code = (
        "import resource\n"
        "from gatewayd.core.runtime import raise_open_files_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))\n"
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(256, 2048) (2048, 2048)"


async def test_services_stop_before_storage_closes(gateway_factory, caplog):
    """A notification's read on a reader thread (not cancellable) at the moment of a clean stop
    finishes with storage still open; nothing says the queue is unavailable."""
    seen: dict[str, bool] = {}
    reading = trio.Event()
    with caplog.at_level(logging.WARNING):
        async with gateway_factory() as gw:
            async def deliver_due() -> int:
                reading.set()
                await trio.to_thread.run_sync(time.sleep, 0.5)  # as storage.read's thread: shutdown waits for it
                seen["open"] = gw.storage.is_open
                return 0  # then the worker reads when the next one is due (or is cancelled first)

            gw.notifier.deliver_due = deliver_due
            gw.notifier._wake.set()  # the worker wakes, as when a rule fires
            await reading.wait()
    assert seen == {"open": True}
    assert "notification queue unavailable" not in caplog.text and not gw.storage.is_open
