"""Stateful property test of sessions: the real SessionManager and SubscriberManager actors.

Theory of operation: the two managers run on an asyncio loop in a thread, exactly as the broker
runs them, but no sockets are involved. Each simulated connection is a small `FakeListener`
actor on the same loop that records everything the broker sends it and hands delivery credit
straight back, as a real Listener does once its socket has taken the bytes. The test plays the
rest of the Listener's part: it sends `OpenSession`, `SessionOps` and `ConnectionLost` itself.
The SessionManager's cleanup timers go through an injected fake `call_later`, so a rule can
fire one at will (or fire a stale one again).

After every step the test waits for the actors to go quiet with asks only, never sleeps:
messages flow SessionManager -> SubscriberManager -> listener -> (credit) SubscriberManager,
all on one loop with FIFO inboxes, so asking each in that order in rounds, until the listeners
received nothing new in a round, leaves nothing in flight.

The model keeps, per session and topic, every message published to it since it subscribed
(`payloads` by the seq the broker must give it), what the client has acked, the highest seq
the broker has sent and the highest the client has seen (a delivery that reaches a connection
whose socket already died counts as sent, not seen). Every delivery is checked as it is
decoded: each connection receives a topic's messages as one contiguous run from the oldest
unacked, so a resume drains the queue before anything newer; every payload is the one
published under that seq (so a duplicate, seq <= the highest seen, repeats the first one);
a seq sent before must be flagged `redelivered` and a new one must not. After each step a
connected subscriber must have seen every message of its topics (no gaps after dedup), and
the broker's counters (sessions, queued messages, deliveries) must match the model, so an
expired, taken-over or unregistered session holds nothing; a resume's `registered.queued` is
the model's count of unsent plus unacked messages. The SubscriberManager owns those counters;
the SessionManager reports none, so the test asks it (a subclass that answers one more question)
how many sessions its own tables hold, which must match too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pykka import ActorDeadError, ActorRef

from tether.broker.loop_actor import LoopActor, tell
from tether.broker.messages import (
    ConnectionLost,
    ConnHandle,
    Credit,
    EndSession,
    GetStats,
    ListSessions,
    OpenSession,
    Outbound,
    RegisterRejected,
    SessionAttached,
    SessionOps,
    TakenOver,
)
from tether.broker.sessions import SessionManager
from tether.broker.store import Snapshot
from tether.broker.store_memory import MemoryStore
from tether.broker.subscribers import SubscriberManager
from tether.protocol import (
    BROKER_FRAME_TYPES,
    Ack,
    ClientFrame,
    Deliver,
    Dropped,
    Error,
    ErrorCode,
    FrameDecoder,
    Ok,
    Pong,
    Publish,
    Register,
    Registered,
    Subscribe,
    Unregister,
    Unsubscribe,
)

CLIENTS = ("c0", "c1", "c2")
TOPICS = ("t0", "t1")
USER = "alice"
OTHER_USER = "bob"
EXPIRY = 300
ASK_TIMEOUT = 10.0
BIG_FRAME = 1 << 24
QUEUE_LIMIT = 10_000  # far above the publishes of one example: nothing may ever drop

payloads = st.binary(max_size=16)
picks = st.integers(0, 11)  # index into whatever candidates a rule has, modulo their number


# --- the fake Listener --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Close:
    """The simulated socket closed: nothing arriving after this reaches the client."""


@dataclass(frozen=True, slots=True)
class _Size:
    pass


@dataclass(frozen=True, slots=True)
class _Records:
    start: int


class FakeListener(LoopActor):
    """Records what the broker sends one connection; gives credit back like a Listener."""

    def __init__(
        self, loop: Any, loop_thread: int, *, conn_id: int, subscribers: Any, sessions: Any
    ) -> None:
        super().__init__(loop, loop_thread)
        self._conn_id = conn_id
        self._subscribers = subscribers
        self._sessions = sessions
        self._session_id: str | None = None
        self._closed = False
        self._credits = 0
        # (kind, closed-when-received, details...)
        self._records: list[tuple[Any, ...]] = []

    def on_receive(self, message: Any) -> Any:
        match message:
            case Outbound(data=data, credit=credit, close=close, session_ended=ended):
                self._records.append(("out", self._closed, data, close))
                if credit and not self._closed and self._session_id is not None:
                    self._credits += 1
                    tell(self._subscribers, Credit(self._session_id, self._conn_id, credit))
                if ended and self._session_id is not None:
                    # As the Listener: the unregistered session is ended, not lost.
                    tell(self._sessions, EndSession(self._session_id, self._conn_id))
                    self._session_id = None
                if close:
                    self._closed = True
            case SessionAttached(session_id=session_id, registered=registered):
                self._records.append(("attached", self._closed, session_id, registered))
                self._session_id = session_id
            case RegisterRejected():
                self._records.append(("rejected", self._closed, message))
            case TakenOver(session_id=session_id):
                self._records.append(("taken_over", self._closed, session_id))
                if session_id == self._session_id:
                    self._session_id = None
                    self._closed = True
            case _Close():
                self._closed = True
            case _Size():
                return (len(self._records), self._credits)
            case _Records(start):
                return self._records[start:]
            case _:
                # Nothing else is expected here (a publisher told to wait, say, would be a
                # queue overflow this test never provokes): recorded, and the model fails.
                self._records.append(("other", self._closed, message))
        return None


@dataclass(frozen=True, slots=True)
class _Tables:
    pass


@dataclass(frozen=True, slots=True)
class _Timers:
    pass


class ObservedSessionManager(SessionManager):
    """The real SessionManager, which also answers `_Tables`: how many sessions it holds, and
    how many `client_id`s it maps to one (its state, read on its own thread, in its turn);
    and `_Timers`: each session's cleanup timer (after a restart, to tell them apart)."""

    def on_receive(self, message: object) -> object:
        if isinstance(message, _Tables):
            return (len(self._sessions), len(self._by_client))
        if isinstance(message, _Timers):
            return {sid: s.timer for sid, s in self._sessions.items()}
        return super().on_receive(message)


