"""Large frames from a client are judged as they arrive (protocol/scan.py): a publish of any
size within max_frame decodes as before, however its bytes are split and whatever the order of
its keys; any other large field is refused once `field_limit` of it has arrived, the rest of
the frame is discarded unread, and the frames behind it decode."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.protocol import (
    BadFrame,
    BadRequest,
    Deliver,
    FrameDecoder,
    Ping,
    Publish,
)
from tether.protocol.scan import SCAN_OVER, field_limit

MAX_FRAME = 1 << 20


def framed(m: Any) -> bytes:
    body = msgpack.packb(m, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def drain_all(decoder: FrameDecoder, data: bytes, chunk: int) -> list[Any]:
    """Feed `data` in chunks of `chunk` bytes, collecting frames and BadRequests in order."""
    out: list[Any] = []
    for i in range(0, len(data), chunk):
        decoder.receive_data(data[i : i + chunk])
        items, fatal = decoder.drain()
        out.extend(items)
        if fatal is not None:
            out.append(fatal)
            break
    return out


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(min_value=SCAN_OVER, max_value=MAX_FRAME - 200),
    chunk=st.sampled_from([1000, 4096, 65536, 300_000, MAX_FRAME]),
    order=st.permutations(["type", "topic", "payload", "req"]),
)
def test_a_large_publish_decodes_whatever_the_split_and_key_order(
    size: int, chunk: int, order: list[str]
) -> None:
    values = {"type": "publish", "topic": "t/1", "payload": b"\x07" * size, "req": 9}
    data = framed({k: values[k] for k in order}) + framed({"type": "ping", "req": 10})
    got = drain_all(FrameDecoder(max_frame=MAX_FRAME), data, chunk)
    assert got == [Publish(topic="t/1", payload=b"\x07" * size, req=9), Ping(req=10)]


def bomb(encoded: int) -> dict[str, Any]:
    """A details map of about `encoded` bytes: {"b": {0: {}} ...} is 99x dearer decoded."""
    return {"b": [{0: {}}] * (encoded // 3)}


@pytest.mark.parametrize("chunk", [4096, 65536, 256 * 1024])
def test_a_details_bomb_is_refused_before_it_is_buffered(chunk: int) -> None:
    decoder = FrameDecoder(max_frame=MAX_FRAME)
    bomb_frame = framed({"type": "ping", "req": 2, "details": bomb(900_000)})
    assert len(bomb_frame) > 800_000
    limit = field_limit(decoder.max_metadata)
    refused_at = None
    got: list[Any] = []
    for i in range(0, len(bomb_frame), chunk):
        decoder.receive_data(bomb_frame[i : i + chunk])
        items, fatal = decoder.drain()
        assert fatal is None
        got.extend(items)
        if items and refused_at is None:
            refused_at = i + chunk
        # Never more than the field limit and one read of it is held.
        assert decoder.buffered <= limit + chunk
    assert len(got) == 1 and isinstance(got[0], BadRequest)
    assert got[0].req == 2 and got[0].frame_type == "ping" and got[0].field == "details"
    assert refused_at is not None and refused_at <= limit + 2 * chunk
    # The frame's remaining bytes were dropped unread; the next frame decodes.
    assert decoder.buffered == 0
    decoder.receive_data(framed({"type": "ping", "req": 3}))
    assert decoder.next_frame() == Ping(req=3)


def test_a_large_field_that_arrived_whole_is_refused_and_what_follows_decodes() -> None:
    decoder = FrameDecoder(max_frame=MAX_FRAME)
    decoder.receive_data(
        framed({"type": "publish", "topic": "t", "payload": b"x", "junk": "y" * 200_000})
        + framed({"type": "ping", "req": 4})
    )
    items, fatal = decoder.drain()
    assert fatal is None
    assert isinstance(items[0], BadRequest) and items[0].field == "junk"
    assert items[1] == Ping(req=4)


def test_a_large_body_that_is_not_a_map_is_fatal_at_once() -> None:
    decoder = FrameDecoder(max_frame=MAX_FRAME)
    body = msgpack.packb([b"x" * 100_000])
    decoder.receive_data(struct.pack(">I", len(body)) + body[:1000])
    with pytest.raises(BadFrame):
        decoder.next_frame()


def test_a_large_frame_with_a_non_str_key_is_fatal_at_once() -> None:
    decoder = FrameDecoder(max_frame=MAX_FRAME)
    body = msgpack.packb({1: b"x" * 100_000})
    decoder.receive_data(struct.pack(">I", len(body)) + body[:1000])
    with pytest.raises(BadFrame):
        decoder.next_frame()


def test_a_client_reading_its_broker_does_not_scan() -> None:
    # A broker's deliver carries nothing but its payload large; the client's decoder takes
    # whatever its broker sends within max_frame.
    decoder = FrameDecoder(max_frame=MAX_FRAME, accept={"deliver": Deliver})
    payload = b"p" * 200_000
    data = framed({"type": "deliver", "topic": "t", "seq": 1, "payload": payload})
    got = drain_all(decoder, data, 4096)
    assert len(got) == 1 and got[0].payload == payload
