"""Tests for protocol.codec: framing, incremental decoding, encoders, fuzzing."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.protocol import (
    BROKER_FRAME_TYPES,
    CLIENT_FRAME_TYPES,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_METADATA,
    FRAME_TYPES,
    HEALTH_STATUSES,
    MAX_CLIENT_ID_CHARS,
    MAX_TOPIC_CHARS,
    NEED_DATA,
    Ack,
    BadFrame,
    BadRequest,
    Deliver,
    Dropped,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    Ok,
    Ping,
    Pong,
    Publish,
    Register,
    Registered,
    RemoteProtocolError,
    Stats,
    StatsResult,
    Subscribe,
    Unregister,
    Unsubscribe,
    deliver_overhead,
    encode,
    encode_deliver,
    encode_delivers,
    encode_many,
    encode_map,
)
from tether.protocol.codec import _check_free_map

# --- strategies ----------------------------------------------------------------------------

ints = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
opt_ints = st.none() | ints
non_neg = st.integers(min_value=0, max_value=(1 << 64) - 1)
topics = st.text(min_size=1, max_size=MAX_TOPIC_CHARS)
publish_topics = topics.filter(lambda t: not t.startswith("$"))
payloads = st.binary(max_size=300)
keepalives = st.integers(min_value=1, max_value=65535)

# Values that survive a msgpack round trip unchanged (no tuples, no NaN).
msgpack_scalars = (
    st.none()
    | st.booleans()
    | ints
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10) | st.integers(-100, 100), inner, max_size=4)
    ),
    max_leaves=12,
)


def _fits(m: dict[Any, Any]) -> bool:
    """Within the decoder's limits on metadata and details (size, depth, objects)."""
    try:
        _check_free_map(m, "register", "metadata", None, DEFAULT_MAX_METADATA)
    except BadRequest:
        return False
    return True


# Keys may be any msgpack scalar on the wire, though the field is typed dict[str, Any].
msgpack_maps: st.SearchStrategy[dict[Any, Any]] = st.dictionaries(
    st.text(max_size=10) | st.integers(-100, 100), msgpack_values, max_size=8
).filter(_fits)


@st.composite
def registers(draw: st.DrawFn) -> Register:
    resuming = draw(st.booleans())
    return Register(
        req=draw(ints),
        client_id=draw(st.text(min_size=1, max_size=MAX_CLIENT_ID_CHARS)),
        username=draw(st.text(max_size=30)),
        password=draw(st.none() | st.text(max_size=30)) if resuming else draw(st.text()),
        session_id=draw(st.text(max_size=40)) if resuming else None,
        resume_token=draw(st.text(max_size=40)) if resuming else None,
        keepalive=draw(keepalives),
        metadata=draw(msgpack_maps),
        takeover=draw(st.booleans()),
    )


client_frames: st.SearchStrategy[Frame] = st.one_of(
    registers(),
    st.builds(Subscribe, req=ints, topic=topics),
    st.builds(Unsubscribe, req=ints, topic=topics),
    st.builds(Publish, topic=publish_topics, payload=payloads, req=opt_ints),
    st.builds(Ack, topic=topics, seq=non_neg),
    st.builds(
        Ping,
        req=opt_ints,
        status=st.none() | st.sampled_from(sorted(HEALTH_STATUSES)),
        details=st.none() | msgpack_maps,
    ),
    st.builds(Unregister, req=ints),
    st.builds(Stats, req=ints),
)

broker_frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(StatsResult, req=ints, stats=st.dictionaries(st.text(max_size=20), non_neg)),
    st.builds(
        Registered,
        req=ints,
        session_id=st.text(max_size=40),
        resume_token=st.text(max_size=40),
        resumed=st.booleans(),
        keepalive=keepalives,
        expiry=non_neg,
        queued=non_neg,
        dropped=non_neg,
    ),
    st.builds(Ok, req=ints),
    st.builds(Pong, req=opt_ints),
    st.builds(
        Deliver,
        topic=topics,
        seq=st.integers(min_value=1, max_value=(1 << 64) - 1),
        payload=payloads,
        redelivered=st.booleans(),
    ),
    st.builds(Dropped, topic=topics, count=non_neg),
    st.builds(
        Error,
        req=opt_ints,
        code=st.sampled_from(list(ErrorCode)) | st.text(max_size=20),
        message=st.text(max_size=50),
    ),
)

