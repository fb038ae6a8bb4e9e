"""The password checks waiting for a bcrypt worker: one bounded queue, fair across source
addresses, with known devices first. Pure data (no clock, no threads, no actors): the
BrokerSupervisor owns one and passes the time in (docs/protocol.md section 6.6).

Theory of operation.
- Two tiers, each a round robin over source addresses (address -> FIFO deque, and a rotation
  of the addresses that have something waiting). `pop` serves the priority tier first (an
  (address, username) pair that logged in successfully within the last hour: a device the
  broker knows), then the ordinary one. Within a tier each address gets one turn per rotation,
  so one address, or a thousand rotating ones, get their share of the workers and no more:
  a newcomer waits at most one check per address with something queued.
- The bound is on the sum of both tiers (`capacity`). When it is full, `push` answers which
  item is refused (it is answered `rate_limited` at once, without a check): for a known
  device, the newest item of the address with the most items in the ordinary tier (so a
  device the broker knows is not starved by strangers); for a stranger, the newest item of
  the address with the most ordinary items if that address has at least two more than the
  newcomer's would (the flooder pays for the flood), otherwise the newcomer itself. Known
  devices' items are never evicted.
- Per address, items leave in the order they came (FIFO), except an eviction (the newest).

`KnownDevices` is the memory of successful logins: at most `max_pairs` pairs, the oldest
forgotten first; a pair expires `ttl` seconds after its last success, and a failed check for
it forgets it (a guesser behind the same address gets no priority from it).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["AuthQueue", "KnownDevices", "RegisterAbandoned"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RegisterAbandoned:
    """Listener -> BrokerSupervisor: the connection `conn_id` (from `peer`) closed while its
    `register` waited for a password check; a check still queued for it is dropped unmade."""

    conn_id: int
    peer: str


class _Tier(Generic[T]):
    """Round robin over addresses, FIFO within each."""

    __slots__ = ("by_address", "size", "turns")

    def __init__(self) -> None:
        self.by_address: dict[str, deque[T]] = {}
        self.turns: deque[str] = deque()  # addresses with something waiting, next first
        self.size = 0

    def push(self, address: str, item: T) -> None:
        waiting = self.by_address.get(address)
        if waiting is None:
            waiting = self.by_address[address] = deque()
            self.turns.append(address)
        waiting.append(item)
        self.size += 1

    def pop(self) -> T | None:
        if not self.turns:
            return None
        address = self.turns.popleft()
        waiting = self.by_address[address]
        item = waiting.popleft()
        self.size -= 1
        if waiting:
            self.turns.append(address)  # its next turn after every other address's
        else:
            del self.by_address[address]
        return item

    def _emptied(self, address: str) -> None:
        del self.by_address[address]
        self.turns.remove(address)

    def pop_newest(self, address: str) -> T:
        waiting = self.by_address[address]
        item = waiting.pop()
        self.size -= 1
        if not waiting:
            self._emptied(address)
        return item

    def remove(self, address: str, match: Callable[[T], bool]) -> T | None:
        waiting = self.by_address.get(address)
        if waiting is None:
            return None
        for item in waiting:
            if match(item):
                waiting.remove(item)
                self.size -= 1
                if not waiting:
                    self._emptied(address)
                return item
        return None

    def count(self, address: str) -> int:
        waiting = self.by_address.get(address)
        return 0 if waiting is None else len(waiting)

    def longest(self) -> str | None:
        if not self.by_address:
            return None
        return max(self.by_address, key=lambda address: len(self.by_address[address]))


class AuthQueue(Generic[T]):
    """At most `capacity` items waiting; see the module's theory of operation."""

    __slots__ = ("_capacity", "_ordinary", "_priority")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._capacity = capacity
        self._priority: _Tier[T] = _Tier()
        self._ordinary: _Tier[T] = _Tier()

    def __len__(self) -> int:
        return self._priority.size + self._ordinary.size

    @property
    def capacity(self) -> int:
        return self._capacity

    def push(self, item: T, *, address: str, priority: bool = False) -> T | None:
        """Queue `item` from `address`; answer the item refused for want of room: None (all
        fit), `item` itself, or another item evicted to make room for it."""
        tier = self._priority if priority else self._ordinary
        if len(self) < self._capacity:
            tier.push(address, item)
            return None
        victim_address = self._ordinary.longest()
        if victim_address is None:
            return item  # full of known devices' checks: those are never evicted
        if not priority and self._ordinary.count(victim_address) < (
            self._ordinary.count(address) + 2
        ):
            return item  # the newcomer's address has about as many waiting as any
        victim = self._ordinary.pop_newest(victim_address)
        tier.push(address, item)
        return victim

    def pop(self) -> T | None:
        """The next item to check: a known device's first, round robin within each tier."""
        item = self._priority.pop()
        return item if item is not None else self._ordinary.pop()

    def remove(self, address: str, match: Callable[[T], bool]) -> T | None:
        """Take out the first item from `address` that `match`es (its connection closed)."""
        found = self._priority.remove(address, match)
        return found if found is not None else self._ordinary.remove(address, match)

    def waiting(self, address: str) -> int:
        return self._priority.count(address) + self._ordinary.count(address)


class KnownDevices:
    """(address, username) pairs that logged in successfully within `ttl` seconds."""

    __slots__ = ("_max_pairs", "_pairs", "_ttl")

    def __init__(self, *, ttl: float = 3600.0, max_pairs: int = 100_000) -> None:
        self._ttl = ttl
        self._max_pairs = max_pairs
        self._pairs: OrderedDict[tuple[str, str], float] = OrderedDict()  # oldest success first

    def __len__(self) -> int:
        return len(self._pairs)

    def remember(self, address: str, username: str, now: float) -> None:
        pair = (address, username)
        self._pairs[pair] = now
        self._pairs.move_to_end(pair)
        while len(self._pairs) > self._max_pairs:
            self._pairs.popitem(last=False)
        self._expire(now)

    def forget(self, address: str, username: str) -> None:
        self._pairs.pop((address, username), None)

    def known(self, address: str, username: str, now: float) -> bool:
        at = self._pairs.get((address, username))
        return at is not None and now - at < self._ttl

    def _expire(self, now: float) -> None:
        # Oldest first: stop at the first pair still fresh (amortised O(1) per success).
        while self._pairs:
            pair, at = next(iter(self._pairs.items()))
            if now - at < self._ttl:
                return
            del self._pairs[pair]
