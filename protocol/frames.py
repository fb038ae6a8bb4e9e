"""The frame dataclasses and their mapping to and from msgpack maps. Frames validate on
construction (`LocalProtocolError`); `from_wire` turns that into `BadRequest` for a peer's
frame. Free-form maps (`metadata`, `details`) need only be msgpack-encodable."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, NoReturn

from .errors import BadRequest, LocalProtocolError

__all__ = [
    "BROKER_FRAME_TYPES",
    "CLIENT_FRAME_TYPES",
    "DEFAULT_MAX_FRAME",
    "DELIVER_HEADROOM",
    "FRAME_TYPES",
    "HEALTH_STATUSES",
    "MAX_CLIENT_ID_CHARS",
    "MAX_TOPIC_CHARS",
    "Ack",
    "BrokerFrame",
    "ClientFrame",
    "Deliver",
    "Dropped",
    "Error",
    "Frame",
    "Ok",
    "Ping",
    "Pong",
    "Publish",
    "Register",
    "Registered",
    "Subscribe",
    "Unregister",
    "Unsubscribe",
    "from_wire",
    "to_wire",
]

DEFAULT_MAX_FRAME = 1 << 20
# A deliver frame wraps a payload that fitted in a publish frame of at most max_frame bytes
# with a slightly different envelope, so clients must accept a little more than brokers.
DELIVER_HEADROOM = 1024
MAX_TOPIC_CHARS = 256
MAX_CLIENT_ID_CHARS = 128
MAX_KEEPALIVE = 65535
HEALTH_STATUSES = frozenset({"healthy", "degraded", "unhealthy"})

# msgpack can only carry int64/uint64; checking here keeps encode() from failing later.
_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1


# --- field validators --------------------------------------------------------------------
# They take the frame's wire type rather than the frame so they stay cheap on the hot path.


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


# --- client -> broker --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Register:
    """Open a new session, or resume one (session_id + resume_token)."""

    type: ClassVar[str] = "register"
    req: int
    client_id: str
    username: str
    password: str | None = None
    session_id: str | None = None
    resume_token: str | None = None
    keepalive: int = 30
    metadata: dict[str, Any] = field(default_factory=dict)
    takeover: bool = False

    def __post_init__(self) -> None:
        t = "register"
        _int(t, "req", self.req)
        _str(t, "client_id", self.client_id, 1, MAX_CLIENT_ID_CHARS)
        _str(t, "username", self.username)
        _opt_str(t, "password", self.password)
        _opt_str(t, "session_id", self.session_id)
        _opt_str(t, "resume_token", self.resume_token)
        _int(t, "keepalive", self.keepalive, 1, MAX_KEEPALIVE)
        _dict(t, "metadata", self.metadata)
        _bool(t, "takeover", self.takeover)
        if (self.session_id is None) != (self.resume_token is None):
            missing = "resume_token" if self.resume_token is None else "session_id"
            _fail(t, missing, "is required when resuming (session_id and resume_token go together)")
        # The resume token authenticates a resume; a fresh session needs the password.
        if self.session_id is None and self.password is None:
            _fail(t, "password", "is required unless resuming a session")


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    type: ClassVar[str] = "subscribe"
    req: int
    topic: str

    def __post_init__(self) -> None:
        _int("subscribe", "req", self.req)
        _topic("subscribe", self.topic)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    type: ClassVar[str] = "unsubscribe"
    req: int
    topic: str

    def __post_init__(self) -> None:
        _int("unsubscribe", "req", self.req)
        _topic("unsubscribe", self.topic)


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    """Publish a payload; with `req` the broker confirms with `ok`."""

    type: ClassVar[str] = "publish"
    topic: str
    payload: bytes
    req: int | None = None

    def __post_init__(self) -> None:
        # Hot path: inline fast checks, the helpers only run to report a failure precisely.
        topic = self.topic
        if topic.__class__ is not str or not 0 < len(topic) <= MAX_TOPIC_CHARS:
            _topic("publish", topic)
        # `$`-topics are reserved for broker-generated messages.
        if topic[0] == "$":
            _fail("publish", "topic", "must not start with '$' (reserved for the broker)")
        if self.payload.__class__ is not bytes:
            _bytes("publish", "payload", self.payload)
        req = self.req
        if req is not None and (req.__class__ is not int or not _INT_MIN <= req <= _INT_MAX):
            _int("publish", "req", req)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    type: ClassVar[str] = "ack"
    topic: str
    seq: int

    def __post_init__(self) -> None:
        topic = self.topic
        if topic.__class__ is not str or not 0 < len(topic) <= MAX_TOPIC_CHARS:
            _topic("ack", topic)
        seq = self.seq
        if seq.__class__ is not int or not 0 <= seq <= _INT_MAX:
            _int("ack", "seq", seq, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """Keepalive; may carry the client's health report."""

    type: ClassVar[str] = "ping"
    req: int | None = None
    status: str | None = None
    details: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _opt_int("ping", "req", self.req)
        if self.status is not None and (
            not isinstance(self.status, str) or self.status not in HEALTH_STATUSES
        ):
            _fail("ping", "status", f"must be one of {sorted(HEALTH_STATUSES)}")
        if self.details is not None:
            _dict("ping", "details", self.details)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unregister:
    """End the session for good (as opposed to disconnecting, which keeps it resumable)."""

    type: ClassVar[str] = "unregister"
    req: int

    def __post_init__(self) -> None:
        _int("unregister", "req", self.req)


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    """Extension to v1: ask the broker for its counters (answered by `stats_result`)."""

    type: ClassVar[str] = "stats"
    req: int

    def __post_init__(self) -> None:
        _int("stats", "req", self.req)


