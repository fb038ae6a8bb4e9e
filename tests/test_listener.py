"""The Listener over a fake link: what it writes, pauses, arms and closes, and what it tells
its collaborators, for frames fed to `on_data` and messages from the other actors.

No socket and no second thread: the test thread is the loop thread. The Listener is started
with `start_unregistered()`, as the ListenerManager does; messages told to it are handled
when the test runs the loop (`settle`). Collaborators are refs that record what they are told.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tether.broker import listener as listener_module
from tether.broker.listener import CloseConnection, Listener, State
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
from tether.protocol import (
    BROKER_FRAME_TYPES,
    Ack,
    ClientFrame,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Ok,
    Ping,
    Publish,
    Register,
    Registered,
    Subscribe,
    Unregister,
    encode,
    encode_map,
)

CONN_ID = 7
SESSION = "s-1"
MAX_FRAME = 1024
REGISTER_TIMEOUT = 5.0
GARBAGE = b"\x00\x00\x00\x00"  # a zero length prefix: a fatal bad_frame
BAD_SUBSCRIBE = encode_map({"type": "subscribe", "req": 9})  # no topic: a bad_request, req 9


class FakeLink:
    """The `Link` a Listener sees, recording every call in order (writes decoded)."""

    peer = "198.51.100.1:4242"

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.writable = True
        self._decoder = FrameDecoder(max_frame=1 << 20, accept=BROKER_FRAME_TYPES)

    def write(self, data: bytes) -> None:
        self._decoder.receive_data(data)
        frames, fatal = self._decoder.drain()
        assert fatal is None and self._decoder.buffered == 0, "the Listener wrote a bad frame"
        self.events.extend(("write", frame) for frame in frames)

    def close(self) -> None:
        self.events.append(("close",))

    def set_idle_timeout(self, seconds: float | None) -> None:
        self.events.append(("idle_timeout", seconds))

    def set_deadline(self, seconds: float | None) -> None:
        self.events.append(("deadline", seconds))

    def pause_reading(self) -> None:
        self.events.append(("pause",))

    def resume_reading(self) -> None:
        self.events.append(("resume",))

    def take(self) -> list[tuple[Any, ...]]:
        """The events since the last take."""
        events, self.events = self.events, []
        return events


class Told:
    """Stands in for a collaborator's ref: records what it is told."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def tell(self, message: Any) -> None:
        self.messages.append(message)

    def take(self) -> list[Any]:
        messages, self.messages = self.messages, []
        return messages


class Harness:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.link = FakeLink()
        self.supervisor = Told()
        self.sessions = Told()
        self.subscribers = Told()
        self.listeners = Told()
        self.listener = Listener(
            self.loop,
            threading.get_ident(),  # this thread plays the loop's
            link=self.link,
            conn_id=CONN_ID,
            supervisor=self.supervisor,  # type: ignore[arg-type]
            session_manager=self.sessions,  # type: ignore[arg-type]
            subscriber_manager=self.subscribers,  # type: ignore[arg-type]
            listener_manager=self.listeners,  # type: ignore[arg-type]
            max_frame=MAX_FRAME,
            register_timeout=REGISTER_TIMEOUT,
        )
        self.ref = self.listener.start_unregistered()
        self.conn = ConnHandle(CONN_ID, self.ref, FakeLink.peer)

    def read(self, *parts: Frame | bytes) -> None:
        """One read off the socket holding `parts` (frames encoded, bytes as they are)."""
        self.listener.on_data(b"".join(p if isinstance(p, bytes) else encode(p) for p in parts))

    def tell(self, message: Any) -> None:
        self.ref.tell(message)
        self.settle()

    def settle(self) -> None:
        """Run the loop until what was told has been handled."""
        self.loop.run_until_complete(asyncio.sleep(0))

    def register(self, *after: Frame | bytes, req: int = 1) -> Register:
        frame = Register(req=req, client_id="c-1", username="alice", password="secret")
        self.read(frame, *after)
        return frame

    def attach(self, keepalive: int = 10) -> Registered:
        registered = Registered(
            req=1,
            session_id=SESSION,
            resume_token="token",
            resumed=False,
            keepalive=keepalive,
            expiry=60,
            queued=0,
            dropped=0,
        )
        self.tell(SessionAttached(SESSION, "c-1", keepalive, encode(registered)))
        return registered

    def activate(self) -> None:
        """Register and attach, and forget what that wrote and told."""
        self.register()
        self.attach()
        assert self.listener.state is State.ACTIVE
        self.link.take()
        for told in (self.supervisor, self.sessions, self.subscribers, self.listeners):
            told.take()

    def close(self) -> None:
        if self.ref.is_alive():
            self.ref.stop(block=False)
            self.settle()
        self.loop.close()


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


