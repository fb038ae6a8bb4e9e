"""A subscriber's decoder for the hot path: deliver frames as plain tuples.

`protocol.FrameDecoder` builds and validates a frame object per message, about 5 us each here;
a subscriber of the relay or of a fan-out would then need more CPU than the server it
measures, on a 2-core machine. This decoder checks the same things a client relies on (the
length prefix and its limit, one msgpack map and nothing after it, string keys, the
deliver fields and their types) and hands every frame that is not a deliver to
`protocol.from_wire`, so control frames keep the protocol's own validation. The test suite
checks that both decoders agree.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from bench.harness import BenchError
from bench.wire import CLIENT_MAX_FRAME
from tether.protocol import BROKER_FRAME_TYPES, MAX_TOPIC_CHARS, BrokerFrame, from_wire

_LENGTH = struct.Struct(">I").unpack_from

# topic, seq, payload, redelivered
DeliverTuple = tuple[str, int, bytes, bool]


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} in a frame")


class DeliverDecoder:
    """Feed it reads; get back the frames they completed, delivers as `DeliverTuple`s."""

    __slots__ = ("_buf", "_max_frame")

    def __init__(self, max_frame: int = CLIENT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[DeliverTuple | BrokerFrame]:
        buf = self._buf
        buf += data
        size = len(buf)
        pos = 0
        out: list[DeliverTuple | BrokerFrame] = []
        append = out.append
        unpackb = msgpack.unpackb
        view = memoryview(buf)
        try:
            while size - pos >= 4:
                (n,) = _LENGTH(buf, pos)
                if n == 0 or n > self._max_frame:
                    raise BenchError(f"the server sent a frame length of {n}")
                end = pos + 4 + n
                if end > size:
                    break
                try:
                    m = unpackb(view[pos + 4 : end], raw=False, ext_hook=_no_ext)
                except Exception as exc:  # msgpack raises several types for bad input
                    raise BenchError(f"the server sent an undecodable frame: {exc}") from None
                pos = end
                if m.__class__ is not dict:
                    raise BenchError(f"the server sent a {type(m).__name__}, not a map")
                if m.get("type") == "deliver":
                    append(_deliver(m))
                else:
                    append(_other(m))
        finally:
            view.release()
        del buf[:pos]
        return out


def _deliver(m: dict[str, Any]) -> DeliverTuple:
    topic = m.get("topic")
    seq = m.get("seq")
    payload = m.get("payload")
    redelivered = m.get("redelivered", False)
    if (
        topic.__class__ is not str
        or not 0 < len(topic) <= MAX_TOPIC_CHARS  # type: ignore[arg-type]
        or seq.__class__ is not int
        or seq < 1  # type: ignore[operator]
        or payload.__class__ is not bytes
        or redelivered.__class__ is not bool
    ):
        raise BenchError(f"the server sent a malformed deliver: {m!r:.200}")
    return (topic, seq, payload, redelivered)  # type: ignore[return-value]


def _other(m: dict[str, Any]) -> BrokerFrame:
    if any(k.__class__ is not str for k in m):
        raise BenchError(f"the server sent a frame with non-string keys: {m!r:.200}")
    try:
        return from_wire(m, accept=BROKER_FRAME_TYPES)  # type: ignore[return-value]
    except Exception as exc:
        raise BenchError(f"the server sent an invalid frame: {exc}") from None
