"""Judging a large frame from a client while it arrives, before it is buffered whole.

Only a `publish` payload may be large: every other field of every frame a client sends is
bounded (topics, ids, `metadata`/`details` by max_metadata). So a frame over `SCAN_OVER`
bytes is walked entry by entry as its bytes come in: a `payload` bin is stepped over by its
header, and any other key or value still unfinished `field_limit` bytes after its start is
refused there (`BadRequest`, the rest of the frame discarded unread) instead of being held until
the whole frame, up to max_frame, has arrived. Pure: it reads a buffer it is handed.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import BadFrame, BadRequest

__all__ = ["SCAN_OVER", "LargeFrameScan", "field_limit"]

# Frames larger than this are scanned as they arrive; smaller ones are simply buffered.
SCAN_OVER = 64 * 1024
_TINY = 64  # a key, `type` or `req` longer than this encoded is not one the decoder reads
_NO_LIMIT = (1 << 31) - 1
_BIN_HEADERS = {0xC4: 2, 0xC5: 3, 0xC6: 5}  # bin 8/16/32: header bytes, length included
_STR_HEADS = frozenset((*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB))


def field_limit(max_metadata: int) -> int:
    """Encoded bytes a field other than a publish payload may take in a scanned frame."""
    return max(SCAN_OVER, max_metadata + 1024)


def _object_end(buf: bytearray, start: int, stop: int, limit: int) -> int | None:
    """The end of the msgpack object at `buf[start:]` if it ends within `limit` bytes and
    before `stop`, else None; BadFrame if it is not msgpack. Skipping builds no objects."""
    n = min(stop, start + limit) - start
    if n <= 0:
        return None
    u = msgpack.Unpacker(
        max_buffer_size=n,
        max_str_len=_NO_LIMIT,
        max_bin_len=_NO_LIMIT,
        max_array_len=_NO_LIMIT,
        max_map_len=_NO_LIMIT,
        max_ext_len=_NO_LIMIT,
    )
    u.feed(buf[start : start + n])
    try:
        u.skip()
    except msgpack.OutOfData:
        return None
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise BadFrame(f"undecodable frame body: {e}") from None
    end: int = start + u.tell()
    return end


def _small_value(buf: bytearray, start: int, end: int) -> Any:
    return msgpack.unpackb(bytes(buf[start:end]), raw=False) if end - start <= _TINY else None


class LargeFrameScan:
    """Progress through one large frame's body: the next entry's offset and how many remain."""

    __slots__ = ("_at", "_left", "_req", "_type")

    def __init__(self) -> None:
        self._at = 0  # offset in the body of the next key
        self._left = -1  # entries still to walk; -1: the map header is not read yet
        self._type: Any = None
        self._req: Any = None

    def check(self, buf: bytearray, start: int, avail: int, limit: int) -> BadRequest | None:
        """Walk on through `buf[start:start + avail]` (what has arrived of the body). None:
        nothing wrong so far; a `BadRequest`: refuse the frame now. Raises `BadFrame` for a
        body that is not a msgpack map."""
        if self._left < 0 and not self._header(buf, start, avail):
            return None
        at, left = self._at, self._left
        while left > 0 and at < avail:
            key_end = _object_end(buf, start + at, start + avail, limit)
            if key_end is None:
                return self._refusal(None, limit) if avail - at >= limit else None
            if buf[start + at] not in _STR_HEADS:
                raise BadFrame("frame keys must be str")
            key = _small_value(buf, start + at, key_end)
            v = key_end - start
            if v >= avail:
                return None  # the key is read again once its value begins to arrive
            head = buf[start + v]
            if key == "payload" and head in _BIN_HEADERS:
                size = _BIN_HEADERS[head]
                if avail - v < size:
                    return None
                length = int.from_bytes(buf[start + v + 1 : start + v + size], "big")
                at = v + size + length  # stepped over, not waited for
            else:
                value_end = _object_end(buf, start + v, start + avail, limit)
                if value_end is None:
                    return self._refusal(key, limit) if avail - v >= limit else None
                if key == "type":
                    self._type = _small_value(buf, start + v, value_end)
                    if self._type == "register":
                        # Read whole under the pre-register frame limit (its password may be
                        # as large): nothing to gain from walking it.
                        left = 1
                elif key == "req":
                    self._req = _small_value(buf, start + v, value_end)
                at = value_end - start
            left -= 1
            self._at, self._left = at, left
        return None

    def _header(self, buf: bytearray, start: int, avail: int) -> bool:
        """Read the body's map header; False if it has not all arrived."""
        if avail < 1:
            return False
        head = buf[start]
        if 0x80 <= head <= 0x8F:
            self._left, self._at = head & 0x0F, 1
            return True
        size = {0xDE: 3, 0xDF: 5}.get(head)
        if size is None:
            raise BadFrame("frame body is not a map")
        if avail < size:
            return False
        self._left = int.from_bytes(buf[start + 1 : start + size], "big")
        self._at = size
        return True

    def _refusal(self, key: object, limit: int) -> BadRequest:
        ftype = self._type if self._type.__class__ is str else None
        req = self._req if self._req.__class__ is int else None
        field = key if key.__class__ is str else None
        what = f"{ftype or 'frame'}.{field}" if field else f"a key of a {ftype or 'frame'}"
        return BadRequest(
            f"{what} is over {limit} bytes encoded: only a publish's payload may be that large "
            "(metadata and details: max_metadata)",
            req=req,
            frame_type=ftype,
            field=field,
        )
