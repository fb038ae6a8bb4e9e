"""The SessionManager's fleet view, presence, admin actions, lifecycle events and metrics,
over the real actor with recording collaborators; and the paging of `fleet_view` (pure).

The SessionManager runs on a loop in a thread, as in the broker. Its SubscriberManager and
each connection's Listener are `Recorder` actors on the same loop. Time is an injected clock
the test moves, and cleanup timers go through an injected `call_later` the test fires. An
`ask` to the SessionManager is a barrier: every `tell` it made while handling what came
before is already in the recorders' inboxes, so asking them next sees it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pykka import ActorRef

from tests.wire import wait_for
from tether.broker import fleet_view
from tether.broker.listener import CloseConnection
from tether.broker.loop_actor import LoopActor
from tether.broker.messages import (
    Attach,
    ConnectionLost,
    ConnHandle,
    DisconnectSession,
    DropSession,
    EndSession,
    EndSessionByAdmin,
    GetMetrics,
    GetSession,
    Heartbeat,
    ListSessions,
    OpenSession,
    RegisterRejected,
    RegisterRequest,
    Seen,
    SessionPage,
    SessionView,
    SysEvent,
    TakenOver,
)
from tether.broker.ratelimit import FailureLimiter
from tether.broker.session_state import Session
from tether.broker.sessions import BrokerDraining, SessionManager
from tether.broker.store import Batch, OnDone, SessionRecord, Snapshot, StoreError
from tether.broker.supervisor import BrokerSupervisor
from tether.broker.users import UserStore, add_user
from tether.protocol import ErrorCode, Register

EXPIRY = 300.0
T0 = 1_800_000_000.0
KEEPALIVE = 10


@dataclass(frozen=True, slots=True)
class _Take:
    pass


class Recorder(LoopActor):
    """Records what it is told; `_Take` answers (and forgets) what it has."""

    def __init__(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        super().__init__(loop, loop_thread)
        self.messages: list[Any] = []

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Take):
            taken, self.messages = self.messages, []
            return taken
        self.messages.append(message)
        return None


@dataclass(eq=False)
class FakeTimer:
    delay: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class HeldStore:
    """A store whose commits the test completes (`finish`), or fails."""

    def __init__(self) -> None:
        self.pending: list[tuple[Batch, OnDone]] = []

    def load(self) -> Snapshot:
        return Snapshot((), ())

    def submit(self, batch: Batch, on_done: OnDone) -> None:
        self.pending.append((batch, on_done))

    def finish(self, error: StoreError | None = None) -> None:
        pending, self.pending = self.pending, []
        for _batch, on_done in pending:
            on_done(error)


class Fleet:
    def __init__(self, *, store: Any = None, restored: tuple[SessionRecord, ...] = ()) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        assert self.thread.ident is not None
        self.ident = self.thread.ident
        self.now = T0
        self.timers: list[FakeTimer] = []
        self.conn_ids = itertools.count(1)
        self.refs: list[ActorRef[Any]] = []
        self.backlog: list[Any] = []
        self.subscribers = Recorder.start(self.loop, self.ident)
        self.refs.append(self.subscribers)
        self.sessions = SessionManager.start(
            self.loop,
            self.ident,
            subscriber_manager=self.subscribers,
            session_expiry=EXPIRY,
            call_later=self._call_later,
            store=store,
            restored=restored,
            clock=lambda: self.now,
        )
        self.refs.append(self.sessions)

    def _call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(delay, callback)
        self.timers.append(timer)
        return timer

    def stop(self) -> None:
        for ref in reversed(self.refs):
            ref.stop(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def settle(self) -> None:
        """Until the SessionManager has handled everything told to it so far."""
        self.ask(GetSession("\x00barrier"))

    def ask(self, message: Any) -> Any:
        return self.sessions.ask(message, timeout=10)

    def tell(self, message: Any) -> None:
        self.sessions.tell(message)

    def told_subscribers(self) -> list[Any]:
        """What the SubscriberManager was told since the last look (but `Attach`es that
        `attach_of` took)."""
        self.settle()
        told = self.backlog + list(self.subscribers.ask(_Take(), timeout=10))
        self.backlog = []
        return told

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return [
            (m.event, dict(m.fields)) for m in self.told_subscribers() if isinstance(m, SysEvent)
        ]

    def connect(self) -> ConnHandle:
        conn_id = next(self.conn_ids)
        ref = Recorder.start(self.loop, self.ident)
        self.refs.append(ref)
        return ConnHandle(conn_id, ref, f"10.0.0.{conn_id}:5{conn_id:04d}")

    def told(self, conn: ConnHandle) -> list[Any]:
        self.settle()
        return list(conn.ref.ask(_Take(), timeout=10))

    def open(self, frame: Register, *, admin: bool = False) -> ConnHandle:
        conn = self.connect()
        self.tell(OpenSession(frame, conn, authenticated=frame.session_id is None, admin=admin))
        return conn

    def register(
        self,
        client_id: str,
        *,
        username: str = "alice",
        keepalive: int = KEEPALIVE,
        metadata: dict[str, Any] | None = None,
        takeover: bool = False,
        admin: bool = False,
    ) -> tuple[ConnHandle, Attach]:
        frame = Register(
            req=1,
            client_id=client_id,
            username=username,
            password="secret",
            keepalive=keepalive,
            metadata=metadata or {},
            takeover=takeover,
        )
        conn = self.open(frame, admin=admin)
        return conn, self.attach_of(conn)

    def resume(self, attach: Attach, *, username: str = "alice") -> tuple[ConnHandle, Attach]:
        frame = Register(
            req=2,
            client_id=attach.client_id,
            username=username,
            session_id=attach.session_id,
            resume_token=attach.resume_token,
            keepalive=attach.keepalive,
        )
        conn = self.open(frame)
        return conn, self.attach_of(conn)

    def attach_of(self, conn: ConnHandle) -> Attach:
        told = self.told_subscribers()
        attaches = [m for m in told if isinstance(m, Attach)]
        self.backlog = [m for m in told if not isinstance(m, Attach)]
        assert [a.conn for a in attaches] == [conn], attaches
        return attaches[0]

    def view(self, client_id: str) -> SessionView:
        view = self.ask(GetSession(client_id))
        assert isinstance(view, SessionView), view
        return view

    def expire(self, timer: FakeTimer) -> None:
        timer.callback()


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    harness = Fleet()
    yield harness
    harness.stop()


# --- views and presence -----------------------------------------------------------------


def test_a_new_session_is_online_with_its_connection_and_metadata(fleet: Fleet) -> None:
    conn, attach = fleet.register("sensor-7", metadata={"model": "x1"}, admin=True)
    assert (attach.username, attach.admin) == ("alice", True)
    view = fleet.view("sensor-7")
    assert view.session_id == attach.session_id
    assert (view.status, view.connected_since, view.away_since) == ("online", T0, None)
    assert (view.last_seen, view.expires_at, view.peer) == (T0, None, conn.peer)
    assert (view.keepalive, dict(view.metadata), view.username) == (
        KEEPALIVE,
        {"model": "x1"},
        "alice",
    )
    assert (view.health.status, view.health.at, view.health.stale) == (None, None, False)
    assert fleet.ask(GetSession("nobody")) is None


def test_a_session_turns_away_after_1_5_keepalive_of_silence_and_back_when_seen(
    fleet: Fleet,
) -> None:
    conn, attach = fleet.register("c")
    fleet.now = T0 + 1.5 * KEEPALIVE
    assert fleet.view("c").status == "online"
    fleet.now += 0.5
    view = fleet.view("c")
    assert (view.status, view.away_since, view.peer) == ("away", T0 + 15, None)
    assert view.expires_at == T0 + 15 + EXPIRY
    fleet.tell(Seen(attach.session_id, conn.conn_id, fleet.now))
    view = fleet.view("c")
    assert (view.status, view.last_seen, view.away_since) == ("online", fleet.now, None)
    # A late `Seen` from a replaced connection changes nothing.
    fleet.tell(Seen(attach.session_id, conn.conn_id + 100, fleet.now + 50))
    assert fleet.view("c").last_seen == fleet.now


def test_a_disconnect_makes_it_away_until_its_cleanup_timer(fleet: Fleet) -> None:
    conn, attach = fleet.register("c")
    fleet.now = T0 + 4
    fleet.tell(ConnectionLost(attach.session_id, conn.conn_id))
    view = fleet.view("c")
    assert (view.status, view.away_since, view.expires_at) == ("away", T0 + 4, T0 + 4 + EXPIRY)
    assert (view.connected_since, view.peer, view.last_seen) == (None, None, T0)
    assert view.health.stale is False
    fleet.resume(attach)
    view = fleet.view("c")
    assert (view.status, view.away_since, view.expires_at) == ("online", None, None)
    assert view.connected_since == T0 + 4


def test_health_turns_stale_after_2_keepalive_without_a_report(fleet: Fleet) -> None:
    conn, attach = fleet.register("c")

    def seen_at(t: float) -> None:
        fleet.now = t
        fleet.tell(Seen(attach.session_id, conn.conn_id, t))

    # Counted from the connection's start while no report came.
    seen_at(T0 + 2 * KEEPALIVE)
    assert fleet.view("c").health.stale is False
    seen_at(T0 + 2 * KEEPALIVE + 1)
    assert fleet.view("c").health.stale is True
    fleet.tell(Heartbeat(attach.session_id, conn.conn_id, "degraded", {"battery": 12}))
    health = fleet.view("c").health
    assert (health.status, dict(health.details or {}), health.at) == (
        "degraded",
        {"battery": 12},
        fleet.now,
    )
    assert health.stale is False
    seen_at(fleet.now + 2 * KEEPALIVE + 1)
    health = fleet.view("c").health
    assert (health.stale, health.status) == (True, "degraded")  # what it last said stays


# --- pages ------------------------------------------------------------------------------


def test_pages_filter_by_status_username_and_prefix(fleet: Fleet) -> None:
    ids = ["a-1", "a-2", "b-1", "b-2", "b-3", "c"]
    handles = {cid: fleet.register(cid, username="bob" if cid == "b-2" else "alice") for cid in ids}
    conn, attach = handles["b-3"]
    fleet.tell(ConnectionLost(attach.session_id, conn.conn_id))

    def ids_of(page: SessionPage) -> list[str]:
        return [v.client_id for v in page.sessions]

    page = fleet.ask(ListSessions(limit=4))
    assert (ids_of(page), page.next) == (["a-1", "a-2", "b-1", "b-2"], "b-2")
    page = fleet.ask(ListSessions(limit=4, after="b-2"))
    assert (ids_of(page), page.next) == (["b-3", "c"], None)
    assert ids_of(fleet.ask(ListSessions(status="away"))) == ["b-3"]
    assert ids_of(fleet.ask(ListSessions(status="online", client_id_prefix="b-"))) == [
        "b-1",
        "b-2",
    ]
    assert ids_of(fleet.ask(ListSessions(username="bob"))) == ["b-2"]
    page = fleet.ask(ListSessions(client_id_prefix="b", limit=2))
    assert (ids_of(page), page.next) == (["b-1", "b-2"], "b-2")
    page = fleet.ask(ListSessions(client_id_prefix="b", limit=3))
    assert (ids_of(page), page.next) == (["b-1", "b-2", "b-3"], None)
    assert ids_of(fleet.ask(ListSessions(after="zzz"))) == []
    with pytest.raises(ValueError, match="limit"):
        fleet.ask(ListSessions(limit=0))
    with pytest.raises(ValueError, match="status"):
        fleet.ask(ListSessions(status="gone"))


def test_ended_sessions_leave_the_sorted_index(fleet: Fleet) -> None:
    conn, attach = fleet.register("m")
    fleet.register("a")
    fleet.register("z")
    fleet.tell(EndSession(attach.session_id, conn.conn_id))
    assert [v.client_id for v in fleet.ask(ListSessions()).sessions] == ["a", "z"]
    fleet.register("m", takeover=True)  # a fresh one under the same id
    fleet.register("m", takeover=True)  # taken over: one entry still
    assert [v.client_id for v in fleet.ask(ListSessions()).sessions] == ["a", "m", "z"]


def _session(client_id: str, username: str, online: bool) -> Session:
    session = Session(
        session_id=f"s-{client_id}",
        client_id=client_id,
        username=username,
        token_hash=b"",
        keepalive=KEEPALIVE,
        metadata={},
        conn=None,
        last_seen=T0,
        connected_since=T0 if online else None,
        away_since=None if online else T0,
    )
    if online:
        session.conn = ConnHandle(1, None, "peer:1")  # type: ignore[arg-type]
    return session


@settings(max_examples=150, deadline=None)
@given(
    sessions=st.dictionaries(
        st.text(alphabet="ab-01", min_size=1, max_size=6),
        st.tuples(st.sampled_from(["alice", "bob"]), st.booleans()),
        max_size=40,
    ),
    limit=st.integers(1, 7),
    status=st.sampled_from([None, "online", "away"]),
    username=st.sampled_from([None, "alice", "bob"]),
    prefix=st.sampled_from([None, "", "a", "b-", "ab", "0"]),
)
def test_paging_yields_every_match_once_in_order(
    sessions: dict[str, tuple[str, bool]],
    limit: int,
    status: str | None,
    username: str | None,
    prefix: str | None,
) -> None:
    table = {cid: _session(cid, user, online) for cid, (user, online) in sessions.items()}
    ids = sorted(table)
    expected = [
        cid
        for cid in ids
        if (username is None or table[cid].username == username)
        and (status is None or (table[cid].conn is not None) == (status == "online"))
        and cid.startswith(prefix or "")
    ]
    got: list[str] = []
    after: str | None = None
    for _ in range(len(ids) + 2):
        query = ListSessions(
            status=status, username=username, client_id_prefix=prefix, after=after, limit=limit
        )
        page = fleet_view.page(ids, table.__getitem__, query, T0, EXPIRY)
        assert len(page.sessions) <= limit
        got.extend(v.client_id for v in page.sessions)
        if page.next is None:
            break
        assert len(page.sessions) == limit and page.next == page.sessions[-1].client_id
        after = page.next
    else:
        raise AssertionError("paging did not end")
    assert got == expected


# --- admin actions ----------------------------------------------------------------------


def test_an_admin_disconnect_closes_the_connection_and_the_session_lingers(
    fleet: Fleet,
) -> None:
    conn, attach = fleet.register("c")
    fleet.events()
    before = fleet.ask(DisconnectSession("c"))
    assert isinstance(before, SessionView) and before.status == "online"
    assert fleet.told(conn) == [CloseConnection("disconnected_by_admin")]
    fleet.now += 1
    fleet.tell(ConnectionLost(attach.session_id, conn.conn_id))  # as the Listener reports it
    assert fleet.events() == [
        (
            "disconnected",
            {
                "client_id": "c",
                "username": "alice",
                "session_id": attach.session_id,
                "peer": conn.peer,
                "reason": "disconnected_by_admin",
            },
        )
    ]
    assert fleet.view("c").status == "away"
    assert fleet.ask(DisconnectSession("c")).status == "away"  # nothing to close
    assert fleet.ask(DisconnectSession("nobody")) is None
    # The next loss is an ordinary one again.
    conn2, _ = fleet.resume(attach)
    fleet.events()
    fleet.tell(ConnectionLost(attach.session_id, conn2.conn_id))
    assert fleet.events()[0][1]["reason"] == "connection_lost"


def test_an_admin_end_tells_session_ended_and_drops_the_queues(fleet: Fleet) -> None:
    conn, attach = fleet.register("c")
    fleet.told_subscribers()
    before = fleet.ask(EndSessionByAdmin("c"))
    assert isinstance(before, SessionView) and before.session_id == attach.session_id
    [taken] = fleet.told(conn)
    assert taken == TakenOver(
        attach.session_id, ErrorCode.SESSION_ENDED, "the broker's operator ended this session"
    )
    told = fleet.told_subscribers()
    assert DropSession(attach.session_id, "ended_by_admin") in told
    [event] = [m for m in told if isinstance(m, SysEvent)]
    assert (event.event, event.fields["reason"], event.at) == ("ended", "ended_by_admin", T0)
    assert fleet.ask(GetSession("c")) is None
    assert fleet.ask(EndSessionByAdmin("c")) is None
    # Its connection's late close is ignored (the Listener forgot the session anyway).
    fleet.tell(ConnectionLost(attach.session_id, conn.conn_id))
    assert fleet.events() == []
    resume = Register(
        req=3,
        client_id="c",
        username="alice",
        session_id=attach.session_id,
        resume_token=attach.resume_token,
    )
    refused = fleet.open(resume)
    [answer] = fleet.told(refused)
    assert isinstance(answer, RegisterRejected) and answer.code == ErrorCode.UNKNOWN_SESSION


# --- lifecycle events -------------------------------------------------------------------


def test_every_lifecycle_event_once_per_cause(fleet: Fleet) -> None:
    conn, attach = fleet.register("c", metadata={"m": 1}, keepalive=7)
    sid = attach.session_id
    who = {"client_id": "c", "username": "alice", "session_id": sid}
    assert fleet.events() == [
        ("registered", {**who, "peer": conn.peer, "keepalive": 7, "metadata": {"m": 1}})
    ]
    fleet.tell(Heartbeat(sid, conn.conn_id, "healthy", None))
    fleet.tell(Heartbeat(sid, conn.conn_id, "healthy", {"x": 1}))  # same status: no event
    fleet.tell(Heartbeat(sid, conn.conn_id, "degraded", None))
    assert fleet.events() == [
        ("health", {**who, "status": "healthy", "was": None, "details": None}),
        ("health", {**who, "status": "degraded", "was": "healthy", "details": {"x": 1}}),
    ]
    conn2, attach2 = fleet.resume(attach)  # over the live connection
    assert fleet.told(conn) == [TakenOver(sid)]
    assert fleet.events() == [
        ("taken_over", {**who, "peer": conn2.peer, "reason": "resume"}),
        ("resumed", {**who, "peer": conn2.peer}),
    ]
    fleet.tell(ConnectionLost(sid, conn.conn_id))  # the replaced connection's: ignored
    fleet.tell(ConnectionLost(sid, conn2.conn_id))
    assert fleet.events() == [
        ("disconnected", {**who, "peer": conn2.peer, "reason": "connection_lost"})
    ]
    conn3, _ = fleet.resume(attach2)
    assert [e for e, _ in fleet.events()] == ["resumed"]
    conn4, attach4 = fleet.register("c", takeover=True)
    assert fleet.told(conn3) == [TakenOver(sid)]
    events = fleet.events()
    assert events[0] == ("taken_over", {**who, "peer": conn4.peer, "reason": "takeover"})
    assert [e for e, _ in events] == ["taken_over", "registered"]  # no `ended` for it
    fleet.tell(EndSession(attach4.session_id, conn4.conn_id))
    assert fleet.events() == [
        (
            "ended",
            {
                "client_id": "c",
                "username": "alice",
                "session_id": attach4.session_id,
                "reason": "unregistered",
            },
        )
    ]


def test_expiry_raises_expired_once_and_a_stale_timer_nothing(fleet: Fleet) -> None:
    conn, attach = fleet.register("c")
    fleet.tell(ConnectionLost(attach.session_id, conn.conn_id))
    fleet.settle()
    first = fleet.timers[-1]
    conn2, _ = fleet.resume(attach)
    fleet.tell(ConnectionLost(attach.session_id, conn2.conn_id))
    fleet.events()  # settles too
    assert first.cancelled and fleet.timers[-1] is not first
    fleet.expire(first)  # of an earlier absence: stale
    assert fleet.events() == []
    fleet.expire(fleet.timers[-1])
    fleet.expire(fleet.timers[-1])
    assert fleet.events() == [
        ("expired", {"client_id": "c", "username": "alice", "session_id": attach.session_id})
    ]


def test_disconnects_during_a_drain_are_the_shutdowns(fleet: Fleet) -> None:
    conn, attach = fleet.register("c")
    fleet.tell(BrokerDraining())
    fleet.tell(ConnectionLost(attach.session_id, conn.conn_id))
    assert [f["reason"] for e, f in fleet.events() if e == "disconnected"] == ["shutdown"]


def test_metrics_count_sessions_and_registrations_by_outcome(fleet: Fleet) -> None:
    conn, attach = fleet.register("a")
    fleet.register("b")
    fleet.register("b", takeover=True)
    fleet.open(Register(req=1, client_id="b", username="alice", password="x"))  # conflict
    fleet.open(Register(req=1, client_id="b", username="bob", password="x"))  # conflict
    fleet.open(Register(req=1, client_id="a", username="alice", session_id="no", resume_token="t"))
    fleet.tell(ConnectionLost(attach.session_id, conn.conn_id))
    fleet.resume(attach)
    fleet.resume(fleet.register("d")[1])  # over a live connection: taken over
    assert fleet.ask(GetMetrics()) == {
        "sessions_online": 3,
        "sessions_away": 0,
        "registrations_new": 3,
        "registrations_resumed": 1,
        "registrations_taken_over": 2,
        "registrations_conflict": 2,
        "registrations_unknown_session": 1,
        "sessions_quota_refused": 0,
    }
    fleet.now += 1.5 * KEEPALIVE + 1  # silent: away while still connected
    metrics = fleet.ask(GetMetrics())
    assert (metrics["sessions_online"], metrics["sessions_away"]) == (0, 3)


# --- with a store -----------------------------------------------------------------------


def test_with_a_store_registered_is_announced_once_committed_and_never_if_it_failed() -> None:
    store = HeldStore()
    fleet = Fleet(store=store)
    try:
        conn = fleet.open(Register(req=1, client_id="c", username="alice", password="x"))
        assert fleet.told_subscribers() == []
        store.finish()
        told = fleet.told_subscribers()
        assert [type(m) for m in told] == [Attach, SysEvent]
        assert told[1].event == "registered" and told[1].fields["peer"] == conn.peer
        failed = fleet.open(Register(req=1, client_id="d", username="alice", password="x"))
        fleet.settle()
        store.finish(StoreError("disk full"))
        assert fleet.told_subscribers() == []
        [answer] = fleet.told(failed)
        assert isinstance(answer, RegisterRejected) and answer.code == ErrorCode.UNAVAILABLE
        assert fleet.ask(GetSession("d")) is None
        assert fleet.ask(GetMetrics())["registrations_new"] == 1
    finally:
        fleet.stop()


def test_restored_sessions_are_away_since_their_last_seen() -> None:
    record = SessionRecord(
        session_id="s-r",
        client_id="r",
        username="alice",
        keepalive=KEEPALIVE,
        metadata={"k": "v"},
        token_hash=b"h",
        previous_hash=None,
        created=T0 - 100,
        last_seen=T0 - 50,
        expires_at=T0 + 100,
        health="healthy",
    )
    fleet = Fleet(store=HeldStore(), restored=(record,))
    try:
        view = fleet.view("r")
        assert (view.status, view.away_since, view.last_seen) == ("away", T0 - 50, T0 - 50)
        assert (view.expires_at, view.peer, view.health.status) == (T0 + EXPIRY, None, "healthy")
        assert [v.client_id for v in fleet.ask(ListSessions()).sessions] == ["r"]
    finally:
        fleet.stop()


# --- the supervisor: the admin flag and the password checks -----------------------------


def test_the_supervisor_passes_the_admin_flag_and_observes_each_check(tmp_path: Path) -> None:
    users_path = tmp_path / "users.json"
    add_user(users_path, "alice", "secret", cost=4)
    add_user(users_path, "root", "rootpw", cost=4, admin=True)
    observed: list[float] = []
    fleet = Fleet()
    supervisor = BrokerSupervisor.start(
        fleet.loop,
        fleet.ident,
        users=UserStore.load(users_path),
        session_manager=fleet.subscribers,  # a recorder stands in for the SessionManager
        auth_workers=1,
        limiter=FailureLimiter(limit=5, window=60),
        observe_check=observed.append,
    )
    fleet.refs.append(supervisor)
    try:
        conn = fleet.connect()
        frames = [
            Register(req=1, client_id="r", username="root", password="rootpw"),
            Register(req=2, client_id="a", username="alice", password="secret"),
            Register(req=3, client_id="a", username="alice", password="wrong"),
            Register(req=4, client_id="r", username="root", session_id="s", resume_token="t"),
        ]
        for frame in frames:
            supervisor.tell(RegisterRequest(frame, conn))
        opened: list[Any] = []

        def all_opened() -> bool:
            opened.extend(cast("list[OpenSession]", fleet.subscribers.ask(_Take(), timeout=10)))
            return len(opened) == 3

        wait_for(all_opened)
        assert sorted((o.frame.req, o.authenticated, o.admin) for o in opened) == [
            (1, True, True),
            (2, True, False),
            (4, False, True),  # a resume: no check, the flag all the same
        ]
        refused: list[Any] = []

        def answered() -> bool:
            refused.extend(conn.ref.ask(_Take(), timeout=10))
            return len(refused) == 1

        wait_for(answered)
        assert isinstance(refused[0], RegisterRejected)
        assert (refused[0].req, refused[0].code) == (3, ErrorCode.AUTH_FAILED)
        assert supervisor.ask(GetMetrics(), timeout=10) == {
            "registrations_auth_failed": 1,
            "registrations_rate_limited": 0,
            "password_checks": 3,
            "auth_queue_length": 0,
            "auth_queue_refused": 0,
            "client_id_refused": 0,
            "certificate_logins": 0,
        }
        assert len(observed) == 3 and all(seconds > 0 for seconds in observed)
    finally:
        fleet.stop()
