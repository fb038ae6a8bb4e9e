"""SessionManager: creates, resumes, takes over and expires sessions; never waits on anyone.
Connection epochs and cleanup-timer generations: docs/architecture.md section 9; a bind is
committed (`_Bound`) before it is answered: section 6.

The fleet view (issue 11) is answered here too, from the sessions this actor owns: presence,
pages and admin actions (`fleet_view.py` builds the views), and `GetMetrics`. Each cause in a
session's life is logged and announced once (`session_events.py`: when, and what).

Registrations are counted once each, by outcome: `new`, `resumed`, `taken_over` (a fresh
`takeover=true` that replaced a live or away session, or a resume over a live connection: not
counted as new or resumed too), `conflict`, `unknown_session`. A bind whose commit fails is
counted in none of them. A fresh register over the user's session quota
(`max_sessions_per_user`) is refused `quota_exceeded` and counted apart
(`sessions_quota_refused`); a failed resume is logged (`resume_failed`, with why, never the
token) and counted as `unknown_session`.
"""

from __future__ import annotations

import asyncio
import bisect
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pykka import ActorRef

from tether.broker import fleet_view
from tether.broker.listener import CloseConnection
from tether.broker.logthrottle import LogThrottle
from tether.broker.loop_actor import LoopActor, tell
from tether.broker.messages import (
    Attach,
    ConnectionLost,
    ConnHandle,
    Detach,
    DisconnectSession,
    DropSession,
    EndSession,
    EndSessionByAdmin,
    GetMetrics,
    GetSession,
    Heartbeat,
    ListSessions,
    OpenSession,
    RegisterRejected,
    Seen,
    SessionView,
    TakenOver,
    UsersChanged,
)
from tether.broker.session_events import Lifecycle
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
class BrokerDraining:
    """ListenerManager -> SessionManager, on shutdown, before it closes the connections: the
    disconnects that follow are the shutdown's (their events say `reason: shutdown`)."""


@dataclass(frozen=True, slots=True)
class _Bound:
    """The store's answer to a bind: `attach` may go out (error None) or must be refused."""

    attach: Attach
    generation: int
    created: bool  # a new session (forgotten again if its record could not be stored)
    previous_conn: int | None  # the connection the bind replaced, if any
    outcome: str  # the registration's outcome once granted: new, resumed, taken_over
    error: StoreError | None


