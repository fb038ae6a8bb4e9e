"""SubscriberManager: the actor that owns the data path and the broker's counters. It routes
each connection's frames, in order, to the fan-out, the held publishers and the delivery step.
See docs/architecture.md sections 2 and 7.

With a store (section 15), each batch's writes (`Append` per queue and run, `Discard` and
`SetDropped` for overflow, `Subscribe`, `Unsubscribe`, `Ack`, `DeleteSession`) are submitted as
one store batch, and its answers wait in `_inflight` until the store calls back (a `tell` of
`_Committed`, in submission order): then the `ok`s go out, each queue's `committed` moves up
so the flush may deliver what was stored, or, if the commit failed, the publishes and
subscriptions it held are answered `unavailable` and their messages taken back out of the
queues (their seqs stay unused: a gap the publisher's retry fills with new seqs). A batch with
nothing to write still waits behind those in flight, so one connection's answers keep their
order. `MarkSent` and dropped counters already told ride in the next batch (`_lazy`): losing
them costs a redelivery flag or a count told twice, never a message.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import structlog

from tether.broker import passwords
from tether.broker.delivery import take_within
from tether.broker.fanout import Fanout, SessionSubs
from tether.broker.held import HeldPublishers
from tether.broker.loop_actor import LoopActor, tell
from tether.broker.messages import (
    Attach,
    ConnHandle,
    Credit,
    Detach,
    DropSession,
    GetStats,
    Outbound,
    SessionAttached,
    SessionOps,
    Throttle,
)
from tether.broker.queues import SubscriptionQueue
from tether.broker.store import Ack as StoreAck
from tether.broker.store import (
    Append,
    DeleteSession,
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
from tether.broker.store import Subscribe as StoreSubscribe
from tether.broker.store import Unsubscribe as StoreUnsubscribe
from tether.protocol import (
    Ack,
    Error,
    ErrorCode,
    Ok,
    Ping,
    Pong,
    Publish,
    Registered,
    Stats,
    StatsResult,
    Subscribe,
    Unregister,
    Unsubscribe,
    encode,
)

__all__ = ["SubscriberManager"]

MEMORY_HEAD = 100  # messages an away queue keeps in memory; the rest only in the store
PAGE = 1_000  # messages of a queue's tail read back at once
COMMIT_BACKLOG = 20_000  # messages waiting for their commit before publishers are paused

_log = structlog.get_logger("tether.subscribers")


@dataclass(frozen=True, slots=True)
class _WaitOver:
    conn_id: int
    token: int


@dataclass(frozen=True, slots=True)
class _Committed:
    """The store's answer to the oldest batch in `_inflight`."""

    error: StoreError | None


@dataclass(frozen=True, slots=True)
class _Retry:
    """Flush a session again (a page read failed a moment ago)."""

    session_id: str


@dataclass(frozen=True, slots=True)
class _Paged:
    """A page of a queue's tail, read from the store."""

    session_id: str
    queue: SubscriptionQueue
    entries: Entries
    error: StoreError | None


@dataclass(slots=True)
class _Pending:
    """A batch's answers, waiting for its commit (and for those submitted before it)."""

    conn: ConnHandle | None
    # bytes: sent as they are; int: the `req` of an `ok` that rests on the commit
    # (`unavailable` if it fails).
    replies: list[bytes | int]
    close: bool = False
    ended: bool = False
    submitted: bool = True
    appends: list[_Run] = field(default_factory=list)  # one per Append
    size: int = 0  # messages appended (counted against the backlog until committed)
    latest: dict[int, _Run] = field(default_factory=dict)  # id(queue) -> its latest run
    subscribed: list[tuple[SessionSubs, SubscriptionQueue]] = field(default_factory=list)  # made


@dataclass(slots=True)
class _Run:
    """Messages pushed to one queue with consecutive seqs: one `Append`."""

    subs: SessionSubs
    q: SubscriptionQueue
    first: int
    payloads: list[bytes]

    @property
    def last(self) -> int:
        return self.first + len(self.payloads) - 1


def _reply(reply: bytes | int, error: StoreError | None) -> bytes:
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


def _throttle(conn: ConnHandle, paused: bool) -> None:
    tell(conn.ref, Throttle(paused))