# Each frame paired with the decoder accept-set of its direction.
directed_frames = st.one_of(
    st.tuples(client_frames, st.just(CLIENT_FRAME_TYPES)),
    st.tuples(broker_frames, st.just(BROKER_FRAME_TYPES)),
)

# --- helpers -------------------------------------------------------------------------------


def prefix(n: int) -> bytes:
    return struct.pack(">I", n)


def raw_frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return prefix(len(body)) + body


def feed(decoder: FrameDecoder, chunks: Iterable[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        out.extend(decoder.frames())
    return out


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def decode_three_ways(data: bytes, **kwargs: Any) -> list[Frame]:
    """Decode `data` whole, byte by byte, and followed by a partial frame; all must agree."""
    whole = FrameDecoder(**kwargs)
    frames = feed(whole, [data])
    assert whole.buffered == 0
    assert whole.next_frame() is NEED_DATA

    bytewise = FrameDecoder(**kwargs)
    assert feed(bytewise, [data[i : i + 1] for i in range(len(data))]) == frames
    assert bytewise.buffered == 0

    trailing = encode(Ok(req=1))[:7]
    tail = FrameDecoder(**kwargs)
    assert feed(tail, [data + trailing]) == frames
    assert tail.next_frame() is NEED_DATA
    assert tail.buffered == len(trailing)
    return frames


# --- round trips ---------------------------------------------------------------------------


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(directed_frames)
def test_round_trip_single_frame(item: tuple[Frame, Any]) -> None:
    frame, accept = item
    assert decode_three_ways(encode(frame), accept=accept) == [frame]


@settings(max_examples=40)
@given(st.lists(client_frames, max_size=6), st.lists(st.integers(min_value=0), max_size=10))
def test_any_split_of_a_stream_decodes_the_same(frames: list[Frame], cuts: list[int]) -> None:
    data = encode_many(frames)
    assert data == b"".join(encode(f) for f in frames)
    decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
    assert feed(decoder, split_at(data, cuts)) == frames
    assert decoder.buffered == 0


@settings(max_examples=30)
@given(st.lists(broker_frames, min_size=1, max_size=5))
def test_broker_stream_three_ways(frames: list[Frame]) -> None:
    assert decode_three_ways(encode_many(frames), accept=BROKER_FRAME_TYPES) == frames


@given(
    topic=topics,
    seq=st.integers(min_value=1, max_value=(1 << 64) - 1),
    payload=payloads,
    redelivered=st.booleans(),
)
def test_encode_deliver_is_byte_identical(
    topic: str, seq: int, payload: bytes, redelivered: bool
) -> None:
    expected = encode(Deliver(topic=topic, seq=seq, payload=payload, redelivered=redelivered))
    assert encode_deliver(topic, seq, payload, redelivered) == expected


# Seqs near each msgpack width step, payloads near each bin width step.
_seq_starts = st.sampled_from([1, 120, 250, 65530, (1 << 32) - 6, (1 << 64) - 40]) | st.integers(
    1, (1 << 64) - 40
)


@settings(max_examples=300, deadline=None)
@given(
    topic=publish_topics,
    first=_seq_starts,
    gaps=st.lists(st.integers(1, 3), max_size=12),
    sizes=st.lists(st.sampled_from([0, 1, 200, 255, 256, 300, 65535, 65536]), min_size=13),
    redeliver_upto=st.integers(0, 20),
    data=st.data(),
)
def test_encode_delivers_is_encode_deliver_per_frame(
    topic: str,
    first: int,
    gaps: list[int],
    sizes: list[int],
    redeliver_upto: int,
    data: st.DataObject,
) -> None:
    seqs = [first]
    for gap in gaps:
        seqs.append(seqs[-1] + gap)
    uniform = data.draw(st.booleans(), label="one payload size")
    lengths = [sizes[0]] * len(seqs) if uniform else sizes[: len(seqs)]
    entries = [(seq, bytes(n)) for seq, n in zip(seqs, lengths, strict=True)]
    upto = first - 1 + redeliver_upto if redeliver_upto else 0
    frames = encode_delivers(topic, entries, upto)
    assert frames == [encode_deliver(topic, s, p, s <= upto) for s, p in entries]
    least, most = deliver_overhead(topic)
    assert all(least <= len(f) - len(p) <= most for f, (_, p) in zip(frames, entries, strict=True))


def test_many_small_frames_in_one_chunk() -> None:
    frames = [Publish(topic="t", payload=bytes([i % 256]), req=i) for i in range(20_000)]
    decoder = FrameDecoder()
    decoder.receive_data(encode_many(frames))
    assert list(decoder.frames()) == frames
    assert decoder.buffered == 0


# --- exact bytes (the wire must not drift) -------------------------------------------------


def test_exact_bytes_ok() -> None:
    # fixmap(2) "type" "ok" "req" 7 -> 14 body bytes
    body = b"\x82\xa4type\xa2ok\xa3req\x07"
    assert len(body) == 14
    assert encode(Ok(req=7)) == b"\x00\x00\x00\x0e" + body
    assert encode_map({"type": "ok", "req": 7}) == b"\x00\x00\x00\x0e" + body


def test_exact_bytes_deliver() -> None:
    body = b"\x84\xa4type\xa7deliver\xa5topic\xa1t\xa3seq\x01\xa7payload\xc4\x02hi"
    assert encode(Deliver(topic="t", seq=1, payload=b"hi")) == prefix(len(body)) + body
    assert encode_deliver("t", 1, b"hi") == prefix(len(body)) + body


def test_redelivered_key_only_when_true() -> None:
    def keys(frame: Frame) -> list[str]:
        return list(msgpack.unpackb(encode(frame)[4:], raw=False))

    assert keys(Deliver(topic="t", seq=1, payload=b"")) == ["type", "topic", "seq", "payload"]
    assert keys(Deliver(topic="t", seq=1, payload=b"", redelivered=True))[-1] == "redelivered"


def test_optional_none_fields_are_omitted() -> None:
    def body(frame: Frame) -> dict[str, Any]:
        return msgpack.unpackb(encode(frame)[4:], raw=False)  # type: ignore[no-any-return]

    assert body(Pong()) == {"type": "pong"}
    assert body(Ping()) == {"type": "ping"}
    assert body(Publish(topic="a", payload=b"x")) == {
        "type": "publish",
        "topic": "a",
        "payload": b"x",
    }
    assert body(Error(code="internal", message="m")) == {
        "type": "error",
        "code": "internal",
        "message": "m",
    }
    assert body(Register(req=1, client_id="c", username="u", password="p")) == {
        "type": "register",
        "req": 1,
        "client_id": "c",
        "username": "u",
        "password": "p",
        "keepalive": 30,
        "metadata": {},
        "takeover": False,
    }


def test_payload_is_msgpack_bin() -> None:
    data = encode(Publish(topic="a", payload=b"\xff"))
    assert b"\xc4\x01\xff" in data  # bin8, not str


# --- framing errors ------------------------------------------------------------------------


def test_zero_length_is_bad_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(prefix(0))
    with pytest.raises(BadFrame) as info:
        decoder.next_frame()
    assert info.value.fatal
    assert info.value.code == ErrorCode.BAD_FRAME


def test_too_large_raised_from_prefix_alone() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(prefix(DEFAULT_MAX_FRAME + 1))
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_frame()
    assert info.value.size == DEFAULT_MAX_FRAME + 1
    assert info.value.limit == DEFAULT_MAX_FRAME
    assert info.value.fatal
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_custom_max_frame_boundary() -> None:
    frame = Publish(topic="a", payload=b"x" * 100)
    data = encode(frame)
    n = len(data) - 4
    ok = FrameDecoder(max_frame=n)
    ok.receive_data(data)
    assert ok.next_frame() == frame
    small = FrameDecoder(max_frame=n - 1)
    small.receive_data(data[:4])
    with pytest.raises(FrameTooLarge):
        small.next_frame()


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_invalid_max_frame(bad: Any) -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=bad)


def test_fatal_error_is_sticky() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(prefix(0) + encode(Ok(req=1)))
    with pytest.raises(BadFrame) as first:
        decoder.next_frame()
    with pytest.raises(BadFrame) as second:
        decoder.next_frame()
    assert second.value is first.value
    decoder.receive_data(encode(Ok(req=2)))  # ignored after a fatal error
    assert decoder.buffered == 0
    with pytest.raises(BadFrame):
        list(decoder.frames())


def body_frame(body: bytes) -> bytes:
    return prefix(len(body)) + body


BAD_BODIES = {
    "trailing bytes": msgpack.packb({"type": "ok", "req": 1}) + b"\x00",
    "two maps": msgpack.packb({"type": "ok", "req": 1}) * 2,
    "truncated": msgpack.packb({"type": "ok", "req": 1})[:-1],
    "invalid utf-8 value": b"\x82\xa4type\xa2ok\xa3req\xa2\xff\xfe",
    "invalid utf-8 key": b"\x81\xa2\xff\xfe\xa2ok",
    "bytes key": msgpack.packb({b"type": "ok"}, use_bin_type=True),
    "int key": msgpack.packb({"type": "ok", 1: 2}),
    "non-map array": msgpack.packb(["type", "ok"]),
    "non-map str": msgpack.packb("ok"),
    "non-map nil": msgpack.packb(None),
    "missing type": msgpack.packb({"req": 1}),
    "int type": msgpack.packb({"type": 1, "req": 1}),
    "bin type": msgpack.packb({"type": b"ok", "req": 1}, use_bin_type=True),
    "nil type": msgpack.packb({"type": None}),
    "ext value": msgpack.packb({"type": "ok", "req": msgpack.ExtType(5, b"x")}),
    "nested ext": msgpack.packb(
        {"type": "ping", "details": {"a": [msgpack.ExtType(1, b"")]}}, use_bin_type=True
    ),
    "timestamp value": msgpack.packb({"type": "ok", "x": msgpack.Timestamp(1, 0)}),
    "nested timestamp": msgpack.packb({"type": "ok", "x": [{"y": msgpack.Timestamp(1, 0)}]}),
    "timestamp key": msgpack.packb({"type": "ok", "x": {msgpack.Timestamp(1, 0): 1}}),
    "reserved byte": b"\xc1",
    "unhashable key": b"\x82\xa4type\xa2ok\x81\x91\x01\x01",
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_bodies_are_bad_frame(body: bytes) -> None:
    data = body_frame(body)
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        decoder = FrameDecoder()
        with pytest.raises(BadFrame) as info:
            feed(decoder, chunks)
        assert info.value.fatal
        assert info.value.req is None


def test_deeply_nested_body_is_handled() -> None:
    body = b"\x82\xa4type\xa4ping\xa7details" + b"\x81\xa1a" * 5000 + b"\xc0"
    decoder = FrameDecoder()
    decoder.receive_data(body_frame(body))
    with pytest.raises(RemoteProtocolError):  # msgpack's nesting limit -> BadFrame
        decoder.next_frame()
    # Within msgpack's limit but over MAX_METADATA_DEPTH: refused, not fatal.
    body = b"\x82\xa4type\xa4ping\xa7details" + b"\x81\xa1a" * 500 + b"\xc0"
    decoder = FrameDecoder()
    decoder.receive_data(body_frame(body) + body_frame(b"\x82\xa4type\xa4ping\xa7details\x80"))
    with pytest.raises(BadRequest, match="deeper than the limit"):
        decoder.next_frame()
    assert isinstance(decoder.next_frame(), Ping)


# --- non-fatal errors ----------------------------------------------------------------------


def test_unknown_type_is_bad_request_with_req_and_decoder_continues() -> None:
    decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
    decoder.receive_data(raw_frame({"type": "bogus", "req": 9}) + encode(Ok(req=1))[:3])
    with pytest.raises(BadRequest) as info:
        decoder.next_frame()
    assert info.value.req == 9
    assert not info.value.fatal
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert decoder.next_frame() is NEED_DATA
    assert decoder.buffered == 3


def test_direction_matters() -> None:
    # A broker frame sent by a client is an unknown type for the broker's decoder.
    decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
    decoder.receive_data(encode(Ok(req=4)))
    with pytest.raises(BadRequest) as info:
        decoder.next_frame()
    assert info.value.req == 4
    decoder = FrameDecoder(accept=BROKER_FRAME_TYPES)
    decoder.receive_data(encode(Ping()))
    with pytest.raises(BadRequest):
        decoder.next_frame()


BAD_REQUESTS: dict[str, tuple[dict[str, Any], int | None]] = {
    "str payload": ({"type": "publish", "topic": "a", "payload": "x", "req": 3}, 3),
    "keepalive 0": (
        {"type": "register", "req": 5, "client_id": "c", "username": "u", "password": "p",
         "keepalive": 0},
        5,
    ),
    "bool req": ({"type": "subscribe", "req": True, "topic": "a"}, None),
    "publish to $sys": ({"type": "publish", "topic": "$sys/x", "payload": b"", "req": 2}, 2),
    "topic 257 chars": ({"type": "subscribe", "req": 1, "topic": "a" * 257}, 1),
    "empty topic": ({"type": "subscribe", "req": 1, "topic": ""}, 1),
    "client_id 129 chars": (
        {"type": "register", "req": 1, "client_id": "c" * 129, "username": "u", "password": "p"},
        1,
    ),
    "missing field": ({"type": "unsubscribe", "req": 8}, 8),
    "negative seq": ({"type": "ack", "topic": "a", "seq": -1}, None),
    "bad status": ({"type": "ping", "req": 1, "status": "fine"}, 1),
    "nil keepalive": (
        {"type": "register", "req": 1, "client_id": "c", "username": "u", "password": "p",
         "keepalive": None},
        1,
    ),
}  # fmt: skip


@pytest.mark.parametrize("body,req", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests(body: dict[str, Any], req: int | None) -> None:
    data = raw_frame(body) + encode(Ping(req=77))
    decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
    decoder.receive_data(data)
    with pytest.raises(BadRequest) as info:
        decoder.next_frame()
    assert info.value.req == req
    assert info.value.frame_type == body["type"]
    # Non-fatal: the next frame decodes normally.
    assert decoder.next_frame() == Ping(req=77)
    assert decoder.next_frame() is NEED_DATA


def test_topic_length_counts_characters() -> None:
    topic = "é" * MAX_TOPIC_CHARS  # 512 UTF-8 bytes, 256 characters
    frames = decode_three_ways(raw_frame({"type": "subscribe", "req": 1, "topic": topic}))
    assert frames == [Subscribe(req=1, topic=topic)]


def test_extra_keys_are_ignored() -> None:
    data = raw_frame({"type": "ok", "req": 1, "extra": [1, {"x": b"y"}], "more": None})
    assert decode_three_ways(data) == [Ok(req=1)]


def test_explicit_nil_for_optional_field_means_absent() -> None:
    assert decode_three_ways(raw_frame({"type": "pong", "req": None})) == [Pong()]


def test_metadata_with_non_str_keys() -> None:
    metadata: dict[Any, Any] = {1: "x", "y": [None, 1.5]}
    frame = Register(req=1, client_id="c", username="u", password="p", metadata=metadata)
    assert decode_three_ways(encode(frame)) == [frame]


# --- fuzzing -------------------------------------------------------------------------------


def drain(decoder: FrameDecoder) -> None:
    """Pull frames until NEED_DATA or a fatal error; only protocol errors may escape."""
    for _ in range(10_000):  # bounded: a decoder must never loop forever
        try:
            if decoder.next_frame() is NEED_DATA:
                return
        except BadRequest:
            continue
        except (BadFrame, FrameTooLarge):
            return
    raise AssertionError("decoder did not make progress")


@settings(max_examples=300)
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=5))
def test_fuzz_random_bytes(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame=1000)
    for chunk in split_at(data, cuts):
        decoder.receive_data(chunk)
        drain(decoder)


@settings(max_examples=300)
@given(st.lists(st.binary(min_size=1, max_size=60), min_size=1, max_size=4))
def test_fuzz_random_bodies_behind_valid_prefixes(bodies: list[bytes]) -> None:
    decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
    decoder.receive_data(b"".join(body_frame(b) for b in bodies))
    drain(decoder)


field_names = st.sampled_from(
    ["req", "topic", "payload", "client_id", "username", "password", "session_id",
     "resume_token", "keepalive", "metadata", "takeover", "seq", "status", "details",
     "resumed", "expiry", "queued", "dropped", "count", "code", "message", "redelivered"]
)  # fmt: skip


@settings(max_examples=150)
@given(
    st.sampled_from([*sorted(FRAME_TYPES), "nope"]),
    st.dictionaries(field_names, msgpack_values | topics | keepalives, max_size=10),
)
def test_fuzz_structured_maps(ftype: str, fields: dict[str, Any]) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(raw_frame({"type": ftype, **fields}))
    try:
        frame = decoder.next_frame()
    except BadRequest as e:
        req = fields.get("req")
        assert e.req == (req if type(req) is int else None)
    else:
        assert frame is not NEED_DATA
        assert frame.type == ftype
        # Whatever decodes must re-encode and decode to the same frame.
        assert decode_three_ways(encode(frame)) == [frame]
    assert decoder.next_frame() is NEED_DATA


@pytest.mark.parametrize("size", [0, 255, 256, 65535, 65536, 70000])
@pytest.mark.parametrize("seq", [1, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32])
def test_encode_deliver_matches_msgpack_at_every_width(size: int, seq: int) -> None:
    payload = bytes(size)
    for redelivered in (False, True):
        expected = encode(Deliver(topic="t", seq=seq, payload=payload, redelivered=redelivered))
        assert encode_deliver("t", seq, payload, redelivered) == expected


# --- drain(): the broker's batch path must agree with next_frame() ------------------------


def _next_frame_items(data: bytes, chunks: list[int]) -> tuple[list[Any], str | None]:
    dec = FrameDecoder(accept=CLIENT_FRAME_TYPES, max_frame=4096)
    out: list[Any] = []
    for piece in _split(data, chunks):
        dec.receive_data(piece)
        while True:
            try:
                frame = dec.next_frame()
            except BadRequest as e:
                out.append(("bad_request", e.req))
                continue
            except RemoteProtocolError as e:
                return out, str(e.code)
            if frame is NEED_DATA:
                break
            out.append(frame)
    return out, None


def _drain_items(data: bytes, chunks: list[int]) -> tuple[list[Any], str | None]:
    dec = FrameDecoder(accept=CLIENT_FRAME_TYPES, max_frame=4096)
    out: list[Any] = []
    for piece in _split(data, chunks):
        dec.receive_data(piece)
        items, fatal = dec.drain()
        out.extend(("bad_request", i.req) if isinstance(i, BadRequest) else i for i in items)
        if fatal is not None:
            assert dec.drain() == ([], fatal)  # the decoder stays failed
            return out, str(fatal.code)
    return out, None


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(client_frames, max_size=6),
    junk=st.sampled_from(
        [
            b"",
            encode_map({"type": "nope", "req": 3}),  # bad_request, decoding goes on
            encode_map({"type": "publish", "topic": "t", "payload": "str", "req": 4}),
            b"\x00\x00\x00\x02\xc1\xc1",  # bad_frame: ends the stream
            b"\x00\x00\x00\x00",  # empty frame
            b"\x00\x10\x00\x00",  # frame_too_large from the prefix alone
        ]
    ),
    more=st.lists(client_frames, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
)
def test_drain_agrees_with_next_frame(
    frames: list[Frame], junk: bytes, more: list[Frame], cuts: list[int]
) -> None:
    data = encode_many(frames) + junk + encode_many(more)
    assert _drain_items(data, cuts) == _next_frame_items(data, cuts)
