"""Assembles and runs a broker: one event loop thread, the actors on it, and the auth pool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import os
import signal
import ssl
import threading
import time
from typing import Any, cast

import pykka.debug
import structlog
from pykka import ActorRef

from tether.broker.config import BrokerConfig
from tether.broker.fleet import BrokerFleet
from tether.broker.http_server import HttpServer
from tether.broker.listener_manager import (
    Drain,
    ListenerManager,
    SetTlsContext,
    StartListening,
    StopListening,
)
from tether.broker.loop_actor import tell
from tether.broker.messages import GetStats, UsersChanged, UsersReloaded
from tether.broker.metrics import BrokerMetrics, LoopLagProbe
from tether.broker.ratelimit import FailureLimiter
from tether.broker.sessions import SessionManager
from tether.broker.startup import StartupError, bind_error, listen_error, recover
from tether.broker.store import Snapshot, Store, StoreError
from tether.broker.store_sqlite import SqliteStore
from tether.broker.subscribers import SubscriberManager
from tether.broker.supervisor import BrokerSupervisor
from tether.broker.tls import (
    TlsFileError,
    broker_context,
    certificate_summary,
    http_context,
    limit_ssl_read_buffers,
)
from tether.broker.users import UserStore
from tether.broker.userwatch import UserWatcher
from tether.cli_common import PROG

__all__ = ["Broker", "StartupError", "serve"]

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
        # The `port` listener's address (TLS or plaintext), and the TLS listener's (the same
        # when `port` serves TLS; None without TLS).
        self.address: tuple[str, int] | None = None
        self.tls_address: tuple[str, int] | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._http_tls: ssl.SSLContext | None = None
        # What the store held when the broker stopped: (sessions, queued messages).
        self.saved: tuple[int, int] | None = None
        # Set when a stop begins. /health answers 503 while it is set, so a load balancer
        # stops sending clients here during the drain.
        self.draining = threading.Event()
        # Set once the broker listens: until then /health says "starting".
        self.accepting = False
        # The HTTP endpoint (config.http), its address, and the metrics it serves.
        self.metrics: BrokerMetrics | None = None
        self.http_address: tuple[str, int] | None = None
        self._http: HttpServer | None = None
        self._lag_probe: LoopLagProbe | None = None
        # Connections open when the drain began, and those still open when it ended.
        self.drain_result: tuple[int, int] | None = None

    def actor(self, name: str) -> ActorRef[Any] | None:
        """The running actor `name` ("listeners", "supervisor", "sessions", "subscribers"),
        None before the start or after the stop (the HTTP endpoint's facade asks them)."""
        return self._refs.get(name)

    @property
    def store(self) -> Store | None:
        return self._store

    def start(self) -> tuple[str, int]:
        """Start and listen. Raises StartupError for an unusable HTTP address or TLS file,
        OSError for the TCP listener's, a StoreError for the store's."""
        if self.config.tls:
            self._load_tls()
        if self.config.http is not None:
            # First, so /health answers "starting" while the store loads.
            self._start_http(self.config.http)
        try:
            return self._start()
        except BaseException:
            # The caller may not call stop() after a failed start: leave no thread behind.
            self._stop_http()
            raise

    def _load_tls(self) -> None:
        config = self.config
        limit_ssl_read_buffers()
        try:
            self._tls_context = broker_context(config)
            if config.http is not None:
                self._http_tls = http_context(config)
        except TlsFileError as exc:
            raise StartupError(str(exc)) from None
        assert config.tls_cert is not None
        _log.info(
            "tls_certificate",
            cert=str(config.tls_cert),
            client_ca=None if config.tls_client_ca is None else str(config.tls_client_ca),
            cert_username=config.tls_cert_username,
            **certificate_summary(config.tls_cert),
        )

    @property
    def http_scheme(self) -> str:
        """The HTTP endpoint's scheme: https when the broker has a certificate."""
        return "https" if self._http_tls is not None else "http"

    def reload_tls(self) -> bool:
        """Read the certificate and key again (SIGHUP): checked in a fresh context first;
        if they are good the new handshakes use them (open connections keep theirs), else
        the old ones stay in use. Logs `tls_reloaded` or `tls_reload_failed`; False if it
        failed or there is no TLS."""
        config = self.config
        if config.tls_cert is None or config.tls_key is None:
            return False
        try:
            fresh = broker_context(config)
            if self._http is not None and self._http.tls:
                http_context(config)  # what the HTTP endpoint loads below, checked the same
                self._http.reload_tls(config.tls_cert, config.tls_key)
        except (TlsFileError, OSError, ValueError, concurrent.futures.TimeoutError) as exc:
            _log.warning(
                "tls_reload_failed",
                cert=str(config.tls_cert),
                reason=str(exc),
                kept="the certificate in use",
            )
            return False
        self._tls_context = fresh
        listeners = self._refs.get("listeners")
        if listeners is not None:
            tell(listeners, SetTlsContext(fresh))
        _log.info("tls_reloaded", cert=str(config.tls_cert), **certificate_summary(config.tls_cert))
        return True

    def _start_http(self, where: tuple[str, int]) -> None:
        config = self.config
        durable = self._given_store is not None or config.data_dir is not None
        fleet = BrokerFleet(self)
        self.metrics = BrokerMetrics(fleet.read_metrics, durable=durable)
        server = HttpServer(
            fleet,
            host=where[0],
            port=where[1],
            token_file=config.admin_token_file,
            limiter=FailureLimiter(limit=config.auth_fail_limit, window=config.auth_fail_window),
            penalty=config.auth_fail_penalty,
            ssl_context=self._http_tls,
        )
        try:
            self.http_address = server.start()
        except OSError as exc:
            raise bind_error("serve HTTP on", where, "--http", exc) from None
        self._http = server
        _log.info(
            "http_listening",
            host=self.http_address[0],
            port=self.http_address[1],
            tls=self._http_tls is not None,
        )
        if self._http_tls is None:
            _warn_if_exposed(where[0], "the HTTP endpoint", "admin tokens and session details")
        if config.admin_token_file is None:
            _log.warning(
                "admin_api_disabled",
                reason="no --admin-token-file: /api/* answers 401",
                hint=f"make a token with: {PROG} token new --file admin-tokens, then serve "
                "with --admin-token-file admin-tokens",
            )

    def _stop_http(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None

    def _start(self) -> tuple[str, int]:
        config = self.config
        # Every connection is a descriptor: as many as the hard limit allows (one log line).
        from tether.broker.openfiles import raise_open_file_limit

        raise_open_file_limit()
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
        commit_histogram = None if self.metrics is None else self.metrics.store_commit
        if isinstance(store, SqliteStore) and commit_histogram is not None:
            store.on_commit = commit_histogram.observe
        if store is not None:
            self._store = store
            try:
                snapshot = recover(store, time.time())
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
        if self.metrics is not None:
            self._lag_probe = LoopLagProbe(loop, self.metrics.observe_lag)
            self._lag_probe.start()
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
            max_subscriptions=config.max_subscriptions,
            session_queue_bytes=config.session_queue_bytes,
            memory_budget=config.memory_budget,
            store_budget=config.store_budget,
            users=users,
            default_deny=config.default_deny,
        )
        sessions = SessionManager.start(
            *on_loop,
            subscriber_manager=subscribers,
            session_expiry=config.session_expiry,
            store=self._store,
            restored=snapshot.sessions,
            max_sessions_per_user=config.max_sessions_per_user,
        )
        supervisor = BrokerSupervisor.start(
            *on_loop,
            users=users,
            session_manager=sessions,
            auth_workers=config.auth_workers,
            limiter=FailureLimiter(limit=config.auth_fail_limit, window=config.auth_fail_window),
            failure_penalty=config.auth_fail_penalty,
            observe_check=None if self.metrics is None else self.metrics.password_check.observe,
            auth_queue=config.auth_queue,
            cert_username=config.tls_cert_username,
        )
        listeners = ListenerManager.start(
            *on_loop,
            supervisor=supervisor,
            session_manager=sessions,
            subscriber_manager=subscribers,
            max_frame=config.max_frame,
            register_timeout=config.register_timeout,
            high_water=config.outbound_high_water,
            max_register_bytes=config.max_register_bytes,
            max_pending_connections=config.max_pending_connections,
            max_pending_per_address=config.max_pending_per_address,
            max_metadata=config.max_metadata,
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
        # `port` serves TLS unless a `tls_port` serves it beside (docs/operations.md, "TLS").
        on_port = self._tls_context if config.tls_port is None else None
        self.address = self._listen(listeners, config.port, on_port)
        if on_port is not None:
            self.tls_address = self.address
        else:
            _warn_if_exposed(
                config.host, "the plaintext listener", "passwords, tokens and payloads"
            )
        if config.tls_port is not None:
            self.tls_address = self._listen(listeners, config.tls_port, self._tls_context)
        self.accepting = True
        return self.address

    def _listen(
        self, listeners: ActorRef[Any], port: int, tls: ssl.SSLContext | None
    ) -> tuple[str, int]:
        future = cast(
            "concurrent.futures.Future[tuple[str, int]]",
            listeners.ask(StartListening(self.config.host, port, tls)),
        )
        return future.result(timeout=10)

    def _users_loaded(self, users: UserStore) -> None:
        # On the watcher's thread: hand the new users to the supervisor, on the loop. The
        # SubscriberManager (topic permissions) first: it never knows fewer users than the
        # supervisor that lets sessions in.
        subscribers = self._refs.get("subscribers")
        if subscribers is not None:
            tell(subscribers, UsersReloaded(users))
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
            self._stop_http()
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
        if self._lag_probe is not None:
            self._lag_probe.stop()
            self._lag_probe = None
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        if not loop.is_running():
            loop.close()
        self._loop = None
        self._refs = {}
        # Last: /health answered 503 "shutting_down" through the whole drain.
        self._stop_http()

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

    def reload(_signum: int, _frame: object) -> None:
        _log.info("reloading_users", signal="SIGHUP")
        broker.reload_users()
        if config.tls:
            broker.reload_tls()

    signal.signal(signal.SIGHUP, reload)
    try:
        host, port = broker.start()
    except StartupError:
        broker.stop()
        raise
    except StoreError as exc:
        broker.stop()
        raise StartupError(str(exc)) from None
    except OSError as exc:
        broker.stop()
        raise listen_error(config, exc) from None
    _log.info(
        "broker_started",
        host=host,
        port=port,
        tls_port=None if broker.tls_address is None else broker.tls_address[1],
        mode="in-memory" if config.data_dir is None else "durable",
        data_dir=None if config.data_dir is None else str(config.data_dir),
        sync=None if config.data_dir is None else config.sync,
        users=str(config.users_path),
        session_expiry=config.session_expiry,
        queue_limit=config.queue_limit,
        max_frame=config.max_frame,
        http=None
        if broker.http_address is None
        else "{}://{}:{}".format(broker.http_scheme, *broker.http_address),
        admin_token_file=None if config.admin_token_file is None else str(config.admin_token_file),
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


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "" (every address): it may well be reachable from outside


def _warn_if_exposed(host: str, what: str, carried: str) -> None:
    """A plaintext listener others can reach gets one warning at start, naming the risk."""
    if _loopback(host):
        return
    _log.warning(
        "plaintext_exposed",
        listener=what,
        host=host,
        risk=f"{carried} cross the network in clear: anyone on the path can read them",
        fix="serve TLS: --tls-cert PATH --tls-key PATH (and --require-tls to refuse "
        "plaintext), or listen on 127.0.0.1",
    )
