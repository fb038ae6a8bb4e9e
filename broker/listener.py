"""Listener: the actor of one client connection.

Theory of operation: the Listener decodes what its connection reads and keeps one connection's
frames in order. Before registration only `register` is accepted; while a registration is being
decided, reading pauses and whatever the client pipelined behind `register` waits, then runs
against the outcome. Once registered, every frame (and every error a bad frame earns) goes to
the SubscriberManager as one ordered batch per read, so answers leave in the order frames came.

A Listener outlives its socket while a registration is in flight: if the session is granted
to a connection already gone, the Listener reports it lost, so the session lingers and expires
as it should instead of staying "connected" forever.
"""

from __future__ import annotations

import enum
from typing import Any

import structlog

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
    SessionAttached,
    SessionOps,
    TakenOver,
    Throttle,
)
from tether.broker.netedge import Link
from tether.protocol import (
    CLIENT_FRAME_TYPES,
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

_log = structlog.get_logger("tether.listener")


class State(enum.Enum):
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
        loop: Any,
        loop_thread: int,
        *,
        link: Link,
        conn_id: int,
        supervisor: Any,
        session_manager: Any,
        subscriber_manager: Any,
        listener_manager: Any,
        max_frame: int,
        register_timeout: float,
    ) -> None:
        super().__init__(loop, loop_thread)
        self._link = link
        self._conn = ConnHandle(conn_id, self.actor_ref, link.peer)
        self._supervisor = supervisor
        self._session_manager = session_manager
        self._subscribers = subscriber_manager
        self._listener_manager = listener_manager
        self._decoder = FrameDecoder(max_frame=max_frame, accept=CLIENT_FRAME_TYPES)
        self._register_timeout = register_timeout
        self.state = State.AWAITING_REGISTER
        self._socket_closed = False
        self._held: list[Item] = []
        self._done_reading = False  # after unregister or a fatal protocol error
        self._session_id: str | None = None
        self._owed_credit = 0
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
        items, fatal = self._decoder.drain()
        if fatal is not None:
            # Answered after everything before it, then the connection closes.
            self._log.info("protocol_error", code=str(fatal.code), error=str(fatal))
            items.append(fatal)  # type: ignore[arg-type]
            self._done_reading = True
        self._handle_items(items)  # type: ignore[arg-type]

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
            self._log.info("register_timeout")
            self._fail(ErrorCode.TIMEOUT, "no register within the registration timeout")

    def on_closed(self, exc: Exception | None) -> None:
        self._socket_closed = True
        registering = self.state is State.REGISTERING
        self._move("close")
        self._log.info(
            "connection_closed", session_id=self._session_id, error=repr(exc) if exc else None
        )
        if self._session_id is not None:
            tell(self._session_manager, ConnectionLost(self._session_id, self._conn.conn_id))
        if not registering:
            self._finish()

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
            case RegisterRejected(req=req, code=code, message=text):
                if self._socket_closed:
                    self._finish()
                    return None
                self._move("rejected")
                self._link.write(encode(Error(req=req, code=code, message=text)))
                # A fresh attempt gets a fresh registration deadline.
                self._link.set_deadline(self._register_timeout)
                self._link.resume_reading()
                held, self._held = self._held, []
                self._handle_items(held)
            case Throttle(paused):
                # A publisher whose message waits for room is not read meanwhile.
                if paused:
                    self._link.pause_reading()
                elif not self._done_reading and self.state is State.ACTIVE:
                    self._link.resume_reading()
            case TakenOver(session_id):
                if session_id == self._session_id and self.state is State.ACTIVE:
                    self._log.info("taken_over", session_id=session_id)
                    # The session now lives on another connection: nothing of ours reports on it.
                    self._session_id = None
                    self._fail(
                        ErrorCode.TAKEN_OVER,
                        "another connection took this session over: not reconnecting",
                    )
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
        self._session_id = msg.session_id
        self._log = self._log.bind(session_id=msg.session_id, client_id=msg.client_id)
        self._link.write(msg.registered)
        self._link.set_idle_timeout(msg.keepalive * 1.5)
        self._link.resume_reading()
        held, self._held = self._held, []
        self._handle_items(held)

    def _handle_items(self, items: list[Item]) -> None:
        ops: list[ClientFrame | Error] = []
        close = False
        for index, item in enumerate(items):
            state = self.state
            if state is State.ACTIVE and (item.__class__ is Publish or item.__class__ is Ack):
                ops.append(item)  # the data path: no further checks
            elif state is State.ACTIVE:
                if isinstance(item, RemoteProtocolError):
                    ops.append(Error(req=item.req, code=item.code, message=str(item)))
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
                        self._link.pause_reading()
                        break
            elif state is State.REGISTERING:
                self._held.extend(items[index:])
                break
            elif state is State.AWAITING_REGISTER:
                if isinstance(item, RemoteProtocolError):
                    self._link.write(encode(Error(req=item.req, code=item.code, message=str(item))))
                    if item.fatal:
                        self._close()
                        break
                elif isinstance(item, Register):
                    self._move("register")
                    # The registration timeout stops when `register` arrives.
                    self._link.set_deadline(None)
                    self._link.pause_reading()
                    tell(self._supervisor, RegisterRequest(item, self._conn))
                else:
                    self._link.write(
                        encode(
                            Error(
                                req=getattr(item, "req", None),
                                code=ErrorCode.NOT_REGISTERED,
                                message="register first: only `register` is accepted before it",
                            )
                        )
                    )
            else:
                break
        if ops and self._session_id is not None:
            tell(self._subscribers, SessionOps(self._session_id, self._conn, tuple(ops), close))

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
