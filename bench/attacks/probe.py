"""The well-behaved client measured during every attack.

It runs in a process of its own (spawned, so it shares neither the attacker's GIL nor its
sockets) and connects from its own address, 127.0.0.2. Each round: a fresh `register`,
`subscribe`, a confirmed `publish` to that topic, the `deliver` received: its latency is the
round's. After each round a resume of one long-lived session is timed (connect to
`registered`). Samples carry `time.monotonic()` (system-wide on Linux), so the attack can cut
them into windows: during the attack, after it.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import time
from dataclasses import dataclass
from typing import Any

from bench.attacks.common import SourcedClient, User
from bench.harness import BenchError
from bench.wire import Closed
from tether.protocol import (
    Deliver,
    Error,
    Ok,
    Publish,
    Register,
    Registered,
    Subscribe,
    Unregister,
)

PROBE_ADDR = "127.0.0.2"
PROBE_USER = User("probe", "probe-password", cost=4)
MAX_ROUNDS = 100_000  # bounds the loop however short the interval


@dataclass(frozen=True)
class Sample:
    t: float  # time.monotonic() when it started
    seconds: float
    ok: bool
    error: str = ""


def _fail(t0: float, why: str) -> Sample:
    return Sample(t0, time.monotonic() - t0, False, why)


def _answer(frame: object, what: str) -> str:
    if isinstance(frame, Error):
        return f"{what}: {frame.code}"
    return f"{what}: {type(frame).__name__}"


def probe_round(address: tuple[str, int], n: int, timeout: float) -> Sample:
    """One round; any failure (refused, closed, timed out, an error answer) is a failed
    sample with the time it took to fail."""
    t0 = time.monotonic()
    cid = f"probe-{os.getpid()}-{n}"
    topic = f"probe/{os.getpid()}/{n}"
    try:
        with SourcedClient(address, PROBE_ADDR, timeout=timeout) as c:
            reg = c.register(cid, PROBE_USER.name, PROBE_USER.password, keepalive=3600)
            if not isinstance(reg, Registered):
                return _fail(t0, _answer(reg, "register"))
            req = c.next_req()
            c.send(Subscribe(req=req, topic=topic))
            frame = c.recv()
            if frame != Ok(req=req):
                return _fail(t0, _answer(frame, "subscribe"))
            req = c.next_req()
            c.send(Publish(topic=topic, payload=b"probe", req=req))
            confirmed = delivered = False
            for _ in range(10):  # an ok and a deliver, in either order
                frame = c.recv()
                confirmed |= frame == Ok(req=req)
                delivered |= isinstance(frame, Deliver) and frame.topic == topic
                if confirmed and delivered:
                    break
                if isinstance(frame, Error):
                    return _fail(t0, _answer(frame, "publish"))
            if not (confirmed and delivered):
                return _fail(t0, "publish: no ok and deliver")
            elapsed = time.monotonic() - t0
            # Leave no session behind: hundreds of rounds must not pile up.
            c.send(Unregister(req=c.next_req()))
        return Sample(t0, elapsed, True)
    except (OSError, Closed) as e:  # TimeoutError is an OSError
        return _fail(t0, type(e).__name__)


class Resumer:
    """One session, registered before the attack, resumed (and left) again and again."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.client_id = f"probe-resume-{os.getpid()}"
        with SourcedClient(address, PROBE_ADDR, timeout=timeout) as c:
            reg = c.register(
                self.client_id, PROBE_USER.name, PROBE_USER.password, keepalive=3600, takeover=True
            )
        if not isinstance(reg, Registered):
            raise BenchError(f"the probe could not register: {reg!r}")
        self.session_id, self.token = reg.session_id, reg.resume_token

    def resume(self) -> Sample:
        t0 = time.monotonic()
        try:
            with SourcedClient(self.address, PROBE_ADDR, timeout=self.timeout) as c:
                c.send(
                    Register(
                        req=c.next_req(),
                        client_id=self.client_id,
                        username=PROBE_USER.name,
                        session_id=self.session_id,
                        resume_token=self.token,
                        keepalive=3600,
                    )
                )
                reg = c.recv()
                elapsed = time.monotonic() - t0
            if not (isinstance(reg, Registered) and reg.resumed):
                return _fail(t0, _answer(reg, "resume"))
            self.token = reg.resume_token
            return Sample(t0, elapsed, True)
        except (OSError, Closed) as e:
            return _fail(t0, type(e).__name__)


