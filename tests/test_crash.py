"""Crash tests (issue 10): a real broker process (`python -m tether serve --data-dir DIR`)
killed with SIGKILL at random moments and restarted on the same data directory and port,
under publishers that confirm every message and subscribers both connected and away.

What must hold after every run:
- every publish whose `ok` the publisher read is delivered to every subscriber of its topic,
  at least once;
- in publish order per publisher (the first delivery of each message, counter by counter);
- a seq is never given to two messages, and a message a subscriber never saw comes with a seq
  above every seq that subscription was ever sent (else the client's dedup would eat it);
- a resume after a restart, with the session id and the newest resume token the client had,
  gets the same session back (`resumed: true`).

The kill schedule comes from a seed, printed at the start (pytest shows it with a failure):
`TETHER_CRASH_SEED=N` replays the same schedule (the threads' timing still varies).

Also here: a second broker on a data directory in use, a store newer than the broker, and a
corrupt store are each refused with one line and exit status 2.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.wire import Closed, WireClient
from tether.protocol import (
    NEED_DATA,
    Ack,
    Deliver,
    Error,
    Ok,
    Publish,
    Register,
    Registered,
    Subscribe,
)

KEEPALIVE = 3600  # no client here pings: the broker must not time them out
PAYLOAD = struct.Struct(">II")  # publisher, counter (from 1)
TOPICS = ("crash/a", "crash/b")
DB_NAME = "tether.db"  # broker/store_sqlite.py


def _seed() -> int:
    given = os.environ.get("TETHER_CRASH_SEED")
    seed = int(given) if given else random.randrange(2**32)
    print(f"crash test seed {seed} (replay: TETHER_CRASH_SEED={seed})")
    return seed


# --- the broker process ------------------------------------------------------------------------


class BrokerProcess:
    """`tether serve` on `data_dir`, restartable on the port it first got."""

    def __init__(self, users: Path, data_dir: Path, cwd: Path, *extra: str) -> None:
        self.users, self.data_dir, self.cwd, self.extra = users, data_dir, cwd, extra
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []  # every line of every run, for a failure's message
        self.reader: threading.Thread | None = None
        self.starts = 0

    def command(self, port: int) -> list[str]:
        return [
            *(sys.executable, "-m", "tether", "serve", "--port", str(port)),
            *("--users", str(self.users), "--data-dir", str(self.data_dir)),
            *("--log-format", "json", "--log-level", "info", *self.extra),
        ]

    def start(self, timeout: float = 20.0) -> int:
        """Start it and return its port once it listens."""
        proc = subprocess.Popen(
            self.command(self.port), cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.proc = proc
        self.starts += 1
        lines: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                self.log.append(line)
                lines.put(line)
            lines.put(None)

        self.reader = threading.Thread(target=drain, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"the broker did not listen in {timeout} s: {self.tail()}"
                ) from None
            if line is None:
                raise AssertionError(f"the broker exited ({proc.wait(5)}): {self.tail()}")
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "listening":
                self.port = int(event["port"])
                return self.port

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> tuple[int, float]:
        """SIGTERM; the exit status and how long the exit took."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        seconds = time.monotonic() - started
        if self.reader is not None:
            self.reader.join(5)  # every line of its log read
        return code, seconds

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines of every run so far."""
        found = []
        for line in self.log:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def tail(self, n: int = 8) -> str:
        return " | ".join(self.log[-n:]) or "(no output)"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def brokers() -> Iterator[list[BrokerProcess]]:
    started: list[BrokerProcess] = []
    yield started
    for broker in started:
        broker.close()


def _refusal(cmd: list[str], cwd: Path) -> str:
    """Run a `tether serve` that must refuse to start: its one line on stderr."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr)
    [line] = done.stderr.splitlines()  # one line, no traceback
    assert line.startswith("tether: error: "), line
    return line


# --- the clients -------------------------------------------------------------------------------


@dataclass
class World:
    """What the client threads share."""

    port: int
    seed: int
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop_publishing: threading.Event = field(default_factory=threading.Event)
    drain: threading.Event = field(default_factory=threading.Event)  # everyone connects, reads
    give_up: threading.Event = field(default_factory=threading.Event)
    resumes: int = 0
    confirmed_total: int = 0

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 20:
                self.problems.append(text)


