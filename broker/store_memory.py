"""`MemoryStore`: the `Store` in this process's memory, for `--in-memory` and as the model the
SQLite store is tested against. `submit` applies the batch and calls back at once.
See docs/architecture.md, "The store"."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field, replace
from operator import itemgetter

from tether.broker.store import (
    Ack,
    Append,
    Batch,
    BatchRejected,
    DeleteSession,
    Discard,
    DiscardOldest,
    MarkSent,
    OnDone,
    OnRead,
    PutSession,
    SessionRecord,
    SetDropped,
    SetHealth,
    SetTokens,
    Snapshot,
    StoreClosed,
    StoreOp,
    Subscribe,
    SubscriptionRecord,
    Touch,
    Unsubscribe,
)

__all__ = ["MemoryStore"]

_seq_of = itemgetter(0)
# Operations that no state can make illegal (on what is not there, they do nothing).
_NO_RULES = frozenset(
    {SetHealth, SetTokens, Touch, Ack, MarkSent, Discard, DiscardOldest, SetDropped}
)


@dataclass(slots=True)
class _Sub:
    active: bool
    next_seq: int
    sent_upto: int = 0
    dropped_live: int = 0
    dropped_away: int = 0
    nbytes: int = 0
    entries: list[tuple[int, bytes]] = field(default_factory=list)  # in seq order


class MemoryStore:
    """Sessions, subscriptions and queues in dicts; nothing survives the process."""

    def __init__(self) -> None:
        self._sessions: dict[str, SessionRecord] = {}
        self._subs: dict[tuple[str, str], _Sub] = {}
        self._topics: dict[str, set[str]] = {}  # session -> its topics, for DeleteSession
        self._closed = False

    def load(self) -> Snapshot:
        self._check_open()
        return Snapshot(
            tuple(self._sessions[k] for k in sorted(self._sessions)),
            tuple(
                SubscriptionRecord(
                    session_id=sid,
                    topic=topic,
                    active=sub.active,
                    next_seq=sub.next_seq,
                    sent_upto=sub.sent_upto,
                    dropped_live=sub.dropped_live,
                    dropped_away=sub.dropped_away,
                    queued=len(sub.entries),
                    queued_bytes=sub.nbytes,
                )
                for (sid, topic), sub in sorted(self._subs.items())
            ),
        )

    def submit(self, batch: Batch, on_done: OnDone) -> None:
        self._check_open()
        rejected = self._check(batch)
        if rejected is None:
            for op in batch:
                self._apply(op)
        on_done(rejected)

    def read_queue(
        self, session_id: str, topic: str, after_seq: int, limit: int, on_done: OnRead
    ) -> None:
        self._check_open()
        sub = self._subs.get((session_id, topic))
        if sub is None:
            on_done((), None)
            return
        start = bisect_right(sub.entries, after_seq, key=_seq_of)
        on_done(tuple(sub.entries[start : start + limit]), None)

    def close(self) -> None:
        self._closed = True

    @property
    def failing(self) -> str | None:
        return None  # nothing here can fail to commit

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed()

    def _check(self, batch: Batch) -> BatchRejected | None:
        """The batch against the store's two rules, before any of it is applied (all or
        nothing): only what decides them is followed, op by op, in overlays."""
        live: dict[str, bool] = {}  # session -> exists, as of the op being checked
        subs: dict[tuple[str, str], tuple[bool, int] | None] = {}  # (active, next_seq)

        def sub_state(key: tuple[str, str]) -> tuple[bool, int] | None:
            if key in subs:
                return subs[key]
            sub = self._subs.get(key)
            return None if sub is None else (sub.active, sub.next_seq)

        for op in batch:
            match op:
                case PutSession(session):
                    live[session.session_id] = True
                case DeleteSession(sid):
                    live[sid] = False
                    gone = {k for k in subs if k[0] == sid}
                    gone.update((sid, topic) for topic in self._topics.get(sid, ()))
                    subs.update(dict.fromkeys(gone))
                case Subscribe(sid, topic, next_seq):
                    if not live.get(sid, sid in self._sessions):
                        return BatchRejected(op, f"no session {sid!r}")
                    state = sub_state((sid, topic))
                    subs[(sid, topic)] = (True, max(next_seq, state[1] if state else 0))
                case Unsubscribe(sid, topic):
                    state = sub_state((sid, topic))
                    if state is not None:
                        subs[(sid, topic)] = (False, state[1])
                case Append(sid, topic, first_seq, payloads):
                    state = sub_state((sid, topic))
                    if state is None or not state[0] or state[1] > first_seq:
                        return BatchRejected(
                            op,
                            f"no active subscription {sid!r}/{topic!r}"
                            f" whose next seq is at most {first_seq}",
                        )
                    subs[(sid, topic)] = (True, first_seq + len(payloads))
                case _ if type(op) in _NO_RULES:
                    pass
                case _:
                    return BatchRejected(op, "not a store operation")
        return None

    def _apply(self, op: StoreOp) -> None:
        match op:
            case PutSession(session):
                self._sessions[session.session_id] = session
            case DeleteSession(sid):
                self._sessions.pop(sid, None)
                for topic in self._topics.pop(sid, ()):
                    del self._subs[(sid, topic)]
            case SetHealth(sid, health, details):
                if (record := self._sessions.get(sid)) is not None:
                    self._sessions[sid] = replace(record, health=health, health_details=details)
            case SetTokens(sid, token, previous):
                if (record := self._sessions.get(sid)) is not None:
                    self._sessions[sid] = replace(record, token_hash=token, previous_hash=previous)
            case Touch(sid, last_seen, expires_at):
                if (record := self._sessions.get(sid)) is not None:
                    self._sessions[sid] = replace(
                        record, last_seen=last_seen, expires_at=expires_at
                    )
            case Subscribe(sid, topic, next_seq):
                sub = self._subs.get((sid, topic))
                if sub is None:
                    self._subs[(sid, topic)] = _Sub(active=True, next_seq=next_seq)
                    self._topics.setdefault(sid, set()).add(topic)
                else:
                    sub.active = True
                    sub.next_seq = max(sub.next_seq, next_seq)
            case Unsubscribe(sid, topic):
                sub = self._subs.get((sid, topic))
                if sub is not None:
                    self._subs[(sid, topic)] = _Sub(active=False, next_seq=sub.next_seq)
            case Append(sid, topic, first_seq, payloads):
                sub = self._subs[(sid, topic)]
                sub.entries.extend(enumerate(payloads, first_seq))
                sub.nbytes += sum(map(len, payloads))
                sub.next_seq = first_seq + len(payloads)
            case Ack(sid, topic, upto):
                sub = self._subs.get((sid, topic))
                if sub is not None:
                    self._cut(sub, bisect_right(sub.entries, upto, key=_seq_of))
            case MarkSent(sid, topic, upto):
                sub = self._subs.get((sid, topic))
                if sub is not None and sub.active:
                    sub.sent_upto = max(sub.sent_upto, upto)
            case Discard(sid, topic, seqs):
                sub = self._subs.get((sid, topic))
                if sub is not None:
                    gone = set(seqs)
                    sub.entries = [e for e in sub.entries if e[0] not in gone]
                    sub.nbytes = sum(len(e[1]) for e in sub.entries)
            case DiscardOldest(sid, topic, count):
                sub = self._subs.get((sid, topic))
                if sub is not None:
                    self._cut(sub, count)
            case SetDropped(sid, topic, live, away):
                sub = self._subs.get((sid, topic))
                if sub is not None and sub.active:
                    sub.dropped_live, sub.dropped_away = live, away

    @staticmethod
    def _cut(sub: _Sub, count: int) -> None:
        """Remove the `count` oldest entries."""
        if count:
            sub.nbytes -= sum(len(e[1]) for e in sub.entries[:count])
            del sub.entries[:count]