# Registration outcomes, each a `registrations_<outcome>` metric.
_OUTCOMES = ("new", "resumed", "taken_over", "conflict", "unknown_session")


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
        clock: Callable[[], float] = time.time,
        max_sessions_per_user: int = 0,
    ) -> None:
        """`max_sessions_per_user`: sessions (online or away) one user may hold; 0: no limit."""
        super().__init__(loop, loop_thread)
        self._max_per_user = max_sessions_per_user
        self._per_user: dict[str, int] = {}  # username -> sessions held
        self._quota_refused = 0
        self._quiet = LogThrottle(loop, _log_quietly)
        self._subscribers = subscriber_manager
        self._expiry = session_expiry
        # Injectable so that tests can fire cleanup timers without waiting for them, and
        # read presence at a time of their choosing.
        self._call_later = call_later or loop.call_later
        self._clock = clock
        self._lifecycle = Lifecycle(subscriber_manager, clock)  # its log lines and events
        self._store = store  # None: in memory only, nothing is written anywhere
        self._sessions: dict[str, Session] = {}
        self._by_client: dict[str, str] = {}
        # The keys of `_by_client`, kept sorted (`_index`, `_unindex`) for the fleet view's
        # pages: a query costs its page, not a sort of every session.
        self._client_ids: list[str] = []
        self._draining = False
        self._outcomes = dict.fromkeys(_OUTCOMES, 0)
        # Sessions loaded from the store at start-up: all away, each with its full expiry.
        for record in restored:
            self._index(Session.restored(record))

    def _index(self, session: Session) -> None:
        self._sessions[session.session_id] = session
        self._per_user[session.username] = self._per_user.get(session.username, 0) + 1
        if session.client_id not in self._by_client:
            bisect.insort(self._client_ids, session.client_id)
        self._by_client[session.client_id] = session.session_id

    def _unindex(self, session: Session) -> None:
        if self._sessions.pop(session.session_id, None) is not None:
            left = self._per_user[session.username] - 1
            if left:
                self._per_user[session.username] = left
            else:
                del self._per_user[session.username]
        if self._by_client.get(session.client_id) == session.session_id:
            del self._by_client[session.client_id]
            at = bisect.bisect_left(self._client_ids, session.client_id)
            del self._client_ids[at]

    def on_stop(self) -> None:
        self._quiet.close()

    def on_start(self) -> None:
        if not self._sessions:
            return
        now = self._clock()
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
            case Seen(session_id, conn_id, at):
                session = self._current(session_id, conn_id)
                if session is not None and at > session.last_seen:
                    session.last_seen = at
            case OpenSession():
                self._on_open(message)
            case ConnectionLost(session_id, conn_id):
                session = self._current(session_id, conn_id)
                if session is not None:
                    self._on_lost(session)
            case Heartbeat(session_id, conn_id, status, details):
                session = self._current(session_id, conn_id)
                if session is not None:
                    self._on_heartbeat(session, status, details)
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
            case UsersChanged(valid_after, prefixes):
                self._on_users_changed(valid_after, prefixes)
            case ListSessions():
                return fleet_view.page(
                    self._client_ids, self._by_client_id, message, self._clock(), self._expiry
                )
            case GetSession(client_id):
                return self._view(client_id)
            case DisconnectSession(client_id):
                return self._disconnect(client_id)
            case EndSessionByAdmin(client_id):
                return self._end_by_admin(client_id)
            case GetMetrics():
                return self._metrics()
            case BrokerDraining():
                self._draining = True
            case _:
                return super().on_receive(message)
        return None

    # --- the fleet view -------------------------------------------------------------------

    def _by_client_id(self, client_id: str) -> Session:
        return self._sessions[self._by_client[client_id]]

    def _view(self, client_id: str) -> SessionView | None:
        session_id = self._by_client.get(client_id)
        if session_id is None:
            return None
        return fleet_view.session_view(self._sessions[session_id], self._clock(), self._expiry)

    def _disconnect(self, client_id: str) -> SessionView | None:
        """Close the session's connection without an error frame; its `ConnectionLost` then
        makes it linger as after any disconnect (event reason `disconnected_by_admin`)."""
        view = self._view(client_id)
        if view is None:
            return None
        session = self._by_client_id(client_id)
        if session.conn is not None:
            session.close_reason = "disconnected_by_admin"
            tell(session.conn.ref, CloseConnection("disconnected_by_admin"))
        _log.info(
            "session_disconnect_requested",
            session_id=session.session_id,
            client_id=client_id,
            connected=session.conn is not None,
        )
        return view

    def _end_by_admin(self, client_id: str) -> SessionView | None:
        view = self._view(client_id)
        if view is None:
            return None
        session = self._by_client_id(client_id)
        if session.conn is not None:
            tell(
                session.conn.ref,
                TakenOver(
                    session.session_id,
                    ErrorCode.SESSION_ENDED,
                    "the broker's operator ended this session",
                ),
            )
        self._remove(session, "ended_by_admin")
        return view

    def _metrics(self) -> dict[str, int]:
        online = fleet_view.count_online(self._sessions.values(), self._clock())
        metrics = {
            "sessions_online": online,
            "sessions_away": len(self._sessions) - online,
        }
        for outcome, count in self._outcomes.items():
            metrics[f"registrations_{outcome}"] = count
        metrics["sessions_quota_refused"] = self._quota_refused
        return metrics

    def _reject(self, conn: ConnHandle, req: int, code: ErrorCode, text: str) -> None:
        if code is ErrorCode.CONFLICT:
            self._outcomes["conflict"] += 1
        elif code is ErrorCode.UNKNOWN_SESSION:
            self._outcomes["unknown_session"] += 1
        tell(conn.ref, RegisterRejected(req, code, text))

    # --- sessions' lives ------------------------------------------------------------------

    def _on_lost(self, session: Session) -> None:
        assert session.conn is not None
        conn = session.conn
        session.conn = None
        now = self._clock()
        session.away_since = now
        self._arm_timer(session)
        tell(self._subscribers, Detach(session.session_id, conn.conn_id))
        self._write(
            (Touch(session.session_id, session.last_seen, now + self._expiry),), "disconnected"
        )
        reason = session.close_reason or ("shutdown" if self._draining else "connection_lost")
        session.close_reason = None
        self._lifecycle.disconnected(session, conn.peer, reason, self._expiry)

    def _on_heartbeat(
        self, session: Session, status: str | None, details: dict[str, Any] | None
    ) -> None:
        session.last_seen = session.health_at = self._clock()
        was = session.health
        changed = (status is not None and status != was) or (
            details is not None and details != session.health_details
        )
        if status is not None:
            session.health = status
        if details is not None:
            session.health_details = details
        if changed:
            self._write(
                (SetHealth(session.session_id, session.health, session.health_details),),
                "health",
            )
        if status is not None and status != was:
            self._lifecycle.health(session, was)

    def _current(self, session_id: str, conn_id: int) -> Session | None:
        session = self._sessions.get(session_id)
        if session is None or session.conn is None or session.conn.conn_id != conn_id:
            return None
        return session

    def _on_open(self, msg: OpenSession) -> None:
        frame = msg.frame
        if frame.session_id is not None:
            self._resume(frame, msg.conn, msg.admin)
        elif msg.authenticated:
            self._create(frame, msg.conn, msg.admin)
        else:
            # Only the supervisor opens sessions; a fresh one it did not authenticate is a bug.
            raise RuntimeError("fresh registration reached the SessionManager unauthenticated")

    def _resume(self, frame: Register, conn: ConnHandle, admin: bool) -> None:
        assert frame.session_id is not None and frame.resume_token is not None
        session = self._sessions.get(frame.session_id)
        why = _resume_refusal(session, frame)
        if why is not None:
            # No password check stands behind a resume: a peer can repeat it at will.
            self._quiet.hit(
                f"resume_failed|{why}",
                session_id=frame.session_id,
                client_id=frame.client_id,
                username=frame.username,
                peer=conn.peer,
                why=why,
            )
            self._reject(
                conn,
                frame.req,
                ErrorCode.UNKNOWN_SESSION,
                "no such session (expired, ended, or wrong token): register afresh",
            )
            return
        assert session is not None
        outcome = "resumed"
        if session.conn is not None:
            tell(session.conn.ref, TakenOver(session.session_id))
            self._lifecycle.taken_over(session, conn.peer, by="resume")
            outcome = "taken_over"
        previous_conn = session.conn.conn_id if session.conn is not None else None
        session.keepalive = frame.keepalive
        if frame.metadata:
            session.metadata = frame.metadata
        # The token just shown stays good until the client shows the new one: if this
        # `registered` is lost with the connection, the client can still come back.
        session.previous_hash = token_hash(frame.resume_token)
        session.admin = admin
        self._bind(
            session, conn, resumed=True, outcome=outcome, req=frame.req, previous_conn=previous_conn
        )

    def _on_users_changed(
        self,
        valid_after: Mapping[str, float | None],
        prefixes: Mapping[str, tuple[str, ...] | None],
    ) -> None:
        """End the sessions of users removed from the users file, those created before
        their user's `sessions_valid_after`, and those whose client id no longer starts with
        one of their user's `client_id_prefixes`: their connections get `session_ended`, their
        queues are discarded, and a resume of them is refused (`unknown_session`). A fresh
        session is never refused here: the supervisor checked the user against the users
        file it told this actor of last (and refuses a check that the reload overtook)."""
        for session in list(self._sessions.values()):
            allowed = prefixes.get(session.username)
            if session.username not in valid_after:
                reason = "user_removed"
            elif (after := valid_after[session.username]) is not None and session.created < after:
                reason = "sessions_revoked"
            elif allowed is not None and not session.client_id.startswith(allowed):
                reason = "client_id_not_allowed"
            else:
                continue
            if session.conn is not None:
                tell(
                    session.conn.ref,
                    TakenOver(
                        session.session_id,
                        ErrorCode.SESSION_ENDED,
                        "the broker ended this session: its user was removed, its sessions "
                        "were revoked, or its client id is no longer one its user may use",
                    ),
                )
            self._remove(session, reason)

    def _create(self, frame: Register, conn: ConnHandle, admin: bool) -> None:
        outcome = "new"
        existing_id = self._by_client.get(frame.client_id)
        if existing_id is not None:
            existing = self._sessions[existing_id]
            if existing.username != frame.username:
                self._reject(
                    conn,
                    frame.req,
                    ErrorCode.CONFLICT,
                    f"client_id {frame.client_id!r} belongs to another user's session",
                )
                return
            if not frame.takeover:
                self._reject(
                    conn,
                    frame.req,
                    ErrorCode.CONFLICT,
                    f"client_id {frame.client_id!r} already has a session: resume it with its "
                    "session_id and resume_token, or register with takeover=true to end it",
                )
                return
            if existing.conn is not None:
                tell(existing.conn.ref, TakenOver(existing.session_id))
            self._lifecycle.taken_over(existing, conn.peer, by="takeover")
            self._remove(existing, "taken_over")
            outcome = "taken_over"
        elif 0 < self._max_per_user <= self._per_user.get(frame.username, 0):
            # A takeover of the user's own client id (above) replaces a session: never refused.
            self._quota_refused += 1
            _log.info(
                "session_quota_exceeded",
                client_id=frame.client_id,
                username=frame.username,
                peer=conn.peer,
                sessions=self._per_user[frame.username],
                limit=self._max_per_user,
            )
            tell(
                conn.ref,
                RegisterRejected(
                    frame.req,
                    ErrorCode.QUOTA_EXCEEDED,
                    f"this user already has {self._max_per_user} sessions, the broker's limit: "
                    "end one (unregister) or resume it",
                ),
            )
            return
        session = Session(
            session_id=new_session_id(),
            client_id=frame.client_id,
            username=frame.username,
            token_hash=b"",
            keepalive=frame.keepalive,
            metadata=frame.metadata,
            conn=None,
            admin=admin,
        )
        self._index(session)
        self._bind(session, conn, resumed=False, outcome=outcome, req=frame.req)

    def _bind(
        self,
        session: Session,
        conn: ConnHandle,
        *,
        resumed: bool,
        outcome: str,
        req: int,
        previous_conn: int | None = None,
    ) -> None:
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        session.generation += 1
        session.conn = conn
        session.last_seen = session.connected_since = self._clock()
        session.away_since = session.expires_at = None
        session.close_reason = None
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
            username=session.username,
            admin=session.admin,
        )
        if self._store is None:
            self._granted(session, attach, outcome)
            return
        # `registered` (and the token in it) goes out once the store has the token.
        # The whole record: a resume may change keepalive and metadata besides the tokens.
        batch: Batch = (PutSession(session.record(None)),)
        ref, generation = self.actor_ref, session.generation

        def done(error: StoreError | None) -> None:
            tell(ref, _Bound(attach, generation, not resumed, previous_conn, outcome, error))

        self._store.submit(batch, done)

    def _granted(self, session: Session, attach: Attach, outcome: str) -> None:
        """The bind holds (committed, with a store): answer it, count it, announce it."""
        tell(self._subscribers, attach)
        self._outcomes[outcome] += 1
        if attach.resumed:
            self._lifecycle.resumed(session, attach.conn.peer)
        else:
            self._lifecycle.registered(session, attach.conn.peer)

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
            assert session is not None
            self._granted(session, attach, msg.outcome)
            return
        if msg.error is None:
            # Overtaken while it was being stored: a newer bind (or an end) won.
            self._reject(
                attach.conn,
                attach.req,
                ErrorCode.UNKNOWN_SESSION,
                "the session was taken over or ended while this registration was stored",
            )
            return
        _log.warning(
            "session_not_stored",
            session_id=attach.session_id,
            client_id=attach.client_id,
            error=str(msg.error),
        )
        self._reject(
            attach.conn,
            attach.req,
            ErrorCode.UNAVAILABLE,
            f"the broker could not store the session ({msg.error}): try again",
        )
        if session is None or not current:
            return
        session.conn = None
        if msg.created:
            # Nothing of it was stored, and nobody else knows it.
            self._unindex(session)
            return
        # A resume: the token shown (now `previous_hash`) stays good; the session is away.
        session.away_since = self._clock()
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

        session.expires_at = self._clock() + self._expiry
        session.timer = self._call_later(self._expiry, fire)

    def _remove(self, session: Session, reason: str, *, drop_queues: bool = True) -> None:
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        self._unindex(session)
        if drop_queues:
            tell(self._subscribers, DropSession(session.session_id, reason))
        self._lifecycle.ended(session, reason)


def _log_quietly(kind: str, count: int, fields: dict[str, Any]) -> None:
    # One line per kind and interval, `count` saying how many it stands for.
    _log.info(kind.partition("|")[0], count=count, **fields)


def _resume_refusal(session: Session | None, frame: Register) -> str | None:
    """Why a resume is refused (for the log only: the answer is the same for all), or None."""
    assert frame.resume_token is not None
    if session is None:
        return "no_such_session"
    if session.client_id != frame.client_id or session.username != frame.username:
        return "wrong_client_or_user"
    if not session.token_matches(frame.resume_token):
        return "wrong_token"
    return None
