"""One subscription's dead-letter queue: pure data, no I/O, no actors.

Theory of operation (docs/architecture.md section 8): every message published to the
subscription gets the next `seq` and goes to `pending`. Sending moves it to `unacked` (at most
`window` of them at once); a cumulative ack removes it from `unacked`. Both deques are in seq
order and `unacked` is all older than `pending`; together they are what the bound counts. On
overflow the oldest *unsent* message goes, so a gap in seqs is always exactly what was counted
as dropped. When the connection goes away, `unacked` is put back in front of `pending` and
remembered in `redeliver_upto` (sent again flagged `redelivered`, before anything newer), so
the queue's order is the delivery order on every connection.

With a store (docs/architecture.md section 15), a message may be sent only once its `Append`
has committed: `committed` is the highest seq known to be stored, and `sendable()` stops below
anything newer. In memory only it stays at `NO_STORE`, above every seq. `dropped_seqs` (a list
while a store is in use, else None) collects the seqs `_make_room` drops, for the store's
`Discard`; `acked_upto` is the last seq the latest `ack` removed, for its `Ack`.

The tail on disk (with a store only): a queue whose session is away keeps at most `spill`
messages in memory (0: no limit); what is pushed beyond goes to the store only, and the queue counts
it (`disk`, `disk_bytes`: the newest messages, every seq above `disk_after`). `trim` moves
what `pending` holds beyond `spill` to the tail (in front of any tail already there) once it
is all stored: at detach, and when the memory budget lowers `spill` (budget.py). Once the tail
exists every push joins it, connected or not, so the order holds; the caller pages it back in
with the store's `read_queue` (`page_in`) while the session is connected. Overflow drops the
oldest unsent message as ever: the head of `pending`, else the oldest of the tail (counted in
`disk_discarded` for a `DiscardOldest`, and in `read_skip` while a page is being read, whose
first entries are then already gone). The tail's sizes are not kept, so the byte bound counts
a tail drop at the tail's average size, exact again whenever the tail empties.

Accounting (issue 12): a queue bound to its session (`bind`) keeps the session's `Account`
and the broker's `Totals` equal to the sums over the bound queues of `len`, `bytes` and
`disk_bytes`, by reporting the difference from what it reported last (`sync`) at the end of
every method that changes them. So `stats` and the budgets read a total without a walk over
the queues. `shed` and `shed_memory` drop the oldest messages to free bytes for a bound
wider than the queue's own (the session's bytes, the memory and store budgets), counted
exactly as overflow is.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from itertools import islice
from operator import itemgetter

__all__ = ["NO_STORE", "Account", "SubscriptionQueue", "Totals"]

NO_STORE = 1 << 62  # `committed` when nothing is stored: every seq counts as committed

_seq_of = itemgetter(0)
_payload_of = itemgetter(1)


class Account:
    """One session's queued payload bytes, across its queues (`--session-queue-bytes`)."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class Totals:
    """All bound queues together: messages, payload bytes, and the bytes of their tails on disk
    (so in memory: `bytes - disk_bytes`), and how many queues there are."""

    __slots__ = ("bytes", "count", "disk_bytes", "queues")

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        self.disk_bytes = 0
        self.queues = 0

    @property
    def memory_bytes(self) -> int:
        return self.bytes - self.disk_bytes


