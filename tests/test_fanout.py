"""The fan-out alone (`Fanout`): the topic index and publishing into queues. Pure, no actors.

A run of publishes to one topic goes in as one step as far as every connected subscriber has
room, then publish by publish: the test holds it to the publish-by-publish path, which is the
definition, for any queue bounds, queue contents and mix of connected and away subscribers.
"""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tether.broker.fanout import Fanout, SessionSubs
from tether.broker.messages import ConnHandle
from tether.protocol import Publish

CONN = ConnHandle(1, None, "peer")  # type: ignore[arg-type]  # never told anything here


def _session(fanout: Fanout, session_id: str, *, connected: bool) -> SessionSubs:
    subs = SessionSubs(session_id, f"client-{session_id}", CONN if connected else None, 0)
    fanout.sessions[session_id] = subs
    return subs


def test_subscriptions_and_the_topic_index() -> None:
    fanout = Fanout(queue_limit=10, queue_bytes=100)
    a, b = _session(fanout, "A", connected=True), _session(fanout, "B", connected=False)
    fanout.subscribe(a, "t")
    fanout.subscribe(a, "t")  # again: the same queue
    fanout.subscribe(b, "t")
    fanout.subscribe(b, "u")
    assert fanout.by_topic == {
        "t": {"A": a.queues["t"], "B": b.queues["t"]},
        "u": {"B": b.queues["u"]},
    }
    q = a.queues["t"]
    assert (q.max_count, q.max_bytes) == (10, 100)
    touched: dict[str, SessionSubs] = {}
    assert fanout.publish("t", b"x", touched, force=False)
    assert touched == {"A": a}  # only a connected session is flushed
    assert fanout.queued() == 2 and fanout.published == 1
    # Unsubscribing keeps the seq counter: subscribing again continues the numbering.
    assert fanout.unsubscribe(a, "t")
    assert not fanout.unsubscribe(a, "t")
    assert a.next_seqs == {"t": 2} and "A" not in fanout.by_topic["t"]
    fanout.subscribe(a, "t")
    assert a.queues["t"].next_seq == 2 and len(a.queues["t"]) == 0
    # A session removed leaves nothing in the index; a topic nobody has is gone.
    removed = fanout.remove_session("B")
    assert removed is b and set(b.queues) == {"t", "u"}
    assert fanout.by_topic == {"t": {"A": a.queues["t"]}}
    assert fanout.remove_session("B") is None
    assert list(fanout.sessions) == ["A"]


def test_a_full_connected_queue_holds_a_publish_back_unless_forced() -> None:
    fanout = Fanout(queue_limit=2, queue_bytes=1 << 20)
    live, away = _session(fanout, "L", connected=True), _session(fanout, "W", connected=False)
    for subs in (live, away):
        fanout.subscribe(subs, "t")
    touched: dict[str, SessionSubs] = {}
    assert (
        fanout.publish_many("t", [Publish(topic="t", payload=b"x")] * 3, touched, force=False) == 2
    )
    assert (fanout.published, fanout.dropped) == (2, 0)
    # Not taken: queued nowhere, not counted.
    assert not fanout.publish("t", b"y", touched, force=False)
    assert (len(live.queues["t"]), len(away.queues["t"]), fanout.published) == (2, 2, 2)
    # Forced: the oldest go, in both queues, and are counted.
    assert fanout.publish("t", b"y", touched, force=True)
    assert (fanout.published, fanout.dropped) == (3, 2)
    assert (live.queues["t"].dropped_live, away.queues["t"].dropped_away) == (1, 1)
    # Nobody connected: nobody holds back; the away queue drops its oldest.
    live.conn = None
    assert fanout.publish_many("t", [Publish(topic="t", payload=b"z")] * 2, {}, force=False) == 2
    assert fanout.dropped == 6
    # No subscribers at all: taken and counted.
    assert (
        fanout.publish_many("none", [Publish(topic="none", payload=b"")] * 4, {}, force=False) == 4
    )
    assert fanout.published == 9


def _state(fanout: Fanout) -> Any:
    return (
        fanout.published,
        fanout.dropped,
        {
            sid: {
                t: (list(q.unacked), list(q.pending), q.bytes, q.dropped_live, q.dropped_away)
                for t, q in s.queues.items()
            }
            for sid, s in fanout.sessions.items()
        },
    )


@settings(max_examples=300, deadline=None)
@given(
    queue_limit=st.integers(1, 12),
    queue_bytes=st.integers(0, 120),
    members=st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(0, 30), max_size=12), st.integers(0, 12)),
        min_size=0,
        max_size=4,
    ),
    run=st.lists(st.integers(0, 40), min_size=1, max_size=30),
    force=st.booleans(),
)
# The byte room filled exactly, and missed by one byte.
@example(queue_limit=3, queue_bytes=18, members=[(True, [8], 0)], run=[0, 10], force=False)
@example(queue_limit=3, queue_bytes=18, members=[(True, [8], 0)], run=[0, 11], force=False)
def test_a_run_goes_in_as_publish_by_publish(
    queue_limit: int,
    queue_bytes: int,
    members: list[tuple[bool, list[int], int]],
    run: list[int],
    force: bool,
) -> None:
    """`publish_many` takes the same prefix, queues the same, drops and counts the same and
    touches the same sessions as `publish` of each message until one is not taken."""
    fanouts = [Fanout(queue_limit=queue_limit, queue_bytes=queue_bytes) for _ in range(2)]
    for fanout in fanouts:
        for i, (connected, before, sent) in enumerate(members):
            subs = _session(fanout, f"S{i}", connected=connected)
            fanout.subscribe(subs, "t")
            q = subs.queues["t"]
            for size in before:
                q.push(b"b" * size, connected=connected)
            q.take_many(min(sent, q.sendable()))
    publishes = [Publish(topic="t", payload=bytes([i]) * n) for i, n in enumerate(run)]
    one_step, reference = fanouts
    touched: dict[str, SessionSubs] = {}
    taken = one_step.publish_many("t", publishes, touched, force=force)
    ref_touched: dict[str, SessionSubs] = {}
    ref_taken = 0
    for publish in publishes:
        if not reference.publish("t", publish.payload, ref_touched, force=force):
            break
        ref_taken += 1
    assert taken == ref_taken
    assert set(touched) == set(ref_touched)
    assert _state(one_step) == _state(reference)
    if force:
        assert taken == len(publishes)
