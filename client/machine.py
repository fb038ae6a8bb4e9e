"""The connection logic of a Tether client, sans-IO (like h11): what the network did and what
the application asked for in, bytes to send and events out. No socket, thread, clock or task:
the front ends (`sync.Client`, `aio.AsyncClient`) do the I/O (docs/client.md).

Theory of operation:

- Registration. Each connection starts with a `register`: a resume when a session id and token
  are known, else a fresh one with the password. The newest `resume_token` is always kept (the
  broker rotates it at every resume, and the one presented stays valid until the new one is
  used, so a connection lost before `registered` arrives just resumes with the old one again).
  `unknown_session` makes a fresh register on the same connection and, once registered, a
  `SessionLost` event. `auth_failed`, `conflict`, `taken_over` and an `ok` to `unregister` end
  the machine (`Closed`): it must not be reconnected.
- Requests made while the connection is not registered wait in a queue, in order, and go out
  right after `registered`. Requests sent but unanswered when a connection is lost are sent
  again first (subscribe/unsubscribe are idempotent; a confirmed publish becomes at-least-once;
  pings are dropped: they only probe that one connection).
- Subscriptions the application wants are remembered; a fresh session (`resumed: false`) gets
  them again, and the per-topic dedup state is reset because its seqs restart at 1.
- Delivery. A `deliver` whose seq is not above the last one seen for its topic is a duplicate
  and is not shown again. The application reports each message it finished with `handled()`;
  `flush_acks()` then queues one cumulative `ack` per topic, never above what was handled and
  never above what this connection was sent (the broker ignores acks for unsent seqs, so an
  ack sent too early would be lost).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tether.protocol import (
    BROKER_FRAME_TYPES,
    DEFAULT_MAX_FRAME,
    DELIVER_HEADROOM,
    Ack,
    BadRequest,
    BrokerFrame,
    ClientFrame,
    Deliver,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Ok,
    Ping,
    Pong,
    Publish,
    Register,
    Registered,
    Stats,
    StatsResult,
    Subscribe,
    Unregister,
    Unsubscribe,
    encode,
)
from tether.protocol import Dropped as DroppedFrame

from . import events as ev
from .errors import (
    AuthFailed,
    ClientClosed,
    ConnectionFailed,
    Rejected,
    TakenOver,
    TetherError,
)
from .errors import SessionLost as SessionLostError
from .state import SavedState

__all__ = ["ClientMachine", "MachineConfig", "Phase"]


class Phase(enum.Enum):
    IDLE = "idle"  # no connection (not yet, or between two)
    REGISTERING = "registering"  # connected, `register` sent, no answer yet
    READY = "ready"  # the connection holds the session
    CLOSED = "closed"  # finished for good: never reconnect


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineConfig:
    client_id: str
    username: str
    password: str | None = None
    keepalive: int = 30
    metadata: dict[str, Any] = field(default_factory=dict)
    takeover: bool = False  # only the first fresh register may end someone else's session
    max_frame: int = DEFAULT_MAX_FRAME  # the broker's limit, which it does not announce


class _Kind(enum.Enum):
    """What a request waiting for its answer was."""

    SUBSCRIBE = "subscribe"
    RESUBSCRIBE = "resubscribe"  # sent by the machine for a fresh session: nobody waits
    UNSUBSCRIBE = "unsubscribe"
    PUBLISH = "publish"  # confirmed
    PING = "ping"
    UNREGISTER = "unregister"
    STATS = "stats"


@dataclass(slots=True)
class _Pending:
    kind: _Kind
    frame: ClientFrame
    sent: bool = False


# Rough cost of a queued frame besides its payload, for the buffered-bytes figure.
_FRAME_OVERHEAD = 64


class ClientMachine:
    def __init__(self, config: MachineConfig, state: SavedState | None = None) -> None:
        self.config = config
        # Fail now, not at the first reconnect, on values the wire cannot carry.
        encode(self._register_frame(0, fresh=True, takeover=False))
        self._phase = Phase.IDLE
        self._session_id = state.session_id if state else None
        self._token = state.resume_token if state else None
        self._epoch = 0
        self._last_seen: dict[str, int] = dict(state.last_seq) if state else {}
        self._handled: dict[str, int] = dict(state.last_seq) if state else {}
        self._takeover_next = config.takeover
        self._fresh_unanswered = False
        self._lost_session: str | None = None
        self._expiry: int | None = None
        self._keepalive = config.keepalive
        self._next_req = 0
        self._register_req: int | None = None
        self._topics: dict[str, None] = {}  # wanted subscriptions, in subscription order
        self._pending: dict[int, _Pending] = {}
        self._queue: deque[tuple[ClientFrame, int | None, int]] = deque()
        self._queued_bytes = 0
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._decoder: FrameDecoder | None = None
        self._conn_max: dict[str, int] = {}
        self._conn_acked: dict[str, int] = {}
        self._ack_dirty: set[str] = set()
        self._state_dirty = False

    # --- read-only view ------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def closed(self) -> bool:
        return self._phase is Phase.CLOSED

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def resume_token(self) -> str | None:
        return self._token

    @property
    def keepalive(self) -> int:
        """The keepalive in force: the broker's answer once registered."""
        return self._keepalive

    @property
    def topics(self) -> tuple[str, ...]:
        """The subscriptions the application asked for and did not cancel."""
        return tuple(self._topics)

    @property
    def pending_requests(self) -> frozenset[int]:
        return frozenset(self._pending)

    @property
    def buffered(self) -> int:
        """Bytes waiting to be sent: unsent output plus requests waiting for a connection."""
        return self._out_bytes + self._queued_bytes

    def last_seen(self, topic: str) -> int:
        return self._last_seen.get(topic, 0)

    def snapshot(self) -> SavedState:
        return SavedState(self.config.client_id, self._session_id, self._token, dict(self._handled))

    def take_state(self) -> SavedState | None:
        """The state to save if it changed since the last call, else None."""
        if not self._state_dirty:
            return None
        self._state_dirty = False
        return self.snapshot()

    # --- the network ---------------------------------------------------------------------

    def connection_made(self) -> None:
        """A new connection is open: queues its `register`."""
        if self._phase is Phase.CLOSED:
            raise ClientClosed()
        if self._phase is not Phase.IDLE:
            raise RuntimeError(f"connection_made() while {self._phase.value}")
        self._decoder = FrameDecoder(
            max_frame=self.config.max_frame + DELIVER_HEADROOM, accept=BROKER_FRAME_TYPES
        )
        self._phase = Phase.REGISTERING
        self._conn_max.clear()
        self._conn_acked.clear()
        self._ack_dirty.clear()
        self._send_register()

    def connection_lost(self) -> list[ev.Event]:
        """The connection is gone (closed, reset, or dropped by the front end)."""
        events: list[ev.Event] = []
        if self._phase in (Phase.IDLE, Phase.CLOSED):
            return events
        if self._register_req is not None and self._session_id is None:
            # The broker may have created the session without us hearing of it: the next
            # fresh register would meet our own orphan as a `conflict`. Take it over instead.
            self._fresh_unanswered = True
        self._phase = Phase.IDLE
        self._decoder = None
        self._register_req = None
        self._out.clear()
        self._out_bytes = 0
        resend: list[tuple[ClientFrame, int | None, int]] = []
        for req, p in list(self._pending.items()):
            if not p.sent:
                continue
            if p.kind is _Kind.PING:
                del self._pending[req]
                events.append(
                    ev.RequestFailed(req, ConnectionFailed("the connection was lost: ping again"))
                )
            else:
                p.sent = False
                resend.append((p.frame, req, _size(p.frame)))
        # What went out on the lost connection precedes what never went out.
        self._queue.extendleft(reversed(resend))
        self._queued_bytes += sum(size for _, _, size in resend)
        return events

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ev.Event]:
        """Bytes read from the connection; returns the events of every complete frame."""
        decoder = self._decoder
        if decoder is None:
            return []
        decoder.receive_data(data)
        items, fatal = decoder.drain()
        events: list[ev.Event] = []
        for item in items:
            if self._decoder is not decoder:
                break  # the machine finished (e.g. taken_over) while handling this batch
            if isinstance(item, BadRequest):
                # An unknown frame type or field from a newer broker: ignore it, as the
                # protocol asks for unknown keys.
                continue
            self._receive(item, events)
        if fatal is not None and self._decoder is decoder:
            events.append(ev.Disconnect(f"the broker sent an undecodable frame: {fatal}"))
        return events

    def receive_frame(self, frame: BrokerFrame) -> list[ev.Event]:
        """One decoded broker frame (for front ends that decode themselves, and tests)."""
        events: list[ev.Event] = []
        if self._decoder is not None:
            self._receive(frame, events)
        return events

    def data_to_send(self) -> bytes:
        """Everything queued for the current connection, as one write."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        return data

    # --- the application -----------------------------------------------------------------

    def subscribe(self, topic: str) -> int:
        self._check_open()
        req = self._new_req()
        frame = Subscribe(req=req, topic=topic)  # validates the topic before anything changes
        self._topics[topic] = None
        self._request(_Kind.SUBSCRIBE, frame, req)
        return req

    def unsubscribe(self, topic: str) -> int:
        self._check_open()
        req = self._new_req()
        frame = Unsubscribe(req=req, topic=topic)
        self._topics.pop(topic, None)
        self._request(_Kind.UNSUBSCRIBE, frame, req)
        return req

    def publish(self, topic: str, payload: bytes, *, confirm: bool = False) -> int | None:
        """Queue a publish; with `confirm`, returns the req whose `RequestDone` confirms it."""
        self._check_open()
        if not confirm:
            self._send(Publish(topic=topic, payload=payload), None)
            return None
        req = self._new_req()
        self._request(_Kind.PUBLISH, Publish(topic=topic, payload=payload, req=req), req)
        return req

    def ping(self, status: str | None = None, details: dict[str, Any] | None = None) -> int | None:
        """A keepalive ping with a health report; None (nothing sent) when not registered."""
        if self._phase is not Phase.READY:
            return None
        req = self._new_req()
        self._request(_Kind.PING, Ping(req=req, status=status, details=details), req)
        return req

    def unregister(self) -> int:
        """End the session for good; `Closed(None)` follows the broker's `ok`."""
        self._check_open()
        req = self._new_req()
        self._request(_Kind.UNREGISTER, Unregister(req=req), req)
        return req

    def stats(self) -> int:
        """Ask for the broker's counters; the `RequestDone` of the returned req carries them."""
        self._check_open()
        req = self._new_req()
        self._request(_Kind.STATS, Stats(req=req), req)
        return req

    def handled(self, message: ev.Message) -> None:
        """The application is done with `message`: it may be acked."""
        if message.epoch != self._epoch:
            return  # from a session that is gone: its seqs mean nothing to the new one
        topic, seq = message.topic, message.seq
        if seq > self._handled.get(topic, 0):
            self._handled[topic] = seq
            self._ack_dirty.add(topic)
            self._state_dirty = True

    def flush_acks(self) -> None:
        """Queue one cumulative ack per topic that has something new to settle."""
        if self._phase is not Phase.READY or not self._ack_dirty:
            return
        handled, conn_max, conn_acked = self._handled, self._conn_max, self._conn_acked
        for topic in self._ack_dirty:
            seq = min(handled.get(topic, 0), conn_max.get(topic, 0))
            if seq > conn_acked.get(topic, 0):
                conn_acked[topic] = seq
                self._emit(encode(Ack(topic=topic, seq=seq)))
        self._ack_dirty.clear()

    def close(self) -> list[ev.Event]:
        """Stop for good. Output already queued (acks) is still returned by data_to_send()."""
        if self._phase is Phase.CLOSED:
            return []
        events: list[ev.Event] = []
        self._finish(None, events)
        return events

    # --- internals -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._phase is Phase.CLOSED:
            raise ClientClosed()

    def _new_req(self) -> int:
        self._next_req += 1
        return self._next_req

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)

    def _request(self, kind: _Kind, frame: ClientFrame, req: int) -> None:
        self._pending[req] = _Pending(kind, frame)
        self._send(frame, req)

    def _send(self, frame: ClientFrame, req: int | None) -> None:
        if self._phase is Phase.READY:
            self._emit(encode(frame))
            if req is not None:
                self._pending[req].sent = True
        else:
            size = _size(frame)
            self._queue.append((frame, req, size))
            self._queued_bytes += size

    def _register_frame(self, req: int, *, fresh: bool, takeover: bool) -> Register:
        c = self.config
        if fresh:
            return Register(
                req=req,
                client_id=c.client_id,
                username=c.username,
                password=c.password if c.password is not None else "",
                keepalive=c.keepalive,
                metadata=c.metadata,
                takeover=takeover,
            )
        return Register(
            req=req,
            client_id=c.client_id,
            username=c.username,
            session_id=self._session_id,
            resume_token=self._token,
            # A resume resets the keepalive to the frame's value, so always send ours.
            keepalive=c.keepalive,
            metadata=c.metadata,
        )

    def _send_register(self) -> None:
        req = self._new_req()
        self._register_req = req
        if self._session_id is not None:
            frame = self._register_frame(req, fresh=False, takeover=False)
        else:
            frame = self._register_frame(
                req, fresh=True, takeover=self._takeover_next or self._fresh_unanswered
            )
        self._emit(encode(frame))

    def _finish(self, error: TetherError | None, events: list[ev.Event]) -> None:
        self._phase = Phase.CLOSED
        self._decoder = None
        self._register_req = None
        failure = error or ClientClosed()
        for req in list(self._pending):
            events.append(ev.RequestFailed(req, failure))
        self._pending.clear()
        self._queue.clear()
        self._queued_bytes = 0
        events.append(ev.Closed(error))

    def _receive(self, frame: Frame, events: list[ev.Event]) -> None:
        # Exact type checks, deliver first: this runs for every message. (`Frame`, not
        # `BrokerFrame`: the decoder's signature; it was built to accept broker frames only.)
        if type(frame) is Deliver:
            self._on_deliver(frame, events)
        elif type(frame) is Ok or type(frame) is Pong:
            self._on_answer(frame.req, events)
        elif type(frame) is StatsResult:
            self._on_answer(frame.req, events, frame.stats)
        elif type(frame) is Registered:
            self._on_registered(frame, events)
        elif type(frame) is Error:
            self._on_error(frame, events)
        elif type(frame) is DroppedFrame and self._phase is Phase.READY:
            events.append(ev.Dropped(frame.topic, frame.count))

    def _on_deliver(self, f: Deliver, events: list[ev.Event]) -> None:
        if self._phase is not Phase.READY:
            return
        topic, seq = f.topic, f.seq
        if seq > self._conn_max.get(topic, 0):
            self._conn_max[topic] = seq
        # Even a duplicate needs an ack on this connection, or it stays unacked there.
        self._ack_dirty.add(topic)
        if seq <= self._last_seen.get(topic, 0):
            return
        self._last_seen[topic] = seq
        events.append(ev.Message(topic, seq, f.payload, f.redelivered, self._epoch))

    def _on_answer(
        self, req: int | None, events: list[ev.Event], result: dict[str, Any] | None = None
    ) -> None:
        if req is None or self._phase is not Phase.READY:
            return
        p = self._pending.pop(req, None)
        if p is None or p.kind is _Kind.RESUBSCRIBE:
            return
        events.append(ev.RequestDone(req, result))
        if p.kind is _Kind.UNREGISTER:
            self._session_id = self._token = None
            self._handled.clear()
            self._state_dirty = True
            self._finish(None, events)

    def _on_registered(self, f: Registered, events: list[ev.Event]) -> None:
        if self._phase is not Phase.REGISTERING or f.req != self._register_req:
            return
        self._register_req = None
        previous = self._lost_session or self._session_id
        self._lost_session = None
        self._session_id, self._token = f.session_id, f.resume_token
        self._takeover_next = self._fresh_unanswered = False
        self._expiry, self._keepalive = f.expiry, f.keepalive
        self._state_dirty = True
        self._phase = Phase.READY
        events.append(
            ev.Registered(f.session_id, f.resumed, f.queued, f.dropped, f.keepalive, f.expiry)
        )
        front: list[tuple[ClientFrame, int | None, int]] = []
        if not f.resumed:
            # A new session: its seqs start again at 1 and it has no subscriptions.
            self._epoch += 1
            self._last_seen.clear()
            self._handled.clear()
            if previous is not None:
                events.append(ev.SessionLost(SessionLostError(previous, expiry=self._expiry)))
            waiting = {
                p.frame.topic
                for p in self._pending.values()
                if p.kind in (_Kind.SUBSCRIBE, _Kind.RESUBSCRIBE) and isinstance(p.frame, Subscribe)
            }
            for topic in self._topics:
                if topic not in waiting:
                    sub_req = self._new_req()
                    sub = Subscribe(req=sub_req, topic=topic)
                    self._pending[sub_req] = _Pending(_Kind.RESUBSCRIBE, sub)
                    front.append((sub, sub_req, _size(sub)))
        if f.dropped:
            events.append(ev.Dropped(None, f.dropped))
        queue, self._queue = self._queue, deque()
        self._queued_bytes = 0
        for frame, req, _ in (*front, *queue):
            self._emit(encode(frame))
            pending = self._pending.get(req) if req is not None else None
            if pending is not None:
                pending.sent = True

    def _on_error(self, f: Error, events: list[ev.Event]) -> None:
        code, req = f.code, f.req
        if self._phase is Phase.REGISTERING and req is not None and req == self._register_req:
            self._on_register_error(f, events)
            return
        p = self._pending.pop(req, None) if req is not None else None
        if p is not None and req is not None:
            if p.kind in (_Kind.SUBSCRIBE, _Kind.RESUBSCRIBE) and isinstance(p.frame, Subscribe):
                self._topics.pop(p.frame.topic, None)
            if p.kind is _Kind.RESUBSCRIBE:
                events.append(ev.BrokerError(code, f.message))
            else:
                events.append(ev.RequestFailed(req, Rejected(code, f.message)))
            return
        if code == ErrorCode.TAKEN_OVER:
            error = TakenOver(self.config.client_id)
            events.append(ev.TakenOver(error))
            self._finish(error, events)
            return
        events.append(ev.BrokerError(code, f.message))

    def _on_register_error(self, f: Error, events: list[ev.Event]) -> None:
        self._register_req = None
        code = f.code
        if code == ErrorCode.UNKNOWN_SESSION and self._session_id is not None:
            lost = self._session_id
            self._session_id = self._token = None
            self._state_dirty = True
            unregister = [r for r, p in self._pending.items() if p.kind is _Kind.UNREGISTER]
            if unregister:
                # The unregister went through before the connection was lost: done.
                del self._pending[unregister[0]]
                self._handled.clear()
                events.append(ev.RequestDone(unregister[0]))
                self._finish(None, events)
                return
            self._lost_session = lost
            self._send_register()  # fresh, on the same connection
            return
        if code == ErrorCode.RATE_LIMITED:
            events.append(ev.Disconnect("the broker is rate-limiting logins from this address"))
            return
        error: TetherError
        if code == ErrorCode.AUTH_FAILED:
            error = AuthFailed(self.config.username, f.message)
        else:
            error = Rejected(code, f.message)
        self._finish(error, events)


def _size(frame: ClientFrame) -> int:
    if isinstance(frame, Publish):
        return len(frame.payload) + len(frame.topic) + _FRAME_OVERHEAD
    return _FRAME_OVERHEAD
