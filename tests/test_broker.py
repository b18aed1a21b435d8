"""The managed mosquitto: files, $7$ logins, ACLs, SIGHUP reloads, supervision. Real mosquitto."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import trio

from gatewayd.core.mqtt.broker import (
    AclTemplate,
    BrokerAccount,
    ManagedBroker,
    find_mosquitto,
    hash_password,
    verify_password,
)
from gatewayd.core.mqtt.client import InboundMessage
from gatewayd.core.storage import Storage
from gatewayd.testing import add_device_account, device_client, gateway_client, wait_until


def test_hash_password_format_and_verify() -> None:
    h = hash_password("s3cret", salt=b"\x00" * 12)
    assert h.startswith("$7$101$AAAAAAAAAAAAAAAA$")
    assert verify_password("s3cret", h)
    assert not verify_password("s3cre", h)
    assert not verify_password("s3cret", "plain-text")
    assert hash_password("x") != hash_password("x")  # salted


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_verify_password_reads_mosquitto_passwd_output(tmp_path: Path) -> None:
    pwfile = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "alice", "wonder"], check=True)
    hashed = pwfile.read_text().strip().split(":", 1)[1]
    assert hashed.startswith("$7$") and verify_password("wonder", hashed)


def test_account_validation() -> None:
    with pytest.raises(ValueError):
        BrokerAccount("dev1", "plain-password")
    with pytest.raises(ValueError):
        BrokerAccount("a/b", hash_password("x"))
    with pytest.raises(ValueError):
        BrokerAccount("gatewayd", hash_password("x"))
    with pytest.raises(ValueError):
        AclTemplate("a/#", "write\n")  # type: ignore[arg-type]
    assert "hidden" in repr(BrokerAccount("dev1", hash_password("x")))


async def test_files_written_with_safe_modes(mqtt_broker: ManagedBroker) -> None:
    d = mqtt_broker.directory
    assert stat.S_IMODE((d / "passwd").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "gatewayd.secret").stat().st_mode) == 0o600
    conf = (d / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "persistence true" in conf
    assert f"listener {mqtt_broker.port} 127.0.0.1" in conf
    acl = (d / "acl").read_text()
    assert "pattern write dev/%u/#" in acl and "pattern read dev/%u/cmd" in acl
    assert "user gatewayd\ntopic readwrite #" in acl
    user, password = mqtt_broker.gateway_credentials()
    assert password not in (d / "passwd").read_text()  # only its hash
    # generated once: a new instance on the same directory keeps it
    assert ManagedBroker(d).gateway_credentials() == (user, password)


async def test_hash_password_accepted_by_real_login_anonymous_refused(mqtt_broker: ManagedBroker) -> None:
    with trio.fail_after(10):
        user, password = add_device_account(mqtt_broker, "dev1", "correct horse")
        async with device_client(mqtt_broker, user, password) as dev:
            assert not dev.connack.is_failure
        with pytest.raises(ConnectionRefusedError):
            async with device_client(mqtt_broker, user, "wrong"):
                pass
        with pytest.raises(ConnectionRefusedError):
            async with device_client(mqtt_broker, None, None, client_id="anon"):
                pass


async def test_device_cannot_publish_to_another_devices_topic(
    mqtt_broker: ManagedBroker, nursery: trio.Nursery, mqtt_storage: Storage
) -> None:
    with trio.fail_after(15):
        got: list[InboundMessage] = []

        async def handler(msg: InboundMessage) -> None:
            got.append(msg)

        client = await gateway_client(nursery, mqtt_storage, mqtt_broker)
        client.subscribe("dev/#", handler)
        await nursery.start(client.run)
        await wait_until(lambda: client.ready, what="gateway subscribed")
        u1, p1 = add_device_account(mqtt_broker, "dev1")
        add_device_account(mqtt_broker, "dev2")
        async with device_client(mqtt_broker, u1, p1) as dev1:
            await dev1.publish("dev/dev2/data", b"forged")  # denied by the ACL
            await dev1.publish("elsewhere/x", b"forged")  # outside any pattern
            await dev1.publish("dev/dev1/data", b"mine")
            # one publisher's QoS 1 messages arrive in order: once "mine" is here,
            # the forged ones would have been here before it
            await wait_until(lambda: any(m.payload == b"mine" for m in got), what="own message")
        assert [(m.topic, m.payload) for m in got] == [("dev/dev1/data", b"mine")]


async def test_device_cannot_read_another_devices_cmd(
    mqtt_broker: ManagedBroker, nursery: trio.Nursery, mqtt_storage: Storage
) -> None:
    with trio.fail_after(15):
        client = await gateway_client(nursery, mqtt_storage, mqtt_broker)
        await nursery.start(client.run)
        add_device_account(mqtt_broker, "dev1")
        u2, p2 = add_device_account(mqtt_broker, "dev2")
        async with device_client(mqtt_broker, u2, p2) as dev2:
            await dev2.subscribe("dev/dev1/cmd")
            await dev2.subscribe("dev/+/cmd")  # matches both; only its own may come
            await client.publish("dev/dev1/cmd", b"for dev1")
            await client.publish("dev/dev2/cmd", b"for dev2")
            await wait_until(lambda: dev2.received, what="own cmd")
            await trio.sleep(0.1)  # not a timing assertion: only lets a wrong extra copy show
            assert [(m.topic, m.payload) for m in dev2.received] == [("dev/dev2/cmd", b"for dev2")]


async def test_sighup_reload_keeps_clients_and_admits_new_account(
    mqtt_broker: ManagedBroker, mqtt_storage: Storage, nursery: trio.Nursery
) -> None:
    with trio.fail_after(15):
        got: list[bytes] = []

        async def handler(msg: InboundMessage) -> None:
            got.append(msg.payload)

        client = await gateway_client(nursery, mqtt_storage, mqtt_broker)
        client.subscribe("dev/+/data", handler)
        await nursery.start(client.run)
        u1, p1 = add_device_account(mqtt_broker, "dev1")
        pid = mqtt_broker.pid
        async with device_client(mqtt_broker, u1, p1) as dev1:
            u2, p2 = add_device_account(mqtt_broker, "dev2")  # rewrite passwd + SIGHUP
            async with device_client(mqtt_broker, u2, p2) as dev2:
                await dev2.publish("dev/dev2/data", b"new account")
            await dev1.publish("dev/dev1/data", b"still here")
            await wait_until(lambda: len(got) == 2, what="both messages")
            assert dev1.client.is_connected()
        assert mqtt_broker.pid == pid and mqtt_broker.restarts == 0
        assert client.connected and client.stats.reconnects == 0
        assert sorted(got) == [b"new account", b"still here"]


async def test_removed_account_is_refused_after_reload(mqtt_broker: ManagedBroker) -> None:
    with trio.fail_after(10):
        user, password = add_device_account(mqtt_broker, "dev1")
        mqtt_broker.set_accounts([])
        with pytest.raises(ConnectionRefusedError):
            async with device_client(mqtt_broker, user, password):
                pass


async def test_crashed_broker_is_restarted(mqtt_broker: ManagedBroker) -> None:
    with trio.fail_after(15):
        user, password = add_device_account(mqtt_broker, "dev1")
        old = mqtt_broker.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        await wait_until(lambda: mqtt_broker.restarts == 1 and mqtt_broker.state == "running", what="restart")
        assert mqtt_broker.pid not in (None, old)
        assert "exit code -9" in (mqtt_broker.last_error or "")
        async with device_client(mqtt_broker, user, password):
            pass


async def test_missing_mosquitto_is_unavailable_not_fatal(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    broker = ManagedBroker(tmp_path / "m", mosquitto=str(tmp_path / "no-such-mosquitto"))
    with trio.fail_after(5), caplog.at_level(logging.ERROR, "gatewayd.broker"):
        await nursery.start(broker.run)
    assert broker.state == "unavailable"
    assert "apt-get install mosquitto" in caplog.text


def test_find_mosquitto_looks_in_sbin() -> None:
    if not os.access("/usr/sbin/mosquitto", os.X_OK):
        pytest.skip("no /usr/sbin/mosquitto here")
    assert find_mosquitto("mosquitto") is not None


def test_concurrent_credential_writes_never_collide(tmp_path):
    """Each write has a temporary file of its own: many threads rewriting passwd at
    once leave a whole file and no stray temporaries (one shared name used to fail
    with FileNotFoundError when a second writer renamed it away)."""
    import threading

    from gatewayd.core.mqtt.broker import _write_atomic

    target = tmp_path / "passwd"
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(50):
                _write_atomic(target, f"writer {n} line {i}\n" * 20, 0o600)
        except BaseException as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    lines = target.read_text().splitlines()
    assert len(lines) == 20 and len(set(line.rsplit(" line ", 1)[0] for line in lines)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]
    assert target.stat().st_mode & 0o777 == 0o600
