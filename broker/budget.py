"""The bounds on queued bytes wider than one queue (issue 12): one session's queues together
(`--session-queue-bytes`), all queues in memory (`--memory-budget`) and all queues in the
store (`--store-budget`). Pure: owned by the SubscriberManager and run on its thread, over its
fan-out and, with a store, its journal.

Theory of operation: the queues keep the sums (`Account` per session, `Totals` for all, see
queues.py), so the check after each run of pushes costs a comparison. Past a bound the oldest
messages of the *largest* queue in scope are dropped (`SubscriptionQueue.shed`) until the sum
is back within it, never from the others; each drop is counted and told exactly as overflow
is (`dropped_live` as a `dropped` frame, `dropped_away` in `registered.dropped`, the
`$sys/sessions/dropped` event, and with a store `Discard`/`DiscardOldest`/`SetDropped`). A
publisher is never refused for it. Past the memory budget the durable broker first moves the
largest backlogs to the store (their `spill` lowered to one message: the rest is tail, read
back a page at a time while connected) and drops only when nothing is left to move. The
largest queues of the whole broker are found by one scan, kept for a second as a short list
of candidates, so a broker held at its budget does not walk every queue per publish; when
spilling the candidates is not enough, every queue is spilled largest first (at most once a
second) before anything is dropped.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator
from typing import Final

import structlog

from tether.broker.fanout import Fanout, SessionSubs
from tether.broker.journal import Journal
from tether.broker.queues import SubscriptionQueue

__all__ = ["Budgets"]

_log = structlog.get_logger("tether.subscribers")

CANDIDATES: Final = 32  # queues kept from one scan for the largest
RESCAN: Final = 1.0  # seconds a scan's candidates are used before the next scan
LOG_INTERVAL: Final = 10.0  # seconds between two log lines of one kind of drop
SPILL_HEAD: Final = 1  # messages a queue spilled for the memory budget keeps in memory

Touched = dict[str, SessionSubs]


Member = tuple[SessionSubs, SubscriptionQueue]


def _memory(member: Member) -> int:
    return member[1].memory_bytes


def _stored(member: Member) -> int:
    return member[1].bytes


def _size(q: SubscriptionQueue) -> int:
    return q.bytes


class _Ranking:
    """The largest queues by `key`, from a scan at most `RESCAN` seconds old."""

    __slots__ = ("_at", "_candidates", "_full_at", "_key", "_members")

    def __init__(
        self,
        key: Callable[[Member], int],
        members: Callable[[], Iterator[Member]],
    ) -> None:
        self._key = key
        self._members = members
        self._candidates: list[Member] = []
        self._at = self._full_at = -RESCAN

    def largest(self) -> Member | None:
        """The largest candidate that still holds something (None: no queue does)."""
        scanned = False
        if time.monotonic() - self._at > RESCAN:
            self._scan()
            scanned = True
        while True:
            best, size = None, 0
            for member in self._candidates:
                if member[1].totals is not None and (current := self._key(member)) > size:
                    best, size = member, current
            if best is not None or scanned:
                return best
            self._scan()  # the candidates are spent: look again at once
            scanned = True

    def ranked(self) -> list[Member]:
        """The candidates, largest first (a fresh scan if the last one is stale)."""
        if time.monotonic() - self._at > RESCAN:
            self._scan()
        live = [member for member in self._candidates if member[1].totals is not None]
        live.sort(key=self._key, reverse=True)
        return live

    def everything(self, every: float) -> list[Member] | None:
        """Every queue, largest first, at most once per `every` seconds (None: not yet).
        The candidates are refreshed from it."""
        now = time.monotonic()
        if now - self._full_at <= every:
            return None
        self._full_at = now
        members = sorted(self._members(), key=self._key, reverse=True)
        self._candidates, self._at = members[:CANDIDATES], now
        return members

    def _scan(self) -> None:
        self._candidates = heapq.nlargest(CANDIDATES, self._members(), key=self._key)
        self._at = time.monotonic()


class Budgets:
    """Checks the bounds after pushes (`enforce`) and counts what they dropped."""

    def __init__(
        self,
        fanout: Fanout,
        journal: Journal | None,
        *,
        memory_budget: int,
        store_budget: int,
    ) -> None:
        self._fanout = fanout
        self._journal = journal
        self.memory_budget = memory_budget
        self.store_budget = store_budget
        self.dropped_session = 0  # messages dropped for --session-queue-bytes
        self.dropped_memory = 0  # ... for --memory-budget
        self.dropped_store = 0  # ... for --store-budget
        self.spilled = 0  # queues whose backlog was moved to the store for the memory budget
        self._memory = _Ranking(_memory, self._all_queues)
        self._store = _Ranking(_stored, self._all_queues)
        self._logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def _all_queues(self) -> Iterator[Member]:
        for subs in self._fanout.sessions.values():
            for q in subs.queues.values():
                yield subs, q

    def enforce(self, touched: Touched, overflowed: list[str]) -> None:
        """After pushes: bring every bound back within its limit. Sessions whose drops must
        be told go to `touched`, the topics that dropped to `overflowed`."""
        fanout = self._fanout
        if fanout.over:
            over, fanout.over = fanout.over, {}
            for subs in over.values():
                self._session(subs, touched, overflowed)
        totals = fanout.totals
        if totals.memory_bytes > self.memory_budget:
            self._relieve_memory(touched, overflowed)
        if self._journal is not None and totals.bytes > self.store_budget:
            self._relieve_store(touched, overflowed)

    # --- each bound -------------------------------------------------------------------

    def _session(self, subs: SessionSubs, touched: Touched, overflowed: list[str]) -> None:
        limit = self._fanout.session_bytes
        account = subs.account
        while account.bytes > limit and subs.queues:
            q = max(subs.queues.values(), key=_size)
            count = q.shed(account.bytes - limit, connected=subs.conn is not None)
            if not count:
                break
            self.dropped_session += count
            self._dropped(subs, q, count, touched, overflowed, "session_queue_bytes")

    def _relieve_memory(self, touched: Touched, overflowed: list[str]) -> None:
        totals = self._fanout.totals
        budget = self.memory_budget
        if self._journal is not None and not self._spill(budget):
            return  # moved (or about to move, once stored) under the budget
        while totals.memory_bytes > budget:
            member = self._memory.largest()
            if member is None:
                return
            subs, q = member
            count = q.shed(
                totals.memory_bytes - budget, connected=subs.conn is not None, memory_only=True
            )
            if not count:
                return
            self.dropped_memory += count
            self._dropped(subs, q, count, touched, overflowed, "memory_budget")

    def _spill(self, budget: int) -> bool:
        """Durable: move the largest in-memory backlogs to the store (each keeps a head of
        `SPILL_HEAD`), the candidates first, then, at most once per `RESCAN`, every queue
        largest first. False: the budget holds, or will once what is being stored is; True:
        nothing is left to move, so drop."""
        totals = self._fanout.totals
        for everything in (False, True):
            if everything:
                members = self._memory.everything(RESCAN)
                if members is None:
                    return True
            else:
                members = self._memory.ranked()
            waiting = False
            for _, q in members:
                if len(q.pending) <= SPILL_HEAD:
                    continue  # nothing to move (its tail, if any, is already on disk)
                # (A connected queue's page read back may go out again, to be read back as
                # its client takes it: slower, but nothing is lost.)
                if q.spill != SPILL_HEAD:
                    q.spill = SPILL_HEAD
                    self.spilled += 1
                q.trim()
                if len(q.pending) > SPILL_HEAD:
                    waiting = True  # not all stored yet (or a page is being read): soon
                if totals.memory_bytes <= budget:
                    return False
            if waiting:
                return False
        return True

    def _relieve_store(self, touched: Touched, overflowed: list[str]) -> None:
        totals = self._fanout.totals
        while totals.bytes > self.store_budget:
            member = self._store.largest()
            if member is None:
                return
            subs, q = member
            count = q.shed(totals.bytes - self.store_budget, connected=subs.conn is not None)
            if not count:
                return
            self.dropped_store += count
            self._dropped(subs, q, count, touched, overflowed, "store_budget")

    # --- telling ------------------------------------------------------------------------

    def _dropped(
        self,
        subs: SessionSubs,
        q: SubscriptionQueue,
        count: int,
        touched: Touched,
        overflowed: list[str],
        bound: str,
    ) -> None:
        self._fanout.dropped += count
        if subs.conn is not None:
            touched[subs.session_id] = subs
            subs.ready.add(q)  # its `dropped` notice goes out at the flush
        overflowed.append(q.topic)
        if self._journal is not None:
            self._journal.shed.append((subs.session_id, q))
        # One line per bound and interval, with what it dropped since the last line.
        self._unlogged[bound] = self._unlogged.get(bound, 0) + count
        now = time.monotonic()
        if now - self._logged.get(bound, -LOG_INTERVAL) >= LOG_INTERVAL:
            self._logged[bound] = now
            _log.warning(
                "messages_dropped_for_bound",
                bound=bound,
                count=self._unlogged.pop(bound),
                session_id=subs.session_id,
                client_id=subs.client_id,
                topic=q.topic,
            )
