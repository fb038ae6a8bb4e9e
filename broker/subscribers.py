"""SubscriberManager: subscriptions, their dead-letter queues, and delivery.

Theory of operation: this actor is the data path. A Listener sends it every frame that follows
registration as one `SessionOps` batch per socket read, so a publish costs one inbox hop per
read rather than per message, and answers to one connection leave in the order its frames
came. Publishing appends to each subscriber's `SubscriptionQueue`; at the end of the batch each
touched session that is attached gets what its queues have pending, encoded into one
`Outbound` per connection.

Flow control is by credit: a session may have at most `outbound_high_water` bytes of deliveries
handed to its Listener and not yet taken by the socket. Past that, messages wait in the queue
(bounded, oldest dropped and counted), so a slow consumer costs bounded memory. The Listener
gives credit back as its socket drains.

Resume: `Attach` puts back what the previous connection was sent and did not ack, answers
`registered` and drains the queues before anything live, since live messages go through the
same queues behind them.
"""

from __future__ import annotations

import itertools
import operator
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from tether.broker import passwords
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
from tether.protocol import (
    Ack,
    Dropped,
    Error,
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
    deliver_overhead,
    encode,
    encode_delivers,
)

_log = structlog.get_logger("tether.subscribers")
_payload_of = operator.itemgetter(1)


@dataclass(slots=True)
class SessionSubs:
    session_id: str
    client_id: str
    conn: ConnHandle | None
    credit: int
    queues: dict[str, SubscriptionQueue] = field(default_factory=dict)
    # Seq counters outlive an unsubscribe: a topic subscribed again continues its numbering.
    next_seqs: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Held:
    conn: ConnHandle
    batches: deque[SessionOps]
    token: int  # tells this wait's timer from an earlier wait's


@dataclass(frozen=True, slots=True)
class _WaitOver:
    conn_id: int
    token: int


