"""The broker's events on `$sys/sessions/...` (issue 11), at the SubscriberManager: published as
ordinary deliveries (queued, seq, acked, committed first with a store), admin only, overflow
summed into `dropped` events (never for a `$sys` queue's own overflow), and the fleet view's
subscriptions and metrics.

First the manager alone (driven through `on_receive`, connections are recording refs, the
loop's timers are run by hand), then a real in-process broker, in memory and durable, with an
admin user in its users file. (Events caused by real sessions: tests/test_fleet_events.py.)
"""

from __future__ import annotations

import calendar
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import Dial, assert_error, publish_confirmed, registered, resume_frame, subscribe
from tests.test_subscribers_flow import FakeLoop, HoldingStore, Ref, _record
from tests.wire import WireClient, wait_for
from tether.broker import journal, subscribers
from tether.broker.config import BrokerConfig
from tether.broker.journal import Committed
from tether.broker.loop_actor import tell
from tether.broker.messages import (
    Attach,
    ConnHandle,
    Detach,
    DropSession,
    GetMetrics,
    GetSubscriptions,
    Outbound,
    SessionAttached,
    SessionOps,
    SubscriptionView,
    SysEvent,
)
from tether.broker.server import Broker
from tether.broker.store import PutSession
from tether.broker.subscribers import SubscriberManager, _WaitOver
from tether.broker.sysevents import DropsDue, rfc3339
from tether.broker.users import UserStore, add_user
from tether.protocol import (
    Ack,
    Deliver,
    Dropped,
    Error,
    ErrorCode,
    FrameDecoder,
    Ok,
    Publish,
    Registered,
    Subscribe,
)
from tether.protocol.codec import NEED_DATA
from tether.protocol.frames import BROKER_FRAME_TYPES

EXPIRED = "$sys/sessions/expired"
DROPPED = "$sys/sessions/dropped"
# 2026-11-29T16:05:17Z, and a fraction of a second: events are stamped to the second.
AT = calendar.timegm((2026, 11, 29, 16, 5, 17, 0, 0, 0)) + 0.75


def _fields(n: int = 1) -> dict[str, Any]:
    return {"client_id": f"sensor-{n}", "username": "fleet", "session_id": f"S{n}"}


def _frames(data: bytes) -> list[object]:
    decoder = FrameDecoder(max_frame=1 << 24, accept=BROKER_FRAME_TYPES)
    decoder.receive_data(data)
    out: list[object] = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        out.append(frame)
    return out