class SubscriptionQueue:
    __slots__ = (
        "_seen_bytes",
        "_seen_count",
        "_seen_disk",
        "account",
        "acked_upto",
        "bytes",
        "committed",
        "disk",
        "disk_after",
        "disk_bytes",
        "disk_discarded",
        "disk_pushed",
        "dropped_away",
        "dropped_live",
        "dropped_noted",
        "dropped_seqs",
        "dropped_total",
        "marked",
        "max_bytes",
        "max_count",
        "next_seq",
        "order",
        "pending",
        "read_limit",
        "read_skip",
        "reading",
        "redeliver_upto",
        "spill",
        "topic",
        "totals",
        "unacked",
        "window",
    )

    def __init__(self, topic: str, *, max_count: int, max_bytes: int, next_seq: int = 1) -> None:
        self.topic = topic
        self.max_count = max_count
        # At most this many sent and unacked at once, so that room can always be made among
        # unsent messages (compare MQTT's receive maximum).
        self.window = max(1, max_count // 2)
        self.max_bytes = max_bytes
        self.next_seq = next_seq
        # Plain (seq, payload) tuples: one is made per message and per subscriber.
        self.pending: deque[tuple[int, bytes]] = deque()
        self.unacked: deque[tuple[int, bytes]] = deque()
        self.bytes = 0
        self.redeliver_upto = 0
        self.dropped_live = 0  # overflow while connected, not yet told to the client
        self.dropped_away = 0  # overflow while disconnected, told in `registered.dropped`
        # Overflow over the subscription's life (the fleet view), and how much of it the
        # `$sys/sessions/dropped` events have already counted.
        self.dropped_total = 0
        self.dropped_noted = 0
        self.committed = NO_STORE  # the highest seq stored (sendable up to it)
        self.dropped_seqs: list[int] | None = None  # with a store: what `_make_room` dropped
        self.acked_upto = 0
        self.marked = 0  # with a store: the highest seq written as sent (`MarkSent`)
        self.spill = 0  # with a store, while the session is away: the head kept in memory
        self.disk = 0  # the tail held by the store only: how many, their bytes, after what seq
        self.disk_bytes = 0
        self.disk_after = 0
        self.disk_discarded = 0  # tail drops not yet told to the store (`DiscardOldest`)
        self.reading = False  # a page of the tail is being read
        self.read_skip = 0  # tail drops since that read began
        self.read_limit = 0  # the most that read asks for
        self.disk_pushed = 0  # tail pushes since that read began
        # Where `sync` reports (None: not bound to a session), and what it reported last.
        self.account: Account | None = None
        self.totals: Totals | None = None
        self._seen_count = self._seen_bytes = self._seen_disk = 0
        self.order = 0  # its session's subscription order (deliveries go in that order)

    def bind(self, account: Account, totals: Totals) -> None:
        """Count this queue in its session's `account` and in the broker's `totals`."""
        self.unbind()
        self.account, self.totals = account, totals
        totals.queues += 1
        self.sync()

    def unbind(self) -> None:
        """Take this queue (unsubscribed, or its session gone) out of the sums."""
        account, totals = self.account, self.totals
        if account is None or totals is None:
            return
        account.bytes -= self._seen_bytes
        totals.bytes -= self._seen_bytes
        totals.count -= self._seen_count
        totals.disk_bytes -= self._seen_disk
        totals.queues -= 1
        self._seen_count = self._seen_bytes = self._seen_disk = 0
        self.account = self.totals = None

    def sync(self) -> None:
        """Report what changed in `len`, `bytes` and `disk_bytes` since the last report."""
        totals = self.totals
        if totals is None:
            return
        count = len(self.pending) + len(self.unacked) + self.disk
        if count != self._seen_count:
            totals.count += count - self._seen_count
            self._seen_count = count
        nbytes = self.bytes
        if nbytes != self._seen_bytes:
            delta = nbytes - self._seen_bytes
            totals.bytes += delta
            self.account.bytes += delta  # type: ignore[union-attr]  # bound with totals
            self._seen_bytes = nbytes
        if self.disk_bytes != self._seen_disk:
            totals.disk_bytes += self.disk_bytes - self._seen_disk
            self._seen_disk = self.disk_bytes

    @property
    def memory_bytes(self) -> int:
        """Payload bytes held in memory (the tail's are on disk only)."""
        return self.bytes - self.disk_bytes

    def __len__(self) -> int:
        return len(self.pending) + len(self.unacked) + self.disk

    def push(self, payload: bytes, *, connected: bool) -> int:
        """Queue one message; returns how many of the oldest were dropped to make room."""
        seq = self.next_seq
        self.next_seq = seq + 1
        self.bytes += len(payload)
        if self.disk or (self.spill and len(self.pending) >= self.spill):
            self._to_disk(seq, len(payload))
        else:
            self.pending.append((seq, payload))
        if (
            len(self.pending) + len(self.unacked) + self.disk <= self.max_count
            and self.bytes <= self.max_bytes
        ):
            dropped = 0
        else:
            dropped = self._make_room(connected)
        if self.totals is not None:
            self.sync()
        return dropped

    def _to_disk(self, seq: int, size: int) -> None:
        if not self.disk:
            self.disk_after = seq - 1
        self.disk += 1
        self.disk_bytes += size
        self.disk_pushed += 1

    def push_many(self, payloads: Sequence[bytes], size: int, *, connected: bool) -> int:
        """`push` each of `payloads` (`size`: their total length), in order; returns how many
        of the oldest were dropped. One step when they all fit, which is the usual case."""
        count = len(payloads)
        if (
            len(self.pending) + len(self.unacked) + self.disk + count <= self.max_count
            and self.bytes + size <= self.max_bytes
            and not self.disk
            and not (self.spill and len(self.pending) + count > self.spill)
        ):
            seq = self.next_seq
            self.pending.extend(zip(range(seq, seq + count), payloads, strict=True))
            self.next_seq = seq + count
            self.bytes += size
            if self.totals is not None:
                self.sync()
            return 0
        return sum([self.push(payload, connected=connected) for payload in payloads])

    def _make_room(self, connected: bool) -> int:
        # The oldest message not yet sent goes first: one already sent and unacked has most
        # likely arrived, and counting it as dropped would report a gap the client never sees.
        # (The delivery window keeps unacked below the bound, so there is always one unsent.)
        dropped = 0
        # A single message larger than the byte bound is still kept: it is the newest.
        while len(self) > self.max_count or (self.bytes > self.max_bytes and len(self) > 1):
            if self.disk:
                # The newest is in the tail: the oldest unsent is the head of `pending`, else
                # the oldest of the tail (if unacked is empty: the store's oldest), else the
                # head of unacked.
                if not self.pending and self.disk > 1 and not self.unacked:
                    self._drop_disk_oldest()
                    dropped += 1
                    continue
                if not self.pending and not self.unacked:
                    break
                oldest = self.pending.popleft() if self.pending else self.unacked.popleft()
            else:
                # Never the message just pushed: it is the newest.
                oldest = self.pending.popleft() if len(self.pending) > 1 else self.unacked.popleft()
            self.bytes -= len(oldest[1])
            dropped += 1
            if self.dropped_seqs is not None:
                self.dropped_seqs.append(oldest[0])
        if dropped:
            self._count_dropped(dropped, connected)
        return dropped

    def _drop_disk_oldest(self) -> None:
        size = self.disk_bytes // self.disk  # the tail's sizes are not kept: its average
        self.disk -= 1
        self.disk_bytes -= size
        self.bytes -= size
        self.disk_discarded += 1
        if self.reading:
            self.read_skip += 1
        if not self.disk:
            self.tail_gone()

    def tail_gone(self) -> None:
        """The tail is empty: what it was counted to weigh goes (so bytes are exact again)."""
        self.bytes -= self.disk_bytes
        self.disk = self.disk_bytes = 0

    def trim(self) -> int:
        """An away queue (or one the memory budget spills): what `pending` holds beyond
        `spill` becomes tail, if it is all stored (the tail must be newer than everything in
        memory) and no page is being read. Returns the bytes that left memory."""
        pending = self.pending
        head = self.spill
        if not head or self.reading or len(pending) <= head or pending[-1][0] > self.committed:
            return 0
        moved = 0
        while len(pending) > head:
            _, payload = pending.pop()
            self.disk += 1
            moved += len(payload)
        # Those moved are older than any tail already there: it now starts after the head.
        self.disk_bytes += moved
        self.disk_after = pending[-1][0]
        if self.totals is not None:
            self.sync()
        return moved

    def start_read(self) -> int:
        """A page of the tail is to be read: returns the seq to read after."""
        self.reading = True
        self.read_skip = self.disk_pushed = 0
        return self.disk_after

    def page_in(self, entries: Sequence[tuple[int, bytes]], limit: int) -> int:
        """A page of the tail read from the store (`limit` asked): its oldest go to the end of
        `pending`. Returns how many."""
        self.reading = False
        skip, self.read_skip = min(self.read_skip, len(entries)), 0
        if not self.disk:
            return 0
        after = self.disk_after
        got = [e for e in entries[skip:] if e[0] > after][: self.disk]
        if got:
            size = sum(len(payload) for _, payload in got)
            self.pending.extend(got)
            self.disk -= len(got)
            self.disk_bytes -= size
            self.disk_after = got[-1][0]
        if len(entries) < limit and self.disk > self.disk_pushed:
            # The store had no more than this page when it was read: what the count says
            # beyond the pushes since is not there (a failed commit counted twice).
            extra = self.disk - self.disk_pushed
            share = self.disk_bytes * extra // self.disk
            self.disk -= extra
            self.disk_bytes -= share
            self.bytes -= share
        if self.disk <= 0:
            self.tail_gone()
        self.sync()
        return len(got)

    def shed(self, nbytes: int, *, connected: bool, memory_only: bool = False) -> int:
        """Drop the oldest messages until `nbytes` payload bytes are freed or nothing is left
        to drop: unsent first (the head of `pending`, then, unless `memory_only`, the oldest
        of the tail on disk), then sent and unacked ones. Counted as overflow (`dropped_live`
        or `dropped_away`, `dropped_seqs`, `disk_discarded`); returns how many."""
        freed = dropped = 0
        pending, unacked = self.pending, self.unacked
        seqs = self.dropped_seqs
        while freed < nbytes:
            if pending:
                seq, payload = pending.popleft()
            elif self.disk and not memory_only:
                before = self.bytes
                self._drop_disk_oldest()
                freed += before - self.bytes
                dropped += 1
                continue
            elif unacked:
                seq, payload = unacked.popleft()
            else:
                break
            self.bytes -= len(payload)
            freed += len(payload)
            dropped += 1
            if seqs is not None:
                seqs.append(seq)
        if dropped:
            self._count_dropped(dropped, connected)
            self.sync()
        return dropped

    def _count_dropped(self, dropped: int, connected: bool) -> None:
        self.dropped_total += dropped
        if connected:
            self.dropped_live += dropped
        else:
            self.dropped_away += dropped

    def is_full_for(self, size: int) -> bool:
        """Would queueing a message of `size` bytes push out an older one?"""
        length = len(self.pending) + len(self.unacked) + self.disk
        return length >= self.max_count or (length > 0 and self.bytes + size > self.max_bytes)

    def room(self) -> tuple[int, int]:
        """How many more messages, and how many more payload bytes, fit without pushing one
        out. The bytes may be negative: a message alone may exceed the byte bound."""
        return (
            self.max_count - len(self.pending) - len(self.unacked) - self.disk,
            self.max_bytes - self.bytes,
        )

    def ack(self, seq: int) -> int:
        """Cumulative ack of every sent delivery up to `seq`; returns how many were removed."""
        unacked = self.unacked
        if not unacked or unacked[0][0] > seq:
            return 0
        if unacked[-1][0] <= seq:
            removed = len(unacked)
            self.acked_upto = unacked[-1][0]
            self.bytes -= sum(map(len, map(_payload_of, unacked)))
            unacked.clear()
            if self.totals is not None:
                self.sync()
            return removed
        removed = bisect_right(unacked, seq, key=_seq_of)  # unacked is in seq order
        self.acked_upto = unacked[removed - 1][0]
        self.bytes -= sum(map(len, map(_payload_of, islice(unacked, removed))))
        popleft = unacked.popleft
        for _ in range(removed):
            popleft()
        if self.totals is not None:
            self.sync()
        return removed

    def sendable(self) -> int:
        """How many of the oldest unsent messages may be sent now: the delivery window's room
        (`unacked` holds at most `window`), or all of `pending` if less; never past
        `committed`."""
        pending = self.pending
        count = len(pending)
        if count and pending[-1][0] > self.committed:
            count = bisect_right(pending, self.committed, key=_seq_of)
        return max(0, min(count, self.window - len(self.unacked)))

    def discard(self, seqs: set[int]) -> int:
        """Take the messages with these seqs out of `pending` (their store commit failed);
        returns how many were there."""
        kept = [e for e in self.pending if e[0] not in seqs]
        gone = len(self.pending) - len(kept)
        if gone:
            self.bytes -= sum(len(e[1]) for e in self.pending if e[0] in seqs)
            self.pending = deque(kept)
            self.sync()
        return gone

    def take_many(self, count: int) -> None:
        """Count the next `count` messages (at most `sendable()`) as sent: the head of
        `pending` moves to the tail of `unacked`, all at once."""
        pending, unacked = self.pending, self.unacked
        if count == len(pending):
            unacked.extend(pending)
            pending.clear()
        else:
            popleft, append = pending.popleft, unacked.append
            for _ in range(count):
                append(popleft())

    def requeue_unacked(self) -> None:
        """The connection is gone: what it was sent and did not ack goes out again first."""
        if self.unacked:
            self.redeliver_upto = max(self.redeliver_upto, self.unacked[-1][0])
            self.pending.extendleft(reversed(self.unacked))
            self.unacked.clear()
