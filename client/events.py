"""What the connection state machine tells its front end (and, through it, the application)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import SessionLost as SessionLostError
from .errors import TakenOver as TakenOverError
from .errors import TetherError

__all__ = [
    "BrokerError",
    "Closed",
    "Disconnect",
    "Disconnected",
    "Dropped",
    "Event",
    "Message",
    "Reconnected",
    "Refused",
    "Registered",
    "RequestDone",
    "RequestFailed",
    "RetryLater",
    "SessionLost",
    "SubscriptionRevoked",
    "TakenOver",
]


@dataclass(frozen=True, slots=True)
class Registered:
    """The connection holds the session now (`resumed`: the old one, queues intact)."""

    session_id: str
    resumed: bool
    queued: int
    dropped: int
    keepalive: int
    expiry: int


@dataclass(frozen=True, slots=True)
class Message:
    """A delivery the application has not seen before. `epoch` counts the sessions this client
    has had: a message of an earlier session is never acked on a later one."""

    topic: str
    seq: int
    payload: bytes
    redelivered: bool = False
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Dropped:
    """`count` messages were discarded by a full queue and will never arrive. `topic` is None
    for `registered.dropped` (overflow while away, summed over the subscriptions)."""

    topic: str | None
    count: int


@dataclass(frozen=True, slots=True)
class SessionLost:
    """The session was gone on return; a new, empty one replaced it (subscriptions restored)."""

    error: SessionLostError


@dataclass(frozen=True, slots=True)
class TakenOver:
    """Another connection took the session. A `Closed` follows: do not reconnect."""

    error: TakenOverError


@dataclass(frozen=True, slots=True)
class RequestDone:
    """The broker answered request `req`; `result` is the map a `stats` request asked for."""

    req: int
    result: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RequestFailed:
    req: int
    error: TetherError


@dataclass(frozen=True, slots=True)
class RetryLater:
    """The broker answered request `req` `unavailable` (it could not store it for now): the
    front end calls `retry(req)` after the backoff delay of `attempt` (0 for the first)."""

    req: int
    attempt: int


@dataclass(frozen=True, slots=True)
class BrokerError:
    """An `error` frame not tied to any request of ours (e.g. for a fire-and-forget publish)."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class SubscriptionRevoked:
    """The broker ended the subscription to `topic`: its user may no longer subscribe to it
    (the broker's users file changed). Its queue is gone; the client forgets the topic, so a
    new session does not subscribe to it again. `message` is the broker's text."""

    topic: str
    message: str


@dataclass(frozen=True, slots=True)
class Refused:
    """A fire-and-forget publish that cannot be sent (e.g. larger than the broker's frame
    limit, learned after it was queued): it is dropped, and `error` says why."""

    error: TetherError


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The front end should drop this connection and reconnect after a backoff. `error` is
    what the broker said, when it refused us (e.g. `rate_limited`); `retry_after`, seconds the
    broker asked us to wait at least (the backoff's jitter comes on top)."""

    reason: str
    error: TetherError | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection that held the session was lost; the client is retrying. Once per
    loss, not per failed attempt: `Reconnected` follows when a session is held again."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reconnected:
    """A session is held again after a `Disconnected`: the same one (`resumed`, with
    `queued` messages waiting for this client) or, after it expired, a new one (a
    `SessionLost` comes too)."""

    resumed: bool
    queued: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The machine is finished: never reconnect. `error` is None for a clean end (close() or
    unregister)."""

    error: TetherError | None


Event = (
    Registered
    | Message
    | Dropped
    | SessionLost
    | TakenOver
    | RequestDone
    | RequestFailed
    | RetryLater
    | BrokerError
    | SubscriptionRevoked
    | Refused
    | Disconnect
    | Disconnected
    | Reconnected
    | Closed
)