class SubscriberManager(LoopActor):
    resume_after_failure = True

    def __init__(
        self,
        loop: Any,
        loop_thread: int,
        *,
        queue_limit: int,
        queue_bytes: int,
        outbound_high_water: int,
        publish_wait: float = 1.0,
    ) -> None:
        super().__init__(loop, loop_thread)
        self._queue_limit = queue_limit
        self._queue_bytes = queue_bytes
        self._high_water = outbound_high_water
        self._sessions: dict[str, SessionSubs] = {}
        self._by_topic: dict[str, dict[str, SubscriptionQueue]] = {}
        self._publish_wait = publish_wait
        self._held: dict[int, _Held] = {}  # conn_id -> its batches waiting for queue room
        self._hold_tokens = itertools.count(1)
        self.published = 0
        self.delivered = 0
        self.dropped = 0
        self.expired = 0

    def on_receive(self, message: Any) -> Any:
        match message:
            case SessionOps():
                self._on_ops(message)
            case Credit(session_id, conn_id, nbytes):
                subs = self._sessions.get(session_id)
                if subs is not None and subs.conn is not None and subs.conn.conn_id == conn_id:
                    subs.credit += nbytes
                    self._flush_one(subs)
            case _WaitOver(conn_id, token):
                held = self._held.get(conn_id)
                if held is not None and held.token == token:
                    self._release_held(conn_id, force=True)
            case Attach():
                self._on_attach(message)
            case Detach(session_id, conn_id):
                subs = self._sessions.get(session_id)
                if subs is not None and subs.conn is not None and subs.conn.conn_id == conn_id:
                    self._detach(subs)
            case DropSession(session_id, reason):
                self._drop(session_id, reason)
            case GetStats():
                return dict(self._counters())
            case _:
                return super().on_receive(message)
        return None

    def _counters(self) -> tuple[tuple[str, int], ...]:
        return (
            ("sessions", len(self._sessions)),
            ("connected", sum(1 for s in self._sessions.values() if s.conn is not None)),
            ("expired", self.expired),
            ("bcrypt_hashes", passwords.hash_count()),
            ("topics", len(self._by_topic)),
            ("published", self.published),
            ("delivered", self.delivered),
            ("dropped", self.dropped),
            ("queued", sum(len(q) for s in self._sessions.values() for q in s.queues.values())),
        )

    # --- registration -------------------------------------------------------------------

    def _on_attach(self, msg: Attach) -> None:
        subs = self._sessions.get(msg.session_id)
        if subs is None:
            subs = SessionSubs(
                session_id=msg.session_id, client_id=msg.client_id, conn=None, credit=0
            )
            self._sessions[msg.session_id] = subs
        elif subs.conn is not None:
            # Resumed over a connection that is still open: it has been told `taken_over`.
            self._detach(subs)
        queued = sum(len(q) for q in subs.queues.values())
        dropped = sum(q.dropped_away for q in subs.queues.values())
        for q in subs.queues.values():
            q.dropped_away = 0
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
        )
        tell(
            msg.conn.ref,
            SessionAttached(msg.session_id, msg.client_id, msg.keepalive, encode(registered)),
        )
        self._flush_one(subs)

    def _detach(self, subs: SessionSubs) -> None:
        subs.conn = None
        subs.credit = 0
        for q in subs.queues.values():
            q.requeue_unacked()
        # A queue of a session away no longer holds publishers back.
        self._release_held()

    def _drop(self, session_id: str, reason: str) -> None:
        subs = self._sessions.pop(session_id, None)
        if subs is None:
            return
        if reason == "expired":
            self.expired += 1
        discarded = 0
        for topic, q in subs.queues.items():
            discarded += len(q)
            self._remove_from_topic(topic, session_id)
        self._release_held()
        _log.info(
            "session_queues_removed",
            session_id=session_id,
            client_id=subs.client_id,
            reason=reason,
            discarded=discarded,
        )

    def _remove_from_topic(self, topic: str, session_id: str) -> None:
        members = self._by_topic.get(topic)
        if members is not None:
            members.pop(session_id, None)
            if not members:
                del self._by_topic[topic]

    # --- the data path ------------------------------------------------------------------

    def _on_ops(self, msg: SessionOps) -> None:
        held = self._held.get(msg.conn.conn_id)
        if held is not None:
            held.batches.append(msg)  # behind what already waits: one connection, one order
            return
        rest, freed = self._process(msg, force=False)
        if rest is not None:
            self._hold(msg.conn, rest)
        if freed and self._held:
            self._release_held(freed=freed)

    def _process(self, msg: SessionOps, *, force: bool) -> tuple[SessionOps | None, set[str]]:
        """Handle a batch in order. Returns the ops not taken, from the first publish that did
        not fit a live subscriber's queue (None when all were), and the topics whose queues
        acks or unsubscribes made room in."""
        subs = self._sessions.get(msg.session_id)
        current = (
            subs is not None and subs.conn is not None and subs.conn.conn_id == msg.conn.conn_id
        )
        replies: list[bytes] = []
        touched: dict[str, SessionSubs] = {}
        freed: set[str] = set()
        rest: SessionOps | None = None
        close = msg.close
        ended = False
        ops = msg.ops
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
                taken = self._publish_many(op.topic, run, touched, force=force)
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
                case Subscribe(req=req, topic=topic):
                    if topic not in subs.queues:
                        q = SubscriptionQueue(
                            topic,
                            max_count=self._queue_limit,
                            max_bytes=self._queue_bytes,
                            next_seq=subs.next_seqs.pop(topic, 1),
                        )
                        subs.queues[topic] = q
                        self._by_topic.setdefault(topic, {})[msg.session_id] = q
                    replies.append(encode(Ok(req=req)))
                case Unsubscribe(req=req, topic=topic):
                    q = subs.queues.pop(topic, None)
                    if q is not None:
                        subs.next_seqs[topic] = q.next_seq
                        self._remove_from_topic(topic, msg.session_id)
                        freed.add(topic)
                    replies.append(encode(Ok(req=req)))
                case Ping(req=req):
                    replies.append(encode(Pong(req=req)))
                case Stats(req=req):
                    # Answered here, in turn: this actor sees every session come and go.
                    stats = dict(self._counters())
                    replies.append(encode(StatsResult(req=req, stats=stats)))
                case Unregister(req=req):
                    self._drop(msg.session_id, "unregistered")
                    replies.append(encode(Ok(req=req)))
                    close = ended = True
                    break
                case _:
                    _log.warning("unexpected_op", op=type(op).__name__)
        if replies or close:
            tell(msg.conn.ref, Outbound(b"".join(replies), close=close, session_ended=ended))
        self._flush(touched)
        return rest, freed

    # --- publishers held back by a full queue -------------------------------------------
    #
    # Theory of operation: a publish that would push a message out of a *connected*
    # subscriber's queue is not taken yet. Its batch, from that op on, waits here, and so does
    # every later batch of the same connection, in order; the Listener is told to stop reading
    # (TCP then slows the publisher). Whenever acks make room, waiting batches are tried again.
    # After `publish_wait` they are forced: the oldest unsent messages make room, counted and
    # told as `dropped`. A live subscriber that keeps up therefore loses nothing however fast
    # it is published to, and a stuck one holds publishers up for `publish_wait` at most.

    def _hold(self, conn: ConnHandle, rest: SessionOps) -> None:
        held = _Held(conn, deque([rest]), 0)
        self._held[conn.conn_id] = held
        tell(conn.ref, Throttle(True))
        self._arm_wait(held)

    def _arm_wait(self, held: _Held) -> None:
        # The wait counts time without progress: a subscriber that is slow but moving keeps
        # its publishers waiting (nothing lost); one that is stuck releases them forced.
        held.token = next(self._hold_tokens)
        ref, over = self.actor_ref, _WaitOver(held.conn.conn_id, held.token)
        self.loop.call_later(self._publish_wait, lambda: tell(ref, over))

    def _release_held(
        self, only: int | None = None, *, force: bool = False, freed: set[str] | None = None
    ) -> None:
        """Try the held batches again, in turn. `freed`: the topics whose subscribers just
        made room: publishers waiting on them count that as progress even when others took
        the room first (the wait is for a stuck subscriber, not for a turn)."""
        for conn_id in [only] if only is not None else list(self._held):
            held = self._held.get(conn_id)
            if held is None:
                continue
            progressed = False
            while held.batches:
                batch = held.batches.popleft()
                rest, _ = self._process(batch, force=force)
                if rest is not None:
                    held.batches.appendleft(rest)
                    progressed = progressed or len(rest.ops) < len(batch.ops)
                    break
                progressed = True
            if not held.batches:
                del self._held[conn_id]
                tell(held.conn.ref, Throttle(False))
            elif progressed:
                # Round robin: whoever got room goes to the back of the line.
                del self._held[conn_id]
                self._held[conn_id] = held
                self._arm_wait(held)
            elif freed and _blocked_topic(held) in freed:
                self._arm_wait(held)

    def _publish(
        self, topic: str, payload: bytes, touched: dict[str, SessionSubs], *, force: bool
    ) -> bool:
        """Queue the message for every subscriber, or for none (False) if a connected
        subscriber's queue has no room and the publisher has not waited long enough."""
        members = self._by_topic.get(topic)
        if not members:
            self.published += 1
            return True
        sessions = self._sessions
        if not force:
            size = len(payload)
            for session_id, q in members.items():
                if sessions[session_id].conn is not None and q.is_full_for(size):
                    return False
        self.published += 1
        for session_id, q in members.items():
            subs = sessions[session_id]
            self.dropped += q.push(payload, connected=subs.conn is not None)
            if subs.conn is not None:
                touched[session_id] = subs
        return True

    def _publish_many(
        self, topic: str, run: list[Publish], touched: dict[str, SessionSubs], *, force: bool
    ) -> int:
        """`_publish` the messages of `run` (all to `topic`) in order, until one is not taken;
        returns how many were. As many as every connected subscriber has room for go in one
        step; the rest, if any, one by one."""
        members = self._by_topic.get(topic)
        if not members:
            self.published += len(run)
            return len(run)
        taken = 0
        if len(run) > 1:
            sessions = self._sessions
            payloads = [publish.payload for publish in run]
            fit = len(payloads)
            if not force:
                # The longest prefix no connected subscriber's queue would push anything out for.
                room_bytes: int | None = None
                for session_id, q in members.items():
                    if sessions[session_id].conn is not None:
                        count, nbytes = q.room()
                        fit = min(fit, count)
                        room_bytes = nbytes if room_bytes is None else min(room_bytes, nbytes)
                if room_bytes is not None and fit > 1:
                    sums = list(itertools.accumulate(map(len, payloads[:fit])))
                    fit = bisect_right(sums, room_bytes)
            if fit > 1:
                if fit < len(payloads):
                    del payloads[fit:]
                size = sum(map(len, payloads))
                self.published += fit
                for session_id, q in members.items():
                    subs = sessions[session_id]
                    self.dropped += q.push_many(payloads, size, connected=subs.conn is not None)
                    if subs.conn is not None:
                        touched[session_id] = subs
                taken = fit
        for publish in run[taken:]:
            if not self._publish(topic, publish.payload, touched, force=force):
                return taken
            taken += 1
        return taken

    def _flush(self, touched: dict[str, SessionSubs]) -> None:
        for subs in touched.values():
            self._flush_one(subs)

    def _flush_one(self, subs: SessionSubs) -> None:
        """Send what the session's queues have pending, as far as its credit goes."""
        conn = subs.conn
        if conn is None:
            return
        chunks: list[bytes] = []
        sent = 0
        credit = subs.credit
        append = chunks.append
        for q in subs.queues.values():
            if q.dropped_live:
                append(encode(Dropped(topic=q.topic, count=q.dropped_live)))
                _log.warning(
                    "messages_dropped",
                    session_id=subs.session_id,
                    client_id=subs.client_id,
                    topic=q.topic,
                    count=q.dropped_live,
                    connected=True,
                )
                q.dropped_live = 0
            # As `take()` while credit > 0, but a run at a time: this is the per-delivery cost.
            count = q.sendable() if credit > 0 else 0
            if not count:
                continue
            pending = q.pending
            if count == len(pending):
                entries = list(pending)
            else:
                entries = list(itertools.islice(pending, count))
            least, most = deliver_overhead(q.topic)
            if q.bytes + count * most >= credit:
                # The credit may run out first: encode only up to where it would at the least
                # overhead (so a few frames past it at most), and cut exactly below.
                sums = list(itertools.accumulate(map(len, map(_payload_of, entries))))
                last = bisect_left(range(count), credit, key=lambda i: sums[i] + (i + 1) * least)
                del entries[last + 1 :]
                count = len(entries)
            frames = encode_delivers(q.topic, entries, q.redeliver_upto)
            total = sum(map(len, frames))
            if total - len(frames[-1]) >= credit:
                count = 0
                for frame in frames:
                    count += 1
                    credit -= len(frame)
                    if credit <= 0:
                        break
                del frames[count:]
            else:
                credit -= total
            q.take_many(count)
            chunks += frames
            sent += count
        if not chunks:
            return
        data = b"".join(chunks)
        used = subs.credit - credit
        subs.credit = credit
        self.delivered += sent
        tell(conn.ref, Outbound(data, credit=used))


def _blocked_topic(held: _Held) -> str | None:
    """The topic of the publish a held connection waits with (its first op not taken)."""
    first = held.batches[0].ops[0] if held.batches and held.batches[0].ops else None
    return first.topic if type(first) is Publish else None
