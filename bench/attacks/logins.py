"""Wrong-password floods at bcrypt cost 12 (issue 12: 100 at once and nobody, from any
address, could log in for 23 s; from rotating source addresses 127.1.x.y the failure limiter
never engaged and every login took ~5 s, sustained). Targets: a device that logged in before
from its own address (127.0.0.3) logs in again within 2 s; a resume within 50 ms."""

from __future__ import annotations

import selectors
import socket
import threading
import time

from bench.attacks.common import AttackResult, SourcedClient, User, attack_broker, first_answers
from bench.attacks.measure import attack_run
from bench.attacks.partial_flood import ATTACKER_ADDR
from bench.attacks.probe import PROBE_USER, Window
from bench.attacks.sizes import AttackSizes
from bench.report import Console
from bench.wire import Closed
from tether.protocol import (
    BROKER_FRAME_TYPES,
    NEED_DATA,
    Error,
    FrameDecoder,
    Register,
    Registered,
    RemoteProtocolError,
    encode,
)

DEVICE_ADDR = "127.0.0.3"
LOGIN_TARGET_S = 2.0
RESUME_TARGET_MS = 50.0
NEIGHBOUR = User("neighbour", "neighbour-password")  # behind the attacker's address (a NAT)


def _users(cost: int) -> tuple[User, User]:
    return User("victim", "victim-password", cost=cost), User("device", "device-pass", cost=cost)


def wrong_register(i: int, victim: User) -> bytes:
    return encode(
        Register(req=1, client_id=f"guess-{i}", username=victim.name, password=f"guess-{i}")
    )


def login(
    address: tuple[str, int],
    user: User,
    *,
    source: str = DEVICE_ADDR,
    client_id: str = "device-1",
    timeout: float = 30.0,
) -> tuple[float, str]:
    """A fresh register (takeover) with the right password, by default the known device's
    from its own address: (seconds, "registered" or what was answered instead)."""
    t0 = time.monotonic()
    try:
        with SourcedClient(address, source, timeout=timeout) as c:
            frame = c.register(client_id, user.name, user.password, takeover=True)
    except (OSError, Closed) as e:
        return time.monotonic() - t0, type(e).__name__
    what = (
        "registered"
        if isinstance(frame, Registered)
        else (frame.code if isinstance(frame, Error) else type(frame).__name__)
    )
    return time.monotonic() - t0, what


def rotating_source(i: int) -> str:
    """127.1.x.y, a different address for each of 65,024 connections."""
    return f"127.1.{(i // 254) % 256}.{i % 254 + 1}"


