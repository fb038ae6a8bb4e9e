"""A hypothesis state machine: random batches of store operations (legal and not) go to the
SQLite store and to the `MemoryStore`, with the SQLite store closed and reopened at random.
After every step both give the same outcome (committed or rejected), the same snapshot and
the same queues, read a page at a time."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.store_helpers import read_all, session, submit
from tether.broker.store import (
    Ack,
    Append,
    DeleteSession,
    Discard,
    DiscardOldest,
    MarkSent,
    PutSession,
    SetDropped,
    SetHealth,
    SetTokens,
    StoreOp,
    Subscribe,
    Touch,
    Unsubscribe,
)
from tether.broker.store_memory import MemoryStore
from tether.broker.store_sqlite import SqliteStore

SESSIONS = ("s1", "s2", "s3")
TOPICS = ("a", "b")

sids = st.sampled_from(SESSIONS)
topics = st.sampled_from(TOPICS)
seqs = st.integers(0, 40)
small = st.integers(0, 5)
# What msgpack carries, as the frames' maps do (decoded, so always encodable again).
ints = st.integers(-(2**63), 2**64 - 1)
details = st.none() | st.dictionaries(st.sampled_from(["x", "y"]), ints | st.text(max_size=4))
times = st.floats(0, 2e9, allow_nan=False)
hashes = st.binary(min_size=32, max_size=32)

ops: st.SearchStrategy[StoreOp] = st.one_of(
    st.builds(
        lambda sid, keepalive, meta: PutSession(
            session(sid, f"c-{sid}", keepalive=keepalive, metadata=meta)
        ),
        sids,
        st.integers(1, 600),
        st.dictionaries(st.text(max_size=3), ints | st.binary(max_size=3), max_size=2),
    ),
    st.builds(DeleteSession, sids),
    st.builds(SetHealth, sids, st.none() | st.sampled_from(["ok", "degraded"]), details),
    st.builds(SetTokens, sids, hashes, st.none() | hashes),
    st.builds(Touch, sids, times, st.none() | times),
    st.builds(Subscribe, sids, topics, seqs),
    st.builds(Unsubscribe, sids, topics),
    st.builds(Append, sids, topics, seqs, st.lists(st.binary(max_size=6), max_size=4).map(tuple)),
    st.builds(Ack, sids, topics, seqs),
    st.builds(MarkSent, sids, topics, seqs),
    st.builds(Discard, sids, topics, st.lists(seqs, max_size=3).map(tuple)),
    st.builds(DiscardOldest, sids, topics, small),
    st.builds(SetDropped, sids, topics, small, small),
)


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tether-store-model-"))
        # "normal": durability is not what this test is about, and it is faster.
        self.sqlite = SqliteStore(self.dir / "data", sync="normal")
        self.memory = MemoryStore()

    def both(self, *batch: StoreOp) -> None:
        expected = submit(self.memory, *batch)
        got = submit(self.sqlite, *batch)
        assert type(got) is type(expected), (got, expected)

    @rule(batch=st.lists(ops, min_size=1, max_size=5))
    def random_batch(self, batch: list[StoreOp]) -> None:
        self.both(*batch)

    @rule(sid=sids, topic=topics, count=st.integers(1, 12), jump=st.integers(0, 3))
    def append_in_order(self, sid: str, topic: str, count: int, jump: int) -> None:
        """The usual append: at the queue's next seq (or a little past it, after drops)."""
        subs = {(r.session_id, r.topic): r for r in self.memory.load().subscriptions}
        sub = subs.get((sid, topic))
        first = (sub.next_seq if sub else 1) + jump
        self.both(Append(sid, topic, first, tuple(b"%d" % n for n in range(count))))

    @rule(sid=sids, topic=topics)
    def setup_subscription(self, sid: str, topic: str) -> None:
        self.both(PutSession(session(sid, f"c-{sid}")), Subscribe(sid, topic))

    @rule()
    def reopen(self) -> None:
        self.sqlite.close()
        self.sqlite = SqliteStore(self.dir / "data", sync="normal")

    @invariant()
    def same_state(self) -> None:
        snapshot = self.sqlite.load()
        assert snapshot == self.memory.load()
        for sid in SESSIONS:
            for topic in TOPICS:
                queue = read_all(self.sqlite, sid, topic, page=3)
                assert queue == read_all(self.memory, sid, topic, page=3)
                seqs = [seq for seq, _ in queue]
                assert seqs == sorted(set(seqs))
        for sub in snapshot.subscriptions:
            assert sub.active or sub.queued == 0

    def teardown(self) -> None:
        self.sqlite.close()
        shutil.rmtree(self.dir, ignore_errors=True)


StoreModel.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_store_model = StoreModel.TestCase
