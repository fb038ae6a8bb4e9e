"""Length-prefixed msgpack framing: a sans-IO incremental decoder and the encoders."""

from __future__ import annotations

import bisect
import enum
import functools
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, Final

import msgpack

from .errors import BadFrame, BadRequest, FrameTooLarge, RemoteProtocolError
from .frames import DEFAULT_MAX_FRAME, FRAME_TYPES, Frame
from .maps import from_wire, to_wire

__all__ = [
    "NEED_DATA",
    "FrameDecoder",
    "NeedData",
    "deliver_overhead",
    "encode",
    "encode_deliver",
    "encode_delivers",
    "encode_many",
    "encode_map",
]

_PREFIX = struct.Struct(">I")


class NeedData(enum.Enum):
    """Type of the `NEED_DATA` sentinel (an enum so `is NEED_DATA` narrows for mypy)."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"

    __str__ = __repr__


NEED_DATA: Final = NeedData.NEED_DATA


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def _check_nested(root: object) -> None:
    """Reject timestamps anywhere inside containers (iterative: nesting can be ~1000 deep)."""
    # msgpack decodes ext type -1 to Timestamp without consulting ext_hook.
    stack: list[Any] = [root]
    pop, push = stack.pop, stack.append
    while stack:
        x = pop()
        if x.__class__ is dict:
            for k, v in x.items():
                if k.__class__ is msgpack.Timestamp:
                    raise BadFrame("msgpack ext types are not allowed")
                push(v)
        elif x.__class__ is list:
            stack.extend(x)
        elif x.__class__ is msgpack.Timestamp:
            raise BadFrame("msgpack ext types are not allowed")


def _wire_map(body: bytes | bytearray) -> dict[str, Any]:
    """The frame body as a map with str keys and a str `type`, or `BadFrame`."""
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=_reject_ext)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise BadFrame(f"undecodable frame body: {e}") from None
    if m.__class__ is not dict:
        raise BadFrame(f"frame body is a {type(m).__name__}, not a map")
    for k, v in m.items():
        if k.__class__ is not str:
            raise BadFrame(f"frame keys must be str, got {type(k).__name__}")
        vc = v.__class__
        if vc is dict or vc is list or vc is msgpack.Timestamp:
            _check_nested(v)
    if m.get("type").__class__ is not str:
        raise BadFrame("frame has no str 'type' key")
    wire: dict[str, Any] = m
    return wire


class FrameDecoder:
    """Incremental decoder: feed bytes with `receive_data`, pull frames with `next_frame`.

    `BadFrame`/`FrameTooLarge` are fatal: the decoder keeps raising the same error and
    discards further input. `BadRequest` is not: that frame is consumed and the next call
    continues with the following one.
    """

    __slots__ = ("_accept", "_buf", "_error", "_max_frame", "_pos")

    def __init__(
        self, *, max_frame: int = DEFAULT_MAX_FRAME, accept: Mapping[str, type] = FRAME_TYPES
    ) -> None:
        if isinstance(max_frame, bool) or not isinstance(max_frame, int) or max_frame < 1:
            raise ValueError(f"max_frame must be a positive int, got {max_frame!r}")
        self._max_frame = max_frame
        self._accept = accept
        # Consumed bytes are skipped via _pos and compacted lazily: decoding many frames
        # from one big chunk stays O(n) instead of shifting the buffer per frame.
        self._buf = bytearray()
        self._pos = 0
        self._error: RemoteProtocolError | None = None

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @property
    def accept(self) -> Mapping[str, type]:
        return self._accept

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed as frames."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            return  # the stream is unusable after a framing error; don't hoard it
        buf = self._buf
        pos = self._pos
        # Compact only once the consumed part is at least half the buffer, so the memmove
        # cost is amortised O(1) per byte however the caller interleaves calls.
        if pos and pos >= len(buf) - pos:
            del buf[:pos]
            self._pos = 0
        buf += data

    def next_frame(self) -> Frame | NeedData:
        """The next complete frame, or `NEED_DATA` if the buffer holds no complete frame.
        Raises the `BadRequest` a frame earned (that frame is consumed) or the fatal error."""
        items, fatal = self._decode(1)
        if items:
            item = items[0]
            if isinstance(item, BadRequest):
                raise item
            return item
        if fatal is not None:
            raise fatal
        return NEED_DATA

    def drain(self) -> tuple[list[Frame | BadRequest], RemoteProtocolError | None]:
        """Every complete frame held, in order, in one pass (the broker's per-read path).

        A frame that earned a `BadRequest` is stood in for by that error, in its place. A
        fatal error ends the list, is returned beside it, and ends the decoder as in
        `next_frame`.
        """
        return self._decode(-1)

    def _decode(self, limit: int) -> tuple[list[Frame | BadRequest], RemoteProtocolError | None]:
        """Up to `limit` complete frames (all when negative): the one loop behind both."""
        items: list[Frame | BadRequest] = []
        if self._error is not None:
            return items, self._error
        buf = self._buf
        pos = self._pos
        size = len(buf)
        max_frame = self._max_frame
        accept = self._accept
        unpack_prefix = _PREFIX.unpack_from
        append = items.append
        fatal: RemoteProtocolError | None = None
        while size - pos >= 4 and limit:
            (n,) = unpack_prefix(buf, pos)
            # Judge the prefix before waiting for the body, so a bogus length can't make
            # us buffer up to 4 GiB.
            if n > max_frame:
                fatal = FrameTooLarge(size=n, limit=max_frame)
                break
            if n == 0:
                fatal = BadFrame("empty frame (length prefix 0)")
                break
            end = pos + 4 + n
            if end > size:
                break
            try:
                m = _wire_map(buf[pos + 4 : end])
            except BadFrame as e:
                fatal = e
                break
            pos = end
            limit -= 1
            try:
                append(from_wire(m, accept=accept))
            except BadRequest as e:
                append(e)
        self._pos = pos
        if fatal is not None:
            # The stream is unusable after a framing error: keep raising it, hold nothing.
            self._error = fatal
            self._buf = bytearray()
            self._pos = 0
        return items, fatal

    def frames(self) -> Iterator[Frame]:
        """Yield frames until `NEED_DATA`; errors propagate like from `next_frame`."""
        next_frame = self.next_frame
        while True:
            frame = next_frame()
            if frame is NEED_DATA:
                return
            yield frame


def encode_map(m: dict[str, Any]) -> bytes:
    """Frame an already-built wire map: 4-byte big-endian length, then the msgpack body."""
    # packb builds a fresh Packer per call: a shared one is not thread-safe.
    body: bytes = msgpack.packb(m, use_bin_type=True)
    return _PREFIX.pack(len(body)) + body


def encode(frame: Frame) -> bytes:
    """Encode one frame. Deliberately no max_frame check (deliver may slightly exceed it)."""
    return encode_map(to_wire(frame))


def encode_many(frames: Iterable[Frame]) -> bytes:
    return b"".join([encode_map(to_wire(f)) for f in frames])


# The fixed parts of a deliver frame's body, as msgpack would pack them: a map of 4 (or 5
# with "redelivered") whose keys come in class order.
_DELIVER_HEAD = b"\x84\xa4type\xa7deliver\xa5topic"
_DELIVER_HEAD_REDELIVERED = b"\x85\xa4type\xa7deliver\xa5topic"
_SEQ_KEY = b"\xa3seq"
_PAYLOAD_KEY = b"\xa7payload"
_REDELIVERED_TAIL = b"\xabredelivered\xc3"
_U8, _U16, _U32, _U64 = (
    struct.Struct(">BB"),
    struct.Struct(">BH"),
    struct.Struct(">BI"),
    struct.Struct(">BQ"),
)


@functools.lru_cache(maxsize=65536)
def _packed_topic(topic: str) -> bytes:
    return msgpack.packb(topic)  # type: ignore[no-any-return]


def _packed_uint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return _U8.pack(0xCC, n)
    if n < 0x10000:
        return _U16.pack(0xCD, n)
    if n < 0x100000000:
        return _U32.pack(0xCE, n)
    return _U64.pack(0xCF, n)


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return _U8.pack(0xC4, n)
    if n < 0x10000:
        return _U16.pack(0xC5, n)
    return _U32.pack(0xC6, n)


def encode_deliver(topic: str, seq: int, payload: bytes, redelivered: bool = False) -> bytes:
    """Same bytes as `encode(Deliver(...))`, assembled from cached parts.

    For the broker's hot path (about five times faster than packing a map): the caller
    vouches for the values, which came from an already-validated publish; `seq` is >= 1.
    """
    body = b"".join(
        (
            _DELIVER_HEAD_REDELIVERED if redelivered else _DELIVER_HEAD,
            _packed_topic(topic),
            _SEQ_KEY,
            _packed_uint(seq),
            _PAYLOAD_KEY,
            _bin_header(len(payload)),
            payload,
            _REDELIVERED_TAIL if redelivered else b"",
        )
    )
    return _PREFIX.pack(len(body)) + body


# A run of deliveries whose seqs share one msgpack width and whose payloads share one bin
# header width is packed by one precompiled struct per frame: length prefix, the fixed head
# (map header, type, topic, seq key and seq marker), the seq, the payload key with its bin
# marker, and the payload length. Index: the width class of `_packed_uint` / `_bin_header`.
_SEQ_CLASSES = ((b"", "B"), (b"\xcc", "B"), (b"\xcd", "H"), (b"\xce", "I"), (b"\xcf", "Q"))
_SEQ_LIMITS = (0x80, 0x100, 0x10000, 0x100000000, 1 << 64)  # each class holds seqs below
_BIN_CLASSES = ((0xC4, "B"), (0xC5, "H"), (0xC6, "I"))
_seq_of = itemgetter(0)
_payload_of = itemgetter(1)


def _seq_class(seq: int) -> int:
    if seq < 0x100:
        return 0 if seq < 0x80 else 1
    return 2 if seq < 0x10000 else 3 if seq < 0x100000000 else 4


def _bin_class(n: int) -> int:
    return 0 if n < 0x100 else 1 if n < 0x10000 else 2


@functools.lru_cache(maxsize=4096)
def _deliver_layout(topic: str, seq_class: int, bin_class: int) -> tuple[Any, int, bytes, bytes]:
    seq_marker, seq_fmt = _SEQ_CLASSES[seq_class]
    bin_marker, bin_fmt = _BIN_CLASSES[bin_class]
    head = _DELIVER_HEAD + _packed_topic(topic) + _SEQ_KEY + seq_marker
    key = _PAYLOAD_KEY + bytes((bin_marker,))
    layout = struct.Struct(f">I{len(head)}s{seq_fmt}{len(key)}s{bin_fmt}")
    # The body's length without the payload: all but the 4-byte length prefix.
    return layout.pack, layout.size - 4, head, key


@functools.lru_cache(maxsize=4096)
def deliver_overhead(topic: str) -> tuple[int, int]:
    """The least and the most bytes a deliver frame of `topic` adds to its payload."""
    least = 4 + len(_DELIVER_HEAD) + len(_packed_topic(topic)) + len(_SEQ_KEY) + 1
    least += len(_PAYLOAD_KEY) + 2
    return least, least + 8 + 3 + len(_REDELIVERED_TAIL)


def encode_delivers(
    topic: str, entries: Sequence[tuple[int, bytes]], redeliver_upto: int = 0
) -> list[bytes]:
    """`encode_deliver` of each `(seq, payload)` in `entries` (seqs increasing), flagged
    `redelivered` up to `redeliver_upto`: the same bytes, about four times faster per frame.

    The broker's fan-out path, with `encode_deliver`'s contract: values from an already
    validated publish, seqs >= 1.
    """
    if not entries:
        return []
    first, last = entries[0][0], entries[-1][0]
    if first <= redeliver_upto:
        # Redeliveries (rare: after a reconnect) frame by frame, then the rest as usual.
        split = bisect.bisect_right(entries, redeliver_upto, key=_seq_of)
        again = [encode_deliver(topic, s, p, True) for s, p in entries[:split]]
        return again + encode_delivers(topic, entries[split:]) if split < len(entries) else again
    seq_class = _seq_class(first)
    if seq_class != _seq_class(last):
        # The seqs grow a byte wider within the run: one layout on each side of the step.
        split = bisect.bisect_left(entries, _SEQ_LIMITS[seq_class], key=_seq_of)
        return encode_delivers(topic, entries[:split]) + encode_delivers(topic, entries[split:])
    sizes = list(map(len, map(_payload_of, entries)))
    bin_class = _bin_class(max(sizes))
    if bin_class != _bin_class(min(sizes)):
        return [encode_deliver(topic, s, p) for s, p in entries]
    pack, base, head, key = _deliver_layout(topic, seq_class, bin_class)
    return [pack(base + n, head, s, key, n) + p for (s, p), n in zip(entries, sizes, strict=True)]