def errors(events: list[tuple[Any, ...]]) -> list[tuple[int | None, str]]:
    """(req, code) of each error written, in order."""
    return [(e[1].req, e[1].code) for e in events if e[0] == "write" and isinstance(e[1], Error)]


def ops_of(told: list[Any]) -> list[tuple[ClientFrame | Error, ...]]:
    return [m.ops for m in told if isinstance(m, SessionOps)]


# --- before registration --------------------------------------------------------------------


def test_the_registration_deadline_is_armed_from_the_start(h: Harness) -> None:
    assert h.link.take() == [("deadline", REGISTER_TIMEOUT)]
    assert h.listener.state is State.AWAITING_REGISTER


def test_frames_before_register_are_answered_not_registered(h: Harness) -> None:
    h.link.take()
    h.read(Subscribe(req=1, topic="t"), Ping(), Publish(topic="t", payload=b"x"), BAD_SUBSCRIBE)
    assert errors(h.link.take()) == [
        (1, ErrorCode.NOT_REGISTERED),
        (None, ErrorCode.NOT_REGISTERED),
        (None, ErrorCode.NOT_REGISTERED),
        (9, ErrorCode.BAD_REQUEST),
    ]
    assert h.listener.state is State.AWAITING_REGISTER
    for told in (h.supervisor, h.sessions, h.subscribers, h.listeners):
        assert told.messages == []


def test_register_goes_to_the_supervisor_and_reading_pauses(h: Harness) -> None:
    h.link.take()
    frame = h.register()
    assert h.listener.state is State.REGISTERING
    # The registration deadline stops when `register` arrives.
    assert h.link.take() == [("deadline", None), ("pause",)]
    assert h.supervisor.take() == [RegisterRequest(frame, h.conn)]


def test_the_deadline_passing_before_register_answers_timeout_and_closes(h: Harness) -> None:
    h.link.take()
    h.listener.on_deadline()
    events = h.link.take()
    assert errors(events) == [(None, ErrorCode.TIMEOUT)]
    assert events[-1] == ("close",)
    h.link.take()
    h.register()
    h.link.take()
    h.listener.on_deadline()  # only acted on while awaiting register
    assert h.link.take() == []


# --- frames held while registering ----------------------------------------------------------


def test_frames_pipelined_behind_register_are_held_and_replayed_once_attached(
    h: Harness,
) -> None:
    h.link.take()
    subscribe = Subscribe(req=2, topic="t")
    publish = Publish(topic="t", payload=b"x", req=3)
    h.register(subscribe, publish)
    later = Ack(topic="t", seq=1)
    h.read(later)  # read before the pause took effect: held too, behind the others
    assert h.subscribers.messages == []
    assert h.link.take() == [("deadline", None), ("pause",)]

    registered = h.attach(keepalive=10)
    assert h.listener.state is State.ACTIVE
    assert h.link.take() == [("write", registered), ("idle_timeout", 15.0), ("resume",)]
    assert h.subscribers.take() == [SessionOps(SESSION, h.conn, (subscribe, publish, later))]


