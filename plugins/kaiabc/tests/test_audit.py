"""Issue #20's audit (docs/audit/issue-20.md): what no other test proved against a real gateway —
the spec's error object on a path or method the plugin does not have, a silent node that keeps
running flagged, and oscillators that resume after the gateway is killed (not stopped)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from kaiabc_testbed import AUTH, FAST, KAIABC, TOKEN, V1, pico, register

from gatewayd.testing import gw_client, reserved_port, start_gateway, wait_until
from gatewayd_kaiabc.live import Fleet


FULL = {"node_id": "pico_001", "detail_level": "full"}


def error(r, status, code):
    assert r.status_code == status, r.text
    assert r.headers["X-API-Version"] == "1.0.0", r.headers
    body = r.json()["error"]
    assert body["code"] == code and body["message"] and body["request_id"].startswith("req_"), body
    assert body["timestamp"].endswith("Z"), body
    return body


async def test_unknown_path_and_method_under_v1_are_the_specs_error(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        assert error(await client.get(f"{V1}/no/such/route", headers=AUTH), 404, "NOT_FOUND")["details"]["parameter"] == "path"
        error(await client.get(f"{V1}/oscillator/stat", headers=AUTH), 404, "NOT_FOUND")
        body = error(await client.delete(f"{V1}/health", headers=AUTH), 405, "METHOD_NOT_ALLOWED")
        assert "GET" in body["details"]["allowed"]
        error(await client.get(f"{V1}", headers=AUTH), 404, "NOT_FOUND")
        error(await client.get(f"{V1}/health/", headers=AUTH), 404, "NOT_FOUND")
        error(await client.post(f"{V1}/oscillator/state", headers=AUTH, json={}), 405, "METHOD_NOT_ALLOWED")
        error(await client.post(f"{V1}/sensors/temperature", headers=AUTH, content=b'{"node_id": ',
                                ), 400, "INVALID_PARAMETER")
        # the rest of the gateway keeps the core's shape
        r = await client.get("/api/no-such-route", headers=AUTH)
        assert r.status_code == 404 and "X-API-Version" not in r.headers and "request_id" not in r.json()["error"]


async def test_a_silent_node_keeps_running_on_its_last_temperature_flagged(gateway_factory):
    settings = FAST + ["plugins.kaiabc.stale_after_s=0.5"]
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        key = await register(client)
        node = {"X-API-Key": key}
        r = await client.post(f"{V1}/sensors/temperature", headers=node,
                              json={"node_id": "pico_001", "temperature_kelvin": 306.0})
        assert r.status_code == 200, r.text
        first = (await client.get(f"{V1}/oscillator/state", headers=node, params=FULL)).json()
        assert first["temperature_stale"] is False and first["entrainment_active"] is True, first

        async def stale():
            doc = (await client.get(f"{V1}/oscillator/state", headers=node, params=FULL)).json()
            return doc if doc["temperature_stale"] else None

        flagged = await wait_until(stale, what="the silent node flagged stale")
        assert flagged["entrainment_active"] is False
        assert flagged["temperature_kelvin"] == pytest.approx(306.0)  # its last filtered value

        async def still_running():
            doc = (await client.get(f"{V1}/oscillator/state", headers=node, params=FULL)).json()
            return doc if doc["simulated_hours"] > flagged["simulated_hours"] + 1 else None

        later = await wait_until(still_running, what="the stale node's oscillator advancing")
        assert later["temperature_stale"] is True and later["temperature_kelvin"] == pytest.approx(306.0)
        # a reading clears the flag
        r = await client.post(f"{V1}/sensors/temperature", headers=node,
                              json={"node_id": "pico_001", "temperature_kelvin": 306.0})
        doc = (await client.get(f"{V1}/oscillator/state", headers=node, params=FULL)).json()
        assert doc["temperature_stale"] is False, doc


ROOT = Path(__file__).resolve().parents[3]


class Daemon:
    """`python -m gatewayd run` (the installed plugins, kaiabc among them), as a subprocess that can be killed."""

    def __init__(self, tmp_path: Path):
        self.port = reserved_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / "gatewayd.toml"
        self.config.write_text(
            f"[gateway]\nid = 'site-1'\ndata_dir = '{tmp_path / 'var'}'\nshutdown_grace_s = 1.0\n"
            f"[http]\nlisten = '127.0.0.1:{self.port}'\naccess_log = false\n[mqtt]\nbroker = 'off'\n"
            "[plugins.kaiabc]\ntick_s = 0.05\ntime_acceleration = 3600.0\npersist_every_s = 0.1\n"
            "queries_per_minute = 100000\n")
        self.log = tmp_path / "daemon.log"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gatewayd", "run", "--config", str(self.config)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "GATEWAYD_ADMIN_TOKEN": TOKEN})
        async with httpx.AsyncClient(timeout=2) as client:

            async def healthy() -> bool:
                try:
                    if (await client.get(self.base + f"{V1}/health")).status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                return False

            await wait_until(healthy, timeout=120, step=0.05, what="the daemon answers /kaiabc/v1/health")

            async def started() -> bool:  # the plugin's startup (its oscillators resumed) is over
                doc = (await client.get(self.base + f"{V1}/health")).json()
                return doc["components"]["ode_solver"] == "operational"

            await wait_until(started, timeout=120, step=0.05, what="the kaiabc plugin started")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.mark.timeout(300)
async def test_oscillators_resume_after_the_gateway_is_killed(tmp_path):
    daemon = Daemon(tmp_path)
    await daemon.start()
    try:
        async with httpx.AsyncClient(base_url=daemon.base, timeout=10) as client:
            keys = {}
            for node, kelvin in (("pico_001", 305.0), ("pico_002", 299.0)):
                r = await client.post(f"{V1}/sensors/nodes", headers=AUTH, json=pico(node))
                assert r.status_code == 201, r.text
                keys[node] = {"X-API-Key": r.json()["api_key"]}
                r = await client.post(f"{V1}/sensors/temperature", headers=keys[node],
                                      json={"node_id": node, "temperature_kelvin": kelvin})
                assert r.status_code == 200, r.text
            r = await client.post(f"{V1}/simulation/pause", headers=AUTH, json={"node_id": "pico_002"})
            assert r.status_code == 200, r.text

            async def state(node):
                return (await client.get(f"{V1}/oscillator/state", headers=keys[node],
                                         params={"node_id": node, "detail_level": "full"})).json()

            async def advanced():
                doc = await state("pico_001")
                return doc if doc["simulated_hours"] > 6 else None

            await wait_until(advanced, what="six simulated hours")
            paused = await state("pico_002")
            before = await state("pico_001")
        daemon.kill()  # no shutdown: only what was persisted while running counts
        await daemon.start()
        async with httpx.AsyncClient(base_url=daemon.base, timeout=10) as client:
            health = (await client.get(f"{V1}/health")).json()
            assert health["components"]["sensor_nodes"]["total"] == 2, health
            after = (await client.get(f"{V1}/oscillator/state", headers=keys["pico_001"],
                                      params=FULL)).json()
            still = (await client.get(f"{V1}/oscillator/state", headers=keys["pico_002"],
                                      params={"node_id": "pico_002", "detail_level": "full"})).json()
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
    assert "simulated_hours" in after, after
    # persisted every 0.1 wall s = 6 simulated minutes: at most a few persists lost, never a reset to CT 0
    assert after["simulated_hours"] > before["simulated_hours"] - 0.5, (before, after)
    assert after["temperature_kelvin"] == pytest.approx(305.0) and after["filter"]["measurement_count"] == 1, (before, after)
    assert still["paused"] is True and still["simulated_hours"] == pytest.approx(paused["simulated_hours"])
    assert still["temperature_kelvin"] == pytest.approx(299.0)


async def test_a_request_while_the_oscillators_resume_waits_for_them(gateway_factory, tmp_path, monkeypatch):
    """The core serves HTTP before a plugin's startup is over; kaiabc's startup (the limit cycle,
    then every persisted node) takes a second or more. A node's reading in that window must wait
    for it, not be refused as from an unknown node nor be overwritten by the resumption."""
    async with gateway_factory(plugins=KAIABC, settings=FAST) as gw, gw_client(gw) as client:
        key = await register(client)
        r = await client.post(f"{V1}/sensors/temperature", headers={"X-API-Key": key},
                              json={"node_id": "pico_001", "temperature_kelvin": 305.0})
        assert r.status_code == 200, r.text
    release = trio.Event()
    prepare = Fleet.prepare

    async def held(self, etf=None):
        await release.wait()  # the restart's limit cycle takes as long as the test says
        await prepare(self, etf)

    monkeypatch.setattr(Fleet, "prepare", held)
    port = reserved_port()
    stop = trio.Event()

    async def restarted():  # the gateway's block starts only once its startup is over: run it aside
        settings = [*FAST, f"http.listen='127.0.0.1:{port}'"]
        async with start_gateway(tmp_path / "var", plugins=KAIABC, settings=settings):
            await stop.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(restarted)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

            async def serving():
                try:
                    return (await client.get(f"{V1}/health")).json()
                except httpx.TransportError:
                    return None

            health = await wait_until(serving, what="the restarted gateway serving HTTP")
            assert health["components"]["ode_solver"] == "starting", health  # still in its startup
            answers = []

            async def post():
                answers.append(await client.post(f"{V1}/sensors/temperature", headers={"X-API-Key": key},
                                                 json={"node_id": "pico_001", "temperature_kelvin": 306.0}))

            async with trio.open_nursery() as requests:
                requests.start_soon(post)
                await trio.sleep(0.3)  # the request is in (or answered already: the defect)
                release.set()
            [r] = answers
            assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
            doc = (await client.get(f"{V1}/oscillator/state", headers={"X-API-Key": key},
                                    params=FULL)).json()
            assert doc["filter"]["measurement_count"] == 2, doc  # the resumed filter, then this reading
            assert 305.0 < doc["temperature_kelvin"] < 306.0, doc
        stop.set()


async def test_non_finite_and_out_of_range_temperatures_name_the_parameter(gateway_factory):
    settings = ["plugins.kaiabc.configuration_per_minute=1000"]
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        key = await register(client)
        node = {"X-API-Key": key, "Content-Type": "application/json"}
        for value in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"400.0", b"273.14"):
            for path, raw in (
                    ("sensors/temperature", b'{"node_id": "pico_001", "temperature_kelvin": %s}' % value),
                    ("sensors/batch", b'{"node_id": "pico_001", "readings": [{"timestamp": "2026-01-01T00:00:00Z", '
                                      b'"temperature_kelvin": %s}]}' % value),
                    ("bulk/sensor-readings", b'{"readings": [{"node_id": "pico_001", "timestamp": '
                                             b'"2026-01-01T00:00:00Z", "temperature_kelvin": %s}]}' % value)):
                r = await client.post(f"{V1}/{path}", content=raw, headers=node)
                body = error(r, 400, "INVALID_PARAMETER")
                assert "temperature_kelvin" in body["details"]["parameter"], (path, value, body)
        for value in (b"NaN", b"1e999", b"400.0"):
            r = await client.put(f"{V1}/entrainment/parameters", headers={**AUTH, "Content-Type": "application/json"},
                                 content=b'{"node_id": "pico_001", "reference_temperature_kelvin": %s}' % value)
            body = error(r, 400, "INVALID_PARAMETER")
            assert "reference_temperature_kelvin" in body["details"]["parameter"], (value, body)
        doc = (await client.get(f"{V1}/filter/state", headers=AUTH, params={"node_id": "pico_001"})).json()
        assert doc["measurement_count"] == 0, doc  # nothing of a refused request was stored


async def test_configuration_and_ingestion_limits_are_their_own_and_per_node(gateway_factory):
    # the two registrations by the admin are configuration too: 2 + 2 PUTs
    settings = ["plugins.kaiabc.configuration_per_minute=4", "plugins.kaiabc.ingestion_per_minute=2"]
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        keys = {n: {"X-API-Key": await register(client, n)} for n in ("pico_001", "pico_002")}
        for _ in range(2):
            r = await client.put(f"{V1}/simulation/config", headers=AUTH, json={"max_step_size": 0.05})
            assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "4", r.text
        body = error(await client.put(f"{V1}/simulation/config", headers=AUTH, json={"max_step_size": 0.05}),
                     429, "RATE_LIMIT_EXCEEDED")
        assert body["message"] == "Rate limit of 4 requests per minute exceeded" and body["retry_after_seconds"] > 0
        # a query is another class: still answered
        assert (await client.get(f"{V1}/simulation/config", headers=AUTH)).status_code == 200
        for i in range(2):
            r = await client.post(f"{V1}/sensors/temperature", headers=keys["pico_001"],
                                  json={"node_id": "pico_001", "temperature_kelvin": 300.0 + i})
            assert r.status_code == 200, r.text
        error(await client.post(f"{V1}/sensors/temperature", headers=keys["pico_001"],
                                json={"node_id": "pico_001", "temperature_kelvin": 303.0}), 429, "RATE_LIMIT_EXCEEDED")
        # the other node has its own budget
        r = await client.post(f"{V1}/sensors/temperature", headers=keys["pico_002"],
                              json={"node_id": "pico_002", "temperature_kelvin": 303.0})
        assert r.status_code == 200 and r.headers["X-RateLimit-Remaining"] == "1", r.text


async def test_an_internal_error_is_the_specs_error_object(gateway_factory, monkeypatch):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        key = await register(client)

        def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        with monkeypatch.context() as patch:
            patch.setattr(Fleet, "snapshot", broken)
            body = error(await client.get(f"{V1}/oscillator/state", headers={"X-API-Key": key},
                                          params={"node_id": "pico_001"}), 500, "INTERNAL_ERROR")
            assert "a bug" not in body["message"]  # nothing of the code's insides is told
        r = await client.get(f"{V1}/oscillator/state", headers={"X-API-Key": key}, params={"node_id": "pico_001"})
        assert r.status_code == 200, r.text


async def test_a_reading_from_the_future_is_refused_and_does_not_lock_the_node_out(gateway_factory):
    async with gateway_factory(plugins=KAIABC) as gw, gw_client(gw) as client:
        node = {"X-API-Key": await register(client)}
        future = "2099-01-01T00:00:00Z"
        # (it was accepted, and the node's true readings refused as not newer from then on)
        body = error(await client.post(f"{V1}/sensors/batch", headers=node, json={
            "node_id": "pico_001", "readings": [{"timestamp": future, "temperature_kelvin": 300.0}]}),
            400, "INVALID_PARAMETER")
        assert body["details"]["parameter"] == "readings[0].timestamp", body
        error(await client.post(f"{V1}/sensors/temperature", headers=node, json={
            "node_id": "pico_001", "timestamp": future, "temperature_kelvin": 300.0}), 400, "INVALID_PARAMETER")
        error(await client.post(f"{V1}/bulk/sensor-readings", headers=node, json={"readings": [
            {"node_id": "pico_001", "timestamp": future, "temperature_kelvin": 300.0}]}), 400, "INVALID_PARAMETER")
        r = await client.post(f"{V1}/sensors/temperature", headers=node,
                              json={"node_id": "pico_001", "temperature_kelvin": 301.0})  # now
        assert r.status_code == 200 and r.json()["accepted"] is True, r.text


async def test_two_phase_shifts_of_one_node_at_once_one_is_409(gateway_factory):
    async with gateway_factory(plugins=KAIABC, settings=FAST) as gw, gw_client(gw) as client:
        await register(client)
        answers = []

        async def shift():
            answers.append(await client.post(f"{V1}/entrainment/phase-shift", headers=AUTH, json={
                "node_id": "pico_001", "shift_type": "delay", "magnitude_hours": 0.2}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(shift)
            nursery.start_soon(shift)
        assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]


async def test_two_partial_parameter_puts_at_once_keep_both_changes(gateway_factory):
    settings = ["plugins.kaiabc.configuration_per_minute=1000"]
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        await register(client)
        patches = ({"arrhenius_scaling": {"pre_exponential_factor": 1.6e8}},
                   {"structural_coupling": {"sensitivity": 1.2}})

        async def put(patch):
            r = await client.put(f"{V1}/entrainment/parameters", headers=AUTH,
                                 json={"node_id": "pico_001", "parameters": patch})
            assert r.status_code == 200, r.text

        async with trio.open_nursery() as nursery:
            for patch in patches:
                nursery.start_soon(put, patch)
        doc = (await client.get(f"{V1}/entrainment/parameters", headers=AUTH, params={"node_id": "pico_001"})).json()
        assert doc["parameters"]["arrhenius_scaling"]["pre_exponential_factor"] == 1.6e8, doc
        assert doc["parameters"]["structural_coupling"]["sensitivity"] == 1.2, doc


async def test_a_failed_plugins_503_is_the_specs_error_at_once(gateway_factory, tmp_path, monkeypatch):
    """The core answers a failed plugin's routes 503 (PluginUnavailable) before the plugin's own
    before_request (which would wait 30 s for a startup that failed), in the spec's object."""
    monkeypatch.setenv("GATEWAYD_ADMIN_TOKEN", TOKEN)
    settings = [f"gateway.data_dir='{tmp_path}/data'"]
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        await register(client)
        doc = (await client.get("/kaiabc/openapi.json", headers=AUTH)).json()  # says the 503 is the spec's
        declared = doc["paths"]["/kaiabc/v1/sensors/nodes"]["get"]["responses"]["503"]
        assert declared["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/SpecError"}
        # a stored setting this version cannot read (a downgrade, a hand edit): the next startup fails
        await gw.contexts["kaiabc"].state.put_setting("etf", {"no_such_parameter": 1})
    async with gateway_factory(plugins=KAIABC, settings=settings) as gw, gw_client(gw) as client:
        assert "kaiabc" in gw.failed, gw.failed
        for method, path in (("GET", "/sensors/nodes"), ("GET", "/health"), ("POST", "/sensors/temperature")):
            r = await client.request(method, f"{V1}{path}", headers=AUTH,
                                     json={"node_id": "pico_001", "temperature_kelvin": 298.0})
            body = error(r, 503, "SERVICE_UNAVAILABLE")
            assert body["message"].startswith("plugin unavailable: startup") and body["details"]["reason"], body
            assert "resuming" not in body["message"]  # not the plugin's own wait for its startup
            assert r.headers["Retry-After"] == "60"


