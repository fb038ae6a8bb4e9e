"""Accepting connections, with a pause: the listening sockets, read by the event loop.

asyncio's `Server` accepts whenever a listening socket is readable, up to its backlog (4,096
here before) per wake-up, and has no way to stop accepting but closing the socket. The broker
needs to stop accepting near its open-file limit and to refuse connections before any
transport exists, so the ListenerManager accepts through this small class instead: one
`add_reader` per listening socket, at most `ACCEPT_BATCH` accepts per wake-up, `pause()` and
`resume()`, and a one-second back-off (logged at most once per interval) when `accept()` runs
out of descriptors or memory, instead of spinning on EMFILE.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

from tether.broker.logthrottle import LogThrottle

__all__ = ["ACCEPT_BATCH", "ACCEPT_RETRY", "Acceptor", "bind"]

ACCEPT_BATCH = 64  # accepts per wake-up, so a connect storm cannot hold the loop
ACCEPT_RETRY = 1.0  # seconds accepting rests after running out of descriptors or memory

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


async def bind(
    loop: asyncio.AbstractEventLoop, host: str, port: int, backlog: int
) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to, as asyncio's `create_server`
    makes them (SO_REUSEADDR; IPv6 sockets IPv6-only), non-blocking."""
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Acceptor:
    """Calls `on_accept(sock, address)` for each accepted connection (non-blocking socket),
    on the loop thread, while neither paused by its owner nor backing off."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        on_accept: Callable[[socket.socket, Any], None],
        log: LogThrottle,
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._on_accept = on_accept
        self._log = log
        self._paused = False  # by the owner (near the open-file limit)
        self._backoff: asyncio.TimerHandle | None = None  # after EMFILE and the like
        self._reading = False
        self._closed = False

    @property
    def paused(self) -> bool:
        return self._paused

    def start(self) -> None:
        self._apply()

    def pause(self) -> None:
        self._paused = True
        self._apply()

    def resume(self) -> None:
        self._paused = False
        self._apply()

    def close(self) -> None:
        self._closed = True
        self._apply()
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        for sock in self.sockets:
            sock.close()

    def _apply(self) -> None:
        want = not (self._closed or self._paused or self._backoff is not None)
        if want == self._reading:
            return
        self._reading = want
        for sock in self.sockets:
            if want:
                self._loop.add_reader(sock.fileno(), self._ready, sock)
            else:
                self._loop.remove_reader(sock.fileno())

    def _ready(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self._reading:
                return  # paused by what the last accept did
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    self._log.hit("accept_out_of_resources", error=str(e))
                    self._backoff = self._loop.call_later(ACCEPT_RETRY, self._backoff_over)
                    self._apply()
                    return
                # The peer gave up before we accepted (ECONNABORTED) and the like: next one.
                self._log.hit("accept_failed", error=str(e))
                continue
            conn.setblocking(False)
            self._on_accept(conn, address)

    def _backoff_over(self) -> None:
        self._backoff = None
        self._apply()
