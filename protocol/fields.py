"""The frames' field limits and validators: each raises `LocalProtocolError` naming the frame
type and field. They take the wire type, not the frame, so they stay cheap on the hot path."""

from __future__ import annotations

from typing import NoReturn

from .errors import LocalProtocolError

DEFAULT_MAX_FRAME = 1 << 20
# A deliver frame wraps a payload that fitted in a publish frame of at most max_frame bytes
# with a slightly different envelope, so clients must accept a little more than brokers.
DELIVER_HEADROOM = 1024
MAX_TOPIC_CHARS = 256
MAX_CLIENT_ID_CHARS = 128
MAX_KEEPALIVE = 65535
HEALTH_STATUSES = frozenset({"healthy", "degraded", "unhealthy"})
# A register's `metadata` and a ping's `details` are free-form maps: bounded in encoded size
# (the decoder's `max_metadata`), nesting (the map itself is level 1) and keys plus values in
# all, so a small frame cannot become a huge tree of Python objects.
DEFAULT_MAX_METADATA = 8 * 1024
MAX_METADATA_DEPTH = 8
MAX_METADATA_OBJECTS = 256

# msgpack can only carry int64/uint64; checking here keeps encode() from failing later.
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1


def _fail(ftype: str, name: str, problem: str) -> NoReturn:
    raise LocalProtocolError(f"{ftype}.{name} {problem}", frame_type=ftype, field=name)


def _int(ftype: str, name: str, v: object, lo: int = _INT_MIN, hi: int = _INT_MAX) -> None:
    # bool is an int subclass but is never a valid integer field on the wire.
    if v.__class__ is not int and (isinstance(v, bool) or not isinstance(v, int)):
        _fail(ftype, name, f"must be an int, not {type(v).__name__}")
    if not lo <= v <= hi:
        _fail(ftype, name, f"must be in range {lo}..{hi}, got {v}")


def _opt_int(ftype: str, name: str, v: object) -> None:
    if v is not None:
        _int(ftype, name, v)


def _str(ftype: str, name: str, v: object, lo: int = 0, hi: int | None = None) -> None:
    if not isinstance(v, str):
        _fail(ftype, name, f"must be a str, not {type(v).__name__}")
    n = len(v)
    if n < lo or (hi is not None and n > hi):
        limit = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
        _fail(ftype, name, f"must be {limit} characters long, got {n}")


def _opt_str(ftype: str, name: str, v: object) -> None:
    if v is not None:
        _str(ftype, name, v)


def _topic(ftype: str, v: object) -> None:
    _str(ftype, "topic", v, 1, MAX_TOPIC_CHARS)


def _bool(ftype: str, name: str, v: object) -> None:
    if v.__class__ is not bool:
        _fail(ftype, name, f"must be a bool, not {type(v).__name__}")


def _bytes(ftype: str, name: str, v: object) -> None:
    # Exactly bytes: a str payload would be packed as msgpack str, not bin.
    if not isinstance(v, bytes):
        _fail(ftype, name, f"must be bytes, not {type(v).__name__}")


def _dict(ftype: str, name: str, v: object) -> None:
    if not isinstance(v, dict):
        _fail(ftype, name, f"must be a map, not {type(v).__name__}")
