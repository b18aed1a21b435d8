"""Final delivery marks are written after the acknowledgement, a few ms later, with others.

The acknowledgement waits for the records' commit (ARCHITECTURE: nothing acknowledged
before it is committed), not for the mark's final write: between the two, the memory
answers a redelivery (no handler runs again), and a crash there loses the note only: a
resend runs the handlers again with every ingest call answered, so nothing is stored
twice. The gateway, its mosquitto and the device's bytes are real.
"""

from __future__ import annotations

import trio

from gatewayd.core.mqtt.marks import DeliveryMarks, Seen
from gatewayd.testing import gw_mqtt_address

from .test_mqtt_edge import EdgePlugin, RawDevice, provision, stored_records


async def written_mark(gw, user: str, packet_id: int, topic: str, payload: bytes) -> Seen | None:
    """What the table says (a fresh DeliveryMarks: nothing noted in its memory)."""
    fresh = DeliveryMarks(gw.storage)
    return await fresh.seen(fresh.mark(f"edge:{user}", packet_id, topic, payload))


async def test_the_acknowledgement_does_not_wait_for_the_final_mark_and_a_resend_before_it_runs_nothing(
        gateway_factory):
    plugin = EdgePlugin()
    async with gateway_factory(plugins=[("edgetest", plugin)], mqtt=True) as gw:
        gw.mqtt.marks.flush_s = 3600.0  # the window between the acknowledgement and the write, held open
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        with trio.fail_after(5):
            await dev.publish("dev/d1/data", b"once", packet_id=7)
            assert await dev.expect_ack() == 7
        # Acknowledged: the records are committed; the mark, in the table, still lists the
        # call (not final), and the final note is in memory.
        assert len(await stored_records(gw)) == 1
        assert gw.mqtt.marks.unwritten == 1
        seen = await written_mark(gw, user, 7, "dev/d1/data", b"once")
        assert seen is not None and seen.calls is not None and len(seen.calls) == 1
        # The device lost the PUBACK and sends it again: answered from memory, the handler not run.
        await dev.stream.aclose()
        dev = await RawDevice.connect(port, user, password)
        with trio.fail_after(5):
            await dev.publish("dev/d1/data", b"once", packet_id=7, dup=True)
            assert await dev.expect_ack() == 7
        assert plugin.calls == 1
        assert gw.mqtt.delivery.stats.duplicates == 1
        assert len(await stored_records(gw)) == 1
        await gw.mqtt.marks.flush()
        assert gw.mqtt.marks.unwritten == 0
        assert await written_mark(gw, user, 7, "dev/d1/data", b"once") == Seen(None)


async def test_final_marks_are_written_within_the_flush_window(gateway_factory):
    plugin = EdgePlugin()
    async with gateway_factory(plugins=[("edgetest", plugin)], mqtt=True) as gw:
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        with trio.fail_after(5):
            for pid in range(1, 21):
                await dev.publish("dev/d1/data", b"m-%d" % pid, packet_id=pid)
            assert sorted([await dev.expect_ack() for _ in range(20)]) == list(range(1, 21))
        with trio.fail_after(5):  # the timer writes them (a few ms; generous on a loaded machine)
            while gw.mqtt.marks.unwritten:
                await trio.sleep(0.01)
        for pid in range(1, 21):
            assert await written_mark(gw, user, pid, "dev/d1/data", b"m-%d" % pid) == Seen(None)


async def test_a_graceful_stop_writes_the_final_marks(gateway_factory):
    async with gateway_factory(plugins=[("edgetest", EdgePlugin())], mqtt=True) as gw:
        gw.mqtt.marks.flush_s = 3600.0
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        with trio.fail_after(5):
            await dev.publish("dev/d1/data", b"last", packet_id=3)
            assert await dev.expect_ack() == 3
        assert gw.mqtt.marks.unwritten == 1
    async with gateway_factory(plugins=[("edgetest", EdgePlugin())], mqtt=True) as gw:
        assert await written_mark(gw, user, 3, "dev/d1/data", b"last") == Seen(None)


async def test_a_crash_between_the_acknowledgement_and_the_final_write_reruns_the_handler_and_stores_nothing_twice(
        gateway_factory, monkeypatch):
    """The rule for the window: the records were committed before the PUBACK; what a
    crash there loses is the note that every handler returned. A device whose PUBACK was
    lost with the crash sends the message again: its handlers run again, each ingest call
    is answered with what the first run stored, and the message is a duplicate."""
    first = EdgePlugin()
    async with gateway_factory(plugins=[("edgetest", first)], mqtt=True) as gw:
        gw.mqtt.marks.flush_s = 3600.0
        port = gw_mqtt_address(gw)[1]
        user, password = await provision(gw, "d1")
        dev = await RawDevice.connect(port, user, password)
        with trio.fail_after(5):
            await dev.publish("dev/d1/data", b"m-1", packet_id=1)
            assert await dev.expect_ack() == 1
        assert len(await stored_records(gw)) == 1

        async def crashed() -> None:  # the note dies with the process: never written
            pass

        monkeypatch.setattr(gw.mqtt.marks, "flush", crashed)
    second = EdgePlugin()
    async with gateway_factory(plugins=[("edgetest", second)], mqtt=True) as gw:
        port = gw_mqtt_address(gw)[1]
        seen = await written_mark(gw, user, 1, "dev/d1/data", b"m-1")
        assert seen is not None and seen.calls is not None, "the final mark was written after all"
        dev = await RawDevice.connect(port, user, password)
        with trio.fail_after(5):
            await dev.publish("dev/d1/data", b"m-1", packet_id=1, dup=True)
            assert await dev.expect_ack() == 1
        assert second.calls == 1  # run again: the rule for a crash in the window
        assert gw.mqtt.delivery.stats.duplicates == 1
        assert len(await stored_records(gw)) == 1  # its ingest call answered, not stored (nor its family row)


async def test_a_new_message_under_the_same_packet_id_drops_the_older_final_note(tmp_path, nursery):
    """A sender reuses a packet id once it has its acknowledgement: the older message's
    final note must not be written over the newer message's mark."""
    from gatewayd.core.storage import Storage

    storage = Storage(tmp_path / "marks.sqlite3")
    await nursery.start(storage.run)
    marks = DeliveryMarks(storage, flush_s=3600.0)
    await trio.to_thread.run_sync(marks.install)
    older = marks.mark("edge:d1", 5, "dev/d1/data", b"a")
    newer = marks.mark("edge:d1", 5, "dev/d1/data", b"b")
    marks.finish(older)
    assert await marks.seen(older) == Seen(None)
    marks.forget("edge:d1", 5)  # what Delivery does when the newer one starts
    await storage.write(newer.write, b"k" * 16)  # its first ingest call committed
    await marks.flush()
    assert await marks.seen(newer) == Seen([b"k" * 16])
    assert await marks.seen(older) is None
