"""The network edge with a fake transport: backpressure and the idle timer."""

from __future__ import annotations

import asyncio
from typing import Any

from tether.broker.netedge import Connection


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.written: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_data(self, data: bytes) -> None:
        self.events.append(("data", data))

    def on_writable(self, writable: bool) -> None:
        self.events.append(("writable", writable))

    def on_idle_timeout(self) -> None:
        self.events.append("idle")

    def on_deadline(self) -> None:
        self.events.append("deadline")

    def on_closed(self, exc: Exception | None) -> None:
        self.events.append("closed")


def make() -> tuple[asyncio.AbstractEventLoop, Connection, FakeTransport, Recorder]:
    loop = asyncio.new_event_loop()
    handler = Recorder()
    conn = Connection(loop, make_handler=lambda _link: handler, high_water=1024)
    transport = FakeTransport()
    conn.connection_made(transport)
    return loop, conn, transport, handler


def test_a_peer_that_does_not_read_stops_being_read() -> None:
    loop, conn, transport, handler = make()
    try:
        conn.pause_writing()
        assert transport.reading is False
        assert ("writable", False) in handler.events
        conn.resume_writing()
        assert transport.reading is True
        # A pause the handler asked for outlasts the end of backpressure.
        conn.pause_reading()
        conn.pause_writing()
        conn.resume_writing()
        assert transport.reading is False
        conn.resume_reading()
        assert transport.reading is True
    finally:
        loop.close()


def test_idle_timer_fires_on_silence_and_draining_counts_as_progress() -> None:
    loop, conn, _transport, handler = make()
    try:
        conn.set_idle_timeout(0.6)
        loop.run_until_complete(asyncio.sleep(0.4))
        conn.pause_writing()
        conn.resume_writing()  # the peer read: progress, the clock restarts
        loop.run_until_complete(asyncio.sleep(0.4))
        assert "idle" not in handler.events
        loop.run_until_complete(asyncio.sleep(0.5))
        assert "idle" in handler.events
    finally:
        loop.close()


def test_deadline_is_not_extended_by_traffic() -> None:
    loop, conn, _transport, handler = make()
    try:
        conn.set_deadline(0.05)
        for _ in range(4):
            conn.data_received(b"x")
            loop.run_until_complete(asyncio.sleep(0.02))
        assert "deadline" in handler.events
    finally:
        loop.close()
