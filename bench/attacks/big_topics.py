"""One session, many big topics, away (issue 12: 60 topics of 1 MiB publishes held 3.9 GiB
for one user's single session: 64 MiB per queue, nothing bounded the sum). The broker runs
with a small `--session-queue-bytes` so the run is quick. Targets: the session's quota holds
(what it has queued when it resumes is at most the quota) and RSS growth <= quota + 64 MiB."""

from __future__ import annotations

import time

from bench.attacks.common import (
    MIB,
    AttackResult,
    SourcedClient,
    User,
    attack_broker,
    mib,
)
from bench.attacks.measure import attack_run
from bench.attacks.partial_flood import ATTACKER_ADDR
from bench.attacks.probe import PROBE_USER
from bench.attacks.sizes import AttackSizes
from bench.harness import BenchError
from bench.report import Console
from tether.protocol import Error, Ok, Publish, Register, Registered, Subscribe

HOARDER = User("hoarder", "hoarder-password")
FEEDER = User("feeder", "feeder-password")
WINDOW = 8  # publishes in flight, each confirmed


def _registered(frame: object, who: str) -> Registered:
    if not isinstance(frame, Registered):
        raise BenchError(f"{who} could not register: {frame!r}")
    return frame


def run(sizes: AttackSizes, console: Console) -> AttackResult:
    topics = [f"hoard/{i}" for i in range(sizes.topics)]
    total = sizes.topics * sizes.topic_publishes
    payload = bytes(sizes.topic_payload)
    quota = sizes.session_quota_mib * MIB
    res = AttackResult(
        "big-topics",
        f"one away session, {sizes.topics} topics, {total} publishes of"
        f" {len(payload) / MIB:.2f} MiB (--session-queue-bytes {sizes.session_quota_mib} MiB)",
    )
    extra = ("--session-queue-bytes", str(quota))
    with attack_broker([PROBE_USER, HOARDER, FEEDER], *extra) as broker:
        with SourcedClient(broker.address, ATTACKER_ADDR) as h:
            reg = _registered(h.register("hoarder-1", HOARDER.name, HOARDER.password), "hoarder")
            reqs = [h.next_req() for _ in topics]
            h.send(*[Subscribe(req=q, topic=t) for q, t in zip(reqs, topics, strict=True)])
            answers = h.recv_many(len(topics), timeout=30)
            refused = [a for a in answers if not isinstance(a, Ok)]
        # Now away: everything published to its topics queues for it.
        rejected: dict[str, int] = {}
        with (
            attack_run(res, broker, settle=sizes.settle_s) as r,
            SourcedClient(broker.address, ATTACKER_ADDR, timeout=30) as f,
        ):
            _registered(f.register("feeder-1", FEEDER.name, FEEDER.password), "feeder")
            r.begin()
            deadline = time.monotonic() + 50
            sent = confirmed = 0
            while confirmed < total and time.monotonic() < deadline:
                batch: list[Publish] = []
                while sent < total and len(batch) < WINDOW:
                    batch.append(
                        Publish(topic=topics[sent % len(topics)], payload=payload, req=f.next_req())
                    )
                    sent += 1
                f.send(*batch)
                for frame in f.recv_many(len(batch), timeout=30):
                    if isinstance(frame, Error):
                        rejected[frame.code] = rejected.get(frame.code, 0) + 1
                    confirmed += 1
            r.end()
        # The session comes back: what did it keep?
        with SourcedClient(broker.address, ATTACKER_ADDR, timeout=30) as h:
            h.send(
                Register(
                    req=h.next_req(),
                    client_id="hoarder-1",
                    username=HOARDER.name,
                    session_id=reg.session_id,
                    resume_token=reg.resume_token,
                )
            )
            back = _registered(h.recv(), "hoarder (resume)")
    held = back.queued * len(payload)
    res.check(
        f"session quota {sizes.session_quota_mib} MiB holds",
        f"{back.queued} queued = {mib(held / 1024)}, {back.dropped} dropped",
        held <= quota,
    )
    growth = res.rss_peak_kib - res.rss_base_kib
    limit = quota // 1024 + 64 * 1024
    res.check(f"RSS growth <= quota + 64 MiB ({mib(limit)})", mib(growth), growth <= limit)
    res.figures.update(
        published=confirmed,
        refused_publishes=rejected,
        subscriptions_refused=len(refused),
        queued_at_resume=back.queued,
        dropped_at_resume=back.dropped,
        quota_bytes=quota,
    )
    if confirmed < total:
        res.problems.append(f"only {confirmed} of {total} publishes answered in time")
    return res
