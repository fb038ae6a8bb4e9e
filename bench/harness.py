"""Shared bench plumbing: servers in their own processes, process metrics, blocking clients."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.wire import Closed, WireClient
from tether.protocol import Ack, BrokerFrame, Registered, Stats, StatsResult

HOST = "127.0.0.1"  # loopback only: the bench never listens or connects elsewhere
BENCH_USER = "bench"
BENCH_PASSWORD = "bench-password"
BENCH_COST = 4  # a low bcrypt cost, said in every report: fresh registrations hash once each
BURST_USER = "burst"
BURST_PASSWORD = "burst-password"
BURST_COST = 12  # the registration burst uses the production default cost
# Bench sessions must never be closed for silence, however long a scenario idles.
KEEPALIVE = 3600


class BenchError(Exception):
    """A scenario could not run to the end (timeout, dead server, refused request)."""


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int, field: str = "VmRSS:") -> int:
    """A process's resident set (or, with "VmHWM:", its peak so far) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ClientTls:
    """How a bench client speaks TLS to a server: the CA to trust, the name to check.

    Plain data, so it crosses into forked generators as it is; each process builds its own
    context from it (`context()`, once per process).
    """

    ca: Path
    server_hostname: str = "localhost"

    def context(self) -> ssl.SSLContext:
        return _client_context(self.ca)

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        """`sock` after a TLS handshake (under the socket's own timeout)."""
        return self.context().wrap_socket(sock, server_hostname=self.server_hostname)


