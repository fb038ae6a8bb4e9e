"""Durable sessions (issue 10), in-process: a broker on a data directory, stopped and started
again on it (a restart is `Broker.stop()` then a new `Broker` on the same directory), and a
broker on test doubles of the store that hold or fail its commits.

What must survive a restart: sessions with their ids and tokens, subscriptions, seq counters,
queued messages with the `queued`/`dropped` counts, deliveries sent and not acked (sent again
with their seqs, flagged). What must never happen: an `ok` or a `deliver` before the commit it
rests on.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    Dial,
    assert_error,
    delivers,
    publish_confirmed,
    recv_acking,
    registered,
    resume_frame,
    subscribe,
    wait_connected,
)
from tests.wire import WireClient
from tether.broker.config import BrokerConfig
from tether.broker.server import Broker, StartupError, serve
from tether.broker.store import (
    Batch,
    OnDone,
    OnRead,
    Snapshot,
    StoreUnavailable,
)
from tether.broker.store_memory import MemoryStore
from tether.broker.store_sqlite import SqliteStore
from tether.broker.users import UserStore
from tether.protocol import (
    Ack,
    Deliver,
    Ok,
    Publish,
    Register,
    Registered,
    Subscribe,
    Unregister,
    Unsubscribe,
)

Restart = Callable[..., Broker]


@pytest.fixture
def durable(users_file: Path, tmp_path: Path) -> Iterator[Restart]:
    """Start a broker on one data directory; each call stops the previous one first."""
    running: list[Broker] = []

    def start(**overrides: Any) -> Broker:
        for broker in running:
            broker.stop()
        running.clear()
        config = replace(
            BrokerConfig(port=0, users_path=users_file, data_dir=tmp_path / "data"), **overrides
        )
        broker = Broker(config, users=UserStore.load(users_file))
        broker.start()
        running.append(broker)
        return broker

    yield start
    for broker in running:
        broker.stop()


def _register(
    dial: Dial, broker: Broker, client_id: str, topics: tuple[str, ...] = ()
) -> tuple[WireClient, Registered]:
    client = dial(broker)
    reg = registered(client.register(client_id))
    for topic in topics:
        subscribe(client, topic)
    return client, reg


def _resume(
    dial: Dial, broker: Broker, client_id: str, reg: Registered
) -> tuple[WireClient, Registered]:
    client = dial(broker)
    client.send(resume_frame(client.next_req(), client_id, reg))
    return client, registered(client.recv())


# --- restarts ---------------------------------------------------------------------------------


def test_session_survives_restart_with_its_id_token_and_subscription(
    durable: Restart, dial: Dial
) -> None:
    broker = durable()
    sub, reg = _register(dial, broker, "sub", ("t",))
    sub.close()
    broker = durable()
    assert broker.stats()["sessions"] == 1
    again, reg2 = _resume(dial, broker, "sub", reg)
    assert reg2.resumed is True
    assert reg2.session_id == reg.session_id
    assert reg2.queued == 0
    pub, _ = _register(dial, broker, "pub")
    publish_confirmed(pub, "t", [b"after"])
    d = again.recv()
    assert isinstance(d, Deliver)
    assert (d.seq, d.payload, d.redelivered) == (1, b"after", False)


def test_queued_messages_delivered_in_order_after_restart(durable: Restart, dial: Dial) -> None:
    broker = durable()
    sub, reg = _register(dial, broker, "sub", ("t", "u"))
    sub.close()
    pub, _ = _register(dial, broker, "pub")
    publish_confirmed(pub, "t", [b"m%d" % i for i in range(50)])
    publish_confirmed(pub, "u", [b"u1"])
    broker = durable()
    again, reg2 = _resume(dial, broker, "sub", reg)
    assert reg2.resumed is True
    assert reg2.queued == 51
    got: list[Deliver] = []
    while len(got) < 51:
        got.append(delivers([again.recv()])[0])
    t = [d for d in got if d.topic == "t"]
    assert [d.payload for d in t] == [b"m%d" % i for i in range(50)]
    assert [d.seq for d in t] == list(range(1, 51))
    assert not any(d.redelivered for d in got)


def test_unacked_redelivered_with_original_seqs_and_seq_continues(
    durable: Restart, dial: Dial
) -> None:
    broker = durable()
    sub, reg = _register(dial, broker, "sub", ("t",))
    pub, _ = _register(dial, broker, "pub")
    publish_confirmed(pub, "t", [b"a", b"b", b"c"])
    first = [delivers([sub.recv()])[0] for _ in range(3)]
    assert [d.seq for d in first] == [1, 2, 3]
    sub.send(Ack(topic="t", seq=1))
    assert sub.sync() == []
    broker = durable()  # the subscriber's connection dies with the broker
    again, reg2 = _resume(dial, broker, "sub", reg)
    assert reg2.queued == 2
    got = [delivers([again.recv()])[0] for _ in range(2)]
    assert [(d.seq, d.payload, d.redelivered) for d in got] == [(2, b"b", True), (3, b"c", True)]
    pub2, _ = _register(dial, broker, "pub2")
    publish_confirmed(pub2, "t", [b"d"])
    d = delivers([again.recv()])[0]
    assert (d.seq, d.payload, d.redelivered) == (4, b"d", False)


def test_seq_counter_of_an_unsubscribed_topic_continues(durable: Restart, dial: Dial) -> None:
    broker = durable()
    sub, reg = _register(dial, broker, "sub", ("t",))
    pub, _ = _register(dial, broker, "pub")
    publish_confirmed(pub, "t", [b"a", b"b"])
    got = [delivers([sub.recv()])[0] for _ in range(2)]
    sub.send(Ack(topic="t", seq=got[-1].seq))
    req = sub.next_req()
    sub.send(Unsubscribe(req=req, topic="t"))
    assert sub.recv() == Ok(req=req)
    broker = durable()
    again, _ = _resume(dial, broker, "sub", reg)
    subscribe(again, "t")
    pub2, _ = _register(dial, broker, "pub2")
    publish_confirmed(pub2, "t", [b"c"])
    d = delivers([again.recv()])[0]
    assert (d.seq, d.payload) == (3, b"c")


def test_the_previous_token_is_still_good_after_restart(durable: Restart, dial: Dial) -> None:
    broker = durable()
    first, reg = _register(dial, broker, "sub")
    first.close()
    broker = durable()
    # A resume whose `registered` was lost: the token it showed stays good.
    lost = dial(broker)
    lost.send(resume_frame(lost.next_req(), "sub", reg))
    registered(lost.recv())
    lost.close()
    broker = durable()
    _again, reg3 = _resume(dial, broker, "sub", reg)
    assert reg3.resumed is True


def test_session_expired_while_down_is_gone(durable: Restart, dial: Dial) -> None:
    broker = durable(session_expiry=1.0)
    sub, reg = _register(dial, broker, "sub", ("t",))
    sub.close()
    wait_connected(broker, 0)  # away: its deadline is written
    broker.stop()
    time.sleep(1.2)  # its deadline passes while the broker is down
    broker = durable(session_expiry=1.0)
    assert broker.stats()["sessions"] == 0
    again = dial(broker)
    req = again.next_req()
    again.send(resume_frame(req, "sub", reg))
    assert_error(again.recv(), "unknown_session", req)


def test_a_session_not_expired_gets_its_full_expiry_from_start(
    durable: Restart, dial: Dial
) -> None:
    broker = durable(session_expiry=1.5)
    sub, reg = _register(dial, broker, "sub", ("t",))
    sub.close()
    wait_connected(broker, 0)
    broker.stop()
    time.sleep(1.0)
    broker = durable(session_expiry=1.5)
    time.sleep(1.0)  # 2 s after it left, 1 s after the start: still there
    assert broker.stats()["sessions"] == 1
    _, reg2 = _resume(dial, broker, "sub", reg)
    assert reg2.resumed


def test_unregister_deletes_what_it_ends(durable: Restart, dial: Dial) -> None:
    broker = durable()
    sub, _reg = _register(dial, broker, "sub", ("t",))
    sub.send(Unregister(req=sub.next_req()))
    sub.frames_until_closed()
    broker = durable()
    assert broker.stats()["sessions"] == 0
    assert broker.stats()["queued"] == 0


def test_takeover_deletes_the_old_session(durable: Restart, dial: Dial) -> None:
    broker = durable()
    _old, reg = _register(dial, broker, "dev", ("t",))
    new = dial(broker)
    reg2 = registered(new.register("dev", takeover=True))
    broker = durable()
    assert broker.stats()["sessions"] == 1
    gone = dial(broker)
    req = gone.next_req()
    gone.send(resume_frame(req, "dev", reg))
    assert_error(gone.recv(), "unknown_session", req)
    _, reg3 = _resume(dial, broker, "dev", reg2)
    assert reg3.resumed


def test_dropped_counts_survive_restart(durable: Restart, dial: Dial) -> None:
    broker = durable(queue_limit=3)
    sub, reg = _register(dial, broker, "sub", ("t",))
    sub.close()
    pub, _ = _register(dial, broker, "pub")
    time.sleep(0.1)
    publish_confirmed(pub, "t", [b"%d" % i for i in range(5)])
    broker = durable(queue_limit=3)
    again, reg2 = _resume(dial, broker, "sub", reg)
    assert (reg2.queued, reg2.dropped) == (3, 2)
    got = recv_acking(again, 3)  # the delivery window is 1 here
    assert [d.payload for d in got] == [b"2", b"3", b"4"]
    assert [d.seq for d in got] == [3, 4, 5]


def test_stop_reports_what_was_saved(durable: Restart, dial: Dial) -> None:
    broker = durable()
    sub, _ = _register(dial, broker, "sub", ("t",))
    sub.close()
    pub, _ = _register(dial, broker, "pub")
    publish_confirmed(pub, "t", [b"a", b"b"])
    broker.stop()
    assert broker.saved == (2, 2)


# --- commits before promises ---------------------------------------------------------------------


class HeldStore(MemoryStore):
    """A MemoryStore whose commits wait until `release()`: `on_done` is held back, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self.holding.set()
        self.lock = threading.Lock()
        self.held: list[tuple[OnDone, Any]] = []
        self.fail: BaseException | None = None

    def submit(self, batch: Batch, on_done: OnDone) -> None:
        if self.fail is not None:
            on_done(StoreUnavailable(self.fail))
            return
        results: list[Any] = []
        super().submit(batch, results.append)
        with self.lock:
            if self.holding.is_set():
                self.held.append((on_done, results[0]))
                return
        on_done(results[0])

    def release(self) -> None:
        with self.lock:
            self.holding.clear()
            held, self.held = self.held, []
        for on_done, result in held:
            on_done(result)

    def read_queue(
        self, session_id: str, topic: str, after_seq: int, limit: int, on_done: OnRead
    ) -> None:
        super().read_queue(session_id, topic, after_seq, limit, on_done)