def test_a_rejected_register_is_answered_and_the_held_frames_run_against_it(
    h: Harness,
) -> None:
    h.link.take()
    h.register(Subscribe(req=2, topic="t"), BAD_SUBSCRIBE)
    h.link.take()
    h.tell(RegisterRejected(1, ErrorCode.AUTH_FAILED, "bad password"))
    assert h.listener.state is State.AWAITING_REGISTER
    events = h.link.take()
    assert errors(events) == [
        (1, ErrorCode.AUTH_FAILED),
        (2, ErrorCode.NOT_REGISTERED),
        (9, ErrorCode.BAD_REQUEST),
    ]
    # A fresh registration deadline, then reading again, before the held frames are answered.
    assert [e for e in events if e[0] != "write"] == [("deadline", REGISTER_TIMEOUT), ("resume",)]
    assert h.subscribers.messages == []


def test_a_second_register_held_behind_a_rejected_one_is_tried_next(h: Harness) -> None:
    h.link.take()
    h.register(Register(req=2, client_id="c-1", username="alice", password="right"))
    assert len(h.supervisor.take()) == 1
    h.link.take()
    h.tell(RegisterRejected(1, ErrorCode.AUTH_FAILED, "bad password"))
    assert h.listener.state is State.REGISTERING
    assert errors(h.link.take()) == [(1, ErrorCode.AUTH_FAILED)]
    [request] = h.supervisor.take()
    assert isinstance(request, RegisterRequest) and request.frame.req == 2


# --- protocol errors ------------------------------------------------------------------------


def test_a_fatal_error_before_register_is_answered_after_the_earlier_frames_then_closes(
    h: Harness,
) -> None:
    h.link.take()
    h.read(Subscribe(req=1, topic="t"), GARBAGE, Subscribe(req=2, topic="t"))
    events = h.link.take()
    assert errors(events) == [(1, ErrorCode.NOT_REGISTERED), (None, ErrorCode.BAD_FRAME)]
    assert events[-1] == ("close",)
    h.read(Register(req=3, client_id="c-1", username="alice", password="secret"))
    assert h.link.take() == []  # nothing more is read
    assert h.supervisor.messages == []


def test_a_fatal_error_once_active_ends_the_batch_and_closes_once_answered(h: Harness) -> None:
    h.activate()
    publish = Publish(topic="t", payload=b"x")
    subscribe = Subscribe(req=2, topic="t")
    h.read(publish, subscribe, b"\x00\x01\x00\x00", Subscribe(req=3, topic="t"))  # too large
    [batch] = h.subscribers.take()
    assert isinstance(batch, SessionOps) and batch.close
    assert batch.ops[:2] == (publish, subscribe)
    assert isinstance(batch.ops[2], Error) and batch.ops[2].code == ErrorCode.FRAME_TOO_LARGE
    assert len(batch.ops) == 3
    assert h.link.take() == []  # the SubscriberManager answers, then the Listener closes
    h.read(Ping(req=4))
    assert h.subscribers.messages == []
    h.tell(Outbound(encode(Ok(req=2)) + encode(batch.ops[2]), close=True))
    events = h.link.take()
    assert errors(events) == [(None, ErrorCode.FRAME_TOO_LARGE)]
    assert events[0] == ("write", Ok(req=2))
    assert events[-1] == ("close",)


def test_once_active_a_bad_frame_or_second_register_becomes_an_error_op_in_place(
    h: Harness,
) -> None:
    h.activate()
    ack = Ack(topic="t", seq=1)
    h.register(BAD_SUBSCRIBE, ack, req=5)
    [ops] = ops_of(h.subscribers.take())
    assert [(o.req, o.code) for o in ops[:2] if isinstance(o, Error)] == [
        (5, ErrorCode.BAD_REQUEST),
        (9, ErrorCode.BAD_REQUEST),
    ]
    assert ops[2] == ack
    assert h.supervisor.messages == []


# --- the session's life ---------------------------------------------------------------------


def test_ping_with_health_also_sends_a_heartbeat(h: Harness) -> None:
    h.activate()
    ping = Ping(req=2, status="healthy", details={"load": 1})
    h.read(Ping(req=1), ping)
    assert h.sessions.take() == [Heartbeat(SESSION, CONN_ID, "healthy", {"load": 1})]
    assert ops_of(h.subscribers.take()) == [(Ping(req=1), ping)]


