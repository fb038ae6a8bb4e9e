"""Property tests of the reconnect schedule: capped exponential backoff with full jitter."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.client import Backoff

bases = st.floats(min_value=1e-3, max_value=10.0)
caps = st.floats(min_value=1e-3, max_value=3600.0)
attempts = st.integers(min_value=0, max_value=10_000)


@given(base=bases, cap=caps, attempt=attempts, seed=st.integers())
def test_every_delay_is_bounded_by_its_ceiling_and_the_cap(
    base: float, cap: float, attempt: int, seed: int
) -> None:
    if cap < base:
        cap, base = base, cap
    backoff = Backoff(base, cap)
    delay = backoff.delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= backoff.ceiling(attempt) <= cap


@given(base=bases, cap=caps, attempt=attempts)
def test_the_ceiling_doubles_until_it_is_capped(base: float, cap: float, attempt: int) -> None:
    if cap < base:
        cap, base = base, cap
    backoff = Backoff(base, cap)
    assert backoff.ceiling(0) == base
    now, following = backoff.ceiling(attempt), backoff.ceiling(attempt + 1)
    assert following == min(cap, now * 2) or following == cap
    assert following >= now


@given(base=bases, cap=caps)
def test_the_cap_is_reached_and_kept(base: float, cap: float) -> None:
    if cap < base:
        cap, base = base, cap
    backoff = Backoff(base, cap)
    assert backoff.ceiling(2000) == cap
    assert backoff.ceiling(10**9) == cap  # no overflow on a very long outage


@given(attempt=st.integers(0, 30), seed=st.integers())
def test_delays_are_jittered_over_the_whole_range(attempt: int, seed: int) -> None:
    backoff = Backoff()  # the defaults: 0.1 s doubling up to 30 s
    rng = random.Random(seed)
    ceiling = backoff.ceiling(attempt)
    draws = [backoff.delay(attempt, rng) for _ in range(200)]
    assert len(set(draws)) > 190  # not one fixed value
    # Full jitter: the draws spread from near 0 to near the ceiling.
    assert min(draws) < 0.1 * ceiling
    assert max(draws) > 0.9 * ceiling


def test_defaults_and_schedule() -> None:
    backoff = Backoff()
    assert (backoff.base, backoff.cap) == (0.1, 30.0)
    assert [backoff.ceiling(n) for n in range(10)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0,
    ]  # fmt: skip
    gen = backoff.delays(random.Random(1))
    assert all(0 <= next(gen) <= 30.0 for _ in range(100))


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="base"):
        Backoff(0, 1)
    with pytest.raises(ValueError, match="cap"):
        Backoff(1, 0.5)
    with pytest.raises(ValueError, match="attempt"):
        Backoff().ceiling(-1)
