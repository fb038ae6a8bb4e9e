"""Logging set-up: structlog and the standard library (pykka) through one stdout handler, JSON
lines or console. See docs/architecture.md section 12."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["FORMATS", "LEVELS", "bound_values", "configure_logging", "get_logger"]

FORMATS = ("console", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")


class _StdoutHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler bound to whatever `sys.stdout` is at the time of each write."""

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass  # StreamHandler.__init__ assigns it; the property always wins.


# What one value of a log line may grow to: client-sent maps (a session's metadata, a ping's
# details) are logged, and a line must be written whatever they hold.
MAX_STR = 1024  # characters of one string (the event itself: MAX_EVENT)
MAX_EVENT = 8192
MAX_ITEMS = 32  # entries of one map or list
MAX_DEPTH = 6  # levels of maps and lists below a top-level value
MAX_TOTAL = 512  # entries of maps and lists in one line, all values together
# Left as they are: what the renderers turn into tracebacks, and structlog's own keys.
_UNTOUCHED = frozenset({"exc_info", "exception", "stack", "stack_info", "timestamp", "level"})
_BIG_INT = 1 << 64


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more chars]"


class _Bounder:
    """Renders one line's values bounded: strings cut, maps and lists cut at a count and a
    depth, bytes as text, keys as str. Recursion is bounded by MAX_DEPTH, work by MAX_TOTAL."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_TOTAL

    def value(self, x: Any, depth: int) -> Any:
        cls = x.__class__
        if cls is str:
            return _cut(x, MAX_STR)
        if x is None or cls is bool or cls is float:
            return x
        if cls is int:
            # Huge ints: int-to-str conversion of over 4,300 digits raises.
            return x if -_BIG_INT < x < _BIG_INT else f"<int of {x.bit_length()} bits>"
        if isinstance(x, bytes | bytearray | memoryview):
            return self.raw(x)
        if isinstance(x, Mapping):
            return self.mapping(x, depth)
        if isinstance(x, list | tuple | set | frozenset):
            return self.sequence(x, depth)
        if isinstance(x, str):  # a str subclass (an enum's value, say): keep it, cut
            return _cut(str(x), MAX_STR)
        return x  # our own objects (paths, enums, exceptions): the renderer's repr

    def raw(self, x: bytes | bytearray | memoryview) -> str:
        head = bytes(x[: MAX_STR // 4])
        text = repr(head)
        more = len(x) - len(head)
        return f"{text}...[{more} more bytes]" if more else text

    def key(self, k: Any) -> str:
        if k.__class__ is str:
            return _cut(k, MAX_STR)
        if isinstance(k, bytes | bytearray | memoryview):
            return self.raw(k)
        if k.__class__ is int and not -_BIG_INT < k < _BIG_INT:
            return f"<int of {k.bit_length()} bits>"
        return _cut(repr(k), MAX_STR)

    def mapping(self, x: Mapping[Any, Any], depth: int) -> Any:
        n = len(x)
        if depth >= MAX_DEPTH or self.left <= 0:
            return f"<map of {n} items, cut>"
        out: dict[str, Any] = {}
        for i, (k, v) in enumerate(x.items()):
            if i >= MAX_ITEMS or self.left <= 0:
                out["..."] = f"{n - i} more items"
                break
            self.left -= 1
            out[self.key(k)] = self.value(v, depth + 1)
        return out

    def sequence(
        self, x: list[Any] | tuple[Any, ...] | set[Any] | frozenset[Any], depth: int
    ) -> Any:
        n = len(x)
        if depth >= MAX_DEPTH or self.left <= 0:
            return f"<list of {n} items, cut>"
        out: list[Any] = []
        for i, v in enumerate(x):
            if i >= MAX_ITEMS or self.left <= 0:
                out.append(f"...[{n - i} more items]")
                break
            self.left -= 1
            out.append(self.value(v, depth + 1))
        return out


def bound_values(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """Processor: every value of the line rendered bounded and JSON-safe (see _Bounder), so a
    line is written whatever a client sent (binary keys, nesting 1,000 deep, huge maps)."""
    bounder = _Bounder()
    out: EventDict = {}
    for k, v in event_dict.items():
        key = k if k.__class__ is str else bounder.key(k)
        if key in _UNTOUCHED:
            out[key] = v
        elif key == "event" and v.__class__ is str:
            out[key] = _cut(v, MAX_EVENT)
        else:
            out[key] = bounder.value(v, 0)
    return out


def _shared_processors() -> list[Processor]:
    # Run for structlog events and for foreign (stdlib) records alike.
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        # Last, before a record leaves structlog: any handler (not only ours) may format it.
        bound_values,
    ]


def configure_logging(fmt: str = "console", level: str = "info") -> None:
    """Set up structlog and the root logger; calling it again replaces the earlier set-up."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")

    shared = _shared_processors()
    renderer: list[Processor]
    if fmt == "json":
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # ConsoleRenderer formats exc_info itself (prettier than format_exc_info).
        renderer = [structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())]

    structlog.configure(
        # filter_by_level drops a disabled event before any other work is done on it.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    handler = _StdoutHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    # Idempotent: swap out our earlier handler rather than stacking a second one.
    for old in [h for h in root.handlers if isinstance(h, _StdoutHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # The level lives on the root logger, so it also holds for loggers cached before a re-call.
    root.setLevel(level.upper())


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger named `name`.

    It is a lazy proxy, so it is safe to create at import time, before `configure_logging`.
    """
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
