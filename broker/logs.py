"""Logging set-up: structlog and the standard library (pykka) through one stdout handler, JSON
lines or console. See docs/architecture.md section 12."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import Processor

__all__ = ["FORMATS", "LEVELS", "configure_logging", "get_logger"]

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


def _shared_processors() -> list[Processor]:
    # Run for structlog events and for foreign (stdlib) records alike.
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
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
