"""Sans-I/O framer properties: round trip, chunking, resynchronisation, limits."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gatewayd.protocol.framing import FRAMERS, CobsFramer, FramingError, LengthFramer, crc16_ccitt, make_framer

MAX = 300  # small enough that oversized cases come up, > 254 for COBS blocks
NAMES = sorted(FRAMERS)


def payloads_for(name: str, max_size: int = MAX) -> st.SearchStrategy[bytes]:
    """Payloads the framing can carry: non-empty, jsonl without newlines."""
    base = st.binary(min_size=1, max_size=max_size)
    if name == "jsonl":
        base = base.map(lambda b: b.replace(b"\n", b"x").rstrip(b"\r") or b"x")
    return base


@st.composite
def framer_and_payloads(draw, names=NAMES):
    name = draw(st.sampled_from(names))
    crc = draw(st.booleans())
    payloads = draw(st.lists(payloads_for(name), min_size=1, max_size=5))
    return make_framer(name, max_frame=MAX, crc=crc), payloads


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def feed_all(framer, chunks) -> list:
    out = []
    for chunk in chunks:
        out += framer.feed(chunk)
    return out


def frames(events) -> list[bytes]:
    return [e for e in events if isinstance(e, bytes)]


def test_crc_is_ccitt_false():
    assert crc16_ccitt(b"123456789") == 0x29B1


def test_known_encodings():
    assert make_framer("slip").encode(b"a\xc0b\xdb") == b"\xc0a\xdb\xdcb\xdb\xdd\xc0"
    assert make_framer("cobs").encode(b"\x11\x22\x00\x33") == b"\x00\x03\x11\x22\x02\x33\x00"
    assert make_framer("length").encode(b"hi") == b"\x00\x02hi"
    assert make_framer("jsonl", crc=True).encode(b"123456789") == b"12345678929B1\n"
    assert make_framer("length", crc=True).encode(b"123456789") == b"\x00\x0b123456789\x29\xb1"


def test_cobs_full_blocks():
    framer = CobsFramer(max_frame=1000)
    for body in (b"A" * 254, b"A" * 254 + b"\x00", b"A" * 508, b"\x00" * 3, b"A" * 253 + b"\x00" + b"B"):
        assert framer.feed(framer.encode(body)) == [body]


@given(framer_and_payloads(), st.lists(st.integers(min_value=0)))
def test_round_trip_in_any_chunking(fp, cuts):
    framer, payloads = fp
    stream = b"".join(framer.encode(p) for p in payloads)
    assert feed_all(framer, split(stream, cuts)) == payloads


@given(st.sampled_from(NAMES), st.booleans(), st.binary(max_size=400), st.lists(st.integers(min_value=0)))
def test_any_bytes_decode_the_same_in_any_chunking(name, crc, stream, cuts):
    """Frames *and* errors depend on the byte stream only, never on the reads."""
    whole = make_framer(name, max_frame=40, crc=crc).feed(stream)
    assert feed_all(make_framer(name, max_frame=40, crc=crc), split(stream, cuts)) == whole


@given(st.sampled_from(NAMES), st.booleans(), st.lists(st.binary(max_size=200), max_size=20))
def test_noise_never_raises_and_memory_stays_bounded(name, crc, chunks):
    framer = make_framer(name, max_frame=40, crc=crc)
    for chunk in chunks:
        for event in framer.feed(chunk):
            assert isinstance(event, (bytes, FramingError))
            if isinstance(event, bytes):
                assert 1 <= len(event) <= 40
        # A pending frame never holds more than a maximal encoded frame.
        assert len(framer._buf) <= 2 * (40 + 4) + 2


@given(st.sampled_from(["slip", "cobs"]), st.booleans(), st.binary(max_size=200), st.data())
def test_garbage_then_frame_yields_the_frame(name, crc, garbage, data):
    framer = make_framer(name, max_frame=MAX, crc=crc)
    payload = data.draw(payloads_for(name))
    events = framer.feed(garbage + framer.encode(payload))
    assert frames(events)[-1] == payload
    assert events[-1] == payload


@given(st.booleans(), st.binary(max_size=200), st.data())
def test_jsonl_garbage_then_newline_then_line_yields_the_line(crc, garbage, data):
    framer = make_framer("jsonl", max_frame=MAX, crc=crc)
    payload = data.draw(payloads_for("jsonl"))
    assert framer.feed(garbage + b"\n" + framer.encode(payload))[-1] == payload


def false_match_before(stream: bytes, stop: int, max_body: int) -> bool:
    """Does any offset before ``stop`` start a header + body that passes the CRC?"""
    for pos in range(stop):
        length = int.from_bytes(stream[pos : pos + 2], "big")
        body = stream[pos + 2 : pos + 2 + length]
        if 2 < length <= max_body and len(body) == length:
            if crc16_ccitt(body[:-2]).to_bytes(2, "big") == body[-2:]:
                return True
    return False


@given(st.binary(max_size=120), st.binary(min_size=1, max_size=60), st.lists(st.integers(min_value=0)))
def test_length_with_crc_resyncs_after_garbage(garbage, payload, cuts):
    """The documented promise: unless a header inside the garbage passes the
    length and CRC checks itself, the frame after the garbage is delivered
    once enough further bytes (here: more frames) have arrived."""
    framer = LengthFramer(max_frame=60, crc=True)
    frame = framer.encode(payload)
    filler = framer.encode(b"fill") * 10  # > max_frame + 4 bytes after the frame
    stream = garbage + frame + filler
    assume(not false_match_before(stream, len(garbage), framer.max_body))
    events = feed_all(framer, split(stream, cuts))
    assert frames(events) == [payload] + [b"fill"] * 10
    # One error per resync episode, not one per garbage byte.
    assert sum(isinstance(e, FramingError) for e in events) <= 1


def test_length_without_crc_trusts_the_header():
    framer = LengthFramer(max_frame=4)
    events = framer.feed(b"\x00\x06abcdef" + b"\x00\x00" + b"\x00\x02ok")
    assert events == [FramingError("oversized", b"\x00\x06"), FramingError("bad length", b"\x00\x00"), b"ok"]
    # The skipped body may arrive later than its header.
    assert framer.feed(b"\x00\x09abc") == [FramingError("oversized", b"\x00\x09")]
    assert framer.feed(b"defghi\x00\x02ok") == [b"ok"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("crc", [False, True])
def test_oversized_frame_is_reported_and_the_next_one_survives(name, crc):
    big, small = make_framer(name, max_frame=100, crc=crc), make_framer(name, max_frame=10, crc=crc)
    stream = big.encode(b"y" * 50) + big.encode(b"ok")
    events = small.feed(stream[:7]) + small.feed(stream[7:])
    assert frames(events) == [b"ok"]
    assert [e.reason for e in events if isinstance(e, FramingError)] == ["oversized"]


@pytest.mark.parametrize(
    ("name", "bad", "reason"),
    [
        ("slip", b"\xc0ab\xdbx\xc0", "bad escape"),
        ("slip", b"\xc0ab\xdb\xc0", "bad escape"),
        ("cobs", b"\x00\x05ab\x00", "bad cobs"),
        ("jsonl", b"hello" + b"0000\n", "crc mismatch"),
        ("jsonl", b"ab\n", "too short"),
        ("slip", b"\xc0hello\x00\x00\xc0", "crc mismatch"),
    ],
)
def test_error_reasons(name, bad, reason):
    framer = make_framer(name, crc=True)
    events = framer.feed(bad + framer.encode(b"next"))
    assert [e.reason for e in events if isinstance(e, FramingError)] == [reason]
    assert events[-1] == b"next"


def test_crlf_and_blank_lines():
    assert make_framer("jsonl").feed(b'{"a":1}\r\n\r\n\n{"b":2}\n') == [b'{"a":1}', b'{"b":2}']


@pytest.mark.parametrize("name", NAMES)
def test_encode_refuses_what_cannot_round_trip(name):
    framer = make_framer(name, max_frame=8)
    with pytest.raises(ValueError):
        framer.encode(b"")
    with pytest.raises(ValueError):
        framer.encode(b"123456789")


def test_make_framer_validates():
    with pytest.raises(ValueError, match="unknown framing"):
        make_framer("xmodem")
    with pytest.raises(ValueError):
        make_framer("length", max_frame=0xFFFF, crc=True)
    with pytest.raises(ValueError):
        make_framer("jsonl").encode(b"a\nb")


@pytest.mark.parametrize("name", ["jsonl", "slip", "cobs"])
def test_oversized_sample_is_the_frame_start_however_it_arrives(name):
    framer = make_framer(name, max_frame=10)
    noise = bytes(range(1, 200)).replace(b"\n", b"").replace(b"\xc0", b"")  # no delimiter
    events = feed_all(framer, split(noise, list(range(0, len(noise), 7))))
    # jsonl sends no leading delimiter: noise ends at the next newline only.
    events += framer.feed((b"\n" if name == "jsonl" else b"") + framer.encode(b"ok"))
    assert events[0] == FramingError("oversized", noise[:32])
    assert events[-1] == b"ok"