class Party(threading.Thread):
    """One client session on the raw wire: it reconnects and resumes after every loss."""

    def __init__(self, world: World, client_id: str, username: str, password: str) -> None:
        super().__init__(name=client_id, daemon=True)
        self.world = world
        self.client_id, self.username, self.password = client_id, username, password
        self.session_id: str | None = None
        self.token: str | None = None
        self.client: WireClient | None = None
        self.failed = False
        self.registered = threading.Event()  # once it holds a session

    def connect(self) -> WireClient | None:
        """A registered connection (fresh the first time, a resume after), or None if the
        test gives up. Retries while the broker is down or dies under the registration."""
        while not self.world.give_up.is_set():
            try:
                client = WireClient(("127.0.0.1", self.world.port), timeout=5.0)
            except OSError:
                time.sleep(0.02)
                continue
            try:
                answer = self._register(client)
            except (Closed, OSError):
                client.close()
                time.sleep(0.02)
                continue
            if isinstance(answer, Registered):
                self.client = client
                self.registered.set()
                return client
            client.close()
            self.world.problem(f"{self.client_id}: register refused: {answer!r}")
            self.failed = True
            return None
        return None

    def _register(self, client: WireClient) -> Any:
        if self.session_id is None:
            # takeover: a first registration the broker stored but could not answer (killed)
            # would otherwise make this one a `conflict`.
            answer = client.register(
                self.client_id, self.username, self.password, keepalive=KEEPALIVE, takeover=True
            )
            if isinstance(answer, Registered):
                self.session_id, self.token = answer.session_id, answer.resume_token
            return answer
        shown = self.token
        client.send(
            Register(
                req=client.next_req(),
                client_id=self.client_id,
                username=self.username,
                session_id=self.session_id,
                resume_token=shown,
                keepalive=KEEPALIVE,
            )
        )
        answer = client.recv()
        if isinstance(answer, Registered):
            if not answer.resumed or answer.session_id != self.session_id:
                self.world.problem(
                    f"{self.client_id}: resume of {self.session_id} got session "
                    f"{answer.session_id} resumed={answer.resumed}"
                )
            self.token = answer.resume_token
            with self.world.lock:
                self.world.resumes += 1
        return answer

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class Publisher(Party):
    """Publishes counters 1, 2, ... to one topic, a few at a time, each with `req`; a counter
    is confirmed once its `ok` is read. Unconfirmed counters are never sent again."""

    WINDOW = 8

    def __init__(self, world: World, index: int, topic: str) -> None:
        super().__init__(world, f"crash-pub-{index}", "bob", "hunter2")
        self.index, self.topic = index, topic
        self.confirmed: list[int] = []
        self.next_counter = 1
        self.pad = bytes(24)

    def payload(self, counter: int) -> bytes:
        return PAYLOAD.pack(self.index, counter) + self.pad

    def run(self) -> None:
        while not self.world.stop_publishing.is_set() and not self.world.give_up.is_set():
            client = self.client or self.connect()
            if client is None:
                return
            window = range(self.next_counter, self.next_counter + self.WINDOW)
            self.next_counter += self.WINDOW
            try:
                client.send(
                    *(Publish(topic=self.topic, payload=self.payload(c), req=c) for c in window)
                )
                waiting = set(window)
                while waiting:
                    frame = client.recv()
                    if isinstance(frame, Ok) and frame.req in waiting:
                        waiting.discard(frame.req)
                        with self.world.lock:
                            self.confirmed.append(frame.req)
                            self.world.confirmed_total += 1
                    elif isinstance(frame, Error):
                        self.world.problem(f"{self.client_id}: {frame.code}: {frame.message}")
                        waiting.discard(frame.req or 0)
            except (Closed, OSError):
                self.disconnect()  # the broker died: resume, go on with new counters
                continue
            time.sleep(0.002)
        self.disconnect()