@pytest.fixture
def on_store(users_file: Path) -> Iterator[Callable[[Any], Broker]]:
    """A broker wired to the given store double."""
    started: list[Broker] = []

    def start(store: Any) -> Broker:
        config = BrokerConfig(port=0, users_path=users_file, data_dir=None)
        broker = Broker(config, users=UserStore.load(users_file), store=store)
        broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


def test_no_ok_and_no_deliver_before_the_commit(
    on_store: Callable[[Any], Broker], dial: Dial
) -> None:
    store = HeldStore()
    store.release()  # registrations and subscriptions go through
    broker = on_store(store)
    sub, _ = _register(dial, broker, "sub", ("t",))
    pub, _ = _register(dial, broker, "pub")
    store.holding.set()
    req = pub.next_req()
    pub.send(Publish(topic="t", payload=b"x", req=req))
    time.sleep(0.2)
    assert store.held, "the publish's batch should be waiting for its commit"
    pub.sock.settimeout(0.2)
    sub.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        pub.recv(0.2)
    with pytest.raises(TimeoutError):
        sub.recv(0.2)
    store.release()
    assert pub.recv() == Ok(req=req)
    d = delivers([sub.recv()])[0]
    assert (d.seq, d.payload) == (1, b"x")


def test_registered_waits_for_the_session_to_be_stored(
    on_store: Callable[[Any], Broker], dial: Dial
) -> None:
    store = HeldStore()
    broker = on_store(store)
    client = dial(broker)
    client.send(Register(req=1, client_id="c", username="alice", password="secret"))
    deadline = time.monotonic() + 5
    while not store.held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.held
    with pytest.raises(TimeoutError):
        client.recv(0.2)
    store.release()
    registered(client.recv())


