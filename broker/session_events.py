"""What the SessionManager tells the world about its sessions' lives: for each cause, one
summary log line and one lifecycle event (`SysEvent`, which the SubscriberManager publishes on
`$sys/sessions/<event>` to admin subscribers; docs/protocol.md has the payloads).

Theory of operation: each method is called once per cause, by the SessionManager, at the
moment the cause is decided:
- `registered`/`resumed` when the bind is granted (with a store: once committed), so a failed
  commit announces nothing;
- `taken_over` when the old connection is told so (before a commit too: it is gone either way);
  the session a fresh `takeover=true` replaces then ends without an `ended` of its own, and a
  connection taken over or ended raises no `disconnected` (its Listener forgets the session);
- `disconnected` when the current connection's `ConnectionLost` arrives;
- `ended` (or `expired`) when the session is removed;
- `health` when the status a client reports differs from the one before.
Every payload names the session (`client_id`, `username`, `session_id`); `at` travels beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from pykka import ActorRef

from tether.broker.loop_actor import tell
from tether.broker.messages import SysEvent
from tether.broker.session_state import Session

if TYPE_CHECKING:
    from tether.broker.subscribers import SubscriberManager

__all__ = ["Lifecycle"]

_log = structlog.get_logger("tether.sessions")


class Lifecycle:
    """Logs and announces; owns no state but where to tell and what time it is."""

    __slots__ = ("_clock", "_subscribers")

    def __init__(
        self, subscribers: ActorRef[SubscriberManager], clock: Callable[[], float]
    ) -> None:
        self._subscribers = subscribers
        self._clock = clock

    def _announce(self, event: str, session: Session, **fields: Any) -> None:
        payload = {
            "client_id": session.client_id,
            "username": session.username,
            "session_id": session.session_id,
            **fields,
        }
        tell(self._subscribers, SysEvent(event, payload, self._clock()))

    def registered(self, session: Session, peer: str) -> None:
        _log.info(
            "session_registered",
            session_id=session.session_id,
            client_id=session.client_id,
            username=session.username,
            peer=peer,
            keepalive=session.keepalive,
            metadata=session.metadata or None,
        )
        self._announce(
            "registered", session, peer=peer, keepalive=session.keepalive, metadata=session.metadata
        )

    def resumed(self, session: Session, peer: str) -> None:
        _log.info(
            "session_resumed",
            session_id=session.session_id,
            client_id=session.client_id,
            username=session.username,
            peer=peer,
            keepalive=session.keepalive,
        )
        self._announce("resumed", session, peer=peer)

    def taken_over(self, session: Session, peer: str, by: str) -> None:
        """`session` loses its connection (if any) to `peer`: `by` a resume or a takeover."""
        _log.info(
            "session_taken_over",
            session_id=session.session_id,
            client_id=session.client_id,
            by=by,
            peer=peer,
        )
        self._announce("taken_over", session, peer=peer, reason=by)

    def disconnected(self, session: Session, peer: str, reason: str, expires_in: float) -> None:
        _log.info(
            "session_disconnected",
            session_id=session.session_id,
            client_id=session.client_id,
            peer=peer,
            reason=reason,
            expires_in=expires_in,
        )
        self._announce("disconnected", session, peer=peer, reason=reason)

    def health(self, session: Session, was: str | None) -> None:
        _log.info(
            "session_health",
            session_id=session.session_id,
            client_id=session.client_id,
            status=session.health,
            was=was,
        )
        self._announce(
            "health", session, status=session.health, was=was, details=session.health_details
        )

    def ended(self, session: Session, reason: str) -> None:
        """Removed: `expired` for an expiry, `ended` for the other reasons, nothing more for
        a takeover (its `taken_over` said it)."""
        _log.info(
            "session_ended",
            session_id=session.session_id,
            client_id=session.client_id,
            reason=reason,
        )
        if reason == "expired":
            self._announce("expired", session)
        elif reason != "taken_over":
            self._announce("ended", session, reason=reason)