class Subscriber(Party):
    """Subscribed to both topics. `mode`: "connected" (stays, but for the kills), "away"
    (subscribes, leaves, and comes back only to drain) or "roaming" (leaves and comes back
    at random). Checks every delivery as it comes (see the module's docstring)."""

    def __init__(self, world: World, index: int, mode: str) -> None:
        super().__init__(world, f"crash-sub-{index}-{mode}", "alice", "secret")
        self.mode = mode
        self.rng = random.Random(world.seed * 1000 + index)
        self.ready = threading.Event()
        self.done = threading.Event()
        self.by_seq: dict[str, dict[int, bytes]] = {t: {} for t in TOPICS}
        self.top: dict[str, int] = dict.fromkeys(TOPICS, 0)  # the highest seq ever sent
        self.last_counter: dict[tuple[str, int], int] = {}
        self.got: dict[tuple[str, int], set[int]] = {}
        self.expected: dict[tuple[str, int], set[int]] | None = None  # set for the drain

    def run(self) -> None:
        client = self.connect()
        if client is None:
            self.ready.set()
            return
        try:
            client.send(*(Subscribe(req=100 + i, topic=t) for i, t in enumerate(TOPICS)))
            answers = [client.recv(), client.recv()]
        except (Closed, OSError) as exc:
            self.world.problem(f"{self.client_id}: subscribe: {exc!r}")
            self.failed = True
            self.ready.set()
            return
        if not all(isinstance(a, Ok) for a in answers):
            self.world.problem(f"{self.client_id}: subscribe refused: {answers!r}")
            self.failed = True
        if self.mode == "away":
            self.disconnect()
        self.ready.set()
        while not self.world.give_up.is_set() and not self.complete():
            if self.mode == "away" and not self.world.drain.is_set():
                time.sleep(0.05)
                continue
            if (
                self.mode == "roaming"
                and not self.world.drain.is_set()
                and self.client is not None
                and self.rng.random() < 0.02
            ):
                self.disconnect()
                time.sleep(self.rng.uniform(0.05, 0.6))
                continue
            client = self.client or self.connect()
            if client is None:
                return
            try:
                self.read(client)
            except (Closed, OSError):
                self.disconnect()
        self.done.set()
        self.disconnect()

    def read(self, client: WireClient) -> None:
        """One read's frames, checked, then one cumulative ack per topic that moved."""
        try:
            first = client.recv(timeout=0.1)
        except TimeoutError:
            return
        frames: list[object] = [first]
        while (more := client.decoder.next_frame()) is not NEED_DATA:
            frames.append(more)  # the rest of this read
        moved = set()
        for frame in frames:
            if isinstance(frame, Deliver):
                self.check(frame)
                moved.add(frame.topic)
            elif isinstance(frame, Error):
                self.world.problem(f"{self.client_id}: error {frame.code}: {frame.message}")
            # `dropped` cannot happen here (queues far from full); it would show as a loss.
        if moved:
            client.send(*(Ack(topic=t, seq=self.top[t]) for t in sorted(moved)))

    def check(self, frame: Deliver) -> None:
        topic, seq, payload = frame.topic, frame.seq, frame.payload
        seen = self.by_seq[topic].get(seq)
        if seen is not None:
            if seen != payload:
                self.world.problem(
                    f"{self.client_id}: seq {seq} of {topic} given to two messages "
                    f"({PAYLOAD.unpack_from(seen)} and {PAYLOAD.unpack_from(payload)})"
                )
            return  # a redelivery (flagged, or its `sent` mark was lost in the crash)
        if seq <= self.top[topic]:
            self.world.problem(
                f"{self.client_id}: a new message with seq {seq} of {topic}, at or below "
                f"{self.top[topic]} already sent: seq went backwards"
            )
        self.top[topic] = max(self.top[topic], seq)
        self.by_seq[topic][seq] = payload
        pub, counter = PAYLOAD.unpack_from(payload)
        key = (topic, pub)
        last = self.last_counter.get(key, 0)
        if counter <= last:
            self.world.problem(
                f"{self.client_id}: publisher {pub} message {counter} after {last} on {topic}"
            )
        self.last_counter[key] = max(last, counter)
        self.got.setdefault(key, set()).add(counter)

    def complete(self) -> bool:
        expected = self.expected
        if expected is None:
            return False
        return all(want <= self.got.get(key, set()) for key, want in expected.items())

    def missing(self) -> dict[tuple[str, int], list[int]]:
        assert self.expected is not None
        out = {}
        for key, want in self.expected.items():
            lost = sorted(want - self.got.get(key, set()))
            if lost:
                out[key] = lost[:10]
        return out


