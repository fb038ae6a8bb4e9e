"""BrokerSupervisor: authenticates registrations (bcrypt in a small pool, off the loop) and
rate-limits failed logins per address; a resume goes straight on to the SessionManager.

Fair logins (issue 12, docs/protocol.md 6.6): a fresh `register` waits in one bounded queue
(`auth_queue.py`: round robin across source addresses, known devices first) until one of the
`auth_workers` threads is free; only that many checks are ever handed to the pool, so the
order in which checks run is the queue's. A full queue answers `rate_limited` at once, without
a hash. An address past the failure limit still has its checks made (a correct password logs
in); only its wrong answers are slowed (`failure_penalty`). A client id outside the user's
allowed prefixes is refused before any check (`not_authorized`). Resumes never queue.

Certificate logins (issue 13, `--tls-cert-username cn|san`): a fresh `register` on a connection
with a verified client certificate logs in as the name the certificate gives, with no password
check (a password sent is ignored): the `username` must be that name and a user in the users
file, else `auth_failed`. A fresh `register` with neither a password nor such a certificate is
`auth_failed` ("a password is required") without a check. Resumes are unchanged.

It holds the users file as last loaded; a reload (`UsersReloaded`, from `userwatch.py`) replaces
it, and the SessionManager is told which users' sessions stay valid (`UsersChanged`).
See docs/architecture.md sections 3 ("bcrypt off the loop") and 11.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pykka import ActorRef

from tether.broker import passwords
from tether.broker.addresses import source_of
from tether.broker.auth_queue import AuthQueue, KnownDevices, RegisterAbandoned
from tether.broker.logthrottle import LogThrottle
from tether.broker.loop_actor import LoopActor, tell
from tether.broker.messages import (
    ConnHandle,
    GetMetrics,
    GetStats,
    OpenSession,
    RegisterRejected,
    RegisterRequest,
    UsersChanged,
    UsersReloaded,
)
from tether.broker.ratelimit import FailureLimiter
from tether.broker.tls import PeerCertificate
from tether.broker.users import UserStore
from tether.protocol import ErrorCode, Register

if TYPE_CHECKING:
    from tether.broker.sessions import SessionManager

_log = structlog.get_logger("tether.supervisor")


@dataclass(frozen=True, slots=True)
class _AuthDone:
    request: RegisterRequest
    ok: bool
    checked: str | None  # the hash the password was checked against (None: unknown user)
    # Why a check failed, for the log only (the answer on the wire is the same for all):
    # "unknown_user", "wrong_password", or "check_failed: <exception>".
    reason: str | None = None


# How long a successful login makes its (address, username) pair a known device, and how many
# pairs are remembered (the oldest forgotten first).
KNOWN_DEVICE_TTL = 3600.0
KNOWN_DEVICES_MAX = 100_000


def _usual_cost(users: UserStore) -> int:
    # An unknown name is checked against a dummy of the cost most real users have.
    costs = [passwords.cost_of(users.lookup(name) or "") for name in users.names()]
    return max(set(costs), key=costs.count) if costs else 12


def _log_quietly(kind: str, count: int, fields: dict[str, Any]) -> None:
    # Refusals that cost no password check (a peer can repeat them at will): one line per
    # kind and interval, `count` saying how many it stands for.
    _log.info(kind, count=count, **fields)


# Seconds a register refused for a full login queue is told to wait (`error.retry_after`): the
# queue moves at the speed of bcrypt, and the client adds its own jitter on top.
QUEUE_FULL_RETRY_AFTER = 1


def _peer_address(peer: str) -> str:
    # "host:port" -> "host": failures and the login queue's turns count per source (an IPv4
    # address or an IPv6 /64: addresses.py), not per connection.
    return source_of(peer.rsplit(":", 1)[0])


class BrokerSupervisor(LoopActor):
    resume_after_failure = True

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        loop_thread: int,
        *,
        users: UserStore,
        session_manager: ActorRef[SessionManager],
        auth_workers: int,
        limiter: FailureLimiter,
        failure_penalty: float = 1.0,
        observe_check: Callable[[float], None] | None = None,
        auth_queue: int = 1_000,
        clock: Callable[[], float] = time.monotonic,
        cert_username: str | None = None,
    ) -> None:
        """`observe_check` is called (on the auth pool's thread) with the duration in
        seconds of each password check: the /metrics histogram's `observe`. `auth_queue`:
        how many fresh registrations may wait for a check at once. `cert_username` ("cn",
        "san" or None): which name of a client certificate is the username."""
        super().__init__(loop, loop_thread)
        self._cert_username = cert_username
        self._users = users
        self._unknown_user_cost = _usual_cost(users)
        self._sessions = session_manager
        self._limiter = limiter
        self._workers = auth_workers
        self._pool = ThreadPoolExecutor(max_workers=auth_workers, thread_name_prefix="tether-auth")
        self._penalty = failure_penalty
        self._queue: AuthQueue[RegisterRequest] = AuthQueue(auth_queue)
        self._known = KnownDevices(ttl=KNOWN_DEVICE_TTL, max_pairs=KNOWN_DEVICES_MAX)
        self._busy = 0  # checks handed to the pool and not yet done (at most `_workers`)
        self._clock = clock
        self._quiet = LogThrottle(loop, _log_quietly)
        self._observe_check = observe_check
        self.auth_ok = 0
        self.auth_failed = 0  # failed checks (some of them answered rate_limited)
        self.rate_limited = 0
        self.password_checks = 0  # checks done (bcrypt), whatever their outcome
        # Registrations answered `auth_failed` (GetMetrics: one outcome per registration,
        # so a failure answered `rate_limited` after the penalty counts as that only).
        self.refused_auth_failed = 0
        self.queue_refused = 0  # answered rate_limited because the queue was full
        self.client_id_refused = 0  # answered not_authorized: client id outside the prefixes
        self.certificate_logins = 0  # logged in by their client certificate (no check)

    def on_stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._quiet.close()

    def on_receive(self, message: object) -> object:
        match message:
            case RegisterRequest(frame=frame, conn=conn, certificate=certificate):
                if self._cert_username is not None and certificate is not None:
                    # The certificate names the user, for a resume as for a fresh session: a
                    # resume token alone does not let another certificate's holder in.
                    if self._certificate_refused(frame, conn, certificate, self._cert_username):
                        return None
                    if frame.session_id is None:
                        self._certificate_login(frame, conn)
                        return None
                if self._client_id_refused(frame, conn):
                    return None
                if frame.session_id is None and frame.password is None:
                    self._refuse_auth(frame, conn, "no_password", "a password is required")
                    return None
                if frame.session_id is not None:
                    admin = self._users.is_admin(frame.username)
                    tell(self._sessions, OpenSession(frame, conn, authenticated=False, admin=admin))
                    return None
                address = _peer_address(conn.peer)
                known = self._known.known(address, frame.username, self._clock())
                refused = self._queue.push(message, address=address, priority=known)
                if refused is not None:
                    self._queue_full(refused)
                self._dispatch()
            case RegisterAbandoned(conn_id=conn_id, peer=peer):
                dropped = self._queue.remove(
                    _peer_address(peer), lambda request: request.conn.conn_id == conn_id
                )
                if dropped is not None:
                    # Its Listener waits for an outcome before it finishes; nobody reads it.
                    tell(
                        dropped.conn.ref,
                        RegisterRejected(
                            dropped.frame.req, ErrorCode.RATE_LIMITED, "connection closed"
                        ),
                    )
            case _AuthDone():
                self._busy -= 1
                self._checked(message)
                self._dispatch()
            case UsersReloaded(users=users):
                self._reloaded(users)
            case GetStats():
                # `bcrypt_hashes` is the SubscriberManager's to report, with the stats frame.
                return {
                    "auth_ok": self.auth_ok,
                    "auth_failed": self.auth_failed,
                    "rate_limited": self.rate_limited,
                }
            case GetMetrics():
                return {
                    "registrations_auth_failed": self.refused_auth_failed,
                    "registrations_rate_limited": self.rate_limited,
                    "password_checks": self.password_checks,
                    "auth_queue_length": len(self._queue),
                    "auth_queue_refused": self.queue_refused,
                    "client_id_refused": self.client_id_refused,
                    "certificate_logins": self.certificate_logins,
                }
            case _:
                return super().on_receive(message)
        return None

    def _client_id_refused(self, frame: Register, conn: ConnHandle) -> bool:
        """Answer `not_authorized` (before any check) to a register, fresh or resume, whose
        client id is outside its user's allowed prefixes. An unknown user is never refused
        here: that would tell it apart from a known one (it gets `auth_failed` after a check
        as usual, or `unknown_session` for a resume)."""
        if frame.username not in self._users or self._users.client_id_allowed(
            frame.username, frame.client_id
        ):
            return False
        self.client_id_refused += 1
        self._quiet.hit(
            "client_id_refused",
            peer=conn.peer,
            client_id=frame.client_id,
            username=frame.username,
            resume=frame.session_id is not None,
        )
        tell(
            conn.ref,
            RegisterRejected(
                frame.req,
                ErrorCode.NOT_AUTHORIZED,
                f"client_id {frame.client_id!r} is not one this user may use "
                "(see its client-id prefixes in the broker's users file)",
            ),
        )
        return True

    def _certificate_refused(
        self, frame: Register, conn: ConnHandle, certificate: PeerCertificate, mode: str
    ) -> bool:
        """Refuse (`auth_failed`, as any refusal without a check) a register whose username is
        not the user the certificate names."""
        name = certificate.username(mode)
        if name is None:
            reason = "certificate_without_name"
        elif name != frame.username:
            reason = "certificate_name_mismatch"
        elif name not in self._users:
            reason = "certificate_unknown_user"
        else:
            return False
        self._refuse_auth(
            frame,
            conn,
            reason,
            "the username is not the client certificate's, or not a user",
            certificate_name=name,
        )
        return True

    def _certificate_login(self, frame: Register, conn: ConnHandle) -> None:
        """Log in as the user the certificate names (checked): no password check (a password,
        if sent, is ignored); the client id prefixes and the admin mark apply as for any
        login."""
        if self._client_id_refused(frame, conn):
            return
        self.auth_ok += 1
        self.certificate_logins += 1
        admin = self._users.is_admin(frame.username)
        tell(self._sessions, OpenSession(frame, conn, authenticated=True, admin=admin))

    def _refuse_auth(
        self, frame: Register, conn: ConnHandle, reason: str, message: str, **fields: Any
    ) -> None:
        """`auth_failed` without a check (a peer may repeat it at will: logged quietly)."""
        self.auth_failed += 1
        self.refused_auth_failed += 1
        self._quiet.hit(
            "auth_failed",
            peer=conn.peer,
            client_id=frame.client_id,
            username=frame.username,
            reason=reason,
            **fields,
        )
        tell(conn.ref, RegisterRejected(frame.req, ErrorCode.AUTH_FAILED, message))

    def _dispatch(self) -> None:
        """Hand the queue's next checks to the pool while a worker is free."""
        while self._busy < self._workers:
            request = self._queue.pop()
            if request is None:
                return
            self._busy += 1
            self._verify(request)

    def _queue_full(self, request: RegisterRequest) -> None:
        self.queue_refused += 1
        self.rate_limited += 1
        self._quiet.hit(
            "auth_queue_full",
            peer=request.conn.peer,
            client_id=request.frame.client_id,
            username=request.frame.username,
            queued=len(self._queue),
        )
        tell(
            request.conn.ref,
            RegisterRejected(
                request.frame.req,
                ErrorCode.RATE_LIMITED,
                "the broker has too many logins waiting for a password check: try again shortly",
                retry_after=QUEUE_FULL_RETRY_AFTER,
            ),
        )

    def _checked(self, done: _AuthDone) -> None:
        frame, conn = done.request.frame, done.request.conn
        ok, reason = done.ok, done.reason
        self.password_checks += 1
        if ok and self._users.lookup(frame.username) != done.checked:
            # The users file was reloaded during the check: the user is gone, or the
            # password it matched is no longer theirs.
            ok, reason = False, "users_file_changed"
        address = _peer_address(conn.peer)
        if ok:
            # Never throttled: a fleet behind one NAT address keeps logging in while
            # one of its devices has a wrong password.
            self.auth_ok += 1
            self._known.remember(address, frame.username, self._clock())
            admin = self._users.is_admin(frame.username)
            tell(self._sessions, OpenSession(frame, conn, authenticated=True, admin=admin))
            return
        # A guesser behind a known device's address gets no priority from it.
        self._known.forget(address, frame.username)
        self.auth_failed += 1
        now = time.monotonic()
        blocked = self._limiter.blocked(address, now)
        self._limiter.record_failure(address, now)
        _log.info(
            "auth_failed",
            peer=conn.peer,
            client_id=frame.client_id,
            username=frame.username,
            reason=reason,
            rate_limited=blocked,
        )
        if blocked:
            # Slowed: a guesser past the limit waits for every wrong answer.
            self.loop.call_later(self._penalty, self._refuse, frame.req, conn)
        else:
            self.refused_auth_failed += 1
            tell(
                conn.ref,
                RegisterRejected(frame.req, ErrorCode.AUTH_FAILED, "wrong username or password"),
            )

    def _reloaded(self, users: UserStore) -> None:
        old = self._users
        self._users = users
        self._unknown_user_cost = _usual_cost(users)
        added = [name for name in users.names() if name not in old]
        removed = [name for name in old.names() if name not in users]
        changed = [
            name for name in users.names() if name in old and old.get(name) != users.get(name)
        ]
        _log.info(
            "users_reloaded",
            users=len(users),
            added=added or None,
            removed=removed or None,
            changed=changed or None,
        )
        valid_after = users.valid_after()
        now = time.time()
        for name in changed:
            before, after = old.get(name), users.get(name)
            if (
                after is not None
                and after.sessions_valid_after is not None
                and (before is None or before.sessions_valid_after != after.sessions_valid_after)
            ):
                # Newly revoked: every session this broker holds for the user was opened with
                # a password it knew until now (also in the second before this reload), so
                # all of them end, whatever the time written in the file.
                valid_after[name] = max(valid_after[name] or 0.0, now)
        if removed or changed:
            prefixes = {
                name: record.client_id_prefixes
                for name in changed
                if (record := users.get(name)) is not None
            }
            tell(self._sessions, UsersChanged(valid_after, prefixes))

    def _refuse(self, req: int, conn: ConnHandle) -> None:
        self.rate_limited += 1
        tell(
            conn.ref,
            RegisterRejected(
                req,
                ErrorCode.RATE_LIMITED,
                "too many failed logins from this address: wait a minute and try again",
            ),
        )

    def _verify(self, request: RegisterRequest) -> None:
        frame = request.frame
        stored = self._users.lookup(frame.username)
        password = frame.password or ""
        ref = self.actor_ref
        unknown_cost = self._unknown_user_cost
        observe = self._observe_check

        def verify() -> bool:
            if stored is None:
                # Same cost as a wrong password: an unknown name must not be told apart by time.
                return passwords.verify_unknown_user(password, cost=unknown_cost)
            return passwords.verify_password(password, stored)

        def check() -> bool:
            if observe is None:
                return verify()
            started = time.perf_counter()
            try:
                return verify()
            finally:
                observe(time.perf_counter() - started)

        def done(future: Future[bool]) -> None:
            exc = future.exception()
            if exc is not None:
                tell(ref, _AuthDone(request, False, stored, reason=f"check_failed: {exc!r}"))
            elif future.result():
                tell(ref, _AuthDone(request, True, stored))
            else:
                why = "unknown_user" if stored is None else "wrong_password"
                tell(ref, _AuthDone(request, False, stored, reason=why))

        self._pool.submit(check).add_done_callback(done)
