"""Listener: the actor of one client connection, which decodes what it reads and keeps its
frames in order, driven by a table of states. See docs/architecture.md section 5.

Against hostile clients (issue 12):

- Until `registered`, the decoder's limit is `max_register_bytes` (a larger frame is
  `frame_too_large`), and frames are decoded only up to the first `register`: what the client
  pipelined behind it stays undecoded in the decoder until the outcome, then is decoded under
  the limit that outcome brings (`max_frame` once registered), so a big publish pipelined
  behind `register` is not refused as too large. (The connection's read limit, which bounds
  the bytes held meanwhile, is the edge's: `netedge.py`.)
- Once registered, one read's frames go to the SubscriberManager as `SessionOps` of at most
  `OPS_PER_BATCH` ops; the rest of the read waits (reading paused) and goes on from a
  `call_soon`, so the loop serves other connections' reads and timers in between. Order per
  connection is kept: one chunk after the other, from this one actor.
- Error replies never echo more than `ECHO_LIMIT` characters of what the client sent, and an
  unregistered connection's lines (closed, timed out, protocol error) are debug lines: the
  ListenerManager sums them up once per interval.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import structlog
from pykka import ActorRef

from tether.broker.auth_queue import RegisterAbandoned
from tether.broker.loop_actor import LoopActor, tell
from tether.broker.messages import (
    ConnectionLost,
    ConnHandle,
    Credit,
    EndSession,
    Heartbeat,
    ListenerClosed,
    Outbound,
    RegisterRejected,
    RegisterRequest,
    Seen,
    SessionAttached,
    SessionOps,
    TakenOver,
    Throttle,
)
from tether.broker.netedge import Link
from tether.broker.tls import PeerCertificate
from tether.protocol import (
    CLIENT_FRAME_TYPES,
    NEED_DATA,
    Ack,
    ClientFrame,
    Error,
    ErrorCode,
    FrameDecoder,
    Ping,
    Publish,
    Register,
    RemoteProtocolError,
    Unregister,
    encode,
)

if TYPE_CHECKING:
    from tether.broker.listener_manager import ListenerManager
    from tether.broker.sessions import SessionManager
    from tether.broker.subscribers import SubscriberManager
    from tether.broker.supervisor import BrokerSupervisor

_log = structlog.get_logger("tether.listener")


@dataclass(frozen=True, slots=True)
class ListenerRegistered:
    """Listener -> ListenerManager: this connection registered (it is no longer pending, and
    its read limit goes)."""

    conn_id: int


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """ListenerManager (shutdown) or SessionManager (an operator's disconnect) -> Listener:
    close the connection cleanly, without an error frame; `reason` is for the log."""

    reason: str = "shutdown"


# At most one `Seen` per connection per this many seconds (or half its keepalive, if less:
# a client that pings once a keepalive is seen at each ping): `last_seen` to about a second.
SEEN_INTERVAL = 1.0

# The most ops one `SessionOps` carries: a read of many frames is handed on in chunks of this
# many, with a loop turn between them (the module's docstring).
OPS_PER_BATCH = 256

# The most characters of an error message a reply carries: messages may quote what the
# client sent (a frame type, a field's value), which must not come back unbounded.
ECHO_LIMIT = 200


def _bounded(message: str) -> str:
    return message if len(message) <= ECHO_LIMIT else message[: ECHO_LIMIT - 3] + "..."


class State(enum.Enum):
    # Members are singletons: hash by identity, in C. (Enum's own hash is a Python call, and
    # the state is looked up once per read, on the hot path.)
    __hash__ = object.__hash__

    AWAITING_REGISTER = "awaiting_register"
    REGISTERING = "registering"
    ACTIVE = "active"
    CLOSING = "closing"


# Every legal move; anything else is a bug and raises.
_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.AWAITING_REGISTER, "register"): State.REGISTERING,
    (State.REGISTERING, "rejected"): State.AWAITING_REGISTER,
    (State.REGISTERING, "attached"): State.ACTIVE,
    (State.AWAITING_REGISTER, "close"): State.CLOSING,
    (State.REGISTERING, "close"): State.CLOSING,
    (State.ACTIVE, "close"): State.CLOSING,
    (State.CLOSING, "close"): State.CLOSING,
}


class IllegalTransition(RuntimeError):
    def __init__(self, state: State, event: str) -> None:
        super().__init__(f"event {event!r} is not legal in state {state.value}")
        self.state = state
        self.event = event


# An item read off the wire: a frame, or the error a malformed one earned.
Item = ClientFrame | RemoteProtocolError


class Listener(LoopActor):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        loop_thread: int,
        *,
        link: Link,
        conn_id: int,
        supervisor: ActorRef[BrokerSupervisor],
        session_manager: ActorRef[SessionManager],
        subscriber_manager: ActorRef[SubscriberManager],
        listener_manager: ActorRef[ListenerManager],
        max_frame: int,
        register_timeout: float,
        max_register_bytes: int | None = None,
        max_metadata: int | None = None,
        certificate: PeerCertificate | None = None,
    ) -> None:
        """`certificate`: the connection's verified client certificate (TLS), if any."""
        super().__init__(loop, loop_thread)
        self._link = link
        self._certificate = certificate
        self._conn = ConnHandle(conn_id, self.actor_ref, link.peer)
        self._supervisor = supervisor
        self._session_manager = session_manager
        self._subscribers = subscriber_manager
        self._listener_manager = listener_manager
        self._max_frame = max_frame
        before = max_frame if max_register_bytes is None else min(max_frame, max_register_bytes)
        if max_metadata is None:
            self._decoder = FrameDecoder(max_frame=before, accept=CLIENT_FRAME_TYPES)
        else:
            self._decoder = FrameDecoder(
                max_frame=before, accept=CLIENT_FRAME_TYPES, max_metadata=max_metadata
            )
        self._register_timeout = register_timeout
        self.state = State.AWAITING_REGISTER
        self._socket_closed = False
        self._held: list[Item] = []
        self._done_reading = False  # after unregister or a fatal protocol error
        self._session_id: str | None = None
        self._ended_early: TakenOver | None = None  # see `TakenOver` while registering
        self._registered = False  # it was `ACTIVE` once
        self._owed_credit = 0
        self._throttled = False  # a `Throttle(True)` holds reading paused
        # The rest of a read handed on in chunks, and where it goes on (see OPS_PER_BATCH).
        self._backlog: list[Item] | None = None
        self._backlog_at = 0
        # When a read next earns a `Seen` (monotonic): the bind itself counts as seen.
        self._next_seen = 0.0
        self._seen_every = SEEN_INTERVAL
        self._log = _log.bind(conn_id=conn_id, peer=link.peer)
        link.set_deadline(register_timeout)

    def _move(self, event: str) -> None:
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            raise IllegalTransition(self.state, event)
        self.state = new

    # --- events from the connection (on the loop thread, like every message) --------------

    def on_data(self, data: bytes) -> None:
        if self.state is State.CLOSING or self._done_reading:
            return
        self._decoder.receive_data(data)
        if self._backlog is None:
            self._decode()
        # else: decoded once the backlog is handed on (reading is paused meanwhile)

    def _decode(self) -> None:
        """Decode what the decoder holds, as the state allows, and handle it."""
        if self.state is State.ACTIVE:
            decoded, fatal = self._decoder.drain()
            # Only client frames: the decoder was built with `accept=CLIENT_FRAME_TYPES`.
            items = cast("list[Item]", decoded)
        elif self.state is State.AWAITING_REGISTER:
            items, fatal = self._decode_to_register()
        else:
            return  # registering: kept undecoded until the outcome says under which limit
        if fatal is not None:
            # Answered after everything before it, then the connection closes.
            log = self._log.info if self._registered else self._log.debug
            log("protocol_error", code=str(fatal.code), error=_bounded(str(fatal)))
            items.append(fatal)
            self._done_reading = True
        self._handle_items(items)

    def _decode_to_register(self) -> tuple[list[Item], RemoteProtocolError | None]:
        """Frames up to and including the first `register`: what follows it is decoded once
        its outcome is known (under `max_frame` if registered)."""
        items: list[Item] = []
        decoder = self._decoder
        while True:
            try:
                frame = decoder.next_frame()
            except RemoteProtocolError as e:
                if e.fatal:
                    return items, e
                items.append(e)
                continue
            if frame is NEED_DATA:
                return items, None
            items.append(cast("ClientFrame", frame))
            if isinstance(frame, Register):
                return items, None

    def on_writable(self, writable: bool) -> None:
        if writable and self._owed_credit and self._session_id is not None:
            tell(self._subscribers, Credit(self._session_id, self._conn.conn_id, self._owed_credit))
            self._owed_credit = 0

    def on_idle_timeout(self) -> None:
        if self.state is State.ACTIVE:
            self._log.info("keepalive_timeout", session_id=self._session_id)
            self._fail(ErrorCode.TIMEOUT, "no frame within 1.5 x keepalive: connection closed")

    def on_deadline(self) -> None:
        if self.state is State.AWAITING_REGISTER:
            self._log.debug("register_timeout")
            self._fail(ErrorCode.TIMEOUT, "no register within the registration timeout")

    def on_closed(self, exc: Exception | None) -> None:
        self._socket_closed = True
        registering = self.state is State.REGISTERING
        self._move("close")
        self._backlog = None
        # An unregistered connection's close is counted and summed up by the ListenerManager:
        # a flood of them must not be a flood of lines.
        log = self._log.info if self._registered else self._log.debug
        log("connection_closed", session_id=self._session_id, error=repr(exc) if exc else None)
        if self._session_id is not None:
            tell(self._session_manager, ConnectionLost(self._session_id, self._conn.conn_id))
        if not registering:
            self._finish()
        else:
            # A check still queued for it is dropped unmade (the flood that closes its
            # connections must not keep the bcrypt pool busy); the supervisor answers, and the
            # Listener finishes on that answer as on any outcome.
            tell(self._supervisor, RegisterAbandoned(self._conn.conn_id, self._conn.peer))

    # --- messages from the other actors -------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        match message:
            case Outbound(data=data, credit=credit, close=close, session_ended=ended):
                self._link.write(data)
                if credit:
                    self._return_credit(credit)
                if ended and self._session_id is not None:
                    tell(self._session_manager, EndSession(self._session_id, self._conn.conn_id))
                    self._session_id = None  # ended, not lost: no ConnectionLost follows
                if close:
                    self._close()
            case SessionAttached():
                self._on_attached(message)
            case RegisterRejected(req=req, code=code, message=text, retry_after=retry_after):
                if self._socket_closed:
                    self._finish()
                    return None
                self._move("rejected")
                self._ended_early = None
                self._link.write(
                    encode(Error(req=req, code=code, message=text, retry_after=retry_after))
                )
                # A fresh attempt gets a fresh registration deadline.
                self._link.set_deadline(self._register_timeout)
                self._link.resume_reading()
                held, self._held = self._held, []
                self._handle_items(held)
                if self.state is State.AWAITING_REGISTER and not self._done_reading:
                    self._decode()  # what was pipelined behind the rejected register
            case Throttle(paused):
                # A publisher whose message waits for room is not read meanwhile.
                self._throttled = paused
                if paused:
                    self._link.pause_reading()
                elif self._wants_reading():
                    self._link.resume_reading()
            case CloseConnection(reason):
                # The broker shuts down, or an operator disconnects this client: close without
                # an error frame (nothing went wrong with this client); the close reports
                # `ConnectionLost` as any other does, so the session lingers and the client
                # resumes (on the next broker, after a shutdown).
                if not self._socket_closed:
                    self._log.info("closing", reason=reason, session_id=self._session_id)
                    self._close()
            case TakenOver(session_id, code, text):
                if self.state is State.REGISTERING:
                    # Bound, then taken over or ended before the grant reached us: acted on
                    # when (if) the grant arrives, so the session never goes live here.
                    self._ended_early = message
                elif session_id == self._session_id and self.state is State.ACTIVE:
                    self._log.info(
                        "taken_over" if code is ErrorCode.TAKEN_OVER else "session_ended",
                        session_id=session_id,
                    )
                    # The session now lives elsewhere, or nowhere: nothing of ours reports on it.
                    self._session_id = None
                    self._fail(code, text)
            case _:
                return super().on_receive(message)
        return None

    def on_failure(self, *exc_info: Any) -> None:
        # A bug in this connection's handling stays with this connection.
        self._log.error("listener_failed", session_id=self._session_id)
        if self._session_id is not None:
            tell(self._session_manager, ConnectionLost(self._session_id, self._conn.conn_id))
            self._session_id = None
        self._link.close()
        tell(self._listener_manager, ListenerClosed(self._conn.conn_id))

    # --- internals ----------------------------------------------------------------------

    def _on_attached(self, msg: SessionAttached) -> None:
        if self._socket_closed:
            # Granted to a connection already gone: let the session linger and expire.
            tell(self._session_manager, ConnectionLost(msg.session_id, self._conn.conn_id))
            self._finish()
            return
        self._move("attached")
        ended, self._ended_early = self._ended_early, None
        if ended is not None and ended.session_id == msg.session_id:
            self._log.info("session_ended_before_attach", session_id=msg.session_id)
            self._held = []
            self._fail(ended.code, ended.message)
            return
        self._session_id = msg.session_id
        self._registered = True
        self._log = self._log.bind(session_id=msg.session_id, client_id=msg.client_id)
        self._link.write(msg.registered)
        self._link.set_idle_timeout(msg.keepalive * 1.5)
        self._seen_every = msg.keepalive / 2
        self._next_seen = time.monotonic() + min(SEEN_INTERVAL, self._seen_every)
        self._decoder.max_frame = self._max_frame
        # No longer pending, and no read limit: the ListenerManager lifts it.
        tell(self._listener_manager, ListenerRegistered(self._conn.conn_id))
        self._link.resume_reading()
        held, self._held = self._held, []
        self._handle_items(held)
        if self._backlog is None and self.state is State.ACTIVE and not self._done_reading:
            self._decode()  # what was pipelined behind register, now under max_frame

    # --- items read off the wire, by state ----------------------------------------------
    #
    # One handler per state takes the items from `start` on and returns the index where it
    # stopped. If the state moved meanwhile (only `register` does that here), the new state's
    # handler goes on from there; otherwise the handler is done with this read.

    def _handle_items(self, items: list[Item]) -> None:
        state = self.state
        start = self._ITEM_HANDLERS[state](self, items, 0)
        while self.state is not state and start < len(items):
            state = self.state
            start = self._ITEM_HANDLERS[state](self, items, start)

    def _items_awaiting_register(self, items: list[Item], start: int) -> int:
        link = self._link
        for index in range(start, len(items)):
            item = items[index]
            if isinstance(item, RemoteProtocolError):
                link.write(encode(Error(req=item.req, code=item.code, message=_bounded(str(item)))))
                if item.fatal:
                    self._close()
                    return len(items)
            elif isinstance(item, Register):
                self._move("register")
                # The registration timeout stops when `register` arrives.
                link.set_deadline(None)
                link.pause_reading()
                tell(
                    self._supervisor,
                    RegisterRequest(item, self._conn, certificate=self._certificate),
                )
                return index + 1
            else:
                link.write(
                    encode(
                        Error(
                            req=getattr(item, "req", None),
                            code=ErrorCode.NOT_REGISTERED,
                            message="register first: only `register` is accepted before it",
                        )
                    )
                )
        return len(items)

    def _items_registering(self, items: list[Item], start: int) -> int:
        # Held, to run against the outcome (`SessionAttached` or `RegisterRejected`).
        self._held.extend(items[start:])
        return len(items)

    def _items_active(self, items: list[Item], start: int) -> int:
        """The data path: every item becomes an op of one ordered `SessionOps` per read."""
        # Presence: one clock read per read, a `Seen` at most once a second.
        now = time.monotonic()
        if now >= self._next_seen and self._session_id is not None:
            self._next_seen = now + min(SEEN_INTERVAL, self._seen_every)
            tell(self._session_manager, Seen(self._session_id, self._conn.conn_id, time.time()))
        ops: list[ClientFrame | Error] = []
        close = False
        end = len(items)
        if end - start > OPS_PER_BATCH:
            # The rest of this read goes on after a loop turn: see OPS_PER_BATCH.
            end = start + OPS_PER_BATCH
            self._backlog, self._backlog_at = items, end
        for item in items[start:end] if start or end < len(items) else items:
            if item.__class__ is Publish or item.__class__ is Ack:
                ops.append(item)  # the per-message hot path: no further checks
            elif isinstance(item, RemoteProtocolError):
                ops.append(Error(req=item.req, code=item.code, message=_bounded(str(item))))
                if item.fatal:
                    close = True
                    break
            elif isinstance(item, Register):
                ops.append(
                    Error(
                        req=item.req,
                        code=ErrorCode.BAD_REQUEST,
                        message="already registered on this connection",
                    )
                )
            else:
                ops.append(item)
                if isinstance(item, Ping):
                    if item.status is not None or item.details is not None:
                        tell(
                            self._session_manager,
                            Heartbeat(
                                self._session_id or "",
                                self._conn.conn_id,
                                item.status,
                                item.details,
                            ),
                        )
                elif isinstance(item, Unregister):
                    # Nothing after unregister is read: the broker closes once it answers.
                    self._done_reading = True
                    self._backlog = None
                    self._link.pause_reading()
                    break
        if ops and self._session_id is not None:
            tell(self._subscribers, SessionOps(self._session_id, self._conn, tuple(ops), close))
        if self._backlog is not None and self._backlog_at == end:
            # A fresh backlog: hold reading until it is handed on.
            self._link.pause_reading()
            self.loop.call_soon(self._next_chunk)
        return len(items)

    def _next_chunk(self) -> None:
        items, self._backlog = self._backlog, None
        # A fatal error read before still goes on (it ends the last chunk); after unregister
        # or a close there is no backlog.
        if items is None or self.state is not State.ACTIVE:
            return
        self._items_active(items, self._backlog_at)
        if self._backlog is None:
            # Handed on in full: read again, starting with what came meanwhile.
            if self._wants_reading():
                self._link.resume_reading()
            if self._decoder.buffered and not self._done_reading:
                self._decode()

    def _wants_reading(self) -> bool:
        return (
            self.state is State.ACTIVE
            and not self._done_reading
            and not self._throttled
            and self._backlog is None
        )

    def _items_closing(self, items: list[Item], start: int) -> int:
        return len(items)  # the socket is gone: nothing read is acted on

    _ITEM_HANDLERS: ClassVar[dict[State, Callable[[Listener, list[Item], int], int]]] = {
        State.AWAITING_REGISTER: _items_awaiting_register,
        State.REGISTERING: _items_registering,
        State.ACTIVE: _items_active,
        State.CLOSING: _items_closing,
    }

    def _return_credit(self, credit: int) -> None:
        if self._link.writable and self._session_id is not None:
            tell(
                self._subscribers,
                Credit(self._session_id, self._conn.conn_id, credit + self._owed_credit),
            )
            self._owed_credit = 0
        else:
            self._owed_credit += credit

    def _fail(self, code: ErrorCode, message: str) -> None:
        self._link.write(encode(Error(code=code, message=message)))
        self._close()

    def _close(self) -> None:
        if self.state is not State.CLOSING:
            self._link.close()

    def _finish(self) -> None:
        if self.actor_stopped.is_set():
            return  # already stopped by a failure, which reported itself
        tell(self._listener_manager, ListenerClosed(self._conn.conn_id))
        self.stop()
