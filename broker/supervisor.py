"""BrokerSupervisor: authenticates registrations, off the loop.

A fresh `register` is checked against the users file by bcrypt in a small thread pool (bcrypt
releases the GIL, so hashing never stalls the loop that routes messages); the result comes back
to this actor as a message and the request goes on to the SessionManager. A resume carries a
session id and token instead: it goes straight on, with no hash at all. Repeated failures from
one address are refused with `rate_limited` before any hash is computed.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from broker import passwords
from broker.loop_actor import LoopActor, tell
from broker.messages import GetStats, OpenSession, RegisterRejected, RegisterRequest
from broker.ratelimit import FailureLimiter
from broker.users import UserStore
from protocol import ErrorCode

_log = structlog.get_logger("tether.supervisor")


@dataclass(frozen=True, slots=True)
class _AuthDone:
    request: RegisterRequest
    ok: bool
    error: str | None = None


def _peer_address(peer: str) -> str:
    # "host:port" -> "host": failures count per address, not per connection.
    return peer.rsplit(":", 1)[0]


class BrokerSupervisor(LoopActor):
    resume_after_failure = True

    def __init__(
        self,
        loop: Any,
        loop_thread: int,
        *,
        users: UserStore,
        session_manager: Any,
        auth_workers: int,
        limiter: FailureLimiter,
    ) -> None:
        super().__init__(loop, loop_thread)
        self._users = users
        # An unknown name is checked against a dummy of the cost the real users have.
        costs = [passwords.cost_of(users.lookup(name) or "") for name in users.names()]
        self._unknown_user_cost = max(set(costs), key=costs.count) if costs else 12
        self._sessions = session_manager
        self._limiter = limiter
        self._pool = ThreadPoolExecutor(max_workers=auth_workers, thread_name_prefix="tether-auth")
        self.auth_ok = 0
        self.auth_failed = 0
        self.rate_limited = 0

    def on_stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def on_receive(self, message: Any) -> Any:
        match message:
            case RegisterRequest(frame=frame, conn=conn):
                if frame.session_id is not None:
                    tell(self._sessions, OpenSession(frame, conn, authenticated=False))
                    return None
                address = _peer_address(conn.peer)
                if self._limiter.blocked(address, time.monotonic()):
                    self.rate_limited += 1
                    _log.warning("auth_rate_limited", peer=conn.peer, client_id=frame.client_id)
                    tell(
                        conn.ref,
                        RegisterRejected(
                            frame.req,
                            ErrorCode.RATE_LIMITED,
                            "too many failed logins from this address: wait and try again",
                        ),
                    )
                    return None
                self._verify(message)
            case _AuthDone(request=request, ok=ok, error=error):
                frame, conn = request.frame, request.conn
                if ok:
                    self.auth_ok += 1
                    tell(self._sessions, OpenSession(frame, conn, authenticated=True))
                else:
                    self.auth_failed += 1
                    self._limiter.record_failure(_peer_address(conn.peer), time.monotonic())
                    _log.info(
                        "auth_failed",
                        peer=conn.peer,
                        client_id=frame.client_id,
                        username=frame.username,
                        error=error,
                    )
                    tell(
                        conn.ref,
                        RegisterRejected(
                            frame.req, ErrorCode.AUTH_FAILED, "wrong username or password"
                        ),
                    )
            case GetStats():
                return {
                    "auth_ok": self.auth_ok,
                    "auth_failed": self.auth_failed,
                    "rate_limited": self.rate_limited,
                    "bcrypt_hashes": passwords.hash_count(),
                }
            case _:
                return super().on_receive(message)
        return None

    def _verify(self, request: RegisterRequest) -> None:
        frame = request.frame
        stored = self._users.lookup(frame.username)
        password = frame.password or ""
        ref = self.actor_ref
        unknown_cost = self._unknown_user_cost

        def check() -> bool:
            if stored is None:
                # Same cost as a wrong password: an unknown name must not be told apart by time.
                return passwords.verify_unknown_user(password, cost=unknown_cost)
            return passwords.verify_password(password, stored)

        def done(future: Future[bool]) -> None:
            exc = future.exception()
            if exc is not None:
                tell(ref, _AuthDone(request, ok=False, error=repr(exc)))
            else:
                tell(ref, _AuthDone(request, ok=future.result()))

        self._pool.submit(check).add_done_callback(done)
