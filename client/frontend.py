"""What the blocking and the asyncio front end share: options, the machine, the state file,
and the read-only view of where the client stands. Neither does I/O here."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from .errors import ClientClosed, TetherError
from .events import Message
from .log import get_logger
from .machine import ClientMachine, Phase
from .options import ClientOptions
from .state import load_state

__all__ = ["FrontEnd"]


class _Flag(Protocol):
    def is_set(self) -> bool: ...


class FrontEnd:
    """Base of `Client` and `AsyncClient`. Subclasses set `_ended` (a threading or asyncio
    event: the machine is closed, no more connections) before use."""

    _ended: _Flag

    def __init__(self, options: ClientOptions | None = None, /, **overrides: Any) -> None:
        if options is None:
            options = ClientOptions(**overrides)
        elif overrides:
            options = dataclasses.replace(options, **overrides)
        self.options = options
        state = (
            load_state(options.state_file, options.client_id)
            if options.state_file is not None
            else None
        )
        self._machine = ClientMachine(options.machine_config(), state)
        self._backoff = options.backoff
        self._log = get_logger(client_id=options.client_id)
        self._end_error: TetherError | None = None
        self._last_error: BaseException | None = None
        self._ping: tuple[int, float] | None = None  # unanswered ping: (req, sent at)
        self._close_started = False
        self._in_handler: Message | None = None  # the message a handler is running for

    @property
    def session_id(self) -> str | None:
        return self._machine.session_id

    @property
    def connected(self) -> bool:
        """True while a connection holds the session."""
        return self._machine.phase is Phase.READY

    @property
    def closed(self) -> bool:
        return self._close_started or self._ended.is_set()

    @property
    def error(self) -> TetherError | None:
        """Why the client stopped by itself (taken over, auth failed, ...), else None."""
        return self._end_error

    def _check_usable(self) -> None:
        if self._machine.closed or self._close_started:
            raise self._end_error or ClientClosed()
