"""Reconnect delays: capped exponential backoff with full jitter. Pure: no clock, no sleep.

Full jitter (a uniform draw between 0 and the exponential ceiling) spreads a crowd of clients
that lost the same broker at the same moment, instead of having them come back in waves.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """`delay(n)` for the n-th consecutive failed attempt (0-based) is uniform in
    [0, min(cap, base * 2**n)]."""

    base: float = 0.1
    cap: float = 30.0

    def __post_init__(self) -> None:
        if not self.base > 0:
            raise ValueError(f"backoff base must be > 0 seconds, got {self.base!r}")
        if not self.cap >= self.base:
            raise ValueError(f"backoff cap must be >= base ({self.base}), got {self.cap!r}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay attempt `attempt` may draw."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        # Compare exponents rather than computing 2**attempt: attempts can grow without bound
        # on a long outage, and the float would overflow.
        if attempt >= 1024 or self.base * 2.0**attempt >= self.cap:
            return self.cap
        return self.base * 2.0**attempt

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or _rng).uniform(0.0, self.ceiling(attempt))

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The delays of attempts 0, 1, 2, ... forever."""
        attempt = 0
        while True:
            yield self.delay(attempt, rng)
            attempt += 1


_rng = random.Random()
