"""ListenerManager: owns the listening sockets and spawns one Listener per connection.

See docs/architecture.md sections 2 and 4. Against hostile clients (issue 12) the accept path
is where connections are cheapest to refuse, so the bounds live here:

- **Pending connections** (accepted, not yet registered) are bounded per source address and in
  all (`pending.py`). Over a bound, the socket is closed at accept, before any transport or
  Listener exists; the refusals are counted and logged at most once per interval.
- **Before registration** a connection reads at most `max_register_bytes` in all (its
  `Connection`'s read limit, lifted here when its Listener reports `ListenerRegistered`).
- **Open files**: accepting pauses while the open connections are within `FD_MARGIN` of the
  soft open-file limit and resumes as they close; `accept()` failing for lack of descriptors
  backs off (`acceptor.py`). The backlog is 512, not 4,096: a queue the broker cannot serve
  soon only makes clients wait longer before they learn.
- **Loop errors** are logged by a rate-limited exception handler (`logthrottle.py`).

TLS (issue 13): a listener made with a context serves TLS. Its connections shake hands before
any Listener exists, within the registration timeout, while counted as pending like any other;
a failed handshake (a plaintext client, a wrong or expired certificate, none where one is
required, a timeout) closes that connection only, is counted (`tls_handshake_failures`) and
summed up in the log once per interval. `SetTlsContext` swaps the context for the handshakes
that follow (a reload on SIGHUP); connections already open keep theirs.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pykka import ActorRef

from tether.broker.acceptor import Acceptor, bind
from tether.broker.listener import CloseConnection, Listener, ListenerRegistered
from tether.broker.logthrottle import LogThrottle, LoopErrors
from tether.broker.loop_actor import LoopActor, tell
from tether.broker.messages import GetMetrics, GetStats, ListenerClosed
from tether.broker.netedge import Connection, ConnectionHandler
from tether.broker.openfiles import connection_capacity
from tether.broker.pending import PendingConnections
from tether.broker.sessions import BrokerDraining

if TYPE_CHECKING:
    from tether.broker.sessions import SessionManager
    from tether.broker.subscribers import SubscriberManager
    from tether.broker.supervisor import BrokerSupervisor

_log = structlog.get_logger("tether.listeners")

# Connections the kernel completes before we accept them. A reconnect storm (1,000 devices
# behind one NAT address, or a flood) must fit: past it the kernel drops SYNs and every
# client, good ones included, waits out a 1 s retransmit. Capped by net.core.somaxconn.
LISTEN_BACKLOG = 2048


@dataclass(frozen=True, slots=True)
class StartListening:
    """Listen on (host, port), TLS with `tls`; answered with a future of the bound address."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None


@dataclass(frozen=True, slots=True)
class SetTlsContext:
    """The context the TLS listener's next handshakes use (a reloaded certificate)."""

    context: ssl.SSLContext


@dataclass(frozen=True, slots=True)
class StopListening:
    pass


@dataclass(frozen=True, slots=True)
class Drain:
    """Shutdown, first step: stop accepting and close every connection cleanly (each Listener
    closes its link; its session goes away as after any disconnect). `drained` is set once the
    last Listener has reported `ListenerClosed`. Answered with the number of connections open."""

    drained: threading.Event


