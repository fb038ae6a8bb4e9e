"""Property tests of the pure `SubscriptionQueue` (one subscription's dead-letter queue).

A hypothesis state machine drives random sequences of push / take / ack / requeue_unacked
against a deliberately naive model: the list of held messages in seq order, of which a prefix
has been sent and not acked (taking sends the oldest unsent one while fewer than `window` are
unacked; a requeue makes them all unsent again, to be flagged as redeliveries). Overflow drops
the oldest unsent message, or the oldest sent one when only the newest is unsent, never the
newest. Every pushed message is tracked until it is acked or dropped: seqs held are strictly
increasing, and every gap between them is a counted drop.

The broker sends through `sendable`/`take_many` and flags redeliveries by `redeliver_upto`;
`take` and `is_redelivery` below are those, one message at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from tether.broker.queues import SubscriptionQueue

payloads = st.binary(max_size=12)


def take(q: SubscriptionQueue) -> tuple[int, bytes] | None:
    """The next message to send, now counted as sent and unacked (None: nothing to send, or
    the delivery window is full until an ack)."""
    if not q.sendable():
        return None
    entry = q.pending[0]
    q.take_many(1)
    return entry


def is_redelivery(q: SubscriptionQueue, seq: int) -> bool:
    """Whether a delivery of `seq` goes out flagged `redelivered`."""
    return seq <= q.redeliver_upto


@dataclass
class Held:
    seq: int
    payload: bytes
    sends: int = 0  # how many times `take` handed it out


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.q: SubscriptionQueue | None = None
        self.held: list[Held] = []
        self.n_sent = 0  # held[:n_sent] is what was sent and not acked
        self.next_seq = 1
        self.pushed: dict[int, bytes] = {}
        self.acked: set[int] = set()
        self.dropped: set[int] = set()
        self.dropped_live = 0
        self.dropped_away = 0

    @initialize(
        max_count=st.integers(1, 6),
        max_bytes=st.integers(0, 40),
        first_seq=st.integers(1, 50),
    )
    def start(self, max_count: int, max_bytes: int, first_seq: int) -> None:
        self.q = SubscriptionQueue(
            "t", max_count=max_count, max_bytes=max_bytes, next_seq=first_seq
        )
        self.next_seq = first_seq

    @property
    def queue(self) -> SubscriptionQueue:
        assert self.q is not None
        return self.q

    def _model_push(self, payload: bytes, connected: bool) -> int:
        """The model's side of one push; returns how many it drops."""
        q = self.queue
        seq = self.next_seq
        self.next_seq += 1
        self.pushed[seq] = payload
        self.held.append(Held(seq, payload))
        # The model's own overflow rule: the oldest go, unsent ones first (a sent one has most
        # likely arrived), never the one just pushed.
        expected_drops = 0
        while len(self.held) > q.max_count or (
            sum(len(h.payload) for h in self.held) > q.max_bytes and len(self.held) > 1
        ):
            if len(self.held) - self.n_sent > 1:
                oldest = self.held.pop(self.n_sent)
            else:
                oldest = self.held.pop(0)
                self.n_sent -= 1
            self.dropped.add(oldest.seq)
            expected_drops += 1
        if connected:
            self.dropped_live += expected_drops
        else:
            self.dropped_away += expected_drops
        return expected_drops

    @rule(payload=payloads, connected=st.booleans())
    def push(self, payload: bytes, connected: bool) -> None:
        q = self.queue
        seq = self.next_seq
        dropped = q.push(payload, connected=connected)
        assert dropped == self._model_push(payload, connected)
        # The newest message is always kept, under the seq it was given in push order.
        assert q.pending and q.pending[-1] == (seq, payload), "newest message dropped"
        assert q.next_seq == self.next_seq

    @rule(batch=st.lists(payloads, min_size=1, max_size=8), connected=st.booleans())
    def push_many(self, batch: list[bytes], connected: bool) -> None:
        """The broker's batch path: the same as pushing each in turn, fitting or not."""
        q = self.queue
        size = sum(map(len, batch))
        room_count, room_bytes = q.room()
        fits = len(batch) <= room_count and size <= room_bytes
        dropped = q.push_many(batch, size, connected=connected)
        assert dropped == sum([self._model_push(payload, connected) for payload in batch])
        if fits:  # a promise that nothing is pushed out
            assert dropped == 0
        assert q.next_seq == self.next_seq

    @rule(data=st.data())
    def take_many(self, data: st.DataObject) -> None:
        """The broker's batch path: the same as `take` count times."""
        q = self.queue
        sendable = min(len(self.held) - self.n_sent, max(0, q.window - self.n_sent))
        assert q.sendable() == sendable
        count = data.draw(st.integers(0, sendable), label="count")
        expected = [(h.seq, h.payload) for h in self.held[self.n_sent : self.n_sent + count]]
        assert list(q.pending)[:count] == expected
        for h in self.held[self.n_sent : self.n_sent + count]:
            assert is_redelivery(q, h.seq) == (h.sends > 0)
            h.sends += 1
        q.take_many(count)
        self.n_sent += count

    @rule()
    def take(self) -> None:
        q = self.queue
        entry = take(q)
        # At most `window` sent and unacked at once (a delivery window).
        assert 1 <= q.window <= q.max_count
        if self.n_sent == len(self.held) or self.n_sent >= q.window:
            assert entry is None
            return
        expected = self.held[self.n_sent]
        assert entry == (expected.seq, expected.payload)
        # Flagged as a redelivery exactly when an earlier connection was sent it already.
        assert is_redelivery(q, entry[0]) == (expected.sends > 0)
        expected.sends += 1
        self.n_sent += 1

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        q = self.queue
        lo = self.held[0].seq - 2 if self.held else self.next_seq - 2
        seq = data.draw(st.integers(max(0, lo), self.next_seq + 1), label="seq")
        pending_before = list(q.pending)
        removed = q.ack(seq)
        expected = 0
        while self.n_sent and self.held[0].seq <= seq:
            self.acked.add(self.held.pop(0).seq)
            self.n_sent -= 1
            expected += 1
        assert removed == expected
        # Only sent entries go: whatever was pending stays, however high the ack.
        assert list(q.pending) == pending_before

    @rule()
    def requeue_unacked(self) -> None:
        self.queue.requeue_unacked()
        self.n_sent = 0

    @invariant()
    def matches_model(self) -> None:
        if self.q is None:
            return
        q = self.q
        assert list(q.unacked) == [(h.seq, h.payload) for h in self.held[: self.n_sent]]
        assert list(q.pending) == [(h.seq, h.payload) for h in self.held[self.n_sent :]]

    @invariant()
    def bounds_and_accounting(self) -> None:
        if self.q is None:
            return
        q = self.q
        seqs = [seq for seq, _ in (*q.unacked, *q.pending)]
        # Strictly increasing, oldest first, ending at the newest pushed; the gaps are drops.
        if seqs:
            assert seqs == sorted(set(seqs))
            assert seqs[-1] == q.next_seq - 1
            assert set(range(seqs[0], seqs[-1] + 1)) - set(seqs) <= self.dropped
        assert len(q) == len(seqs) <= q.max_count
        assert q.bytes == sum(len(payload) for _, payload in (*q.unacked, *q.pending))
        assert q.bytes <= q.max_bytes or len(q) <= 1
        assert q.dropped_live == self.dropped_live
        assert q.dropped_away == self.dropped_away
        assert self.dropped_live + self.dropped_away == len(self.dropped)
        # Every pushed message is exactly one of: acked, dropped (and counted), still held.
        held = set(seqs)
        assert not (self.acked & self.dropped)
        assert not (held & (self.acked | self.dropped))
        assert self.acked | self.dropped | held == set(self.pushed)
        for seq, payload in (*q.unacked, *q.pending):
            assert self.pushed[seq] == payload


QueueMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestSubscriptionQueue = QueueMachine.TestCase


@settings(max_examples=100, deadline=None)
@given(st.lists(payloads, min_size=1, max_size=20), st.integers(1, 30))
def test_requeued_entries_come_first_flagged(batch: list[bytes], split: int) -> None:
    """Sent-but-unacked messages go out again, flagged, before anything pushed later."""
    q = SubscriptionQueue("t", max_count=100, max_bytes=10_000)
    for p in batch:
        q.push(p, connected=True)
    sent = [take(q) for _ in range(min(split, len(batch)))]
    q.requeue_unacked()
    q.push(b"newer", connected=False)
    again = [take(q) for _ in range(len(batch) + 1)]
    assert None not in again and take(q) is None
    assert [e[0] for e in again] == list(range(1, len(batch) + 2))  # type: ignore[index]
    assert again[-1] == (len(batch) + 1, b"newer")
    flagged = [is_redelivery(q, e[0]) for e in again]  # type: ignore[index]
    assert flagged == [True] * len(sent) + [False] * (len(batch) + 1 - len(sent))


def test_oversized_message_is_kept_alone() -> None:
    q = SubscriptionQueue("t", max_count=10, max_bytes=5)
    assert q.push(b"abc", connected=True) == 0
    assert q.push(b"0123456789", connected=False) == 1
    assert list(q.pending) == [(2, b"0123456789")]
    assert (q.dropped_live, q.dropped_away, q.bytes) == (0, 1, 10)


