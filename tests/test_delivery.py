"""The delivery step alone (`take_within`): pure, no actors, no sockets.

Its contract is the one-frame-at-a-time loop written out below as the reference: each queue in
turn tells its untold drops, then sends its oldest unsent messages while the credit is above
zero and the delivery window has room, each costing its encoded size. `take_within` works a run
at a time (encoding only as far as the credit can reach, then cutting exactly) and must give
the same frames, counts and credit, whatever the sizes, seqs, redeliveries and credit.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tether.broker.delivery import take_within
from tether.broker.queues import SubscriptionQueue
from tether.protocol import Dropped, encode, encode_deliver

# Seqs across the width steps of their encoding (1, 2, 3, 5 and 9 bytes).
first_seqs = st.sampled_from([1, 100, 127, 128, 250, 255, 256, 65_530, 65_536, (1 << 32) - 3])


def reference(
    queues: list[SubscriptionQueue], credit: int
) -> tuple[list[bytes], int, int, list[tuple[str, int]] | None]:
    frames: list[bytes] = []
    sent = 0
    told: list[tuple[str, int]] = []
    for q in queues:
        if q.dropped_live:
            frames.append(encode(Dropped(topic=q.topic, count=q.dropped_live)))
            told.append((q.topic, q.dropped_live))
            q.dropped_live = 0
        while credit > 0 and q.sendable():
            seq, payload = q.pending[0]
            frame = encode_deliver(q.topic, seq, payload, seq <= q.redeliver_upto)
            q.take_many(1)
            frames.append(frame)
            credit -= len(frame)
            sent += 1
    return frames, sent, credit, told or None


@st.composite
def queues(draw: st.DrawFn, topic: str) -> SubscriptionQueue:
    """A queue in any state the broker can leave one in: some sent and unacked (then maybe
    put back for redelivery, after a reconnect), some waiting, some drops not yet told."""
    sizes = draw(st.lists(st.sampled_from([0, 1, 5, 200, 255, 256, 300, 70_000]), max_size=50))
    # Any bound, or one whose window (half of it) is about as long as the queue.
    near = [max(1, 2 * len(sizes) + k) for k in (-2, -1, 0, 1)]
    max_count = draw(st.integers(1, 60) | st.sampled_from(near))
    q = SubscriptionQueue(topic, max_count=max_count, max_bytes=1 << 30, next_seq=draw(first_seqs))
    for i, size in enumerate(sizes):
        q.push(bytes([i % 256]) * size, connected=True)
    q.take_many(draw(st.integers(0, q.sendable())))
    if draw(st.booleans()):
        q.requeue_unacked()
        q.take_many(draw(st.integers(0, q.sendable())))
    q.dropped_live += draw(st.sampled_from([0, 0, 3]))
    return q


def _copy(q: SubscriptionQueue) -> SubscriptionQueue:
    twin = SubscriptionQueue(q.topic, max_count=q.max_count, max_bytes=q.max_bytes)
    for name in ("next_seq", "bytes", "redeliver_upto", "dropped_live", "dropped_away"):
        setattr(twin, name, getattr(q, name))
    twin.pending.extend(q.pending)
    twin.unacked.extend(q.unacked)
    return twin


def _boundaries(qs: tuple[SubscriptionQueue, ...]) -> list[int]:
    """The credits at which the reference stops exactly at a delivery's end: where a cut off
    by one frame would show."""
    sums, total = [], 0
    for q in map(_copy, qs):
        while q.sendable():
            seq, payload = q.pending[0]
            q.take_many(1)
            total += len(encode_deliver(q.topic, seq, payload, seq <= q.redeliver_upto))
            sums.append(total)
    return sums


@settings(max_examples=400, deadline=None)
@given(
    qs=st.lists(st.sampled_from(["t", "a/longer/topic/name" * 4]), min_size=1, max_size=3).flatmap(
        lambda topics: st.tuples(*[queues(topic) for topic in topics])
    ),
    data=st.data(),
)
@example(qs=(), data=None)
def test_takes_like_one_frame_at_a_time(
    qs: tuple[SubscriptionQueue, ...], data: st.DataObject | None
) -> None:
    credits = st.one_of(st.integers(-50, 2_000), st.sampled_from([1 << 20, 200_000]))
    exact = _boundaries(qs)
    if exact:
        # Exactly at a frame's end, or one byte either side.
        credits |= st.tuples(st.sampled_from(exact), st.integers(-1, 1)).map(sum)
    credit = data.draw(credits, label="credit") if data is not None else 100
    twins = [_copy(q) for q in qs]
    before = [(list(q.unacked), list(q.pending)) for q in qs]
    frames, sent, left, told = take_within(qs, credit)
    assert (frames, sent, left, told) == reference(twins, credit)
    # The state left behind is the reference's too.
    for q, twin in zip(qs, twins, strict=True):
        assert (list(q.unacked), list(q.pending)) == (list(twin.unacked), list(twin.pending))
        assert q.dropped_live == 0
    sizes: list[int] = []  # of the deliveries, in the order they went
    for q, (unacked, pending) in zip(qs, before, strict=True):
        taken = len(q.unacked) - len(unacked)
        # Nothing lost, nothing reordered: what was taken is the head of `pending`, in order,
        # now the tail of `unacked`, under the seqs it was queued with.
        assert list(q.unacked) == unacked + pending[:taken]
        assert list(q.pending) == pending[taken:]
        assert len(q.unacked) <= q.window
        sizes += [
            len(encode_deliver(q.topic, seq, payload, seq <= q.redeliver_upto))
            for seq, payload in pending[:taken]
        ]
        if pending[taken:] and len(q.unacked) < q.window:
            # Stopped short of the window and of the queue's end: the credit ran out.
            assert credit - sum(sizes) <= 0
    assert sent == len(sizes)
    assert left == credit - sum(sizes)
    # Frames go while credit > 0: all but the last fitted below it, so the credit is exceeded
    # by one frame at most.
    if sizes:
        assert sum(sizes[:-1]) < credit
    assert frames.count(b"") == 0


def test_drops_are_told_first_whatever_the_credit() -> None:
    q = SubscriptionQueue("t", max_count=2, max_bytes=1 << 20)
    for payload in (b"a", b"b", b"c"):
        q.push(payload, connected=True)  # "a" goes: dropped while connected
    assert q.dropped_live == 1
    frames, sent, left, told = take_within([q], 0)
    assert (frames, sent, left, told) == ([encode(Dropped(topic="t", count=1))], 0, 0, [("t", 1)])
    assert q.dropped_live == 0 and list(q.pending) == [(2, b"b"), (3, b"c")]
    frames, sent, left, told = take_within([q], 1)
    assert frames == [encode_deliver("t", 2, b"b")] and sent == 1 and told is None
    assert left == 1 - len(frames[0])


def test_credit_runs_on_from_queue_to_queue() -> None:
    a = SubscriptionQueue("a", max_count=10, max_bytes=1 << 20)
    b = SubscriptionQueue("b", max_count=10, max_bytes=1 << 20)
    for q in (a, b):
        for _ in range(3):
            q.push(b"x" * 10, connected=True)
    size = len(encode_deliver("a", 1, b"x" * 10))
    frames, sent, left, _ = take_within([a, b], 3 * size + 1)
    # All of "a" leaves credit 1: one frame of "b" still goes, and overshoots.
    assert sent == 4 and len(frames) == 4 and left == 1 - size
    assert (len(a.pending), len(b.pending)) == (0, 2)
