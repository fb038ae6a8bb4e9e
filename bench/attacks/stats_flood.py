"""Cheap requests that froze the loop (issue 12: 300 pipelined `stats` with 200k subscriptions
froze the whole broker 8.4 s; a session subscribed to 100,000 topics made every delivery to it
scan all its queues). Target for both: probe max <= 50 ms."""

from __future__ import annotations

import threading
import time

from bench.attacks.common import AttackResult, SourcedClient, User, attack_broker
from bench.attacks.measure import attack_run
from bench.attacks.partial_flood import ATTACKER_ADDR
from bench.attacks.probe import PROBE_USER
from bench.attacks.sizes import AttackSizes
from bench.harness import BenchError
from bench.report import Console
from bench.wire import Closed, WireClient
from tether.protocol import Ack, Deliver, Error, Ok, Publish, Registered, Stats, Subscribe

HOLDER = User("holder", "holder-password")
EVE = User("eve", "eve-password")  # not an admin: any user could send `stats`
PROBE_TARGET_MS = 50.0


def subscribe_many(address: tuple[str, int], client_id: str, topics: list[str]) -> int:
    """A session of HOLDER subscribed to `topics` (pipelined, 1,000 at a time), then left
    away. Returns how many subscribes the broker refused."""
    refused = 0
    with SourcedClient(address, ATTACKER_ADDR, timeout=60) as c:
        reg = c.register(client_id, HOLDER.name, HOLDER.password, keepalive=3600)
        if not isinstance(reg, Registered):
            raise BenchError(f"{client_id} could not register: {reg!r}")
        for i in range(0, len(topics), 1000):
            chunk = topics[i : i + 1000]
            c.send(*[Subscribe(req=c.next_req(), topic=t) for t in chunk])
            refused += sum(1 for f in c.recv_many(len(chunk)) if not isinstance(f, Ok))
    return refused


def _probe_check(res: AttackResult) -> None:
    pmax = res.probe_max_ms
    res.check(
        f"probe max <= {PROBE_TARGET_MS:g} ms",
        "no round"
        if pmax is None
        else f"{pmax:.1f} ms" + (f" ({res.probe_failed} failed)" if res.probe_failed else ""),
        pmax is not None and pmax <= PROBE_TARGET_MS and not res.probe_failed,
        timing=True,
    )


def run_stats(sizes: AttackSizes, console: Console) -> AttackResult:
    subs = sizes.stats_sessions * sizes.stats_subs_each
    res = AttackResult(
        "stats-flood",
        f"{sizes.stats_requests} pipelined stats (non-admin) with {subs:,} subscriptions"
        f" ({sizes.stats_sessions} away sessions)",
    )
    with attack_broker([PROBE_USER, HOLDER, EVE]) as broker:
        t0 = time.monotonic()
        refused = 0
        for i in range(sizes.stats_sessions):
            topics = [f"h{i}/{j}" for j in range(sizes.stats_subs_each)]
            refused += subscribe_many(broker.address, f"holder-{i}", topics)
        setup_s = time.monotonic() - t0
        answers: dict[str, int] = {}
        with (
            attack_run(res, broker, settle=sizes.settle_s) as r,
            SourcedClient(broker.address, ATTACKER_ADDR, timeout=sizes.stats_wait_s) as e,
        ):
            reg = e.register("eve-1", EVE.name, EVE.password, keepalive=3600)
            if not isinstance(reg, Registered):
                raise BenchError(f"eve could not register: {reg!r}")
            r.begin()
            e.send(*[Stats(req=e.next_req()) for _ in range(sizes.stats_requests)])
            deadline = time.monotonic() + sizes.stats_wait_s
            try:
                while sum(answers.values()) < sizes.stats_requests:
                    f = e.recv(max(0.01, deadline - time.monotonic()))
                    what = f"error:{f.code}" if isinstance(f, Error) else f.type
                    answers[what] = answers.get(what, 0) + 1
            except (TimeoutError, Closed, OSError) as exc:
                answers[type(exc).__name__] = 1
            r.end()
    _probe_check(res)
    res.figures.update(
        subscriptions=subs,
        subscribes_refused=refused,
        setup_seconds=round(setup_s, 1),
        answers=answers,
    )
    return res


class _Reader(threading.Thread):
    """Reads the receiving session's delivers and acks each one."""

    def __init__(self, client: WireClient) -> None:
        super().__init__(name="receiver", daemon=True)
        self.client = client
        self.received = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                f = self.client.recv(0.2)
            except TimeoutError:
                continue
            except (Closed, OSError):
                return
            if isinstance(f, Deliver):
                self.received += 1
                self.client.send(Ack(topic=f.topic, seq=f.seq))


def run_receiver(sizes: AttackSizes, console: Console) -> AttackResult:
    n = sizes.receiver_subs
    res = AttackResult(
        "many-subs",
        f"a session with {n:,} subscriptions receiving {sizes.receiver_rate} msg/s"
        f" for {sizes.receiver_s:g} s",
    )
    topics = [f"r/{j}" for j in range(n)]
    with (
        attack_broker([PROBE_USER, HOLDER, EVE], "--max-subscriptions", str(n)) as broker,
        SourcedClient(broker.address, ATTACKER_ADDR, timeout=30) as rc,
        SourcedClient(broker.address, ATTACKER_ADDR, timeout=30) as pub,
    ):
        reg = rc.register("receiver-1", HOLDER.name, HOLDER.password, keepalive=3600)
        if not isinstance(reg, Registered):
            raise BenchError(f"the receiver could not register: {reg!r}")
        refused = 0
        for i in range(0, n, 1000):
            chunk = topics[i : i + 1000]
            rc.send(*[Subscribe(req=rc.next_req(), topic=t) for t in chunk])
            refused += sum(1 for f in rc.recv_many(len(chunk)) if not isinstance(f, Ok))
        # One more than --max-subscriptions: refused, and the session goes on.
        rc.send(Subscribe(req=rc.next_req(), topic="r/one-too-many"))
        over = rc.recv()
        over_what = f"error:{over.code}" if isinstance(over, Error) else over.type
        if not isinstance(pub.register("pub-1", EVE.name, EVE.password), Registered):
            raise BenchError("the publisher could not register")
        reader = _Reader(rc)
        reader.start()
        sent = 0
        with attack_run(res, broker, settle=sizes.settle_s) as r:
            r.begin()
            tick = 0.01
            per_tick = max(1, round(sizes.receiver_rate * tick))
            end = r.t0 + sizes.receiver_s
            try:
                while time.monotonic() < end:
                    pub.send(
                        *[
                            Publish(topic=topics[(sent + k) % n], payload=b"x" * 64)
                            for k in range(per_tick)
                        ]
                    )
                    sent += per_tick
                    time.sleep(tick)
                time.sleep(0.5)
            finally:
                reader.stopping.set()
                reader.join(timeout=5)
            r.end()
    res.check(
        f"subscribe {n + 1:,} (over --max-subscriptions {n:,}) is quota_exceeded",
        over_what,
        over_what == "error:quota_exceeded",
    )
    _probe_check(res)
    res.figures.update(
        subscriptions=n,
        subscribes_refused=refused,
        over_the_quota=over_what,
        published=sent,
        received=reader.received,
    )
    if reader.received == 0:
        res.problems.append("the receiving session got nothing")
    return res
