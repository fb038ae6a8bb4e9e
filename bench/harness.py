"""Shared bench plumbing: a broker in its own process, and fast raw-socket clients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from protocol import (
    BROKER_FRAME_TYPES,
    DEFAULT_MAX_FRAME,
    DELIVER_HEADROOM,
    NEED_DATA,
    Ack,
    BrokerFrame,
    ClientFrame,
    FrameDecoder,
    Register,
    Registered,
    encode,
)

BENCH_USER = "bench"
BENCH_PASSWORD = "bench-password"
BENCH_COST = 4  # a low bcrypt cost, said in every report: fresh registrations hash once each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def broker_process(*extra: str) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    """Start `tether serve` in a child process on a free loopback port; stop it after."""
    from broker.users import add_user

    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        users = Path(tmp) / "users.json"
        add_user(users, BENCH_USER, BENCH_PASSWORD, cost=BENCH_COST)
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "broker",
            "serve",
            "--port",
            str(port),
            "--users",
            str(users),
            "--log-format",
            "json",
            "--log-level",
            "warning",
            *extra,
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the broker did not start") from None
                    time.sleep(0.05)
            yield "127.0.0.1", port, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RawClient:
    """A blocking client tuned for load: batched writes, incremental parsing."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder(
            max_frame=DEFAULT_MAX_FRAME + DELIVER_HEADROOM, accept=BROKER_FRAME_TYPES
        )

    def send(self, *frames: ClientFrame) -> None:
        self.sock.sendall(b"".join(encode(f) for f in frames))

    def read_frames(self) -> list[BrokerFrame]:
        """Blocks for at least one read; returns every whole frame it holds."""
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("broker closed the connection")
        self.decoder.receive_data(data)
        out: list[BrokerFrame] = []
        while (frame := self.decoder.next_frame()) is not NEED_DATA:
            out.append(frame)  # type: ignore[arg-type]
        return out

    def recv(self) -> BrokerFrame:
        while (frame := self.decoder.next_frame()) is NEED_DATA:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("broker closed the connection")
            self.decoder.receive_data(data)
        return frame  # type: ignore[return-value]

    def register(self, client_id: str, **kw: Any) -> Registered:
        self.send(
            Register(
                req=0,
                client_id=client_id,
                username=BENCH_USER,
                password=kw.pop("password", BENCH_PASSWORD),
                **kw,
            )
        )  # type: ignore[arg-type]
        frame = self.recv()
        if not isinstance(frame, Registered):
            raise RuntimeError(f"register failed: {frame!r}")
        return frame

    def ack(self, topic: str, seq: int) -> None:
        self.send(Ack(topic=topic, seq=seq))

    def close(self) -> None:
        self.sock.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
