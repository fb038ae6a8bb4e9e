"""The connection logic of a Tether client, sans-IO (like h11): what the network did and what
the application asked for in, bytes to send and events out. No socket, thread, clock or task:
the front ends (`sync.Client`, `aio.AsyncClient`) do the I/O (docs/client.md).

Theory of operation:

- Registration. Each connection starts with a `register`: a resume when a session id and token
  are known, else a fresh one with the password. The newest `resume_token` is always kept (the
  broker rotates it at every resume, and the one presented stays valid until the new one is
  used, so a connection lost before `registered` arrives just resumes with the old one again).
  `unknown_session` makes a fresh register on the same connection and, once registered, a
  `SessionLost` event. `auth_failed`, `conflict`, `taken_over`, `session_ended` and an `ok` to
  `unregister` end the machine (`Closed`): it must not be reconnected.
- Requests made while the connection is not registered wait in a queue, in order, and go out
  right after `registered`. Requests sent but unanswered when a connection is lost are sent
  again first (subscribe/unsubscribe are idempotent; a confirmed publish becomes at-least-once;
  pings are dropped: they only probe that one connection).
- Subscriptions the application wants are remembered; a fresh session (`resumed: false`) gets
  them again, and the per-topic dedup state is reset because its seqs restart at 1. One the
  broker refuses (`not_authorized`) or ends (an `error` with `topic` and no `req`: its user's
  permissions changed, `SubscriptionRevoked`) is forgotten.
- Frame limit. The broker announces its frame limit in `registered` (`max_frame`; else the
  configured one is assumed). A publish whose frame would exceed it is refused at the call,
  before anything is queued; requests queued under an older, larger limit fail when the new
  one is learned. Until `registered` arrives, received frames go to the decoder one at a time,
  so the frames after it are judged by the announced limit plus a deliver's header. A frame
  the broker refuses as too large (`frame_too_large`, fatal) is never sent again: its request
  fails with `PayloadTooLarge` and the limit learned from the refusal applies from then on.
- Nothing repeats for ever. A failure that would recur identically on every new connection
  ends the machine with an error instead of a reconnect: a register refused as too large, a
  delivery over the client's limit, a stream broken the same way on consecutive connections
  with no progress between them, and, before the first session, an answer that is not Tether
  or a `rate_limited` login that followed a wrong password (one the broker gave unchecked, its
  login queue full, carries `retry_after` and is retried after that long).
- Transitions. Losing the connection that held the session emits `Disconnected` once; the next
  `registered` after it emits `Reconnected`. Failed attempts in between emit nothing.
- Delivery. A `deliver` whose seq is not above the last one seen for its topic is a duplicate
  and is not shown again. The application reports each message it finished with `handled()`;
  `flush_acks()` then queues one cumulative `ack` per topic, never above what was handled and
  never above what this connection was sent (the broker ignores acks for unsent seqs, so an
  ack sent too early would be lost).
"""

from __future__ import annotations

import enum
import re
import struct
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
    FrameTooLarge,
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
    PayloadTooLarge,
    Rejected,
    SessionEnded,
    TakenOver,
    TetherError,
    rejection,
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
    max_frame: int = DEFAULT_MAX_FRAME  # the broker's limit, until it announces its own


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
    size: int = 0  # the frame's length prefix when it was last sent
    unavailable: int = 0  # `unavailable` answers in a row: the attempt of the next retry
    retry_due: bool = False  # answered `unavailable`, waiting for the front end's `retry`


# Rough cost of a queued frame besides its payload, for the buffered-bytes figure.
_FRAME_OVERHEAD = 64
# A publish frame's bytes besides its payload and topic are fewer than this: a payload and
# topic this far under the limit need not be encoded to know that they fit.
_PUBLISH_SLACK = 64
# Consecutive connections broken the same way, with nothing delivered or answered between
# them, before the machine gives up: the next one would break the same way.
_MAX_SAME_BREAKS = 3
_PREFIX = struct.Struct(">I")
_REFUSED_SIZES = re.compile(r"frame of (\d+) bytes exceeds the limit of (\d+) bytes")