# --- the fake cleanup timers --------------------------------------------------------------


@dataclass(eq=False)
class FakeTimer:
    delay: float
    callback: Callable[[], None]
    cancelled: bool = False
    fired: int = 0

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        self.fired += 1
        self.callback()  # a `tell` to the SessionManager: safe from this thread


# --- the model ----------------------------------------------------------------------------


@dataclass(eq=False)
class TopicModel:
    active: bool = True
    next_seq: int = 1  # the seq the broker must give the next message for this subscription
    payloads: dict[int, bytes] = field(default_factory=dict)
    acked: int = 0
    max_seen: int = 0  # the highest seq the client has seen (dedup drops seqs up to it)
    max_sent: int = 0  # the highest seq the broker has sent, seen or lost on the way

    @property
    def held(self) -> int:
        """Messages the broker must hold for it: unsent plus sent and unacked."""
        return self.next_seq - 1 - self.acked if self.active else 0


@dataclass(eq=False)
class SessionModel:
    client_id: str
    session_id: str = ""
    token: str = ""
    # The token shown at the last resume stays good too, until the client shows the new one
    # (so a client whose `registered` was lost with the connection can still come back).
    previous_token: str | None = None
    conn: Conn | None = None
    topics: dict[str, TopicModel] = field(default_factory=dict)
    timer: FakeTimer | None = None
    old_timers: list[FakeTimer] = field(default_factory=list)  # of earlier absences
    alive: bool = True

    @property
    def held(self) -> int:
        return sum(t.held for t in self.topics.values())


@dataclass(eq=False)
class Expect:
    """What a `register` must get: `registered` for `session`, or an error `code`."""

    session: SessionModel | None = None
    resumed: bool = False
    queued: int = 0
    keepalive: int = 30
    code: ErrorCode | None = None


@dataclass(eq=False)
class Conn:
    conn_id: int
    ref: ActorRef[Any]
    handle: ConnHandle
    req: int
    expect: Expect
    decoder: FrameDecoder = field(
        default_factory=lambda: FrameDecoder(accept=BROKER_FRAME_TYPES, max_frame=BIG_FRAME)
    )
    state: str = "registering"  # registering, rejected, active, closed
    session: SessionModel | None = None
    cursor: int = 0
    # Per topic, the seq the next delivery on this connection must carry.
    next_seq: dict[str, int] = field(default_factory=dict)
    oks: set[int] = field(default_factory=set)
    errors: list[Any] = field(default_factory=list)
    expect_taken_over: bool = False
    expect_close: bool = False


