"""SessionManager: creates, resumes, takes over and expires sessions; never waits on anyone.
Connection epochs and cleanup-timer generations: docs/architecture.md section 9; a bind is
committed (`_Bound`) before it is answered: section 6."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    UsersChanged,
)
from tether.broker.session_state import Cancellable, Session, log_store_error, new_session_id
from tether.broker.store import (
    Batch,
    PutSession,
    SessionRecord,
    SetHealth,
    Store,
    StoreError,
    Touch,
    token_hash,
)
from tether.protocol import ErrorCode, Register

if TYPE_CHECKING:
    from tether.broker.subscribers import SubscriberManager

_log = structlog.get_logger("tether.sessions")


@dataclass(frozen=True, slots=True)
class _Expire:
    session_id: str
    generation: int


@dataclass(frozen=True, slots=True)
class _Bound:
    """The store's answer to a bind: `attach` may go out (error None) or must be refused."""

    attach: Attach
    generation: int
    created: bool  # a new session (forgotten again if its record could not be stored)
    previous_conn: int | None  # the connection the bind replaced, if any
    error: StoreError | None


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
        store: Store | None = None,
        restored: Sequence[SessionRecord] = (),
    ) -> None:
        super().__init__(loop, loop_thread)
        self._subscribers = subscriber_manager
        self._expiry = session_expiry
        # Injectable so that tests can fire cleanup timers without waiting for them.
        self._call_later = call_later or loop.call_later
        self._store = store  # None: in memory only, nothing is written anywhere
        self._sessions: dict[str, Session] = {}
        self._by_client: dict[str, str] = {}
        # Sessions loaded from the store at start-up: all away, each with its full expiry.
        for record in restored:
            session = Session.restored(record)
            self._sessions[session.session_id] = session
            self._by_client[session.client_id] = session.session_id

    def on_start(self) -> None:
        if not self._sessions:
            return
        now = time.time()
        for session in self._sessions.values():
            self._arm_timer(session)
        deadline = now + self._expiry
        self._write(
            tuple(Touch(s.session_id, s.last_seen, deadline) for s in self._sessions.values()),
            "restored",
        )

    def _write(self, batch: Batch, what: str) -> None:
        """Submit what need not be waited for (nothing is promised on it)."""
        if self._store is not None and batch:
            self._store.submit(batch, log_store_error(what))

    def on_receive(self, message: object) -> object:
        match message:
            case OpenSession():
                self._on_open(message)
            case ConnectionLost(session_id, conn_id):
                session = self._current(session_id, conn_id)
                if session is not None:
                    session.conn = None
                    session.last_seen = now = time.time()
                    self._arm_timer(session)
                    tell(self._subscribers, Detach(session_id, conn_id))
                    self._write((Touch(session_id, now, now + self._expiry),), "disconnected")
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
                    changed = (status is not None and status != session.health) or (
                        details is not None and details != session.health_details
                    )
                    if status is not None:
                        session.health = status
                    if details is not None:
                        session.health_details = details
                    if changed:
                        self._write(
                            (SetHealth(session_id, session.health, session.health_details),),
                            "health",
                        )
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
            case _Bound():
                self._on_bound(message)
            case UsersChanged(valid_after):
                self._on_users_changed(valid_after)
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
        previous_conn = session.conn.conn_id if session.conn is not None else None
        session.keepalive = frame.keepalive
        if frame.metadata:
            session.metadata = frame.metadata
        # The token just shown stays good until the client shows the new one: if this
        # `registered` is lost with the connection, the client can still come back.
        session.previous_hash = token_hash(frame.resume_token)
        self._bind(session, conn, resumed=True, req=frame.req, previous_conn=previous_conn)

    def _on_users_changed(self, valid_after: Mapping[str, float | None]) -> None:
        """End the sessions of users removed from the users file, and those created before
        their user's `sessions_valid_after`: their connections get `session_ended`, their
        queues are discarded, and a resume of them is refused (`unknown_session`). A fresh
        session is never refused here: the supervisor checked the user against the users
        file it told this actor of last (and refuses a check that the reload overtook)."""
        for session in list(self._sessions.values()):
            if session.username not in valid_after:
                reason = "user_removed"
            else:
                after = valid_after[session.username]
                if after is None or session.created >= after:
                    continue
                reason = "sessions_revoked"
            if session.conn is not None:
                tell(
                    session.conn.ref,
                    TakenOver(
                        session.session_id,
                        ErrorCode.SESSION_ENDED,
                        "the broker ended this session: its user was removed or its sessions "
                        "were revoked",
                    ),
                )
            self._remove(session, reason)

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
            session_id=new_session_id(),
            client_id=frame.client_id,
            username=frame.username,
            token_hash=b"",
            keepalive=frame.keepalive,
            metadata=frame.metadata,
            conn=None,
        )
        self._sessions[session.session_id] = session
        self._by_client[session.client_id] = session.session_id
        self._bind(session, conn, resumed=False, req=frame.req)

    def _bind(
        self,
        session: Session,
        conn: ConnHandle,
        *,
        resumed: bool,
        req: int,
        previous_conn: int | None = None,
    ) -> None:
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        session.generation += 1
        session.conn = conn
        session.last_seen = time.time()
        # A new token at every bind; with `previous_hash`, at most two are ever good.
        token = secrets.token_urlsafe(24)
        session.token_hash = token_hash(token)
        attach = Attach(
            session_id=session.session_id,
            client_id=session.client_id,
            conn=conn,
            req=req,
            resume_token=token,
            resumed=resumed,
            keepalive=session.keepalive,
            expiry=round(self._expiry),
        )
        if self._store is None:
            tell(self._subscribers, attach)
        else:
            # `registered` (and the token in it) goes out once the store has the token.
            # The whole record: a resume may change keepalive and metadata besides the tokens.
            batch: Batch = (PutSession(session.record(None)),)
            ref, generation = self.actor_ref, session.generation

            def done(error: StoreError | None) -> None:
                tell(ref, _Bound(attach, generation, not resumed, previous_conn, error))

            self._store.submit(batch, done)
        _log.info(
            "session_resumed" if resumed else "session_registered",
            session_id=session.session_id,
            client_id=session.client_id,
            username=session.username,
            peer=conn.peer,
            keepalive=session.keepalive,
            metadata=session.metadata or None,
        )

    def _on_bound(self, msg: _Bound) -> None:
        attach = msg.attach
        session = self._sessions.get(attach.session_id)
        current = (
            session is not None
            and session.generation == msg.generation
            and session.conn is not None
            and session.conn.conn_id == attach.conn.conn_id
        )
        if msg.error is None and current:
            tell(self._subscribers, attach)
            return
        if msg.error is None:
            # Overtaken while it was being stored: a newer bind (or an end) won.
            tell(
                attach.conn.ref,
                RegisterRejected(
                    attach.req,
                    ErrorCode.UNKNOWN_SESSION,
                    "the session was taken over or ended while this registration was stored",
                ),
            )
            return
        _log.warning(
            "session_not_stored",
            session_id=attach.session_id,
            client_id=attach.client_id,
            error=str(msg.error),
        )
        tell(
            attach.conn.ref,
            RegisterRejected(
                attach.req,
                ErrorCode.UNAVAILABLE,
                f"the broker could not store the session ({msg.error}): try again",
            ),
        )
        if session is None or not current:
            return
        session.conn = None
        if msg.created:
            # Nothing of it was stored, and nobody else knows it.
            self._sessions.pop(session.session_id, None)
            if self._by_client.get(session.client_id) == session.session_id:
                del self._by_client[session.client_id]
            return
        # A resume: the token shown (now `previous_hash`) stays good; the session is away.
        if msg.previous_conn is not None:
            tell(self._subscribers, Detach(session.session_id, msg.previous_conn))
        self._arm_timer(session)

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