def test_failing_store_answers_unavailable_and_recovers(
    on_store: Callable[[Any], Broker], dial: Dial
) -> None:
    store = HeldStore()
    store.release()
    broker = on_store(store)
    sub, _ = _register(dial, broker, "sub", ("t",))
    other, _ = _register(dial, broker, "other", ("quiet",))
    pub, _ = _register(dial, broker, "pub")
    store.fail = OSError(28, "No space left on device")
    req = pub.next_req()
    pub.send(Publish(topic="t", payload=b"lost", req=req))
    assert_error(pub.recv(), "unavailable", req)
    # Others are served meanwhile: what needs no write is answered.
    assert other.sync() == []
    req = sub.next_req()
    sub.send(Subscribe(req=req, topic="new"))
    assert_error(sub.recv(), "unavailable", req)
    late = dial(broker)
    late.send(Register(req=1, client_id="late", username="alice", password="secret"))
    assert_error(late.recv(), "unavailable", 1)
    store.fail = None
    registered(late.register("late"))  # the same connection, once the store is back
    req = pub.next_req()
    pub.send(Publish(topic="t", payload=b"kept", req=req))
    assert pub.recv() == Ok(req=req)
    d = delivers([sub.recv()])[0]
    assert d.payload == b"kept"
    assert sub.sync() == []  # nothing of the failed publish ever arrives
    snapshot: Snapshot = store.load()
    assert [s.queued for s in snapshot.subscriptions if s.topic == "t"] == [1]


# --- away queues live in the store ---------------------------------------------------------------