async def test_a_clock_stepped_back_restamps_readings_without_a_timestamp(gateway_factory):
    """The gateway's clock stepped back an hour: a reading without a timestamp (stamped with that
    clock) is filtered, stamped just after the last one and flagged, not refused as not newer for
    an hour; a node's own timestamp is never moved; the log says when it starts and ends."""
    import time

    behind = [0.0]
    async with gateway_factory(plugins=KAIABC, clock=lambda: time.time() - behind[0]) as gw, \
            gw_client(gw) as client:
        key = {"X-API-Key": await register(client)}

        async def post(**more):
            r = await client.post(f"{V1}/sensors/temperature", headers=key,
                                  json={"node_id": "pico_001", "temperature_kelvin": 298.15, **more})
            assert r.status_code == 200, r.text
            return r.json()

        first = await post()
        assert first["accepted"] is True and first["timestamp_adjusted"] is False
        behind[0] = 3600.0  # NTP steps the clock back an hour
        for _ in range(2):
            doc = await post()
            assert doc["accepted"] is True and doc["timestamp_adjusted"] is True, doc
            assert "clock is behind" in doc["message"]
        # the node's own timestamp, older than its last reading: still refused, never moved
        own = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - behind[0] - 60))
        doc = await post(timestamp=own)
        assert doc["accepted"] is False and doc["timestamp_adjusted"] is False
        behind[0] = 0.0  # caught up
        doc = await post()
        assert doc["accepted"] is True and doc["timestamp_adjusted"] is False
        logs = (await client.get(f"{V1}/diagnostics/logs", headers=AUTH,
                                 params={"node_id": "pico_001", "sort": "timestamp:asc"})).json()["logs"]
        said = [(e["level"], e["message"].split(":")[0]) for e in logs if "clock" in e["message"]]
        assert said == [("warning", "the gateway's clock is behind this node's last reading (stepped back?)"),
                        ("info", "the gateway's clock has caught up with this node's readings")], said
        metrics = (await client.get("/metrics", headers=AUTH)).text
        assert "kaiabc_readings_restamped_total 2" in metrics.replace(".0", ""), metrics[-2000:]
