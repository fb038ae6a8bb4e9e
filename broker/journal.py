"""The SubscriberManager's store side: each batch's writes as one store batch, its answers
held until the commit, publishers paused while the disk is behind, away queues' tails paged
back in. See docs/architecture.md sections 7 and 15.

Theory of operation: each batch's writes (`Append` per queue and run, `Discard` and
`SetDropped` for overflow, `Subscribe`, `Unsubscribe`, `Ack`, `DeleteSession`) are submitted as
one store batch, and its answers wait in `_inflight` until the store calls back (a `tell` of
`Committed`, in submission order): then the `ok`s go out, each queue's `committed` moves up so
the flush may deliver what was stored, or, if the commit failed, the publishes and
subscriptions it held are answered `unavailable` and their messages taken back out of the
queues (their seqs stay unused: a gap the publisher's retry fills with new seqs). A batch with
nothing to write still waits behind those in flight, so one connection's answers keep their
order. `MarkSent` and dropped counters already told ride in the next batch (`lazy`): losing
them costs a redelivery flag or a count told twice, never a message.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pykka import ActorRef

from tether.broker.fanout import Fanout, SessionSubs
from tether.broker.loop_actor import tell
from tether.broker.messages import ConnHandle, Outbound, Throttle
from tether.broker.queues import SubscriptionQueue
from tether.broker.store import (
    Append,
    Discard,
    DiscardOldest,
    Entries,
    MarkSent,
    OnDone,
    SessionRecord,
    SetDropped,
    Store,
    StoreError,
    StoreOp,
    SubscriptionRecord,
)
from tether.protocol import Error, ErrorCode, Ok, encode

__all__ = [
    "COMMIT_BACKLOG",
    "COMMIT_BACKLOG_BYTES",
    "MEMORY_HEAD",
    "PAGE",
    "PAGE_BYTES",
    "Committed",
    "Journal",
    "Paged",
    "Pending",
    "Reflush",
    "Run",
]

MEMORY_HEAD = 100  # messages an away queue keeps in memory; the rest only in the store
PAGE = 1_000  # messages of a queue's tail read back at once
PAGE_BYTES = 4 * 1024 * 1024  # ... and at most about this many payload bytes (by its average)
COMMIT_BACKLOG = 20_000  # messages waiting for their commit before publishers are paused
# ... or their payload bytes: 20,000 messages of 1 MiB would be 20 GiB held for a slow disk.
COMMIT_BACKLOG_BYTES = 64 * 1024 * 1024

_log = structlog.get_logger("tether.subscribers")


@dataclass(frozen=True, slots=True)
class Committed:
    """The store's answer to the oldest batch in `_inflight`."""

    error: StoreError | None


@dataclass(frozen=True, slots=True)
class Reflush:
    """Flush a session again (a page read failed a moment ago)."""

    session_id: str


@dataclass(frozen=True, slots=True)
class Paged:
    """A page of a queue's tail, read from the store."""

    session_id: str
    queue: SubscriptionQueue
    entries: Entries
    error: StoreError | None


@dataclass(slots=True)
class Pending:
    """A batch's answers, waiting for its commit (and for those submitted before it)."""

    conn: ConnHandle | None
    # bytes: sent as they are; int: the `req` of an `ok` that rests on the commit
    # (`unavailable` if it fails).
    replies: list[bytes | int]
    close: bool = False
    ended: bool = False
    submitted: bool = True
    appends: list[Run] = field(default_factory=list)  # one per Append
    size: int = 0  # messages appended (counted against the backlog until committed)
    bytes: int = 0  # their payload bytes (likewise)
    latest: dict[int, Run] = field(default_factory=dict)  # id(queue) -> its latest run
    subscribed: list[tuple[SessionSubs, SubscriptionQueue]] = field(default_factory=list)  # made


@dataclass(slots=True)
class Run:
    """Messages pushed to one queue with consecutive seqs: one `Append`."""

    subs: SessionSubs
    q: SubscriptionQueue
    first: int
    payloads: list[bytes]

    @property
    def last(self) -> int:
        return self.first + len(self.payloads) - 1