# --- broker -> client --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Registered:
    """Reply to `register`: `queued`/`dropped` count messages kept/lost while away;
    `max_frame` is the largest frame the broker accepts (absent from older brokers)."""

    type: ClassVar[str] = "registered"
    req: int
    session_id: str
    resume_token: str
    resumed: bool
    keepalive: int
    expiry: int
    queued: int
    dropped: int
    max_frame: int | None = None

    def __post_init__(self) -> None:
        t = "registered"
        _int(t, "req", self.req)
        _str(t, "session_id", self.session_id)
        _str(t, "resume_token", self.resume_token)
        _bool(t, "resumed", self.resumed)
        _int(t, "keepalive", self.keepalive, 1, MAX_KEEPALIVE)
        _int(t, "expiry", self.expiry, 0)
        _int(t, "queued", self.queued, 0)
        _int(t, "dropped", self.dropped, 0)
        if self.max_frame is not None:
            _int(t, "max_frame", self.max_frame, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ok:
    type: ClassVar[str] = "ok"
    req: int

    def __post_init__(self) -> None:
        _int("ok", "req", self.req)


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsResult:
    """Extension to v1: the broker's counters, a map of str to int."""

    type: ClassVar[str] = "stats_result"
    req: int
    stats: dict[str, Any]

    def __post_init__(self) -> None:
        _int("stats_result", "req", self.req)
        _dict("stats_result", "stats", self.stats)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    type: ClassVar[str] = "pong"
    req: int | None = None

    def __post_init__(self) -> None:
        _opt_int("pong", "req", self.req)


@dataclass(frozen=True, slots=True, kw_only=True)
class Deliver:
    """A message for a subscribed topic; `seq` is per topic and starts at 1."""

    type: ClassVar[str] = "deliver"
    topic: str
    seq: int
    payload: bytes
    redelivered: bool = False

    def __post_init__(self) -> None:
        # No `$` check: the broker delivers on its reserved topics too.
        topic = self.topic
        if topic.__class__ is not str or not 0 < len(topic) <= MAX_TOPIC_CHARS:
            _topic("deliver", topic)
        seq = self.seq
        if seq.__class__ is not int or not 1 <= seq <= _INT_MAX:
            _int("deliver", "seq", seq, 1)
        if self.payload.__class__ is not bytes:
            _bytes("deliver", "payload", self.payload)
        if self.redelivered.__class__ is not bool:
            _bool("deliver", "redelivered", self.redelivered)


@dataclass(frozen=True, slots=True, kw_only=True)
class Dropped:
    """`count` messages on `topic` were discarded (queue overflow) and will never arrive."""

    type: ClassVar[str] = "dropped"
    topic: str
    count: int

    def __post_init__(self) -> None:
        _topic("dropped", self.topic)
        _int("dropped", "count", self.count, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """`code` is usually an `ErrorCode`, but kept a plain str so newer codes still decode."""

    type: ClassVar[str] = "error"
    req: int | None = None
    code: str
    message: str

    def __post_init__(self) -> None:
        _opt_int("error", "req", self.req)
        _str("error", "code", self.code)
        _str("error", "message", self.message)


ClientFrame = Register | Subscribe | Unsubscribe | Publish | Ack | Ping | Unregister | Stats
BrokerFrame = Registered | Ok | Pong | Deliver | Dropped | Error | StatsResult
Frame = ClientFrame | BrokerFrame

_CLIENT_CLASSES: tuple[type[ClientFrame], ...] = (
    Register,
    Subscribe,
    Unsubscribe,
    Publish,
    Ack,
    Ping,
    Unregister,
    Stats,
)
_BROKER_CLASSES: tuple[type[BrokerFrame], ...] = (
    Registered,
    Ok,
    Pong,
    Deliver,
    Dropped,
    Error,
    StatsResult,
)

CLIENT_FRAME_TYPES: Mapping[str, type[ClientFrame]] = MappingProxyType(
    {c.type: c for c in _CLIENT_CLASSES}
)
BROKER_FRAME_TYPES: Mapping[str, type[BrokerFrame]] = MappingProxyType(
    {c.type: c for c in _BROKER_CLASSES}
)
FRAME_TYPES: Mapping[str, type[Frame]] = MappingProxyType(
    {**CLIENT_FRAME_TYPES, **BROKER_FRAME_TYPES}
)

# Sentinel for fields that are always encoded.
_KEEP = object()

# Per class: (field name, value that means "omit this key", required on decode).
# Precomputed so to_wire/from_wire do no dataclass introspection per frame.
_SPECS: dict[type, tuple[tuple[str, object, bool], ...]] = {}
for _cls in (*_CLIENT_CLASSES, *_BROKER_CLASSES):
    _spec = []
    for _f in dataclasses.fields(_cls):
        _required = _f.default is dataclasses.MISSING and _f.default_factory is dataclasses.MISSING
        _omit: object = None if _f.default is None else _KEEP
        _spec.append((_f.name, _omit, _required))
    _SPECS[_cls] = tuple(_spec)
# `redelivered` is only sent when True, keeping the common deliver frame small.
_SPECS[Deliver] = tuple((n, False if n == "redelivered" else o, r) for n, o, r in _SPECS[Deliver])
del _cls, _spec, _f, _required, _omit


def to_wire(frame: Frame) -> dict[str, Any]:
    """The msgpack map for `frame`: "type" first, then fields in class order, minus omitted."""
    try:
        spec = _SPECS[frame.__class__]
    except KeyError:
        raise TypeError(f"not a frame: {frame!r}") from None
    m: dict[str, Any] = {"type": frame.type}
    for name, omit, _ in spec:
        v = getattr(frame, name)
        if v is not omit:
            m[name] = v
    return m


def from_wire(m: dict[str, Any], *, accept: Mapping[str, type]) -> Frame:
    """Build the frame described by map `m` if its type is in `accept`.

    Raises `BadRequest` (carrying `req` when `m` has an int `req`) for an unknown type,
    a missing field or an invalid value. Keys not part of the frame are ignored.
    """
    ftype = m.get("type")
    if ftype == "publish" and accept.get("publish") is Publish:
        # The hot path: one frame of this kind per message, so no generic field walk.
        topic, payload, preq = m.get("topic"), m.get("payload"), m.get("req")
        if topic is not None and payload is not None:
            try:
                return Publish(topic=topic, payload=payload, req=preq)
            except LocalProtocolError as e:
                req = preq if preq.__class__ is int else None
                raise BadRequest(str(e), req=req, frame_type=ftype, field=e.field) from None
    req = m.get("req")
    if req.__class__ is not int:
        req = None
    cls = accept.get(ftype) if isinstance(ftype, str) else None
    if cls is None:
        raise BadRequest(
            f"unknown frame type {ftype!r}",
            req=req,
            frame_type=ftype if isinstance(ftype, str) else None,
            field="type",
        )
    spec = _SPECS.get(cls)
    if spec is None:
        raise TypeError(f"accept maps {ftype!r} to {cls!r}, which is not a frame class")
    kwargs = {}
    for name, omit, required in spec:
        if name in m:
            v = m[name]
            # An explicit nil for an optional field means the same as leaving it out.
            if v is not None or omit is not None:
                kwargs[name] = v
        elif required:
            raise BadRequest(f"{ftype}.{name} is missing", req=req, frame_type=ftype, field=name)
    try:
        frame: Frame = cls(**kwargs)
    except LocalProtocolError as e:
        raise BadRequest(str(e), req=req, frame_type=ftype, field=e.field) from None
    return frame
