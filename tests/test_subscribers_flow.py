"""Delivery credit, the delivery window and held publishers, at the SubscriberManager's batch
path: the actor with its fan-out, delivery step and held publishers together.

The manager is driven directly (its `on_receive`, no loop, no sockets); a connection is a ref
that records what it is told and gives no credit back unless the test does. The broker sends a
subscriber deliveries while its credit is above zero, one frame at a time in effect: so a flush
stops at the first frame that uses the credit up (it may overshoot by that one frame), and never
has more than the window sent and unacked. (Each part alone: tests/test_fanout.py,
tests/test_delivery.py, tests/test_held.py.)
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tether.broker import journal, subscribers
from tether.broker.fanout import Fanout
from tether.broker.journal import Committed
from tether.broker.messages import (
    Attach,
    ConnHandle,
    Credit,
    Detach,
    GetStats,
    Outbound,
    SessionOps,
    Throttle,
)
from tether.broker.store import PutSession, SessionRecord
from tether.broker.store_memory import MemoryStore
from tether.broker.subscribers import SubscriberManager, _WaitOver
from tether.protocol import (
    BROKER_FRAME_TYPES,
    NEED_DATA,
    Ack,
    Deliver,
    FrameDecoder,
    Ok,
    Publish,
    Subscribe,
    Unregister,
    encode,
)

TOPIC = "flow/t"


class Ref:
    def __init__(self) -> None:
        self.told: list[Any] = []

    def tell(self, message: Any) -> None:
        self.told.append(message)


def _deliveries(data: bytes) -> list[tuple[Deliver, int]]:
    """The deliver frames in `data`, each with its encoded size."""
    decoder = FrameDecoder(max_frame=1 << 24, accept=BROKER_FRAME_TYPES)
    decoder.receive_data(data)
    out = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        if isinstance(frame, Deliver):
            out.append((frame, len(encode(frame))))
    return out


class FakeLoop:
    def __init__(self) -> None:
        self.timers: list[Any] = []

    def call_later(self, delay: float, callback: Any) -> None:
        self.timers.append(callback)


def _record(session_id: str) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        client_id=session_id.lower(),
        username="alice",
        keepalive=60,
        metadata={},
        token_hash=b"",
        previous_hash=None,
        created=0.0,
        last_seen=0.0,
    )


def _stats(sm: SubscriberManager) -> dict[str, int]:
    stats = sm.on_receive(GetStats())
    assert isinstance(stats, dict)
    return stats


@settings(max_examples=60, deadline=None)
@given(
    high_water=st.sampled_from([1, 40, 120, 500, 4000, 1 << 20]),
    queue_limit=st.integers(2, 400),
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=300),
    first_seq=st.sampled_from([1, 100, 250, 65500]),  # across the seq's width steps
    per_batch=st.integers(1, 400),
)
@example(high_water=4000, queue_limit=400, sizes=[0] * 300, first_seq=250, per_batch=300)
@example(high_water=1 << 20, queue_limit=400, sizes=[300] * 300, first_seq=100, per_batch=300)
def test_credit_and_window_cut_like_one_frame_at_a_time(
    high_water: int, queue_limit: int, sizes: list[int], first_seq: int, per_batch: int
) -> None:
    # A batch that fits the queue is never held back (the queue is drained between batches).
    per_batch = min(per_batch, queue_limit)
    sm = SubscriberManager(
        FakeLoop(),  # type: ignore[arg-type]
        0,
        queue_limit=queue_limit,
        queue_bytes=1 << 30,
        outbound_high_water=high_water,
    )
    pub_ref, sub_ref = Ref(), Ref()
    pub = ConnHandle(1, pub_ref, "p")  # type: ignore[arg-type]
    sub = ConnHandle(2, sub_ref, "s")  # type: ignore[arg-type]
    sm.on_receive(Attach("P", "pub", pub, 0, "tp", False, 60, 60))
    sm.on_receive(Attach("S", "sub", sub, 0, "ts", False, 60, 60))
    sm._fanout.sessions["S"].next_seqs[TOPIC] = first_seq  # as if subscribed before
    sm.on_receive(SessionOps("S", sub, (Subscribe(req=1, topic=TOPIC),)))
    q = sm._fanout.sessions["S"].queues[TOPIC]
    window = max(1, queue_limit // 2)
    payloads = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    published: list[bytes] = []
    received: list[Deliver] = []
    credit = high_water
    for start in range(0, len(payloads), per_batch):
        batch = payloads[start : start + per_batch]
        sm.on_receive(SessionOps("P", pub, tuple(Publish(topic=TOPIC, payload=p) for p in batch)))
        published += batch
        # Let it drain: give credit back and ack, as a subscriber that keeps up would.
        while True:
            told, sub_ref.told = sub_ref.told, []
            outbound = [m for m in told if isinstance(m, Outbound) and m.credit]
            if not outbound:
                break
            for message in outbound:
                frames = _deliveries(message.data)
                sizes_sent = [size for _, size in frames]
                assert message.credit == sum(sizes_sent)
                # Frames go while credit > 0: all but the last fitted below it.
                assert sum(sizes_sent[:-1]) < credit
                credit -= message.credit
                received += [frame for frame, _ in frames]
            # ...and stop only there, at the window, or with nothing left to send.
            assert len(q.unacked) <= window
            if credit > 0:
                assert not q.pending or len(q.unacked) == window
            seq = received[-1].seq
            sm.on_receive(SessionOps("S", sub, (Ack(topic=TOPIC, seq=seq),)))
            sm.on_receive(Credit("S", 2, high_water - credit))
            credit = high_water
    assert [d.seq for d in received] == list(range(first_seq, first_seq + len(payloads)))
    assert [d.payload for d in received] == published
    assert not any(d.redelivered for d in received)
    assert _stats(sm)["dropped"] == 0
    assert _stats(sm)["delivered"] == len(published)


class OneByOneFanout(Fanout):
    """The reference: every publish of a run checked and queued on its own."""

    __slots__ = ()

    def publish_many(
        self, topic: str, run: list[Publish], touched: dict[str, Any], *, force: bool
    ) -> int:
        for taken, publish in enumerate(run):
            if not self.publish(topic, publish.payload, touched, force=force):
                return taken
        return len(run)


class OneByOne(SubscriberManager):
    """The manager with the reference fan-out."""

    def __init__(self, *args: Any, queue_limit: int, queue_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, queue_limit=queue_limit, queue_bytes=queue_bytes, **kwargs)
        self._fanout = OneByOneFanout(queue_limit=queue_limit, queue_bytes=queue_bytes)


def _run_publishes(
    manager: type[SubscriberManager],
    sizes: list[int],
    reqs: list[bool],
    queue_limit: int,
    queue_bytes: int,
) -> tuple[list[Any], list[bytes], list[tuple[int, int]], tuple[int, int]]:
    """Publish `sizes` in one batch to two connected subscribers and one away, then release
    the held rest by acks and by the wait running out."""
    sm = manager(
        FakeLoop(),  # type: ignore[arg-type]
        0,
        queue_limit=queue_limit,
        queue_bytes=queue_bytes,
        outbound_high_water=1 << 20,
    )
    refs = [Ref() for _ in range(4)]
    conns = [ConnHandle(i, ref, str(i)) for i, ref in enumerate(refs)]  # type: ignore[arg-type]
    for i, conn in enumerate(conns):
        sm.on_receive(Attach(f"S{i}", f"c{i}", conn, 0, "t", False, 60, 60))
        if i:
            sm.on_receive(SessionOps(f"S{i}", conn, (Subscribe(req=1, topic=TOPIC),)))
    sm.on_receive(Detach("S3", 3))  # away: its queue drops its oldest instead
    ops = [
        Publish(topic=TOPIC, payload=bytes([i % 256]) * n, req=i + 10 if req else None)
        for i, (n, req) in enumerate(zip(sizes, reqs, strict=True))
    ]
    sm.on_receive(SessionOps("S0", conns[0], tuple(ops)))
    # Subscriber 1 acks what it has, subscriber 2 never does: the wait then runs out.
    for _ in range(3):
        delivered = _deliveries(b"".join(m.data for m in refs[1].told if isinstance(m, Outbound)))
        if delivered:
            seq = delivered[-1][0].seq
            sm.on_receive(SessionOps("S1", conns[1], (Ack(topic=TOPIC, seq=seq),)))
        token = sm._held.token_of(0)
        if token is not None:
            sm.on_receive(_WaitOver(0, token))
    sessions = sm._fanout.sessions
    queues = [
        (len(sessions[f"S{i}"].queues[TOPIC]), sessions[f"S{i}"].queues[TOPIC].bytes)
        for i in (1, 2, 3)
    ]
    streams = [b"".join(m.data for m in ref.told if isinstance(m, Outbound)) for ref in refs]
    told = [m for m in refs[0].told if not isinstance(m, Outbound)]
    stats = _stats(sm)
    return [*told, streams[0]], streams[1:], queues, (stats["published"], stats["dropped"])


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=40),
    data=st.data(),
    queue_limit=st.integers(1, 30),
    queue_bytes=st.integers(0, 600),
)
def test_a_run_of_publishes_is_taken_as_one_by_one(
    sizes: list[int], data: st.DataObject, queue_limit: int, queue_bytes: int
) -> None:
    """The run-at-a-time path holds back, drops, confirms and delivers exactly as the
    publish-by-publish path does."""
    reqs = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    runs = _run_publishes(SubscriberManager, sizes, reqs, queue_limit, queue_bytes)
    assert runs == _run_publishes(OneByOne, sizes, reqs, queue_limit, queue_bytes)


def test_a_held_publisher_waits_while_its_subscriber_makes_progress() -> None:
    """The publish wait counts time without progress of the subscriber holding a publisher
    back, not time without a turn: with many publishers held by one slow but moving
    subscriber, each ack renews the wait of all of them (else those at the back of the line
    would be forced and the subscriber would lose messages for being merely slow). A
    publisher held by another topic's subscriber keeps its wait."""
    sm = SubscriberManager(
        FakeLoop(),  # type: ignore[arg-type]
        0,
        queue_limit=2,
        queue_bytes=1 << 20,
        outbound_high_water=1 << 20,
    )
    refs = [Ref() for _ in range(5)]
    sub, p1, p2, p3, q = (ConnHandle(i, ref, str(i)) for i, ref in enumerate(refs))  # type: ignore[arg-type]
    for i, conn in enumerate((sub, p1, p2, p3, q)):
        sm.on_receive(Attach(f"S{i}", f"c{i}", conn, 0, "t", False, 60, 60))
    sm.on_receive(SessionOps("S0", sub, (Subscribe(req=1, topic="a"), Subscribe(req=2, topic="b"))))

    def publish(session: str, conn: ConnHandle, topic: str, n: int) -> None:
        ops = tuple(Publish(topic=topic, payload=b"x") for _ in range(n))
        sm.on_receive(SessionOps(session, conn, ops))

    publish("S1", p1, "a", 2)  # fills "a": one sent (the window), one waiting
    publish("S2", p2, "a", 1)
    publish("S3", p3, "a", 1)
    publish("S4", q, "b", 3)  # fills "b", its third held
    assert set(sm._held.conn_ids) == {2, 3, 4}
    tokens = {conn_id: sm._held.token_of(conn_id) for conn_id in sm._held.conn_ids}

    sm.on_receive(SessionOps("S0", sub, (Ack(topic="a", seq=1),)))  # room for one on "a"
    assert set(sm._held.conn_ids) == {3, 4}  # p2 took it; p3 still waits, behind
    assert sm._held.token_of(3) != tokens[3]  # ... with its wait renewed
    assert sm._held.token_of(4) == tokens[4]  # "b" made no progress
    sm.on_receive(_WaitOver(3, tokens[3]))  # type: ignore[arg-type]  # the old wait: nothing
    assert 3 in sm._held.conn_ids and _stats(sm)["dropped"] == 0
    sm.on_receive(_WaitOver(4, tokens[4]))  # type: ignore[arg-type]  # "b" stuck: forced
    assert 4 not in sm._held.conn_ids and _stats(sm)["dropped"] == 1


