"""The broker's own events on `$sys/sessions/<event>`, and the fleet view of subscriptions.
Owned by the SubscriberManager and run on its thread; no I/O but through the journal.

Theory of operation: a lifecycle event (`SysEvent`, from the SessionManager) is a msgpack map
published like any message: queued for each subscriber of its topic, with a seq, acked, and
with a store appended and committed before it is sent (there is no publisher to answer: the
batch's `Pending` has no connection). The broker never waits for room: an event is pushed
whatever the queue holds, so a full queue drops its oldest, as an away subscriber's always
does. Only admin sessions subscribe to `$sys/...`: the SubscriberManager refuses others
(`not_authorized`) and, at each attach, removes the `$sys/...` subscriptions of a session
whose user is (no longer) admin.

Overflow (`$sys/sessions/dropped`): a queue counts its drops over its life
(`SubscriptionQueue.dropped_total`); after a batch of publishes that pushed anything out, the
queues of its topics report what they dropped since last noted (`dropped_noted`). Reports are
summed per (session, topic) and published one interval after the first of them, so there is at
most one event per (session, topic) per `DROP_INTERVAL`, its `count` being the drops since the
previous one. What a `$sys/...` queue drops is counted but never published (no loops).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import structlog

from tether.broker.fanout import Fanout, SessionSubs
from tether.broker.journal import Journal, Pending, Run
from tether.broker.messages import SubscriptionView
from tether.broker.store import StoreOp
from tether.broker.store import Unsubscribe as StoreUnsubscribe
from tether.protocol import Error, ErrorCode

__all__ = [
    "DROP_INTERVAL",
    "EVENT_PREFIX",
    "SYS_PREFIX",
    "DropsDue",
    "SysEvents",
    "encode_event",
    "metrics",
    "not_authorized",
    "rfc3339",
    "subscription_views",
]

SYS_PREFIX = "$sys/"  # topics only admin users may subscribe to
EVENT_PREFIX = "$sys/sessions/"
DROP_INTERVAL = 1.0  # seconds: at most one `dropped` event per (session, topic) per interval

_log = structlog.get_logger("tether.subscribers")


@dataclass(frozen=True, slots=True)
class DropsDue:
    """The aggregation interval of (session, topic) ran out: publish what it summed."""

    session_id: str
    topic: str


@dataclass(slots=True)
class _Drops:
    client_id: str
    username: str
    count: int


def rfc3339(at: float) -> str:
    """Seconds since the epoch as RFC 3339 UTC to the second, e.g. `2026-11-29T16:05:17Z`
    (the same precision as the HTTP API's times)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def encode_event(event: str, fields: Mapping[str, Any], at: float) -> bytes | None:
    """The event's payload: `fields` and `at` as one msgpack map; None (logged) when a value
    cannot be encoded. Metadata and health details came from msgpack, so they always can."""
    try:
        payload: bytes = msgpack.packb({**fields, "at": rfc3339(at)}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        _log.error("sys_event_not_encodable", sys_event=event, error=str(e))
        return None
    return payload


class SysEvents:
    """Publishing on `$sys/...` over the SubscriberManager's fan-out (and journal, if any).
    `flush` sends connected sessions what they may have; `arm(session_id, topic)` starts a
    `DROP_INTERVAL` timer whose end comes back as `DropsDue`."""

    __slots__ = ("_arm", "_drops", "_enforce", "_fanout", "_flush", "_journal")

    def __init__(
        self,
        fanout: Fanout,
        *,
        journal: Journal | None,
        flush: Callable[[Iterable[SessionSubs]], None],
        arm: Callable[[str, str], None],
        enforce: Callable[[dict[str, SessionSubs], list[str]], None] | None = None,
    ) -> None:
        """`enforce(touched, overflowed)`: the bounds wider than one queue, after pushes."""
        self._fanout = fanout
        self._enforce = enforce
        self._journal = journal
        self._flush = flush
        self._arm = arm
        self._drops: dict[tuple[str, str], _Drops] = {}  # summed until their timer runs out

    def publish(self, event: str, fields: Mapping[str, Any], at: float) -> None:
        """Queue the event for every subscriber of `$sys/sessions/<event>`, forced."""
        fanout = self._fanout
        topic = EVENT_PREFIX + event
        members = fanout.by_topic.get(topic)
        if not members:
            return  # nobody listens: not even encoded
        payload = encode_event(event, fields, at)
        if payload is None:
            return
        sessions = fanout.sessions
        appended = fanout.journal
        touched: dict[str, SessionSubs] = {}
        for session_id, q in members.items():
            subs = sessions[session_id]
            if appended is not None:
                appended.append((session_id, q, q.next_seq, [payload]))
            dropped = q.push(payload, connected=subs.conn is not None)
            if dropped:
                fanout.dropped += dropped
                q.dropped_noted = q.dropped_total  # a `$sys` queue's overflow is not an event
            if subs.conn is not None:
                touched[session_id] = subs
                subs.ready.add(q)
            if subs.account.bytes > fanout.session_bytes:
                fanout.over[session_id] = subs
        if self._enforce is not None:
            overflowed: list[str] = []
            self._enforce(touched, overflowed)
            if overflowed:
                self.note_drops(overflowed)
        journal = self._journal
        if journal is not None:
            # Committed first, then sent (the journal flushes what the commit made sendable).
            writes: list[StoreOp | Run] = []
            pending = Pending(None, [])
            journal.record(writes, pending)
            journal.finish(writes, pending)
        else:
            self._flush(touched.values())

    # --- queue overflow -----------------------------------------------------------------

    def note_drops(self, topics: Iterable[str]) -> None:
        """Publishes to `topics` pushed messages out: sum each queue's new drops."""
        fanout = self._fanout
        for topic in set(topics):
            members = fanout.by_topic.get(topic)
            if not members or topic.startswith(SYS_PREFIX):
                continue
            for session_id, q in members.items():
                count = q.dropped_total - q.dropped_noted
                if not count:
                    continue
                q.dropped_noted = q.dropped_total
                key = (session_id, topic)
                drops = self._drops.get(key)
                if drops is None:
                    subs = fanout.sessions[session_id]
                    self._drops[key] = _Drops(subs.client_id, subs.username, count)
                    self._arm(session_id, topic)
                else:
                    drops.count += count

    def drops_due(self, msg: DropsDue) -> None:
        drops = self._drops.pop((msg.session_id, msg.topic), None)
        if drops is None:
            return
        # Published even if the session ended meanwhile: the messages were lost all the same.
        fields = {
            "client_id": drops.client_id,
            "username": drops.username,
            "session_id": msg.session_id,
            "topic": msg.topic,
            "count": drops.count,
        }
        self.publish("dropped", fields, time.time())

    # --- admin only ---------------------------------------------------------------------

    def revoke(self, subs: SessionSubs) -> None:
        """A session attaching as a user that is not admin keeps no `$sys/...` subscription
        (restored from the store, or made while its user was admin): they are removed, as by
        an `unsubscribe`. Its client's next `subscribe` to them is refused `not_authorized`."""
        if subs.admin:
            return
        gone = [topic for topic in subs.queues if topic.startswith(SYS_PREFIX)]
        if not gone:
            return
        for topic in gone:
            self._fanout.unsubscribe(subs, topic)
        if self._journal is not None:
            ops: list[StoreOp] = [StoreUnsubscribe(subs.session_id, topic) for topic in gone]
            self._journal.submit(ops, Pending(None, []))
        _log.info(
            "sys_subscriptions_removed",
            session_id=subs.session_id,
            client_id=subs.client_id,
            username=subs.username,
            topics=gone,
        )


def subscription_views(
    fanout: Fanout, session_ids: Iterable[str]
) -> dict[str, tuple[SubscriptionView, ...]]:
    """`GetSubscriptions`' answer: each known session's subscriptions, sorted by topic.
    `dropped` counts over the subscription's life in this broker process: the store keeps no
    lifetime count, so after a restart it starts from the drops the store still had to tell
    the client (`dropped_live` + `dropped_away`). A topic subscribed again starts from 0."""
    views: dict[str, tuple[SubscriptionView, ...]] = {}
    sessions = fanout.sessions
    for session_id in session_ids:
        subs = sessions.get(session_id)
        if subs is None:
            continue
        views[session_id] = tuple(
            SubscriptionView(topic, len(q), len(q.unacked), q.dropped_total)
            for topic, q in sorted(subs.queues.items())
        )
    return views


def metrics(
    fanout: Fanout, *, delivered: int, redelivered: int, acked: int, expired: int
) -> dict[str, int]:
    """`GetMetrics`' answer (the SubscriberManager's names in broker/messages.py). What is
    queued is the queues' own running totals (`Fanout.totals`), not a walk over them.
    `messages_published` counts clients' publishes, not the broker's own events."""
    totals = fanout.totals
    queued, nbytes, subscriptions = totals.count, totals.bytes, totals.queues
    return {
        "messages_published": fanout.published,
        "messages_delivered": delivered,
        "messages_redelivered": redelivered,
        "messages_acked": acked,
        "messages_dropped": fanout.dropped,
        "messages_queued": queued,
        "bytes_queued": nbytes,
        "subscriptions": subscriptions,
        "topics": len(fanout.by_topic),
        "sessions_expired": expired,
    }


def not_authorized(req: int) -> Error:
    """The answer to a `subscribe` to `$sys/...` from a session whose user is not admin."""
    return Error(
        req=req,
        code=ErrorCode.NOT_AUTHORIZED,
        message="only admin users may subscribe to $sys topics",
    )
