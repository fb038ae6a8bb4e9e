"""The SQLite store when things go wrong: a full disk, a failing commit, a deleted file, a
callback that raises, and a process killed (SIGKILL) at random moments while it commits."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.store_helpers import WAIT, ok, read_all, session, submit
from tether.broker.store import (
    Append,
    PutSession,
    StoreError,
    StoreUnavailable,
    Subscribe,
)
from tether.broker.store_schema import connect
from tether.broker.store_sqlite import DB_NAME, SqliteStore

ROOT = Path(__file__).resolve().parent.parent


class Connections:
    """A `connect` for the store that keeps what it made: the writer's connection is first."""

    def __init__(self) -> None:
        self.made: list[sqlite3.Connection] = []

    def __call__(self, path: str) -> sqlite3.Connection:
        conn = connect(path)
        self.made.append(conn)
        return conn

    @property
    def writer(self) -> sqlite3.Connection:
        return self.made[0]


@pytest.fixture
def connections() -> Connections:
    return Connections()


@pytest.fixture
def store(tmp_path: Path, connections: Connections) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "data", connect=connections)
    ok(store, PutSession(session()), Subscribe("s1", "t"), Subscribe("s1", "u"))
    yield store
    store.close()


def big(n: int) -> tuple[bytes, ...]:
    return tuple(os.urandom(200) for _ in range(n))


def faults(
    logs: list[MutableMapping[str, Any]], event: str = "store_fault"
) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


def test_a_full_disk_fails_the_batch_and_the_store_recovers(
    store: SqliteStore, connections: Connections
) -> None:
    ok(store, Append("s1", "t", 1, big(3)))
    writer = connections.writer
    # The writer is idle (every batch answered): cap the file at its present size, as a full
    # disk would. SQLite keeps the limit per connection, so this is the writer's.
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages}")
    with capture_logs() as logs:
        errors = [submit(store, Append("s1", "t", 4 + 50 * i, big(50))) for i in range(3)]
        for error in errors:
            assert isinstance(error, StoreUnavailable), error
            assert isinstance(error.cause, sqlite3.OperationalError)
        # Other work that needs no room still goes through (updates in place).
        writer.execute("PRAGMA max_page_count = 1073741823")
        ok(store, Append("s1", "t", 4, big(50)))
    (fault,) = faults(logs)  # once, not once per batch
    assert fault["kind"] == "SQLITE_FULL" and fault["log_level"] == "error"
    assert len(faults(logs, "store_recovered")) == 1
    assert [seq for seq, _ in read_all(store, "s1", "t")] == list(range(1, 54))


class FailingCommits(sqlite3.Connection):
    """A connection whose COMMIT fails while `failing` is set, like an I/O error would."""

    failing = threading.Event()

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.failing.is_set():
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return super().execute(sql, *args)


def test_a_failing_commit_fails_its_whole_group_and_rolls_back(tmp_path: Path) -> None:
    def connect_failing(path: str) -> sqlite3.Connection:
        return sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, factory=FailingCommits
        )

    with SqliteStore(tmp_path / "data", connect=connect_failing) as store:
        ok(store, PutSession(session()), Subscribe("s1", "t"))
        FailingCommits.failing.set()
        try:
            with capture_logs() as logs:
                errors = [submit(store, Append("s1", "t", 1, (b"lost",))) for _ in range(2)]
        finally:
            FailingCommits.failing.clear()
        assert all(isinstance(e, StoreUnavailable) for e in errors)
        assert len(faults(logs)) == 1
        assert read_all(store, "s1", "t") == ()
        # Rolled back: the same seqs are free again, and the store carries on.
        ok(store, Append("s1", "t", 1, (b"kept",)))
        assert read_all(store, "s1", "t") == ((1, b"kept"),)


def test_a_deleted_file_is_a_fault_not_a_silent_loss(store: SqliteStore, tmp_path: Path) -> None:
    os.unlink(tmp_path / "data" / DB_NAME)
    with capture_logs() as logs:
        errors = [submit(store, Append("s1", "t", 1, (b"x",))) for _ in range(2)]
    assert all(isinstance(e, StoreUnavailable) for e in errors)
    (fault,) = faults(logs)
    assert "deleted or replaced" in fault["cause"]


def test_a_callback_that_raises_does_not_stop_the_writer(store: SqliteStore) -> None:
    def bad(error: StoreError | None) -> None:
        raise RuntimeError("caller bug")

    with capture_logs() as logs:
        store.submit((Append("s1", "t", 1, (b"a",)),), bad)
        ok(store, Append("s1", "t", 2, (b"b",)))
    assert faults(logs, "store_callback_failed")
    assert len(read_all(store, "s1", "t")) == 2


# --- crashes --------------------------------------------------------------------------------

# Commits batches of 5 messages for as long as it lives, printing the last seq of each batch
# once its on_done has said it is committed: what a broker would have answered `ok` for.
WRITER = """
import sys, threading
import structlog
from tether.broker.store import Append, PutSession, Subscribe
from tether.broker.store_sqlite import SqliteStore
from tests.store_helpers import session

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
store = SqliteStore(sys.argv[1], sync=sys.argv[2])
subs = store.load().subscriptions
seq = subs[0].next_seq if subs else 1
if not subs:
    done = threading.Event()
    store.submit((PutSession(session()), Subscribe("s1", "t")), lambda e: done.set())
    done.wait()
print("ready", flush=True)
while True:
    done = threading.Event()
    last = seq + 4

    def on_done(error, last=last):
        assert error is None, error
        print(last, flush=True)
        done.set()

    payloads = tuple(b"%d" % n for n in range(seq, last + 1))
    store.submit((Append("s1", "t", seq, payloads),), on_done)
    seq = last + 1
    # Up to two batches in flight, so that kills also land between submit and commit.
    if seq % 10 == 1:
        done.wait()
"""


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_what_was_reported_committed_survives_sigkill(tmp_path: Path, sync: str) -> None:
    data = tmp_path / "data"
    rng = random.Random()
    reported = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(data), sync],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + rng.uniform(0.05, 0.6)
        last = reported
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            last = int(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        proc.stdout.close()
        assert last > reported, "the writer committed nothing"
        reported = last
        with SqliteStore(data) as store:
            (sub,) = store.load().subscriptions
            seqs = [seq for seq, _ in read_all(store, "s1", "t", page=5000)]
        # Every seq reported is there, in order, with nothing missing before it; the
        # counter is past every seq ever handed out.
        assert seqs[:reported] == list(range(1, reported + 1))
        assert seqs == list(range(1, len(seqs) + 1))
        assert sub.next_seq == len(seqs) + 1
        reported = len(seqs)
