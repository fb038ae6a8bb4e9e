"""Who subscribes to what, and each publish queued for every subscriber of its topic.

Pure data, no actors, no I/O. See docs/architecture.md section 7 (the hot path).
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from dataclasses import dataclass, field

from tether.broker.messages import ConnHandle
from tether.broker.permissions import ALLOW_ALL, TopicMatcher
from tether.broker.queues import Account, SubscriptionQueue, Totals
from tether.protocol import Publish

__all__ = ["Fanout", "SessionSubs"]


@dataclass(slots=True)
class SessionSubs:
    """One session's subscriptions, and where its deliveries go (`conn` None: away).
    `username` and `admin` come with each `Attach` (`admin`: may subscribe to `$sys/...`).
    `ready`: the queues that may have something to send (deliveries, or a `dropped` notice),
    so that a flush touches those only, not every subscription; `account`: the payload bytes
    of all its queues (`--session-queue-bytes`); `perms`: what its user may publish and
    subscribe to."""

    session_id: str
    client_id: str
    conn: ConnHandle | None
    credit: int
    queues: dict[str, SubscriptionQueue] = field(default_factory=dict)
    # Seq counters outlive an unsubscribe: a topic subscribed again continues its numbering.
    next_seqs: dict[str, int] = field(default_factory=dict)
    username: str = ""
    admin: bool = False
    ready: set[SubscriptionQueue] = field(default_factory=set)
    account: Account = field(default_factory=Account)
    # Its user's topic permissions (grants.py), compiled at each attach and reload.
    perms: TopicMatcher = ALLOW_ALL
    # Subscriptions ended by a permissions change while away: told at the next attach.
    revoked: list[str] = field(default_factory=list)


class Fanout:
    """The sessions' subscriptions and the topic index over them (`topic -> {session: queue}`),
    and the counters of what publishing did: `published` (taken) and `dropped` (pushed out).
    `totals` sums every queue (kept by the queues themselves); `over` collects the sessions a
    push took past `session_bytes`, for the caller to shed (broker/budget.py)."""

    __slots__ = (
        "_order",
        "by_topic",
        "dropped",
        "journal",
        "over",
        "published",
        "queue_bytes",
        "queue_limit",
        "session_bytes",
        "sessions",
        "totals",
    )

    def __init__(self, *, queue_limit: int, queue_bytes: int, session_bytes: int = 1 << 62) -> None:
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        self.session_bytes = session_bytes
        self.totals = Totals()
        self.over: dict[str, SessionSubs] = {}
        self._order = 0
        self.sessions: dict[str, SessionSubs] = {}
        self.by_topic: dict[str, dict[str, SubscriptionQueue]] = {}
        self.published = 0
        self.dropped = 0
        # With a store: every push, as (session_id, queue, first seq, payloads), for the
        # caller to turn into `Append`s (and each queue's `dropped_seqs` into `Discard`s).
        self.journal: list[tuple[str, SubscriptionQueue, int, list[bytes]]] | None = None

    # --- who subscribes to what -------------------------------------------------------------

    def remove_session(self, session_id: str) -> SessionSubs | None:
        """Forget the session and take its queues out of the index; returns what it held."""
        subs = self.sessions.pop(session_id, None)
        if subs is not None:
            for topic, q in subs.queues.items():
                q.unbind()
                self._remove_from_topic(topic, session_id)
            subs.ready.clear()
            self.over.pop(session_id, None)
        return subs

    def subscribe(self, subs: SessionSubs, topic: str) -> SubscriptionQueue | None:
        """Returns the new queue, or None: already subscribed."""
        if topic in subs.queues:
            return None
        q = SubscriptionQueue(
            topic,
            max_count=self.queue_limit,
            max_bytes=self.queue_bytes,
            next_seq=subs.next_seqs.pop(topic, 1),
        )
        if self.journal is not None:
            q.committed = q.next_seq - 1
            q.dropped_seqs = []
        self.add_queue(subs, q)
        return q

    def add_queue(self, subs: SessionSubs, q: SubscriptionQueue) -> None:
        self._order += 1
        q.order = self._order  # later subscriptions deliver after earlier ones, as ever
        q.bind(subs.account, self.totals)
        subs.queues[q.topic] = q
        self.by_topic.setdefault(q.topic, {})[subs.session_id] = q

    def unsubscribe(self, subs: SessionSubs, topic: str) -> bool:
        """Drop the subscription's queue, uncounted; returns whether there was one."""
        q = subs.queues.pop(topic, None)
        if q is None:
            return False
        subs.next_seqs[topic] = q.next_seq
        q.unbind()
        subs.ready.discard(q)
        self._remove_from_topic(topic, subs.session_id)
        return True

    def _remove_from_topic(self, topic: str, session_id: str) -> None:
        members = self.by_topic.get(topic)
        if members is not None:
            members.pop(session_id, None)
            if not members:
                del self.by_topic[topic]

    def queued(self) -> int:
        """Messages in all queues, unacked deliveries included (kept, not summed)."""
        return self.totals.count

    # --- publishing -------------------------------------------------------------------------
    #
    # A publish goes into every subscriber's queue or into none. It goes into none (False, or
    # a short count) while a *connected* subscriber's queue would push an older message out,
    # unless `force`: the caller then holds the publisher back (section 7). A subscriber away
    # never holds anyone: its queue drops its oldest on push. `touched` collects the connected
    # sessions that got something, to be flushed at the end of the batch.

    def publish(
        self, topic: str, payload: bytes, touched: dict[str, SessionSubs], *, force: bool
    ) -> bool:
        """Queue the message for every subscriber, or for none (False)."""
        members = self.by_topic.get(topic)
        if not members:
            self.published += 1
            return True
        sessions = self.sessions
        if not force:
            size = len(payload)
            for session_id, q in members.items():
                if sessions[session_id].conn is not None and q.is_full_for(size):
                    return False
        self.published += 1
        journal = self.journal
        for session_id, q in members.items():
            subs = sessions[session_id]
            if journal is not None:
                journal.append((session_id, q, q.next_seq, [payload]))
            self.dropped += q.push(payload, connected=subs.conn is not None)
            if subs.conn is not None:
                touched[session_id] = subs
                subs.ready.add(q)
            if subs.account.bytes > self.session_bytes:
                self.over[session_id] = subs
        return True

    def publish_many(
        self, topic: str, run: list[Publish], touched: dict[str, SessionSubs], *, force: bool
    ) -> int:
        """`publish` the messages of `run` (all to `topic`) in order, until one is not taken;
        returns how many were. As many as every connected subscriber has room for go in one
        step; the rest, if any, one by one."""
        members = self.by_topic.get(topic)
        if not members:
            self.published += len(run)
            return len(run)
        taken = 0
        if len(run) > 1:
            sessions = self.sessions
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
                journal = self.journal
                for session_id, q in members.items():
                    subs = sessions[session_id]
                    if journal is not None:
                        journal.append((session_id, q, q.next_seq, payloads))
                    self.dropped += q.push_many(payloads, size, connected=subs.conn is not None)
                    if subs.conn is not None:
                        touched[session_id] = subs
                        subs.ready.add(q)
                    if subs.account.bytes > self.session_bytes:
                        self.over[session_id] = subs
                taken = fit
        for publish in run[taken:]:
            if not self.publish(topic, publish.payload, touched, force=force):
                return taken
            taken += 1
        return taken
