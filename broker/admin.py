"""`tether stats`: ask a running broker for its counters over the wire (a `stats` frame)."""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any

from tether.protocol import (
    BROKER_FRAME_TYPES,
    DEFAULT_MAX_FRAME,
    DELIVER_HEADROOM,
    NEED_DATA,
    BrokerFrame,
    Error,
    FrameDecoder,
    Register,
    Registered,
    Stats,
    StatsResult,
    Unregister,
    encode,
)


class AdminError(Exception):
    """The broker refused or could not be reached; the message says what to do."""


def _recv(sock: socket.socket, decoder: FrameDecoder) -> BrokerFrame:
    while (frame := decoder.next_frame()) is NEED_DATA:
        data = sock.recv(65536)
        if not data:
            raise AdminError("the broker closed the connection")
        decoder.receive_data(data)
    return frame  # type: ignore[return-value]


def fetch_stats(
    host: str, port: int, *, username: str, password: str, timeout: float = 10.0
) -> dict[str, Any]:
    """Register a throwaway session, ask for the counters, and end the session again."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise AdminError(f"cannot reach the broker at {host}:{port}: {exc}") from None
    decoder = FrameDecoder(
        max_frame=DEFAULT_MAX_FRAME + DELIVER_HEADROOM, accept=BROKER_FRAME_TYPES
    )
    client_id = f"tether-stats-{os.getpid()}-{secrets.token_hex(4)}"
    with sock:
        sock.sendall(
            encode(Register(req=1, client_id=client_id, username=username, password=password))
            + encode(Stats(req=2))
            + encode(Unregister(req=3))
        )
        answer = _recv(sock, decoder)
        if isinstance(answer, Error):
            raise AdminError(f"registration refused ({answer.code}): {answer.message}")
        if not isinstance(answer, Registered):
            raise AdminError(f"unexpected answer to register: {answer!r}")
        while True:
            frame = _recv(sock, decoder)
            if isinstance(frame, StatsResult) and frame.req == 2:
                return dict(frame.stats)
            if isinstance(frame, Error):
                raise AdminError(f"stats refused ({frame.code}): {frame.message}")
