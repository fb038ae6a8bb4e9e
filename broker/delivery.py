"""Taking from a session's queues what its delivery credit allows, encoded as frames.

Pure: no actors, no I/O. See docs/architecture.md section 7 ("Credit-based flow control").
"""

from __future__ import annotations

import itertools
import operator
from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from tether.broker.queues import SubscriptionQueue
from tether.protocol import Dropped, deliver_overhead, encode, encode_delivers

__all__ = ["Tally", "take_within"]

_seq_of = operator.itemgetter(0)
_payload_of = operator.itemgetter(1)


class Tally:
    """What `take_within` counts across calls for the metrics: deliveries sent again, flagged
    `redelivered` (counted per run taken, not per message)."""

    __slots__ = ("redelivered",)

    def __init__(self) -> None:
        self.redelivered = 0


def take_within(
    queues: Iterable[SubscriptionQueue], credit: int, tally: Tally | None = None
) -> tuple[list[bytes], int, int, list[tuple[str, int]] | None]:
    """Take from `queues`, in turn, the deliveries `credit` allows, as if one frame at a time
    while credit > 0 (so the last frame may overshoot it) and within each delivery window.

    Returns the frames, how many deliveries they hold, the credit left, and the overflow
    counts told (`(topic, count)`, or None: none). Each queue's untold `dropped_live` goes
    out as a `dropped` frame ahead of its deliveries, whatever the credit, and is reset.
    `tally`, if given, counts the deliveries flagged `redelivered`.
    """
    chunks: list[bytes] = []
    sent = 0
    told: list[tuple[str, int]] | None = None
    append = chunks.append
    for q in queues:
        if q.dropped_live:
            append(encode(Dropped(topic=q.topic, count=q.dropped_live)))
            if told is None:
                told = []
            told.append((q.topic, q.dropped_live))
            q.dropped_live = 0
        # As one `take` at a time while credit > 0, but a run at a time: this is the cost
        # per delivery.
        count = q.sendable() if credit > 0 else 0
        if not count:
            continue
        pending = q.pending
        entries = list(pending) if count == len(pending) else list(itertools.islice(pending, count))
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
        if tally is not None and entries[0][0] <= q.redeliver_upto:
            tally.redelivered += min(count, bisect_right(entries, q.redeliver_upto, key=_seq_of))
        q.take_many(count)
        chunks += frames
        sent += count
    return chunks, sent, credit, told