def _main(
    conn: multiprocessing.connection.Connection,
    address: tuple[str, int],
    interval: float,
    timeout: float,
) -> None:
    try:
        resumer = Resumer(address, timeout)
    except (OSError, Closed, BenchError) as e:
        conn.send(("failed", repr(e)))
        return
    conn.send(("ready", None))
    rounds: list[Sample] = []
    resumes: list[Sample] = []
    for n in range(MAX_ROUNDS):
        if conn.poll(interval):
            break  # told to stop
        rounds.append(probe_round(address, n, timeout))
        resumes.append(resumer.resume())
    conn.send(("done", {"rounds": rounds, "resumes": resumes}))


@dataclass
class Window:
    """The samples of one stretch of time, and what the table shows of them."""

    rounds: list[Sample]
    resumes: list[Sample]

    @property
    def answered(self) -> int:
        return sum(1 for s in self.rounds if s.ok)

    @property
    def failed(self) -> int:
        return sum(1 for s in self.rounds if not s.ok)

    def p50_ms(self) -> float | None:
        return _pct(self.rounds, 50)

    def max_ms(self) -> float | None:
        """The slowest round, failed ones included (a failure is at least that slow)."""
        return _pct(self.rounds, 100)

    def resume_max_ms(self) -> float | None:
        return _pct(self.resumes, 100)

    def resume_failed(self) -> int:
        return sum(1 for s in self.resumes if not s.ok)

    def errors(self) -> list[str]:
        return sorted({s.error for s in self.rounds + self.resumes if not s.ok})

    def figures(self) -> dict[str, Any]:
        return {
            "rounds": len(self.rounds),
            "failed": self.failed,
            "p50_ms": _round(self.p50_ms()),
            "max_ms": _round(self.max_ms()),
            "resumes": len(self.resumes),
            "resume_failed": self.resume_failed(),
            "resume_max_ms": _round(self.resume_max_ms()),
            "errors": self.errors()[:5],
        }


def _pct(samples: list[Sample], q: float) -> float | None:
    """Nearest-rank percentile of the samples' durations, in ms."""
    if not samples:
        return None
    ms = sorted(s.seconds * 1e3 for s in samples)
    return ms[max(0, math.ceil(q / 100 * len(ms)) - 1)]


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


class Probe:
    """`with Probe(address) as probe:` ... `probe.window(t0, t1)` after the block."""

    def __init__(
        self, address: tuple[str, int], *, interval: float = 0.05, timeout: float = 10.0
    ) -> None:
        self.address = address
        self.interval = interval
        self.timeout = timeout
        self.rounds: list[Sample] = []
        self.resumes: list[Sample] = []
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_main, args=(child, address, interval, timeout), name="probe", daemon=True
        )

    def __enter__(self) -> Probe:
        self._proc.start()
        if not self._conn.poll(60):
            self._proc.kill()
            raise BenchError("the probe did not start within 60 s")
        kind, detail = self._conn.recv()
        if kind != "ready":
            self._proc.join(5)
            raise BenchError(f"the probe could not start: {detail}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._proc.is_alive() and not self._conn.poll():
            return
        try:
            self._conn.send("stop")
            # At most one round and one resume still running, each bounded by its timeout.
            if self._conn.poll(4 * self.timeout + 10):
                _, data = self._conn.recv()
                self.rounds, self.resumes = data["rounds"], data["resumes"]
        except (EOFError, OSError):
            pass  # the probe died; its samples are lost and the window says so
        finally:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)

    def window(self, t0: float = 0.0, t1: float = float("inf")) -> Window:
        return Window(
            [s for s in self.rounds if t0 <= s.t <= t1],
            [s for s in self.resumes if t0 <= s.t <= t1],
        )
