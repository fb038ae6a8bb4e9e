"""Issue 12: a client's `metadata` and ping `details` are bounded (encoded size, nesting, keys
and values), and a frame's maps and arrays are bounded while it is decoded, so a small frame
cannot become a huge tree of Python objects. Over a limit is `bad_request`: not fatal, `req`
echoed, the message naming the limit."""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import Dial, assert_error, registered
from tether.broker.server import Broker
from tether.protocol import (
    BROKER_FRAME_TYPES,
    CLIENT_FRAME_TYPES,
    DEFAULT_MAX_METADATA,
    MAX_METADATA_DEPTH,
    MAX_METADATA_OBJECTS,
    BadFrame,
    BadRequest,
    FrameDecoder,
    Ping,
    Pong,
    Publish,
    Register,
    StatsResult,
    encode,
)


def framed(m: dict[str, Any]) -> bytes:
    body = msgpack.packb(m, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def register_map(metadata: Any, req: int = 7) -> dict[str, Any]:
    return {
        "type": "register",
        "req": req,
        "client_id": "dev",
        "username": "alice",
        "password": "secret",
        "metadata": metadata,
    }


def nested(depth: int) -> dict[str, Any]:
    """A map `depth` levels deep (the map itself is level 1)."""
    m: dict[str, Any] = {}
    for _ in range(depth - 1):
        m = {"a": m}
    return m


def decode_all(data: bytes, **kw: Any) -> list[Any]:
    decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES, **kw)
    decoder.receive_data(data)
    items, fatal = decoder.drain()
    assert fatal is None, fatal
    return items


def refused(item: object, req: int | None, *words: str) -> BadRequest:
    assert isinstance(item, BadRequest), item
    assert not item.fatal
    assert item.req == req
    for word in words:
        assert word in item.message, item.message
    return item


# --- metadata and details: size, depth, objects --------------------------------------------


def test_metadata_at_the_byte_limit_is_accepted_and_one_more_is_refused() -> None:
    limit = 500
    # {"k": "x" * n} packs to 1 + 2 + header + n bytes; find the n that lands on the limit.
    n = next(n for n in range(limit) if len(msgpack.packb({"k": "x" * n})) == limit)
    ok, over = {"k": "x" * n}, {"k": "x" * (n + 1)}
    items = decode_all(
        framed(register_map(ok, 1)) + framed(register_map(over, 2)), max_metadata=limit
    )
    assert isinstance(items[0], Register) and items[0].metadata == ok
    refused(items[1], 2, "register.metadata", f"limit of {limit}", "max_metadata")
    assert items[1].field == "metadata"


def test_default_byte_limit_is_8_kib() -> None:
    assert FrameDecoder().max_metadata == DEFAULT_MAX_METADATA == 8192
    [item] = decode_all(framed(register_map({"blob": b"\0" * 9000})))
    refused(item, 7, "8192")


def test_depth_limit() -> None:
    ok, deep = nested(MAX_METADATA_DEPTH), nested(MAX_METADATA_DEPTH + 1)
    items = decode_all(framed(register_map(ok, 1)) + framed(register_map(deep, 2)))
    assert isinstance(items[0], Register) and items[0].metadata == ok
    refused(items[1], 2, "deeper", str(MAX_METADATA_DEPTH))
    # Lists count as levels too.
    items = decode_all(framed(register_map({"l": [[[[[[[[1]]]]]]]]}, 3)))
    refused(items[0], 3, "deeper")


def test_object_limit_counts_keys_and_values() -> None:
    half = MAX_METADATA_OBJECTS // 2
    ok = {f"k{i}": i for i in range(half)}  # exactly MAX_METADATA_OBJECTS keys and values
    over = {f"k{i}": i for i in range(half + 1)}
    in_lists = {"l": list(range(MAX_METADATA_OBJECTS))}  # 2 + 256 objects
    data = b"".join(framed(register_map(m, r)) for r, m in ((1, ok), (2, over), (3, in_lists)))
    items = decode_all(data)
    assert isinstance(items[0], Register) and items[0].metadata == ok
    refused(items[1], 2, "keys and values", str(MAX_METADATA_OBJECTS))
    refused(items[2], 3, "keys and values")


