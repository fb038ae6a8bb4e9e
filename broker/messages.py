"""Messages the broker's actors send each other. All frozen: pykka does not copy messages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pykka import ActorRef

from tether.broker.users import UserStore
from tether.protocol import ClientFrame, Error, ErrorCode, Register


@dataclass(frozen=True, slots=True)
class ConnHandle:
    """One connection's identity: `conn_id` is unique for the broker's life, so an event that
    names a replaced connection can always be told apart from the one that replaced it."""

    conn_id: int
    ref: ActorRef[Any]
    peer: str


# Listener -> BrokerSupervisor
@dataclass(frozen=True, slots=True)
class RegisterRequest:
    frame: Register
    conn: ConnHandle


# BrokerSupervisor -> SessionManager (authenticated is False for a resume: the token decides)
@dataclass(frozen=True, slots=True)
class OpenSession:
    frame: Register
    conn: ConnHandle
    authenticated: bool


# SessionManager/BrokerSupervisor -> Listener
@dataclass(frozen=True, slots=True)
class RegisterRejected:
    req: int
    code: ErrorCode
    message: str


# SessionManager -> Listener of a session's previous connection (a takeover or resume), or of
# a session the broker ended (`code` SESSION_ENDED: its user was removed or revoked).
@dataclass(frozen=True, slots=True)
class TakenOver:
    session_id: str
    code: ErrorCode = ErrorCode.TAKEN_OVER
    message: str = "another connection took this session over: not reconnecting"


# SessionManager -> SubscriberManager: bind the session to `conn`, answer `registered`, drain.
@dataclass(frozen=True, slots=True)
class Attach:
    session_id: str
    client_id: str
    conn: ConnHandle
    req: int
    resume_token: str
    resumed: bool
    keepalive: int
    expiry: int


# SubscriberManager -> Listener: registration done; `registered` is the encoded frame.
@dataclass(frozen=True, slots=True)
class SessionAttached:
    session_id: str
    client_id: str
    keepalive: int
    registered: bytes


# Listener -> SubscriberManager: every frame after registration, in order, one batch per read.
@dataclass(frozen=True, slots=True)
class SessionOps:
    session_id: str
    conn: ConnHandle
    ops: tuple[ClientFrame | Error, ...]  # an Error is one a bad frame earned, sent in turn
    close: bool = False  # the last op is a fatal error: close once it is answered


# SubscriberManager -> Listener: stop (or start again) reading the socket. Sent while a
# publish from this connection waits for room in a live subscriber's queue.
@dataclass(frozen=True, slots=True)
class Throttle:
    paused: bool


# SubscriberManager -> Listener: bytes to write. `credit` is how many of them were deliveries,
# to be handed back (as `Credit`) once the socket has taken them. `close` ends the connection
# after the write; `session_ended` says the session's queues are gone (unregister), so the
# Listener tells the SessionManager to forget it rather than that the connection was lost.
@dataclass(frozen=True, slots=True)
class Outbound:
    data: bytes
    credit: int = 0
    close: bool = False
    session_ended: bool = False


# Listener -> SubscriberManager: the socket took `nbytes` of deliveries; send more.
@dataclass(frozen=True, slots=True)
class Credit:
    session_id: str
    conn_id: int
    nbytes: int


# Listener -> SessionManager
@dataclass(frozen=True, slots=True)
class ConnectionLost:
    session_id: str
    conn_id: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    session_id: str
    conn_id: int
    status: str | None
    details: dict[str, Any] | None


# SessionManager -> SubscriberManager
@dataclass(frozen=True, slots=True)
class Detach:
    session_id: str
    conn_id: int


@dataclass(frozen=True, slots=True)
class DropSession:
    session_id: str
    reason: str


# Listener -> SessionManager: the client unregistered on `conn_id`; its queues are already gone.
@dataclass(frozen=True, slots=True)
class EndSession:
    session_id: str
    conn_id: int


# The users file watcher (off the loop) -> BrokerSupervisor: the file changed and reads well.
@dataclass(frozen=True, slots=True)
class UsersReloaded:
    users: UserStore


# BrokerSupervisor (after a reload) or Broker.start -> SessionManager: the users now valid,
# each with the time before which their sessions are void (None: all valid). Sessions of a
# user not in it, or created before that time, are ended (`session_ended`).
@dataclass(frozen=True, slots=True)
class UsersChanged:
    valid_after: Mapping[str, float | None]


# Listener -> ListenerManager
@dataclass(frozen=True, slots=True)
class ListenerClosed:
    conn_id: int


# Outside the loop -> an actor that owns counters (the ListenerManager, the BrokerSupervisor,
# the SubscriberManager): a snapshot of them, for `ask`. Each counter has one owner.
@dataclass(frozen=True, slots=True)
class GetStats:
    pass
