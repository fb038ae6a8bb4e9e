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
from .fields import DEFAULT_MAX_METADATA, MAX_METADATA_DEPTH, MAX_METADATA_OBJECTS
from .frames import DEFAULT_MAX_FRAME, FRAME_TYPES, Frame, Ping, Publish, Register
from .maps import from_wire, to_wire
from .scan import SCAN_OVER, LargeFrameScan, field_limit

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


def _wire_map(body: bytes | bytearray, bound: int, hook: Any) -> dict[str, Any]:
    """The frame body as a map with str keys and a str `type`, or `BadFrame` (or, for a
    well-formed body over the limits, `BadRequest`). Each map and array is limited to `bound`
    items, and `hook` (unless None) counts them."""
    # Keyword arguments spelled out, not splatted from a dict: this is the hot path.
    try:
        if hook is None:
            m = msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=False,
                ext_hook=_reject_ext,
                max_map_len=bound,
                max_array_len=bound,
            )
        else:
            m = msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=False,
                ext_hook=_reject_ext,
                max_map_len=bound,
                max_array_len=bound,
                object_hook=hook,
                list_hook=hook,
            )
    except _TooComplex:
        raise _over_limit(body, f"holds more than {_MAX_CONTAINERS} maps and arrays") from None
    except ValueError as e:
        if "exceeds max_" not in str(e):  # msgpack's wording for its max_*_len limits
            raise BadFrame(f"undecodable frame body: {e}") from None
        raise _over_limit(body, f"has a map or array over the limit of {_MAX_LEN} items") from None
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


# Limits on frames from a client (see FrameDecoder): no legitimate frame comes near them, as
# its only free-form parts are `metadata`/`details` (MAX_METADATA_OBJECTS keys and values in
# all). Each map or array is checked at its header, before its items are built; the count of
# maps and arrays is checked as each one is finished, so a refused frame has built at most
# _MAX_CONTAINERS of them, each of at most _MAX_LEN items.
_MAX_LEN = MAX_METADATA_OBJECTS
_MAX_CONTAINERS = MAX_METADATA_OBJECTS + 16
# Every msgpack object takes at least one byte, so a body this small builds at most this many
# objects whatever it holds: only larger bodies pay for the counting hooks (the hot path's
# publishes are mostly small; a large one's copy dwarfs the hook).
_COUNT_OVER = 4096


# First bytes of a msgpack map or array: fixmap, fixarray, array 16/32, map 16/32.
_CONTAINER_HEADS = frozenset((*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF))


class _TooComplex(Exception):
    """Raised from the unpacker's hooks: the frame holds more than _MAX_CONTAINERS."""


def _over_limit(body: bytes | bytearray, why: str) -> RemoteProtocolError:
    """The error for a body the bounded unpacker refused: `BadRequest` echoing its `req` if
    the body is well-formed msgpack (skipped without building anything), else `BadFrame`."""
    u = msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        ext_hook=_reject_ext,
        max_map_len=_MAX_LEN,
        max_array_len=_MAX_LEN,
        max_buffer_size=max(len(body), 1),
    )
    u.feed(body)
    ftype: object = None
    req: object = None
    try:
        n = u.read_map_header()
        for _ in range(n):
            key = u.unpack()
            # Only a scalar `type` or `req` is of use: a map or array there is skipped too
            # (skipping builds no objects and ignores the max_*_len limits).
            if (key == "type" or key == "req") and body[u.tell()] not in _CONTAINER_HEADS:
                if key == "type":
                    ftype = u.unpack()
                else:
                    req = u.unpack()
            else:
                u.skip()
        if u.tell() != len(body):
            raise ValueError("trailing bytes after the frame map")
    except Exception as e:  # msgpack raises several unrelated types for bad input
        return BadFrame(f"undecodable frame body: {e}")
    ftype = ftype if ftype.__class__ is str else None
    return BadRequest(
        f"{ftype or 'frame'} {why} (metadata and details: at most {MAX_METADATA_OBJECTS} keys "
        "and values)",
        req=req if req.__class__ is int else None,
        frame_type=ftype if isinstance(ftype, str) else None,
    )


def _check_free_map(
    value: dict[Any, Any], ftype: str, field: str, req: int | None, max_bytes: int
) -> None:
    """Raise `BadRequest` naming the limit if `value` (a decoded metadata or details map) is
    over MAX_METADATA_DEPTH, MAX_METADATA_OBJECTS or `max_bytes` encoded."""
    problem = None
    count = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack and problem is None:
        x, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            problem = f"nests deeper than the limit of {MAX_METADATA_DEPTH} levels"
        elif x.__class__ is dict:
            count += 2 * len(x)
            stack.extend((v, depth + 1) for v in x.values() if v.__class__ in _CONTAINERS)
        else:
            count += len(x)
            stack.extend((v, depth + 1) for v in x if v.__class__ in _CONTAINERS)
        if count > MAX_METADATA_OBJECTS:
            problem = f"holds more than the limit of {MAX_METADATA_OBJECTS} keys and values"
    if problem is None:
        # Bounded by now (at most MAX_METADATA_OBJECTS items), so re-packing it is cheap.
        size = len(msgpack.packb(value, use_bin_type=True))
        if size <= max_bytes:
            return
        problem = f"is {size} bytes encoded, over the limit of {max_bytes} (max_metadata)"
    raise BadRequest(f"{ftype}.{field} {problem}", req=req, frame_type=ftype, field=field)


_CONTAINERS = (dict, list)