def test_ping_details_have_the_same_limits() -> None:
    data = b"".join(
        [
            framed({"type": "ping", "req": 1, "details": {"disk": "ok"}}),
            framed({"type": "ping", "req": 2, "details": {"b": b"\0" * 9000}}),
            framed({"type": "ping", "req": 3, "details": nested(MAX_METADATA_DEPTH + 1)}),
            framed({"type": "ping", "details": {i: i for i in range(200)}}),
            framed({"type": "ping", "req": 5}),
        ]
    )
    items = decode_all(data)
    assert items[0] == Ping(req=1, details={"disk": "ok"})
    refused(items[1], 2, "ping.details", "8192")
    refused(items[2], 3, "ping.details", "deeper")
    refused(items[3], None, "ping.details")
    assert items[4] == Ping(req=5)


def test_binary_and_int_keys_are_fine_within_the_limits() -> None:
    meta = {b"\xff\x00": 1, 7: [b"x", None, 1.5], "s": {"t": True}}
    [item] = decode_all(framed(register_map(meta)))
    assert isinstance(item, Register) and item.metadata == meta


# --- bombs: refused while decoding, before they become big Python trees ---------------------


def peak_while_decoding(data: bytes) -> tuple[list[Any], int]:
    decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
    tracemalloc.start()
    try:
        decoder.receive_data(data)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        items, fatal = decoder.drain()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert fatal is None, fatal
    return items, peak


def bomb_body(head: bytes, count: int, item: bytes) -> bytes:
    """A frame whose last key's value is a map header of `count` entries, each `item`."""
    body = head + b"\xdf" + struct.pack(">I", count) + item * count
    return struct.pack(">I", len(body)) + body


def test_the_issue_metadata_bomb_is_refused_with_little_memory() -> None:
    # The issue's attack: ~1 MiB of metadata `{0: {}}` x 350k, ~99x its size once decoded.
    head = b"\x86\xa4type\xa8register\xa3req\x0b\xa9client_id\xa3dev\xa8username\xa5alice"
    head += b"\xa8password\xa6secret\xa8metadata"
    items, peak = peak_while_decoding(bomb_body(head, 350_000, b"\x00\x80"))
    refused(items[0], 11, "register")
    assert peak < 2 << 20, peak  # the old decoder built ~100 MiB here


def test_nested_containers_in_an_unknown_key_are_counted() -> None:
    # Maps and arrays of at most 256 items each, nested: only the total count catches it.
    inner = b"\xdc\x00\xff" + b"\x90" * 255  # an array of 255 empty arrays
    body = b"\x84\xa4type\xa7publish\xa5topic\xa1t\xa7payload\xc4\x01x\xa3req\x05"
    # 200 of them keep the frame under SCAN_OVER (larger ones are judged as they arrive:
    # tests/test_protocol_scan.py), so the unpacker's own count is what refuses it.
    body = body[:-5] + b"\xa3req\x05\xa4junk\xdc\x00\xc8" + inner * 200
    body = b"\x85" + body[1:]
    items, peak = peak_while_decoding(struct.pack(">I", len(body)) + body)
    refused(items[0], 5, "maps and arrays")
    assert peak < 2 << 20, peak


def test_a_long_flat_map_is_refused_at_its_header() -> None:
    head = b"\x83\xa4type\xa4ping\xa3req\x03\xa7details"
    items, peak = peak_while_decoding(bomb_body(head, 30_000, b"\x01\x01"))  # < SCAN_OVER
    refused(items[0], 3, "over the limit of 256 items")
    assert peak < 1 << 20, peak


def test_a_big_publish_payload_still_decodes() -> None:
    payload = b"p" * ((1 << 20) - 100)
    frame = encode(Publish(topic="t", payload=payload, req=1))
    assert decode_all(frame, max_frame=1 << 20) == [Publish(topic="t", payload=payload, req=1)]


