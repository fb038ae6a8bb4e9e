"""The SQLite store on real files: what it keeps across close and reopen, group commit, when
`on_done` is called, the queue operations, and opening (versions, migrations, corrupt files,
the lock). Faults and crashes are in test_store_faults.py, the model test in
test_store_model.py."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.store_helpers import WAIT, ok, read, read_all, session, submit
from tether.broker.store import (
    Ack,
    Append,
    BatchRejected,
    DeleteSession,
    Discard,
    DiscardOldest,
    MarkSent,
    OnDone,
    PutSession,
    SetDropped,
    SetHealth,
    SetTokens,
    StoreClosed,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreOp,
    StoreVersionError,
    Subscribe,
    Touch,
    Unsubscribe,
    token_hash,
)
from tether.broker.store_memory import MemoryStore
from tether.broker.store_schema import MIGRATIONS, Migration
from tether.broker.store_sqlite import DB_NAME, LOCK_NAME, SqliteStore


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(data_dir)
    yield store
    store.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def count(path: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        value: int = conn.execute(sql).fetchone()[0]
        return value
    finally:
        conn.close()


def payloads(*values: str) -> tuple[bytes, ...]:
    return tuple(v.encode() for v in values)


# A bit of everything: two sessions, health, tokens, presence, an unsubscribed topic that
# keeps its numbering, sent and acked messages, overflow drops and their counters.
EVERYTHING: tuple[tuple[StoreOp, ...], ...] = (
    (PutSession(session("s1", "c1")), PutSession(session("s2", "c2", metadata={}))),
    (
        SetHealth("s1", "degraded", {"battery": 12, "tags": ["a", "b"]}),
        SetTokens("s1", token_hash("new"), token_hash("old")),
        Touch("s2", 1_700_000_200.0, 1_700_000_500.0),
    ),
    (Subscribe("s1", "temp"), Subscribe("s1", "gone"), Subscribe("s2", "temp", next_seq=40)),
    (Append("s1", "temp", 1, payloads("a", "b", "c", "d")), Append("s1", "gone", 1, (b"x",))),
    (Append("s2", "temp", 40, payloads("p", "q")),),
    (MarkSent("s1", "temp", 3), Ack("s1", "temp", 2), Unsubscribe("s1", "gone")),
    (Append("s1", "temp", 5, payloads("e", "f")), Discard("s1", "temp", (4,))),
    (SetDropped("s1", "temp", 1, 2), DiscardOldest("s2", "temp", 1)),
)


def test_everything_survives_close_and_reopen_and_matches_the_memory_store(
    data_dir: Path,
) -> None:
    memory = MemoryStore()
    with SqliteStore(data_dir) as store:
        for batch in EVERYTHING:
            ok(store, *batch)
            ok(memory, *batch)
        before = store.load()
    with SqliteStore(data_dir) as store:
        after = store.load()
        assert after == before == memory.load()
        assert read_all(store, "s1", "temp") == ((3, b"c"), (5, b"e"), (6, b"f"))
        assert read_all(store, "s2", "temp") == ((41, b"q"),)
        assert read_all(store, "s1", "gone") == ()

    s1, s2 = after.sessions
    assert s1 == session(
        "s1",
        "c1",
        health="degraded",
        health_details={"battery": 12, "tags": ["a", "b"]},
        token_hash=token_hash("new"),
        previous_hash=token_hash("old"),
    )
    assert (s2.last_seen, s2.expires_at) == (1_700_000_200.0, 1_700_000_500.0)
    subs = {(r.session_id, r.topic): r for r in after.subscriptions}
    temp = subs["s1", "temp"]
    assert (temp.active, temp.next_seq, temp.sent_upto) == (True, 7, 3)
    assert (temp.dropped_live, temp.dropped_away, temp.queued, temp.queued_bytes) == (1, 2, 3, 3)
    gone = subs["s1", "gone"]
    assert (gone.active, gone.next_seq, gone.queued, gone.sent_upto) == (False, 2, 0, 0)
    assert subs["s2", "temp"].next_seq == 42


def test_the_directory_is_private_and_the_lock_names_us(store: SqliteStore, data_dir: Path) -> None:
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert (data_dir / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert (data_dir / DB_NAME).exists()
    conn = sqlite3.connect(data_dir / DB_NAME)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_tokens_are_stored_as_hashes_only(store: SqliteStore, data_dir: Path) -> None:
    ok(store, PutSession(session("s1", token_hash=token_hash("sekrit-token-value"))))
    store.close()
    for name in os.listdir(data_dir):
        assert b"sekrit-token-value" not in (data_dir / name).read_bytes()
    assert token_hash("sekrit-token-value") == hashlib.sha256(b"sekrit-token-value").digest()


def test_batches_submitted_together_commit_in_one_transaction(store: SqliteStore) -> None:
    ok(store, PutSession(session()), Subscribe("s1", "t"))
    start = store.commits
    holding, release = threading.Event(), threading.Event()
    order: list[int] = []
    outcomes: list[StoreError | None] = []
    all_done = threading.Event()

    def blocker(error: StoreError | None) -> None:
        # Holds the writer (a real on_done must not block) while the next batches queue up.
        holding.set()
        release.wait(WAIT)

    def on_done(n: int) -> OnDone:
        def done(error: StoreError | None) -> None:
            order.append(n)
            outcomes.append(error)
            if n == 49:
                all_done.set()

        return done

    store.submit((Append("s1", "t", 1, (b"first",)),), blocker)
    assert holding.wait(WAIT)
    for n in range(50):
        store.submit((Append("s1", "t", n + 2, (b"m%d" % n,)),), on_done(n))
    release.set()
    assert all_done.wait(WAIT)
    assert order == list(range(50))
    assert outcomes == [None] * 50
    assert store.commits == start + 2  # the blocker's own group, then the 50 in one
    assert len(read_all(store, "s1", "t")) == 51


def test_on_done_comes_after_the_commit(store: SqliteStore, data_dir: Path) -> None:
    ok(store, PutSession(session()), Subscribe("s1", "t"))
    seen: list[int] = []
    done = threading.Event()

    def on_done(error: StoreError | None) -> None:
        assert error is None
        # Another connection (another process could do the same) already sees the rows.
        seen.append(count(data_dir / DB_NAME, "SELECT count(*) FROM messages"))
        done.set()

    store.submit((Append("s1", "t", 1, payloads("a", "b", "c")),), on_done)
    assert done.wait(WAIT)
    assert seen == [3]


def test_ack_removes_a_range_and_only_that(store: SqliteStore) -> None:
    ok(store, PutSession(session()), Subscribe("s1", "t"), Subscribe("s1", "u"))
    ok(store, Append("s1", "t", 1, tuple(b"%d" % i for i in range(1, 11))))
    ok(store, Append("s1", "u", 1, payloads("x", "y")))
    ok(store, Ack("s1", "t", 4))
    assert [seq for seq, _ in read_all(store, "s1", "t")] == list(range(5, 11))
    ok(store, Ack("s1", "t", 4), Ack("s1", "t", 3), Ack("s1", "nope", 9), Ack("zz", "t", 9))
    assert len(read_all(store, "s1", "t")) == 6
    ok(store, Ack("s1", "t", 100))
    assert read_all(store, "s1", "t") == ()
    assert read_all(store, "s1", "u") == ((1, b"x"), (2, b"y"))


def test_deleting_a_session_deletes_everything_under_it(store: SqliteStore, data_dir: Path) -> None:
    ok(store, PutSession(session("s1")), PutSession(session("s2", "c2")))
    ok(store, Subscribe("s1", "a"), Subscribe("s1", "b"), Subscribe("s2", "a"))
    ok(store, Append("s1", "a", 1, payloads("1", "2")), Append("s1", "b", 1, payloads("3")))
    ok(store, Append("s2", "a", 1, payloads("4")), Unsubscribe("s1", "b"))
    ok(store, DeleteSession("s1"))
    snapshot = store.load()
    assert [s.session_id for s in snapshot.sessions] == ["s2"]
    assert [(r.session_id, r.topic) for r in snapshot.subscriptions] == [("s2", "a")]
    assert count(data_dir / DB_NAME, "SELECT count(*) FROM messages") == 1
    # Gone for good: subscribing again starts from 1, and updates to it do nothing.
    assert isinstance(submit(store, Subscribe("s1", "a")), BatchRejected)
    ok(store, SetHealth("s1", "ok", None), Touch("s1", 1.0, None), DeleteSession("s1"))
    assert store.load() == snapshot


def test_next_seq_outlives_an_unsubscribe(store: SqliteStore) -> None:
    ok(store, PutSession(session()), Subscribe("s1", "t"))
    ok(store, Append("s1", "t", 1, payloads("a", "b", "c")), Unsubscribe("s1", "t"))
    (sub,) = store.load().subscriptions
    assert (sub.active, sub.next_seq, sub.queued) == (False, 4, 0)
    assert isinstance(submit(store, Append("s1", "t", 4, payloads("x"))), BatchRejected)
    ok(store, Subscribe("s1", "t", next_seq=1))  # a lower counter never wins
    assert store.load().subscriptions[0].next_seq == 4
    error = submit(store, Append("s1", "t", 3, payloads("old")))
    assert isinstance(error, BatchRejected)
    assert "at most 3" in str(error)
    ok(store, Append("s1", "t", 4, payloads("d")))
    assert read_all(store, "s1", "t") == ((4, b"d"),)


def test_read_queue_pages_in_order_and_sees_what_was_submitted(store: SqliteStore) -> None:
    ok(store, PutSession(session()), Subscribe("s1", "t"))
    done = threading.Event()
    # Not waited for: a read submitted after the batches still sees them.
    store.submit((Append("s1", "t", 1, tuple(b"m%d" % i for i in range(1, 31))),), lambda e: None)
    store.submit((Discard("s1", "t", (3, 4, 17)),), lambda error: done.set())
    entries = read_all(store, "s1", "t", page=10)
    assert done.wait(WAIT)
    assert [seq for seq, _ in entries] == [s for s in range(1, 31) if s not in (3, 4, 17)]
    assert all(payload == b"m%d" % seq for seq, payload in entries)
    assert read(store, "s1", "t", after=20, limit=3) == ((21, b"m21"), (22, b"m22"), (23, b"m23"))
    assert read(store, "s1", "nope") == ()


def test_a_rejected_batch_leaves_nothing_and_its_group_commits(store: SqliteStore) -> None:
    ok(store, PutSession(session()), Subscribe("s1", "t"))
    release = threading.Event()
    outcomes: dict[str, StoreError | None] = {}
    finished = threading.Event()

    def record(name: str) -> OnDone:
        def done(error: StoreError | None) -> None:
            outcomes[name] = error
            if name == "after":
                finished.set()

        return done

    holding = threading.Event()

    def blocker(error: StoreError | None) -> None:
        holding.set()
        release.wait(WAIT)

    store.submit((), blocker)
    assert holding.wait(WAIT)
    commits = store.commits
    store.submit((Append("s1", "t", 1, payloads("a")),), record("before"))
    store.submit(
        (Append("s1", "t", 2, payloads("b")), Subscribe("ghost", "t")),
        record("bad"),
    )
    store.submit((Append("s1", "t", 2, payloads("c")),), record("after"))
    release.set()
    assert finished.wait(WAIT)
    assert store.commits == commits + 1  # the three were one group
    assert outcomes["before"] is None and outcomes["after"] is None
    assert isinstance(outcomes["bad"], BatchRejected)
    assert read_all(store, "s1", "t") == ((1, b"a"), (2, b"c"))
    # A batch SQLite itself refuses (a payload it cannot store) is rejected the same way.
    bad = submit(store, Append("s1", "t", 3, (object(),)))  # type: ignore[arg-type]
    assert isinstance(bad, BatchRejected)


def test_submit_and_read_after_close_raise_and_close_is_idempotent(store: SqliteStore) -> None:
    store.close()
    store.close()
    with pytest.raises(StoreClosed):
        store.submit((), print)
    with pytest.raises(StoreClosed):
        store.read_queue("s1", "t", 0, 1, print)


def test_close_commits_what_was_submitted(data_dir: Path) -> None:
    store = SqliteStore(data_dir)
    calls: list[StoreError | None] = []
    store.submit((PutSession(session()), Subscribe("s1", "t")), calls.append)
    for i in range(1, 101):
        store.submit((Append("s1", "t", i, (b"%d" % i,)),), calls.append)
    store.close()
    assert calls == [None] * 101
    assert not (data_dir / f"{DB_NAME}-wal").exists()  # checkpointed on close
    with SqliteStore(data_dir) as again:
        assert len(read_all(again, "s1", "t")) == 100


# --- opening -------------------------------------------------------------------------------


def test_a_second_opener_is_refused_naming_the_holder(store: SqliteStore, data_dir: Path) -> None:
    with pytest.raises(StoreLocked) as caught:
        SqliteStore(data_dir)
    assert caught.value.pid == os.getpid()
    assert str(os.getpid()) in str(caught.value)
    store.close()
    SqliteStore(data_dir).close()  # free again once closed


def test_a_newer_store_is_refused_in_one_line_and_left_alone(data_dir: Path) -> None:
    SqliteStore(data_dir).close()
    db = data_dir / DB_NAME
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    before = digest(db)
    with pytest.raises(StoreVersionError) as caught:
        SqliteStore(data_dir)
    assert (caught.value.found, caught.value.supported) == (7, len(MIGRATIONS))
    message = str(caught.value)
    assert "\n" not in message and "7" in message and str(len(MIGRATIONS)) in message
    assert digest(db) == before
    SqliteStore(data_dir, migrations=[*MIGRATIONS, *_fake_versions(len(MIGRATIONS) + 1, 7)])


def _fake_versions(first: int, last: int) -> list[Migration]:
    return [Migration(v, (f"CREATE TABLE fake_{v} (x)",)) for v in range(first, last + 1)]


V2 = Migration(
    len(MIGRATIONS) + 1,
    (
        "ALTER TABLE sessions ADD COLUMN note TEXT NOT NULL DEFAULT 'migrated'",
        "CREATE TABLE extra (k TEXT PRIMARY KEY) WITHOUT ROWID",
    ),
)


def test_an_older_store_is_migrated_in_place(data_dir: Path) -> None:
    with SqliteStore(data_dir) as store:
        for batch in EVERYTHING:
            ok(store, *batch)
        before = store.load()
    db = data_dir / DB_NAME
    with SqliteStore(data_dir, migrations=[*MIGRATIONS, V2]) as store:
        assert store.load() == before
        assert read_all(store, "s1", "temp") == ((3, b"c"), (5, b"e"), (6, b"f"))
    assert count(db, "PRAGMA user_version") == V2.version
    assert count(db, "SELECT count(*) FROM sessions WHERE note = 'migrated'") == 2
    # Now newer than the code that wrote it: refused.
    with pytest.raises(StoreVersionError):
        SqliteStore(data_dir)


def test_a_failing_migration_changes_nothing(data_dir: Path) -> None:
    with SqliteStore(data_dir) as store:
        ok(store, PutSession(session()))
    broken = Migration(V2.version, (V2.statements[1], "ALTER TABLE nowhere ADD COLUMN x"))
    with pytest.raises(StoreCorrupt):
        SqliteStore(data_dir, migrations=[*MIGRATIONS, broken])
    db = data_dir / DB_NAME
    assert count(db, "PRAGMA user_version") == len(MIGRATIONS)
    assert count(db, "SELECT count(*) FROM sqlite_master WHERE name = 'extra'") == 0
    with SqliteStore(data_dir) as store:
        assert len(store.load().sessions) == 1


def test_migrations_must_be_numbered_in_order(data_dir: Path) -> None:
    with pytest.raises(ValueError):
        SqliteStore(data_dir, migrations=[Migration(2, ())])
    # The lock was let go.
    SqliteStore(data_dir).close()


def _damage(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + 3072] = bytes(range(256)) * 12
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda db: db.write_bytes(b"this is not a database" * 100), id="garbage"),
        pytest.param(lambda db: _damage(db, 100), id="first-page"),
        pytest.param(lambda db: _damage(db, 4096 * 3), id="inner-page"),
        pytest.param(lambda db: db.write_bytes(db.read_bytes()[: 4096 * 2]), id="truncated"),
    ],
)
def test_a_corrupt_store_is_refused_and_left_alone(
    data_dir: Path, damage: Callable[[Path], object]
) -> None:
    with SqliteStore(data_dir) as store:
        ok(store, PutSession(session()), Subscribe("s1", "t"))
        ok(store, Append("s1", "t", 1, tuple(bytes(300) for _ in range(100))))
    db = data_dir / DB_NAME
    damage(db)
    before = digest(db)
    with pytest.raises(StoreCorrupt) as caught:
        SqliteStore(data_dir)
    assert caught.value.path == str(db)
    assert "\n" not in str(caught.value)
    assert digest(db) == before
    assert sorted(os.listdir(data_dir)) == [LOCK_NAME, DB_NAME]


def test_a_foreign_sqlite_file_is_refused(data_dir: Path) -> None:
    data_dir.mkdir()
    db = data_dir / DB_NAME
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE theirs (x)")
    conn.commit()
    conn.close()
    before = digest(db)
    with pytest.raises(StoreCorrupt, match="not a Tether store"):
        SqliteStore(data_dir)
    assert digest(db) == before


def test_an_unreadable_store_is_refused(data_dir: Path) -> None:
    data_dir.mkdir()
    (data_dir / DB_NAME).mkdir()  # a directory where the file should be
    with pytest.raises(StoreCorrupt):
        SqliteStore(data_dir)


def test_sync_must_be_full_or_normal(data_dir: Path) -> None:
    with pytest.raises(ValueError):
        SqliteStore(data_dir, sync="off")  # type: ignore[arg-type]
    with SqliteStore(data_dir, sync="normal") as store:
        ok(store, PutSession(session()))


def test_the_memory_store_answers_at_once_and_closes(tmp_path: Path) -> None:
    memory = MemoryStore()
    calls: list[StoreError | None] = []
    memory.submit((PutSession(session()), Subscribe("s1", "t")), calls.append)
    assert calls == [None]  # before submit returned
    memory.submit((Subscribe("nobody", "t"),), calls.append)
    assert isinstance(calls[1], BatchRejected)
    memory.close()
    with pytest.raises(StoreClosed):
        memory.submit((), calls.append)
    assert not list(tmp_path.iterdir())


def test_a_thread_checkpoints_and_the_wal_stays_bounded_under_a_busy_writer(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints are mostly off the commit path (they fsync the database file), and the
    writer's own, rarer ones let the WAL start over, so it does not grow without end."""
    from tether.broker import store_sqlite

    monkeypatch.setattr(store_sqlite, "CHECKPOINT_EVERY", 10)
    monkeypatch.setattr(store_sqlite, "WAL_RESET_PAGES", 256)
    store = SqliteStore(data_dir)
    checkpoints: list[Any] = []
    background = store._checkpointer
    store._checkpointer = _Recording(background, checkpoints)  # type: ignore[assignment]
    try:
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 256
        ok(store, PutSession(session()), Subscribe("s1", "t"))
        wal = data_dir / f"{DB_NAME}-wal"
        sizes = []
        blob = b"x" * 4000  # about a page per message
        for round_ in range(6):
            first = 1 + round_ * 500
            for start in range(first, first + 500, 10):
                ok(store, Append("s1", "t", start, (blob,) * 10))
            ok(store, Ack("s1", "t", first + 499))
            sizes.append(wal.stat().st_size)
        # 3,000 pages went through the WAL; without checkpoints it would hold them all.
        assert max(sizes) < 1000 * 4096, sizes
        assert checkpoints  # and the background thread did its part
    finally:
        store.close()
        background.close()


class _Recording:
    """A connection stand-in that records the statements run on it."""

    def __init__(self, conn: sqlite3.Connection, log: list[Any]) -> None:
        self._conn, self._log = conn, log

    def execute(self, sql: str) -> sqlite3.Cursor:
        self._log.append(sql)
        return self._conn.execute(sql)

    def close(self) -> None:
        pass
