"""One subscription's dead-letter queue: pure data, no I/O, no actors.

Theory of operation (docs/architecture.md section 8): every message published to the
subscription gets the next `seq` and goes to `pending`. Sending moves it to `unacked` (at most
`window` of them at once); a cumulative ack removes it from `unacked`. Both deques are in seq
order and `unacked` is all older than `pending`; together they are what the bound counts. On
overflow the oldest *unsent* message goes, so a gap in seqs is always exactly what was counted
as dropped. When the connection goes away, `unacked` is put back in front of `pending` and
remembered in `redeliver_upto` (sent again flagged `redelivered`, before anything newer), so
the queue's order is the delivery order on every connection.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from itertools import islice
from operator import itemgetter

__all__ = ["SubscriptionQueue"]

_seq_of = itemgetter(0)
_payload_of = itemgetter(1)


class SubscriptionQueue:
    __slots__ = (
        "bytes",
        "dropped_away",
        "dropped_live",
        "max_bytes",
        "max_count",
        "next_seq",
        "pending",
        "redeliver_upto",
        "topic",
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

    def __len__(self) -> int:
        return len(self.pending) + len(self.unacked)

    def push(self, payload: bytes, *, connected: bool) -> int:
        """Queue one message; returns how many of the oldest were dropped to make room."""
        seq = self.next_seq
        self.pending.append((seq, payload))
        self.next_seq = seq + 1
        self.bytes += len(payload)
        if len(self.pending) + len(self.unacked) <= self.max_count and self.bytes <= self.max_bytes:
            return 0
        return self._make_room(connected)

    def push_many(self, payloads: Sequence[bytes], size: int, *, connected: bool) -> int:
        """`push` each of `payloads` (`size`: their total length), in order; returns how many
        of the oldest were dropped. One step when they all fit, which is the usual case."""
        count = len(payloads)
        if (
            len(self.pending) + len(self.unacked) + count <= self.max_count
            and self.bytes + size <= self.max_bytes
        ):
            seq = self.next_seq
            self.pending.extend(zip(range(seq, seq + count), payloads, strict=True))
            self.next_seq = seq + count
            self.bytes += size
            return 0
        return sum([self.push(payload, connected=connected) for payload in payloads])

    def _make_room(self, connected: bool) -> int:
        # The oldest message not yet sent goes first: one already sent and unacked has most
        # likely arrived, and counting it as dropped would report a gap the client never sees.
        # (The delivery window keeps unacked below the bound, so there is always one unsent.)
        dropped = 0
        # A single message larger than the byte bound is still kept: it is the newest.
        while len(self) > self.max_count or (self.bytes > self.max_bytes and len(self) > 1):
            # Never the message just pushed: it is the newest.
            oldest = self.pending.popleft() if len(self.pending) > 1 else self.unacked.popleft()
            self.bytes -= len(oldest[1])
            dropped += 1
        if dropped:
            if connected:
                self.dropped_live += dropped
            else:
                self.dropped_away += dropped
        return dropped

    def is_full_for(self, size: int) -> bool:
        """Would queueing a message of `size` bytes push out an older one?"""
        length = len(self.pending) + len(self.unacked)
        return length >= self.max_count or (length > 0 and self.bytes + size > self.max_bytes)

    def room(self) -> tuple[int, int]:
        """How many more messages, and how many more payload bytes, fit without pushing one
        out. The bytes may be negative: a message alone may exceed the byte bound."""
        return (
            self.max_count - len(self.pending) - len(self.unacked),
            self.max_bytes - self.bytes,
        )

    def ack(self, seq: int) -> int:
        """Cumulative ack of every sent delivery up to `seq`; returns how many were removed."""
        unacked = self.unacked
        if not unacked or unacked[0][0] > seq:
            return 0
        if unacked[-1][0] <= seq:
            removed = len(unacked)
            self.bytes -= sum(map(len, map(_payload_of, unacked)))
            unacked.clear()
            return removed
        removed = bisect_right(unacked, seq, key=_seq_of)  # unacked is in seq order
        self.bytes -= sum(map(len, map(_payload_of, islice(unacked, removed))))
        popleft = unacked.popleft
        for _ in range(removed):
            popleft()
        return removed

    def sendable(self) -> int:
        """How many of the oldest unsent messages may be sent now: the delivery window's room
        (`unacked` holds at most `window`), or all of `pending` if less."""
        return max(0, min(len(self.pending), self.window - len(self.unacked)))

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
