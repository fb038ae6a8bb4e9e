"""The tests' raw wire client (it lives in bench/wire.py, shared with the bench), and polling."""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.wire import Closed, WireClient

__all__ = ["Closed", "WireClient", "wait_for"]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll `predicate` until it holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)
