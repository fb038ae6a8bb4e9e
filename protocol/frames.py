"""The frame dataclasses and their mapping to and from msgpack maps. Frames validate on
construction (`LocalProtocolError`); `from_wire` turns that into `BadRequest` for a peer's
frame. Free-form maps (`metadata`, `details`) need only be msgpack-encodable here; their size,
depth and count limits are the decoder's (codec.FrameDecoder, `max_metadata`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from .fields import (
    _INT_MAX,
    _INT_MIN,
    DEFAULT_MAX_FRAME,
    DELIVER_HEADROOM,
    HEALTH_STATUSES,
    MAX_CLIENT_ID_CHARS,
    MAX_KEEPALIVE,
    MAX_TOPIC_CHARS,
    _bool,
    _bytes,
    _dict,
    _fail,
    _int,
    _opt_int,
    _opt_str,
    _str,
    _topic,
)

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
]

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
        # No rule for a missing password: a client certificate may log a fresh session in
        # (mutual TLS); the broker answers auth_failed when nothing does (docs/protocol.md 3).


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
    """`code` is usually an `ErrorCode`, but kept a plain str so newer codes still decode.
    `topic`: present only when the error ends a subscription (`not_authorized`, no `req`: the
    user may no longer subscribe to it, docs/protocol.md 7.1). `retry_after`: seconds, on a
    `rate_limited` the broker gave without checking the password (its login queue was full):
    try again after that long; absent, the refusal followed a wrong password."""

    type: ClassVar[str] = "error"
    req: int | None = None
    code: str
    message: str
    topic: str | None = None
    retry_after: int | None = None

    def __post_init__(self) -> None:
        _opt_int("error", "req", self.req)
        _str("error", "code", self.code)
        _str("error", "message", self.message)
        _opt_str("error", "topic", self.topic)
        if self.retry_after is not None:
            _int("error", "retry_after", self.retry_after, 0, 3600)


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