def test_an_unregister_in_a_held_batch_ends_the_wait_once() -> None:
    """A held batch that ends in `unregister`: when room comes, the publishes are taken and the
    session ends, which retries the held publishers from within that retry. The connection is
    let go exactly once (this once raised `KeyError`, leaving the other held ones untried)."""
    sm = SubscriberManager(
        FakeLoop(),  # type: ignore[arg-type]
        0,
        queue_limit=2,
        queue_bytes=1 << 20,
        outbound_high_water=1 << 20,
    )
    refs = [Ref() for _ in range(3)]
    sub, pub, other = (ConnHandle(i, ref, str(i)) for i, ref in enumerate(refs))  # type: ignore[arg-type]
    for i, conn in enumerate((sub, pub, other)):
        sm.on_receive(Attach(f"S{i}", f"c{i}", conn, 0, "t", False, 60, 60))
    sm.on_receive(SessionOps("S0", sub, (Subscribe(req=1, topic="a"),)))
    one = (Publish(topic="a", payload=b"x"),)
    sm.on_receive(SessionOps("S1", pub, (*one, *one, *one, Unregister(req=9))))
    sm.on_receive(SessionOps("S2", other, one))
    assert list(sm._held.conn_ids) == [1, 2]
    sm.on_receive(SessionOps("S0", sub, (Ack(topic="a", seq=1),)))  # room for one
    assert list(sm._held.conn_ids) == [2]
    throttles = [m.paused for m in refs[1].told if isinstance(m, Throttle)]
    assert throttles == [True, False]
    last = refs[1].told[-1]
    assert isinstance(last, Outbound) and last.close and last.session_ended
    assert _decode_one(last.data) == Ok(req=9)
    assert sm._held.token_of(2) is not None and _stats(sm)["sessions"] == 2
    stats = _stats(sm)
    assert (stats["published"], stats["dropped"], stats["queued"]) == (3, 0, 2)


