"""Issue 12, the data path's bounds: `stats` kept as things change, `--max-subscriptions`, a
delivery that touches only the queues with something to send, `--session-queue-bytes`,
`--memory-budget` (the durable broker spills to the store first) and `--store-budget`.

First the SubscriberManager alone, in memory and durable (tests/test_sys_events.py's harness:
`on_receive`, recording connections, the store's callbacks run by hand), then a real broker
for what a client sees; last the default budget's pure arithmetic (broker/memory.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import (
    Dial,
    assert_error,
    publish_confirmed,
    recv_acking,
    registered,
    resume_frame,
    subscribe,
)
from tests.test_sys_events import Harness
from tests.wire import wait_for
from tether.broker import budget, journal, subscribers
from tether.broker.journal import Committed, Paged, Reflush
from tether.broker.memory import available_memory, cgroup_limit, default_memory_budget
from tether.broker.messages import GetMetrics, GetStats
from tether.broker.queues import SubscriptionQueue
from tether.broker.server import Broker
from tether.broker.subscribers import SubscriberManager, _WaitOver
from tether.broker.sysevents import DropsDue
from tether.protocol import (
    Ack,
    Deliver,
    Dropped,
    Error,
    Ok,
    Publish,
    Registered,
    Subscribe,
    Unsubscribe,
)

KiB = 1024


class Limits(Harness):
    """tests/test_sys_events.py's harness over a manager with the bounds of issue 12; the
    store's page reads come back through it too."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, durable: bool, **bounds: Any) -> None:
        super().__init__(monkeypatch, durable=durable)
        queue_limit = bounds.pop("queue_limit", 100)
        self.sm = SubscriberManager(
            self.loop,  # type: ignore[arg-type]
            0,
            queue_limit=queue_limit,
            queue_bytes=bounds.pop("queue_bytes", 1 << 30),
            outbound_high_water=bounds.pop("outbound_high_water", 1 << 20),
            store=self.store,
            memory_budget=bounds.pop("memory_budget", 1 << 40),
            **bounds,
        )

        def route(ref: Any, message: Any) -> bool:
            if isinstance(message, Committed | DropsDue | _WaitOver | Paged | Reflush):
                self.routed.append(message)  # the actor's own mail
            else:
                ref.tell(message)
            return True

        monkeypatch.setattr(subscribers, "tell", route)
        monkeypatch.setattr(journal, "tell", route)

    def stats(self) -> dict[str, int]:
        answer = self.sm.on_receive(GetStats())
        assert isinstance(answer, dict)
        return answer

    def back(self, session_id: str) -> tuple[Registered, list[Deliver]]:
        """Attach the session again: its `registered`, and the deliveries that follow."""
        self.received(session_id, registered=True)  # what it was sent before
        self.attach(session_id)
        reg, *frames = self.received(session_id, registered=True)
        assert isinstance(reg, Registered), reg
        return reg, [f for f in frames if isinstance(f, Deliver)]

    def delivers(self, session_id: str) -> list[Deliver]:
        return [f for f in self.received(session_id) if isinstance(f, Deliver)]


MakeLimits = Callable[..., Limits]