class Harness:
    """A SubscriberManager with recording connections; `settle()` runs what the store and the
    loop's timers owe it, as the real loop would."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, *, durable: bool, queue_limit: int = 100
    ) -> None:
        self.loop = FakeLoop()
        self.store = HoldingStore() if durable else None
        self.sm = SubscriberManager(
            self.loop,  # type: ignore[arg-type]
            0,
            queue_limit=queue_limit,
            queue_bytes=1 << 30,
            outbound_high_water=1 << 20,
            store=self.store,
        )
        self.routed: list[Any] = []
        self.refs: dict[str, Ref] = {}
        self.conns: dict[str, ConnHandle] = {}

        def route(ref: Any, message: Any) -> bool:
            if isinstance(message, Committed | DropsDue | _WaitOver):
                self.routed.append(message)  # the actor's own mail
            else:
                ref.tell(message)
            return True

        monkeypatch.setattr(subscribers, "tell", route)
        monkeypatch.setattr(journal, "tell", route)

    def settle(self) -> None:
        store = self.store
        while (store is not None and store.done) or self.routed:
            while store is not None and store.done:
                store.done.pop(0)()
            while self.routed:
                self.sm.on_receive(self.routed.pop(0))

    def run_timers(self) -> int:
        """Let every armed timer run out; returns how many there were."""
        timers, self.loop.timers = self.loop.timers, []
        for callback in timers:
            callback()
        self.settle()
        return len(timers)

    def attach(self, session_id: str, *, admin: bool = False, username: str = "alice") -> None:
        if self.store is not None and session_id not in self.conns:
            self.store.submit((PutSession(_record(session_id)),), lambda _e: None)
        ref = self.refs.setdefault(session_id, Ref())
        conn_id = len(self.conns) + 1 if session_id not in self.conns else 100 + len(ref.told)
        conn = ConnHandle(conn_id, ref, session_id)  # type: ignore[arg-type]
        self.conns[session_id] = conn
        attach = Attach(session_id, session_id.lower(), conn, 0, "t", False, 60, 60)
        self.sm.on_receive(replace(attach, username=username, admin=admin))
        self.settle()

    def detach(self, session_id: str) -> None:
        self.sm.on_receive(Detach(session_id, self.conns[session_id].conn_id))
        self.settle()

    def ops(self, session_id: str, *ops: Any) -> None:
        self.sm.on_receive(SessionOps(session_id, self.conns[session_id], tuple(ops)))
        self.settle()

    def event(self, event: str, fields: dict[str, Any], at: float = AT) -> None:
        self.sm.on_receive(SysEvent(event, fields, at))

    def received(self, session_id: str, *, registered: bool = False) -> list[object]:
        """The frames sent to the session since last asked (`registered` too, if asked)."""
        ref = self.refs[session_id]
        told, ref.told = ref.told, []
        data = [
            m.data if isinstance(m, Outbound) else m.registered
            for m in told
            if isinstance(m, Outbound) or (registered and isinstance(m, SessionAttached))
        ]
        return [f for chunk in data for f in _frames(chunk)]

    def metrics(self) -> dict[str, int]:
        answer = self.sm.on_receive(GetMetrics())
        assert isinstance(answer, dict)
        return answer

    def views(self, *session_ids: str) -> dict[str, tuple[SubscriptionView, ...]]:
        answer = self.sm.on_receive(GetSubscriptions(session_ids))
        assert isinstance(answer, dict)
        return answer


MakeHarness = Callable[..., Harness]


@pytest.fixture(params=["memory", "durable"])
def make(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> MakeHarness:
    def harness(queue_limit: int = 100) -> Harness:
        return Harness(monkeypatch, durable=request.param == "durable", queue_limit=queue_limit)

    return harness


@pytest.fixture
def harness(make: MakeHarness) -> Harness:
    return make()


def test_rfc3339_is_utc_to_the_second() -> None:
    assert rfc3339(AT) == "2026-11-29T16:05:17Z"
    assert rfc3339(0) == "1970-01-01T00:00:00Z"


def test_an_event_is_queued_delivered_and_acked_like_a_publish(harness: Harness) -> None:
    h = harness
    h.attach("A", admin=True)
    h.ops("A", Subscribe(req=1, topic=EXPIRED))
    assert h.received("A") == [Ok(req=1)]
    fields = {**_fields(), "metadata": {"model": "x1", "raw": b"\x00\xff", "n": [1, 2.5, None]}}
    h.event("expired", fields)
    if h.store is not None:
        # Committed before it is sent: nothing yet, and it is in the store.
        assert h.received("A") == []
        assert [s.queued for s in h.store.load().subscriptions] == [1]
        h.settle()
    (deliver,) = h.received("A")
    assert isinstance(deliver, Deliver)
    assert (deliver.topic, deliver.seq, deliver.redelivered) == (EXPIRED, 1, False)
    assert msgpack.unpackb(deliver.payload, raw=False) == {**fields, "at": "2026-11-29T16:05:17Z"}
    assert h.views("A")["A"] == (SubscriptionView(EXPIRED, 1, 1, 0),)
    h.ops("A", Ack(topic=EXPIRED, seq=1))
    assert h.views("A")["A"] == (SubscriptionView(EXPIRED, 0, 0, 0),)
    metrics = h.metrics()
    # The broker's own events are delivered and acked, but not counted as clients' publishes.
    assert (metrics["messages_published"], metrics["messages_delivered"]) == (0, 1)
    assert metrics["messages_acked"] == 1
    # An event nobody subscribes to costs nothing and goes nowhere.
    h.event("registered", _fields())
    h.settle()
    assert h.received("A") == []


def test_an_event_that_cannot_be_encoded_is_logged_and_skipped(harness: Harness) -> None:
    h = harness
    h.attach("A", admin=True)
    h.ops("A", Subscribe(req=1, topic=EXPIRED))
    h.received("A")
    h.event("expired", {**_fields(), "metadata": {"bad": object()}})
    h.event("expired", _fields(2))
    h.settle()
    (deliver,) = h.received("A")
    assert isinstance(deliver, Deliver) and deliver.seq == 1
    assert msgpack.unpackb(deliver.payload)["client_id"] == "sensor-2"


def test_only_admin_sessions_subscribe_to_sys(harness: Harness) -> None:
    h = harness
    h.attach("U")
    h.attach("A", admin=True)
    h.ops("U", Subscribe(req=1, topic=EXPIRED), Subscribe(req=2, topic="$other"))
    refused, ok = h.received("U")
    assert isinstance(refused, Error)
    assert (refused.code, refused.req) == (ErrorCode.NOT_AUTHORIZED, 1)
    assert ok == Ok(req=2)
    h.ops("A", Subscribe(req=3, topic=EXPIRED))
    assert h.received("A") == [Ok(req=3)]
    assert [v.topic for v in h.views("U")["U"]] == ["$other"]
    h.event("expired", _fields())
    h.settle()
    assert h.received("U") == []
    assert len(h.received("A")) == 1


def test_a_session_that_attaches_as_not_admin_loses_its_sys_subscriptions(
    harness: Harness,
) -> None:
    h = harness
    h.attach("A", admin=True)
    h.ops("A", Subscribe(req=1, topic=EXPIRED), Subscribe(req=2, topic="plain"))
    h.detach("A")
    h.event("expired", _fields())  # queued while away...
    h.settle()
    h.attach("A", admin=False)  # ...and gone with the subscription: the user is not admin now
    frames = h.received("A", registered=True)
    registered_frame = next(f for f in frames if isinstance(f, Registered))
    assert registered_frame.queued == 0
    assert not [f for f in frames if isinstance(f, Deliver)]
    assert [v.topic for v in h.views("A")["A"]] == ["plain"]
    if h.store is not None:
        h.settle()
        stored = {s.topic: s.active for s in h.store.load().subscriptions}
        assert stored == {EXPIRED: False, "plain": True}
    # Admin again: it may subscribe again (its seqs go on).
    h.attach("A", admin=True)
    h.received("A")
    h.ops("A", Subscribe(req=3, topic=EXPIRED))
    h.event("expired", _fields())
    h.settle()
    deliveries = [f for f in h.received("A") if isinstance(f, Deliver)]
    assert [d.seq for d in deliveries] == [2]


def test_overflow_is_summed_into_one_dropped_event_per_interval(make: MakeHarness) -> None:
    h = make(queue_limit=3)
    h.attach("A", admin=True, username="root")
    h.attach("S", username="fleet")
    h.attach("P")
    h.ops("A", Subscribe(req=1, topic=DROPPED))
    h.ops("S", Subscribe(req=1, topic="t"))
    h.detach("S")  # away: its queue drops its oldest
    h.received("A")
    h.ops("P", *[Publish(topic="t", payload=b"a%d" % i) for i in range(5)])
    h.ops("P", *[Publish(topic="t", payload=b"b%d" % i) for i in range(4)])
    assert h.received("A") == []  # summed until the interval runs out
    assert h.run_timers() == 1  # one timer for (S, t), armed by the first drop
    (deliver,) = h.received("A")
    assert isinstance(deliver, Deliver) and deliver.topic == DROPPED
    payload = msgpack.unpackb(deliver.payload)
    at = payload.pop("at")
    assert payload == {
        "client_id": "s",
        "username": "fleet",
        "session_id": "S",
        "topic": "t",
        "count": 6,
    }
    assert at.endswith("Z")
    h.ops("A", Ack(topic=DROPPED, seq=deliver.seq))
    assert h.run_timers() == 0  # nothing more to tell
    h.ops("P", Publish(topic="t", payload=b"c"))
    assert h.run_timers() == 1
    (deliver,) = h.received("A")
    assert isinstance(deliver, Deliver) and msgpack.unpackb(deliver.payload)["count"] == 1
    assert h.views("S")["S"] == (SubscriptionView("t", 3, 0, 7),)
    assert h.metrics()["messages_dropped"] == 7


@settings(max_examples=60, deadline=None)
@given(
    queue_limit=st.integers(2, 5),  # room for both topics' events in the admin's queue
    steps=st.lists(st.one_of(st.none(), st.tuples(st.sampled_from("tu"), st.integers(1, 6)))),
)
def test_dropped_events_count_every_drop_once(
    queue_limit: int, steps: list[tuple[str, int] | None]
) -> None:
    """Whatever the batches and however the intervals fall between them (None: the timers run
    out), the `dropped` events add up to the drops, at most one per topic per interval."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        h = Harness(monkeypatch, durable=False, queue_limit=queue_limit)
        h.attach("A", admin=True)
        h.attach("S")
        h.attach("P")
        h.ops("A", Subscribe(req=1, topic=DROPPED))
        h.ops("S", Subscribe(req=1, topic="t"), Subscribe(req=2, topic="u"))
        h.detach("S")
        counts: dict[str, int] = {"t": 0, "u": 0}
        seq = 0
        for step in [*steps, None]:
            if step is not None:
                topic, n = step
                h.ops("P", *[Publish(topic=topic, payload=b"x") for _ in range(n)])
                continue
            armed = h.run_timers()
            events: list[dict[str, Any]] = []
            while delivered := [d for d in h.received("A") if isinstance(d, Deliver)]:
                for d in delivered:
                    events.append(msgpack.unpackb(d.payload))
                    seq += 1
                    assert d.seq == seq  # none lost
                    h.ops("A", Ack(topic=DROPPED, seq=seq))
            assert len(events) == armed <= 2
            assert len({e["topic"] for e in events}) == len(events)
            for event in events:
                assert event["count"] >= 1
                counts[event["topic"]] += event["count"]
        views = {v.topic: v.dropped for v in h.views("S")["S"]}
        assert counts == views
        assert sum(counts.values()) == h.metrics()["messages_dropped"]


