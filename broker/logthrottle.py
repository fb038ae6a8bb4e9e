"""Log lines that an attacker can cause, at most once per interval.

A refusal or a failure that a hostile peer can repeat at will must not cost a log line each
time (issue 12: 228,436 traceback lines in 25 s). `LogThrottle` writes the first occurrence of
each kind at once, counts the ones that follow, and writes one summary line with that count
when the interval has passed (at the next occurrence, or from a timer if none comes).
`LoopErrors` is the event loop's exception handler built on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

_log = structlog.get_logger("tether.loop")

# Seconds between two lines of one kind.
LOG_INTERVAL = 10.0

Emit = Callable[[str, int, dict[str, Any]], None]


@dataclass(slots=True)
class _Kind:
    next_line: float  # loop time before which occurrences are only counted
    suppressed: int = 0  # counted since the last line
    timer: asyncio.TimerHandle | None = None


class LogThrottle:
    """`hit(kind, **fields)`: `emit(kind, count, fields)` now if this kind had no line within
    the interval (count: occurrences the line stands for), else count it for a later line.
    Runs on the loop thread only."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, emit: Emit, interval: float = LOG_INTERVAL
    ) -> None:
        self._loop = loop
        self._emit = emit
        self._interval = interval
        self._kinds: dict[str, _Kind] = {}

    def hit(self, kind: str, **fields: Any) -> None:
        now = self._loop.time()
        state = self._kinds.get(kind)
        if state is None or now >= state.next_line:
            count = 1 + (state.suppressed if state is not None else 0)
            if state is not None and state.timer is not None:
                state.timer.cancel()
            self._kinds[kind] = _Kind(next_line=now + self._interval)
            self._emit(kind, count, fields)
            return
        state.suppressed += 1
        if state.timer is None:
            # Nothing may come after: the count still gets its line when the interval ends.
            state.timer = self._loop.call_at(state.next_line, self._flush, kind, fields)

    def _flush(self, kind: str, fields: dict[str, Any]) -> None:
        state = self._kinds.pop(kind, None)
        if state is not None and state.suppressed:
            self._kinds[kind] = _Kind(next_line=self._loop.time() + self._interval)
            self._emit(kind, state.suppressed, fields)

    def close(self) -> None:
        for state in self._kinds.values():
            if state.timer is not None:
                state.timer.cancel()
        self._kinds.clear()


class LoopErrors:
    """The event loop's exception handler: the first error of a kind (its message and
    exception type) is logged with its traceback, the repeats as one line per interval with
    their count, so a loop that fails the same way thousands of times a second (EMFILE on
    accept) cannot flood the log."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = LOG_INTERVAL) -> None:
        self._throttle = LogThrottle(loop, self._emit, interval)
        self._seen: set[str] = set()  # kinds already logged with their traceback
        self.errors = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors += 1
        exc = context.get("exception")
        message = str(context.get("message", "unhandled error in the event loop"))
        kind = f"{message[:100]}|{type(exc).__name__ if exc is not None else '-'}"
        self._throttle.hit(kind, message=message[:200], exc=exc)

    def _emit(self, kind: str, count: int, fields: dict[str, Any]) -> None:
        exc = fields.get("exc")
        if kind not in self._seen and len(self._seen) < 1000:
            self._seen.add(kind)
            _log.error("loop_error", message=fields["message"], exc_info=exc)
        else:
            _log.error(
                "loop_errors_repeated",
                message=fields["message"],
                error=repr(exc)[:200] if exc is not None else None,
                count=count,
            )

    def close(self) -> None:
        self._throttle.close()
