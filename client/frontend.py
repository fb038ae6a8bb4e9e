"""What the blocking and the asyncio front end share: options, the machine, the state file,
and the read-only view of where the client stands. Neither does I/O here."""

from __future__ import annotations

import dataclasses
import enum
import functools
import socket
from collections.abc import Callable
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

from tether.protocol import FATAL_CODES

from . import events as ev
from .errors import (
    ClientClosed,
    ConnectionFailed,
    NotAuthorized,
    PayloadTooLarge,
    Rejected,
    TetherError,
    Timeout,
    rejection,
)
from .events import Message
from .log import get_logger
from .machine import ClientMachine, Phase
from .options import ClientOptions, Health
from .state import StateLock, load_state, lock_state

__all__ = [
    "END",
    "STOP",
    "Cancel",
    "Claim",
    "FrontEnd",
    "Item",
    "Notice",
    "Stop",
    "SubItem",
    "SubscriptionBase",
    "callback_name",
]


class _Sentinel(enum.Enum):
    END = "end"
    STOP = "stop"


END: Final = _Sentinel.END  # ends a subscription's iterator
STOP: Final = _Sentinel.STOP  # ends the dispatcher
Stop = Literal[_Sentinel.STOP]

S = TypeVar("S", bound="SubscriptionBase")


@dataclasses.dataclass(frozen=True, slots=True)
class Claim(Generic[S]):
    """For the dispatcher, in turn with the messages: `sub` now takes `topic`'s messages (so
    those held for the topic are handed over before any newer one)."""

    topic: str
    sub: S


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    topic: str


# What the dispatcher is given, in order; and what a subscription's own queue holds.
Item = ev.Event | Claim[S] | Cancel
SubItem = Message | Literal[_Sentinel.END]
# An application callback bound to its argument, to run in the dispatcher.
Notice = functools.partial[object]

T = TypeVar("T")


def _bind(callback: Callable[[T], object] | None, arg: T) -> Notice | None:
    return functools.partial(callback, arg) if callback is not None else None


def callback_name(notice: Notice) -> str:
    """For logs: the name of the function a notice runs."""
    return getattr(notice.func, "__name__", "?")


class SubscriptionBase:
    """What a `Subscription` and an `AsyncSubscription` share; each adds its own queue."""

    def __init__(self, topic: str, handler: Callable[[Message], object] | None) -> None:
        self.topic = topic
        self.handler = handler
        self._current: Message | None = None  # handed out, acked when the next is asked for
        self._ended = False

    def _check_iterable(self) -> None:
        if self.handler is not None:
            raise TypeError(f"the subscription to {self.topic!r} has a handler: not iterable")

    def _no_message(self, timeout: float | None) -> Timeout:
        return Timeout(
            f"no message on {self.topic!r} within {timeout} s: wait longer, or check "
            "that something publishes to it"
        )

    def _take(self, item: SubItem) -> Message | None:
        """What `get()` returns for an item from the queue: the message, or None at the end."""
        if item is END:
            self._ended = True
            return None
        self._current = item
        return item


class _Flag(Protocol):
    def is_set(self) -> bool: ...

    def set(self) -> None: ...