class ClientMachine:
    def __init__(self, config: MachineConfig, state: SavedState | None = None) -> None:
        self.config = config
        # Fail now, not at the first reconnect, on values the wire cannot carry.
        size = len(encode(self._register_frame(0, fresh=True, takeover=False))) - _PREFIX.size
        if size > config.max_frame:
            raise PayloadTooLarge(
                size,
                config.max_frame,
                f"the register frame with this metadata has {size} bytes, over the broker's "
                f"limit of {config.max_frame} bytes: send less metadata",
            )
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
        self._limit = config.max_frame  # the broker's frame limit, as far as we know it
        self._pre = bytearray()  # received while registering, not yet given to the decoder
        self._ever_registered = False
        self._away = False  # lost the connection that held the session: `Reconnected` due
        self._conn_unconfirmed = 0  # the largest fire-and-forget frame sent on this connection
        self._progress = 0  # messages shown and requests answered, ever
        self._breaks: tuple[str, int, int] | None = None  # (reason, progress then, times)

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
    def max_frame(self) -> int:
        """The broker's frame limit: announced in `registered`, else the configured one (or
        what a `frame_too_large` refusal told)."""
        return self._limit

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
        self._decoder = self._new_decoder()
        self._phase = Phase.REGISTERING
        self._pre.clear()
        self._conn_max.clear()
        self._conn_acked.clear()
        self._ack_dirty.clear()
        self._conn_unconfirmed = 0
        self._send_register()

    def connection_lost(self, reason: str = "the connection was lost") -> list[ev.Event]:
        """The connection is gone (closed, reset, or dropped by the front end); `reason` is
        passed on in `Disconnected` when it held the session."""
        events: list[ev.Event] = []
        if self._phase in (Phase.IDLE, Phase.CLOSED):
            return events
        if self._phase is Phase.READY:
            self._away = True
            events.append(ev.Disconnected(reason))
        if self._register_req is not None and self._session_id is None:
            # The broker may have created the session without us hearing of it: the next
            # fresh register would meet our own orphan as a `conflict`. Take it over instead.
            self._fresh_unanswered = True
        self._phase = Phase.IDLE
        self._decoder = None
        self._pre.clear()
        self._register_req = None
        self._out.clear()
        self._out_bytes = 0
        resend: list[tuple[ClientFrame, int | None, int]] = []
        for req, p in list(self._pending.items()):
            if p.retry_due:
                p.retry_due = False  # it goes out after registration, like the others
            elif not p.sent:
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
        events: list[ev.Event] = []
        if self._decoder is None:
            return events
        if self._phase is not Phase.REGISTERING:
            self._decode(data, events)
            return events
        # Registering: the decoder gets one frame at a time, so that whatever follows
        # `registered` goes to a decoder that knows the limit it announced.
        pre = self._pre
        pre += data
        while len(pre) >= _PREFIX.size and self._phase is Phase.REGISTERING:
            decoder = self._decoder
            if decoder is None:
                break
            (n,) = _PREFIX.unpack_from(pre)
            end = _PREFIX.size + n
            if n <= decoder.max_frame and len(pre) < end:
                return events  # the rest of this frame is still to come
            # (A prefix over the limit goes in whole: the decoder refuses it by its prefix.)
            chunk = bytes(pre[:end])
            del pre[:end]
            self._decode(chunk, events)
        # (The phase as it is now: handling the frames above may have changed it.)
        phase = self.phase
        if phase is Phase.READY and pre:
            rest = bytes(pre)
            pre.clear()
            self._decode(rest, events)
        elif phase is not Phase.REGISTERING:
            pre.clear()
        return events

    def _decode(self, data: bytes | bytearray | memoryview, events: list[ev.Event]) -> None:
        decoder = self._decoder
        if decoder is None:
            return
        decoder.receive_data(data)
        items, fatal = decoder.drain()
        for item in items:
            if self._decoder is not decoder:
                break  # the machine finished (e.g. taken_over) while handling this batch
            if isinstance(item, BadRequest):
                # An unknown frame type or field from a newer broker: ignore it, as the
                # protocol asks for unknown keys.
                continue
            self._receive(item, events)
        if fatal is not None and self._decoder is decoder:
            self._on_broken_stream(fatal, events)

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
        """Queue a publish; with `confirm`, returns the req whose `RequestDone` confirms it.
        Raises `PayloadTooLarge`, queueing nothing, when its frame exceeds the broker's
        limit."""
        self._check_open()
        if not confirm:
            frame = Publish(topic=topic, payload=payload)
            self._check_fits(frame)
            self._send(frame, None)
            return None
        req = self._new_req()
        frame = Publish(topic=topic, payload=payload, req=req)
        self._check_fits(frame)
        self._request(_Kind.PUBLISH, frame, req)
        return req

    def ping(self, status: str | None = None, details: dict[str, Any] | None = None) -> int | None:
        """A keepalive ping with a health report; None (nothing sent) when not registered.
        Raises `PayloadTooLarge` when `details` make it exceed the broker's frame limit."""
        if self._phase is not Phase.READY:
            return None
        req = self._new_req()
        frame = Ping(req=req, status=status, details=details)
        if details:
            size = len(encode(frame)) - _PREFIX.size
            if size > self._limit:
                raise PayloadTooLarge(
                    size,
                    self._limit,
                    f"the health details make a ping of {size} bytes, over the broker's limit "
                    f"of {self._limit} bytes: report less",
                )
        self._request(_Kind.PING, frame, req)
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

    def retry(self, req: int) -> None:
        """Send again request `req`, answered `unavailable`, once the `RetryLater` delay has
        passed. Nothing if it was answered since, or if the connection dropped meanwhile (the
        request then goes out again after the next registration)."""
        p = self._pending.get(req)
        if p is None or not p.retry_due or self._phase is not Phase.READY:
            return
        p.retry_due = False
        self._emit_frame(p.frame, req)

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

    def close(self, error: TetherError | None = None) -> list[ev.Event]:
        """Stop for good, `error` saying why when it is not the application's wish. Output
        already queued (acks) is still returned by data_to_send()."""
        if self._phase is Phase.CLOSED:
            return []
        events: list[ev.Event] = []
        self._finish(error, events)
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
            self._emit_frame(frame, req)
        else:
            size = _size(frame)
            self._queue.append((frame, req, size))
            self._queued_bytes += size

    def _emit_frame(self, frame: ClientFrame, req: int | None) -> None:
        """Send `frame` on the registered connection, noting its size for a refusal."""
        data = encode(frame)
        self._emit(data)
        pending = self._pending.get(req) if req is not None else None
        if pending is not None:
            pending.sent = True
            pending.size = len(data) - _PREFIX.size
        elif isinstance(frame, Publish):
            self._conn_unconfirmed = max(self._conn_unconfirmed, len(data) - _PREFIX.size)

    def _too_large(self, frame: ClientFrame) -> PayloadTooLarge | None:
        """The error for a publish over the broker's limit, else None."""
        if not isinstance(frame, Publish):
            return None  # every other frame is small
        limit = self._limit
        if len(frame.payload) + 4 * len(frame.topic) + _PUBLISH_SLACK <= limit:
            return None  # surely fits (a character takes at most 4 bytes in UTF-8)
        size = len(encode(frame)) - _PREFIX.size
        if size <= limit:
            return None
        return PayloadTooLarge(
            size,
            limit,
            f"a message of {len(frame.payload)} bytes to {frame.topic!r} makes a frame of "
            f"{size} bytes, over the broker's limit of {limit} bytes: send it in smaller "
            "parts, or ask for a larger `tether serve --max-frame`",
        )

    def _check_fits(self, frame: Publish) -> None:
        error = self._too_large(frame)
        if error is not None:
            raise error

    def _new_decoder(self) -> FrameDecoder:
        # A delivery wraps a payload that fitted in a publish with a slightly larger header.
        return FrameDecoder(max_frame=self._limit + DELIVER_HEADROOM, accept=BROKER_FRAME_TYPES)

    def _register_frame(self, req: int, *, fresh: bool, takeover: bool) -> Register:
        c = self.config
        if fresh:
            return Register(
                req=req,
                client_id=c.client_id,
                username=c.username,
                password=c.password,  # None: no key at all (a login by client certificate)
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
        self._pre.clear()
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
        self._progress += 1
        events.append(ev.Message(topic, seq, f.payload, f.redelivered, self._epoch))

    def _on_answer(
        self, req: int | None, events: list[ev.Event], result: dict[str, Any] | None = None
    ) -> None:
        if req is None or self._phase is not Phase.READY:
            return
        p = self._pending.pop(req, None)
        if p is None:
            return
        self._progress += 1
        if p.kind is _Kind.RESUBSCRIBE:
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
        self._ever_registered = True
        if f.max_frame is not None and f.max_frame != self._limit:
            self._limit = f.max_frame
            # Nothing after `registered` was decoded yet (see receive_data).
            self._decoder = self._new_decoder()
        events.append(
            ev.Registered(f.session_id, f.resumed, f.queued, f.dropped, f.keepalive, f.expiry)
        )
        if self._away:
            self._away = False
            events.append(ev.Reconnected(f.resumed, f.queued))
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
            error = self._too_large(frame)  # queued before this limit was known
            if error is None:
                self._emit_frame(frame, req)
            elif req is not None:
                self._pending.pop(req, None)
                events.append(ev.RequestFailed(req, error))
            else:
                events.append(ev.Refused(error))

    def _on_error(self, f: Error, events: list[ev.Event]) -> None:
        code, req = f.code, f.req
        if code == ErrorCode.FRAME_TOO_LARGE:
            self._on_frame_refused(f, events)
            return
        retrying = self._pending.get(req) if req is not None else None
        if code == ErrorCode.UNAVAILABLE and retrying is not None and req is not None:
            # The broker could not store it for now (its store is failing): the same request
            # again after a backoff, as the protocol asks; the caller waits meanwhile.
            retrying.sent = False
            retrying.retry_due = True
            events.append(ev.RetryLater(req, retrying.unavailable))
            retrying.unavailable += 1
            return
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
                events.append(ev.RequestFailed(req, rejection(code, f.message)))
            return
        if code == ErrorCode.NOT_AUTHORIZED and req is None and f.topic is not None:
            # The broker ended this subscription (its user may no longer subscribe to it).
            self._topics.pop(f.topic, None)
            events.append(ev.SubscriptionRevoked(f.topic, f.message))
            return
        if code in (ErrorCode.TAKEN_OVER, ErrorCode.SESSION_ENDED):
            # Both mean the session is not ours any more: stop, never reconnect.
            error = (
                TakenOver(self.config.client_id)
                if code == ErrorCode.TAKEN_OVER
                else SessionEnded(self.config.client_id, f.message)
            )
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
            refusal = Rejected(code, f.message)
            if f.retry_after is not None:
                # Refused unchecked (the broker's login queue was full): no verdict on the
                # password, so try again, after at least what the broker asked.
                events.append(
                    ev.Disconnect(
                        "the broker's login queue is full", refusal, retry_after=f.retry_after
                    )
                )
                return
            if not self._ever_registered:
                # After a wrong password (and too many from this address): trying the same
                # password again cannot help.
                self._finish(refusal, events)
                return
            events.append(
                ev.Disconnect("the broker is rate-limiting logins from this address", refusal)
            )
            return
        error: TetherError
        if code == ErrorCode.AUTH_FAILED:
            error = AuthFailed(self.config.username, f.message)
        else:
            # `not_authorized` (a client id outside the user's prefixes) is NotAuthorized.
            error = rejection(code, f.message)
        self._finish(error, events)

    def _on_frame_refused(self, f: Error, events: list[ev.Event]) -> None:
        """The broker refused a frame of ours as too large and closes the connection."""
        if self._phase is Phase.REGISTERING:
            # Only the register went out on this connection: it would be refused again.
            self._finish(
                Rejected(
                    f.code,
                    f.message,
                    hint="the register frame (with its metadata) is larger than the broker "
                    "accepts: send less metadata",
                ),
                events,
            )
            return
        # A frame sent on this connection, over a limit the broker did not announce (or
        # announced larger: it changed). Take the limit from the refusal or, failing that,
        # suspect the largest frame still unanswered; what exceeds it is never sent again.
        match = _REFUSED_SIZES.search(f.message)
        sent = [(req, p) for req, p in self._pending.items() if p.sent]
        if match is not None:
            limit = int(match.group(2))
        else:
            largest = max([p.size for _, p in sent] + [self._conn_unconfirmed])
            limit = largest - 1 if largest > 0 else self._limit
        self._limit = min(self._limit, max(limit, 1))
        failed = False
        for req, p in sent:
            if p.size > self._limit:
                del self._pending[req]
                failed = True
                events.append(
                    ev.RequestFailed(
                        req,
                        PayloadTooLarge(
                            p.size,
                            self._limit,
                            f"the broker refused a frame of {p.size} bytes as over its limit of "
                            f"{self._limit} bytes ({f.message}); it is not sent again: send "
                            "smaller messages, or ask for a larger `tether serve --max-frame`",
                        ),
                    )
                )
        if not failed:  # a fire-and-forget publish: the application hears of it by on_error
            events.append(ev.BrokerError(f.code, f.message))

    def _on_broken_stream(self, fatal: Exception, events: list[ev.Event]) -> None:
        """The broker's byte stream cannot be decoded any further."""
        if not self._ever_registered:
            self._finish(
                ConnectionFailed(
                    f"the server did not answer as a Tether broker ({fatal}): check the host "
                    "and port"
                ),
                events,
            )
            return
        if isinstance(fatal, FrameTooLarge) and self._phase is Phase.READY:
            # A delivery over our limit: it would come again on every connection.
            self._finish(
                PayloadTooLarge(
                    fatal.size,
                    self._limit,
                    f"the broker sent a frame of {fatal.size} bytes, over this client's limit "
                    f"of {fatal.limit} bytes (max_frame {self._limit} plus a delivery's "
                    "header): set max_frame to the broker's --max-frame (a broker that "
                    "announces its limit needs no setting)",
                ),
                events,
            )
            return
        reason = f"the broker sent an undecodable frame: {fatal}"
        last = self._breaks
        times = last[2] + 1 if last and last[:2] == (reason, self._progress) else 1
        self._breaks = (reason, self._progress, times)
        if times >= _MAX_SAME_BREAKS:
            self._finish(
                ConnectionFailed(
                    f"{reason}, on {times} connections in a row with nothing received between "
                    "them: giving up, as the next one would break the same way; report it "
                    "with the broker's log"
                ),
                events,
            )
            return
        events.append(ev.Disconnect(reason))


def _size(frame: ClientFrame) -> int:
    if isinstance(frame, Publish):
        return len(frame.payload) + len(frame.topic) + _FRAME_OVERHEAD
    return _FRAME_OVERHEAD