class RotatingFlood(threading.Thread):
    """Opens `rate` connections a second, each from a fresh address and sending a wrong
    password, without waiting for answers (at most `max_open` at once; one unanswered after
    `PATIENCE` s is closed), for `seconds` or `limit` connections, whichever ends first."""

    PATIENCE = 10.0

    def __init__(
        self,
        address: tuple[str, int],
        victim: User,
        *,
        rate: float,
        max_open: int,
        limit: int,
        seconds: float,
    ) -> None:
        super().__init__(name="rotating-flood", daemon=True)
        self.address, self.victim = address, victim
        self.rate, self.max_open, self.limit, self.seconds = rate, max_open, limit, seconds
        self.opened = 0
        self.answers: dict[str, int] = {}
        self.stopping = threading.Event()

    def _count(self, what: str) -> None:
        self.answers[what] = self.answers.get(what, 0) + 1

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        live: dict[socket.socket, tuple[FrameDecoder, float]] = {}
        t0 = time.monotonic()
        deadline = t0 + self.seconds
        try:
            while (now := time.monotonic()) < deadline and not self.stopping.is_set():
                due = min(self.limit, int((now - t0) * self.rate) + 1)
                while self.opened < due and len(live) < self.max_open:
                    i = self.opened
                    self.opened += 1
                    try:
                        s = socket.create_connection(
                            self.address, timeout=2, source_address=(rotating_source(i), 0)
                        )
                        s.sendall(wrong_register(i, self.victim))
                    except OSError as e:
                        self._count(f"connect: {type(e).__name__}")
                        continue
                    s.setblocking(False)
                    sel.register(s, selectors.EVENT_READ)
                    live[s] = (FrameDecoder(accept=BROKER_FRAME_TYPES), now)
                for key, _ in sel.select(timeout=0.02):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    s = ready
                    what = self._read(s, live[s][0])
                    if what is not None:
                        self._count(what)
                        sel.unregister(s)
                        del live[s]
                        s.close()
                for s, (_, opened_at) in list(live.items()):
                    if now - opened_at > self.PATIENCE:
                        self._count("gave up")
                        sel.unregister(s)
                        del live[s]
                        s.close()
        finally:
            for s in live:
                s.close()
            sel.close()

    @staticmethod
    def _read(s: socket.socket, dec: FrameDecoder) -> str | None:
        try:
            data = s.recv(4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return "closed"
        dec.receive_data(data)
        try:
            frame = dec.next_frame()
        except RemoteProtocolError:
            return "undecodable"
        if frame is NEED_DATA:
            return None
        return f"error:{frame.code}" if isinstance(frame, Error) else frame.type


def _checks(res: AttackResult, logins: list[tuple[float, str]], window: Window) -> None:
    worst = max((s for s, _ in logins), default=float("inf"))
    refused = [w for _, w in logins if w != "registered"]
    res.check(
        f"known device logs in <= {LOGIN_TARGET_S:g} s",
        f"{worst:.2f} s (worst of {len(logins)})" + (f", refused: {refused[0]}" if refused else ""),
        worst <= LOGIN_TARGET_S and not refused,
        timing=True,
    )
    rmax = window.resume_max_ms()
    res.check(
        f"resume <= {RESUME_TARGET_MS:g} ms",
        "none" if rmax is None else f"{rmax:.1f} ms (worst of {len(window.resumes)})",
        rmax is not None and rmax <= RESUME_TARGET_MS and not window.resume_failed(),
        timing=True,
    )
    res.figures["device_logins"] = [[round(s, 3), w] for s, w in logins]


def run_burst(sizes: AttackSizes, console: Console) -> AttackResult:
    n = sizes.login_burst
    victim, device = _users(sizes.login_cost)
    res = AttackResult(
        "login-burst",
        f"{n} wrong-password registers at once from one address (bcrypt cost {victim.cost})",
    )
    with attack_broker([PROBE_USER, victim, device, NEIGHBOUR]) as broker:
        first = login(broker.address, device)  # the device is known from its address
        with attack_run(res, broker, settle=sizes.settle_s) as r:
            r.begin()
            deadline = time.monotonic() + sizes.login_burst_wait_s
            socks: list[socket.socket] = []
            answers: dict[str, int] = {}
            logins: list[tuple[float, str]] = []
            neighbour: list[tuple[float, str]] = []
            try:
                for i in range(n):
                    s = socket.create_connection(
                        broker.address, timeout=5, source_address=(ATTACKER_ADDR, 0)
                    )
                    socks.append(s)
                    s.sendall(wrong_register(i, victim))
                waiter = threading.Thread(
                    target=lambda: answers.update(first_answers(socks, deadline)), daemon=True
                )
                waiter.start()
                time.sleep(0.2)  # the burst is queued: now the device comes back
                # The flooding address's own well-behaved user, with the right password.
                neighbour_thread = threading.Thread(
                    target=lambda: neighbour.append(
                        login(
                            broker.address,
                            NEIGHBOUR,
                            source=ATTACKER_ADDR,
                            client_id="nb-1",
                            timeout=sizes.login_burst_wait_s,
                        )
                    ),
                    daemon=True,
                )
                neighbour_thread.start()
                while waiter.is_alive() and len(logins) < sizes.device_logins:
                    t0 = time.monotonic()
                    logins.append(login(broker.address, device))
                    waiter.join(max(0.0, t0 + sizes.device_every_s - time.monotonic()))
                waiter.join()
                neighbour_thread.join(timeout=sizes.login_burst_wait_s + 5)
            finally:
                for s in socks:
                    s.close()
            r.end()
        nb = neighbour[0] if neighbour else (0.0, "no answer")
        # Slow is allowed (it may queue behind its own address's guesses); refused is not.
        res.check(
            "right password from the flooding address logs in (not rate_limited)",
            f"{nb[1]} after {nb[0]:.1f} s",
            nb[1] == "registered",
        )
        _checks(res, logins, r.window())
    res.figures.update(
        first_login=[round(first[0], 3), first[1]],
        burst_answers=answers,
        neighbour_login=[round(nb[0], 3), nb[1]],
    )
    return res


def run_rotating(sizes: AttackSizes, console: Console) -> AttackResult:
    victim, device = _users(sizes.login_cost)
    res = AttackResult(
        "rotating-flood",
        f"{sizes.rotating_s:g} s of wrong passwords (cost {victim.cost}) from rotating"
        f" 127.1.x.y, {sizes.rotating_rate:g} new connections/s",
    )
    with attack_broker([PROBE_USER, victim, device]) as broker:
        first = login(broker.address, device)
        flood = RotatingFlood(
            broker.address,
            victim,
            rate=sizes.rotating_rate,
            max_open=sizes.rotating_open,
            limit=sizes.rotating_max,
            seconds=sizes.rotating_s,
        )
        logins: list[tuple[float, str]] = []
        with attack_run(res, broker, settle=sizes.settle_s) as r:
            r.begin()
            flood.start()
            try:
                time.sleep(min(1.0, sizes.rotating_s / 3))  # the flood has filled the queue
                while flood.is_alive() and len(logins) < sizes.device_logins:
                    t0 = time.monotonic()
                    logins.append(login(broker.address, device))
                    time.sleep(max(0.0, t0 + sizes.device_every_s - time.monotonic()))
                flood.join(timeout=sizes.rotating_s + 15)
            finally:
                flood.stopping.set()
                flood.join(timeout=30)
            r.end()
        _checks(res, logins, r.window())
    res.figures.update(
        first_login=[round(first[0], 3), first[1]],
        connections=flood.opened,
        answers=flood.answers,
    )
    if not logins:
        res.problems.append("the device never tried to log in during the flood")
    return res