class FrontEnd:
    """Base of `Client` and `AsyncClient`. Subclasses set `_registered` and `_ended`
    (threading or asyncio events: a session was had; the machine is closed, no more
    connections) and provide the hooks below."""

    _registered: _Flag
    _ended: _Flag

    def __init__(self, options: ClientOptions | None = None, /, **overrides: Any) -> None:
        if options is None:
            options = ClientOptions(**overrides)
        elif overrides:
            options = dataclasses.replace(options, **overrides)
        self.options = options
        # Held from here to the end of close(): one client per state file.
        self._file_lock: StateLock | None = None
        state = None
        if options.state_file is not None:
            self._file_lock = lock_state(options.state_file)
        try:
            if options.state_file is not None:
                state = load_state(options.state_file, options.client_id)
            self._machine = ClientMachine(options.machine_config(), state)
            self._ssl = options.ssl_context()  # bad files fail here, before any dialling
            self._tls_peer = options.tls_peer()
        except BaseException:
            self._release_state_file()
            raise
        self._backoff = options.backoff
        self._log = get_logger(client_id=options.client_id)
        self._end_error: TetherError | None = None
        # Why the last connection (attempt) ended: what the broker said on it, if anything,
        # else what the socket said.
        self._last_error: BaseException | None = None
        # Why the current connection is ending, when known before its socket ends: the
        # broker's fatal error, or the machine asking for a new connection.
        self._ending: TetherError | None = None
        self._ping: tuple[int, float] | None = None  # unanswered ping: (req, sent at)
        self._close_started = False
        self._drop_connection = False  # the machine asked for a new connection
        self._retry_after = 0.0  # seconds the broker asked the next attempt to wait at least
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

    def _release_state_file(self) -> None:
        if self._file_lock is not None:
            self._file_lock.release()

    def _ping_with(self, health: Health | None) -> int | None:
        """Queue a keepalive ping carrying `health`; without its details when they are too
        large for a frame (the broker would drop the connection at every ping)."""
        if health is None:
            return self._machine.ping()
        try:
            return self._machine.ping(health.status, dict(health.details))
        except PayloadTooLarge as exc:
            self._log.error("health_details_too_large", error=str(exc))
            return self._machine.ping(health.status)

    # --- connecting ----------------------------------------------------------------------

    def _refused_at_once(self, exc: OSError) -> ConnectionFailed | None:
        """Before the first session, a connection attempt that failed in a way another one
        would repeat (refused, unknown host) is the caller's error: no retrying. None for a
        failure worth retrying (a timeout), or once a session was had."""
        if self._registered.is_set():
            return None
        o = self.options
        if isinstance(exc, socket.gaierror):
            return ConnectionFailed(
                f"cannot find the broker's host {o.host!r} ({exc.strerror or exc}): check the "
                "host name"
            )
        if isinstance(exc, ConnectionRefusedError):
            return ConnectionFailed(
                f"the broker at {o.host}:{o.port} refused the connection: check that the "
                "broker runs there and listens on that port"
            )
        return None

    def _connect_timed_out(self, limit: float) -> ConnectionFailed:
        o = self.options
        last = self._last_error
        where = f"could not get a session from the broker at {o.host}:{o.port} within {limit:g} s"
        if isinstance(last, Rejected):
            return ConnectionFailed(f"{where}: {last}")
        hint = "check that the broker runs there and that this machine can reach it"
        if not o.uses_tls:
            # A TLS listener closes a plaintext client's connection without a word.
            hint += ", and that it does not serve TLS there (then give the CA: ca=, --tls-ca)"
        return ConnectionFailed(f"{where} (last problem: {last or 'no answer'}): {hint}")

    def _connection_ended(self, error: BaseException | None) -> str:
        """A connection ended (`error`: what the socket said); returns the reason to pass to
        the machine. What the broker said on it, if anything, wins."""
        known, self._ending = self._ending, None
        if known is not None:
            self._last_error = known
        elif error is not None:
            self._last_error = error
        return str(self._last_error or "the connection was lost")

    # --- the machine's events (no application code runs here) ---------------------------

    def _on_events(self, events: list[ev.Event]) -> None:
        for event in events:
            if isinstance(event, ev.Message):
                self._to_dispatcher(event)
            elif isinstance(event, ev.RequestDone | ev.RequestFailed):
                if self._ping is not None and self._ping[0] == event.req:
                    self._ping = None
                self._settle(event)
            elif isinstance(event, ev.Registered):
                self._ping = None
                self._on_registered()
                self._log.info(
                    "registered",
                    session_id=event.session_id,
                    resumed=event.resumed,
                    queued=event.queued,
                    dropped=event.dropped,
                )
                self._registered.set()
                self._to_dispatcher(event)
            elif isinstance(event, ev.RetryLater):
                delay = self._backoff.delay(event.attempt)
                self._log.info("request_unavailable", req=event.req, retry_in=round(delay, 3))
                self._retry_later(event.req, delay)
            elif isinstance(event, ev.Disconnect):
                self._log.warning("dropping_connection", reason=event.reason)
                self._ending = event.error or ConnectionFailed(event.reason)
                self._drop_connection = True
                self._retry_after = event.retry_after or 0.0
            elif isinstance(event, ev.BrokerError):
                if event.code in FATAL_CODES:  # the broker closes the connection after it
                    self._ending = Rejected(event.code, event.message)
                self._to_dispatcher(event)
            elif isinstance(event, ev.Closed):
                self._end_error = event.error
                self._ended.set()
                self._wake()
                if event.error is not None:
                    # Before the first session, connect() raises it: no need to shout twice.
                    log = self._log.error if self._registered.is_set() else self._log.info
                    log("stopped", error=str(event.error))
                    self._to_dispatcher(event)
            else:  # Dropped, SessionLost, TakenOver, Refused, SubscriptionRevoked, Disconnected,
                # Reconnected
                self._to_dispatcher(event)

    def _reconnect_delay(self, attempt: int) -> float:
        """How long to wait before attempt `attempt + 1`: the backoff's draw, on top of what
        the broker asked for (`retry_after`), so refused clients do not return together."""
        floor, self._retry_after = self._retry_after, 0.0
        return floor + self._backoff.delay(attempt)

    def _notice(self, item: object) -> Notice | None:
        """For the dispatcher: log an event the application hears of, and return its
        callback bound to its argument (None: no such event, or no callback for it)."""
        o = self.options
        if isinstance(item, ev.Dropped):
            self._log.warning("messages_dropped", topic=item.topic, count=item.count)
            return _bind(o.on_dropped, item)
        if isinstance(item, ev.SessionLost):
            self._log.warning("session_lost", error=str(item.error))
            return _bind(o.on_session_lost, item.error)
        if isinstance(item, ev.TakenOver):
            return _bind(o.on_taken_over, item.error)
        if isinstance(item, ev.BrokerError):
            self._log.warning("broker_error", code=item.code, message=item.message)
            return _bind(o.on_error, rejection(item.code, item.message))
        if isinstance(item, ev.Refused):
            self._log.warning("publish_refused", error=str(item.error))
            return _bind(o.on_error, item.error)
        if isinstance(item, ev.SubscriptionRevoked):
            self._log.warning("subscription_revoked", topic=item.topic, message=item.message)
            return _bind(o.on_error, NotAuthorized(item.message))
        if isinstance(item, ev.Disconnected):
            self._log.warning("disconnected", reason=item.reason)
            return _bind(o.on_disconnected, item)
        if isinstance(item, ev.Reconnected):
            self._log.info("reconnected", resumed=item.resumed, queued=item.queued)
            return _bind(o.on_reconnected, item)
        return None

    def _to_dispatcher(self, item: ev.Event) -> None:
        """Queue `item` for the dispatcher, which runs application code in order."""
        raise NotImplementedError

    def _settle(self, answer: ev.RequestDone | ev.RequestFailed) -> None:
        """Wake whoever waits for request `answer.req`, with its result or its error."""
        raise NotImplementedError

    def _wake(self) -> None:
        """The client ended: wake whatever waits for buffer room or a connection."""
        raise NotImplementedError

    def _retry_later(self, req: int, delay: float) -> None:
        """Call the machine's `retry(req)` in `delay` seconds, then send what it wrote."""
        raise NotImplementedError

    def _on_registered(self) -> None:
        """A connection holds the session now."""
