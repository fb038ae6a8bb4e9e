"""The sans-IO connection state machine, without any socket: examples, then properties.

The property tests drive the machine with hypothesis: any order of broker frames, app calls,
connects and disconnects must keep its invariants; and against a model of the broker's
session (queues, acks, redelivery, token rotation), every message reaches the application
exactly once and in order, however the connections are cut.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.client import ClientMachine, MachineConfig, Phase, SavedState
from tether.client import events as ev
from tether.client.errors import (
    AuthFailed,
    ClientClosed,
    ConnectionFailed,
    PayloadTooLarge,
    Rejected,
    SessionEnded,
    TakenOver,
)
from tether.protocol import (
    CLIENT_FRAME_TYPES,
    Ack,
    ClientFrame,
    Deliver,
    Dropped,
    Error,
    ErrorCode,
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

CONFIG = MachineConfig(client_id="dev-1", username="alice", password="secret", keepalive=7)


def sent(machine: ClientMachine) -> list[ClientFrame]:
    decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
    decoder.receive_data(machine.data_to_send())
    return list(decoder.frames())  # type: ignore[arg-type]


def registered(req: int, *, resumed: bool = False, token: str = "T1", **kw: Any) -> Registered:
    fields: dict[str, Any] = dict(
        req=req,
        session_id="S1",
        resume_token=token,
        resumed=resumed,
        keepalive=7,
        expiry=300,
        queued=0,
        dropped=0,
    )
    fields.update(kw)
    return Registered(**fields)


def feed(machine: ClientMachine, *frames: Any) -> list[ev.Event]:
    return machine.receive_data(b"".join(encode(f) for f in frames))


def ready(state: SavedState | None = None, **kw: Any) -> tuple[ClientMachine, Register]:
    machine = ClientMachine(CONFIG, state)
    machine.connection_made()
    (reg,) = sent(machine)
    assert isinstance(reg, Register)
    feed(machine, registered(reg.req, **kw))
    assert machine.phase is Phase.READY
    return machine, reg


# --- examples ----------------------------------------------------------------------------


def test_fresh_register_then_queued_requests_in_order() -> None:
    machine = ClientMachine(CONFIG)
    sub_req = machine.subscribe("t")
    assert machine.publish("t", b"x") is None
    pub_req = machine.publish("t", b"y", confirm=True)
    assert sent(machine) == []  # nothing goes out without a connection
    machine.connection_made()
    (reg,) = sent(machine)  # only the register until it is answered
    assert isinstance(reg, Register)
    assert reg.password == "secret" and reg.session_id is None and reg.keepalive == 7
    assert not reg.takeover
    events = feed(machine, registered(reg.req))
    assert events == [ev.Registered("S1", False, 0, 0, 7, 300)]
    assert sent(machine) == [
        Subscribe(req=sub_req, topic="t"),
        Publish(topic="t", payload=b"x"),
        Publish(topic="t", payload=b"y", req=pub_req),
    ]
    assert feed(machine, Ok(req=sub_req), Ok(req=pub_req)) == [
        ev.RequestDone(sub_req),
        ev.RequestDone(pub_req),
    ]


def test_resume_presents_the_newest_token_and_no_password() -> None:
    machine, _ = ready()
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    assert (reg.session_id, reg.resume_token, reg.password) == ("S1", "T1", None)  # type: ignore[union-attr]
    feed(machine, registered(reg.req, resumed=True, token="T2"))  # type: ignore[union-attr]
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    assert reg.resume_token == "T2"  # type: ignore[union-attr]
    # Lost before `registered`: the token presented stays valid, present it again.
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    assert reg.resume_token == "T2"  # type: ignore[union-attr]
    assert machine.snapshot() == SavedState("dev-1", "S1", "T2", {})


def test_unknown_session_registers_afresh_on_the_same_connection_and_resubscribes() -> None:
    state = SavedState("dev-1", "OLD", "TOLD", {"t": 41})
    machine = ClientMachine(CONFIG, state)
    machine.subscribe("t")
    machine.subscribe("u")
    machine.connection_made()
    (reg,) = sent(machine)
    assert isinstance(reg, Register) and reg.session_id == "OLD"
    assert feed(machine, Error(req=reg.req, code="unknown_session", message="gone")) == []
    (fresh,) = sent(machine)
    assert isinstance(fresh, Register)
    assert fresh.session_id is None and fresh.password == "secret" and not fresh.takeover
    events = feed(machine, registered(fresh.req))
    assert isinstance(events[1], ev.SessionLost)
    assert events[1].error.old_session_id == "OLD"  # type: ignore[attr-defined]
    assert [f.topic for f in sent(machine)] == ["t", "u"]  # type: ignore[union-attr]
    # The new session counts from 1 again: seq 1 is new, not a duplicate of the old 41.
    (message,) = feed(machine, Deliver(topic="t", seq=1, payload=b"a"))
    assert isinstance(message, ev.Message) and message.seq == 1


def test_taken_over_ends_the_machine_for_good() -> None:
    machine, _ = ready()
    req = machine.subscribe("t")
    sent(machine)
    events = feed(machine, Error(code="taken_over", message="another connection"))
    assert any(isinstance(e, ev.TakenOver) for e in events)
    failed = [e for e in events if isinstance(e, ev.RequestFailed)]
    assert [f.req for f in failed] == [req] and isinstance(failed[0].error, TakenOver)
    assert isinstance(events[-1], ev.Closed) and isinstance(events[-1].error, TakenOver)
    assert machine.closed
    assert machine.connection_lost() == []
    with pytest.raises(ClientClosed):
        machine.connection_made()
    with pytest.raises(ClientClosed):
        machine.publish("t", b"x")


def test_session_ended_ends_the_machine_for_good_like_a_takeover() -> None:
    machine, _ = ready()
    req = machine.subscribe("t")
    sent(machine)
    events = feed(machine, Error(code="session_ended", message="user removed"))
    [taken] = [e for e in events if isinstance(e, ev.TakenOver)]
    assert isinstance(taken.error, SessionEnded)
    failed = [e for e in events if isinstance(e, ev.RequestFailed)]
    assert [f.req for f in failed] == [req] and isinstance(failed[0].error, SessionEnded)
    assert isinstance(events[-1], ev.Closed) and isinstance(events[-1].error, SessionEnded)
    assert machine.closed and machine.connection_lost() == []
    with pytest.raises(ClientClosed):
        machine.connection_made()  # never reconnects


def test_auth_failed_and_conflict_end_the_machine() -> None:
    for code, error_type in (("auth_failed", AuthFailed), ("conflict", Rejected)):
        machine = ClientMachine(CONFIG)
        machine.connection_made()
        (reg,) = sent(machine)
        (closed,) = feed(machine, Error(req=reg.req, code=code, message="no"))  # type: ignore[union-attr]
        assert isinstance(closed, ev.Closed) and isinstance(closed.error, error_type)
        assert closed.error.code == code  # type: ignore[union-attr]
        assert machine.closed


def test_rate_limited_asks_for_a_new_connection_later() -> None:
    # Once a session was had: a new connection later (see below for the first connect).
    machine, _ = ready()
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    events = feed(machine, Error(req=reg.req, code="rate_limited", message="slow down"))  # type: ignore[union-attr]
    (event,) = events
    assert isinstance(event, ev.Disconnect)
    assert isinstance(event.error, Rejected) and event.error.code == "rate_limited"
    assert "slow down" in str(event.error)
    assert not machine.closed


def test_rate_limited_before_the_first_session_ends_the_machine_with_the_brokers_word() -> None:
    """Issue 9 item 3: only a wrong password is answered `rate_limited`; retrying it until a
    timeout ended in "no answer ... check that the broker runs"."""
    machine = ClientMachine(CONFIG)
    machine.connection_made()
    (reg,) = sent(machine)
    (closed,) = feed(machine, Error(req=reg.req, code="rate_limited", message="slow down"))  # type: ignore[union-attr]
    assert isinstance(closed, ev.Closed) and isinstance(closed.error, Rejected)
    assert closed.error.code == "rate_limited"
    assert "slow down" in str(closed.error) and "check the password" in str(closed.error)
    assert machine.closed


def test_rate_limited_unchecked_is_retried_after_what_the_broker_asked_even_the_first_time() -> (
    None
):
    """Issue 12: a full login queue answers `rate_limited` with `retry_after`, no verdict on
    the password: a client that never had a session tries again instead of giving up."""
    machine = ClientMachine(CONFIG)
    machine.connection_made()
    (reg,) = sent(machine)
    refusal = Error(req=reg.req, code="rate_limited", message="queue full", retry_after=1)  # type: ignore[union-attr]
    (event,) = feed(machine, refusal)
    assert isinstance(event, ev.Disconnect) and event.retry_after == 1
    assert isinstance(event.error, Rejected) and event.error.code == "rate_limited"
    assert not machine.closed
    machine.connection_lost()
    machine.connection_made()
    (again,) = sent(machine)
    assert isinstance(again, Register) and again.password == reg.password  # type: ignore[union-attr]


def test_duplicates_are_dropped_and_acks_follow_what_was_handled() -> None:
    machine, _ = ready()
    feed(machine, Ok(req=machine.subscribe("t")))
    sent(machine)
    messages = feed(machine, *(Deliver(topic="t", seq=s, payload=b"%d" % s) for s in (1, 2, 3)))
    assert [m.seq for m in messages] == [1, 2, 3]  # type: ignore[union-attr]
    machine.flush_acks()
    assert sent(machine) == []  # nothing handled yet: nothing to ack
    machine.handled(messages[0])  # type: ignore[arg-type]
    machine.handled(messages[1])  # type: ignore[arg-type]
    machine.flush_acks()
    assert sent(machine) == [Ack(topic="t", seq=2)]
    machine.handled(messages[2])  # type: ignore[arg-type]
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    feed(machine, registered(reg.req, resumed=True, token="T2"))  # type: ignore[union-attr]
    # 2 and 3 come again: not shown again, but acked on this connection, up to what it got.
    assert feed(machine, Deliver(topic="t", seq=2, payload=b"2", redelivered=True)) == []
    machine.flush_acks()
    assert sent(machine) == [Ack(topic="t", seq=2)]
    assert feed(machine, Deliver(topic="t", seq=3, payload=b"3", redelivered=True)) == []
    machine.flush_acks()
    assert sent(machine) == [Ack(topic="t", seq=3)]
    (m4,) = feed(machine, Deliver(topic="t", seq=4, payload=b"4"))
    assert isinstance(m4, ev.Message) and m4.seq == 4


def test_in_flight_requests_are_sent_again_and_pings_are_not() -> None:
    machine, _ = ready()
    sub = machine.subscribe("t")
    pub = machine.publish("t", b"p", confirm=True)
    ping = machine.ping("degraded", {"disk": 0.93})
    assert sent(machine)[-1] == Ping(req=ping, status="degraded", details={"disk": 0.93})
    events = machine.connection_lost()
    # (Issue 9 item 7 added the `Disconnected` of the session's connection.)
    assert [type(e) for e in events] == [ev.Disconnected, ev.RequestFailed]
    assert events[1].req == ping  # type: ignore[union-attr]
    assert machine.ping() is None  # no ping without a connection
    later = machine.publish("t", b"later")
    assert later is None
    machine.connection_made()
    (reg,) = sent(machine)
    feed(machine, registered(reg.req, resumed=True))  # type: ignore[union-attr]
    assert sent(machine) == [
        Subscribe(req=sub, topic="t"),
        Publish(topic="t", payload=b"p", req=pub),
        Publish(topic="t", payload=b"later"),
    ]


def test_a_fresh_register_whose_answer_was_lost_takes_its_orphan_over() -> None:
    machine = ClientMachine(CONFIG)
    machine.connection_made()
    sent(machine)
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    assert isinstance(reg, Register) and reg.takeover and reg.session_id is None
    feed(machine, registered(reg.req))
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    assert isinstance(reg, Register) and reg.session_id == "S1" and not reg.takeover


def test_takeover_option_is_used_only_for_the_first_registration() -> None:
    machine = ClientMachine(MachineConfig(client_id="c", username="u", password="p", takeover=True))
    machine.connection_made()
    (reg,) = sent(machine)
    assert isinstance(reg, Register) and reg.takeover
    feed(machine, registered(reg.req))
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    feed(machine, Error(req=reg.req, code="unknown_session", message="gone"))  # type: ignore[union-attr]
    (fresh,) = sent(machine)
    assert isinstance(fresh, Register) and fresh.session_id is None and not fresh.takeover


def test_unregister_completes_even_if_its_ok_was_lost() -> None:
    machine, _ = ready()
    req = machine.unregister()
    assert sent(machine) == [Unregister(req=req)]
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    events = feed(machine, Error(req=reg.req, code="unknown_session", message="ended"))  # type: ignore[union-attr]
    assert events == [ev.RequestDone(req), ev.Closed(None)]
    assert machine.snapshot().session_id is None


def test_unregister_ok_closes_cleanly() -> None:
    machine, _ = ready()
    req = machine.unregister()
    sent(machine)
    assert feed(machine, Ok(req=req)) == [ev.RequestDone(req), ev.Closed(None)]


def test_stats_waits_for_a_session_and_its_answer_carries_the_counters() -> None:
    machine = ClientMachine(CONFIG)
    req = machine.stats()
    machine.connection_made()
    (reg,) = sent(machine)
    feed(machine, registered(reg.req))  # type: ignore[union-attr]
    assert sent(machine) == [Stats(req=req)]
    counters = {"sessions": 1, "queued": 0}
    assert feed(machine, StatsResult(req=req, stats=counters)) == [ev.RequestDone(req, counters)]
    assert machine.pending_requests == frozenset()


def test_drops_reach_the_application() -> None:
    machine, _ = ready(dropped=5)
    assert feed(machine, Dropped(topic="t", count=2)) == [ev.Dropped("t", 2)]
    machine2 = ClientMachine(CONFIG)
    machine2.connection_made()
    (reg,) = sent(machine2)
    events = feed(machine2, registered(reg.req, dropped=5))  # type: ignore[union-attr]
    assert events[-1] == ev.Dropped(None, 5)


def test_a_broken_stream_asks_for_a_new_connection() -> None:
    machine, _ = ready()
    (event,) = machine.receive_data(b"\x00\x00\x00\x00")
    assert isinstance(event, ev.Disconnect)


def test_unknown_frame_types_from_a_newer_broker_are_ignored() -> None:
    machine, _ = ready()
    from tether.protocol import encode_map

    assert machine.receive_data(encode_map({"type": "future_thing", "x": 1})) == []
    assert feed(machine, Pong(req=None)) == []


def test_errors_answer_their_request() -> None:
    machine, _ = ready()
    req = machine.unsubscribe("t")
    sent(machine)
    (failed,) = feed(machine, Error(req=req, code="bad_request", message="no"))
    assert isinstance(failed, ev.RequestFailed) and failed.req == req
    assert isinstance(failed.error, Rejected) and failed.error.code == "bad_request"
    (other,) = feed(machine, Error(code="bad_request", message="publish without req"))
    assert other == ev.BrokerError("bad_request", "publish without req")


def test_state_records_handled_not_received() -> None:
    machine, _ = ready()
    machine.subscribe("t")
    m1, _m2 = feed(machine, *(Deliver(topic="t", seq=s, payload=b"") for s in (1, 2)))
    machine.handled(m1)  # type: ignore[arg-type]
    state = machine.take_state()
    assert state == SavedState("dev-1", "S1", "T1", {"t": 1})
    assert machine.take_state() is None  # unchanged since


def test_invalid_values_fail_at_the_call() -> None:
    with pytest.raises(ValueError):
        ClientMachine(MachineConfig(client_id="", username="u", password="p"))
    machine = ClientMachine(CONFIG)
    with pytest.raises(ValueError):
        machine.publish("$sys", b"")
    with pytest.raises(ValueError):
        machine.subscribe("x" * 257)
    assert machine.topics == ()


# --- property: any order of frames and disconnects ---------------------------------------

TOPICS = ["a", "b"]

_reqs = st.integers(0, 40)
_broker_frames = st.one_of(
    st.builds(
        lambda req, resumed, token, dropped: registered(
            req, resumed=resumed, token=token, dropped=dropped
        ),
        _reqs,
        st.booleans(),
        st.sampled_from(["T1", "T2", "T3"]),
        st.integers(0, 3),
    ),
    st.builds(Ok, req=_reqs),
    st.builds(Pong, req=st.none() | _reqs),
    st.builds(
        Deliver,
        topic=st.sampled_from(TOPICS),
        seq=st.integers(1, 12),
        payload=st.binary(max_size=3),
        redelivered=st.booleans(),
    ),
    st.builds(Dropped, topic=st.sampled_from(TOPICS), count=st.integers(1, 3)),
    st.builds(
        Error,
        req=st.none() | _reqs,
        code=st.sampled_from(
            [
                "bad_request",
                "unknown_session",
                "auth_failed",
                "conflict",
                "rate_limited",
                "taken_over",
                "timeout",
                "not_registered",
                "something_new",
            ]
        ),
        message=st.just("x"),
    ),
)

_steps = st.lists(
    st.one_of(
        st.tuples(st.just("frame"), _broker_frames),
        st.tuples(st.just("frame_for_pending"), st.sampled_from(["ok", "error", "registered"])),
        st.tuples(st.just("connect"), st.none()),
        st.tuples(st.just("lost"), st.none()),
        st.tuples(st.just("subscribe"), st.sampled_from(TOPICS)),
        st.tuples(st.just("unsubscribe"), st.sampled_from(TOPICS)),
        st.tuples(st.just("publish"), st.booleans()),
        st.tuples(st.just("ping"), st.none()),
        st.tuples(st.just("handle"), st.integers(0, 5)),
        st.tuples(st.just("flush"), st.none()),
        st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=6)),
        st.tuples(st.just("unregister"), st.none()),
        st.tuples(st.just("close"), st.none()),
    ),
    max_size=60,
)


class _Observer:
    """Checks the machine's output against the protocol's rules, step by step."""

    def __init__(self, machine: ClientMachine) -> None:
        self.m = machine
        self.connected = False
        self.registered_here = False
        self.delivered: dict[str, int] = {}  # highest seq the broker sent on this connection
        self.acked: dict[str, int] = {}
        self.shown: dict[tuple[int, str], int] = {}
        self.unhandled: list[ev.Message] = []
        self.handled: dict[str, int] = {}
        self.token: str | None = None
        self.closed = False

    def output(self) -> None:
        frames = sent(self.m)
        if frames:
            assert self.connected or self.closed, frames
        for frame in frames:
            if isinstance(frame, Register):
                assert not self.registered_here, "a second register on a registered connection"
                if frame.session_id is not None:
                    assert frame.resume_token == self.m.resume_token
                    assert frame.password is None
                else:
                    assert frame.password == "secret"
                continue
            if isinstance(frame, Ack):
                # An ack settles only what it may: handled, and sent on this connection.
                assert frame.seq <= self.handled.get(frame.topic, 0)
                assert frame.seq <= self.delivered.get(frame.topic, 0)
                assert frame.seq > self.acked.get(frame.topic, 0), "acks only move forward"
                self.acked[frame.topic] = frame.seq
            assert self.registered_here or self.closed, f"{frame} before registration"

    def events(self, events: list[ev.Event]) -> None:
        for event in events:
            assert not self.closed, f"{event} after Closed"
            if isinstance(event, ev.Registered):
                self.registered_here = True
                if not event.resumed:
                    self.handled.clear()
            elif isinstance(event, ev.Message):
                key = (event.epoch, event.topic)
                assert event.seq > self.shown.get(key, 0), "shown twice or out of order"
                self.shown[key] = event.seq
                self.unhandled.append(event)
            elif isinstance(event, ev.Closed):
                self.closed = True
                assert self.m.closed


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_steps)
def test_any_order_of_frames_and_disconnects_keeps_the_invariants(
    steps: list[tuple[str, Any]],
) -> None:
    machine = ClientMachine(CONFIG)
    obs = _Observer(machine)
    for action, arg in steps:
        try:
            if action == "connect":
                if machine.phase is not Phase.IDLE:
                    continue
                machine.connection_made()
                obs.connected, obs.registered_here = True, False
                obs.delivered.clear()
                obs.acked.clear()
            elif action == "lost":
                obs.events(machine.connection_lost())
                obs.connected = obs.registered_here = False
                assert machine.phase in (Phase.IDLE, Phase.CLOSED)
            elif action == "frame":
                if isinstance(arg, Deliver) and machine.phase is Phase.READY:
                    seq = max(obs.delivered.get(arg.topic, 0), arg.seq)
                    obs.delivered[arg.topic] = seq
                obs.events(feed(machine, arg))
            elif action == "frame_for_pending":
                pending = sorted(machine.pending_requests)
                if machine.phase is Phase.REGISTERING and arg == "registered":
                    # Answer the register: its req is the last one handed out.
                    reg_req = machine._register_req
                    assert reg_req is not None
                    obs.events(feed(machine, registered(reg_req, token=f"T{len(steps)}")))
                elif pending and arg == "ok":
                    obs.events(feed(machine, Ok(req=pending[0])))
                elif pending and arg == "error":
                    obs.events(feed(machine, Error(req=pending[0], code="bad_request", message="")))
            elif action == "subscribe":
                machine.subscribe(arg)
            elif action == "unsubscribe":
                machine.unsubscribe(arg)
            elif action == "publish":
                machine.publish("a", b"p", confirm=arg)
            elif action == "ping":
                assert (machine.ping("healthy") is None) == (machine.phase is not Phase.READY)
            elif action == "handle":
                for message in obs.unhandled[:arg]:
                    machine.handled(message)
                    if message.epoch == machine._epoch:
                        obs.handled[message.topic] = max(
                            obs.handled.get(message.topic, 0), message.seq
                        )
                del obs.unhandled[:arg]
            elif action == "flush":
                machine.flush_acks()
            elif action == "garbage":
                obs.events(machine.receive_data(arg))
            elif action == "unregister":
                machine.unregister()
            elif action == "close":
                obs.events(machine.close())
        except ClientClosed:
            assert machine.closed
        obs.output()
        assert machine.buffered >= 0
        if machine.closed:
            assert machine.pending_requests == frozenset()


# --- property: exactly once, in order, against a model of the broker ---------------------


class _BrokerModel:
    """One session as the broker keeps it: per topic a queue with seqs, a delivery window
    and cumulative acks; unacked deliveries go out again after a reconnect; the resume
    token rotates and the presented one stays valid until the new one is used."""

    def __init__(self, topics: list[str], window: int) -> None:
        self.topics = {t: {"next": 1, "acked": 0, "sent": 0} for t in topics}
        self.subscribed: set[str] = set()
        self.window = window
        self.valid_tokens: set[str] = set()
        self.tokens_issued = 0
        self.session: str | None = None
        self.connected = False
        self.registered = False
        self.to_client = bytearray()
        self.decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)

    def connect(self) -> None:
        self.connected, self.registered = True, False
        self.to_client.clear()
        self.decoder = FrameDecoder(accept=CLIENT_FRAME_TYPES)
        for q in self.topics.values():
            q["sent"] = q["acked"]  # unacked deliveries are sent again

    def cut(self) -> None:
        self.connected = self.registered = False
        self.to_client.clear()

    def _token(self) -> str:
        self.tokens_issued += 1
        return f"T{self.tokens_issued}"

    def from_client(self, data: bytes) -> None:
        self.decoder.receive_data(data)
        for frame in self.decoder.frames():
            if isinstance(frame, Register):
                token = self._token()
                if frame.session_id is None:
                    assert self.session is None, "a fresh register for a live session"
                    self.session, resumed = "S", False
                    self.valid_tokens = {token}
                else:
                    assert frame.session_id == self.session
                    assert frame.resume_token in self.valid_tokens, "an invalid token"
                    self.valid_tokens = {frame.resume_token, token}  # type: ignore[arg-type]
                    resumed = True
                self.registered = True
                self.to_client += encode(
                    Registered(
                        req=frame.req,
                        session_id="S",
                        resume_token=token,
                        resumed=resumed,
                        keepalive=30,
                        expiry=300,
                        queued=0,
                        dropped=0,
                    )
                )
            elif isinstance(frame, Subscribe | Unsubscribe):
                assert self.registered
                if isinstance(frame, Subscribe):
                    self.subscribed.add(frame.topic)
                self.to_client += encode(Ok(req=frame.req))
            elif isinstance(frame, Ack):
                assert self.registered
                q = self.topics[frame.topic]
                q["acked"] = max(q["acked"], min(frame.seq, q["sent"]))
            elif isinstance(frame, Ping):
                self.to_client += encode(Pong(req=frame.req))

    def publish(self, topic: str) -> None:
        if topic in self.subscribed:
            self.topics[topic]["next"] += 1

    def deliver(self, topic: str, count: int) -> None:
        q = self.topics[topic]
        if not self.registered or topic not in self.subscribed:
            return
        for _ in range(count):
            seq = q["sent"] + 1
            if seq >= q["next"] or seq - q["acked"] > self.window:
                return
            q["sent"] = seq
            redelivered = False  # the flag does not matter to dedup
            self.to_client += encode(
                Deliver(topic=topic, seq=seq, payload=b"%d" % seq, redelivered=redelivered)
            )

    def take(self, n: int) -> bytes:
        data = bytes(self.to_client[:n])
        del self.to_client[:n]
        return data


_ACTIONS = (
    ["publish"] * 3
    + ["deliver"] * 3
    + ["pump"] * 4
    + ["handle"] * 3
    + ["flush", "cut", "reconnect", "bounce", "bounce", "bounce", "ping"]
)
_model_steps = st.lists(
    st.tuples(st.sampled_from(_ACTIONS), st.sampled_from(TOPICS), st.integers(1, 40)),
    min_size=10,
    max_size=150,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_model_steps, window=st.integers(1, 6))
def test_every_message_once_and_in_order_however_connections_are_cut(
    steps: list[tuple[str, str, int]], window: int
) -> None:
    machine = ClientMachine(CONFIG)
    broker = _BrokerModel(TOPICS, window)
    for topic in TOPICS:
        machine.subscribe(topic)
    unhandled: list[ev.Message] = []
    got: dict[str, list[int]] = {t: [] for t in TOPICS}

    def pump(n: int = 1 << 30) -> None:
        # Client to broker in full (it is small), broker to client up to n bytes.
        if broker.connected:
            broker.from_client(machine.data_to_send())
            data = broker.take(n)
            for event in machine.receive_data(data):
                if isinstance(event, ev.Message):
                    unhandled.append(event)
                assert not isinstance(event, ev.Closed | ev.SessionLost | ev.Disconnect)
            broker.from_client(machine.data_to_send())

    def connect() -> None:
        broker.connect()
        machine.connection_made()

    def handle(n: int) -> None:
        for message in unhandled[:n]:
            got[message.topic].append(int(message.payload))
            machine.handled(message)
        del unhandled[:n]

    # The first registration succeeds (a fresh one lost on the way is another test's case).
    connect()
    pump()
    for action, topic, n in steps:
        if action == "publish":
            for _ in range(n % 8 + 1):
                broker.publish(topic)
        elif action == "deliver":
            broker.deliver(topic, n)
        elif action == "pump":
            pump(n * 3)
        elif action == "handle":
            handle(n % 4 + 1)
        elif action == "flush":
            machine.flush_acks()
            pump(0)
        elif action == "ping":
            machine.ping("healthy")
        if action in ("cut", "bounce") and broker.connected:
            broker.cut()
            machine.connection_lost()
        if action in ("reconnect", "bounce") and not broker.connected:
            connect()
    # Then the network heals: everything still queued arrives and is handled.
    if not broker.connected:
        connect()
    for _ in range(10_000):
        pump()
        for topic in TOPICS:
            broker.deliver(topic, 1000)
        pump()
        handle(len(unhandled))
        machine.flush_acks()
        pump()
        if all(q["acked"] == q["next"] - 1 for q in broker.topics.values()):
            break
    for topic in TOPICS:
        q = broker.topics[topic]
        published = q["next"] - 1
        assert got[topic] == list(range(1, published + 1)), topic
        assert q["acked"] == published, "the broker still holds unacked deliveries"


# --- issue 9: frame limits, loops that must not be, transitions ---------------------------

LIMIT = 1000
SMALL = MachineConfig(client_id="dev-1", username="alice", password="secret", max_frame=LIMIT)


def _publish_size(topic: str, payload: bytes, req: int | None = None) -> int:
    return len(encode(Publish(topic=topic, payload=payload, req=req))) - 4


def test_a_publish_over_the_limit_is_refused_at_the_call_and_nothing_is_queued() -> None:
    machine = ClientMachine(SMALL)
    fits = b"x" * (LIMIT - _publish_size("t", b"x" * 300) + 300)  # (bin16 header at 300)
    assert _publish_size("t", fits) == LIMIT
    machine.publish("t", fits)  # exactly the limit: accepted
    before = machine.buffered
    with pytest.raises(PayloadTooLarge) as info:
        machine.publish("t", fits + b"x")
    assert info.value.size == LIMIT + 1 and info.value.limit == LIMIT
    assert f"{LIMIT + 1} bytes" in str(info.value) and f"limit of {LIMIT}" in str(info.value)
    with pytest.raises(PayloadTooLarge):
        machine.publish("t", b"x" * LIMIT, confirm=True)  # the limit itself: the frame is more
    assert machine.buffered == before and machine.pending_requests == frozenset()
    machine.connection_made()
    (reg,) = sent(machine)
    feed(machine, registered(reg.req))  # type: ignore[union-attr]
    assert sent(machine) == [Publish(topic="t", payload=fits)]
    with pytest.raises(PayloadTooLarge):
        machine.publish("t", fits + b"x")
    assert sent(machine) == []


def test_the_announced_limit_rules_what_is_sent_and_received() -> None:
    machine = ClientMachine(SMALL)
    machine.connection_made()
    (reg,) = sent(machine)
    big = b"y" * (4 * LIMIT)
    # `registered` and a large delivery right behind it, in one read: the delivery is judged
    # by the limit `registered` announced, not by the configured one.
    events = machine.receive_data(
        encode(registered(reg.req, max_frame=8 * LIMIT))  # type: ignore[union-attr]
        + encode(Deliver(topic="t", seq=1, payload=big))
    )
    assert [type(e) for e in events] == [ev.Registered, ev.Message]
    assert events[1].payload == big  # type: ignore[union-attr]
    assert machine.max_frame == 8 * LIMIT
    req = machine.publish("t", big, confirm=True)
    assert sent(machine) == [Publish(topic="t", payload=big, req=req)]
    with pytest.raises(PayloadTooLarge) as info:
        machine.publish("t", big * 2)
    assert info.value.limit == 8 * LIMIT


def test_requests_queued_under_a_larger_limit_fail_when_a_smaller_one_is_announced() -> None:
    machine = ClientMachine(SMALL)
    small = machine.publish("t", b"small", confirm=True)
    big = machine.publish("t", b"z" * 600, confirm=True)
    machine.publish("t", b"w" * 600)
    machine.connection_made()
    (reg,) = sent(machine)
    events = feed(machine, registered(reg.req, max_frame=500))  # type: ignore[union-attr]
    failed = [e for e in events if isinstance(e, ev.RequestFailed)]
    assert [e.req for e in failed] == [big]
    assert isinstance(failed[0].error, PayloadTooLarge) and failed[0].error.limit == 500
    (refused,) = [e for e in events if isinstance(e, ev.Refused)]
    assert isinstance(refused.error, PayloadTooLarge)
    assert sent(machine) == [Publish(topic="t", payload=b"small", req=small)]
    assert machine.pending_requests == frozenset({small})


def test_a_frame_the_broker_refuses_as_too_large_fails_its_request_and_is_never_sent_again() -> (
    None
):
    """Issue 9 item 1: the same oversized frame went out again at every reconnect."""
    machine, _ = ready()  # the broker did not announce its limit (an older broker)
    big = b"b" * 5000
    first = machine.publish("t", b"ok", confirm=True)
    req = machine.publish("t", big, confirm=True)
    after = machine.publish("t", b"after", confirm=True)
    sent(machine)
    size = _publish_size("t", big, req)
    message = f"frame of {size} bytes exceeds the limit of 4096 bytes"
    events = feed(machine, Ok(req=first), Error(code="frame_too_large", message=message))
    assert events[0] == ev.RequestDone(first)
    (failed,) = events[1:]
    assert isinstance(failed, ev.RequestFailed) and failed.req == req
    assert isinstance(failed.error, PayloadTooLarge)
    assert (failed.error.size, failed.error.limit) == (size, 4096)
    # The broker closes the connection; on the next one the refused frame is not sent again.
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    feed(machine, registered(reg.req, resumed=True))  # type: ignore[union-attr]
    assert sent(machine) == [Publish(topic="t", payload=b"after", req=after)]
    assert machine.max_frame == 4096
    with pytest.raises(PayloadTooLarge):
        machine.publish("t", big)


def test_a_refusal_without_sizes_blames_the_largest_unanswered_frame() -> None:
    machine, _ = ready()
    small = machine.publish("t", b"s", confirm=True)
    big = machine.publish("t", b"b" * 3000, confirm=True)
    sent(machine)
    (failed,) = feed(machine, Error(code="frame_too_large", message="too big"))
    assert isinstance(failed, ev.RequestFailed) and failed.req == big
    assert machine.pending_requests == frozenset({small})
    # A fire-and-forget one has no request to fail: the application hears of it as an error.
    machine2, _ = ready()
    machine2.publish("t", b"b" * 3000)
    sent(machine2)
    assert feed(machine2, Error(code="frame_too_large", message="too big")) == [
        ev.BrokerError("frame_too_large", "too big")
    ]
    with pytest.raises(PayloadTooLarge):
        machine2.publish("t", b"b" * 3000)


def test_failures_that_would_repeat_on_every_connection_end_the_machine() -> None:
    # A register too large for the broker (its metadata): refused at once, or by the broker.
    with pytest.raises(PayloadTooLarge, match="metadata"):
        ClientMachine(replace(SMALL, metadata={"x": "m" * LIMIT}))
    machine = ClientMachine(CONFIG)
    machine.connection_made()
    sent(machine)
    (closed,) = feed(machine, Error(code="frame_too_large", message="frame of 9 bytes ..."))
    assert isinstance(closed, ev.Closed) and isinstance(closed.error, Rejected)
    assert "metadata" in str(closed.error)
    # A delivery larger than the client accepts (an older broker that does not announce its
    # limit, and a client configured below it): it would be redelivered on every connection.
    machine, _ = ready()
    machine.subscribe("t")
    events = feed(machine, Deliver(topic="t", seq=1, payload=b"p" * (2 << 20)))
    (closed,) = [e for e in events if isinstance(e, ev.Closed)]
    assert isinstance(closed.error, PayloadTooLarge) and "max_frame" in str(closed.error)
    assert machine.closed


def test_something_else_than_a_broker_ends_the_first_connect() -> None:
    machine = ClientMachine(CONFIG)
    machine.connection_made()
    sent(machine)
    (closed,) = machine.receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert isinstance(closed, ev.Closed) and isinstance(closed.error, ConnectionFailed)
    assert "not answer as a Tether broker" in str(closed.error)


def test_a_stream_broken_the_same_way_again_and_again_ends_the_machine() -> None:
    machine, _ = ready()
    outcomes = []
    for _ in range(3):
        outcomes.append(machine.receive_data(b"\x00\x00\x00\x00"))
        if machine.closed:
            break
        machine.connection_lost()
        machine.connection_made()
        (reg,) = sent(machine)
        feed(machine, registered(reg.req, resumed=True))  # type: ignore[union-attr]
    assert [type(e) for e in outcomes[0]] == [ev.Disconnect]
    assert [type(e) for e in outcomes[1]] == [ev.Disconnect]
    (closed,) = outcomes[2]
    assert isinstance(closed, ev.Closed) and "3 connections in a row" in str(closed.error)
    # Progress between two breaks (a message shown) starts the count again.
    machine, _ = ready()
    for seq in range(1, 6):
        assert [type(e) for e in machine.receive_data(b"\x00\x00\x00\x00")] == [ev.Disconnect]
        machine.connection_lost()
        machine.connection_made()
        (reg,) = sent(machine)
        feed(machine, registered(reg.req, resumed=True), Deliver(topic="t", seq=seq, payload=b""))  # type: ignore[union-attr]
    assert not machine.closed


def test_disconnected_and_reconnected_once_per_transition() -> None:
    """Issue 9 item 7: one event when the session's connection is lost, one when it is back;
    none for the attempts between."""
    machine = ClientMachine(CONFIG)
    machine.connection_made()
    assert machine.connection_lost("refused") == []  # never held a session: no transition
    machine.connection_made()
    (reg,) = sent(machine)
    events = feed(machine, registered(reg.req))  # type: ignore[union-attr]
    assert [type(e) for e in events] == [ev.Registered]  # the first session: no Reconnected
    assert machine.connection_lost("reset by peer") == [ev.Disconnected("reset by peer")]
    for _ in range(3):  # attempts that fail while registering: nothing more
        machine.connection_made()
        sent(machine)
        assert machine.connection_lost("closed") == []
    machine.connection_made()
    (reg,) = sent(machine)
    events = feed(machine, registered(reg.req, resumed=True, queued=4))  # type: ignore[union-attr]
    assert [type(e) for e in events] == [ev.Registered, ev.Reconnected]
    assert events[1] == ev.Reconnected(resumed=True, queued=4)
    # A session gone while away: back with a new one, told as not resumed.
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    feed(machine, Error(req=reg.req, code="unknown_session", message="gone"))  # type: ignore[union-attr]
    (fresh,) = sent(machine)
    events = feed(machine, registered(fresh.req))  # type: ignore[union-attr]
    assert ev.Reconnected(resumed=False, queued=0) in events
    assert any(isinstance(e, ev.SessionLost) for e in events)
    # Closing is not a disconnection.
    machine.close()
    assert machine.connection_lost() == []


def test_the_auth_failed_hint_points_at_the_users_file_not_at_user_add() -> None:
    """Issue 9 item 4."""
    machine = ClientMachine(CONFIG)
    machine.connection_made()
    (reg,) = sent(machine)
    (closed,) = feed(machine, Error(req=reg.req, code="auth_failed", message="wrong"))  # type: ignore[union-attr]
    text = str(closed.error)  # type: ignore[union-attr]
    assert "tether user add" not in text
    assert "users file" in text and "'alice'" in text and "password" in text


def test_a_ping_whose_health_details_are_too_large_is_refused_at_the_call() -> None:
    machine = ClientMachine(SMALL)
    machine.connection_made()
    (reg,) = sent(machine)
    feed(machine, registered(reg.req))  # type: ignore[union-attr]
    with pytest.raises(PayloadTooLarge, match="health details"):
        machine.ping("degraded", {"log": "x" * LIMIT})
    assert sent(machine) == [] and machine.pending_requests == frozenset()
    req = machine.ping("degraded")
    assert sent(machine) == [Ping(req=req, status="degraded")]


def test_unavailable_keeps_the_request_and_retries_it_when_told() -> None:
    """`unavailable` (the broker's store is failing) is retried after a backoff, not failed:
    the machine asks for the retry, sends the same frame again on `retry`, and the caller
    hears only the final answer."""
    machine, _ = ready()
    req = machine.publish("t", b"x", confirm=True)
    assert req is not None
    (first,) = sent(machine)
    events = feed(machine, Error(req=req, code=ErrorCode.UNAVAILABLE, message="disk full"))
    assert events == [ev.RetryLater(req, 0)]
    assert req in machine.pending_requests and sent(machine) == []
    machine.retry(req)
    assert sent(machine) == [first]
    assert feed(machine, Error(req=req, code=ErrorCode.UNAVAILABLE, message="still")) == [
        ev.RetryLater(req, 1)  # the next attempt backs off further
    ]
    machine.retry(req)
    machine.retry(req)  # a second call for the same wait sends nothing more
    assert sent(machine) == [first]
    assert feed(machine, Ok(req=req)) == [ev.RequestDone(req)]
    machine.retry(req)  # answered: nothing to retry
    assert sent(machine) == [] and req not in machine.pending_requests


def test_a_request_waiting_for_its_retry_goes_out_after_a_reconnect() -> None:
    machine, _ = ready()
    req = machine.subscribe("t")
    (frame,) = sent(machine)
    feed(machine, Error(req=req, code=ErrorCode.UNAVAILABLE, message="disk full"))
    machine.connection_lost()
    machine.connection_made()
    (reg,) = sent(machine)
    assert isinstance(reg, Register)
    feed(machine, registered(reg.req, resumed=True, token="T2"))
    assert sent(machine) == [frame]  # not left waiting for a retry that belongs to the old link
    machine.retry(req)  # the old timer fires later: nothing twice
    assert sent(machine) == []