def test_overflow_of_a_connected_subscriber_forced_by_the_wait_is_told_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch, durable=False, queue_limit=2)
    h.attach("A", admin=True)
    h.attach("S")
    h.attach("P")
    h.ops("A", Subscribe(req=1, topic=DROPPED))
    h.ops("S", Subscribe(req=1, topic="t"))
    h.received("A")
    # S is connected and never acks: P is held, then its wait runs out and it is forced.
    h.ops("P", *[Publish(topic="t", payload=b"%d" % i) for i in range(5)])
    assert h.run_timers() == 1  # the publish wait
    frames = h.received("S")
    assert any(isinstance(f, Dropped) for f in frames)  # told to S itself, as ever
    assert h.run_timers() == 1  # the drops' interval
    (deliver,) = h.received("A")
    assert isinstance(deliver, Deliver)
    assert msgpack.unpackb(deliver.payload)["count"] == h.metrics()["messages_dropped"] > 0


def test_a_sys_queue_overflow_is_counted_but_never_published(make: MakeHarness) -> None:
    h = make(queue_limit=3)
    h.attach("A", admin=True)  # listens to `dropped`
    h.attach("W", admin=True)  # listens to `expired`, then goes away
    h.ops("A", Subscribe(req=1, topic=DROPPED))
    h.ops("W", Subscribe(req=1, topic=EXPIRED))
    h.detach("W")
    for n in range(10):
        h.event("expired", _fields(n))
        h.settle()
    assert h.views("W")["W"] == (SubscriptionView(EXPIRED, 3, 0, 7),)
    assert h.metrics()["messages_dropped"] == 7
    assert h.run_timers() == 0
    assert [f for f in h.received("A") if isinstance(f, Deliver)] == []


