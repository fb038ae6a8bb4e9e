"""Messages the broker's actors send each other. All frozen: pykka does not copy messages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pykka import ActorRef

from tether.broker.tls import PeerCertificate
from tether.broker.users import UserStore
from tether.protocol import ClientFrame, Error, ErrorCode, Register


@dataclass(frozen=True, slots=True)
class ConnHandle:
    """One connection's identity: `conn_id` is unique for the broker's life, so an event that
    names a replaced connection can always be told apart from the one that replaced it."""

    conn_id: int
    ref: ActorRef[Any]
    peer: str


# Listener -> BrokerSupervisor. `certificate`: the connection's verified client certificate
# (mutual TLS), which may log the client in instead of a password (`--tls-cert-username`).
@dataclass(frozen=True, slots=True)
class RegisterRequest:
    frame: Register
    conn: ConnHandle
    certificate: PeerCertificate | None = None


# BrokerSupervisor -> SessionManager (authenticated is False for a resume: the token decides).
# `admin`: the user is marked admin in the users file (may subscribe to `$sys/...`).
@dataclass(frozen=True, slots=True)
class OpenSession:
    frame: Register
    conn: ConnHandle
    authenticated: bool
    admin: bool = False


# SessionManager/BrokerSupervisor -> Listener
@dataclass(frozen=True, slots=True)
class RegisterRejected:
    req: int
    code: ErrorCode
    message: str
    retry_after: int | None = None  # seconds; a refusal that was no verdict on the password


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
    username: str = ""
    admin: bool = False  # may subscribe to `$sys/...`


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


# The users file watcher (off the loop) -> SubscriberManager (topic permissions), then
# BrokerSupervisor: the file changed and reads well.
@dataclass(frozen=True, slots=True)
class UsersReloaded:
    users: UserStore


# BrokerSupervisor (after a reload) or Broker.start -> SessionManager: the users now valid,
# each with the time before which their sessions are void (None: all valid). Sessions of a
# user not in it, or created before that time, are ended (`session_ended`).
@dataclass(frozen=True, slots=True)
class UsersChanged:
    valid_after: Mapping[str, float | None]
    # Each user's client id prefixes (None: any): a session whose id no longer starts with
    # one of its user's is ended too.
    prefixes: Mapping[str, tuple[str, ...] | None] = field(default_factory=dict)


# Listener -> ListenerManager
@dataclass(frozen=True, slots=True)
class ListenerClosed:
    conn_id: int


# Outside the loop -> an actor that owns counters (the ListenerManager, the BrokerSupervisor,
# the SubscriberManager): a snapshot of them, for `ask`. Each counter has one owner.
@dataclass(frozen=True, slots=True)
class GetStats:
    pass


# --- The fleet view (issue 11): asked from the HTTP endpoint's thread -------------------------
#
# Times are seconds since the epoch (time.time()); the HTTP layer renders them RFC 3339 UTC.


@dataclass(frozen=True, slots=True)
class HealthView:
    status: str | None  # what the client last said in a `ping` (None: never said)
    details: Mapping[str, Any] | None
    at: float | None  # when that report came
    stale: bool  # online, and no health report for 2 x keepalive


@dataclass(frozen=True, slots=True)
class SessionView:
    """One session as the SessionManager knows it (everything but its subscriptions)."""

    client_id: str
    username: str
    session_id: str
    status: str  # "online" | "away"
    connected_since: float | None  # None while away
    away_since: float | None  # None while online
    last_seen: float  # the last frame read from it (to about a second), or its last bind
    expires_at: float | None  # when an away session's cleanup timer fires; None while online
    peer: str | None  # "host:port" of its connection; None while away
    keepalive: int
    metadata: Mapping[str, Any]
    health: HealthView


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    topic: str
    queued: int  # messages held for it, unacked included
    unacked: int
    # Overflow, connected or not, since this broker process loaded the session (a restart
    # starts it from what the store still had to tell the client).
    dropped: int


# HTTP -> SessionManager (ask): a page of sessions sorted by client id, after `after` (exclusive),
# filtered. Answer: `SessionPage`.
@dataclass(frozen=True, slots=True)
class ListSessions:
    status: str | None = None  # "online" | "away" | None (all)
    username: str | None = None
    client_id_prefix: str | None = None
    after: str | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class SessionPage:
    sessions: tuple[SessionView, ...]
    next: str | None  # the client id to pass as `after` for the next page; None: last page


# HTTP -> SessionManager (ask): one session by client id. Answer: SessionView | None.
@dataclass(frozen=True, slots=True)
class GetSession:
    client_id: str


# HTTP -> SubscriberManager (ask): the subscriptions of these sessions.
# Answer: dict[session_id, tuple[SubscriptionView, ...]] (a session it does not know: absent).
@dataclass(frozen=True, slots=True)
class GetSubscriptions:
    session_ids: tuple[str, ...]


# HTTP -> SessionManager (ask), admin actions. Answer: the SessionView acted on (before the
# action), or None when no session has that client id.
# Disconnect: close its connection (no error frame); the session lingers as after any
# disconnect. End: the session ends (queues discarded); its connection, if any, gets
# `session_ended` and is closed.
@dataclass(frozen=True, slots=True)
class DisconnectSession:
    client_id: str


@dataclass(frozen=True, slots=True)
class EndSessionByAdmin:
    client_id: str


# Listener -> SessionManager: frames were read from `conn_id` at `at` (time.time()). Sent at
# most about once a second per connection, for `last_seen` and presence.
@dataclass(frozen=True, slots=True)
class Seen:
    session_id: str
    conn_id: int
    at: float


# SessionManager -> SubscriberManager: publish a lifecycle event on `$sys/sessions/<event>`,
# as an ordinary delivery to the topic's (admin) subscribers. `fields` is the payload map
# without `at` (added when it is encoded, RFC 3339 UTC) : client_id, username, session_id
# and what the event adds (reason, metadata, status/was, peer ...).
@dataclass(frozen=True, slots=True)
class SysEvent:
    event: str  # registered, resumed, disconnected, taken_over, expired, ended, health, dropped
    fields: Mapping[str, Any]
    at: float


# Outside the loop -> the actors, for /metrics (`ask`): each answers its own figures as a
# flat dict of name -> number. Names, and who owns each (one owner per name):
#   ListenerManager:  connections_open, connections_accepted, connections_pending,
#                     connections_pending_bytes, connections_refused_pending,
#                     connections_closed_unregistered, accept_pauses,
#                     tls_handshake_failures
#   BrokerSupervisor: registrations_auth_failed, registrations_rate_limited,
#                     password_checks (count), auth_queue_length, auth_queue_refused,
#                     client_id_refused
#   SessionManager:   sessions_online, sessions_away, registrations_new,
#                     registrations_resumed, registrations_taken_over, registrations_conflict,
#                     registrations_unknown_session, sessions_quota_refused
#   SubscriberManager: messages_published, messages_delivered, messages_redelivered,
#                     messages_acked, messages_dropped, messages_queued, bytes_queued,
#                     subscriptions, topics, sessions_expired, subscriptions_refused,
#                     stats_refused, messages_dropped_session_bytes,
#                     messages_dropped_memory_budget, messages_dropped_store_budget,
#                     queues_spilled, bytes_queued_memory, memory_budget,
#                     permission_denied_publish, permission_denied_subscribe,
#                     subscriptions_revoked, and (durable) bytes_queued_store, store_budget
#   (and `store_failing`, read from the store, not an actor)
@dataclass(frozen=True, slots=True)
class GetMetrics:
    pass
