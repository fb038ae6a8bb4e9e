"""Failed-login throttle per peer address: pure, clock passed in."""

from __future__ import annotations

from collections import deque


class FailureLimiter:
    """At most `limit` failures per address within `window` seconds; past that, refuse.

    Only failures count: a client that logs in correctly is never slowed down.
    """

    def __init__(self, *, limit: int, window: float, max_addresses: int = 100_000) -> None:
        self._limit = limit
        self._window = window
        self._max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self._window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def blocked(self, address: str, now: float) -> bool:
        times = self._recent(address, now)
        return times is not None and len(times) >= self._limit

    def record_failure(self, address: str, now: float) -> None:
        times = self._recent(address, now)
        if times is None:
            if len(self._failures) >= self._max_addresses:
                # Bounded memory under a spray of addresses: forget the oldest entry.
                self._failures.pop(next(iter(self._failures)))
            times = self._failures[address] = deque()
        times.append(now)
