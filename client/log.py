"""The client's logger: structlog, and silent unless the application configured logging.

structlog's out-of-the-box setting prints to stdout, which a library must not do (a `tether
sub` pipes messages there). So until the application configures structlog, events go to the
standard `logging` logger "tether.client", which has a NullHandler: shown if the application
set up `logging`, dropped otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["get_logger"]

NAME = "tether.client"

_stdlib = logging.getLogger(NAME)
_stdlib.addHandler(logging.NullHandler())
_fallback = structlog.wrap_logger(
    _stdlib,
    processors=[
        structlog.processors.format_exc_info,
        structlog.processors.KeyValueRenderer(key_order=["event"]),
    ],
    wrapper_class=structlog.stdlib.BoundLogger,
)


class _Logger:
    """Chooses at each call, so configuring structlog after import still takes effect."""

    __slots__ = ("_context",)

    def __init__(self, context: dict[str, Any]) -> None:
        self._context = context

    def bind(self, **kw: Any) -> _Logger:
        return _Logger({**self._context, **kw})

    def _target(self) -> Any:
        if structlog.is_configured():
            return structlog.get_logger(NAME).bind(**self._context)
        return _fallback.bind(**self._context)

    def debug(self, event: str, **kw: Any) -> None:
        if structlog.is_configured() or _stdlib.isEnabledFor(logging.DEBUG):
            self._target().debug(event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._target().info(event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._target().warning(event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._target().error(event, **kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._target().exception(event, **kw)


def get_logger(**context: Any) -> _Logger:
    return _Logger(context)
