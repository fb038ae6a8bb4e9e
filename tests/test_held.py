"""The held publishers alone (`HeldPublishers`): pure, no loop, no actors.

The timer and the `Throttle` are injected callables that record what they are asked; a retry is
a function that takes as many ops of a batch as the test allows and hands back the rest.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.broker.held import HeldPublishers
from tether.broker.messages import ConnHandle, SessionOps
from tether.protocol import Ping, Publish


class Recorder:
    def __init__(self) -> None:
        self.armed: list[tuple[int, int]] = []
        self.throttled: list[tuple[int, bool]] = []
        self.held = HeldPublishers(
            arm=lambda conn_id, token: self.armed.append((conn_id, token)),
            throttle=lambda conn, paused: self.throttled.append((conn.conn_id, paused)),
        )


def _conn(conn_id: int) -> ConnHandle:
    return ConnHandle(conn_id, None, str(conn_id))  # type: ignore[arg-type]


def _batch(conn_id: int, *topics: str) -> SessionOps:
    ops = tuple(Publish(topic=t, payload=b"") if t else Ping() for t in topics)
    return SessionOps(f"S{conn_id}", _conn(conn_id), ops)


class Room:
    """A retry that takes up to `room` ops in all, then stops at the next one."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.calls: list[tuple[SessionOps, bool]] = []

    def __call__(self, batch: SessionOps, force: bool) -> SessionOps | None:
        self.calls.append((batch, force))
        if force or self.room >= len(batch.ops):
            self.room -= 0 if force else len(batch.ops)
            return None
        rest = replace(batch, ops=batch.ops[self.room :])
        self.room = 0
        return rest


def test_hold_throttles_and_arms_and_later_batches_queue_behind() -> None:
    r = Recorder()
    held = r.held
    assert not held.queue_behind(_batch(1, "a"))  # not held: handled as usual
    held.hold(_conn(1), _batch(1, "a"))
    assert r.throttled == [(1, True)] and r.armed == [(1, 1)]
    assert list(held.conn_ids) == [1] and held.token_of(1) == 1
    assert held.is_current(1, 1) and not held.is_current(1, 0) and not held.is_current(2, 1)
    assert held.queue_behind(_batch(1, "b"))
    retry = Room(10)
    held.release(retry)
    # Both batches, in order; then the connection is let go, once.
    assert [b.ops[0].topic for b, _ in retry.calls] == ["a", "b"]  # type: ignore[union-attr]
    assert r.throttled == [(1, True), (1, False)] and not held.conn_ids
    assert held.token_of(1) is None and not held.is_current(1, 1)


def test_progress_renews_the_wait_and_goes_to_the_back_of_the_line() -> None:
    r = Recorder()
    held = r.held
    held.hold(_conn(1), _batch(1, "a", "a"))
    held.hold(_conn(2), _batch(2, "b"))
    held.hold(_conn(3), _batch(3, "a"))
    assert r.armed == [(1, 1), (2, 2), (3, 3)]
    held.release(Room(1), freed={"a"})
    # 1 took the one room there was: renewed, at the back. 2 waits on another topic: as it
    # was. 3 waits on "a", whose subscribers made room (taken by 1): renewed, in its place.
    assert list(held.conn_ids) == [2, 3, 1]
    assert r.armed[3:] == [(1, 4), (3, 5)]
    assert [held.token_of(c) for c in (1, 2, 3)] == [4, 2, 5]
    assert r.throttled == [(1, True), (2, True), (3, True)]


def test_a_whole_batch_taken_is_progress_too() -> None:
    r = Recorder()
    held = r.held
    held.hold(_conn(1), _batch(1, "a"))
    held.queue_behind(_batch(1, "a"))
    held.hold(_conn(2), _batch(2, "b"))
    held.release(Room(1))  # 1's first batch goes whole; its second waits
    assert list(held.conn_ids) == [2, 1] and held.token_of(1) == 3


def test_a_forced_retry_of_one_connection_only() -> None:
    r = Recorder()
    held = r.held
    held.hold(_conn(1), _batch(1, "a"))
    held.hold(_conn(2), _batch(2, "a"))
    retry = Room(0)
    held.release(retry, only=2, force=True)
    assert [(b.conn.conn_id, force) for b, force in retry.calls] == [(2, True)]
    assert list(held.conn_ids) == [1] and r.throttled[-1] == (2, False)
    held.release(retry, only=2, force=True)  # no longer held: nothing happens
    assert len(retry.calls) == 1


