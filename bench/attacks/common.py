"""What every attack shares: its own broker (users of its choosing, optional open-file limit),
the broker's memory watched while it runs, a client bound to a chosen loopback source address,
and the result every attack returns.

Every loop in the suite is bounded twice, by a count and by a deadline: an attack that a
defence defeats ends as fast as one that succeeds.
"""

from __future__ import annotations

import contextlib
import inspect
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import (
    HOST,
    Server,
    cpu_seconds,
    free_port,
    rss_kib,
    stop_process,
    wait_listening,
)
from bench.wire import CLIENT_MAX_FRAME, WireClient
from tether.protocol import (
    BROKER_FRAME_TYPES,
    NEED_DATA,
    Error,
    FrameDecoder,
    RemoteProtocolError,
)

MIB = 1 << 20


@dataclass(frozen=True)
class User:
    """One line of an attack broker's users file."""

    name: str
    password: str
    cost: int = 4
    admin: bool = False
    client_id_prefixes: tuple[str, ...] = ()


def write_users(path: Path, users: Sequence[User]) -> bool:
    """Write the users file; returns whether this version honours per-user client-id prefixes
    (helper F's `client_id_prefixes`). Where it does not, they are left out and the attack
    that needs them shows the defence missing."""
    from tether.broker.users import UserStore, add_user

    supported = "client_id_prefixes" in inspect.signature(add_user).parameters
    for u in users:
        extra: dict[str, Any] = {}
        if u.client_id_prefixes and supported:
            extra["client_id_prefixes"] = list(u.client_id_prefixes)
        add_user(path, u.name, u.password, cost=u.cost, admin=u.admin or None, **extra)
    if not supported:
        return False
    check = getattr(UserStore.load(path), "client_id_allowed", None)
    return check is not None


@dataclass
class AttackBroker:
    server: Server
    tmp: Path
    prefixes_supported: bool

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    @property
    def pid(self) -> int:
        return self.server.pid

    def log_lines(self) -> int:
        try:
            with open(self.server.log_path, "rb") as f:
                return sum(1 for _ in f)
        except OSError:
            return 0

    def log_text(self) -> str:
        try:
            return self.server.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _limit_nofile(n: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return apply


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def attack_broker(
    users: Sequence[User],
    *extra: str,
    in_memory: bool = False,
    nofile: int | None = None,
    log_level: str = "warning",
) -> Iterator[AttackBroker]:
    """`tether serve` in a child process on 127.0.0.1 and a free port; durable (its own data
    directory, `--sync full`) unless `in_memory`; with `nofile`, its open-file limit is set to
    that (soft and hard) before exec. Stopped (SIGTERM, then SIGKILL) on exit."""
    _raise_nofile()  # the attacker side needs thousands of sockets
    with tempfile.TemporaryDirectory(prefix="tether-attack-") as tmp_name:
        tmp = Path(tmp_name)
        users_path = tmp / "users.json"
        prefixes = write_users(users_path, users)
        port = free_port()
        store = (
            ["--in-memory"] if in_memory else ["--data-dir", str(tmp / "data"), "--sync", "full"]
        )
        cmd = [
            *(sys.executable, "-m", "tether", "serve", "--host", HOST, "--port", str(port)),
            *("--users", str(users_path), "--log-format", "json", "--log-level", log_level),
            *store,
            *extra,
        ]
        server = Server("broker", HOST, port, tmp / "broker.log", cmd)
        preexec = _limit_nofile(nofile) if nofile is not None else _raise_nofile
        with open(server.log_path, "ab") as log:
            server.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec
            )
        try:
            wait_listening(server)
            yield AttackBroker(server, tmp, prefixes)
        finally:
            # Nothing of an attacked broker is kept: it need not finish the hashes queued.
            stop_process(server.proc, grace=1.0)


class SourcedClient(WireClient):
    """The bench's raw wire client, connected from a chosen loopback source address (Linux
    routes all of 127.0.0.0/8 to lo, so 127.0.0.2 or 127.1.x.y need no setup)."""

    def __init__(self, address: tuple[str, int], source: str, *, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.decoder = FrameDecoder(max_frame=CLIENT_MAX_FRAME, accept=BROKER_FRAME_TYPES)
        self._req = 0


class RssWatch:
    """Samples the broker's VmRSS every `period` s in a thread; the peak comes from VmHWM
    (the kernel's own high-water mark), so a spike between samples is not missed."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append((time.monotonic(), rss_kib(self.pid)))
            except OSError:
                return  # the broker is gone: the attack reports why

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def now(self) -> int:
        return rss_kib(self.pid)

    def high_water(self) -> int:
        return rss_kib(self.pid, "VmHWM:")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)


@dataclass
class Check:
    """One target of the issue: what it says, what was measured, and whether it held."""

    target: str
    value: str
    ok: bool
    timing: bool = False  # a latency target (the tests check such ones only for an answer)


@dataclass
class AttackResult:
    name: str
    what: str  # one line: the attack, at the size it ran
    checks: list[Check] = field(default_factory=list)
    probe_p50_ms: float | None = None
    probe_max_ms: float | None = None
    probe_rounds: int = 0
    probe_failed: int = 0
    resume_max_ms: float | None = None
    rss_base_kib: int = 0
    rss_peak_kib: int = 0
    rss_retained_kib: int = 0
    cpu_s: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the suite itself went wrong
    error: str | None = None  # the attack could not run to the end
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems

    @property
    def passed(self) -> bool:
        return self.ok and all(c.ok for c in self.checks)

    def check(self, target: str, value: str, ok: bool, *, timing: bool = False) -> None:
        self.checks.append(Check(target, value, ok, timing))


def mib(kib: float) -> str:
    return f"{kib / 1024:,.1f} MiB"


def first_answers(socks: Sequence[socket.socket], deadline: float) -> dict[str, int]:
    """Wait (at most until `deadline`) for each socket's first frame from the broker, or its
    close; returns how many got what: a frame type, `error:<code>`, `closed` or `no answer`."""
    sel = selectors.DefaultSelector()
    decoders: dict[int, FrameDecoder] = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        decoders[s.fileno()] = FrameDecoder(max_frame=CLIENT_MAX_FRAME, accept=BROKER_FRAME_TYPES)
    got: dict[str, int] = {}

    def done(s: socket.socket, what: str) -> None:
        got[what] = got.get(what, 0) + 1
        sel.unregister(s)
        del decoders[s.fileno()]

    try:
        while decoders and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                s = ready
                try:
                    data = s.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    done(s, "closed")
                    continue
                dec = decoders[s.fileno()]
                dec.receive_data(data)
                try:
                    frame = dec.next_frame()
                except RemoteProtocolError as e:
                    done(s, f"undecodable: {type(e).__name__}")
                    continue
                if frame is not NEED_DATA:
                    done(s, f"error:{frame.code}" if isinstance(frame, Error) else frame.type)
    finally:
        sel.close()
    if decoders:
        got["no answer"] = len(decoders)
    return got
