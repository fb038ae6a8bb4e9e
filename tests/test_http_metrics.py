"""GET /metrics against a real in-process broker, parsed with prometheus_client's own parser, and
checked to move when traffic moves; the store's hooks behind two of them (commit durations, and
`failing` for /health); the event loop lag probe."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import publish_confirmed, recv_acking, resume_frame, subscribe
from tests.http_helpers import HttpBroker, start_http_broker, web
from tests.store_helpers import ok, session, submit
from tests.test_store_faults import FailingCommits
from tests.wire import WireClient, wait_for
from tether.broker.metrics import LoopLagProbe
from tether.broker.store import Append, PutSession, StoreUnavailable, Subscribe
from tether.broker.store_sqlite import SqliteStore
from tether.protocol import Error, Registered

__all__ = ["start_http_broker", "web"]  # fixtures, imported for pytest

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(web: HttpBroker) -> Samples:
    reply = web.api.get("/metrics", token=None)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def families(web: HttpBroker) -> dict[str, str]:
    reply = web.api.get("/metrics", token=None)
    return {f.name: f.type for f in text_string_to_metric_families(reply.body.decode())}


def dial(web: HttpBroker, made: list[WireClient]) -> WireClient:
    assert web.broker.address is not None
    client = WireClient(web.broker.address)
    made.append(client)
    return client


def test_every_required_metric_is_there_with_its_type(web: HttpBroker) -> None:
    found = families(web)
    required = {
        "tether_connections_open": "gauge",
        "tether_sessions": "gauge",
        "tether_registrations": "counter",
        "tether_password_checks": "counter",
        "tether_password_check_duration_seconds": "histogram",
        "tether_messages_published": "counter",
        "tether_messages_delivered": "counter",
        "tether_messages_redelivered": "counter",
        "tether_messages_acked": "counter",
        "tether_messages_dropped": "counter",
        "tether_queued_messages": "gauge",
        "tether_queued_bytes": "gauge",
        "tether_event_loop_lag_seconds": "histogram",
        "tether_event_loop_lag_last_seconds": "gauge",
    }
    for name, kind in required.items():
        assert found.get(name) == kind, name
    assert "process_cpu_seconds" in found or "process_cpu_seconds_total" in found
    # In memory: no store, so no commit histogram.
    assert "tether_store_commit_duration_seconds" not in found
    assert all(n.startswith(("tether_", "process_")) for n in found)


def test_registrations_by_outcome_and_password_checks_move(web: HttpBroker) -> None:
    made: list[WireClient] = []
    try:
        before = scrape(web)
        first = dial(web, made)
        reg = first.register("dev")
        assert isinstance(reg, Registered)
        assert isinstance(dial(web, made).register("dev", password="wrong"), Error)
        assert isinstance(dial(web, made).register("dev"), Error)  # online: conflict
        first.close()
        resumer = dial(web, made)
        resumer.send(resume_frame(resumer.next_req(), "dev", reg))
        assert isinstance(resumer.recv(), Registered)
        assert isinstance(dial(web, made).register("dev", takeover=True), Registered)

        after = scrape(web)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        for outcome in ("new", "auth_failed", "conflict", "resumed", "taken_over"):
            assert moved("tether_registrations_total", outcome=outcome) == 1, outcome
        assert moved("tether_registrations_total", outcome="rate_limited") == 0
        # Fresh registers are checked; a resume is not.
        assert moved("tether_password_checks_total") == 4
        assert moved("tether_password_check_duration_seconds_count") == 4
        assert value(after, "tether_sessions", state="online") == 1
        assert value(after, "tether_connections_open") >= 1
    finally:
        for client in made:
            client.close()


def test_publishes_deliveries_acks_and_queues_move(web: HttpBroker) -> None:
    made: list[WireClient] = []
    try:
        sub = dial(web, made)
        assert isinstance(sub.register("sub"), Registered)
        subscribe(sub, "t")
        pub = dial(web, made)
        assert isinstance(pub.register("pub"), Registered)
        before = scrape(web)
        publish_confirmed(pub, "t", [b"a", b"bb", b"ccc"])
        recv_acking(sub, 3)
        sub.sync()  # the acks were handled
        after = scrape(web)
        for name in (
            "tether_messages_published_total",
            "tether_messages_delivered_total",
            "tether_messages_acked_total",
        ):
            assert value(after, name) - value(before, name) == 3, name
        assert value(after, "tether_queued_messages") == 0
        assert value(after, "tether_subscriptions") == 1
        sub.close()
        wait_for(lambda: value(scrape(web), "tether_sessions", state="away") == 1)
        publish_confirmed(pub, "t", [b"held"])
        queued = scrape(web)
        assert value(queued, "tether_queued_messages") == 1
        assert value(queued, "tether_queued_bytes") == len(b"held")
    finally:
        for client in made:
            client.close()


def test_the_loop_lag_is_probed(web: HttpBroker) -> None:
    wait_for(lambda: value(scrape(web), "tether_event_loop_lag_seconds_count") >= 2, timeout=10)


def test_a_durable_broker_times_its_commits(
    start_http_broker: Callable[..., HttpBroker], tmp_path: Path
) -> None:
    web = start_http_broker(data_dir=tmp_path / "data")
    made: list[WireClient] = []
    try:
        before = value(scrape(web), "tether_store_commit_duration_seconds_count")
        client = dial(web, made)
        assert isinstance(client.register("durable"), Registered)
        subscribe(client, "t")
        after = scrape(web)
        assert value(after, "tether_store_commit_duration_seconds_count") > before
        assert value(after, "tether_store_failing") == 0
    finally:
        for client in made:
            client.close()


def test_two_brokers_in_one_process_keep_their_own_figures(
    start_http_broker: Callable[..., HttpBroker],
) -> None:
    one, two = start_http_broker(), start_http_broker()
    made: list[WireClient] = []
    try:
        assert isinstance(dial(one, made).register("only-on-one"), Registered)
        assert value(scrape(one), "tether_registrations_total", outcome="new") == 1
        assert value(scrape(two), "tether_registrations_total", outcome="new") == 0
    finally:
        for client in made:
            client.close()


# --- the store's hooks ----------------------------------------------------------------------------


def test_sqlite_failing_is_set_by_a_failed_commit_and_cleared_by_a_good_one(
    tmp_path: Path,
) -> None:
    def connect_failing(path: str) -> sqlite3.Connection:
        return sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, factory=FailingCommits
        )

    timed: list[float] = []
    with SqliteStore(tmp_path / "data", connect=connect_failing, on_commit=timed.append) as store:
        assert store.failing is None
        ok(store, PutSession(session()), Subscribe("s1", "t"))
        assert len(timed) == 1 and timed[0] >= 0
        FailingCommits.failing.set()
        try:
            assert isinstance(submit(store, Append("s1", "t", 1, (b"x",))), StoreUnavailable)
        finally:
            FailingCommits.failing.clear()
        assert store.failing is not None and "disk I/O error" in store.failing
        assert len(timed) == 1  # a failed commit is not timed
        ok(store, Append("s1", "t", 1, (b"x",)))
        assert store.failing is None and len(timed) == 2


def test_the_lag_probe_reports_how_late_its_timer_fired() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    reports: list[float] = []
    got = threading.Event()

    def report(lag: float) -> None:
        reports.append(lag)
        if len(reports) == 2:
            got.set()

    probe = LoopLagProbe(loop, report, interval=0.01)
    try:
        probe.start()
        # Armed first (call_soon order), then the loop is blocked for 0.2 s: the timer due
        # 0.01 s after arming fired at least 0.19 s late.
        blocked: Any = asyncio.run_coroutine_threadsafe(_block(0.2), loop)
        blocked.result(5)
        assert got.wait(5)
        assert reports[0] >= 0.15
    finally:
        probe.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def _block(seconds: float) -> None:
    time.sleep(seconds)  # blocks the loop on purpose


def test_redeliveries_and_drops_move(start_http_broker: Callable[..., HttpBroker]) -> None:
    web = start_http_broker(queue_limit=2)
    made: list[WireClient] = []

    def away() -> None:
        wait_for(lambda: value(scrape(web), "tether_sessions", state="away") == 1)

    def moved(name: str) -> float:
        return value(scrape(web), name) - value(before, name)

    try:
        sub = dial(web, made)
        reg = sub.register("sub")
        assert isinstance(reg, Registered)
        subscribe(sub, "t")
        pub = dial(web, made)
        assert isinstance(pub.register("pub"), Registered)
        before = scrape(web)
        publish_confirmed(pub, "t", [b"1"])
        assert len(sub.recv_many(1)) == 1  # delivered, never acked
        sub.close()
        away()
        back = dial(web, made)
        back.send(resume_frame(back.next_req(), "sub", reg))
        assert isinstance(back.recv(), Registered)
        recv_acking(back, 1)  # the same message again
        back.sync()
        assert moved("tether_messages_redelivered_total") == 1
        assert moved("tether_messages_dropped_total") == 0
        back.close()
        away()
        publish_confirmed(pub, "t", [b"2", b"3", b"4", b"5"])  # room for 2: the oldest go
        assert moved("tether_messages_dropped_total") == 2
    finally:
        for client in made:
            client.close()