def _decode(conn: Conn, data: bytes) -> list[Any]:
    conn.decoder.receive_data(data)
    frames = list(conn.decoder.frames())
    assert conn.decoder.buffered == 0, "broker sent a partial frame"
    return frames


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        assert self.thread.ident is not None
        self.ident: int = self.thread.ident
        self.refs: list[ActorRef[Any]] = []
        self.timers: list[FakeTimer] = []
        self.conns: list[Conn] = []
        self.conn_ids = itertools.count(1)
        self.reqs = itertools.count(1)
        self.current: dict[str, SessionModel | None] = dict.fromkeys(CLIENTS)
        self.tokens: dict[str, list[tuple[str, str]]] = {c: [] for c in CLIENTS}
        self.session_ids: set[str] = set()
        self.published = 0
        self.delivered = 0
        self.expired = 0
        self.session_tables: tuple[int, int] | None = None
        self.sub_stats: dict[str, Any] = {}
        self.publisher = SessionModel("publisher")
        self.verified = False
        self.store: MemoryStore | None = None
        self.high_water = 1 << 20
        self.memory_head, self.page = 100, 1000

    # --- plumbing ---------------------------------------------------------------------------

    def _call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(delay, callback)
        self.timers.append(timer)
        return timer

    def _start_managers(self, snapshot: Snapshot | None = None) -> None:
        """The two managers, on the store if there is one, with what it holds."""
        if snapshot is None:
            snapshot = Snapshot((), ())
        self.subscribers = SubscriberManager.start(
            self.loop,
            self.ident,
            queue_limit=QUEUE_LIMIT,
            queue_bytes=1 << 24,
            outbound_high_water=self.high_water,
            store=self.store,
            restored_sessions=snapshot.sessions,
            memory_head=self.memory_head,
            page=self.page,
            restored_subscriptions=snapshot.subscriptions,
        )
        self.refs.append(self.subscribers)
        self.sessions = ObservedSessionManager.start(
            self.loop,
            self.ident,
            subscriber_manager=self.subscribers,
            session_expiry=EXPIRY,
            call_later=self._call_later,
            store=self.store,
            restored=snapshot.sessions,
        )
        self.refs.append(self.sessions)

    @initialize(
        high_water=st.sampled_from([1, 64, 300, 1 << 20]),
        subscriptions=st.tuples(*[st.sets(st.sampled_from(TOPICS), max_size=2)] * len(CLIENTS)),
        durable=st.booleans(),
        memory_head=st.sampled_from([1, 2, 100]),
        page=st.sampled_from([1, 2, 1000]),
    )
    def start_broker(
        self,
        high_water: int,
        subscriptions: tuple[set[str], ...],
        durable: bool,
        memory_head: int,
        page: int,
    ) -> None:
        """Starts the managers (in memory, or on a store that can be restarted from), the
        publisher, and the subscribers with their first topics (rules register, take over and
        subscribe as well; this only gets traffic going)."""
        self.high_water = high_water
        # Durable: a store that holds away queues beyond a head of `memory_head` messages
        # and is read back `page` messages at a time (tiny here, so that it is exercised).
        self.memory_head, self.page = memory_head, page
        self.store = MemoryStore() if durable else None
        self._start_managers()
        conn = self._register("publisher", Expect(session=self.publisher))
        assert conn.state == "active"
        for client, topics in zip(CLIENTS, subscriptions, strict=True):
            session = SessionModel(client)
            self.current[client] = session
            conn = self._register(client, Expect(session=session))
            for topic in sorted(topics):
                self._subscribe(session, topic)

    def _new_conn(self, expect: Expect) -> Conn:
        conn_id = next(self.conn_ids)
        ref = FakeListener.start(
            self.loop,
            self.ident,
            conn_id=conn_id,
            subscribers=self.subscribers,
            sessions=self.sessions,
        )
        self.refs.append(ref)
        conn = Conn(
            conn_id, ref, ConnHandle(conn_id, ref, f"peer-{conn_id}"), next(self.reqs), expect
        )
        self.conns.append(conn)
        return conn

    def _register(
        self,
        client_id: str,
        expect: Expect,
        *,
        username: str = USER,
        takeover: bool = False,
        resume: tuple[str, str] | None = None,
    ) -> Conn:
        conn = self._new_conn(expect)
        frame = Register(
            req=conn.req,
            client_id=client_id,
            username=username,
            password=None if resume else "secret",
            session_id=resume[0] if resume else None,
            resume_token=resume[1] if resume else None,
            keepalive=expect.keepalive,
            takeover=takeover,
        )
        # As the supervisor does: a resume is not authenticated, the token decides.
        self.sessions.tell(OpenSession(frame, conn.handle, authenticated=resume is None))
        self._settle()
        if expect.code is not None:
            assert conn.state == "rejected", f"expected error {expect.code}, got {conn.state}"
        else:
            assert conn.state == "active", f"register not answered `registered`: {conn.state}"
        return conn

    def _ops(self, session: SessionModel, conn: Conn, *ops: ClientFrame) -> None:
        self.subscribers.tell(SessionOps(session.session_id, conn.handle, ops))

    def _settle(self) -> None:
        """Ask every actor, in the order messages flow, until nothing is in flight."""
        self.verified = False
        previous = None
        for _ in range(1000):
            self.session_tables = self.sessions.ask(_Tables(), timeout=ASK_TIMEOUT)
            self.sub_stats = self.subscribers.ask(GetStats(), timeout=ASK_TIMEOUT)
            sizes = [c.ref.ask(_Size(), timeout=ASK_TIMEOUT) for c in self.conns]
            if sizes == previous:
                break
            previous = sizes
        else:
            raise AssertionError("the actors never went quiet")
        for conn in self.conns:
            records = conn.ref.ask(_Records(conn.cursor), timeout=ASK_TIMEOUT)
            conn.cursor += len(records)
            for record in records:
                self._process(conn, record)

    # --- what a connection receives -----------------------------------------------------------

    def _process(self, conn: Conn, record: tuple[Any, ...]) -> None:
        kind, closed = record[0], record[1]
        if kind == "rejected":
            msg: RegisterRejected = record[2]
            assert conn.state == "registering" and not closed
            assert conn.expect.code is not None, f"register rejected unexpectedly: {msg}"
            assert msg.code == conn.expect.code, msg
            assert msg.req == conn.req
            conn.state = "rejected"
        elif kind == "attached":
            assert conn.state == "registering" and not closed
            assert conn.expect.code is None, f"expected {conn.expect.code}, got registered"
            frames = _decode(conn, record[3])
            assert len(frames) == 1 and isinstance(frames[0], Registered), frames
            self._attached(conn, frames[0], record[2])
        elif kind == "taken_over":
            # The connection may be dead already: a client that crashed and came back before
            # the broker noticed.
            assert conn.expect_taken_over, "connection taken over unexpectedly"
            assert conn.session is not None and record[2] == conn.session.session_id
            conn.state = "closed"
        elif kind == "out":
            data, close = record[2], record[3]
            assert conn.state != "registering", "frames before `registered`"
            for frame in _decode(conn, data):
                match frame:
                    case Deliver():
                        self._deliver(conn, frame, lost=closed)
                    case Ok(req=req):
                        if not closed:
                            conn.oks.add(req)
                    case Dropped():
                        raise AssertionError(f"queue overflow below its limit: {frame}")
                    case Error() | Pong():
                        conn.errors.append(frame)
                    case _:
                        raise AssertionError(f"unexpected frame {frame}")
            if close:
                assert conn.expect_close, "broker closed a connection unexpectedly"
                conn.state = "closed"
        else:
            raise AssertionError(f"connection {conn.conn_id} got an unexpected {record[2:]}")

    def _attached(self, conn: Conn, reg: Registered, session_id: str) -> None:
        expect = conn.expect
        session = expect.session
        assert session is not None
        assert reg.session_id == session_id
        assert reg.req == conn.req
        assert reg.resumed is expect.resumed
        assert reg.keepalive == expect.keepalive
        assert reg.expiry == EXPIRY
        assert reg.dropped == 0
        # Everything waiting for the session, unacked deliveries included.
        assert reg.queued == expect.queued, (reg.queued, expect.queued)
        if expect.resumed:
            assert reg.session_id == session.session_id
            assert reg.resume_token != session.token, "resume token not renewed"
        else:
            assert reg.session_id not in self.session_ids, "session id reused"
            self.session_ids.add(reg.session_id)
            session.session_id = reg.session_id
        session.token = reg.resume_token
        if session.client_id in self.tokens:
            self.tokens[session.client_id].append((session.session_id, session.token))
        conn.state = "active"
        conn.session = session
        session.conn = conn
        # A connection gets each topic's queue from its oldest unacked message on.
        conn.next_seq = {name: t.acked + 1 for name, t in session.topics.items() if t.active}

    def _deliver(self, conn: Conn, d: Deliver, *, lost: bool) -> None:
        """Check one delivery; `lost` when it reached a connection whose socket had died
        (the broker sent it, the client never saw it)."""
        session = conn.session
        assert session is not None and session.alive, f"delivery for an ended session: {d}"
        assert lost or conn.state == "active", f"delivery to a closed connection: {d}"
        t = session.topics.get(d.topic)
        assert t is not None and t.active, f"delivery on a topic not subscribed: {d}"
        expected = conn.next_seq[d.topic]
        assert d.seq == expected, f"{d.topic}: got seq {d.seq}, expected {expected} (gap/order)"
        conn.next_seq[d.topic] = expected + 1
        assert d.seq in t.payloads, f"seq {d.seq} was never published to {d.topic}"
        assert d.payload == t.payloads[d.seq], f"seq {d.seq}: payload differs"
        assert d.seq > t.acked, f"acked seq {d.seq} delivered again"
        # Flagged exactly when the broker sent it before (whether or not the client saw it).
        if d.seq <= t.max_sent:
            assert d.redelivered, f"seq {d.seq} sent again but not flagged redelivered"
        else:
            assert not d.redelivered, f"seq {d.seq} flagged redelivered, never sent before"
            t.max_sent = d.seq
        if not lost:
            # What the client has seen stays one run from seq 1: no gaps after dedup.
            assert d.seq <= t.max_seen + 1, f"seq {d.seq} seen after only {t.max_seen}"
            t.max_seen = max(t.max_seen, d.seq)
        self.delivered += 1

    # --- candidates ---------------------------------------------------------------------------

    def _live(self) -> list[SessionModel]:
        return [s for s in self.current.values() if s is not None]

    def _connected(self) -> list[SessionModel]:
        return [s for s in self._live() if s.conn is not None]

    def _dropped(self) -> list[SessionModel]:
        return [s for s in self._live() if s.conn is None]

    def _end(self, session: SessionModel) -> None:
        session.alive = False
        if self.current.get(session.client_id) is session:
            self.current[session.client_id] = None

    # --- rules --------------------------------------------------------------------------------

    @rule(
        client=st.sampled_from(CLIENTS),
        takeover=st.booleans(),
        topics=st.sets(st.sampled_from(TOPICS), max_size=2),
    )
    def register_fresh(self, client: str, takeover: bool, topics: set[str]) -> None:
        """A fresh register, then subscriptions: `conflict` if the client_id owns a session,
        unless `takeover`, which ends that session and starts an empty one."""
        existing = self.current[client]
        if existing is not None and not takeover:
            self._register(client, Expect(code=ErrorCode.CONFLICT))
            return
        n_timers = len(self.timers)
        if existing is not None:
            # Takeover: the old session ends, its connection is told, its queues go.
            self._end(existing)
            if existing.conn is not None:
                existing.conn.expect_taken_over = True
        session = SessionModel(client)
        self.current[client] = session
        conn = self._register(client, Expect(session=session), takeover=takeover)
        assert session.conn is conn
        assert len(self.timers) == n_timers
        if existing is not None:
            if existing.conn is not None:
                assert existing.conn.state == "closed", "old connection not told taken_over"
                existing.conn = None
            if existing.timer is not None:
                assert existing.timer.cancelled, "cleanup timer of a taken-over session left"
        for topic in sorted(topics):
            self._subscribe(session, topic)

    @precondition(lambda self: self._live())
    @rule(i=picks, variant=st.sampled_from(["takeover", "wrong_user", "wrong_client"]))
    def register_conflicting(self, i: int, variant: str) -> None:
        """Another user's takeover of a client_id with a session is `conflict`; a resume with
        the right token but another username or client_id is `unknown_session`."""
        live = self._live()
        session = live[i % len(live)]
        if variant == "takeover":
            self._register(
                session.client_id,
                Expect(code=ErrorCode.CONFLICT),
                username=OTHER_USER,
                takeover=True,
            )
        else:
            other = next(c for c in CLIENTS if c != session.client_id)
            self._register(
                other if variant == "wrong_client" else session.client_id,
                Expect(code=ErrorCode.UNKNOWN_SESSION),
                username=OTHER_USER if variant == "wrong_user" else USER,
                resume=(session.session_id, session.token),
            )

    @precondition(lambda self: self._connected())
    @rule(i=picks, topic=st.sampled_from(TOPICS), subscribe=st.sampled_from([True, True, False]))
    def change_subscription(self, i: int, topic: str, subscribe: bool) -> None:
        connected = self._connected()
        session = connected[i % len(connected)]
        if subscribe:
            self._subscribe(session, topic)
        else:
            self._unsubscribe(session, topic)

    def _subscribe(self, session: SessionModel, topic: str) -> None:
        conn = session.conn
        assert conn is not None
        t = session.topics.get(topic)
        if t is None:
            session.topics[topic] = TopicModel()
            conn.next_seq[topic] = 1
        elif not t.active:
            # Subscribed again: the seq numbering carries on.
            t.active = True
            conn.next_seq[topic] = t.next_seq
        # Already subscribed: `ok`, and nothing changes.
        req = next(self.reqs)
        self._ops(session, conn, Subscribe(req=req, topic=topic))
        self._settle()
        assert req in conn.oks

    def _unsubscribe(self, session: SessionModel, topic: str) -> None:
        conn = session.conn
        assert conn is not None
        t = session.topics.get(topic)
        if t is not None and t.active:
            t.active = False
            t.acked = t.next_seq - 1  # what it held is discarded
        req = next(self.reqs)
        self._ops(session, conn, Unsubscribe(req=req, topic=topic))
        self._settle()
        assert req in conn.oks

    def _publish_model(self, topic: str, body: bytes) -> None:
        self.published += 1
        for session in self._live():
            t = session.topics.get(topic)
            if t is not None and t.active:
                t.payloads[t.next_seq] = body
                t.next_seq += 1

    def _body(self, payload: bytes) -> bytes:
        return b"%d:" % self.published + payload  # unique, so a delivery names its publish

    @rule(topic=st.sampled_from(TOPICS), payload=payloads, confirm=st.booleans())
    def publish(self, topic: str, payload: bytes, confirm: bool) -> None:
        body = self._body(payload)
        self._publish_model(topic, body)
        req = next(self.reqs) if confirm else None
        conn = self.publisher.conn
        assert conn is not None
        self._ops(self.publisher, conn, Publish(topic=topic, payload=body, req=req))
        self._settle()
        if req is not None:
            assert req in conn.oks, "publish with req not confirmed"

    @rule(batch=st.lists(st.tuples(st.sampled_from(TOPICS), payloads), min_size=2, max_size=5))
    def publish_batch(self, batch: list[tuple[str, bytes]]) -> None:
        ops = []
        for topic, payload in batch:
            body = self._body(payload)
            self._publish_model(topic, body)
            ops.append(Publish(topic=topic, payload=body))
        conn = self.publisher.conn
        assert conn is not None
        self._ops(self.publisher, conn, *ops)
        self._settle()

    @precondition(lambda self: self._connected())
    @rule(i=picks, topic=st.sampled_from(TOPICS), delta=st.sampled_from([0, 0, 0, -1, -3, 2]))
    def ack(self, i: int, topic: str, delta: int) -> None:
        """Cumulative ack, mostly of the latest seq received; now and then an older or a
        future one (which only acks what was sent)."""
        connected = self._connected()
        session = connected[i % len(connected)]
        conn = session.conn
        assert conn is not None
        t = session.topics.get(topic)
        seen = t.max_seen if t is not None else 0
        seq = max(0, seen + delta)
        if t is not None and t.active:
            t.acked = max(t.acked, min(seq, t.max_seen))
        self._ops(session, conn, Ack(topic=topic, seq=seq))
        self._settle()

    @precondition(lambda self: self._connected())
    @rule(i=picks, how=st.sampled_from(["drop", "drop", "drop", "unregister"]))
    def disconnect(self, i: int, how: str) -> None:
        """The connection drops (the session lingers), or the client unregisters."""
        connected = self._connected()
        session = connected[i % len(connected)]
        if how == "drop":
            self._drop(session)
        else:
            self._unregister(session)

    def _drop(self, session: SessionModel) -> None:
        conn = session.conn
        assert conn is not None
        conn.ref.tell(_Close())
        conn.state = "closed"
        session.conn = None
        n_timers = len(self.timers)
        self.sessions.tell(ConnectionLost(session.session_id, conn.conn_id))
        self._settle()
        new = self.timers[n_timers:]
        assert len(new) == 1, f"{len(new)} cleanup timers armed for one dropped session"
        assert new[0].delay == EXPIRY
        session.timer = new[0]
        if session.old_timers:
            # The timer of an earlier absence fires late (it was cancelled at the resume, but
            # its message may already be on its way): this absence's session must survive.
            for timer in session.old_timers:
                timer.fire()
            self._settle()
            held = len(self._live()) + 1
            assert self.session_tables == (held, held), "expired too early"
            assert self.sub_stats["sessions"] == held, "expired too early"

    def _unregister(self, session: SessionModel) -> None:
        conn = session.conn
        assert conn is not None
        conn.expect_close = True
        req = next(self.reqs)
        self._end(session)
        self._ops(session, conn, Unregister(req=req))
        self._settle()
        assert req in conn.oks and conn.state == "closed"
        session.conn = None
        # The Listener reports its socket closed afterwards; the session is gone already.
        self.sessions.tell(ConnectionLost(session.session_id, conn.conn_id))
        self._settle()

    @precondition(lambda self: any(self.tokens.values()))
    @rule(
        i=picks,
        variant=st.sampled_from(["last", "last", "last", "stale"]),
        keepalive=st.integers(1, 120),
    )
    def resume(self, i: int, variant: str, keepalive: int) -> None:
        """Resume with the client's last token (a live session's, mostly), or an older one."""
        live = [s.client_id for s in self._live()]
        known = [c for c in CLIENTS if self.tokens[c]]
        pool = live if variant == "last" and live else known
        client = pool[i % len(pool)]
        history = self.tokens[client]
        if variant == "stale" and len(history) > 1:
            # An earlier token: replaced at a later bind, or of a session that ended (or the
            # one shown at the last resume, which stays good).
            session_id, token = history[i % (len(history) - 1)]
        elif variant == "stale":
            session_id, token = history[-1][0], history[-1][1] + "x"
        else:
            session_id, token = history[-1]
        session = self.current[client]
        valid = (
            session is not None
            and session.session_id == session_id
            and token in (session.token, session.previous_token)
        )
        n_timers = len(self.timers)
        if not valid:
            self._register(
                client,
                Expect(code=ErrorCode.UNKNOWN_SESSION, keepalive=keepalive),
                resume=(session_id, token),
            )
            assert len(self.timers) == n_timers
            return
        assert session is not None
        self._resume(session, token, keepalive)

    def _resume(self, session: SessionModel, token: str, keepalive: int = 30) -> None:
        """A valid resume: `registered` with everything held counted, the queues drained."""
        n_timers = len(self.timers)
        old = session.conn
        if old is not None:
            # Resumed over a connection still open: that one is told `taken_over`.
            old.expect_taken_over = True
            session.conn = None
        expect = Expect(session=session, resumed=True, queued=session.held, keepalive=keepalive)
        conn = self._register(session.client_id, expect, resume=(session.session_id, token))
        session.previous_token = token
        assert session.conn is conn
        assert len(self.timers) == n_timers
        if old is not None:
            assert old.state == "closed", "old connection of a resumed session not taken over"
        if session.timer is not None:
            assert session.timer.cancelled, "cleanup timer still armed after resume"
            session.old_timers.append(session.timer)
            session.timer = None

    @precondition(lambda self: self._connected())
    @rule(
        i=picks,
        batch=st.lists(st.tuples(st.sampled_from(TOPICS), payloads), max_size=4),
        then=st.sampled_from(["drop", "resume", "resume_open"]),
    )
    def crash(self, i: int, batch: list[tuple[str, bytes]], then: str) -> None:
        """Deliveries in flight when a connection goes. `drop`: the socket dies, messages
        are sent into it, then the broker notices. `resume`: the same, but the client is back
        before the broker noticed, and the dead connection's ConnectionLost comes late.
        `resume_open`: the client resumes elsewhere while the old connection is still open
        with deliveries on their way to it. Either way nothing is lost: what the client did
        not ack comes again, flagged, before anything newer."""
        connected = self._connected()
        session = connected[i % len(connected)]
        conn = session.conn
        assert conn is not None
        if then != "resume_open":
            conn.ref.tell(_Close())
        ops = []
        for topic, payload in batch:
            body = self._body(payload)
            self._publish_model(topic, body)
            ops.append(Publish(topic=topic, payload=body))
        assert self.publisher.conn is not None
        if ops:
            self._ops(self.publisher, self.publisher.conn, *ops)
        if then == "drop":
            self._drop(session)
            return
        self._resume(session, session.token)
        assert conn.state == "closed"
        if then == "resume":
            n_timers = len(self.timers)
            self.sessions.tell(ConnectionLost(session.session_id, conn.conn_id))
            self._settle()
            assert len(self.timers) == n_timers, "a late ConnectionLost armed a timer"

    @precondition(lambda self: self._dropped())
    @rule(i=picks)
    def expire(self, i: int) -> None:
        dropped = self._dropped()
        session = dropped[i % len(dropped)]
        timer = session.timer
        assert timer is not None and not timer.cancelled
        timer.fire()
        self._end(session)
        self.expired += 1
        self._settle()
        # Gone for good: its last token is refused.
        self._register(
            session.client_id,
            Expect(code=ErrorCode.UNKNOWN_SESSION),
            resume=(session.session_id, session.token),
        )

    @precondition(
        lambda self: (
            any(c.state == "closed" for c in self.conns)
            or any(t.cancelled or t.fired for t in self.timers)
        )
    )
    @rule(i=picks, topic=st.sampled_from(TOPICS), payload=payloads)
    def late_events(self, i: int, topic: str, payload: bytes) -> None:
        """Late events change nothing: a cleanup timer that was cancelled (or has fired)
        fires; a replaced or closed connection reports itself lost and sends frames, down to
        an unregister (only its publish counts: a publish stands on its own)."""
        n_timers = len(self.timers)
        stale = [t for t in self.timers if t.cancelled or t.fired]
        old = [c for c in self.conns if c.state == "closed"]
        if stale and (i % 2 or not old):
            stale[i % len(stale)].fire()
        else:
            conn = old[i % len(old)]
            session = conn.session
            assert session is not None
            body = self._body(payload)
            self._publish_model(topic, body)
            self.sessions.tell(ConnectionLost(session.session_id, conn.conn_id))
            self._ops(
                session,
                conn,
                Subscribe(req=next(self.reqs), topic=topic),
                Ack(topic=topic, seq=1 << 40),
                Unsubscribe(req=next(self.reqs), topic=TOPICS[0]),
                Publish(topic=topic, payload=body),
                Unregister(req=next(self.reqs)),
            )
        self._settle()
        assert len(self.timers) == n_timers

    @precondition(lambda self: self.store is not None)
    @rule()
    def restart(self) -> None:
        """The broker stops and starts again on its store: all its memory is gone (the
        managers, every connection, the cleanup timers, the counters) and what the store
        holds is loaded. Every session is back, away, with its id, tokens, subscriptions, seq
        counters and queues; what had been sent and not acked comes again flagged."""
        assert self.store is not None
        old = (self.subscribers, self.sessions)
        for ref in old:
            ref.stop(timeout=ASK_TIMEOUT)
        for conn in self.conns:
            if conn.state == "active":
                conn.ref.tell(_Close())
                conn.state = "closed"
        for timer in self.timers:
            timer.cancelled = True  # they die with the process
        self._start_managers(self.store.load())
        self.published = self.delivered = self.expired = 0  # the process's counters
        timers = self.sessions.ask(_Timers(), timeout=ASK_TIMEOUT)
        for session in [*self._live(), self.publisher]:
            session.conn = None
            session.old_timers = []
            session.timer = timers[session.session_id]
            assert session.timer is not None and session.timer.delay == EXPIRY
        assert len(timers) == len(self._live()) + 1
        self._settle()
        # The publisher comes back at once (the rules publish through it).
        self._resume(self.publisher, self.publisher.token)

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        if self.session_tables is None:
            return
        live = self._live()
        connected = self._connected()
        for session in live:
            for name, t in session.topics.items():
                assert t.acked <= t.max_seen <= t.max_sent < t.next_seq
                if session.conn is not None and t.active:
                    # Connected and quiet: every message of the topic has arrived.
                    assert t.max_seen == t.next_seq - 1, (
                        f"{session.client_id}/{name}: saw up to {t.max_seen}, "
                        f"published up to {t.next_seq - 1}"
                    )
        # Both managers hold every session (the publisher's included); the SubscriberManager
        # owns the counters of sessions, connected ones and expiries, which match the model.
        assert self.session_tables == (len(live) + 1, len(live) + 1)
        assert self.sub_stats["sessions"] == len(live) + 1
        assert self.sub_stats["connected"] == len(connected) + 1
        assert self.sub_stats["expired"] == self.expired
        # Ended sessions hold nothing; live ones exactly their unsent and unacked messages.
        assert self.sub_stats["queued"] == sum(s.held for s in live)
        assert self.sub_stats["published"] == self.published
        assert self.sub_stats["delivered"] == self.delivered
        assert self.sub_stats["dropped"] == 0
        # Exactly the dropped sessions have a cleanup timer armed.
        armed = {id(t) for t in self.timers if not t.cancelled and not t.fired}
        assert armed == {id(s.timer) for s in self._dropped()}
        for conn in self.conns:
            assert not conn.errors, f"connection {conn.conn_id} got {conn.errors}"
        self.verified = True

    def teardown(self) -> None:
        try:
            if self.verified:
                # The last step left everything checked; check once more from quiet.
                self._settle()
                self.consistent()
        finally:
            try:
                for ref in reversed(self.refs):
                    with contextlib.suppress(ActorDeadError):
                        ref.stop(timeout=ASK_TIMEOUT)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(timeout=ASK_TIMEOUT)
                assert not self.thread.is_alive(), "event loop thread did not stop"
                self.loop.close()


SessionMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
TestSessionStateMachine = SessionMachine.TestCase


# --- the fleet view over the same steps (issue 11) -------------------------------------------


class FleetViewMachine(SessionMachine):
    """The same rules; after each step the fleet view, paged through two at a time, lists
    exactly the live sessions (the publisher's included), sorted by client id, each online
    exactly while the model has it connected (keepalive 30 s: no silence within a step)."""

    @invariant()
    def fleet_view_matches_the_model(self) -> None:
        if self.session_tables is None:
            return
        expected = sorted(
            (s.client_id, s.session_id, "online" if s.conn is not None else "away")
            for s in [*self._live(), self.publisher]
        )
        got: list[tuple[str, str, str]] = []
        after: str | None = None
        for _ in range(len(expected) + 1):
            page = self.sessions.ask(ListSessions(after=after, limit=2), timeout=ASK_TIMEOUT)
            got.extend((v.client_id, v.session_id, v.status) for v in page.sessions)
            if page.next is None:
                break
            after = page.next
        assert got == expected


FleetViewMachine.TestCase.settings = settings(
    max_examples=15, stateful_step_count=30, deadline=None
)
TestFleetViewMachine = FleetViewMachine.TestCase