def test_malformed_msgpack_after_a_limit_is_still_bad_frame() -> None:
    head = b"\x83\xa4type\xa4ping\xa3req\x03\xa7details"
    data = bomb_body(head, 300, b"\x01\x01")
    data = data[:-1] + b"\xc1"  # 0xc1 is never valid msgpack
    decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
    decoder.receive_data(data)
    with pytest.raises(BadFrame):
        decoder.next_frame()


def test_nesting_past_msgpacks_own_stack_is_bad_frame() -> None:
    body = b"\x82\xa4type\xa4ping\xa7details" + b"\x91" * 2000 + b"\xc0"
    decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
    decoder.receive_data(struct.pack(">I", len(body)) + body)
    with pytest.raises(BadFrame):
        decoder.next_frame()


def test_a_decoder_of_broker_frames_trusts_its_broker() -> None:
    stats = {f"counter_{i}": i for i in range(1000)}
    decoder = FrameDecoder(accept=BROKER_FRAME_TYPES)
    decoder.receive_data(encode(StatsResult(req=1, stats=stats)))
    assert decoder.next_frame() == StatsResult(req=1, stats=stats)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_max_metadata_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_metadata"):
        FrameDecoder(max_metadata=bad)


# --- property: whatever is accepted is within the limits; byte-wise feeding agrees ----------

leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.text(max_size=40))
trees = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=6), st.dictionaries(st.text(max_size=8), kids, max_size=6)
    ),
    max_leaves=300,
)


def within_limits(m: dict[Any, Any]) -> bool:
    def walk(x: Any, depth: int) -> tuple[int, int]:
        if isinstance(x, dict):
            parts = [walk(v, depth + 1) for v in x.values()]
            return 2 * len(x) + sum(p[0] for p in parts), max([depth, *(p[1] for p in parts)])
        if isinstance(x, list):
            parts = [walk(v, depth + 1) for v in x]
            return len(x) + sum(p[0] for p in parts), max([depth, *(p[1] for p in parts)])
        return 0, depth - 1

    count, depth = walk(m, 1)
    size = len(msgpack.packb(m, use_bin_type=True))
    return count <= MAX_METADATA_OBJECTS and depth <= MAX_METADATA_DEPTH and size <= 2048


@settings(max_examples=60, deadline=None)
@given(meta=st.dictionaries(st.text(max_size=8), trees, max_size=8))
def test_accepted_iff_within_limits(meta: dict[str, Any]) -> None:
    data = framed(register_map(meta))
    whole = decode_all(data, max_metadata=2048)
    decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES, max_metadata=2048)
    bytewise: list[Any] = []
    for i in range(len(data)):
        decoder.receive_data(data[i : i + 1])
        items, fatal = decoder.drain()
        assert fatal is None
        bytewise += items
    [item] = whole
    assert type(bytewise[0]) is type(item) and str(bytewise[0]) == str(item)
    if within_limits(meta):
        assert isinstance(item, Register) and item.metadata == meta
    else:
        refused(item, 7)


# --- through a real broker ------------------------------------------------------------------


def test_broker_refuses_big_metadata_and_details_and_keeps_the_connection(
    broker: Broker, dial: Dial
) -> None:
    client = dial(broker)
    client.send_map(register_map({"blob": "x" * 9000}, req=3))
    assert_error(client.recv(), "bad_request", 3)
    registered(client.register("dev", metadata={"name": "ok"}))
    client.send_map({"type": "ping", "req": 4, "details": nested(40)})
    error = assert_error(client.recv(), "bad_request", 4)
    assert "ping.details" in error.message
    client.send(Ping(req=5, details={"disk": "ok"}))
    assert client.recv() == Pong(req=5)


def test_a_container_in_req_is_not_built_while_answering() -> None:
    # The refusal looks for `req`; a bomb there is skipped, not decoded.
    bomb = b"\xdc\x00\x64" + (b"\xdc\x00\xff" + b"\x90" * 255) * 100  # both < SCAN_OVER
    body = b"\x83\xa4type\xa4ping\xa3req" + bomb + b"\xa4junk" + bomb
    items, peak = peak_while_decoding(struct.pack(">I", len(body)) + body)
    refused(items[0], None, "ping", "maps and arrays")
    assert peak < 2 << 20, peak