class FrameDecoder:
    """Incremental decoder: feed bytes with `receive_data`, pull frames with `next_frame`.

    `BadFrame`/`FrameTooLarge` are fatal: the decoder keeps raising the same error and
    discards further input. `BadRequest` is not: that frame is consumed and the next call
    continues with the following one.

    A decoder that accepts `register` or `ping` reads a client's frames and bounds them while
    they are decoded: each map or array at most MAX_METADATA_OBJECTS items, a frame at most
    MAX_METADATA_OBJECTS + 16 maps and arrays in all (either is `BadRequest`, as is a
    `metadata`/`details` map over `max_metadata` encoded bytes, MAX_METADATA_DEPTH levels or
    MAX_METADATA_OBJECTS keys and values). Nesting deeper than msgpack's own stack (1,024
    levels) stays `BadFrame`.
    """

    __slots__ = (
        "__weakref__",
        "_accept",
        "_bound",
        "_buf",
        "_error",
        "_hook",
        "_left",
        "_max_frame",
        "_max_metadata",
        "_pos",
        "_scan",
        "_skip",
    )

    def __init__(
        self,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        accept: Mapping[str, type] = FRAME_TYPES,
        max_metadata: int = DEFAULT_MAX_METADATA,
    ) -> None:
        if isinstance(max_frame, bool) or not isinstance(max_frame, int) or max_frame < 1:
            raise ValueError(f"max_frame must be a positive int, got {max_frame!r}")
        if isinstance(max_metadata, bool) or not isinstance(max_metadata, int) or max_metadata < 1:
            raise ValueError(f"max_metadata must be a positive int, got {max_metadata!r}")
        self._max_frame = max_frame
        self._max_metadata = max_metadata
        self._accept = accept
        # Consumed bytes are skipped via _pos and compacted lazily: decoding many frames
        # from one big chunk stays O(n) instead of shifting the buffer per frame.
        self._buf = bytearray()
        self._pos = 0
        self._error: RemoteProtocolError | None = None
        self._left = _MAX_CONTAINERS
        # A peer that sends register/ping is a client: untrusted input, bounded as decoded.
        # Otherwise (a client reading its broker) msgpack's own bound: the body's length.
        self._bound = _MAX_LEN if "register" in accept or "ping" in accept else -1
        self._hook = self._count
        # The large frame being judged as it arrives (protocol/scan.py), and the bytes of a
        # refused one still to be discarded as they come.
        self._scan: LargeFrameScan | None = None
        self._skip = 0

    def _count(self, container: Any) -> Any:
        """The unpacker's hook for each finished map and array: count it against the budget."""
        self._left -= 1
        if self._left < 0:
            raise _TooComplex
        return container

    @property
    def max_metadata(self) -> int:
        return self._max_metadata

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @max_frame.setter
    def max_frame(self, limit: int) -> None:
        """Change the limit for the frames not yet read (a broker reads a `register` under a
        smaller limit than what follows it)."""
        if limit < 1:
            raise ValueError("max_frame must be >= 1")
        self._max_frame = limit

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
        if self._skip:
            # The rest of a refused frame: dropped unread.
            take = min(self._skip, len(data))
            self._skip -= take
            if take == len(data):
                return
            data = data[take:]
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
        bound = self._bound
        # Frames over this size are counted as they are decoded; from a client, those over
        # SCAN_OVER are judged as they arrive.
        counted = _COUNT_OVER if bound > 0 else max_frame
        scan_over = SCAN_OVER if bound > 0 else max_frame
        publish_cls, register_cls, ping_cls = Publish, Register, Ping
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
            if n > scan_over:
                try:
                    refusal = self._judge(pos, n, size)
                except BadFrame as e:
                    fatal = e
                    break
                if refusal is not None:
                    append(refusal)
                    limit -= 1
                    if end <= size:
                        pos = end
                        continue
                    # Refused before it all arrived: the rest is discarded as it comes.
                    self._skip = end - size
                    pos = size
                    break
            if end > size:
                break
            if n > counted:
                self._left = _MAX_CONTAINERS
                hook = self._hook
            else:
                hook = None
            try:
                m = _wire_map(buf[pos + 4 : end], bound, hook)
            except BadFrame as e:
                fatal = e
                break
            except BadRequest as e:
                pos = end
                limit -= 1
                append(e)
                continue
            pos = end
            limit -= 1
            try:
                frame = from_wire(m, accept=accept)
                cls = frame.__class__
                if cls is not publish_cls and (cls is register_cls or cls is ping_cls):
                    self._check_free(frame)  # type: ignore[arg-type]
                append(frame)
            except BadRequest as e:
                append(e)
        self._pos = pos
        if fatal is not None:
            # The stream is unusable after a framing error: keep raising it, hold nothing.
            self._error = fatal
            self._buf = bytearray()
            self._pos = 0
            self._scan = None
            self._skip = 0
        return items, fatal

    def _judge(self, pos: int, n: int, size: int) -> BadRequest | None:
        """Scan what has arrived of the large frame at `pos` (see protocol/scan.py)."""
        scan = self._scan
        if scan is None:
            scan = self._scan = LargeFrameScan()
        avail = min(size - pos - 4, n)
        refusal = scan.check(self._buf, pos + 4, avail, field_limit(self._max_metadata))
        if refusal is not None or avail == n:
            self._scan = None  # judged: the frame is refused now or decoded whole next
        return refusal

    def _check_free(self, frame: Register | Ping) -> None:
        if isinstance(frame, Register):
            meta = frame.metadata
            if meta:
                _check_free_map(meta, "register", "metadata", frame.req, self._max_metadata)
        else:
            details = frame.details
            if details:
                _check_free_map(details, "ping", "details", frame.req, self._max_metadata)

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