def test_views_and_metrics_move_with_traffic(harness: Harness) -> None:
    h = harness
    h.attach("S")
    h.attach("P")
    before = h.metrics()
    expected = {
        "messages_published": 0,
        "messages_delivered": 0,
        "messages_redelivered": 0,
        "messages_acked": 0,
        "messages_dropped": 0,
        "messages_queued": 0,
        "bytes_queued": 0,
        "subscriptions": 0,
        "topics": 0,
        "sessions_expired": 0,
    }
    assert {key: before[key] for key in expected} == expected  # and issue 12's figures
    h.ops("S", Subscribe(req=1, topic="b"), Subscribe(req=2, topic="a"))
    h.ops("P", *[Publish(topic="a", payload=b"xyz") for _ in range(3)])
    assert h.views("S", "nobody") == {
        "S": (SubscriptionView("a", 3, 3, 0), SubscriptionView("b", 0, 0, 0))
    }
    m = h.metrics()
    assert (m["messages_published"], m["messages_delivered"], m["messages_queued"]) == (3, 3, 3)
    assert (m["bytes_queued"], m["subscriptions"], m["topics"]) == (9, 2, 2)
    h.ops("S", Ack(topic="a", seq=1))
    # Away and back without acking the rest: they go out again, flagged.
    h.detach("S")
    h.attach("S")
    frames = [f for f in h.received("S") if isinstance(f, Deliver)]
    assert [(d.seq, d.redelivered) for d in frames][-2:] == [(2, True), (3, True)]
    m = h.metrics()
    assert (m["messages_acked"], m["messages_redelivered"], m["messages_delivered"]) == (1, 2, 5)
    h.sm.on_receive(DropSession("S", "expired"))
    h.settle()
    m = h.metrics()
    assert (m["sessions_expired"], m["messages_queued"], m["subscriptions"]) == (1, 0, 0)
    assert h.views("S") == {}


