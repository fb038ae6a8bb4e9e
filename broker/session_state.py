"""One session's state as the SessionManager keeps it (ids, token hashes, connection, cleanup
timer, health) and its record in the store. See docs/architecture.md sections 9 and 15."""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from tether.broker.messages import ConnHandle
from tether.broker.store import SessionRecord, StoreError, token_hash

_log = structlog.get_logger("tether.sessions")

__all__ = ["Cancellable", "Session", "log_store_error", "new_session_id"]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


@dataclass(slots=True)
class Session:
    session_id: str
    client_id: str
    username: str
    token_hash: bytes  # of the current resume token (`store.token_hash`): never the token
    keepalive: int
    metadata: dict[str, Any]
    conn: ConnHandle | None
    generation: int = 0
    timer: Cancellable | None = None
    health: str | None = None
    health_details: dict[str, Any] | None = None
    previous_hash: bytes | None = None
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)  # the last frame read, or the last bind
    # Presence, for the fleet view (`fleet_view.py`): set at each bind and each disconnect.
    connected_since: float | None = None  # the current connection's bind
    away_since: float | None = None  # the last disconnect (restored: the record's last_seen)
    expires_at: float | None = None  # when the armed cleanup timer fires
    health_at: float | None = None  # the last `ping` carrying status or details
    admin: bool = False  # its user is marked admin (as of the last bind)
    # Why the current connection is being closed by the broker ("disconnected_by_admin"),
    # for the `disconnected` event its `ConnectionLost` then raises. Cleared at every bind.
    close_reason: str | None = None

    def token_matches(self, token: str) -> bool:
        presented = token_hash(token)
        return any(
            hmac.compare_digest(presented, valid)
            for valid in (self.token_hash, self.previous_hash)
            if valid is not None
        )

    def record(self, expires_at: float | None) -> SessionRecord:
        return SessionRecord(
            session_id=self.session_id,
            client_id=self.client_id,
            username=self.username,
            keepalive=self.keepalive,
            metadata=self.metadata,
            token_hash=self.token_hash,
            previous_hash=self.previous_hash,
            created=self.created,
            last_seen=self.last_seen,
            expires_at=expires_at,
            health=self.health,
            health_details=self.health_details,
        )

    @classmethod
    def restored(cls, record: SessionRecord) -> Session:
        return cls(
            session_id=record.session_id,
            client_id=record.client_id,
            username=record.username,
            token_hash=record.token_hash,
            keepalive=record.keepalive,
            metadata=dict(record.metadata),
            conn=None,
            health=record.health,
            health_details=None if record.health_details is None else dict(record.health_details),
            previous_hash=record.previous_hash,
            created=record.created,
            last_seen=record.last_seen,
            away_since=record.last_seen,
        )


def log_store_error(what: str) -> Callable[[StoreError | None], None]:
    def done(error: StoreError | None) -> None:
        if error is not None:
            _log.warning("session_not_stored", what=what, error=str(error))

    return done


def new_session_id() -> str:
    return secrets.token_urlsafe(16)
