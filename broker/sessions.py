"""SessionManager: creates, resumes, takes over and expires sessions; never waits on anyone.
See docs/architecture.md sections 6 and 9.

Theory of operation: a session is bound to at most one connection, named by its `conn_id`, and
every event that names a connection is checked against it, so a late event from a replaced
connection never touches its successor. A session without a connection has one cleanup timer,
carrying the session's `generation` (bumped at every bind and every arming), so a timer that
fires after a resume is recognised as stale and ignored.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from pykka import ActorRef

from tether.broker.loop_actor import LoopActor, tell
from tether.broker.messages import (
    Attach,
    ConnectionLost,
    ConnHandle,
    Detach,
    DropSession,
    EndSession,
    Heartbeat,
    OpenSession,
    RegisterRejected,
    TakenOver,
)
from tether.protocol import ErrorCode, Register

if TYPE_CHECKING:
    from tether.broker.subscribers import SubscriberManager

_log = structlog.get_logger("tether.sessions")


class Cancellable(Protocol):
    def cancel(self) -> None: ...


@dataclass(slots=True)
class Session:
    session_id: str
    client_id: str
    username: str
    resume_token: str
    keepalive: int
    metadata: dict[str, Any]
    conn: ConnHandle | None
    generation: int = 0
    timer: Cancellable | None = None
    health: str | None = None
    health_details: dict[str, Any] | None = None
    previous_token: str | None = None
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)

    def token_matches(self, token: str) -> bool:
        presented = token.encode("utf-8", "surrogatepass")
        return any(
            hmac.compare_digest(presented, valid.encode())
            for valid in (self.resume_token, self.previous_token)
            if valid is not None
        )


@dataclass(frozen=True, slots=True)
class _Expire:
    session_id: str
    generation: int


def _new_id() -> str:
    return secrets.token_urlsafe(16)


class SessionManager(LoopActor):
    resume_after_failure = True

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        loop_thread: int,
        *,
        subscriber_manager: ActorRef[SubscriberManager],
        session_expiry: float,
        call_later: Callable[[float, Callable[[], None]], Cancellable] | None = None,
    ) -> None:
        super().__init__(loop, loop_thread)
        self._subscribers = subscriber_manager
        self._expiry = session_expiry
        # Injectable so that tests can fire cleanup timers without waiting for them.
        self._call_later = call_later or loop.call_later
        self._sessions: dict[str, Session] = {}
        self._by_client: dict[str, str] = {}

    def on_receive(self, message: object) -> object:
        match message:
            case OpenSession():
                self._on_open(message)
            case ConnectionLost(session_id, conn_id):
                session = self._current(session_id, conn_id)
                if session is not None:
                    session.conn = None
                    session.last_seen = time.time()
                    self._arm_timer(session)
                    tell(self._subscribers, Detach(session_id, conn_id))
                    _log.info(
                        "session_disconnected",
                        session_id=session_id,
                        client_id=session.client_id,
                        expires_in=self._expiry,
                    )
            case Heartbeat(session_id, conn_id, status, details):
                session = self._current(session_id, conn_id)
                if session is not None:
                    session.last_seen = time.time()
                    if status is not None and status != session.health:
                        _log.info(
                            "session_health",
                            session_id=session_id,
                            client_id=session.client_id,
                            status=status,
                            was=session.health,
                        )
                    if status is not None:
                        session.health = status
                    if details is not None:
                        session.health_details = details
            case EndSession(session_id, conn_id):
                session = self._current(session_id, conn_id)
                if session is not None:
                    # The SubscriberManager dropped its queues when it answered the unregister.
                    self._remove(session, "unregistered", drop_queues=False)
            case _Expire(session_id, generation):
                session = self._sessions.get(session_id)
                if (
                    session is not None
                    and session.generation == generation
                    and session.conn is None
                ):
                    self._remove(session, "expired")
            case _:
                return super().on_receive(message)
        return None

    def _current(self, session_id: str, conn_id: int) -> Session | None:
        session = self._sessions.get(session_id)
        if session is None or session.conn is None or session.conn.conn_id != conn_id:
            return None
        return session

    def _on_open(self, msg: OpenSession) -> None:
        frame = msg.frame
        if frame.session_id is not None:
            self._resume(frame, msg.conn)
        elif msg.authenticated:
            self._create(frame, msg.conn)
        else:
            # Only the supervisor opens sessions; a fresh one it did not authenticate is a bug.
            raise RuntimeError("fresh registration reached the SessionManager unauthenticated")

    def _resume(self, frame: Register, conn: ConnHandle) -> None:
        assert frame.session_id is not None and frame.resume_token is not None
        session = self._sessions.get(frame.session_id)
        if (
            session is None
            or session.client_id != frame.client_id
            or session.username != frame.username
            or not session.token_matches(frame.resume_token)
        ):
            tell(
                conn.ref,
                RegisterRejected(
                    frame.req,
                    ErrorCode.UNKNOWN_SESSION,
                    "no such session (expired, ended, or wrong token): register afresh",
                ),
            )
            return
        if session.conn is not None:
            tell(session.conn.ref, TakenOver(session.session_id))
            _log.info(
                "session_taken_over",
                session_id=session.session_id,
                client_id=session.client_id,
                by="resume",
            )
        session.keepalive = frame.keepalive
        if frame.metadata:
            session.metadata = frame.metadata
        # The token just shown stays good until the client shows the new one: if this
        # `registered` is lost with the connection, the client can still come back.
        session.previous_token = frame.resume_token
        self._bind(session, conn, resumed=True, req=frame.req)

    def _create(self, frame: Register, conn: ConnHandle) -> None:
        existing_id = self._by_client.get(frame.client_id)
        if existing_id is not None:
            existing = self._sessions[existing_id]
            if existing.username != frame.username:
                tell(
                    conn.ref,
                    RegisterRejected(
                        frame.req,
                        ErrorCode.CONFLICT,
                        f"client_id {frame.client_id!r} belongs to another user's session",
                    ),
                )
                return
            if not frame.takeover:
                tell(
                    conn.ref,
                    RegisterRejected(
                        frame.req,
                        ErrorCode.CONFLICT,
                        f"client_id {frame.client_id!r} already has a session: resume it with its "
                        "session_id and resume_token, or register with takeover=true to end it",
                    ),
                )
                return
            if existing.conn is not None:
                tell(existing.conn.ref, TakenOver(existing.session_id))
            _log.info(
                "session_taken_over",
                session_id=existing.session_id,
                client_id=existing.client_id,
                by="takeover",
            )
            self._remove(existing, "taken_over")
        session = Session(
            session_id=_new_id(),
            client_id=frame.client_id,
            username=frame.username,
            resume_token="",
            keepalive=frame.keepalive,
            metadata=frame.metadata,
            conn=None,
        )
        self._sessions[session.session_id] = session
        self._by_client[session.client_id] = session.session_id
        self._bind(session, conn, resumed=False, req=frame.req)

    def _bind(self, session: Session, conn: ConnHandle, *, resumed: bool, req: int) -> None:
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        session.generation += 1
        session.conn = conn
        session.last_seen = time.time()
        # A new token at every bind; with `previous_token`, at most two are ever good.
        session.resume_token = secrets.token_urlsafe(24)
        tell(
            self._subscribers,
            Attach(
                session_id=session.session_id,
                client_id=session.client_id,
                conn=conn,
                req=req,
                resume_token=session.resume_token,
                resumed=resumed,
                keepalive=session.keepalive,
                expiry=round(self._expiry),
            ),
        )
        _log.info(
            "session_resumed" if resumed else "session_registered",
            session_id=session.session_id,
            client_id=session.client_id,
            username=session.username,
            peer=conn.peer,
            keepalive=session.keepalive,
            metadata=session.metadata or None,
        )

    def _arm_timer(self, session: Session) -> None:
        if session.timer is not None:
            session.timer.cancel()
        session.generation += 1
        expire = _Expire(session.session_id, session.generation)
        ref = self.actor_ref

        def fire() -> None:
            tell(ref, expire)

        session.timer = self._call_later(self._expiry, fire)

    def _remove(self, session: Session, reason: str, *, drop_queues: bool = True) -> None:
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        self._sessions.pop(session.session_id, None)
        if self._by_client.get(session.client_id) == session.session_id:
            del self._by_client[session.client_id]
        if drop_queues:
            tell(self._subscribers, DropSession(session.session_id, reason))
        _log.info(
            "session_ended",
            session_id=session.session_id,
            client_id=session.client_id,
            reason=reason,
        )