def test_no_progress_keeps_the_wait() -> None:
    r = Recorder()
    held = r.held
    held.hold(_conn(1), _batch(1, "a"))
    held.release(Room(0), freed={"b"})
    held.release(Room(0))
    assert held.token_of(1) == 1 and r.armed == [(1, 1)]
    held.queue_behind(_batch(1, "a"))
    held.release(Room(0), freed={"a"})  # the topic it waits on made room: renewed
    assert held.token_of(1) == 2


def test_a_retry_that_releases_again_settles_each_connection_once() -> None:
    """A batch's unregister frees room and retries the held publishers from within a retry:
    the connection being retried is then let go by the inner release, not twice."""
    r = Recorder()
    held = r.held
    held.hold(_conn(1), _batch(1, "a"))
    held.hold(_conn(2), _batch(2, "a"))
    calls: list[int] = []

    def retry(batch: SessionOps, force: bool) -> SessionOps | None:
        calls.append(batch.conn.conn_id)
        if batch.conn.conn_id == 1:
            held.release(retry)  # as `_drop` does, from the unregister in conn 1's batch
        return None

    held.release(retry)
    assert calls == [1, 2]
    assert r.throttled == [(1, True), (2, True), (1, False), (2, False)]
    assert not held.conn_ids


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(
        st.tuples(st.integers(1, 3), st.lists(st.sampled_from(["a", "b", ""]), min_size=1)),
        min_size=1,
        max_size=12,
    ),
    rooms=st.lists(st.integers(0, 4), max_size=12),
    data=st.data(),
)
def test_every_held_op_is_retried_once_in_order(
    batches: list[tuple[int, list[str]]], rooms: list[int], data: st.DataObject
) -> None:
    """Whatever room comes and however the waits end, each connection's ops reach the retry
    in the order they came, each taken exactly once; a connection is throttled when first
    held and let go exactly when nothing of it waits."""
    r = Recorder()
    held = r.held
    sent: dict[int, list[object]] = {}
    taken: dict[int, list[object]] = {}
    ops_ids = iter(range(10_000))

    def numbered(conn_id: int, topics: list[str]) -> SessionOps:
        # Each op made unique (by `req`) so that order and duplicates show.
        ops = tuple(
            Publish(topic=t, payload=b"", req=next(ops_ids)) if t else Ping(req=next(ops_ids))
            for t in topics
        )
        sent.setdefault(conn_id, []).extend(ops)
        return SessionOps(f"S{conn_id}", _conn(conn_id), ops)

    def run(retry: Room, batch: SessionOps, force: bool) -> SessionOps | None:
        rest = retry(batch, force)
        done = batch.ops if rest is None else batch.ops[: len(batch.ops) - len(rest.ops)]
        taken.setdefault(batch.conn.conn_id, []).extend(done)
        return rest

    for (conn_id, topics), room in zip(batches, [*rooms, *[0] * len(batches)], strict=False):
        batch = numbered(conn_id, topics)
        if not held.queue_behind(batch):
            # As the actor does: handled at once as far as there is room, the rest held.
            retry = Room(room)
            rest = run(retry, batch, False)
            if rest is not None:
                held.hold(batch.conn, rest)
        else:
            retry = Room(room)
            held.release(lambda b, f, retry=retry: run(retry, b, f), freed={"a"})
        if held.conn_ids and data.draw(st.booleans(), label="a wait runs out"):
            conn_id = data.draw(st.sampled_from(list(held.conn_ids)), label="whose")
            held.release(lambda b, f: run(Room(0), b, f), only=conn_id, force=True)
    while held.conn_ids:
        first = next(iter(held.conn_ids))
        held.release(lambda b, f: run(Room(0), b, f), only=first, force=True)
    assert taken == sent
    for conn_id in sent:
        mine = [paused for c, paused in r.throttled if c == conn_id]
        assert mine == [True, False] * (len(mine) // 2) and len(mine) % 2 == 0