def test_unregister_stops_reading(h: Harness) -> None:
    h.activate()
    unregister = Unregister(req=2)
    h.read(unregister, Subscribe(req=3, topic="t"))
    assert ops_of(h.subscribers.take()) == [(unregister,)]
    assert h.link.take() == [("pause",)]
    h.read(Subscribe(req=4, topic="t"))
    h.tell(Throttle(False))  # no longer reading: a throttle's end does not resume it
    assert h.subscribers.messages == []
    assert h.link.take() == []


def test_throttle_pauses_and_resumes_reading(h: Harness) -> None:
    h.activate()
    h.tell(Throttle(True))
    h.tell(Throttle(False))
    assert h.link.take() == [("pause",), ("resume",)]


def test_the_keepalive_timeout_once_active_answers_timeout_and_closes(h: Harness) -> None:
    h.activate()
    h.listener.on_idle_timeout()
    events = h.link.take()
    assert errors(events) == [(None, ErrorCode.TIMEOUT)]
    assert events[-1] == ("close",)


def test_taken_over_closes_and_reports_nothing_about_the_session(h: Harness) -> None:
    h.activate()
    h.tell(TakenOver("another-session"))  # not ours: ignored
    assert h.link.take() == []
    h.tell(TakenOver(SESSION))
    events = h.link.take()
    assert errors(events) == [(None, ErrorCode.TAKEN_OVER)]
    assert events[-1] == ("close",)
    h.listener.on_closed(None)
    h.settle()
    assert h.sessions.messages == []  # the session lives on another connection now
    assert h.listeners.take() == [ListenerClosed(CONN_ID)]
    assert not h.ref.is_alive()


def test_a_session_ended_by_unregister_is_ended_not_lost(h: Harness) -> None:
    h.activate()
    h.tell(Outbound(b"", close=True, session_ended=True))
    assert h.sessions.take() == [EndSession(SESSION, CONN_ID)]
    assert h.link.take() == [("close",)]
    h.listener.on_closed(None)
    h.settle()
    assert h.sessions.messages == []  # no ConnectionLost follows
    assert h.listeners.take() == [ListenerClosed(CONN_ID)]
    assert not h.ref.is_alive()


def test_a_closed_connection_reports_its_session_lost(h: Harness) -> None:
    h.activate()
    h.listener.on_closed(ConnectionResetError())
    h.settle()
    assert h.listener.state is State.CLOSING
    assert h.sessions.take() == [ConnectionLost(SESSION, CONN_ID)]
    assert h.listeners.take() == [ListenerClosed(CONN_ID)]
    assert not h.ref.is_alive()


def test_credit_is_returned_only_while_the_socket_takes_writes(h: Harness) -> None:
    h.activate()
    h.tell(Outbound(b"", credit=10))
    assert h.subscribers.take() == [Credit(SESSION, CONN_ID, 10)]
    h.link.writable = False
    h.tell(Outbound(b"", credit=100))
    h.tell(Outbound(b"", credit=50))
    h.listener.on_writable(False)
    assert h.subscribers.messages == []
    h.link.writable = True
    h.listener.on_writable(True)
    assert h.subscribers.take() == [Credit(SESSION, CONN_ID, 150)]
    h.listener.on_writable(True)  # nothing owed any more
    assert h.subscribers.messages == []


# --- closed while registering ---------------------------------------------------------------


def test_closed_while_registering_then_attached_reports_the_session_lost(h: Harness) -> None:
    h.register(Subscribe(req=2, topic="t"))
    h.link.take()
    h.listener.on_closed(None)
    h.settle()
    # Alive until the outcome arrives: the session it may be given must not stay "connected".
    assert h.ref.is_alive()
    assert h.listeners.messages == []
    assert h.sessions.messages == []
    h.attach()
    assert h.sessions.take() == [ConnectionLost(SESSION, CONN_ID)]
    assert h.listeners.take() == [ListenerClosed(CONN_ID)]
    h.settle()
    assert not h.ref.is_alive()
    assert h.link.take() == []  # nothing written to a closed socket
    assert h.subscribers.messages == []  # the held frames are dropped