# --- a real broker ----------------------------------------------------------------------------

ROOT, ROOT_PASSWORD = "root", "rootpw"


@pytest.fixture(scope="module")
def admin_users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("admin-users") / "users.json"
    add_user(path, "alice", "secret", cost=4)
    add_user(path, ROOT, ROOT_PASSWORD, cost=4, admin=True)
    return path


@pytest.fixture
def start(admin_users: Path, tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Start a broker whose users file has an admin; `durable=True`: on a data directory (one
    per test: a second start on it is a restart; each start stops the previous broker)."""
    running: list[Broker] = []

    def make(*, durable: bool = False, users: Path = admin_users, **overrides: Any) -> Broker:
        for broker in running:
            broker.stop()
        running.clear()
        data_dir = tmp_path / "data" if durable else None
        config = replace(BrokerConfig(port=0, users_path=users, data_dir=data_dir), **overrides)
        broker = Broker(config, users=UserStore.load(users))
        broker.start()
        running.append(broker)
        return broker

    yield make
    for broker in running:
        broker.stop()


def _admin(
    dial: Dial, broker: Broker, client_id: str, *topics: str
) -> tuple[WireClient, Registered]:
    client = dial(broker)
    reg = registered(client.register(client_id, username=ROOT, password=ROOT_PASSWORD))
    for topic in topics:
        subscribe(client, topic)
    return client, reg


def _ask(broker: Broker, message: object) -> Any:
    return broker._refs["subscribers"].ask(message, timeout=5)


def _event(frame: object, topic: str) -> dict[str, Any]:
    assert isinstance(frame, Deliver), frame
    assert frame.topic == topic, frame
    payload = msgpack.unpackb(frame.payload, raw=False)
    assert isinstance(payload, dict)
    return payload


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "durable"])
def test_an_admin_receives_an_injected_event(
    start: Callable[..., Broker], dial: Dial, durable: bool
) -> None:
    broker = start(durable=durable)
    root, reg = _admin(dial, broker, "fleet-manager", EXPIRED)
    fields = {**_fields(7), "reason": "test"}
    tell(broker._refs["subscribers"], SysEvent("expired", fields, AT))
    frame = root.recv()
    assert _event(frame, EXPIRED) == {**fields, "at": "2026-11-29T16:05:17Z"}
    assert isinstance(frame, Deliver) and frame.seq == 1
    if not durable:
        return
    # Stored like any message: unacked across a restart, then sent again, flagged.
    tell(broker._refs["subscribers"], SysEvent("expired", _fields(8), AT))
    assert _event(root.recv(), EXPIRED)["client_id"] == "sensor-8"
    root.close()
    broker = start(durable=True)
    again = dial(broker)
    again.send(resume_frame(1, "fleet-manager", reg, username=ROOT))
    resumed = registered(again.recv())
    assert (resumed.resumed, resumed.queued) == (True, 2)
    frames = [again.recv(), again.recv()]
    assert [(f.seq, f.redelivered) for f in frames] == [(1, True), (2, True)]  # type: ignore[union-attr]
    assert _event(frames[1], EXPIRED)["client_id"] == "sensor-8"


def test_a_non_admin_is_refused_where_an_admin_is_not(
    start: Callable[..., Broker], dial: Dial
) -> None:
    broker = start()
    _admin(dial, broker, "root-1", EXPIRED)
    alice = dial(broker)
    registered(alice.register("alice-1"))
    alice.send(Subscribe(req=9, topic=EXPIRED))
    assert_error(alice.recv(), ErrorCode.NOT_AUTHORIZED, 9)
    subscribe(alice, "plain")  # usable
    assert _ask(broker, GetSubscriptions(())) == {}


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "durable"])
def test_a_real_overflow_produces_one_summed_dropped_event(
    start: Callable[..., Broker], dial: Dial, durable: bool
) -> None:
    broker = start(durable=durable, queue_limit=3)
    root, _ = _admin(dial, broker, "watch", DROPPED)
    alice = dial(broker)
    alice_reg = registered(alice.register("sensor-1"))
    subscribe(alice, "fleet/t")
    alice.close()
    wait_for(lambda: broker.stats()["connected"] == 1)
    pub = dial(broker)
    registered(pub.register("pub"))
    publish_confirmed(pub, "fleet/t", [b"%d" % i for i in range(6)])
    publish_confirmed(pub, "fleet/t", [b"x%d" % i for i in range(4)])
    event = _event(root.recv(), DROPPED)
    assert event.pop("at").endswith("Z")
    assert event == {
        "client_id": "sensor-1",
        "username": "alice",
        "session_id": alice_reg.session_id,
        "topic": "fleet/t",
        "count": 7,
    }
    views = _ask(broker, GetSubscriptions((alice_reg.session_id, "unknown")))
    assert views == {alice_reg.session_id: (SubscriptionView("fleet/t", 3, 0, 7),)}
    assert _ask(broker, GetMetrics())["messages_dropped"] == 7


def test_a_sys_queue_overflow_publishes_nothing(start: Callable[..., Broker], dial: Dial) -> None:
    broker = start(queue_limit=3)
    root, _ = _admin(dial, broker, "watch", DROPPED)
    away, _ = _admin(dial, broker, "away-manager", EXPIRED)
    away.close()
    wait_for(lambda: broker.stats()["connected"] == 1)
    for n in range(10):
        tell(broker._refs["subscribers"], SysEvent("expired", _fields(n), AT))
    wait_for(lambda: _ask(broker, GetMetrics())["messages_dropped"] == 7)
    # Then a real overflow: its event is the first `root` gets (one for the `$sys` queue would
    # have been due before it).
    alice = dial(broker)
    registered(alice.register("sensor-2"))
    subscribe(alice, "t")
    alice.close()
    wait_for(lambda: broker.stats()["connected"] == 1)
    pub = dial(broker)
    registered(pub.register("pub"))
    publish_confirmed(pub, "t", [b"%d" % i for i in range(5)])
    event = _event(root.recv(), DROPPED)
    assert (event["topic"], event["count"]) == ("t", 2)


def test_metrics_and_views_move_with_real_traffic(start: Callable[..., Broker], dial: Dial) -> None:
    broker = start()
    before = _ask(broker, GetMetrics())
    sub = dial(broker)
    reg = registered(sub.register("sub"))
    subscribe(sub, "m")
    pub = dial(broker)
    registered(pub.register("pub"))
    publish_confirmed(pub, "m", [b"one", b"two"])
    got = [sub.recv(), sub.recv()]
    assert all(isinstance(f, Deliver) for f in got)
    sub.send(Ack(topic="m", seq=1))
    wait_for(lambda: _ask(broker, GetMetrics())["messages_acked"] == before["messages_acked"] + 1)
    views = _ask(broker, GetSubscriptions((reg.session_id,)))
    assert views == {reg.session_id: (SubscriptionView("m", 1, 1, 0),)}
    sub.close()
    wait_for(lambda: broker.stats()["connected"] == 1)
    again = dial(broker)
    again.send(resume_frame(1, "sub", reg))
    registered(again.recv())
    redelivered = again.recv()
    assert isinstance(redelivered, Deliver) and redelivered.redelivered
    after = _ask(broker, GetMetrics())
    assert after["messages_published"] - before["messages_published"] == 2
    assert after["messages_delivered"] - before["messages_delivered"] == 3
    assert after["messages_redelivered"] - before["messages_redelivered"] == 1
    assert (after["messages_queued"], after["bytes_queued"]) == (1, 3)
    assert (after["subscriptions"], after["topics"]) == (1, 1)


def test_a_restored_session_keeps_its_sys_subscriptions_only_while_admin(
    start: Callable[..., Broker], dial: Dial, tmp_path: Path
) -> None:
    users = tmp_path / "users.json"
    add_user(users, ROOT, ROOT_PASSWORD, cost=4, admin=True)
    broker = start(durable=True, users=users)
    root, reg = _admin(dial, broker, "manager", EXPIRED, "plain")
    root.close()

    def resume() -> tuple[WireClient, Registered]:
        client = dial(broker)
        client.send(resume_frame(1, "manager", reg, username=ROOT))
        return client, registered(client.recv())

    # Restarted still admin: kept.
    broker = start(durable=True, users=users)
    again, _ = resume()
    topics = [v.topic for v in _ask(broker, GetSubscriptions((reg.session_id,)))[reg.session_id]]
    assert topics == [EXPIRED, "plain"]
    again.close()
    # Restarted after the admin mark was taken away: removed when it resumes.
    add_user(users, ROOT, ROOT_PASSWORD, cost=4, replace=True, admin=False)
    broker = start(durable=True, users=users)
    again, _ = resume()
    topics = [v.topic for v in _ask(broker, GetSubscriptions((reg.session_id,)))[reg.session_id]]
    assert topics == ["plain"]
    again.send(Subscribe(req=5, topic=EXPIRED))
    assert_error(again.recv(), ErrorCode.NOT_AUTHORIZED, 5)
    again.close()
    # ...and for good: the store no longer holds it either.
    broker = start(durable=True, users=users)
    views = _ask(broker, GetSubscriptions((reg.session_id,)))
    assert [v.topic for v in views[reg.session_id]] == ["plain"]