def _encoded(reply: bytes | int, error: StoreError | None) -> bytes:
    """A batch's answer as sent: an `ok` that rests on the commit becomes `unavailable`."""
    if type(reply) is bytes:
        return reply
    assert isinstance(reply, int)
    if error is None:
        return encode(Ok(req=reply))
    return encode(
        Error(
            req=reply,
            code=ErrorCode.UNAVAILABLE,
            message=f"not stored ({error}): try again",
        )
    )


def _log_failure(what: str) -> OnDone:
    def done(error: StoreError | None) -> None:
        if error is not None:
            _log.warning("store_write_failed", what=what, error=str(error))

    return done


def _record_drops(writes: list[StoreOp | Run], session_id: str, q: SubscriptionQueue) -> None:
    """What `q` dropped since last recorded, as store writes (after its `Append`s)."""
    if q.dropped_seqs or q.disk_discarded:
        if q.dropped_seqs:
            seqs, q.dropped_seqs = tuple(q.dropped_seqs), []
            writes.append(Discard(session_id, q.topic, seqs))
        if q.disk_discarded:
            writes.append(DiscardOldest(session_id, q.topic, q.disk_discarded))
            q.disk_discarded = 0
        writes.append(SetDropped(session_id, q.topic, q.dropped_live, q.dropped_away))


def _throttle(conn: ConnHandle, paused: bool) -> None:
    tell(conn.ref, Throttle(paused))