def test_closed_while_registering_then_rejected_just_finishes(h: Harness) -> None:
    h.register()
    h.link.take()
    h.listener.on_closed(None)
    h.settle()
    assert h.ref.is_alive()
    h.tell(RegisterRejected(1, ErrorCode.AUTH_FAILED, "bad password"))
    h.settle()
    assert h.listeners.take() == [ListenerClosed(CONN_ID)]
    assert h.sessions.messages == []
    assert h.link.take() == []
    assert not h.ref.is_alive()


# --- presence (issue 11) ----------------------------------------------------------------------


def test_reads_once_active_report_seen_at_most_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listener_module, "SEEN_INTERVAL", 0.0)
    h = Harness()
    try:
        h.register()
        h.read(Ping(req=5))  # held while registering: no `Seen` before the session exists
        assert h.sessions.messages == []
        h.attach()
        h.link.take()
        h.subscribers.take()
        h.sessions.take()
        before = time.time()
        h.read(Publish(topic="t", payload=b"1"), Publish(topic="t", payload=b"2"), Ping(req=2))
        [seen] = h.sessions.take()  # one per read, not one per frame
        assert isinstance(seen, Seen)
        assert (seen.session_id, seen.conn_id) == (SESSION, CONN_ID)
        assert before <= seen.at <= time.time()
        monkeypatch.setattr(listener_module, "SEEN_INTERVAL", 3600.0)
        h.read(Ping(req=3))  # the interval set by the last `Seen` (0 s) is over
        assert [type(m) for m in h.sessions.take()] == [Seen]
        h.read(Ping(req=4))
        h.read(Ack(topic="t", seq=1))
        assert h.sessions.messages == []  # within the interval now
        assert len(ops_of(h.subscribers.take())) == 4  # every read went on, Seen or not
    finally:
        h.close()


def test_an_operators_disconnect_closes_without_an_error_and_reports_the_session_lost(
    h: Harness,
) -> None:
    h.activate()
    h.tell(CloseConnection("disconnected_by_admin"))
    assert h.link.take() == [("close",)]  # no error frame: nothing went wrong with the client
    h.listener.on_closed(None)
    h.settle()
    assert h.sessions.take() == [ConnectionLost(SESSION, CONN_ID)]
    assert h.listeners.take() == [ListenerClosed(CONN_ID)]


def test_a_session_ended_before_its_grant_arrives_never_goes_live(h: Harness) -> None:
    h.register(Subscribe(req=2, topic="t"))
    h.link.take()
    # The SessionManager bound the session to this connection, then an operator ended it:
    # its `TakenOver` overtakes the SubscriberManager's `SessionAttached`.
    h.tell(TakenOver(SESSION, ErrorCode.SESSION_ENDED, "the broker's operator ended it"))
    assert h.link.take() == []
    h.attach()
    events = h.link.take()
    assert errors(events) == [(None, ErrorCode.SESSION_ENDED)]
    assert not any(e[0] == "write" and isinstance(e[1], Registered) for e in events)
    assert events[-1] == ("close",)
    assert h.subscribers.messages == []  # the held subscribe is dropped
    h.listener.on_closed(None)
    h.settle()
    assert h.sessions.messages == []  # the session is gone: nothing to report lost


def test_an_early_end_is_forgotten_when_the_registration_is_rejected(h: Harness) -> None:
    h.register()
    h.tell(TakenOver(SESSION, ErrorCode.SESSION_ENDED, "ended"))
    h.tell(RegisterRejected(1, ErrorCode.UNKNOWN_SESSION, "ended while stored"))
    h.register(req=2)
    h.attach()
    assert h.listener.state is State.ACTIVE
    assert [e[1] for e in h.link.take() if e[0] == "write" and isinstance(e[1], Registered)]
