"""What every subscriber checks: each message arrived once, in order, per subscription.

Two independent orders are checked. The broker's: `seq` goes up by exactly one per delivery
of a subscription. The publishers': every payload starts with a mark (publisher id, counter,
send time), and each publisher's counter must go up by exactly one as seen by a subscription,
so a broker that numbered correctly but mixed up or repeated payloads is caught too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any

# publisher id, counter (from 1), send time in time.monotonic_ns() (0 when not measured)
MARK = struct.Struct(">IIQ")
MARK_SIZE = MARK.size


@dataclass
class Tally:
    """Counts over one or many subscriptions; adds up across connections and processes."""

    expected: int = 0
    received: int = 0  # distinct messages, whatever their order (what "all arrived" counts)
    seq_skipped: int = 0  # seq numbers jumped over (the broker may only skip what it dropped)
    late: int = 0  # a seq at or below one already seen, not flagged redelivered
    reordered: int = 0  # a publisher's counter out of step while seq was in step
    redelivered: int = 0  # deliveries flagged redelivered (at-least-once: allowed)
    dropped: int = 0  # messages the broker said it discarded (sum of `dropped` frames)
    errors: int = 0  # `error` frames and anything else unexpected
    notes: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        for f in fields(self):
            if f.name == "notes":
                self.notes.extend(other.notes[: max(0, 5 - len(self.notes))])
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.received)

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        """What went wrong, in capitals: these lines go to the table as they are."""
        out = []
        if self.lost:
            out.append(f"LOST {self.lost:,} OF {self.expected:,}")
        if self.received > self.expected:
            out.append(f"RECEIVED {self.received - self.expected:,} MORE THAN SENT")
        if self.dropped:
            told = f"BROKER SAID DROPPED {self.dropped:,} (queue overflow)"
            if not self.lost:
                told += " YET ALL ARRIVED: FALSE DROP REPORTS"
            elif self.dropped != self.lost:
                told += f", BUT {self.lost:,} ARE MISSING"
            out.append(told)
        if self.seq_skipped:
            out.append(f"SEQ SKIPPED {self.seq_skipped:,} NUMBERS")
        if self.late:
            out.append(f"DUPLICATED OR REORDERED {self.late:,} (seq went back)")
        if self.reordered:
            out.append(f"REORDERED {self.reordered:,} (publisher order broken, seq in step)")
        if self.errors:
            out.append(f"ERRORS {self.errors:,}")
        if out:
            out += [f"first anomalies: {'; '.join(self.notes[:3])}"] if self.notes else []
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["lost"] = self.lost
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tally:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Stream:
    """One subscription on one connection: its last seq and each publisher's next counter."""

    __slots__ = ("gapped", "last_seq", "next_counter", "seen", "tally")

    def __init__(self, tally: Tally) -> None:
        self.last_seq = 0
        self.next_counter: dict[int, int] = {}
        self.seen: set[tuple[int, int]] | None = None  # only once something went wrong
        self.gapped = False  # a seq was skipped: later counter jumps are that loss
        self.tally = tally

    def deliver(self, seq: int, payload: bytes, redelivered: bool) -> int:
        """Check one delivery; returns its send time (0 if none) when it is new, else -1."""
        tally = self.tally
        if redelivered:
            tally.redelivered += 1
        last = self.last_seq
        if seq <= last:
            # At-least-once allows a redelivered repeat, which the client drops by seq.
            if not redelivered:
                tally.late += 1
                note(tally, f"seq {seq} after {last}")
            return -1
        if seq != last + 1:
            tally.seq_skipped += seq - last - 1
            self.gapped = True
            note(tally, f"seq {seq} after {last}")
        self.last_seq = seq
        if len(payload) < MARK_SIZE:
            tally.errors += 1
            note(tally, f"payload of {len(payload)} bytes has no mark")
            return -1
        pub, counter, sent = MARK.unpack_from(payload)
        want = self.next_counter.get(pub, 1)
        if counter != want:
            # A counter that jumps forward after a seq gap is that loss (counted above); one
            # that goes back, or jumps with no gap, is the broker mixing up payloads.
            if counter < want or not self.gapped:
                tally.reordered += 1
                note(tally, f"publisher {pub} message {counter}, expected {want}")
            if self.seen is None:
                self.seen = set()
        if self.seen is not None:
            if (pub, counter) in self.seen:
                tally.late += 1
                note(tally, f"publisher {pub} message {counter} again")
                return -1
            self.seen.add((pub, counter))
        self.next_counter[pub] = max(want, counter + 1)
        tally.received += 1
        return int(sent)


def note(tally: Tally, text: str) -> None:
    if len(tally.notes) < 5:
        tally.notes.append(text)