@pytest.fixture(params=["memory", "durable"])
def make(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> MakeLimits:
    def limits(**bounds: Any) -> Limits:
        return Limits(monkeypatch, durable=request.param == "durable", **bounds)

    return limits


def _walked(sm: SubscriberManager) -> dict[str, int]:
    """What `stats` and the budgets keep, summed the slow way: a walk over every queue."""
    fanout = sm._fanout
    queues = [q for s in fanout.sessions.values() for q in s.queues.values()]
    return {
        "connected": sum(1 for s in fanout.sessions.values() if s.conn is not None),
        "queued": sum(len(q) for q in queues),
        "bytes": sum(q.bytes for q in queues),
        "disk_bytes": sum(q.disk_bytes for q in queues),
        "queues": len(queues),
    }


def _kept(sm: SubscriberManager) -> dict[str, int]:
    totals = sm._fanout.totals
    return {
        "connected": sm._connected,
        "queued": totals.count,
        "bytes": totals.bytes,
        "disk_bytes": totals.disk_bytes,
        "queues": totals.queues,
    }


# --- 1. stats: kept, not walked --------------------------------------------------------------

_PUBLISH = st.tuples(
    st.just("publish"), st.sampled_from("ab"), st.integers(1, 5), st.integers(0, 40)
)
_ACK = st.tuples(st.just("ack"), st.sampled_from("ST"), st.sampled_from("ab"))
STEP = st.one_of(
    _PUBLISH,
    _PUBLISH,
    _ACK,
    st.tuples(st.just("subscribe"), st.sampled_from("ST"), st.sampled_from("ab")),
    st.tuples(st.just("unsubscribe"), st.sampled_from("ST"), st.sampled_from("ab")),
    st.tuples(st.just("away"), st.sampled_from("ST")),
    st.tuples(st.just("back"), st.sampled_from("ST")),
    st.tuples(st.just("end"), st.sampled_from("ST")),
)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(STEP, min_size=5, max_size=40),
    durable=st.booleans(),
    tight=st.booleans(),
)
def test_the_kept_counters_always_equal_a_walk_over_the_queues(
    steps: list[tuple[Any, ...]], durable: bool, tight: bool
) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        # Tight: small bounds, so that overflow, the session bound and the budgets happen.
        h = Limits(
            monkeypatch,
            durable=durable,
            queue_limit=6 if tight else 100,
            session_queue_bytes=150 if tight else 1 << 20,
            memory_budget=200 if tight else 1 << 20,
            store_budget=250 if tight else 1 << 20,
        )
        connected = {"S": True, "T": True}
        for session_id in ("S", "T", "P"):
            h.attach(session_id)
        for session_id in ("S", "T"):
            h.ops(session_id, Subscribe(req=1, topic="a"))
        for step in steps:
            match step:
                case ("publish", topic, count, size):
                    h.ops("P", *[Publish(topic=topic, payload=b"x" * size) for _ in range(count)])
                case ("subscribe", who, topic) if connected[who]:
                    h.ops(who, Subscribe(req=1, topic=topic))
                case ("unsubscribe", who, topic) if connected[who]:
                    h.ops(who, Unsubscribe(req=1, topic=topic))
                case ("ack", who, topic) if connected[who]:
                    h.ops(who, Ack(topic=topic, seq=1 << 30))
                case ("away", who) if connected[who]:
                    h.detach(who)
                    connected[who] = False
                case ("back", who) if not connected[who]:
                    h.attach(who)
                    connected[who] = True
                case ("end", who):
                    h.sm.on_receive(subscribers.DropSession(who, "expired"))
                    h.settle()
                    h.attach(who)
                    connected[who] = True
            h.run_timers()
            assert _kept(h.sm) == _walked(h.sm)
            stats = h.stats()
            assert stats["queued"] == _walked(h.sm)["queued"]
            assert stats["connected"] == _walked(h.sm)["connected"]


