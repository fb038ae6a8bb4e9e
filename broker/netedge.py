"""The network edge: the only code that touches sockets.

`Connection` is the asyncio protocol of one TCP connection. It owns the transport, the idle
and registration timers, the outbound high-water mark and the bounded close. What happens to
the bytes is the business of a `ConnectionHandler` (the Listener actor), reached through the
small `ConnectionHandler` protocol, so handlers are testable without sockets, and the handler
talks back through the equally small `Link` protocol.

Backpressure: past the outbound high-water mark the connection stops reading too, so a peer
that does not read what it is sent cannot make the broker buffer answers without bound. The
idle timer counts silence as "no progress either way": a peer that neither sends nor drains
its socket for the whole timeout is cut off, one that is merely slow is not.

Read limit (issue 12): a connection may be made with `read_limit`, the bytes it reads in all
until `lift_read_limit()` (the ListenerManager lifts it once the connection has registered).
Reads go into a buffer the edge hands the transport (`asyncio.BufferedProtocol`), cut to what
the limit still allows, so not one byte more is taken from the socket; once the limit is
spent reading pauses and the rest waits in the socket. So an unregistered peer holds at most
`read_limit` bytes of the broker's memory, however much it sends.

TLS (issue 13): a TLS connection's transport is asyncio's SSL transport, made once the
handshake is done (the ListenerManager's `connect_accepted_socket(..., ssl=...)`); the verified
client certificate, if any, is `certificate`. While the read limit is in force, the ciphertext
the SSL layer buffers ahead of it is capped at the limit too.

Everything here runs on the broker's event loop thread, as do the handlers' message handling:
the handler's state is only ever touched by that thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Protocol

import structlog

from tether.broker.tls import PeerCertificate

_log = structlog.get_logger("tether.net")

# A connection asked to close with unsent data gets this long to flush before it is cut.
CLOSE_GRACE = 5.0

# The most one read takes from a socket: asyncio's own figure for a plain Protocol.
READ_SIZE = 256 * 1024
LIMITED_READ_SIZE = 4 * 1024  # per read while a read limit is in force (before `registered`)

# One read buffer per thread (per event loop), shared by all its connections: a read's bytes
# are copied out before the next read can start, and all of it happens on that thread.
_buffers = threading.local()


def _read_buffer() -> memoryview:
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(READ_SIZE))
    return view


def _ssl_read_ahead(transport: asyncio.Transport, high: int | None) -> None:
    # asyncio's SSL transport has this; the plain one's type does not declare it.
    set_limits = getattr(transport, "set_read_buffer_limits", None)
    if set_limits is not None:
        set_limits(high=high)


class ConnectionHandler(Protocol):
    def on_data(self, data: bytes) -> None: ...
    def on_writable(self, writable: bool) -> None: ...
    def on_idle_timeout(self) -> None: ...
    def on_deadline(self) -> None: ...
    def on_closed(self, exc: Exception | None) -> None: ...


class Link(Protocol):
    """What a handler may do to its connection."""

    peer: str

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def set_idle_timeout(self, seconds: float | None) -> None: ...
    def set_deadline(self, seconds: float | None) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    @property
    def writable(self) -> bool: ...


class Connection(asyncio.BufferedProtocol):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        make_handler: Callable[[Connection], ConnectionHandler],
        high_water: int,
        read_limit: int | None = None,
    ) -> None:
        self._loop = loop
        self._make_handler = make_handler
        self._high_water = high_water
        self._transport: asyncio.Transport | None = None
        self._handler: ConnectionHandler | None = None
        self._idle_timeout: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._writable = True
        self._handler_paused = False  # the handler asked not to read (registering, closing)
        self._closing = False
        # Bytes this connection may still read (None: no limit); see the module's docstring.
        self._read_left = read_limit
        self.peer = "?"
        self.certificate: PeerCertificate | None = None  # a verified client certificate's names
        self._tls = False

    # --- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=self._high_water, low=self._high_water // 4)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self.peer = f"{peername[0]}:{peername[1]}"
        if transport.get_extra_info("ssl_object") is not None:
            self._tls = True
            self.certificate = PeerCertificate.from_peercert(transport.get_extra_info("peercert"))
            if self._read_left is not None:
                # The SSL layer reads ahead of us (256 KiB by default): not before `registered`.
                _ssl_read_ahead(transport, self._read_left)
        self._last_rx = self._loop.time()
        self._handler = self._make_handler(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        view = _read_buffer()
        left = self._read_left
        if left is None:
            return view
        # Never 0 here: reading pauses when the limit is spent (`_apply_reading`). Before
        # registration, small reads: a frame declared too large is refused at its prefix,
        # before the broker has copied much of what its sender piled up.
        return view[: min(left, LIMITED_READ_SIZE)]

    def buffer_updated(self, nbytes: int) -> None:
        if self._read_left is not None:
            self._read_left -= nbytes
            if self._read_left <= 0:
                self._apply_reading()
        # Copied out of the shared buffer before the next read can reuse it.
        self.data_received(bytes(_read_buffer()[:nbytes]))

    def data_received(self, data: bytes) -> None:
        self._last_rx = self._loop.time()
        if self._handler is not None and not self._closing:
            self._handler.on_data(data)

    def eof_received(self) -> bool:
        return False  # close our side too: a half-open session is of no use

    def pause_writing(self) -> None:
        # Backpressure both ways: a peer that does not read its answers stops being read,
        # so nothing it sends can pile up replies in memory.
        self._writable = False
        self._apply_reading()
        if self._handler is not None:
            self._handler.on_writable(False)

    def resume_writing(self) -> None:
        self._writable = True
        self._last_rx = self._loop.time()  # the peer made progress: it read
        self._apply_reading()
        if self._handler is not None:
            self._handler.on_writable(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for timer in (self._idle_timer, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._deadline_timer = None
        handler, self._handler = self._handler, None
        if handler is not None:
            handler.on_closed(exc)

    # --- the Link the handler uses -------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self._writable

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._closing:
            self._transport.write(data)

    def close(self) -> None:
        if self._closing or self._transport is None:
            return
        self._closing = True
        transport = self._transport
        transport.close()
        # A peer that never reads would hold a closing connection open forever.
        self._loop.call_later(CLOSE_GRACE, transport.abort)

    def set_idle_timeout(self, seconds: float | None) -> None:
        self._idle_timeout = seconds
        self._last_rx = self._loop.time()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if seconds is not None and not self._closing:
            self._idle_timer = self._loop.call_later(seconds, self._check_idle)

    def set_deadline(self, seconds: float | None) -> None:
        """One shot, whatever the peer sends meanwhile (the registration timeout)."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if seconds is not None and not self._closing:
            self._deadline_timer = self._loop.call_later(seconds, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        if self._handler is not None and not self._closing:
            self._handler.on_deadline()

    def pause_reading(self) -> None:
        self._handler_paused = True
        self._apply_reading()

    def resume_reading(self) -> None:
        self._handler_paused = False
        self._apply_reading()

    def lift_read_limit(self) -> None:
        """Read without a limit from now on (the connection registered)."""
        self._read_left = None
        if self._tls and self._transport is not None and not self._closing:
            _ssl_read_ahead(self._transport, None)  # asyncio's default again
        self._apply_reading()

    @property
    def read_left(self) -> int | None:
        return self._read_left

    def _apply_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        left = self._read_left
        if self._handler_paused or not self._writable or (left is not None and left <= 0):
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()

    def _check_idle(self) -> None:
        self._idle_timer = None
        timeout = self._idle_timeout
        if timeout is None or self._closing:
            return
        # One timer per connection, re-armed for the remainder: no timer churn per read.
        remaining = self._last_rx + timeout - self._loop.time()
        if remaining > 0:
            self._idle_timer = self._loop.call_later(remaining, self._check_idle)
        elif self._handler is not None:
            self._handler.on_idle_timeout()