class ListenerManager(LoopActor):
    resume_after_failure = True

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        loop_thread: int,
        *,
        supervisor: ActorRef[BrokerSupervisor],
        session_manager: ActorRef[SessionManager],
        subscriber_manager: ActorRef[SubscriberManager],
        max_frame: int,
        register_timeout: float,
        high_water: int,
        max_register_bytes: int | None = None,
        max_pending_connections: int = 10_000,
        max_pending_per_address: int = 2_000,
        max_metadata: int | None = None,
    ) -> None:
        super().__init__(loop, loop_thread)
        self._supervisor = supervisor
        self._session_manager = session_manager
        self._subscribers = subscriber_manager
        self._max_frame = max_frame
        self._register_timeout = register_timeout
        self._high_water = high_water
        self._max_register_bytes = max_register_bytes
        self._max_metadata = max_metadata
        self._conn_ids = itertools.count(1)
        self._listeners: dict[int, ActorRef[Listener]] = {}
        # Connections accepted and not yet closed, Listener or not yet (the open-file bound).
        self._open: set[int] = set()
        self._links: dict[int, Connection] = {}  # pending ones: their read limit to lift
        self._pending = PendingConnections(
            max_total=max_pending_connections, max_per_address=max_pending_per_address
        )
        self._capacity: int | None = None  # connections that fit under the open-file limit
        self._acceptors: list[Acceptor] = []
        self._tls: ssl.SSLContext | None = None  # the TLS listeners' context (swapped on reload)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._quiet = LogThrottle(loop, self._log_summary)
        self._loop_errors: LoopErrors | None = None
        self._drained: threading.Event | None = None  # set by Drain: shutting down
        self.accepted = 0
        self.accept_pauses = 0
        self.closed_unregistered = 0
        self.tls_handshake_failures = 0

    def on_receive(self, message: Any) -> Any:
        match message:
            case StartListening(host, port, tls):
                # Answered with a future the caller (outside the loop) waits on.
                return asyncio.run_coroutine_threadsafe(self._listen(host, port, tls), self.loop)
            case SetTlsContext(context):
                self._tls = context
            case StopListening():
                self._stop_accepting()
                for task in list(self._tasks):
                    task.cancel()  # handshakes under way
                for ref in list(self._listeners.values()):
                    ref.stop(block=False)
                self._listeners.clear()
                self._open.clear()
                self._links.clear()
                self._pending.clear()
            case Drain(drained):
                self._stop_accepting()
                self._drained = drained
                # First, so that the disconnects that follow are told apart as the shutdown's.
                tell(self._session_manager, BrokerDraining())
                for ref in self._listeners.values():
                    tell(ref, CloseConnection())
                if not self._listeners:
                    drained.set()
                return len(self._listeners)
            case ListenerRegistered(conn_id):
                self._pending.release(conn_id)
                link = self._links.pop(conn_id, None)
                if link is not None:
                    link.lift_read_limit()
            case ListenerClosed(conn_id):
                self._listeners.pop(conn_id, None)
                if self._links.pop(conn_id, None) is not None:
                    # Closed before it registered: counted, and summed up in the log.
                    self.closed_unregistered += 1
                    self._quiet.hit("closed_unregistered")
                self._gone(conn_id)
                if self._drained is not None and not self._listeners:
                    self._drained.set()
            case GetStats():
                return {"connections": len(self._listeners), "accepted": self.accepted}
            case GetMetrics():
                return {
                    "connections_open": len(self._listeners),
                    "connections_accepted": self.accepted,
                    "connections_pending": len(self._pending),
                    "connections_pending_bytes": self._pending_bytes(),
                    "connections_refused_pending": self._pending.refused,
                    "connections_closed_unregistered": self.closed_unregistered,
                    "accept_pauses": self.accept_pauses,
                    "tls_handshake_failures": self.tls_handshake_failures,
                }
            case _:
                return super().on_receive(message)
        return None

    async def _listen(self, host: str, port: int, tls: ssl.SSLContext | None) -> tuple[str, int]:
        if self._loop_errors is None:
            # Errors the loop cannot pin on anyone (EMFILE in a transport, a callback that
            # raised): one line per kind and interval, not one traceback each.
            self._loop_errors = LoopErrors(self.loop)
            self.loop.set_exception_handler(self._loop_errors)
        sockets = await bind(self.loop, host, port, LISTEN_BACKLOG)
        self._capacity = connection_capacity()
        if tls is not None:
            self._tls = tls
        acceptor = Acceptor(
            self.loop, sockets, functools.partial(self._accept, tls is not None), self._quiet
        )
        if any(other.paused for other in self._acceptors):
            acceptor.pause()  # near the open-file limit already: all pause together
        self._acceptors.append(acceptor)
        acceptor.start()
        sockname = sockets[0].getsockname()
        _log.info(
            "listening",
            host=sockname[0],
            port=sockname[1],
            tls=tls is not None,
            mutual_tls=tls is not None and tls.verify_mode == ssl.CERT_REQUIRED,
            backlog=LISTEN_BACKLOG,
            connection_capacity=self._capacity,
        )
        return sockname[0], sockname[1]

    def _stop_accepting(self) -> None:
        acceptors, self._acceptors = self._acceptors, []
        for acceptor in acceptors:
            acceptor.close()

    def _paused(self) -> bool:
        return bool(self._acceptors) and self._acceptors[0].paused

    # --- the accept path (on the loop thread, outside message handling, like the edge) -----

    def _accept(self, tls: bool, sock: socket.socket, address: Any) -> None:
        host = str(address[0]) if isinstance(address, tuple) else str(address)
        conn_id = next(self._conn_ids)
        if not self._pending.admit(conn_id, host):
            sock.close()  # before a transport or a Listener costs anything
            self._quiet.hit("refused_pending", address=host)
            return
        self._open.add(conn_id)
        if (
            self._acceptors
            and self._capacity is not None
            and len(self._open) >= self._capacity
            and not self._paused()
        ):
            # Near the open-file limit: the next connections wait in the backlog until some
            # close, rather than failing accept() (EMFILE) over and over.
            for acceptor in self._acceptors:
                acceptor.pause()
            self.accept_pauses += 1
            self._quiet.hit("accept_paused", open=len(self._open), capacity=self._capacity)
        context = self._tls if tls else None
        task = self.loop.create_task(self._serve(conn_id, sock, host, context))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, conn_id: int, sock: socket.socket, host: str, tls: ssl.SSLContext | None
    ) -> None:
        make = functools.partial(self._new_connection, conn_id)
        try:
            if tls is None:
                await self.loop.connect_accepted_socket(make, sock)
            else:
                # The handshake's timeout is the registration's: it is part of registering.
                await self.loop.connect_accepted_socket(
                    make, sock, ssl=tls, ssl_handshake_timeout=self._register_timeout
                )
        except OSError as e:  # ssl.SSLError included
            sock.close()
            if tls is None:
                # The peer is gone already, or no descriptor for the transport.
                self._quiet.hit("serve_failed", error=str(e))
            else:
                self.tls_handshake_failures += 1
                self._quiet.hit("tls_handshake_failed", address=host, reason=_handshake_reason(e))
            self._gone(conn_id)

    def _gone(self, conn_id: int) -> None:
        self._open.discard(conn_id)
        self._pending.release(conn_id)
        if self._paused() and (self._capacity is None or len(self._open) < self._capacity):
            for acceptor in self._acceptors:
                acceptor.resume()

    def _new_connection(self, conn_id: int) -> Connection:
        return Connection(
            self.loop,
            make_handler=functools.partial(self._spawn, conn_id),
            high_water=self._high_water,
            read_limit=self._max_register_bytes,
        )

    def _spawn(self, conn_id: int, link: Connection) -> ConnectionHandler:
        self.accepted += 1
        listener = Listener(
            self.loop,
            self._loop_thread,
            link=link,
            conn_id=conn_id,
            supervisor=self._supervisor,
            session_manager=self._session_manager,
            subscriber_manager=self._subscribers,
            listener_manager=self.actor_ref,
            max_frame=self._max_frame,
            register_timeout=self._register_timeout,
            max_register_bytes=self._max_register_bytes,
            max_metadata=self._max_metadata,
            certificate=link.certificate,
        )
        # Not `Listener.start()`: the connection needs the object itself as its handler (both
        # run on this loop thread), and this manager, not pykka's registry (whose removal is a
        # list scan), keeps the listeners for shutdown.
        ref = listener.start_unregistered()
        self._listeners[conn_id] = ref
        self._links[conn_id] = link
        if self._drained is not None:
            tell(ref, CloseConnection())  # accepted just before the drain stopped accepting
        return listener

    def _pending_bytes(self) -> int:
        """Bytes read from the connections not registered yet: what they can hold at most."""
        limit = self._max_register_bytes
        if limit is None:
            return 0
        return sum(limit - (link.read_left or 0) for link in self._links.values())

    def _log_summary(self, kind: str, count: int, fields: dict[str, Any]) -> None:
        """One line per kind and interval for what hostile clients can repeat at will."""
        if kind == "refused_pending":
            _log.warning(
                "connections_refused",
                reason="too many pending connections",
                count=count,
                pending=len(self._pending),
                from_address=self._pending.from_address(str(fields.get("address"))),
                **fields,
            )
        elif kind == "closed_unregistered":
            _log.info("connections_closed_unregistered", count=count)
        elif kind == "accept_paused":
            _log.warning(
                "accepting_paused", reason="near the open-file limit", count=count, **fields
            )
        else:
            _log.warning(kind, count=count, **fields)

    def on_stop(self) -> None:
        self._stop_accepting()
        self._quiet.close()
        if self._loop_errors is not None:
            self._loop_errors.close()


def _handshake_reason(exc: OSError) -> str:
    """What went wrong, in a few words (OpenSSL's reason code, or the verify result)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return exc.strerror or str(exc) or type(exc).__name__