def _kill_and_restart_run(
    users: Path, tmp_path: Path, brokers: list[BrokerProcess], *, sync: str, kills: int
) -> None:
    seed = _seed()
    rng = random.Random(seed)
    broker = BrokerProcess(
        users, tmp_path / "data", tmp_path, "--sync", sync, "--queue-limit", "100000"
    )
    brokers.append(broker)
    port = broker.start()
    world = World(port=port, seed=seed)
    modes = ["connected", "connected", "away", "away", "roaming", "roaming"]
    subscribers = [Subscriber(world, i, mode) for i, mode in enumerate(modes)]
    publishers = [Publisher(world, j, TOPICS[j % 2]) for j in range(3)]
    try:
        for sub in subscribers:
            sub.start()
        for sub in subscribers:
            assert sub.ready.wait(20), f"{sub.client_id} did not subscribe"
        assert not world.problems, world.problems
        for pub in publishers:
            pub.start()
        for pub in publishers:
            assert pub.registered.wait(20), f"{pub.client_id} did not register"
        for k in range(kills):
            # Kill only once something was confirmed since the last start: every kill then
            # lands among publishes, deliveries, acks and resumes in flight.
            before = world.confirmed_total
            deadline = time.monotonic() + 20
            while world.confirmed_total == before:
                assert not world.problems, f"seed {seed}, restart {k}: {world.problems}"
                assert time.monotonic() < deadline, (
                    f"seed {seed}: nothing confirmed after restart {k}: {broker.tail()}"
                )
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.6))
            broker.kill()
            time.sleep(rng.uniform(0.0, 0.2))
            assert broker.start() == port
        time.sleep(rng.uniform(0.2, 0.6))
        world.stop_publishing.set()
        for pub in publishers:
            pub.join(30)
            assert not pub.is_alive(), f"seed {seed}: {pub.client_id} did not stop"
        expected: dict[tuple[str, int], set[int]] = {
            (pub.topic, pub.index): set(pub.confirmed) for pub in publishers
        }
        for sub in subscribers:
            sub.expected = expected
        world.drain.set()
        # One more kill while the away subscribers read their queues back.
        time.sleep(rng.uniform(0.0, 0.3))
        broker.kill()
        assert broker.start() == port
        deadline = time.monotonic() + 60
        for sub in subscribers:
            sub.done.wait(max(0.1, deadline - time.monotonic()))
        unfinished = {s.client_id: s.missing() for s in subscribers if not s.done.is_set()}
    finally:
        world.give_up.set()
        world.stop_publishing.set()
    confirmed = sum(len(w) for w in expected.values())
    print(f"{kills + 1} kills, {confirmed} publishes confirmed, {world.resumes} resumes")
    assert not world.problems, f"seed {seed}: {world.problems}"
    assert not unfinished, f"seed {seed}: confirmed messages never delivered: {unfinished}"
    assert confirmed >= kills, f"seed {seed}: only {confirmed} publishes were confirmed"
    # Every kill made the connected parties resume (each resume was checked as it came).
    assert world.resumes >= kills, f"seed {seed}: only {world.resumes} resumes"
    code, seconds = broker.stop()
    assert code == 0 and seconds <= 5, (code, seconds, broker.tail())


@pytest.mark.parametrize(("sync", "kills"), [("full", 5), ("normal", 4)])  # and one in the drain
def test_sigkill_at_random_moments_loses_nothing_confirmed(
    users_file: Path, tmp_path: Path, brokers: list[BrokerProcess], sync: str, kills: int
) -> None:
    """A process crash loses nothing confirmed with either --sync: `normal` gives up only
    what a power loss would take (not tested here)."""
    _kill_and_restart_run(users_file, tmp_path, brokers, sync=sync, kills=kills)


# --- one restart, step by step -----------------------------------------------------------------


def _subscribed(port: int, client_id: str, topic: str) -> tuple[WireClient, Registered]:
    client = WireClient(("127.0.0.1", port))
    registered = client.register(client_id, keepalive=KEEPALIVE)
    assert isinstance(registered, Registered), registered
    client.send(Subscribe(req=50, topic=topic))
    assert client.recv() == Ok(req=50)
    return client, registered


def _resume(port: int, client_id: str, registered: Registered) -> tuple[WireClient, Registered]:
    client = WireClient(("127.0.0.1", port))
    client.send(
        Register(
            req=1,
            client_id=client_id,
            username="alice",
            session_id=registered.session_id,
            resume_token=registered.resume_token,
            keepalive=KEEPALIVE,
        )
    )
    again = client.recv()
    assert isinstance(again, Registered), again
    assert again.resumed and again.session_id == registered.session_id
    return client, again