def test_a_long_away_queue_comes_back_in_order_across_pages(durable: Restart, dial: Dial) -> None:
    """2,500 messages for a session away: the broker keeps a head of them in memory and reads
    the rest back a page at a time on resume, in order, before anything newer."""
    broker = durable()
    sub, reg = _register(dial, broker, "sub", ("t",))
    sub.close()
    wait_connected(broker, 0)
    pub, _ = _register(dial, broker, "pub")
    for start in range(0, 2_500, 500):
        publish_confirmed(pub, "t", [b"%d" % i for i in range(start, start + 500)])
    again, reg2 = _resume(dial, broker, "sub", reg)
    assert reg2.queued == 2_500
    publish_confirmed(pub, "t", [b"live"])
    got = recv_acking(again, 2_501)
    assert [d.payload for d in got] == [b"%d" % i for i in range(2_500)] + [b"live"]
    assert [d.seq for d in got] == list(range(1, 2_502))


def test_a_long_queue_survives_a_restart_and_overflow_drops_its_oldest(
    durable: Restart, dial: Dial
) -> None:
    broker = durable(queue_limit=1_500)
    sub, reg = _register(dial, broker, "sub", ("t",))
    sub.close()
    wait_connected(broker, 0)
    pub, _ = _register(dial, broker, "pub")
    for start in range(0, 2_000, 500):
        publish_confirmed(pub, "t", [b"%d" % i for i in range(start, start + 500)])
    broker = durable(queue_limit=1_500)
    assert broker.stats()["queued"] == 1_500
    pub, _ = _register(dial, broker, "pub2")
    publish_confirmed(pub, "t", [b"%d" % i for i in range(2_000, 2_100)])
    again, reg2 = _resume(dial, broker, "sub", reg)
    assert (reg2.queued, reg2.dropped) == (1_500, 600)
    got = recv_acking(again, 1_500)
    assert [d.payload for d in got] == [b"%d" % i for i in range(600, 2_100)]
    assert [d.seq for d in got] == list(range(601, 2_101))


# --- start-up errors -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _signals_restored() -> Iterator[None]:
    """`serve` installs its signal handlers: put the test process's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_second_broker_on_the_same_directory_is_refused(
    durable: Restart, users_file: Path, tmp_path: Path
) -> None:
    durable()
    config = BrokerConfig(port=0, users_path=users_file, data_dir=tmp_path / "data")
    with pytest.raises(StartupError, match=f"in use by process {os.getpid()}"):
        serve(config)


def test_a_newer_store_is_refused_naming_the_versions(users_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    SqliteStore(data).close()
    with sqlite3.connect(data / "tether.db") as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    config = BrokerConfig(port=0, users_path=users_file, data_dir=data)
    with pytest.raises(StartupError, match="version 99 is newer") as info:
        serve(config)
    assert "\n" not in str(info.value)


def test_a_corrupt_store_is_refused_and_left_as_it_was(users_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    garbage = b"not a database" * 100
    (data / "tether.db").write_bytes(garbage)
    config = BrokerConfig(port=0, users_path=users_file, data_dir=data)
    with pytest.raises(StartupError, match=r"tether\.db is corrupt"):
        serve(config)
    assert (data / "tether.db").read_bytes() == garbage


def test_the_client_library_retries_a_publish_answered_unavailable(
    on_store: Callable[[Any], Broker],
) -> None:
    """The protocol asks clients to retry `unavailable` after their backoff: a confirmed
    publish made while the store fails returns once the store is back, and arrives once."""
    from tests.test_client_chaos import FAST
    from tether.client import Client

    class FailingStore(HeldStore):
        def __init__(self) -> None:
            super().__init__()
            self.refused = threading.Event()

        def submit(self, batch: Batch, on_done: OnDone) -> None:
            if self.fail is not None:
                self.refused.set()
            super().submit(batch, on_done)

    store = FailingStore()
    store.release()
    broker = on_store(store)
    assert broker.address is not None
    options: dict[str, Any] = {
        "username": "alice", "password": "secret", "port": broker.address[1], **FAST
    }  # fmt: skip
    got: list[bytes] = []
    with Client(client_id="sub", **options) as sub, Client(client_id="pub", **options) as pub:
        sub.subscribe("t", lambda m: got.append(m.payload))
        store.refused.clear()
        store.fail = OSError(28, "No space left on device")
        done = threading.Event()
        errors: list[BaseException] = []

        def publish() -> None:
            try:
                pub.publish("t", b"kept", confirm=True)
            except BaseException as exc:
                errors.append(exc)
            done.set()

        threading.Thread(target=publish, daemon=True).start()
        assert store.refused.wait(10)  # answered `unavailable` at least once
        assert not done.wait(0.3)  # and still waiting: retried, not failed
        store.fail = None
        assert done.wait(10) and errors == []
        deadline = time.monotonic() + 10
        while got != [b"kept"] and time.monotonic() < deadline:
            time.sleep(0.01)
    assert got == [b"kept"]