def test_stats_answers_without_walking_the_queues(
    make: MakeLimits, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make()
    h.attach("S", admin=True)
    h.ops("S", *[Subscribe(req=n, topic=f"t/{n}") for n in range(1, 201)])
    h.ops("S", Publish(topic="t/7", payload=b"abc"))
    h.received("S")

    def no_walk(self: SubscriptionQueue) -> int:
        raise AssertionError("stats walked a queue")

    monkeypatch.setattr(SubscriptionQueue, "__len__", no_walk)
    h.ops("S", subscribers.Stats(req=900))
    (answer,) = h.received("S")
    assert isinstance(answer, subscribers.StatsResult), answer
    assert answer.stats["queued"] == 1 and answer.stats["topics"] == 200
    assert answer.stats["connected"] == 1 and answer.stats["sessions"] == 1


def test_stats_from_a_session_not_admin_is_not_authorized(make: MakeLimits) -> None:
    h = make()
    h.attach("S")
    h.ops("S", subscribers.Stats(req=3), Subscribe(req=4, topic="t"))
    refused, ok = h.received("S")
    assert isinstance(refused, Error) and refused.code == "not_authorized" and refused.req == 3
    assert ok == Ok(req=4)
    assert h.metrics()["stats_refused"] == 1


def test_shed_drops_the_oldest_unsent_first_then_the_tail_then_the_unacked() -> None:
    q = SubscriptionQueue("t", max_count=100, max_bytes=1 << 20)
    q.committed = 0
    q.dropped_seqs = []
    for n in range(1, 5):
        q.push(b"%d" % n * 10, connected=True)  # seqs 1..4, 10 bytes each
    q.committed = 4
    q.take_many(2)  # 1, 2 sent and unacked; 3, 4 unsent
    q.spill = 1
    q.trim()  # 4 goes to the tail: in memory 1, 2 (unacked) and 3
    q.push(b"5" * 10, connected=True)  # joins the tail
    assert (len(q.unacked), len(q.pending), q.disk, q.memory_bytes) == (2, 1, 2, 30)
    assert q.shed(5, connected=True, memory_only=True) == 1  # 3: the oldest unsent
    assert q.shed(15, connected=True) == 2  # the tail's oldest two (4, 5)
    assert q.shed(1, connected=True, memory_only=True) == 1  # then sent ones: 1
    assert q.dropped_seqs == [3, 1] and q.disk_discarded == 2
    assert (q.dropped_live, q.dropped_total, len(q), q.bytes) == (4, 4, 1, 10)


def test_trim_moves_pending_in_front_of_a_tail_already_there() -> None:
    q = SubscriptionQueue("t", max_count=100, max_bytes=1 << 20)
    q.committed = 0
    for _ in range(3):
        q.push(b"x", connected=False)
    q.committed = 3
    q.spill = 3
    q.push(b"y", connected=False)  # 4 to the tail (pending holds the head of 3)
    assert (len(q.pending), q.disk, q.disk_after) == (3, 1, 3)
    q.spill = 1
    assert q.trim() == 2  # 2 and 3 join the tail, in front of 4
    assert ([e[0] for e in q.pending], q.disk, q.disk_after) == ([1], 3, 1)


# --- 2. --max-subscriptions ------------------------------------------------------------------


def test_the_subscribe_over_the_quota_is_refused_and_the_session_goes_on(
    make: MakeLimits,
) -> None:
    h = make(max_subscriptions=3)
    h.attach("S")
    h.ops("S", *[Subscribe(req=n, topic=f"t/{n}") for n in range(1, 5)])
    *oks, refused = h.received("S")
    assert oks == [Ok(req=1), Ok(req=2), Ok(req=3)]
    assert isinstance(refused, Error) and refused.code == "quota_exceeded" and refused.req == 4
    # Subscribing again to a topic it has is no new subscription; after an unsubscribe, room.
    h.ops("S", Subscribe(req=5, topic="t/1"), Unsubscribe(req=6, topic="t/2"))
    h.ops("S", Subscribe(req=7, topic="t/4"), Subscribe(req=8, topic="t/5"))
    frames = h.received("S")
    assert frames[:3] == [Ok(req=5), Ok(req=6), Ok(req=7)]
    assert isinstance(frames[3], Error) and frames[3].code == "quota_exceeded"
    assert h.metrics()["subscriptions_refused"] == 2
    assert sorted(h.sm._fanout.sessions["S"].queues) == ["t/1", "t/3", "t/4"]


# --- 3. a delivery touches only the queues with something to send ---------------------------


def test_a_delivery_to_a_session_with_many_subscriptions_looks_at_one_queue(
    make: MakeLimits, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make(max_subscriptions=5_000)
    h.attach("S")
    h.attach("P")
    h.ops("S", *[Subscribe(req=n, topic=f"t/{n}") for n in range(1, 3_001)])
    h.received("S")
    looked: list[str] = []
    sendable = SubscriptionQueue.sendable

    def counting(self: SubscriptionQueue) -> int:
        looked.append(self.topic)
        return sendable(self)

    monkeypatch.setattr(SubscriptionQueue, "sendable", counting)
    for n in range(5):
        h.ops("P", Publish(topic="t/1500", payload=b"%d" % n))
    assert [d.payload for d in h.delivers("S")] == [b"0", b"1", b"2", b"3", b"4"]
    assert set(looked) == {"t/1500"} and len(looked) <= 5 * 4


def test_queues_still_deliver_in_subscription_order_whatever_order_they_fill(
    make: MakeLimits,
) -> None:
    # Credit for about one frame per flush: which queue goes first shows.
    h = make(outbound_high_water=1)
    h.attach("S")
    h.attach("P")
    h.ops("S", *[Subscribe(req=n, topic=f"q/{n}") for n in range(1, 4)])
    h.received("S")
    h.detach("S")
    for topic in ("q/3", "q/2", "q/1"):  # filled last to first
        h.ops("P", Publish(topic=topic, payload=topic.encode()))
    h.attach("S")
    first = h.delivers("S")
    assert [d.topic for d in first] == ["q/1"]  # the earliest subscription first, as ever
    for expected in ("q/2", "q/3"):
        owed = 1 - h.sm._fanout.sessions["S"].credit  # back to a credit of one byte
        h.sm.on_receive(subscribers.Credit("S", h.conns["S"].conn_id, owed))
        h.settle()
        assert [d.topic for d in h.delivers("S")] == [expected]


# --- 4. --session-queue-bytes ----------------------------------------------------------------


def test_past_the_session_bound_the_oldest_of_its_largest_queue_go(make: MakeLimits) -> None:
    h = make(session_queue_bytes=1_000)
    h.attach("S")
    h.attach("O")  # another session on one of the topics: never touched by S's bound
    h.attach("P")
    h.ops("S", Subscribe(req=1, topic="a"), Subscribe(req=2, topic="b"))
    h.ops("O", Subscribe(req=1, topic="b"))
    h.detach("S")
    h.detach("O")
    h.ops("P", *[Publish(topic="a", payload=bytes([n]) * 100, req=n) for n in range(8)])
    h.ops("P", *[Publish(topic="b", payload=b"b" * 100, req=10 + n) for n in range(3)])
    # Every publish was taken: a bound on queued bytes never refuses a publisher.
    assert [f for f in h.received("P") if isinstance(f, Ok)] == [
        Ok(req=r) for r in [*range(8), 10, 11, 12]
    ]
    assert h.sm._fanout.sessions["S"].account.bytes == 1_000
    assert h.metrics()["messages_dropped_session_bytes"] == 1
    reg, delivered = h.back("S")
    assert (reg.dropped, reg.queued) == (1, 10)
    got = [(d.topic, d.seq) for d in delivered]
    assert got == [("a", n) for n in range(2, 9)] + [("b", n) for n in range(1, 4)]
    assert h.sm._fanout.sessions["O"].account.bytes == 300


def test_a_connected_session_past_its_bound_is_told_dropped(make: MakeLimits) -> None:
    h = make(session_queue_bytes=500)
    h.attach("S")
    h.attach("P")
    h.ops("S", Subscribe(req=1, topic="a"), Subscribe(req=2, topic="b"))
    h.received("S")
    # Sent and never acked: they stay queued, and count against the session's bytes.
    h.ops("P", *[Publish(topic="a", payload=b"a" * 100) for _ in range(4)])
    h.ops("P", *[Publish(topic="b", payload=b"b" * 100) for _ in range(2)])
    frames = h.received("S")
    dropped = [f for f in frames if isinstance(f, Dropped)]
    assert dropped == [Dropped(topic="a", count=1)]
    assert h.sm._fanout.sessions["S"].account.bytes == 500
    assert h.metrics()["messages_dropped_session_bytes"] == 1


def test_a_drop_for_a_bound_is_a_sys_dropped_event_as_overflow_is(make: MakeLimits) -> None:
    h = make(session_queue_bytes=300)
    h.attach("A", admin=True)
    h.ops("A", Subscribe(req=1, topic="$sys/sessions/dropped"))
    h.attach("S")
    h.attach("P")
    h.ops("S", Subscribe(req=1, topic="t"))
    h.detach("S")
    h.received("A")
    h.ops("P", *[Publish(topic="t", payload=b"x" * 100) for _ in range(5)])
    assert h.run_timers() == 1  # the drops' interval
    (event,) = h.delivers("A")
    fields = msgpack.unpackb(event.payload)
    assert (fields["session_id"], fields["topic"], fields["count"]) == ("S", "t", 2)


def _big_and_small_away(h: Limits, *, small: int) -> None:
    """Sessions BIG and SMALL subscribe and go away; P publishes 15 x 100 B to BIG's topic,
    then `small` x 100 B to SMALL's: the budget is crossed by SMALL's, BIG's is the largest."""
    for who in ("BIG", "SMALL", "P"):
        h.attach(who)
    h.ops("BIG", Subscribe(req=1, topic="big"))
    h.ops("SMALL", Subscribe(req=1, topic="small"))
    h.detach("BIG")
    h.detach("SMALL")
    h.ops("P", *[Publish(topic="big", payload=b"B" * 100) for _ in range(15)])
    h.ops("P", *[Publish(topic="small", payload=b"s" * 100) for _ in range(small)])


# --- 5. --memory-budget ----------------------------------------------------------------------


def test_memory_mode_past_the_budget_drops_the_oldest_of_the_largest_queue_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Limits(monkeypatch, durable=False, memory_budget=2_000)
    _big_and_small_away(h, small=6)
    metrics = h.metrics()
    assert metrics["messages_dropped_memory_budget"] == 1
    assert metrics["bytes_queued_memory"] == 2_000 and metrics["memory_budget"] == 2_000
    reg, small = h.back("SMALL")
    assert (reg.dropped, reg.queued) == (0, 6)
    assert [d.seq for d in small] == list(range(1, 7))
    reg, big = h.back("BIG")
    assert (reg.dropped, reg.queued) == (1, 14)
    assert [d.seq for d in big] == list(range(2, 16))


def test_durable_past_the_memory_budget_moves_backlogs_to_the_store_and_drops_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Limits(monkeypatch, durable=True, memory_budget=1_000)
    for who in ("S", "P"):
        h.attach(who)
    h.ops("S", Subscribe(req=1, topic="t"))
    h.detach("S")
    payloads = [b"%03d" % n * 25 for n in range(60)]  # 75 bytes each, 4,500 in all
    for start in range(0, 60, 10):
        h.ops("P", *[Publish(topic="t", payload=p) for p in payloads[start : start + 10]])
    metrics = h.metrics()
    assert metrics["messages_dropped_memory_budget"] == 0 and metrics["queues_spilled"] >= 1
    assert metrics["bytes_queued_memory"] <= 1_000 < metrics["bytes_queued_store"]
    reg, got = h.back("S")
    assert (reg.dropped, reg.queued) == (0, 60)
    while len(got) < len(payloads):  # the rest comes a page at a time as acks make room
        h.ops("S", Ack(topic="t", seq=got[-1].seq))
        more = h.delivers("S")
        assert more, f"stuck after {len(got)}"
        got += more
    assert [d.payload for d in got] == payloads


def test_durable_spills_beyond_the_largest_few_before_it_drops_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 80 away queues of 1,000 bytes each in memory: far more queues to move than the few
    # largest kept as candidates (budget.CANDIDATES).
    h = Limits(monkeypatch, durable=True, memory_budget=20_000)
    sessions = [f"S{n}" for n in range(80)]
    for who in [*sessions, "P"]:
        h.attach(who)
    for who in sessions:
        h.ops(who, Subscribe(req=1, topic="t"))
        h.detach(who)
    h.ops("P", *[Publish(topic="t", payload=b"x" * 100) for _ in range(10)])
    for _ in range(3):
        h.ops("P", Publish(topic="t", payload=b"y" * 100))
    metrics = h.metrics()
    assert metrics["messages_dropped_memory_budget"] == 0
    assert metrics["queues_spilled"] > budget.CANDIDATES
    assert metrics["bytes_queued_memory"] <= 20_000
    reg, got = h.back("S42")
    assert (reg.dropped, reg.queued) == (0, 13) and len(got) == 13


def test_durable_a_connected_slow_consumer_past_the_memory_budget_reads_its_backlog_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Credit for one frame, pages of 10: what waits beyond a page goes to the store.
    h = Limits(monkeypatch, durable=True, memory_budget=1_500, outbound_high_water=1, page=10)
    for who in ("S", "P"):
        h.attach(who)
    h.ops("S", Subscribe(req=1, topic="t"))
    h.received("S")
    payloads = [b"%03d" % n * 33 + b"." for n in range(60)]  # 100 bytes each
    for start in range(0, 60, 5):
        h.ops("P", *[Publish(topic="t", payload=p) for p in payloads[start : start + 5]])
    metrics = h.metrics()
    assert metrics["messages_dropped_memory_budget"] == 0 and metrics["queues_spilled"] >= 1
    assert metrics["bytes_queued_memory"] <= 1_500
    got = h.delivers("S")
    while len(got) < len(payloads):
        owed = 1 - h.sm._fanout.sessions["S"].credit
        h.sm.on_receive(subscribers.Credit("S", h.conns["S"].conn_id, owed))
        h.settle()
        h.ops("S", Ack(topic="t", seq=got[-1].seq))
        more = h.delivers("S")
        assert more, f"stuck after {len(got)}"
        got += more
    assert [d.payload for d in got] == payloads
    assert not any(isinstance(f, Dropped) for f in h.received("S"))


# --- 6. --store-budget -----------------------------------------------------------------------


def test_past_the_store_budget_the_oldest_of_the_largest_queue_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Limits(monkeypatch, durable=True, store_budget=2_000)
    _big_and_small_away(h, small=7)
    metrics = h.metrics()
    assert metrics["messages_dropped_store_budget"] == 2
    assert metrics["bytes_queued_store"] == 2_000 and metrics["store_budget"] == 2_000
    # The store holds what the queues count: the drops were written as well.
    assert h.store is not None
    stored = h.store.load().subscriptions
    assert {s.topic: s.queued for s in stored if s.session_id == "BIG"} == {"big": 13}
    reg, big = h.back("BIG")
    assert (reg.dropped, reg.queued) == (2, 13)
    assert [d.seq for d in big] == list(range(3, 16))
    reg, small = h.back("SMALL")
    assert (reg.dropped, reg.queued) == (0, 7) and len(small) == 7


# --- a real broker ---------------------------------------------------------------------------


def _metrics(broker: Broker) -> dict[str, int]:
    answer = broker._refs["subscribers"].ask(GetMetrics(), timeout=10)
    assert isinstance(answer, dict)
    return answer


@pytest.mark.parametrize("durable", [False, True])
def test_a_real_broker_keeps_a_session_within_its_bytes_and_tells_it(
    start_broker: Callable[..., Broker], dial: Dial, tmp_path: Path, durable: bool
) -> None:
    broker = start_broker(
        session_queue_bytes=4 * KiB,
        max_subscriptions=2,
        data_dir=tmp_path / "data" if durable else None,
    )
    sub = dial(broker)
    reg = registered(sub.register("sensor"))
    subscribe(sub, "a")
    subscribe(sub, "b")
    req = sub.next_req()
    sub.send(Subscribe(req=req, topic="c"))
    assert_error(sub.recv(), "quota_exceeded", req)
    sub.close()
    wait_for(lambda: broker.stats()["connected"] == 0)
    pub = dial(broker)
    registered(pub.register("publisher"))
    publish_confirmed(pub, "a", [bytes([n]) * KiB for n in range(4)])
    publish_confirmed(pub, "b", [b"b" * KiB])  # 5 KiB for a session of 4: a's oldest goes
    assert _metrics(broker)["messages_dropped_session_bytes"] == 1
    back = dial(broker)
    back.send(resume_frame(back.next_req(), "sensor", reg))
    again = registered(back.recv())
    assert (again.dropped, again.queued) == (1, 4)
    got = [back.recv() for _ in range(4)]
    assert [(d.topic, d.seq) for d in got if isinstance(d, Deliver)] == [
        ("a", 2),
        ("a", 3),
        ("a", 4),
        ("b", 1),
    ]


# --- the default memory budget ---------------------------------------------------------------


def test_the_cgroup_limit_is_the_tightest_of_v2_and_v1_at_the_root(tmp_path: Path) -> None:
    nowhere = tmp_path / "no-proc-cgroup"
    assert cgroup_limit(tmp_path, nowhere) is None  # no cgroup files at all
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("536870912\n")
    assert cgroup_limit(tmp_path, nowhere) == 512 << 20  # v1
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_limit(tmp_path, nowhere) is None  # v1's "no limit"
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_limit(tmp_path, nowhere) is None  # v2, no limit
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert cgroup_limit(tmp_path, nowhere) == 1 << 30


def test_the_cgroup_limit_of_the_process_group_or_a_parent_applies(tmp_path: Path) -> None:
    proc = tmp_path / "proc-self-cgroup"
    root = tmp_path / "cgroup"
    service = root / "system.slice" / "tether.service"
    service.mkdir(parents=True)
    (service / "memory.max").write_text("max\n")
    proc.write_text("0::/system.slice/tether.service\n")
    assert cgroup_limit(root, proc) is None
    (root / "system.slice" / "memory.max").write_text(f"{2 << 30}\n")  # the slice's
    assert cgroup_limit(root, proc) == 2 << 30
    (service / "memory.max").write_text(f"{1 << 30}\n")  # the service's own, tighter
    assert cgroup_limit(root, proc) == 1 << 30
    # cgroup v1: the memory controller's line names the group.
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{3 << 30}\n")
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_limit(v1, proc) == 3 << 30


def test_the_default_budget_is_a_quarter_of_the_least_known(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    nowhere = tmp_path / "no-proc-cgroup"
    assert available_memory(cgroup, meminfo, nowhere) == 8_000_000 * 1024
    assert default_memory_budget(cgroup, meminfo, nowhere) == 2_000_000 * 1024
    (cgroup / "memory.max").write_text(f"{1 << 30}\n")  # a container's limit is lower
    assert default_memory_budget(cgroup, meminfo, nowhere) == 1 << 28
    # No MemAvailable: the machine's physical memory (never nothing).
    meminfo.write_text("MemTotal: 1 kB\n")
    assert default_memory_budget(tmp_path / "none", meminfo, nowhere) > 0


def test_this_machine_has_a_default_budget() -> None:
    assert 0 < default_memory_budget() <= available_memory()


def test_a_real_durable_broker_past_its_memory_budget_moves_backlogs_to_disk_and_loses_none(
    start_broker: Callable[..., Broker], dial: Dial, tmp_path: Path
) -> None:
    broker = start_broker(memory_budget=16 * KiB, data_dir=tmp_path / "data")
    sub = dial(broker)
    reg = registered(sub.register("sensor"))
    subscribe(sub, "t")
    sub.close()
    wait_for(lambda: broker.stats()["connected"] == 0)
    pub = dial(broker)
    registered(pub.register("publisher"))
    payloads = [n.to_bytes(2, "big") * 256 for n in range(300)]  # 512 bytes each: 150 KiB
    for start in range(0, len(payloads), 50):
        publish_confirmed(pub, "t", payloads[start : start + 50])
    metrics = _metrics(broker)
    assert metrics["messages_dropped_memory_budget"] == 0 and metrics["queues_spilled"] >= 1
    assert metrics["bytes_queued_memory"] <= 16 * KiB
    assert metrics["bytes_queued_store"] == 300 * 512
    back = dial(broker)
    back.send(resume_frame(back.next_req(), "sensor", reg))
    again = registered(back.recv())
    assert (again.dropped, again.queued) == (0, 300)
    got = recv_acking(back, 300)
    assert [d.payload for d in got] == payloads
    assert [d.seq for d in got] == list(range(1, 301))


def test_a_real_durable_broker_past_its_store_budget_drops_from_the_largest_and_stores_that(
    start_broker: Callable[..., Broker], dial: Dial, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    broker = start_broker(store_budget=8 * KiB, data_dir=data)
    regs = {}
    for client_id, topic in (("big", "b"), ("small", "s")):
        sub = dial(broker)
        regs[client_id] = registered(sub.register(client_id))
        subscribe(sub, topic)
        sub.close()
    wait_for(lambda: broker.stats()["connected"] == 0)
    pub = dial(broker)
    registered(pub.register("publisher"))
    publish_confirmed(pub, "b", [bytes([n]) * KiB for n in range(12)])
    publish_confirmed(pub, "s", [b"s" * KiB for _ in range(4)])
    metrics = _metrics(broker)
    assert metrics["messages_dropped_store_budget"] == 8
    assert metrics["bytes_queued_store"] == 8 * KiB
    pub.close()
    # What the store holds agrees: after a restart, the same queues and counts.
    broker.stop()
    broker = start_broker(store_budget=8 * KiB, data_dir=data)
    small = dial(broker)
    small.send(resume_frame(small.next_req(), "small", regs["small"]))
    reg = registered(small.recv())
    assert (reg.dropped, reg.queued) == (0, 4)
    big = dial(broker)
    big.send(resume_frame(big.next_req(), "big", regs["big"]))
    reg = registered(big.recv())
    assert (reg.dropped, reg.queued) == (8, 4)
    got = recv_acking(big, 4)
    assert [(d.seq, d.payload) for d in got] == [(n + 1, bytes([n]) * KiB) for n in range(8, 12)]
