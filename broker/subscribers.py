"""SubscriberManager: the actor that owns the data path and the broker's counters. It routes
each connection's frames, in order, to the fan-out, the held publishers and the delivery step,
and, with a store, to the journal (journal.py). See docs/architecture.md sections 2, 7 and 15.
It also publishes the broker's own events on `$sys/sessions/...` and answers the fleet view's
questions (sysevents.py), and enforces each user's topic permissions (grants.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import structlog

from tether.broker import passwords
from tether.broker.budget import Budgets
from tether.broker.delivery import Tally, take_within
from tether.broker.fanout import Fanout, SessionSubs
from tether.broker.grants import Grants, refused, revoke_disallowed, revoked_frames
from tether.broker.held import HeldPublishers
from tether.broker.journal import (
    COMMIT_BACKLOG,
    MEMORY_HEAD,
    PAGE,
    Committed,
    Journal,
    Paged,
    Pending,
    Reflush,
    Run,
)
from tether.broker.logthrottle import LogThrottle
from tether.broker.loop_actor import LoopActor, tell
from tether.broker.memory import default_memory_budget
from tether.broker.messages import (
    Attach,
    ConnHandle,
    Credit,
    Detach,
    DropSession,
    GetMetrics,
    GetStats,
    GetSubscriptions,
    Outbound,
    SessionAttached,
    SessionOps,
    SysEvent,
    Throttle,
    UsersReloaded,
)
from tether.broker.queues import SubscriptionQueue
from tether.broker.store import Ack as StoreAck
from tether.broker.store import (
    DeleteSession,
    SessionRecord,
    SetDropped,
    Store,
    StoreOp,
    SubscriptionRecord,
)
from tether.broker.store import Subscribe as StoreSubscribe
from tether.broker.store import Unsubscribe as StoreUnsubscribe
from tether.broker.sysevents import (
    DROP_INTERVAL,
    SYS_PREFIX,
    DropsDue,
    SysEvents,
    metrics,
    not_authorized,
    subscription_views,
)
from tether.broker.users import UserStore
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

_log = structlog.get_logger("tether.subscribers")


@dataclass(frozen=True, slots=True)
class _WaitOver:
    conn_id: int
    token: int


def _log_quietly(kind: str, count: int, fields: dict[str, object]) -> None:
    # One line per kind and interval (a client can repeat a refused request at will).
    _log.info(kind.partition("|")[0], count=count, **fields)


def _throttle(conn: ConnHandle, paused: bool) -> None:
    tell(conn.ref, Throttle(paused))


def _by_order(q: SubscriptionQueue) -> int:
    return q.order


def _quota_exceeded(req: int, limit: int) -> Error:
    return Error(
        req=req,
        code=ErrorCode.QUOTA_EXCEEDED,
        message=f"at most {limit} subscriptions per session",
    )


def _stats_refused(req: int) -> Error:
    return Error(req=req, code=ErrorCode.NOT_AUTHORIZED, message="only admin users may ask stats")


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
        max_subscriptions: int = 1_000,
        session_queue_bytes: int = 256 * 1024 * 1024,
        memory_budget: int | None = None,
        store_budget: int = 10 * 1024 * 1024 * 1024,
        users: UserStore | None = None,
        default_deny: bool = False,
    ) -> None:
        """`users`, `default_deny`: the topic permissions (grants.py); `users` None: every
        topic for every session (unless `default_deny`)."""
        super().__init__(loop, loop_thread)
        self._grants = Grants(users, default_deny)
        self._denied = {"publish": 0, "subscribe": 0}  # refused by the topic permissions
        self._revoked = 0  # subscriptions ended by a permissions change
        self._quiet = LogThrottle(loop, _log_quietly)
        self._max_frame = max_frame  # told to clients in `registered`
        self._high_water = outbound_high_water
        self._publish_wait = publish_wait
        self._max_subscriptions = max_subscriptions
        self._fanout = Fanout(
            queue_limit=queue_limit, queue_bytes=queue_bytes, session_bytes=session_queue_bytes
        )
        self._held = HeldPublishers(arm=self._arm_wait, throttle=_throttle)
        self._held_conns = self._held.conn_ids
        self._delivered = 0
        self._expired = 0
        self._acked = 0
        self._connected = 0  # sessions with a connection: kept, for an O(1) `stats`
        self._subscriptions_refused = 0  # subscribes over --max-subscriptions
        self._stats_refused = 0  # `stats` frames from users who are not admin
        self._tally = Tally()  # redeliveries, counted by the delivery step
        # None: in memory only, nothing is written anywhere.
        self._journal: Journal | None = None
        if store is not None:
            self._journal = Journal(
                store,
                self._fanout,
                ref=self.actor_ref,
                loop=loop,
                flush=self._flush,
                held_conns=self._held_conns,
                memory_head=memory_head,
                page=page,
                commit_backlog=commit_backlog,
            )
            self._journal.restore(restored_sessions, restored_subscriptions)
        if memory_budget is None:
            memory_budget = default_memory_budget()
        self._budgets = Budgets(
            self._fanout,
            self._journal,
            memory_budget=memory_budget,
            store_budget=store_budget,
        )
        self._events = SysEvents(
            self._fanout,
            journal=self._journal,
            flush=self._flush,
            arm=self._arm_drops,
            enforce=self._budgets.enforce,
        )
        _log.info(
            "queue_bounds",
            session_queue_bytes=session_queue_bytes,
            memory_budget=memory_budget,
            store_budget=store_budget if store is not None else None,
            max_subscriptions=max_subscriptions,
        )

    def on_start(self) -> None:
        # Sessions restored from the store: their subscriptions meet today's users file now,
        # not when (or if) they resume; what goes is told at the resume.
        for subs in list(self._fanout.sessions.values()):
            subs.perms = self._grants.matcher(subs.username, subs.client_id)
            if not self._grants.known(subs.username):
                continue  # no longer in the file: the SessionManager ends its sessions
            subs.revoked.extend(self._revoke(subs))

    def on_stop(self) -> None:
        self._quiet.close()
        if self._journal is not None:
            self._journal.write_lazy()

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
                if self._journal is not None:
                    self._journal.submit([DeleteSession(session_id)], Pending(None, []))
            case Committed(error):
                if self._journal is not None:
                    self._journal.on_committed(error)
            case Paged():
                if self._journal is not None:
                    self._journal.on_paged(message)
            case Reflush(session_id):
                subs = self._fanout.sessions.get(session_id)
                if subs is not None and subs.conn is not None:
                    subs.ready.update(q for q in subs.queues.values() if q.disk)
                    self._flush((subs,))
            case SysEvent(event, fields, at):
                self._events.publish(event, fields, at)
            case DropsDue():
                self._events.drops_due(message)
            case GetStats():
                return self._counters()
            case GetMetrics():
                budgets = self._budgets
                return {
                    **metrics(
                        self._fanout,
                        delivered=self._delivered,
                        redelivered=self._tally.redelivered,
                        acked=self._acked,
                        expired=self._expired,
                    ),
                    "subscriptions_refused": self._subscriptions_refused,
                    "stats_refused": self._stats_refused,
                    "permission_denied_publish": self._denied["publish"],
                    "permission_denied_subscribe": self._denied["subscribe"],
                    "subscriptions_revoked": self._revoked,
                    "messages_dropped_session_bytes": budgets.dropped_session,
                    "messages_dropped_memory_budget": budgets.dropped_memory,
                    "messages_dropped_store_budget": budgets.dropped_store,
                    "queues_spilled": budgets.spilled,
                    "bytes_queued_memory": self._fanout.totals.memory_bytes,
                    "memory_budget": budgets.memory_budget,
                    **(
                        {
                            "bytes_queued_store": self._fanout.totals.bytes,
                            "store_budget": budgets.store_budget,
                        }
                        if self._journal is not None
                        else {}
                    ),
                }
            case GetSubscriptions(session_ids):
                return subscription_views(self._fanout, session_ids)
            case UsersReloaded(users):
                self._on_users_reloaded(users)
            case _:
                return super().on_receive(message)
        return None

    def _counters(self) -> dict[str, int]:
        """The `stats` frame's counters, and `GetStats`'s: this actor is the one owner of
        each (docs/architecture.md section 2). It learns every session's life from the
        SessionManager's `Attach` and `DropSession`, so it counts sessions and expiries.
        Every figure is kept as things change: no walk over sessions or queues here."""
        fanout = self._fanout
        return {
            "sessions": len(fanout.sessions),
            "connected": self._connected,
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
        self._connected += 1
        subs.username, subs.admin = msg.username, msg.admin
        self._events.revoke(subs)  # `$sys/...` only while its user is admin
        subs.perms = self._grants.matcher(msg.username, msg.client_id)
        revoked = [*subs.revoked, *self._revoke(subs)]
        subs.revoked.clear()
        queued = sum(len(q) for q in subs.queues.values())
        dropped = sum(q.dropped_away for q in subs.queues.values())
        for q in subs.queues.values():
            if q.dropped_away and self._journal is not None:
                self._journal.lazy.append(SetDropped(msg.session_id, q.topic, q.dropped_live, 0))
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
        subs.ready.update(subs.queues.values())  # the first flush looks at every queue once
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
        if revoked:
            tell(msg.conn.ref, Outbound(revoked_frames(revoked)))
        # The queues drain before anything live: live messages queue behind them.
        self._flush((subs,))

    def _detach(self, subs: SessionSubs) -> None:
        if subs.conn is not None:
            self._connected -= 1
        subs.conn = None
        subs.credit = 0
        subs.ready.clear()
        for q in subs.queues.values():
            q.requeue_unacked()
            if self._journal is not None:
                self._journal.keep_head(q)
        if self._journal is not None:
            self._journal.write_lazy()
        # A queue of a session away no longer holds publishers back.
        if self._held_conns:
            self._held.release(self._retry)

    def _drop(self, session_id: str, reason: str) -> None:
        subs = self._fanout.remove_session(session_id)
        if subs is None:
            return
        if subs.conn is not None:
            self._connected -= 1
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

    # --- topic permissions --------------------------------------------------------------

    def _revoke(self, subs: SessionSubs) -> list[str]:
        gone = revoke_disallowed(subs, self._fanout, self._journal)
        if gone:
            self._revoked += len(gone)
            if self._held_conns:
                # A publisher held for room in one of those queues may go on.
                self._held.release(self._retry, freed=set(gone))
        return gone

    def _on_users_reloaded(self, users: UserStore) -> None:
        """The users file changed: the sessions of users whose lists changed get their new
        matcher, and lose (with one notice per topic) the subscriptions it does not allow."""
        changed = self._grants.reload(users)
        if not changed:
            return
        for subs in list(self._fanout.sessions.values()):
            if subs.username not in changed:
                continue
            subs.perms = self._grants.matcher(subs.username, subs.client_id)
            gone = self._revoke(subs)
            if not gone:
                continue
            if subs.conn is not None:
                tell(subs.conn.ref, Outbound(revoked_frames(gone)))
            else:
                subs.revoked.extend(gone)

    def _deny(self, action: str, req: int | None, topic: str, subs: SessionSubs | None) -> bytes:
        self._denied[action] += 1
        self._quiet.hit(
            f"permission_denied|{action}",
            action=action,
            topic=topic,
            client_id=subs.client_id if subs is not None else None,
            username=subs.username if subs is not None else None,
        )
        return encode(refused(req, f"{action} to", topic))

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

    def _arm_drops(self, session_id: str, topic: str) -> None:
        ref, due = self.actor_ref, DropsDue(session_id, topic)
        self.loop.call_later(DROP_INTERVAL, lambda: tell(ref, due))

    def _process(self, msg: SessionOps, *, force: bool) -> tuple[SessionOps | None, set[str]]:
        """Handle a batch in order. Returns the ops not taken, from the first publish that did
        not fit a live subscriber's queue (None when all were), and the topics whose queues
        acks or unsubscribes made room in."""
        fanout = self._fanout
        journal = self._journal
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
        # Topics whose publishes pushed older messages out: one check per run, not per message.
        dropped = fanout.dropped
        overflowed: list[str] = []
        # With a store: what this batch writes, in order (Appends merged per queue).
        writes: list[StoreOp | Run] = []
        pending = Pending(msg.conn, replies)
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
                perms = subs.perms if subs is not None else self._grants.orphan()
                if not perms.may_publish(op.topic):
                    replies += [self._deny("publish", p.req, op.topic, subs) for p in run]
                    index = end
                    continue
                taken = fanout.publish_many(op.topic, run, touched, force=force)
                self._budgets.enforce(touched, overflowed)
                if fanout.dropped != dropped:
                    dropped = fanout.dropped
                    overflowed.append(op.topic)
                if journal is not None:
                    # An `ok` rests on the commit: its req until then.
                    replies += [p.req for p in run[:taken] if p.req is not None]
                    journal.record(writes, pending)
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
                    if q is not None and (removed := q.ack(seq)):
                        self._acked += removed
                        # The delivery window and the queue have room again.
                        touched[msg.session_id] = subs
                        subs.ready.add(q)
                        freed.add(topic)
                        if journal is not None:
                            writes.append(StoreAck(msg.session_id, topic, q.acked_upto))
                case Subscribe(req=req, topic=topic):
                    if topic.startswith(SYS_PREFIX):
                        # The admin mark alone decides, whatever the lists say.
                        if not subs.admin:
                            replies.append(encode(not_authorized(req)))
                            continue
                    elif not subs.perms.may_subscribe(topic):
                        replies.append(self._deny("subscribe", req, topic, subs))
                        continue
                    if topic not in subs.queues and len(subs.queues) >= self._max_subscriptions:
                        self._subscriptions_refused += 1
                        replies.append(encode(_quota_exceeded(req, self._max_subscriptions)))
                        continue
                    made = fanout.subscribe(subs, topic)
                    if journal is not None and made is not None:
                        writes.append(StoreSubscribe(msg.session_id, topic, made.next_seq))
                        pending.subscribed.append((subs, made))
                        replies.append(req)
                    else:
                        replies.append(encode(Ok(req=req)))
                case Unsubscribe(req=req, topic=topic):
                    if fanout.unsubscribe(subs, topic):
                        freed.add(topic)
                    if journal is not None:
                        writes.append(StoreUnsubscribe(msg.session_id, topic))
                        replies.append(req)
                    else:
                        replies.append(encode(Ok(req=req)))
                case Ping(req=req):
                    replies.append(encode(Pong(req=req)))
                case Stats(req=req):
                    # Answered here, in turn: this actor sees every session come and go.
                    if subs.admin:
                        replies.append(encode(StatsResult(req=req, stats=self._counters())))
                    else:
                        self._stats_refused += 1
                        replies.append(encode(_stats_refused(req)))
                case Unregister(req=req):
                    self._drop(msg.session_id, "unregistered")
                    if journal is not None:
                        writes.append(DeleteSession(msg.session_id))
                    replies.append(encode(Ok(req=req)))
                    close = ended = True
                    break
                case _:
                    _log.warning("unexpected_op", op=type(op).__name__)
        if journal is not None:
            pending.close, pending.ended = close, ended
            journal.finish(writes, pending)
        elif replies or close:
            data = b"".join(replies)  # type: ignore[arg-type]  # all bytes in memory mode
            tell(msg.conn.ref, Outbound(data, close=close, session_ended=ended))
        self._flush(touched.values())
        if overflowed:
            self._events.note_drops(overflowed)
        return rest, freed

    def _flush(self, sessions: Iterable[SessionSubs]) -> None:
        """Send each session what its queues have pending, as far as its credit goes. Only
        its `ready` queues are looked at (in subscription order, as ever); those left with
        nothing to send leave the set until a push, an ack, a commit or a page puts them back."""
        for subs in sessions:
            conn = subs.conn
            if conn is None or not subs.ready:
                continue
            ready = subs.ready
            queues = sorted(ready, key=_by_order) if len(ready) > 1 else list(ready)
            chunks, sent, credit, told = take_within(queues, subs.credit, self._tally)
            if self._journal is not None:
                self._journal.page_in(subs, queues)
            for q in queues:
                if not q.dropped_live and not q.sendable():
                    ready.discard(q)
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
            if self._journal is not None:
                self._journal.mark_sent(subs, queues)
            used = subs.credit - credit
            subs.credit = credit
            self._delivered += sent
            tell(conn.ref, Outbound(b"".join(chunks), credit=used))