def _publish_confirmed(port: int, topic: str, payloads: list[bytes]) -> None:
    with WireClient(("127.0.0.1", port)) as pub:
        assert isinstance(pub.register("step-pub", "bob", "hunter2", takeover=True), Registered)
        pub.send(*(Publish(topic=topic, payload=p, req=i) for i, p in enumerate(payloads, 1)))
        assert pub.recv_many(len(payloads)) == [Ok(req=i) for i in range(1, len(payloads) + 1)]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_restart_keeps_sessions_queues_and_seqs(
    users_file: Path, tmp_path: Path, brokers: list[BrokerProcess], how: str
) -> None:
    """The issue's report, on the wire: an away subscriber and a connected one that was sent
    messages it did not ack; the broker stops (`kill -9`, or SIGTERM); after the restart both
    resume with the ids and tokens they had, `queued` counts as if nothing happened, what was
    sent and not acked comes again with its original seq, then the rest, and seqs go on."""
    broker = BrokerProcess(users_file, tmp_path / "data", tmp_path)
    brokers.append(broker)
    port = broker.start()
    away, away_reg = _subscribed(port, "step-away", "jobs")
    away.close()
    here, here_reg = _subscribed(port, "step-here", "jobs")
    _publish_confirmed(port, "jobs", [b"one", b"two"])
    sent = [here.recv(), here.recv()]  # not acked
    assert [(f.seq, f.payload) for f in sent if isinstance(f, Deliver)] == [
        (1, b"one"),
        (2, b"two"),
    ]
    here.close()
    if how == "SIGKILL":
        broker.kill()
    else:
        code, seconds = broker.stop()
        assert code == 0 and seconds <= 5, (code, seconds, broker.tail())
        # The log says what was saved: 3 sessions (the publisher's too), 2 + 2 messages.
        [stopped] = [e for e in broker.events() if e.get("event") == "broker_stopped"]
        assert (stopped.get("sessions_saved"), stopped.get("messages_saved")) == (3, 4), stopped
    assert broker.start() == port
    away, again = _resume(port, "step-away", away_reg)
    assert (again.queued, again.dropped) == (2, 0)
    got = away.recv_many(2)
    assert [(f.seq, f.payload, f.redelivered) for f in got if isinstance(f, Deliver)] == [
        (1, b"one", False),
        (2, b"two", False),
    ]
    here, again = _resume(port, "step-here", here_reg)
    assert (again.queued, again.dropped) == (2, 0)
    got = here.recv_many(2)
    assert [(f.seq, f.payload) for f in got if isinstance(f, Deliver)] == [(1, b"one"), (2, b"two")]
    if how == "SIGTERM":  # a clean stop saved that both were sent
        assert all(isinstance(f, Deliver) and f.redelivered for f in got), got
    here.send(Ack(topic="jobs", seq=2))
    away.send(Ack(topic="jobs", seq=2))
    _publish_confirmed(port, "jobs", [b"three"])
    for client in (away, here):
        [frame] = client.recv_many(1)
        assert isinstance(frame, Deliver) and (frame.seq, frame.payload) == (3, b"three")
        client.close()


# --- refusals at start-up ----------------------------------------------------------------------


def test_a_second_broker_on_the_same_data_directory_refuses_to_start(
    users_file: Path, tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    first = BrokerProcess(users_file, tmp_path / "data", tmp_path)
    brokers.append(first)
    first.start()
    assert first.proc is not None
    with socket.socket() as s:  # any free port: the lock must refuse before the port matters
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = _refusal(first.command(port), tmp_path)
    assert str(first.proc.pid) in line and str(tmp_path / "data") in line, line
    assert first.proc.poll() is None  # the first one is not disturbed


def test_a_store_newer_than_the_broker_is_refused(
    users_file: Path, tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    broker = BrokerProcess(users_file, tmp_path / "data", tmp_path)
    brokers.append(broker)
    broker.start()
    assert broker.stop()[0] == 0
    newer = tmp_path / "newer"
    shutil.copytree(tmp_path / "data", newer)
    db = sqlite3.connect(newer / DB_NAME)
    db.execute("PRAGMA user_version = 999")
    db.commit()
    db.close()
    before = (newer / DB_NAME).read_bytes()
    line = _refusal(BrokerProcess(users_file, newer, tmp_path).command(0), tmp_path)
    assert "999" in line, line
    assert (newer / DB_NAME).read_bytes() == before


def test_a_corrupt_store_is_refused_and_left_as_it_was(users_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    garbage = random.Random(10).randbytes(64 * 1024)
    (data / DB_NAME).write_bytes(garbage)
    line = _refusal(BrokerProcess(users_file, data, tmp_path).command(0), tmp_path)
    assert DB_NAME in line, line
    assert (data / DB_NAME).read_bytes() == garbage
    assert not (data / f"{DB_NAME}-wal").exists()
