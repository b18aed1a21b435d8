"""gatewayd.protocol.json_text: a document encoded once gives, wherever it is taken as
text (an object around it, a live event, an outbox record), what encoding the whole gives."""

from __future__ import annotations

import json
import math
import random

import pytest

from gatewayd.core.live.hub import LiveEvent, LiveHub, _encode
from gatewayd.protocol.json_text import Encoded, encoded, encoded_object


def dumps(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class Number(float):
    def __repr__(self):
        return "not-a-json-number"


VALUES = [0, -1, 2**62, 1.5, -0.0, 1e300, 2.5e-8, 1767323045.123, True, False, None, "", "ok", 'q"uo\\te',
          "tab\tnew\nline\x01", "héllo", "\u2028", "😀", [], {}, [1, "a", None], {"a": {"b": [1.5, {"c": True}]}},
          Number(1.5), Number(2)]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_encoded_is_the_outbox_encoding(value):
    assert encoded(value) == Encoded(value, dumps(value))


def test_an_object_of_parts_is_the_encoding_of_the_whole():
    rng = random.Random(6)
    for _ in range(2000):
        fields = {rng.choice(["type", "device_id", "ts", "ü", 'k"ey', "data", "x\ny"]) + str(i): rng.choice(VALUES)
                  for i in range(rng.randint(0, 6))}
        mixed = {k: encoded(v) if rng.random() < 0.5 else v for k, v in fields.items()}
        made = encoded_object(mixed)
        assert made.text == dumps(fields) and made.value == fields
        assert json.loads(made.text) == json.loads(dumps(fields))


def test_an_object_refuses_what_the_encoder_refuses():
    for bad in (math.nan, math.inf, -math.inf, {1, 2}, object()):
        with pytest.raises((TypeError, ValueError)):
            encoded_object({"a": bad})


def test_keys_that_are_not_strings_are_written_as_json_dumps_writes_them():
    assert encoded_object({1: "a", None: encoded([1])}).text == dumps({1: "a", None: [1]})  # type: ignore[dict-item]


def test_a_live_event_of_an_encoded_message_is_the_event_encoded_whole():
    hub = LiveHub()
    for data in ({"type": "telemetry_update", "data": {"v0": 1, "t": 25.5}}, {"name": "héllo"}, {"a": [None, True]}):
        event = hub.publish("thingsnxt.telemetry.d-1", encoded(data))
        plain = LiveEvent(event.id, event.stream, event.ts, data)
        assert event.data == data and event.json() == plain.json()
        assert event.json() == _encode({"id": event.id, "stream": "thingsnxt.telemetry.d-1", "ts": event.ts, "data": data})


def test_an_encoded_event_larger_than_allowed_is_refused():
    hub = LiveHub(max_event_bytes=100)
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        hub.publish("a.b.c", encoded({"v": "x" * 200}))
    assert hub.stats["published"] == 0


async def test_resume_replays_encoded_events_as_published():
    hub = LiveHub()
    first = hub.publish("a.b.c", encoded({"v": 1}))  # nobody watches: only the ring keeps them
    second = hub.publish("a.b.c", encoded({"v": "é"}))  # not ASCII: the event encodes its value
    sub = hub.subscribe(["a.#"], owner="x", last_id=first.id - 1)
    got = await sub.next()
    assert [e.id for e in got] == [first.id, second.id]
    assert [json.loads(e.json())["data"] for e in got] == [{"v": 1}, {"v": "é"}]
    assert got[1].json() == _encode({"id": second.id, "stream": "a.b.c", "ts": second.ts, "data": {"v": "é"}})