class SubscriberManager(LoopActor):
    resume_after_failure = True

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        loop_thread: int,
        *,
        queue_limit: int,
        queue_bytes: int,
        outbound_high_water: int,
        publish_wait: float = 1.0,
        max_frame: int | None = None,
        store: Store | None = None,
        restored_sessions: Sequence[SessionRecord] = (),
        restored_subscriptions: Sequence[SubscriptionRecord] = (),
        memory_head: int = MEMORY_HEAD,
        page: int = PAGE,
        commit_backlog: int = COMMIT_BACKLOG,
    ) -> None:
        super().__init__(loop, loop_thread)
        self._max_frame = max_frame  # told to clients in `registered`
        self._high_water = outbound_high_water
        self._publish_wait = publish_wait
        self._fanout = Fanout(queue_limit=queue_limit, queue_bytes=queue_bytes)
        self._held = HeldPublishers(arm=self._arm_wait, throttle=_throttle)
        self._held_conns = self._held.conn_ids
        self._delivered = 0
        self._expired = 0
        self._store = store  # None: in memory only, nothing is written anywhere
        self._head = max(1, memory_head)
        self._page = max(1, page)
        self._inflight: deque[_Pending] = deque()
        self._lazy: list[StoreOp] = []  # writes that may ride in the next batch
        self._failed_batches = self._failed_messages = 0  # since the store last committed
        # Messages appended and not yet committed, and the publishers paused until the store
        # has caught up with them (the backlog bounds the memory a slow disk can cost).
        self._uncommitted = 0
        self._backlog = max(1, commit_backlog)
        self._slowed: dict[int, ConnHandle] = {}
        if store is not None:
            self._fanout.journal = []
            self._restore(restored_sessions, restored_subscriptions)

    def _restore(
        self, sessions: Sequence[SessionRecord], subscriptions: Sequence[SubscriptionRecord]
    ) -> None:
        """What the store held at start-up: every session away, each queue a tail on disk to
        page in once its session is back; what had been sent before is sent again flagged
        `redelivered`."""
        fanout = self._fanout
        for record in sessions:
            fanout.sessions[record.session_id] = SessionSubs(
                session_id=record.session_id, client_id=record.client_id, conn=None, credit=0
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
            q.redeliver_upto = q.marked = sub.sent_upto
            q.disk, q.disk_bytes, q.bytes = sub.queued, sub.queued_bytes, sub.queued_bytes
            fanout.add_queue(subs, q)

    def on_stop(self) -> None:
        self._write_lazy()

    def _write_lazy(self) -> None:
        if self._store is not None and self._lazy:
            batch, self._lazy = tuple(self._lazy), []
            self._store.submit(batch, _log_failure("sent marks"))

    def on_receive(self, message: object) -> object:
        match message:
            case SessionOps():
                self._on_ops(message)
            case Credit(session_id, conn_id, nbytes):
                subs = self._fanout.sessions.get(session_id)
                if subs is not None and subs.conn is not None and subs.conn.conn_id == conn_id:
                    subs.credit += nbytes
                    self._flush((subs,))
            case _WaitOver(conn_id, token):
                if self._held.is_current(conn_id, token):
                    self._held.release(self._retry, only=conn_id, force=True)
            case Attach():
                self._on_attach(message)
            case Detach(session_id, conn_id):
                subs = self._fanout.sessions.get(session_id)
                if subs is not None and subs.conn is not None and subs.conn.conn_id == conn_id:
                    self._detach(subs)
            case DropSession(session_id, reason):
                self._drop(session_id, reason)
                if self._store is not None:
                    self._submit([DeleteSession(session_id)], _Pending(None, []))
            case _Committed(error):
                self._on_committed(error)
            case _Paged():
                self._on_paged(message)
            case _Retry(session_id):
                subs = self._fanout.sessions.get(session_id)
                if subs is not None and subs.conn is not None:
                    self._flush((subs,))
            case GetStats():
                return self._counters()
            case _:
                return super().on_receive(message)
        return None

    def _counters(self) -> dict[str, int]:
        """The `stats` frame's counters, and `GetStats`'s: this actor is the one owner of
        each (docs/architecture.md section 2). It learns every session's life from the
        SessionManager's `Attach` and `DropSession`, so it counts sessions and expiries."""
        fanout = self._fanout
        sessions = fanout.sessions
        return {
            "sessions": len(sessions),
            "connected": sum(1 for s in sessions.values() if s.conn is not None),
            "expired": self._expired,
            # The process's own count (auth pool and dummies alike), read here and only here.
            "bcrypt_hashes": passwords.hash_count(),
            "topics": len(fanout.by_topic),
            "published": fanout.published,
            "delivered": self._delivered,
            "dropped": fanout.dropped,
            "queued": fanout.queued(),
        }

    # --- registration -------------------------------------------------------------------

    def _on_attach(self, msg: Attach) -> None:
        sessions = self._fanout.sessions
        subs = sessions.get(msg.session_id)
        if subs is None:
            subs = SessionSubs(
                session_id=msg.session_id, client_id=msg.client_id, conn=None, credit=0
            )
            sessions[msg.session_id] = subs
        elif subs.conn is not None:
            # Resumed over a connection that is still open: it has been told `taken_over`.
            self._detach(subs)
        queued = sum(len(q) for q in subs.queues.values())
        dropped = sum(q.dropped_away for q in subs.queues.values())
        for q in subs.queues.values():
            if q.dropped_away and self._store is not None:
                self._lazy.append(SetDropped(msg.session_id, q.topic, q.dropped_live, 0))
            q.dropped_away = 0
            q.spill = 0
        if dropped:
            _log.warning(
                "messages_dropped",
                session_id=msg.session_id,
                client_id=msg.client_id,
                count=dropped,
                connected=False,
            )
        subs.conn = msg.conn
        subs.credit = self._high_water
        registered = Registered(
            req=msg.req,
            session_id=msg.session_id,
            resume_token=msg.resume_token,
            resumed=msg.resumed,
            keepalive=msg.keepalive,
            expiry=msg.expiry,
            queued=queued,
            dropped=dropped,
            max_frame=self._max_frame,
        )
        tell(
            msg.conn.ref,
            SessionAttached(msg.session_id, msg.client_id, msg.keepalive, encode(registered)),
        )
        # The queues drain before anything live: live messages queue behind them.
        self._flush((subs,))

    def _detach(self, subs: SessionSubs) -> None:
        subs.conn = None
        subs.credit = 0
        for q in subs.queues.values():
            q.requeue_unacked()
            if self._store is not None:
                q.spill = self._head  # away: only a head in memory, the rest in the store
                q.trim()
        self._write_lazy()
        # A queue of a session away no longer holds publishers back.
        if self._held_conns:
            self._held.release(self._retry)

    def _drop(self, session_id: str, reason: str) -> None:
        subs = self._fanout.remove_session(session_id)
        if subs is None:
            return
        if reason == "expired":
            self._expired += 1
        discarded = sum(len(q) for q in subs.queues.values())
        if self._held_conns:
            self._held.release(self._retry)
        _log.info(
            "session_queues_removed",
            session_id=session_id,
            client_id=subs.client_id,
            reason=reason,
            discarded=discarded,
        )

    # --- the data path ------------------------------------------------------------------

    def _on_ops(self, msg: SessionOps) -> None:
        if self._held_conns and self._held.queue_behind(msg):
            return  # behind what already waits: one connection, one order
        rest, freed = self._process(msg, force=False)
        if rest is not None:
            self._held.hold(msg.conn, rest)
        if freed and self._held_conns:
            self._held.release(self._retry, freed=freed)

    def _retry(self, batch: SessionOps, force: bool) -> SessionOps | None:
        return self._process(batch, force=force)[0]

    def _arm_wait(self, conn_id: int, token: int) -> None:
        ref, over = self.actor_ref, _WaitOver(conn_id, token)
        self.loop.call_later(self._publish_wait, lambda: tell(ref, over))

    def _process(self, msg: SessionOps, *, force: bool) -> tuple[SessionOps | None, set[str]]:
        """Handle a batch in order. Returns the ops not taken, from the first publish that did
        not fit a live subscriber's queue (None when all were), and the topics whose queues
        acks or unsubscribes made room in."""
        fanout = self._fanout
        durable = self._store is not None
        subs = fanout.sessions.get(msg.session_id)
        current = (
            subs is not None and subs.conn is not None and subs.conn.conn_id == msg.conn.conn_id
        )
        replies: list[bytes | int] = []
        touched: dict[str, SessionSubs] = {}
        freed: set[str] = set()
        rest: SessionOps | None = None
        close = msg.close
        ended = False
        ops = msg.ops
        # With a store: what this batch writes, in order (Appends merged per queue).
        writes: list[StoreOp | _Run] = []
        pending = _Pending(msg.conn, replies)
        index, count = 0, len(ops)
        while index < count:
            op = ops[index]
            if type(op) is Publish:
                # A publish stands on its own, even from a connection just replaced. A run of
                # publishes to one topic (the usual batch) is queued as one.
                run = [op]
                end = index + 1
                while end < count:
                    following = ops[end]
                    if type(following) is not Publish or following.topic != op.topic:
                        break
                    run.append(following)
                    end += 1
                taken = fanout.publish_many(op.topic, run, touched, force=force)
                if durable:
                    # An `ok` rests on the commit: its req until then.
                    replies += [p.req for p in run[:taken] if p.req is not None]
                    self._journal(writes, pending)
                else:
                    replies += [encode(Ok(req=p.req)) for p in run[:taken] if p.req is not None]
                if taken < len(run):
                    rest = replace(msg, ops=ops[index + taken :])
                    close = False
                    break
                index = end
                continue
            index += 1
            match op:
                case Error():
                    # The error a malformed frame earned, answered in its turn.
                    replies.append(encode(op))
                case _ if not current or subs is None:
                    # Session state is only ever changed by the connection that holds it.
                    continue
                case Ack(topic=topic, seq=seq):
                    q = subs.queues.get(topic)
                    if q is not None and q.ack(seq):
                        # The delivery window and the queue have room again.
                        touched[msg.session_id] = subs
                        freed.add(topic)
                        if durable:
                            writes.append(StoreAck(msg.session_id, topic, q.acked_upto))
                case Subscribe(req=req, topic=topic):
                    made = fanout.subscribe(subs, topic)
                    if durable and made is not None:
                        writes.append(StoreSubscribe(msg.session_id, topic, made.next_seq))
                        pending.subscribed.append((subs, made))
                        replies.append(req)
                    else:
                        replies.append(encode(Ok(req=req)))
                case Unsubscribe(req=req, topic=topic):
                    if fanout.unsubscribe(subs, topic):
                        freed.add(topic)
                    if durable:
                        writes.append(StoreUnsubscribe(msg.session_id, topic))
                        replies.append(req)
                    else:
                        replies.append(encode(Ok(req=req)))
                case Ping(req=req):
                    replies.append(encode(Pong(req=req)))
                case Stats(req=req):
                    # Answered here, in turn: this actor sees every session come and go.
                    replies.append(encode(StatsResult(req=req, stats=self._counters())))
                case Unregister(req=req):
                    self._drop(msg.session_id, "unregistered")
                    if durable:
                        writes.append(DeleteSession(msg.session_id))
                    replies.append(encode(Ok(req=req)))
                    close = ended = True
                    break
                case _:
                    _log.warning("unexpected_op", op=type(op).__name__)
        if durable:
            pending.close, pending.ended = close, ended
            self._finish(writes, pending)
        elif replies or close:
            data = b"".join(replies)  # type: ignore[arg-type]  # all bytes in memory mode
            tell(msg.conn.ref, Outbound(data, close=close, session_ended=ended))
        self._flush(touched.values())
        return rest, freed

    # --- the store ----------------------------------------------------------------------

    def _journal(self, writes: list[StoreOp | _Run], pending: _Pending) -> None:
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
                run = _Run(sessions[session_id], q, first, list(payloads))
                latest[id(q)] = run
                pending.appends.append(run)
                writes.append(run)
            if q.dropped_seqs or q.disk_discarded:
                if q.dropped_seqs:
                    seqs, q.dropped_seqs = tuple(q.dropped_seqs), []
                    writes.append(Discard(session_id, q.topic, seqs))
                if q.disk_discarded:
                    writes.append(DiscardOldest(session_id, q.topic, q.disk_discarded))
                    q.disk_discarded = 0
                writes.append(SetDropped(session_id, q.topic, q.dropped_live, q.dropped_away))
        journal.clear()

    def _finish(self, writes: list[StoreOp | _Run], pending: _Pending) -> None:
        """Submit the batch's writes; its answers go out once they are committed (at once
        when there is nothing to write and nothing ahead of them)."""
        if writes:
            batch = [
                Append(w.subs.session_id, w.q.topic, w.first, tuple(w.payloads))
                if type(w) is _Run
                else w
                for w in writes
            ]
            self._submit(batch, pending)  # type: ignore[arg-type]
        elif self._inflight:
            if pending.replies or pending.close:
                pending.submitted = False
                self._inflight.append(pending)
        else:
            self._answer(pending, None)

    def _submit(self, batch: list[StoreOp], pending: _Pending) -> None:
        assert self._store is not None
        if self._lazy:
            batch[:0] = self._lazy
            self._lazy = []
        self._inflight.append(pending)
        pending.size = sum(len(run.payloads) for run in pending.appends)
        self._uncommitted += pending.size
        conn = pending.conn
        if (
            self._uncommitted > self._backlog
            and conn is not None
            and conn.conn_id not in self._slowed
        ):
            # The disk is behind: stop reading this publisher until it catches up, so that
            # what waits for a commit (held here, payloads included) stays bounded.
            self._slowed[conn.conn_id] = conn
            _throttle(conn, True)
        ref = self.actor_ref

        def done(error: StoreError | None) -> None:
            tell(ref, _Committed(error))

        self._store.submit(tuple(batch), done)

    def _on_committed(self, error: StoreError | None) -> None:
        inflight = self._inflight
        first = inflight.popleft()
        self._uncommitted -= first.size
        self._answer(first, error)
        # Answers that wrote nothing and waited only for their turn.
        while inflight and not inflight[0].submitted:
            self._answer(inflight.popleft(), None)
        if self._slowed and self._uncommitted <= self._backlog // 2:
            slowed, self._slowed = self._slowed, {}
            for conn_id, conn in slowed.items():
                if conn_id not in self._held_conns:  # a held one stays paused
                    _throttle(conn, False)

    def _answer(self, pending: _Pending, error: StoreError | None) -> None:
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
            data = b"".join([_reply(r, error) for r in pending.replies])
            tell(conn.ref, Outbound(data, close=pending.close, session_ended=pending.ended))
        if touched:
            self._flush(touched.values())

    def _page_in(self, subs: SessionSubs) -> None:
        """Read the next page of each of the session's tails that runs low in memory."""
        store = self._store
        assert store is not None
        ref, session_id = self.actor_ref, subs.session_id
        for q in subs.queues.values():
            if q.disk and not q.reading and len(q.pending) < self._page // 2 + 1:

                def done(
                    entries: Entries, error: StoreError | None, q: SubscriptionQueue = q
                ) -> None:
                    tell(ref, _Paged(session_id, q, entries, error))

                store.read_queue(session_id, q.topic, q.start_read(), self._page, done)

    def _on_paged(self, msg: _Paged) -> None:
        subs = self._fanout.sessions.get(msg.session_id)
        q = msg.queue
        if subs is None or subs.queues.get(q.topic) is not q:
            return  # unsubscribed or ended meanwhile
        if msg.error is not None:
            q.reading = False
            _log.warning("queue_read_failed", session_id=msg.session_id, error=str(msg.error))
            if subs.conn is not None:
                self.loop.call_later(1.0, lambda: tell(self.actor_ref, _Retry(msg.session_id)))
            return
        q.page_in(msg.entries, self._page)
        if subs.conn is not None:
            self._flush((subs,))

    def _flush(self, sessions: Iterable[SessionSubs]) -> None:
        """Send each session what its queues have pending, as far as its credit goes."""
        for subs in sessions:
            conn = subs.conn
            if conn is None:
                continue
            chunks, sent, credit, told = take_within(subs.queues.values(), subs.credit)
            if self._store is not None:
                self._page_in(subs)
            if told is not None:
                for topic, count in told:
                    _log.warning(
                        "messages_dropped",
                        session_id=subs.session_id,
                        client_id=subs.client_id,
                        topic=topic,
                        count=count,
                        connected=True,
                    )
            if not chunks:
                continue
            if self._store is not None:
                for q in subs.queues.values():
                    if q.unacked and q.unacked[-1][0] > q.marked:
                        q.marked = q.unacked[-1][0]
                        self._lazy.append(MarkSent(subs.session_id, q.topic, q.marked))
            used = subs.credit - credit
            subs.credit = credit
            self._delivered += sent
            tell(conn.ref, Outbound(b"".join(chunks), credit=used))
