"""Assembles and runs a broker: one event loop thread, the actors on it, and the auth pool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import signal
import socket
import threading
import time
from typing import Any, cast

import pykka.debug
import structlog
from pykka import ActorRef

from tether.broker.config import BrokerConfig
from tether.broker.listener_manager import (
    Drain,
    ListenerManager,
    StartListening,
    StopListening,
)
from tether.broker.loop_actor import tell
from tether.broker.messages import GetStats, UsersChanged, UsersReloaded
from tether.broker.ratelimit import FailureLimiter
from tether.broker.sessions import SessionManager
from tether.broker.store import (
    DeleteSession,
    Snapshot,
    Store,
    StoreError,
)
from tether.broker.store_sqlite import SqliteStore
from tether.broker.subscribers import SubscriberManager
from tether.broker.supervisor import BrokerSupervisor
from tether.broker.users import UserStore
from tether.broker.userwatch import UserWatcher

_log = structlog.get_logger("tether.server")

# The actors that own counters, asked in turn by `Broker.stats()`. The SessionManager owns
# none: the SubscriberManager counts sessions and expiries from its messages.
_REPORTING = ("listeners", "supervisor", "subscribers")


class Broker:
    """A running broker. `start()` returns the address it listens on; `stop()` ends it."""

    def __init__(
        self, config: BrokerConfig, *, users: UserStore | None = None, store: Store | None = None
    ) -> None:
        """`store`: a store to use instead of the one `config.data_dir` names (tests)."""
        self.config = config
        self._users = users
        self._given_store = store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._refs: dict[str, ActorRef[Any]] = {}
        self._store: Store | None = None
        self._watcher: UserWatcher | None = None
        self.address: tuple[str, int] | None = None
        # What the store held when the broker stopped: (sessions, queued messages).
        self.saved: tuple[int, int] | None = None
        # Set when a stop begins. The /health endpoint (issue 11, not built yet) answers 503
        # while it is set, so a load balancer stops sending clients here during the drain.
        self.draining = threading.Event()
        # Connections open when the drain began, and those still open when it ended.
        self.drain_result: tuple[int, int] | None = None

    def start(self) -> tuple[str, int]:
        config = self.config
        watcher: UserWatcher | None = None
        if self._users is not None:
            users = self._users  # given (tests): nothing to watch
        else:
            # The watcher takes the file's identity before the load, so no change is missed.
            watcher = UserWatcher(config.users_path, self._users_loaded)
            users = UserStore.load(config.users_path)
        snapshot: Snapshot = Snapshot((), ())
        store: Store | None = self._given_store
        if store is None and config.data_dir is not None:
            # Raises StoreLocked, StoreCorrupt or StoreVersionError: nothing started yet.
            store = SqliteStore(config.data_dir, sync="full" if config.sync == "full" else "normal")
        if store is not None:
            self._store = store
            try:
                snapshot = _recover(store, time.time())
            except BaseException:
                self._store = None
                store.close()
                raise
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="tether-loop", daemon=True)
        thread.start()
        assert thread.ident is not None
        self._loop, self._thread = loop, thread
        on_loop = (loop, thread.ident)
        subscribers = SubscriberManager.start(
            *on_loop,
            queue_limit=config.queue_limit,
            queue_bytes=config.queue_bytes,
            outbound_high_water=config.outbound_high_water,
            publish_wait=config.publish_wait,
            max_frame=config.max_frame,
            store=self._store,
            restored_sessions=snapshot.sessions,
            restored_subscriptions=snapshot.subscriptions,
        )
        sessions = SessionManager.start(
            *on_loop,
            subscriber_manager=subscribers,
            session_expiry=config.session_expiry,
            store=self._store,
            restored=snapshot.sessions,
        )
        supervisor = BrokerSupervisor.start(
            *on_loop,
            users=users,
            session_manager=sessions,
            auth_workers=config.auth_workers,
            limiter=FailureLimiter(limit=config.auth_fail_limit, window=config.auth_fail_window),
            failure_penalty=config.auth_fail_penalty,
        )
        listeners = ListenerManager.start(
            *on_loop,
            supervisor=supervisor,
            session_manager=sessions,
            subscriber_manager=subscribers,
            max_frame=config.max_frame,
            register_timeout=config.register_timeout,
            high_water=config.outbound_high_water,
        )
        self._refs = {
            "listeners": listeners,
            "supervisor": supervisor,
            "sessions": sessions,
            "subscribers": subscribers,
        }
        if watcher is not None:
            # Sessions restored from the store of users removed or revoked while the broker
            # was down end now, before anyone can resume them.
            tell(sessions, UsersChanged(users.valid_after()))
            self._watcher = watcher
            watcher.start()
        future = cast(
            "concurrent.futures.Future[tuple[str, int]]",
            listeners.ask(StartListening(config.host, config.port)),
        )
        self.address = future.result(timeout=10)
        return self.address

    def _users_loaded(self, users: UserStore) -> None:
        # On the watcher's thread: hand the new users to the supervisor, on the loop.
        supervisor = self._refs.get("supervisor")
        if supervisor is not None:
            tell(supervisor, UsersReloaded(users))

    def reload_users(self) -> None:
        """Read the users file again now (SIGHUP); a no-op for a broker given its users."""
        if self._watcher is not None:
            self._watcher.reload()

    def stats(self) -> dict[str, int]:
        """Every actor's counters, merged. Each counter has one owner (docs/architecture.md
        section 2): a name two actors report is a bug, refused here rather than overwritten."""
        merged: dict[str, int] = {}
        owners: dict[str, str] = {}
        for name in _REPORTING:
            ref = self._refs.get(name)
            if ref is None:
                continue  # not started, or stopped
            counters = cast("dict[str, int]", ref.ask(GetStats(), timeout=10))
            for key, value in counters.items():
                if key in owners:
                    raise RuntimeError(f"counter {key!r} reported by both {owners[key]} and {name}")
                owners[key] = name
                merged[key] = value
        return merged

    def stop(self, *, drain: float | None = None) -> None:
        """Stop gracefully, within about `config.shutdown_grace` seconds: stop accepting and
        close every connection (each session goes away as after any disconnect, so a client
        resumes on the next broker), waiting for the closes up to `drain` seconds (default:
        most of the grace; 0: do not wait); then stop the actors and commit and close the
        store (docs/operations.md, "Shutdown and deploys")."""
        self.draining.set()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._loop is None:
            return
        listeners = self._refs.get("listeners")
        if listeners is not None:
            if drain is None:
                # What is left of the grace goes to stopping the actors and the store.
                drain = self.config.shutdown_grace * 0.8
            self._drain(listeners, drain)
            listeners.ask(StopListening(), timeout=10)
        subscribers = self._refs.get("subscribers")
        if subscribers is not None and self._store is not None:
            counters = cast("dict[str, int]", subscribers.ask(GetStats(), timeout=10))
            self.saved = (counters["sessions"], counters["queued"])
        for ref in self._refs.values():
            ref.stop(timeout=10)
        if self._store is not None:
            # After the managers' last submits (a SubscriberManager's on_stop writes its
            # sent marks); their callbacks' tells to stopped actors are dropped.
            self._store.close()
            self._store = None
        loop, thread = self._loop, self._thread
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        if not loop.is_running():
            loop.close()
        self._loop = None
        self._refs = {}

    def _drain(self, listeners: ActorRef[Any], seconds: float) -> None:
        drained = threading.Event()
        opened = cast("int", listeners.ask(Drain(drained), timeout=10))
        if opened:
            _log.info("draining", connections=opened, wait_seconds=seconds)
        drained.wait(seconds)
        still = 0
        if not drained.is_set():
            counters = cast("dict[str, int]", listeners.ask(GetStats(), timeout=10))
            still = counters["connections"]
        self.drain_result = (opened, still)

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _recover(store: Store, now: float) -> Snapshot:
    """Load the store: sessions whose expiry deadline passed while the broker was down are
    deleted (logged with what they held); the rest come back, their queued messages left in
    the store to be read back a page at a time when their sessions resume."""
    snapshot = store.load()
    _log.info(
        "store_loaded",
        sessions=len(snapshot.sessions),
        subscriptions=sum(1 for sub in snapshot.subscriptions if sub.active),
        queued=sum(sub.queued for sub in snapshot.subscriptions),
    )
    expired = {
        s.session_id for s in snapshot.sessions if s.expires_at is not None and s.expires_at <= now
    }
    if expired:
        lost = sum(sub.queued for sub in snapshot.subscriptions if sub.session_id in expired)
        done = threading.Event()
        errors: list[StoreError] = []

        def deleted(error: StoreError | None) -> None:
            if error is not None:
                errors.append(error)
            done.set()

        store.submit(tuple(DeleteSession(sid) for sid in sorted(expired)), deleted)
        done.wait()
        if errors:
            raise errors[0]
        _log.info("sessions_expired_while_down", sessions=len(expired), discarded=lost)
        snapshot = Snapshot(
            tuple(s for s in snapshot.sessions if s.session_id not in expired),
            tuple(sub for sub in snapshot.subscriptions if sub.session_id not in expired),
        )
    return snapshot


class StartupError(Exception):
    """The broker cannot start: the message is one line saying what and what to do."""


# errno -> what to do about it, for the errors binding a listening socket gives.
_LISTEN_HINTS = {
    errno.EADDRINUSE: "another process listens there (another broker?): stop it or pick --port",
    errno.EADDRNOTAVAIL: "this machine has no such address: pick --host from its addresses",
    errno.EACCES: "not allowed (ports below 1024 need privileges): pick another --port",
}


def _listen_error(config: BrokerConfig, exc: OSError) -> StartupError:
    where = f"{config.host}:{config.port}"
    if isinstance(exc, socket.gaierror):
        return StartupError(
            f"cannot listen on {where}: unknown host {config.host!r} ({exc.strerror}): "
            "--host takes an address or a name this machine resolves"
        )
    # asyncio's own message repeats the address; the errno's text says it plainly.
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = _LISTEN_HINTS.get(exc.errno or 0, "check --host and --port")
    return StartupError(f"cannot listen on {where}: {reason}: {hint}")


def serve(config: BrokerConfig) -> int:
    """Run a broker until SIGINT or SIGTERM. The command line's `tether serve`."""
    signal.signal(signal.SIGUSR1, pykka.debug.log_thread_tracebacks)
    stopping = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            # A second signal during the drain: out now. What was committed stays committed
            # (SQLite); nothing uncommitted was promised to anyone.
            _log.warning("stopping_now", signal=name)
            os._exit(128 + signum)
        _log.info("stopping", signal=name, grace=config.shutdown_grace)
        stopping.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    broker = Broker(config)

    def reload_users(_signum: int, _frame: object) -> None:
        _log.info("reloading_users", signal="SIGHUP")
        broker.reload_users()

    signal.signal(signal.SIGHUP, reload_users)
    try:
        host, port = broker.start()
    except StoreError as exc:
        broker.stop()
        raise StartupError(str(exc)) from None
    except OSError as exc:
        broker.stop()
        raise _listen_error(config, exc) from None
    _log.info(
        "broker_started",
        host=host,
        port=port,
        mode="in-memory" if config.data_dir is None else "durable",
        data_dir=None if config.data_dir is None else str(config.data_dir),
        sync=None if config.data_dir is None else config.sync,
        users=str(config.users_path),
        session_expiry=config.session_expiry,
        queue_limit=config.queue_limit,
        max_frame=config.max_frame,
    )
    while not stopping.wait(1.0):
        pass
    broker.stop()
    closed: dict[str, int] = {}
    if broker.drain_result is not None:
        opened, still = broker.drain_result
        closed = {"connections_closed": opened - still, "connections_left_open": still}
    if broker.saved is not None:
        _log.info(
            "broker_stopped",
            **closed,
            sessions_saved=broker.saved[0],
            messages_saved=broker.saved[1],
        )
    else:
        _log.info("broker_stopped", **closed)
    return 0