# --- the tail on disk (with a store) ----------------------------------------------------------


def _stored_queue(max_count: int = 10, spill: int = 2) -> SubscriptionQueue:
    q = SubscriptionQueue("t", max_count=max_count, max_bytes=1 << 20)
    q.committed = 0
    q.dropped_seqs = []
    q.spill = spill
    return q


def test_an_away_queue_keeps_a_head_in_memory_and_counts_the_tail() -> None:
    q = _stored_queue(spill=2)
    for i in range(1, 6):
        q.push(b"m%d" % i, connected=False)
    assert [s for s, _ in q.pending] == [1, 2]
    assert (q.disk, q.disk_after, len(q), q.bytes) == (3, 2, 5, 10)
    q.committed = 5
    assert q.start_read() == 2
    assert q.page_in([(3, b"m3"), (4, b"m4"), (5, b"m5")], 10) == 3
    assert [s for s, _ in q.pending] == [1, 2, 3, 4, 5]
    assert (q.disk, q.disk_bytes, len(q), q.bytes, q.reading) == (0, 0, 5, 10, False)
    # With the tail gone and the session back, pushes go to memory again.
    q.spill = 0
    q.push(b"m6", connected=True)
    assert [s for s, _ in q.pending][-1] == 6 and q.disk == 0


def test_overflow_drops_the_head_then_the_oldest_of_the_tail() -> None:
    q = _stored_queue(max_count=3, spill=1)
    for i in range(1, 6):
        q.push(b"m%d" % i, connected=False)
    # 1 was the head in memory (a `Discard`), 2 the oldest of the tail (a `DiscardOldest`).
    assert q.dropped_seqs == [1]
    assert (q.disk_discarded, q.disk, len(q), q.dropped_away) == (1, 3, 3, 2)
    assert q.start_read() == 1  # the store holds 3, 4, 5 after the discards
    q.push(b"m6", connected=False)  # drops the tail's oldest (3) while the read is out
    assert (q.read_skip, q.disk, q.disk_discarded) == (1, 3, 2)
    assert q.page_in([(3, b"m3"), (4, b"m4"), (5, b"m5")], 10) == 2
    assert [s for s, _ in q.pending] == [4, 5]
    assert (q.disk, q.disk_after, len(q)) == (1, 5, 3)


def test_trim_moves_what_is_stored_beyond_the_head_to_the_tail() -> None:
    q = _stored_queue(spill=0)
    for i in range(1, 6):
        q.push(b"m%d" % i, connected=True)
    q.spill = 2
    q.trim()  # nothing is committed yet: the tail must be stored
    assert q.disk == 0 and len(q.pending) == 5
    q.committed = 5
    q.trim()
    assert [s for s, _ in q.pending] == [1, 2]
    assert (q.disk, q.disk_after, q.disk_bytes, len(q)) == (3, 2, 6, 5)


def test_a_short_read_corrects_a_tail_counted_too_long() -> None:
    q = _stored_queue(spill=1)
    for i in range(1, 5):
        q.push(b"m%d" % i, connected=False)
    q.committed = 4
    q.start_read()
    # The store has only 2 and 4 (3's commit failed and was counted in the tail anyway).
    assert q.page_in([(2, b"m2"), (4, b"m4")], 10) == 2
    assert (q.disk, q.disk_bytes, len(q), q.bytes) == (0, 0, 3, 6)


def test_sendable_stops_at_the_committed_seq() -> None:
    q = _stored_queue(spill=0)
    for i in range(1, 6):
        q.push(b"m%d" % i, connected=True)
    assert q.sendable() == 0
    q.committed = 3
    assert q.sendable() == 3
    q.take_many(3)
    assert q.sendable() == 0
    q.committed = 5
    assert q.sendable() == 2
