"""The raw wire client of the tests and the bench: one blocking socket, the protocol package's
codec, no client library. Its defaults are the tests'; bench/harness.py's `RawClient` adapts it."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from tether.protocol import (
    BROKER_FRAME_TYPES,
    DEFAULT_MAX_FRAME,
    DELIVER_HEADROOM,
    NEED_DATA,
    BrokerFrame,
    ClientFrame,
    FrameDecoder,
    Ping,
    Pong,
    Register,
    encode,
    encode_map,
)

__all__ = ["CLIENT_MAX_FRAME", "Closed", "WireClient"]

# A client accepts a deliver a little larger than the largest publish (docs/protocol.md).
CLIENT_MAX_FRAME = DEFAULT_MAX_FRAME + DELIVER_HEADROOM


class Closed(Exception):
    """The broker closed the connection."""


class WireClient:
    """`recv` waits at most `timeout` seconds (TimeoutError), or raises `Closed`."""

    read_size = 65536

    def __init__(self, address: tuple[str, int], *, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.decoder = FrameDecoder(max_frame=CLIENT_MAX_FRAME, accept=BROKER_FRAME_TYPES)
        self._req = 0

    def next_req(self) -> int:
        self._req += 1
        return self._req

    def send(self, *frames: ClientFrame) -> None:
        self.sock.sendall(b"".join([encode(f) for f in frames]))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_map(self, *maps: dict[str, Any]) -> None:
        """Send raw wire maps (no frame validation): for malformed requests."""
        self.sock.sendall(b"".join(encode_map(m) for m in maps))

    def recv(self, timeout: float | None = None) -> BrokerFrame:
        frame = self.decoder.next_frame()
        if frame is not NEED_DATA:
            return frame  # type: ignore[return-value]
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        try:
            while (frame := self.decoder.next_frame()) is NEED_DATA:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no frame from the broker in time")
                self.sock.settimeout(remaining)
                try:
                    data = self.sock.recv(self.read_size)
                except TimeoutError:
                    raise TimeoutError("no frame from the broker in time") from None
                if not data:
                    raise Closed("the broker closed the connection")
                self.decoder.receive_data(data)
        finally:
            # Back to the socket's own timeout, which its callers' sendall runs under too.
            self.sock.settimeout(self.timeout)
        return frame  # type: ignore[return-value]

    def recv_many(self, n: int, timeout: float | None = None) -> list[BrokerFrame]:
        return [self.recv(timeout) for _ in range(n)]

    def recv_until(
        self, predicate: Callable[[BrokerFrame], bool], timeout: float | None = None
    ) -> list[BrokerFrame]:
        """Frames read up to and including the first one `predicate` accepts."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        frames: list[BrokerFrame] = []
        while True:
            frame = self.recv(max(0.0, deadline - time.monotonic()))
            frames.append(frame)
            if predicate(frame):
                return frames

    def sync(self, timeout: float | None = None) -> list[BrokerFrame]:
        """Ping with a fresh req and return every frame that came before its pong."""
        req = self.next_req()
        self.send(Ping(req=req))
        frames = self.recv_until(lambda f: isinstance(f, Pong) and f.req == req, timeout)
        return frames[:-1]

    def expect_closed(self, timeout: float = 5.0) -> None:
        """Reads until the broker closes; any frame read before is an error."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if data:
            self.decoder.receive_data(data)
            raise AssertionError(f"expected close, got data: {self.decoder.next_frame()!r}")

    def frames_until_closed(self, timeout: float = 5.0) -> list[BrokerFrame]:
        """Every frame the broker sends until it closes; TimeoutError if it does not close."""
        deadline = time.monotonic() + timeout
        frames: list[BrokerFrame] = []
        while True:
            try:
                frames.append(self.recv(max(0.0, deadline - time.monotonic())))
            except (Closed, ConnectionResetError):
                return frames

    def register(
        self, client_id: str, username: str = "alice", password: str | None = "secret", **kw: Any
    ) -> BrokerFrame:
        """Send a `register` (by default as the tests' user alice) and return the answer."""
        self.send(
            Register(
                req=self.next_req(), client_id=client_id, username=username, password=password, **kw
            )
        )
        return self.recv()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