def _decode_one(data: bytes) -> object:
    decoder = FrameDecoder(max_frame=1 << 24, accept=BROKER_FRAME_TYPES)
    decoder.receive_data(data)
    frame = decoder.next_frame()
    assert decoder.next_frame() is NEED_DATA
    return frame


# --- with a store: commit first, and a bounded backlog ---------------------------------------


class HoldingStore(MemoryStore):
    """Applies each batch at once but holds its `on_done` until the test calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.done: list[Any] = []

    def submit(self, batch: Any, on_done: Any) -> None:
        results: list[Any] = []
        super().submit(batch, results.append)
        self.done.append(lambda: on_done(results[0]))


@pytest.mark.parametrize(
    ("messages", "payload_bytes"),
    [(5, journal.COMMIT_BACKLOG_BYTES), (10_000, 5)],
    ids=["messages", "bytes"],
)
def test_nothing_goes_out_before_the_commit_and_a_backlog_pauses_the_publisher(
    monkeypatch: pytest.MonkeyPatch, messages: int, payload_bytes: int
) -> None:
    # The backlog is bounded in messages and in payload bytes: either pauses the publisher.
    monkeypatch.setattr(journal, "COMMIT_BACKLOG_BYTES", payload_bytes)
    store = HoldingStore()
    sm = SubscriberManager(
        FakeLoop(),  # type: ignore[arg-type]
        0,
        queue_limit=100,
        queue_bytes=1 << 30,
        outbound_high_water=1 << 20,
        store=store,
        commit_backlog=messages,
    )
    committed: list[Any] = []

    def tell(ref: Any, message: Any) -> bool:
        if isinstance(message, Committed):
            committed.append(message)
        else:
            ref.tell(message)
        return True

    # The actor tells, and so does its journal (the store's answers, throttles).
    monkeypatch.setattr(subscribers, "tell", tell)
    monkeypatch.setattr(journal, "tell", tell)

    def settle() -> None:
        while store.done or committed:
            while store.done:
                store.done.pop(0)()
            while committed:
                sm.on_receive(committed.pop(0))

    pub_ref, sub_ref = Ref(), Ref()
    pub = ConnHandle(1, pub_ref, "p")  # type: ignore[arg-type]
    sub = ConnHandle(2, sub_ref, "s")  # type: ignore[arg-type]
    store.submit((PutSession(_record("P")), PutSession(_record("S"))), lambda _e: None)
    settle()
    sm.on_receive(Attach("P", "pub", pub, 0, "tp", False, 60, 60))
    sm.on_receive(Attach("S", "sub", sub, 0, "ts", False, 60, 60))
    sm.on_receive(SessionOps("S", sub, (Subscribe(req=1, topic=TOPIC),)))
    settle()
    pub_ref.told.clear()
    sub_ref.told.clear()
    batch = tuple(Publish(topic=TOPIC, payload=b"%d" % i) for i in range(9))
    sm.on_receive(SessionOps("P", pub, (*batch, Publish(topic=TOPIC, payload=b"9", req=7))))
    # Stored, not yet committed: no `ok`, no deliveries, and the publisher is paused.
    assert pub_ref.told == [Throttle(True)]
    assert not [m for m in sub_ref.told if isinstance(m, Outbound) and m.data]
    settle()
    assert pub_ref.told[1:] == [Outbound(encode(Ok(req=7))), Throttle(False)]
    delivered = [d.payload for m in sub_ref.told for d, _ in _deliveries(m.data)]
    assert delivered == [b"%d" % i for i in range(10)]
    assert [s.queued for s in store.load().subscriptions] == [10]