class Journal:
    """Owned by the SubscriberManager (and run on its thread): `ref` is that actor, which
    routes `Committed` and `Paged` back here; `flush` sends sessions what they may have."""

    def __init__(
        self,
        store: Store,
        fanout: Fanout,
        *,
        ref: ActorRef[Any],
        loop: asyncio.AbstractEventLoop,
        flush: Callable[[Iterable[SessionSubs]], None],
        held_conns: Collection[int],
        memory_head: int = MEMORY_HEAD,
        page: int = PAGE,
        commit_backlog: int = COMMIT_BACKLOG,
        commit_backlog_bytes: int | None = None,  # None: COMMIT_BACKLOG_BYTES
    ) -> None:
        self._store = store
        self._fanout = fanout
        self._ref = ref
        self._loop = loop
        self._flush = flush
        self._held_conns = held_conns  # a live view: held publishers stay paused
        self._head = max(1, memory_head)
        self._page = max(1, page)
        self._inflight: deque[Pending] = deque()
        self.lazy: list[StoreOp] = []  # writes that may ride in the next batch
        # Queues a bound wider than one queue dropped from (budget.py): their `Discard`s go
        # in the batch being recorded.
        self.shed: list[tuple[str, SubscriptionQueue]] = []
        self._failed_batches = self._failed_messages = 0  # since the store last committed
        # Messages appended and not yet committed, and the publishers paused until the store
        # has caught up with them (the backlog bounds the memory a slow disk can cost).
        self._uncommitted = self._uncommitted_bytes = 0
        self._backlog = max(1, commit_backlog)
        self._backlog_bytes = max(1, commit_backlog_bytes or COMMIT_BACKLOG_BYTES)
        self._slowed: dict[int, ConnHandle] = {}
        fanout.journal = []

    def restore(
        self, sessions: Sequence[SessionRecord], subscriptions: Sequence[SubscriptionRecord]
    ) -> None:
        """What the store held at start-up: every session away, each queue a tail on disk to
        page in once its session is back; what had been sent before is sent again flagged
        `redelivered`."""
        fanout = self._fanout
        for record in sessions:
            # `admin` stays False until the session attaches: the users file decides then.
            fanout.sessions[record.session_id] = SessionSubs(
                session_id=record.session_id,
                client_id=record.client_id,
                conn=None,
                credit=0,
                username=record.username,
            )
        for sub in subscriptions:
            subs = fanout.sessions.get(sub.session_id)
            if subs is None:
                continue
            if not sub.active:
                subs.next_seqs[sub.topic] = sub.next_seq
                continue
            q = SubscriptionQueue(
                sub.topic,
                max_count=fanout.queue_limit,
                max_bytes=fanout.queue_bytes,
                next_seq=sub.next_seq,
            )
            q.committed = sub.next_seq - 1
            q.dropped_seqs = []
            q.spill = self._head
            q.dropped_live, q.dropped_away = sub.dropped_live, sub.dropped_away
            # The store keeps no lifetime count: what it still has to tell is the floor.
            q.dropped_total = q.dropped_noted = sub.dropped_live + sub.dropped_away
            q.redeliver_upto = q.marked = sub.sent_upto
            q.disk, q.disk_bytes, q.bytes = sub.queued, sub.queued_bytes, sub.queued_bytes
            fanout.add_queue(subs, q)

    def record(self, writes: list[StoreOp | Run], pending: Pending) -> None:
        """Turn the fan-out's pushes into `Append`s (one per queue and batch while the seqs
        run on) and its drops into `Discard`s."""
        journal = self._fanout.journal
        assert journal is not None
        sessions = self._fanout.sessions
        latest = pending.latest
        for session_id, q, first, payloads in journal:
            run = latest.get(id(q))
            if run is not None and run.q is q and run.first + len(run.payloads) == first:
                run.payloads.extend(payloads)
            else:
                run = Run(sessions[session_id], q, first, list(payloads))
                latest[id(q)] = run
                pending.appends.append(run)
                writes.append(run)
            _record_drops(writes, session_id, q)
        journal.clear()
        if self.shed:
            for session_id, q in self.shed:
                _record_drops(writes, session_id, q)
            self.shed.clear()

    def finish(self, writes: list[StoreOp | Run], pending: Pending) -> None:
        """Submit the batch's writes; its answers go out once they are committed (at once
        when there is nothing to write and nothing ahead of them)."""
        if writes:
            batch = [
                Append(w.subs.session_id, w.q.topic, w.first, tuple(w.payloads))
                if type(w) is Run
                else w
                for w in writes
            ]
            self.submit(batch, pending)  # type: ignore[arg-type]
        elif self._inflight:
            if pending.replies or pending.close:
                pending.submitted = False
                self._inflight.append(pending)
        else:
            self._answer(pending, None)

    def submit(self, batch: list[StoreOp], pending: Pending) -> None:
        if self.lazy:
            batch[:0] = self.lazy
            self.lazy = []
        self._inflight.append(pending)
        appends = pending.appends
        pending.size = sum(len(run.payloads) for run in appends)
        pending.bytes = sum(sum(map(len, run.payloads)) for run in appends)
        self._uncommitted += pending.size
        self._uncommitted_bytes += pending.bytes
        conn = pending.conn
        if (
            (self._uncommitted > self._backlog or self._uncommitted_bytes > self._backlog_bytes)
            and conn is not None
            and conn.conn_id not in self._slowed
        ):
            # The disk is behind: stop reading this publisher until it catches up, so that
            # what waits for a commit (held here, payloads included) stays bounded.
            self._slowed[conn.conn_id] = conn
            _throttle(conn, True)
        ref = self._ref

        def done(error: StoreError | None) -> None:
            tell(ref, Committed(error))

        self._store.submit(tuple(batch), done)

    def on_committed(self, error: StoreError | None) -> None:
        inflight = self._inflight
        first = inflight.popleft()
        self._uncommitted -= first.size
        self._uncommitted_bytes -= first.bytes
        self._answer(first, error)
        # Answers that wrote nothing and waited only for their turn.
        while inflight and not inflight[0].submitted:
            self._answer(inflight.popleft(), None)
        if (
            self._slowed
            and self._uncommitted <= self._backlog // 2
            and self._uncommitted_bytes <= self._backlog_bytes // 2
        ):
            slowed, self._slowed = self._slowed, {}
            for conn_id, conn in slowed.items():
                if conn_id not in self._held_conns:  # a held one stays paused
                    _throttle(conn, False)

    def _answer(self, pending: Pending, error: StoreError | None) -> None:
        touched: dict[str, SessionSubs] = {}
        if error is None:
            if self._failed_batches and pending.submitted:
                _log.info(
                    "batches_stored_again",
                    failed_batches=self._failed_batches,
                    messages_not_stored=self._failed_messages,
                )
                self._failed_batches = self._failed_messages = 0
            for run in pending.appends:
                q, last = run.q, run.last
                if last > q.committed:
                    q.committed = last
                if run.subs.conn is not None:
                    touched[run.subs.session_id] = run.subs
                    run.subs.ready.add(q)
                elif q.spill:
                    q.trim()
        else:
            dropped = 0
            for run in pending.appends:
                q = run.q
                dropped += q.discard(set(range(run.first, run.last + 1)))
                if q.disk:
                    # Those of the run counted in the tail are not in the store either.
                    tail = [p for i, p in enumerate(run.payloads) if run.first + i > q.disk_after]
                    tail = tail[len(tail) - min(len(tail), q.disk) :]
                    q.disk -= len(tail)
                    size = sum(map(len, tail))
                    q.disk_bytes -= size
                    q.bytes -= size
                    dropped += len(tail)
                    if q.disk <= 0:
                        q.tail_gone()
                q.sync()
            for subs, q in pending.subscribed:
                if subs.queues.get(q.topic) is q:
                    self._fanout.unsubscribe(subs, q.topic)
            # Logged once until the store commits again (the store logs the cause's kind).
            if not self._failed_batches:
                _log.warning("batches_not_stored", error=str(error))
            self._failed_batches += 1
            self._failed_messages += dropped
        conn = pending.conn
        if conn is not None and (pending.replies or pending.close):
            data = b"".join([_encoded(r, error) for r in pending.replies])
            tell(conn.ref, Outbound(data, close=pending.close, session_ended=pending.ended))
        if touched:
            self._flush(touched.values())

    def page_in(self, subs: SessionSubs, queues: Iterable[SubscriptionQueue]) -> None:
        """Read the next page of each of `queues` (the session's that a flush looked at)
        whose tail runs low in memory: at most `page` messages, and about `PAGE_BYTES`."""
        store = self._store
        ref, session_id = self._ref, subs.session_id
        for q in queues:
            if q.disk and not q.reading and len(q.pending) < self._page // 2 + 1:
                average = max(1, q.disk_bytes // q.disk)
                limit = max(1, min(self._page, PAGE_BYTES // average))

                def done(
                    entries: Entries, error: StoreError | None, q: SubscriptionQueue = q
                ) -> None:
                    tell(ref, Paged(session_id, q, entries, error))

                q.read_limit = limit
                store.read_queue(session_id, q.topic, q.start_read(), limit, done)

    def on_paged(self, msg: Paged) -> None:
        subs = self._fanout.sessions.get(msg.session_id)
        q = msg.queue
        if subs is None or subs.queues.get(q.topic) is not q:
            return  # unsubscribed or ended meanwhile
        subs.ready.add(q)  # looked at again by the flush below (or the Reflush)
        if msg.error is not None:
            q.reading = False
            _log.warning("queue_read_failed", session_id=msg.session_id, error=str(msg.error))
            if subs.conn is not None:
                self._loop.call_later(1.0, lambda: tell(self._ref, Reflush(msg.session_id)))
            return
        q.page_in(msg.entries, q.read_limit)
        if subs.conn is not None:
            if q.spill and not q.disk:
                # Connected, a spill comes from the memory budget: the backlog it moved out
                # is all back, so new messages stay in memory again (until the budget is
                # passed again: budget.py).
                q.spill = 0
            self._flush((subs,))

    def write_lazy(self) -> None:
        if self.lazy:
            batch, self.lazy = tuple(self.lazy), []
            self._store.submit(batch, _log_failure("sent marks"))

    def keep_head(self, q: SubscriptionQueue) -> None:
        """The session is away: only a head of `q` stays in memory, the rest in the store
        (a smaller head the memory budget set is kept)."""
        q.spill = min(q.spill, self._head) if q.spill else self._head
        q.trim()

    def mark_sent(self, subs: SessionSubs, queues: Iterable[SubscriptionQueue]) -> None:
        for q in queues:
            if q.unacked and q.unacked[-1][0] > q.marked:
                q.marked = q.unacked[-1][0]
                self.lazy.append(MarkSent(subs.session_id, q.topic, q.marked))