@functools.cache
def _client_context(ca: Path) -> ssl.SSLContext:
    # The defaults a user's client has: certificate and host name checked, TLS 1.2 at least.
    return ssl.create_default_context(cafile=str(ca))


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate and key (bench/certs.py, in the server's temporary directory)
    and what its clients need to trust it."""

    cert: Path
    key: Path
    client: ClientTls

    @classmethod
    def make(cls, directory: Path) -> ServerTls:
        from bench.certs import CertAuthority

        files = CertAuthority(directory).server()
        return cls(files.cert, files.key, ClientTls(files.ca))

    def args(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]


@dataclass
class Server:
    """A broker or relay running in a child process."""

    name: str
    host: str
    port: int
    log_path: Path
    cmd: list[str]
    proc: subprocess.Popen[bytes] | None = None  # the current process (a restart replaces it)
    tls: ClientTls | None = None  # set when the server speaks TLS: how to connect to it

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise BenchError(f"the {self.name} was never started")
        return self.proc

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def peak_rss_kib(self) -> int:
        return rss_kib(self.pid, "VmHWM:")

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise BenchError(f"the {self.name} exited with status {code}; log: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"


def _spawn(server: Server) -> None:
    """Start (or start again) the server's command; its output is appended to its log."""
    with open(server.log_path, "ab") as log:
        # The child raises its own fd limit before exec: 10,000 sessions need 10,000 sockets.
        server.proc = subprocess.Popen(
            list(server.cmd), stdout=log, stderr=subprocess.STDOUT, preexec_fn=raise_nofile
        )


def wait_listening(server: Server, timeout: float = 20.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(server.address, timeout=1) as sock:
                if server.tls is not None:
                    server.tls.wrap(sock).close()  # a TLS server is ready once it shakes hands
            return
        except ssl.SSLCertVerificationError as exc:
            raise BenchError(f"the {server.name}'s certificate was refused: {exc}") from None
        except OSError:
            server.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the {server.name} did not listen within {timeout:.0f} s"
                ) from None
            time.sleep(interval)


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def _server(
    name: str, cmd: Sequence[str], port: int, tmp: Path, tls: ClientTls | None = None
) -> Iterator[Server]:
    server = Server(name, HOST, port, tmp / f"{name}.log", list(cmd), tls=tls)
    try:
        _spawn(server)
        wait_listening(server)
        yield server
    finally:
        stop_process(server.proc)


def _broker_command(
    tmp: Path,
    port: int,
    *extra: str,
    burst_cost: int | None,
    in_memory: bool,
    bench_user: dict[str, Any] | None = None,
) -> list[str]:
    from tether.broker.users import add_user

    users = tmp / "users.json"
    # Admin: the bench's monitor asks `stats`, which is admin-only.
    options: dict[str, Any] = {"admin": True, **(bench_user or {})}
    add_user(users, BENCH_USER, BENCH_PASSWORD, cost=BENCH_COST, **options)
    if burst_cost is not None:
        add_user(users, BURST_USER, BURST_PASSWORD, cost=burst_cost)
    # Durable is what the bench measures: SQLite in this broker's own directory, --sync full.
    store = ["--in-memory"] if in_memory else ["--data-dir", str(tmp / "data"), "--sync", "full"]
    return [
        *(sys.executable, "-m", "tether", "serve", "--host", HOST, "--port", str(port)),
        *("--users", str(users), "--log-format", "json", "--log-level", "warning"),
        *store,
        *extra,
    ]


@contextlib.contextmanager
def broker_process(
    *extra: str,
    burst_cost: int | None = None,
    in_memory: bool = False,
    tls: bool = False,
    bench_user: dict[str, Any] | None = None,
) -> Iterator[Server]:
    """Start `tether serve` in a child process on a free loopback port; stop it after.

    Durable (`--data-dir` in its own temporary directory, `--sync full`) unless `in_memory`.
    The users file holds the bench user (cost BENCH_COST; admin, unless `bench_user`, the
    keyword arguments of `add_user`, says otherwise) and, with `burst_cost`, the burst user
    (at that cost) for fresh registrations that cost what they cost in production. With
    `tls`, the port serves TLS only (`--tls-cert`, `--tls-key`: a certificate for localhost
    and 127.0.0.1 from a CA of its own) and `server.tls` says how to connect.
    """
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        server_tls = ServerTls.make(tmp / "certs") if tls else None
        cmd = _broker_command(
            tmp,
            port,
            *extra,
            *(server_tls.args() if server_tls else ()),
            burst_cost=burst_cost,
            in_memory=in_memory,
            bench_user=bench_user,
        )
        client_tls = server_tls.client if server_tls else None
        with _server("broker", cmd, port, tmp, client_tls) as server:
            yield server


def kill_and_restart(server: Server) -> tuple[float, float]:
    """SIGKILL the broker and start it again (same data directory, same port). Returns when
    the new process was started (time.monotonic()) and the seconds from then to its first
    accepted connection."""
    server.process.kill()
    server.process.wait(timeout=10)
    t0 = time.monotonic()
    _spawn(server)
    wait_listening(server, timeout=60, interval=0.005)
    return t0, time.monotonic() - t0


@contextlib.contextmanager
def relay_process(*, tls: bool = False) -> Iterator[Server]:
    """Start the baseline relay (bench/relay.py) in a child process on a free loopback port;
    with `tls`, serving TLS as `broker_process(tls=True)` does."""
    with tempfile.TemporaryDirectory(prefix="tether-relay-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        server_tls = ServerTls.make(tmp / "certs") if tls else None
        cmd = [sys.executable, "-m", "bench.relay", "--host", HOST, "--port", str(port)]
        cmd += server_tls.args() if server_tls else []
        client_tls = server_tls.client if server_tls else None
        with _server("relay", cmd, port, tmp, client_tls) as server:
            yield server


class RawClient(WireClient):
    """The tests' wire client (bench/wire.py) with the bench's user, keepalive and patience,
    reading up to 1 MiB at a time, and failing with `BenchError`."""

    read_size = 1 << 20

    def __init__(
        self, address: tuple[str, int], *, timeout: float = 30.0, tls: ClientTls | None = None
    ) -> None:
        super().__init__(address, timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap(self.sock)

    def recv(self, timeout: float | None = None) -> BrokerFrame:
        try:
            return super().recv(timeout)
        except TimeoutError:
            raise BenchError("no answer from the server within the timeout") from None
        except Closed:
            raise BenchError("the server closed the connection") from None

    def register(
        self,
        client_id: str,
        username: str = BENCH_USER,
        password: str | None = BENCH_PASSWORD,
        **kw: Any,
    ) -> Registered:
        kw.setdefault("keepalive", KEEPALIVE)
        frame = super().register(client_id, username, password, **kw)
        if not isinstance(frame, Registered):
            raise BenchError(f"register {client_id!r} failed: {frame!r}")
        return frame

    def ack(self, topic: str, seq: int) -> None:
        self.send(Ack(topic=topic, seq=seq))


class Monitor:
    """One long-lived session that asks the broker for its counters (`stats` frames).

    A single registration up front: polling must not itself cost bcrypt hashes, which
    `tether stats` (a fresh session each time) would.
    """

    def __init__(self, address: tuple[str, int]) -> None:
        self.client = RawClient(address, timeout=30)
        # takeover: after a broker restart, this process's monitor session is still stored.
        self.client.register(f"bench-monitor-{os.getpid()}", takeover=True)
        self._req = 0

    def stats(self) -> dict[str, Any]:
        self._req += 1
        self.client.send(Stats(req=self._req))
        for _ in range(1000):  # only stats results are expected on this session
            frame = self.client.recv()
            if isinstance(frame, StatsResult) and frame.req == self._req:
                return dict(frame.stats)
        raise BenchError("the broker did not answer a stats request")

    def wait_for(self, key: str, want: int, timeout: float) -> dict[str, Any]:
        """Poll until stats[key] == want (e.g. every dropped connection seen by the broker)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats.get(key) == want:
                return stats
            if time.monotonic() > deadline:
                raise BenchError(f"broker stats {key}={stats.get(key)}, expected {want}")
            time.sleep(0.02)

    def close(self) -> None:
        self.client.close()
